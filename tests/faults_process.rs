//! The processor killed (SIGKILL) under load and restarted on the same
//! address, with the real Envoy (shipped config), wrk as the client and the
//! JWT-checking upstream: what clients get before, while it is down and
//! after Envoy has reconnected (without an Envoy restart), with
//! `failure_mode_allow: false` (shipped) and `true`.

#[path = "faults/stack.rs"]
mod stack;
mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use stack::{MARGIN, MESSAGE_TIMEOUT, Stack, get, outcome, stack};
use support::reliability;
use support::upstream::TokenVerdict;

/// Collects per-status counts from every wrk thread and prints one summary
/// (`key=value` pairs) and one `status CODE COUNT` line per status.
const WRK_SCRIPT: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  io.write(string.format("requests=%d timeouts=%d connect=%d read=%d write=%d max_us=%d\n",
    summary.requests, summary.errors.timeout, summary.errors.connect,
    summary.errors.read, summary.errors.write, latency.max))
  local counts = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  for status, n in pairs(counts) do io.write(string.format("status %d %d\n", status, n)) end
end
"#;

/// What wrk reported.
#[derive(Debug, Default)]
struct WrkReport {
    summary: BTreeMap<String, u64>,
    statuses: BTreeMap<u16, u64>,
}

fn parse_wrk(stdout: &str) -> WrkReport {
    let mut report = WrkReport::default();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("status ") {
            let mut it = rest.split_whitespace();
            let status = it.next().unwrap().parse().unwrap();
            let count = it.next().unwrap().parse().unwrap();
            report.statuses.insert(status, count);
        } else if line.starts_with("requests=") {
            for pair in line.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap();
                report.summary.insert(k.to_owned(), v.parse().unwrap());
            }
        }
    }
    assert!(
        report.summary.contains_key("requests"),
        "wrk said:\n{stdout}"
    );
    report
}

/// Counters read at one moment: Envoy's and the upstream's.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    ok: u64,
    failed: u64,
    /// Requests the upstream received with a valid token / without any.
    with_token: usize,
    without_token: usize,
}

/// What happened between two snapshots, as the set of outcomes seen
/// (`200 with token`, `200 without token`, `5xx`), or `nothing`.
fn window(from: Snapshot, to: Snapshot) -> String {
    let mut seen = vec![];
    if to.with_token > from.with_token {
        seen.push("200 with token");
    }
    if to.without_token > from.without_token {
        seen.push("200 without token");
    }
    if to.failed > from.failed {
        seen.push("5xx");
    }
    if seen.is_empty() {
        "nothing".to_owned()
    } else {
        seen.join(" and ")
    }
}
/// Envoy's 2xx and 5xx counters and what the upstream received.
async fn snapshot(s: &Stack) -> Snapshot {
    let ok = s.stat("http.forward_proxy.downstream_rq_2xx").await;
    let failed = s.stat("http.forward_proxy.downstream_rq_5xx").await;
    let received = s.upstream.received();
    let with_token = received.iter().filter(|r| r.verdict.is_valid()).count();
    let without_token = received
        .iter()
        .filter(|r| r.verdict == TokenVerdict::Missing)
        .count();
    assert_eq!(
        with_token + without_token,
        received.len(),
        "the upstream only ever gets a valid token or none"
    );
    Snapshot {
        ok,
        failed,
        with_token,
        without_token,
    }
}

