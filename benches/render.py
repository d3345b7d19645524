#!/usr/bin/env python3
"""Renders BENCHMARKS.md from benches/results/e2e.json and Criterion's output."""
import json
import pathlib
import statistics

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTES = ROOT / "benches" / "NOTES.md"


def med(values):
    return statistics.median(values) if values else float("nan")


def criterion_rows():
    rows = []
    for est in sorted((ROOT / "target" / "criterion").glob("*/*/new/estimates.json")):
        bench = json.loads((est.parent / "benchmark.json").read_text())
        median_ns = json.loads(est.read_text())["median"]["point_estimate"]
        rows.append((bench["group_id"], bench["function_id"], median_ns))
    return rows


def main():
    r = json.loads((ROOT / "benches" / "results" / "e2e.json").read_text())
    m = r["machine"]
    out = []
    w = out.append
    w("# Benchmarks\n")
    w("Produced by `scripts/bench` (Criterion micro benchmarks, then `benches/e2e.py`); "
      "every number below comes from that one run. Do not edit by hand: rerun the script.\n")
    w(f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, Linux {m['kernel']}")
    w(f"- Envoy {m['envoy']} (`--concurrency 1`), {m['wrk']} (`-t1`), all on loopback, same machine")
    w(f"- Run started {r['started']}; {r['repeats']} interleaved repeats of {r['seconds']} s per cell; "
      "tables show medians\n")

    w("## Hot path (Criterion, per request, no network)\n")
    w("| benchmark | median |")
    w("|---|---|")
    for group, name, ns in criterion_rows():
        w(f"| {group}: {name} | {ns / 1000:.2f} µs |")
    w("")

    w("## End to end through Envoy (wrk → Envoy → upstream)\n")
    w("Request: `GET /metrics?kubernetes-audience=bench` through the forward proxy to a local upstream "
      "answering `200 ok`. CPU columns: CPU time of Envoy and of the ext_proc server per request.\n")
    names = {v: (letter, label) for letter, v, label in [
        ("a", "forward", "Envoy forwarding only"), ("b", "native", "Envoy static header (native)"),
        ("c", "processor_tcp", "Envoy + kube-audience-proxy, TCP"),
        ("d", "processor_uds", "Envoy + kube-audience-proxy, UDS"),
        ("e", "floor", "Envoy + minimal ext_proc (floor)")]}
    cells = {}
    for run in r["e2e"]:
        cells.setdefault((run["name"], run["concurrency"]), []).append(run)
    w("| | variant | conc. | req/s | p50 | p99 | Envoy CPU/req | ext_proc CPU/req | non-2xx |")
    w("|---|---|---|---|---|---|---|---|---|")
    for concurrency in (1, 32):
        for name, (letter, label) in names.items():
            runs = cells.get((name, concurrency), [])
            if not runs:
                continue
            w(f"| ({letter}) | {label} | {concurrency} | {med([x['rps'] for x in runs]):,.0f} | "
              f"{med([x['p50_ms'] for x in runs]):.3f} ms | {med([x['p99_ms'] for x in runs]):.3f} ms | "
              f"{med([x['envoy_cpu_us_per_req'] for x in runs]):.1f} µs | "
              f"{med([x['server_cpu_us_per_req'] for x in runs]):.1f} µs | "
              f"{sum(x['non_2xx'] for x in runs)} |")
    w("")
    w("Ratios (medians):\n")
    w("| conc. | (c)/(e) req/s | (c)/(e) p99 | (d)/(e) req/s | (d)/(e) p99 | (c)/(b) req/s | (c)/(a) req/s |")
    w("|---|---|---|---|---|---|---|")

    def stat(name, c, key):
        return med([x[key] for x in cells.get((name, c), [])])

    for c in (1, 32):
        w(f"| {c} | {stat('processor_tcp', c, 'rps') / stat('floor', c, 'rps'):.3f} | "
          f"{stat('processor_tcp', c, 'p99_ms') / stat('floor', c, 'p99_ms'):.3f} | "
          f"{stat('processor_uds', c, 'rps') / stat('floor', c, 'rps'):.3f} | "
          f"{stat('processor_uds', c, 'p99_ms') / stat('floor', c, 'p99_ms'):.3f} | "
          f"{stat('processor_tcp', c, 'rps') / stat('native', c, 'rps'):.3f} | "
          f"{stat('processor_tcp', c, 'rps') / stat('forward', c, 'rps'):.3f} |")
    w("")

    w("## Processor only (`load`: Process streams as Envoy opens them, no Envoy)\n")
    w("| server | conc. | streams/s | p50 | p99 | server CPU/stream |")
    w("|---|---|---|---|---|---|")
    only = {}
    for run in r["processor_only"]:
        only.setdefault((run["name"], run["concurrency"]), []).append(run)
    for (name, c), runs in sorted(only.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        w(f"| {name} | {c} | {med([x['rate'] for x in runs]):,.0f} | {med([x['p50_us'] for x in runs]):.0f} µs | "
          f"{med([x['p99_us'] for x in runs]):.0f} µs | {med([x['server_cpu_us_per_stream'] for x in runs]):.1f} µs |")
    w("")

    bursts = r.get("sds_burst") or []
    if bursts:
        b0 = bursts[0]
        w("## Leaf minting burst vs. answers on the one-worker runtime\n")
        w(f"`sds_burst`: {len(bursts)} runs, each against a fresh processor (cold leaf cache, default "
          f"`--worker-threads 1`, `--intercept-host '*.example.test'`). Delta SDS subscribes "
          f"{b0['names']:,} new names in batches of {b0['batch']} over {b0['streams']} streams, each batch "
          "answered before the next, while two probes call back to back on their own connections: "
          "grpc.health.v1 `Check` and an ext_proc `Process` stream with one pass-through "
          "`request_headers` (no audience). Idle: the same probes before the burst. Medians over runs.\n")
        burst_ms = med([x["burst_ms"] for x in bursts])
        w(f"Burst: {burst_ms:,.0f} ms for {b0['names']:,} leaves ({med([x['mints_per_s'] for x in bursts]):,.0f} "
          f"leaves/s), processor CPU {med([x['processor_cpu_s'] for x in bursts]):.2f} s per run.\n")
        w("| probe | phase | answers | p50 | p99 | max |")
        w("|---|---|---|---|---|---|")
        labels = {"health": "grpc.health.v1 Check", "ext_proc": "ext_proc pass-through"}
        for kind, label in labels.items():
            for phase, phase_label in (("idle", "idle"), ("burst", "during the burst")):
                cells = [x["probes"][kind][phase] for x in bursts]
                errors = sum(c["errors"] for c in cells)
                w(f"| {label} | {phase_label} | {med([c['answers'] for c in cells]):,.0f}"
                  f"{f' ({errors} errors)' if errors else ''} | {med([c['p50_us'] for c in cells]):,.0f} µs | "
                  f"{med([c['p99_us'] for c in cells]):,.0f} µs | {med([c['max_us'] for c in cells]):,.0f} µs |")
        def probe(kind, phase, key):
            return med([x["probes"][kind][phase][key] for x in bursts])

        w("")
        w("What it shows: key generation and signing run on the blocking pool (one signer per CPU), not on "
          "the runtime's one worker, so answers keep flowing while leaves are minted: in a burst of "
          f"{burst_ms:,.0f} ms, {probe('health', 'burst', 'answers'):,.0f} health checks and "
          f"{probe('ext_proc', 'burst', 'answers'):,.0f} ext_proc streams were answered, at a median of "
          f"{probe('health', 'burst', 'p50_us'):,.0f} and {probe('ext_proc', 'burst', 'p50_us'):,.0f} µs against "
          f"{probe('health', 'idle', 'p50_us'):,.0f} and {probe('ext_proc', 'idle', 'p50_us'):,.0f} µs idle "
          "(the signers, the probes and the SDS client share the machine's cores with the worker).\n")

    c = r["cold"]
    w("## Cold path (first request for an audience)\n")
    w(f"Median of {c['samples']} new audiences, through Envoy with the processor (TCP):\n")
    w("| | median |")
    w("|---|---|")
    w(f"| time to first byte, new audience (TokenRequest on the path) | {c['cold_ttfb_ms']:.2f} ms |")
    w(f"| time to first byte, same audience again (cache hit) | {c['warm_ttfb_ms']:.2f} ms |")
    w(f"| TokenRequest to the test API server, curl, including TLS handshake | {c['tokenrequest_total_ms']:.2f} ms |")
    w(f"| TokenRequest to the test API server, after the TLS handshake | {c['tokenrequest_after_tls_ms']:.2f} ms |")
    w("")
    w("Concurrent first requests for one audience make exactly one TokenRequest: asserted by "
      "`tests/ext_proc.rs` (`concurrent_first_requests_make_one_token_request`, 200 streams) and the "
      "cache unit tests, not timed here.\n")

    w("## Memory (processor RSS)\n")
    w("| state | RSS |")
    w("|---|---|")
    w(f"| idle, after start | {r['rss_idle_kib'] / 1024:.1f} MiB |")
    w(f"| 1,000 audiences cached | {r['rss_1000_audiences_kib'] / 1024:.1f} MiB |")
    s = r["soak"]
    w(f"| soak ({r['soak_seconds']} s, 32 concurrent streams, {s['streams']:,} streams), halfway | "
      f"{r['rss_soak_half_kib'] / 1024:.1f} MiB |")
    w(f"| soak, end | {r['rss_soak_end_kib'] / 1024:.1f} MiB |")
    w("")
    if NOTES.exists():
        w(NOTES.read_text())
    (ROOT / "BENCHMARKS.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
