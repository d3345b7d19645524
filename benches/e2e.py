#!/usr/bin/env python3
"""End-to-end, processor-only, cold-path and memory benchmarks.

Run through `scripts/bench` (which builds everything in release mode first).
Everything listens on 127.0.0.1 and every load is bounded in time.
Writes benches/results/e2e.json; scripts/bench then renders BENCHMARKS.md.

Knobs (environment): BENCH_SECONDS (wrk run length, default 6),
BENCH_REPEATS (default 5), BENCH_SOAK_SECONDS (memory soak, default 120),
BENCH_SDS_RUNS (leaf minting bursts, default 5), BENCH_PARTS (default
e2e,only,sds,cold,memory; e.g. BENCH_PARTS=sds runs only the minting burst),
BENCH_OUT (where the results go).
"""
import http.client
import json
import os
import pathlib
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
REL = ROOT / "target" / "release"
ENVOY = os.environ.get("ENVOY_BIN", str(ROOT / ".venv" / "bin" / "envoy"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "6"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
SOAK = int(os.environ.get("BENCH_SOAK_SECONDS", "120"))
SDS_RUNS = int(os.environ.get("BENCH_SDS_RUNS", "5"))
CONCURRENCIES = [1, 32]
PROXY, PROC_TCP, PROC_ADMIN, PROC_UDS_ADMIN, FLOOR = 18100, 18110, 18111, 18112, 18120
PROC_SDS, PROC_SDS_ADMIN = 18130, 18131
PROC_FAST, PROC_FAST_ADMIN = 18140, 18141
VARIANTS = [
    ("a", "forward", "Envoy forwarding only"),
    ("b", "native", "Envoy injecting a static header natively"),
    ("c", "processor_tcp", "Envoy + kube-audience-proxy (loopback TCP)"),
    ("d", "processor_uds", "Envoy + kube-audience-proxy (Unix socket)"),
    ("e", "floor", "Envoy + minimal ext_proc server (protocol floor)"),
    ("h", "fast", "Envoy + kube-audience-proxy fast path (credential_injector, SDS token)"),
    # Experiments, run only when named in BENCH_VARIANTS.
    ("f", "processor_google_grpc", "(c) with Envoy's google_grpc client"),
    ("g", "processor_pooled", "(c) with at most 8 streams per connection to the processor"),
]
SELECTED = os.environ.get("BENCH_VARIANTS", "a,b,c,d,e,h").split(",")
PARTS = os.environ.get("BENCH_PARTS", "e2e,only,sds,cold,memory").split(",")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Done(Exception):
    """Raised to skip the remaining parts."""


def log(*args):
    print("[bench]", *args, file=sys.stderr, flush=True)


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def wait_path(path, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise SystemExit(f"{path} did not appear")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def to_ms(value):
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(concurrency, seconds, host, path):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-H", f"Host: {host}",
         f"http://127.0.0.1:{PROXY}{path}"],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": total,
            "non_2xx": int(errors.group(1)) if errors else 0}


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: Envoy's admin interface has no TCP address."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def envoy_ready(admin):
    conn = UnixHTTPConnection(str(admin), timeout=1)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().read().strip() == b"LIVE"
    finally:
        conn.close()


def start_envoy(config):
    proc = subprocess.Popen([ENVOY, "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
                             "--log-level", "warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if envoy_ready(config.parent / "envoy-admin.sock"):
                wait_port(PROXY)
                return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"envoy did not start with {config}")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(target, concurrency, seconds=None, extra=()):
    args = [str(REL / "examples" / "load"), "--target", target, "--concurrency", str(concurrency)]
    if seconds is not None:
        args += ["--seconds", str(seconds)]
    args += list(extra)
    out = subprocess.run(args, capture_output=True, text=True, timeout=(seconds or 60) + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def curl_times(args, *fields):
    fmt = "%{http_code}" + "".join(" %{" + f + "}" for f in fields)
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "15", "--noproxy", "", "-w", fmt] + args,
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    if out[0] not in ("200", "201"):
        raise SystemExit(f"unexpected status {out[0]} for {args}")
    return [float(v) * 1000.0 for v in out[1:]]


def machine():
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    envoy = subprocess.run([ENVOY, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(int(mem) / 1024 / 1024, 1),
            "kernel": platform.release(), "envoy": envoy,
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()}


def main():
    work = pathlib.Path(tempfile.mkdtemp(prefix="kap-bench-"))
    uds = work / "kap.sock"
    floor_uds = work / "floor.sock"
    procs = []
    results = {"machine": machine(), "seconds": SECONDS, "repeats": REPEATS, "soak_seconds": SOAK,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        stack = subprocess.Popen([str(REL / "examples" / "bench_stack"), str(work), str(PROXY),
                                  str(PROC_TCP), str(uds), str(FLOOR), str(PROC_FAST)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(stack)
        info = json.loads(stack.stdout.readline())
        upstream = info["upstream"]
        common = [str(REL / "kube-audience-proxy"), "--kubeconfig", str(work / "kubeconfig"),
                  "--service-account", "app", "--namespace", "demo", "--log-level", "warn",
                  "--shutdown-delay", "0s",
                  # Every upstream of the benchmark is on 127.0.0.1.
                  "--allow-local-destinations"] + os.environ.get("BENCH_PROCESSOR_ARGS", "").split()
        proc_tcp = subprocess.Popen(common + ["--grpc-listen-address", f"127.0.0.1:{PROC_TCP}",
                                              "--admin-listen-address", f"127.0.0.1:{PROC_ADMIN}"])
        procs.append(proc_tcp)
        wait_port(PROC_TCP)
        results["rss_idle_kib"] = rss_kib(proc_tcp.pid)
        proc_uds = subprocess.Popen(common + ["--grpc-listen-address", f"unix:{uds}",
                                              "--admin-listen-address", f"127.0.0.1:{PROC_UDS_ADMIN}"])
        procs.append(proc_uds)
        # The fast path's processor: the rule that gives the upstream `bench`
        # (as the generated fast.yaml expects); it only serves the SDS token.
        proc_fast = subprocess.Popen(common + ["--audience-rule", f"{upstream}=bench",
                                               "--grpc-listen-address", f"127.0.0.1:{PROC_FAST}",
                                               "--admin-listen-address", f"127.0.0.1:{PROC_FAST_ADMIN}"])
        procs.append(proc_fast)
        wait_port(PROC_FAST)
        floor = subprocess.Popen([str(REL / "examples" / "floor_server"), f"127.0.0.1:{FLOOR}"])
        procs.append(floor)
        floor_unix = subprocess.Popen([str(REL / "examples" / "floor_server"), f"unix:{floor_uds}"])
        procs.append(floor_unix)
        wait_port(FLOOR)
        wait_path(uds)
        wait_path(floor_uds)
        servers = {"processor_tcp": proc_tcp, "processor_uds": proc_uds, "floor": floor,
                   "processor_google_grpc": proc_tcp, "processor_pooled": proc_tcp, "fast": proc_fast}

        # 1. End to end through Envoy, interleaved.
        # The fast path serves requests that name no audience (the rule names
        # it); every other variant names it in the query.
        paths = {"fast": "/metrics"}
        runs = []
        for repeat in range(REPEATS if "e2e" in PARTS else 0):
            for letter, name, _ in VARIANTS:
                if letter not in SELECTED:
                    continue
                envoy = start_envoy(work / f"{name}.yaml")
                path = paths.get(name, "/metrics?kubernetes-audience=bench")
                try:
                    wrk(8, 1, upstream, path)  # warm up: connections, token cache, DNS cache
                    for concurrency in CONCURRENCIES:
                        server = servers.get(name)
                        cpu0 = (cpu_seconds(envoy.pid), cpu_seconds(server.pid) if server else 0.0)
                        result = wrk(concurrency, SECONDS, upstream, path)
                        cpu1 = (cpu_seconds(envoy.pid), cpu_seconds(server.pid) if server else 0.0)
                        result.update(variant=letter, name=name, concurrency=concurrency, repeat=repeat,
                                      envoy_cpu_us_per_req=(cpu1[0] - cpu0[0]) * 1e6 / max(result["requests"], 1),
                                      server_cpu_us_per_req=(cpu1[1] - cpu0[1]) * 1e6 / max(result["requests"], 1))
                        log(letter, name, f"c={concurrency}", f"{result['rps']:.0f} rps",
                            f"p50 {result['p50_ms']:.3f} ms", f"p99 {result['p99_ms']:.3f} ms")
                        runs.append(result)
                finally:
                    stop(envoy)
        results["e2e"] = runs

        # 2. Processor-only load (no Envoy), cache-hit path.
        load(f"127.0.0.1:{PROC_TCP}", 8, 1)
        load(f"unix:{uds}", 8, 1)
        only = []
        for repeat in range(REPEATS if "only" in PARTS else 0):
            for name, target in [("processor_tcp", f"127.0.0.1:{PROC_TCP}"), ("processor_uds", f"unix:{uds}"),
                                 ("floor_tcp", f"127.0.0.1:{FLOOR}"), ("floor_uds", f"unix:{floor_uds}")]:
                for concurrency in CONCURRENCIES:
                    server = {"processor_tcp": proc_tcp, "processor_uds": proc_uds,
                              "floor_tcp": floor, "floor_uds": floor_unix}[name]
                    cpu0 = cpu_seconds(server.pid)
                    result = load(target, concurrency, max(SECONDS - 2, 2))
                    cpu1 = cpu_seconds(server.pid)
                    result.update(name=name, repeat=repeat,
                                  server_cpu_us_per_stream=(cpu1 - cpu0) * 1e6 / max(result["streams"], 1))
                    log("processor-only", name, f"c={concurrency}", f"{result['rate']:.0f} streams/s",
                        f"p50 {result['p50_us']} us", f"p99 {result['p99_us']} us")
                    only.append(result)
        results["processor_only"] = only

        # 3. Leaf minting burst: a fresh processor per run (cold leaf cache) on its default
        # one-worker runtime; sds_burst subscribes 1,500 new names over delta SDS while it
        # times health checks and pass-through ext_proc streams (idle, then during the burst).
        bursts = []
        for repeat in range(SDS_RUNS if "sds" in PARTS else 0):
            ca = work / f"sds-{repeat}" / "ca.crt"
            ca.parent.mkdir()
            proc = subprocess.Popen(common + ["--intercept-host", "*.example.test", "--max-certificates", "2000",
                                              "--ca-file-destination", str(ca),
                                              "--grpc-listen-address", f"127.0.0.1:{PROC_SDS}",
                                              "--admin-listen-address", f"127.0.0.1:{PROC_SDS_ADMIN}"])
            try:
                wait_port(PROC_SDS)
                cpu0 = cpu_seconds(proc.pid)
                out = subprocess.run([str(REL / "examples" / "sds_burst"), "--target", f"127.0.0.1:{PROC_SDS}",
                                      "--deadline-seconds", "30"],
                                     capture_output=True, text=True, timeout=90, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                result.update(repeat=repeat, processor_cpu_s=cpu_seconds(proc.pid) - cpu0,
                              rss_after_kib=rss_kib(proc.pid))
            finally:
                stop(proc)
            if not result["complete"]:
                raise SystemExit(f"sds_burst did not complete: {result}")
            log("sds", f"{result['answered']} names in {result['burst_ms']:.0f} ms",
                *(f"{kind} p99 idle {result['probes'][kind]['idle']['p99_us']} us"
                  f" burst {result['probes'][kind]['burst']['p99_us']} us" for kind in ("health", "ext_proc")))
            bursts.append(result)
        results["sds_burst"] = bursts

        # 4. Cold path: a new audience through Envoy vs the TokenRequest alone.
        if "cold" not in PARTS:
            raise Done
        envoy = start_envoy(work / "processor_tcp.yaml")
        try:
            cold, warm, direct_total, direct_server = [], [], [], []
            token = (work / "caller-token").read_text()
            for i in range(20):
                url = f"http://{upstream}/cold?kubernetes-audience=cold-{i}"
                cold.append(curl_times(["-x", f"http://127.0.0.1:{PROXY}", url], "time_starttransfer")[0])
                warm.append(curl_times(["-x", f"http://127.0.0.1:{PROXY}", url], "time_starttransfer")[0])
                body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                   "spec": {"audiences": [f"direct-{i}"], "expirationSeconds": 3600}})
                args = ["--cacert", str(work / "apiserver-ca.crt"), "-H", f"Authorization: Bearer {token}",
                        "-H", "Content-Type: application/json", "-X", "POST", "--data", body,
                        f"{info['apiserver']}/api/v1/namespaces/demo/serviceaccounts/app/token"]
                total, connected, first_byte = curl_times(args, "time_total", "time_appconnect", "time_starttransfer")
                direct_total.append(total)
                direct_server.append(first_byte - connected)
            results["cold"] = {"cold_ttfb_ms": statistics.median(cold), "warm_ttfb_ms": statistics.median(warm),
                               "tokenrequest_total_ms": statistics.median(direct_total),
                               "tokenrequest_after_tls_ms": statistics.median(direct_server), "samples": 20}
            log("cold", results["cold"])
        finally:
            stop(envoy)

        # 5. Memory: 1,000 cached audiences, then a bounded soak.
        if "memory" not in PARTS:
            raise Done
        load(f"127.0.0.1:{PROC_TCP}", 8, None, ["--audiences", "1000", "--requests", "1000"])
        results["rss_1000_audiences_kib"] = rss_kib(proc_tcp.pid)
        soak = subprocess.Popen([str(REL / "examples" / "load"), "--target", f"127.0.0.1:{PROC_TCP}",
                                 "--concurrency", "32", "--seconds", str(SOAK)], stdout=subprocess.PIPE, text=True)
        time.sleep(SOAK / 2)
        results["rss_soak_half_kib"] = rss_kib(proc_tcp.pid)
        soak_out = soak.communicate(timeout=SOAK + 60)[0]
        results["rss_soak_end_kib"] = rss_kib(proc_tcp.pid)
        results["soak"] = json.loads(soak_out.strip().splitlines()[-1])
        log("memory", results["rss_idle_kib"], results["rss_1000_audiences_kib"],
            results["rss_soak_half_kib"], results["rss_soak_end_kib"])
    except Done:
        pass
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if p.stdin:
                    p.stdin.close()
                stop(p)
    out = pathlib.Path(os.environ.get("BENCH_OUT", ROOT / "benches" / "results" / "e2e.json"))
    out.write_text(json.dumps(results, indent=1) + "\n")
    log("wrote", out)


if __name__ == "__main__":
    main()