/// Runs the whole scenario; returns the observed outcome.
async fn kill_under_load(failure_mode_allow: bool) -> String {
    let (s, first) = stack(failure_mode_allow, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("statuses.lua");
    std::fs::write(&script, WRK_SCRIPT).unwrap();
    // Origin-form through Envoy's listener; the Host header names the
    // upstream (the dynamic forward proxy routes on it).
    let url = format!("http://{}/load?kubernetes-audience=A", s.envoy.listener);
    let host = format!("Host: {}", s.upstream.addr());
    let wrk = tokio::process::Command::new("wrk")
        .args(["-t", "2", "-c", "8", "-d", "8s", "--timeout", "8s", "-s"])
        .arg(&script)
        .args(["-H", &host, &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wrk must be installed (.ci/run installs it)");
    let ok = "http.forward_proxy.downstream_rq_2xx";
    let failed = "http.forward_proxy.downstream_rq_5xx";
    let allowed = "http.forward_proxy.ext_proc.failure_mode_allowed";
    let answered = "http.forward_proxy.ext_proc.stream_msgs_received";
    let start = snapshot(&s).await;
    s.wait_for_stat(ok, 50, "load through the processor").await;
    let before = snapshot(&s).await;
    let (status, _) = first.kill().await;
    assert_eq!(status.code(), None, "killed by a signal");
    // Requests the processor answered just before it died may still
    // complete: the down window starts once 16 more requests met the
    // processor's absence (two per connection).
    let down_signal = if failure_mode_allow { allowed } else { failed };
    s.wait_for_more(down_signal, 16, "requests while the processor is down")
        .await;
    let down_start = snapshot(&s).await;
    s.wait_for_more(down_signal, 16, "requests while the processor is down")
        .await;
    let down_end = snapshot(&s).await;
    let connect_failures = s
        .stat("cluster.kube_audience_proxy.upstream_cx_connect_fail")
        .await;
    let second = s.start_processor(&[]).await;
    // Envoy reconnects on its own: answers from the processor resume.
    s.wait_for_more(answered, 16, "answers from the restarted processor")
        .await;
    let after_start = snapshot(&s).await;
    let output = tokio::time::timeout(Duration::from_secs(30), wrk.wait_with_output())
        .await
        .expect("wrk ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wrk: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = parse_wrk(&stdout);
    let after_end = snapshot(&s).await;
    assert!(
        after_end.ok > after_start.ok,
        "wrk ran out before the after window:\n{stdout}"
    );
    let statuses: Vec<String> = report.statuses.keys().map(u16::to_string).collect();
    let max = Duration::from_micros(report.summary["max_us"]);
    let hung = report.summary["timeouts"] > 0 || max > MESSAGE_TIMEOUT + MARGIN;
    println!(
        "failure_mode_allow={failure_mode_allow}: wrk {report:?}, max latency {max:?}; \
         snapshots start {start:?} before {before:?} down {down_start:?}..{down_end:?} \
         after {after_start:?}..{after_end:?}; processor connect failures {connect_failures}"
    );
    let (exit, logs) = second.terminate().await;
    assert!(exit.success(), "{logs}");
    format!(
        "before: {}; down: {}; after reconnect: {}; wrk saw {}; {}; {} TokenRequests",
        window(start, before),
        window(down_start, down_end),
        window(after_start, after_end),
        statuses.join(", "),
        if hung {
            "a request hung past message_timeout"
        } else {
            "none past message_timeout"
        },
        s.api.token_requests(),
    )
}

/// Both Envoy configurations, one after the other (each runs its own wrk:
/// in parallel they would share two cores).
#[tokio::test]
async fn sigkill_under_load_then_restart() {
    let observed = kill_under_load(false).await;
    reliability::check("processor-sigkill", &observed);
    let observed = kill_under_load(true).await;
    reliability::check("processor-sigkill-failure-mode-allow", &observed);
}

/// The same over a Unix socket: SIGKILL leaves the socket file behind; the
/// restarted processor replaces it and Envoy reconnects. Statuses of
/// sequential curl requests, consecutive repeats folded.
#[tokio::test]
async fn sigkill_on_a_unix_socket_then_restart_on_the_same_path() {
    use support::apiserver::{ApiServerOptions, FakeApiServer};
    use support::processor::Processor;
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = support::upstream::Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kap.sock");
    let address = format!("unix:{}", socket.display());
    let args = [
        "--grpc-listen-address",
        address.as_str(),
        "--log-level",
        "info",
    ];
    let first = Processor::start(&kubeconfig.path, &args).await;
    let mut config = support::envoy::shipped_config();
    support::envoy::point_at_processor(&mut config, &address);
    let envoy = support::envoy::Envoy::start(&config).await;
    let url = format!("{}/uds?kubernetes-audience=A", upstream.url());
    let mut statuses: Vec<String> = vec![];
    let mut record = |status: u16, valid: bool| {
        let seen = match (status, valid) {
            (200, true) => "200 with token".to_owned(),
            (200, false) => "200 without token".to_owned(),
            (other, _) => other.to_string(),
        };
        if statuses.last() != Some(&seen) {
            statuses.push(seen);
        }
    };
    let proxy = envoy.proxy_url();
    let get = || support::curl::via_proxy(&proxy, &url, &[]);
    let valid = || upstream.last().is_some_and(|r| r.verdict.is_valid());
    upstream.clear();
    record(get().await.status, valid());
    first.kill().await;
    let stale = socket.exists();
    upstream.clear();
    record(get().await.status, valid());
    let second = Processor::start(&kubeconfig.path, &args).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        upstream.clear();
        let status = get().await.status;
        record(status, valid());
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{statuses:?}\n{}",
            envoy.logs()
        );
        // Polls through the proxy under the deadline until Envoy reconnects.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (exit, logs) = second.terminate().await;
    assert!(exit.success(), "{logs}");
    assert!(!socket.exists(), "a clean stop removes the socket");
    let observed = format!(
        "{}; socket file left by SIGKILL: {}; {} TokenRequests",
        statuses.join(", then "),
        if stale {
            "yes, replaced at restart"
        } else {
            "no"
        },
        api.token_requests()
    );
    reliability::check("processor-sigkill-unix-socket", &observed);
}

/// The processor frozen (SIGSTOP: a stopped container, a debugger, a node
/// under memory pressure) and thawed (SIGCONT): requests while it is frozen
/// end at Envoy's `message_timeout`, not later; afterwards it answers again.
#[tokio::test]
async fn sigstop_times_out_at_message_timeout_and_sigcont_recovers() {
    let (s, processor) = stack(false, &[]).await;
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &processor.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    let before = get(&s, "A").await;
    let before = outcome(&s, &before, "A");
    signal("-STOP");
    let sent = tokio::time::Instant::now();
    let frozen = get(&s, "A").await;
    let waited = sent.elapsed();
    signal("-CONT");
    let after = get(&s, "A").await;
    let after = outcome(&s, &after, "A");
    println!("frozen: {} after {waited:?}", frozen.status);
    let at_timeout = waited >= MESSAGE_TIMEOUT && waited <= MESSAGE_TIMEOUT + MARGIN;
    let (exit, logs) = processor.terminate().await;
    assert!(exit.success(), "{logs}");
    let observed = format!(
        "before: {before}; frozen: {} {} message_timeout; thawed: {after}; {} TokenRequest",
        frozen.status,
        if at_timeout { "at" } else { "NOT at" },
        s.api.token_requests()
    );
    reliability::check("processor-sigstop", &observed);
}
