//! The processor killed (SIGKILL) under load and restarted on the same
//! address, with the real Envoy (shipped config), wrk as the client and the
//! JWT-checking upstream: what clients get before, while it is down and
//! after Envoy has reconnected (without an Envoy restart), with
//! `failure_mode_allow: false` (shipped) and `true`.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde_yaml::Value;
use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::envoy::{self, Envoy};
use support::processor::{self, Processor};
use support::reliability;
use support::upstream::{TokenVerdict, Upstream};

/// Envoy's ext_proc `message_timeout` in the shipped config.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A request slower than `MESSAGE_TIMEOUT` plus this margin hung.
const MARGIN: Duration = Duration::from_secs(3);

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

struct Stack {
    api: FakeApiServer,
    upstream: Upstream,
    envoy: Envoy,
    kubeconfig: support::Kubeconfig,
    grpc: String,
}

impl Stack {
    async fn snapshot(&self) -> Snapshot {
        let ok = self.stat("http.forward_proxy.downstream_rq_2xx").await;
        let failed = self.stat("http.forward_proxy.downstream_rq_5xx").await;
        let received = self.upstream.received();
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

    async fn stat(&self, name: &str) -> u64 {
        self.envoy.stat(name).await.unwrap_or(0)
    }

    /// Waits until Envoy's counter `name` is at least `n` (polled, bounded).
    async fn wait_for_stat(&self, name: &str, n: u64, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.stat(name).await;
            if value >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {name} is {value}, expected {n} within 20 s\n{}",
                self.envoy.logs()
            );
            // Polls Envoy's admin socket under the deadline.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn start_processor(&self, extra: &[&str]) -> Processor {
        let mut args = vec!["--grpc-listen-address", &self.grpc, "--log-level", "info"];
        args.extend_from_slice(extra);
        Processor::start(&self.kubeconfig.path, &args).await
    }
}

async fn stack(failure_mode_allow: bool, processor_args: &[&str]) -> (Stack, Processor) {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let grpc = processor::free_loopback_address();
    let mut config = envoy::shipped_config();
    envoy::point_at_processor(&mut config, &grpc);
    let filter = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][0];
    assert_eq!(filter["name"], "envoy.filters.http.ext_proc");
    assert_eq!(
        filter["typed_config"]["failure_mode_allow"],
        Value::Bool(false)
    );
    filter["typed_config"]["failure_mode_allow"] = Value::Bool(failure_mode_allow);
    let envoy = Envoy::start(&config).await;
    let stack = Stack {
        api,
        upstream,
        envoy,
        kubeconfig,
        grpc,
    };
    let processor = stack.start_processor(processor_args).await;
    (stack, processor)
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
    let start = s.snapshot().await;
    s.wait_for_stat(ok, 50, "load through the processor").await;
    let before = s.snapshot().await;
    let (status, _) = first.kill().await;
    assert_eq!(status.code(), None, "killed by a signal");
    // Requests the processor answered just before it died may still
    // complete: the down window starts once 16 more requests met the
    // processor's absence (two per connection).
    let down_signal = if failure_mode_allow { allowed } else { failed };
    let base = s.stat(down_signal).await;
    s.wait_for_stat(
        down_signal,
        base + 16,
        "requests while the processor is down",
    )
    .await;
    let down_start = s.snapshot().await;
    let base = s.stat(down_signal).await;
    s.wait_for_stat(
        down_signal,
        base + 16,
        "requests while the processor is down",
    )
    .await;
    let down_end = s.snapshot().await;
    let connect_failures = s
        .stat("cluster.kube_audience_proxy.upstream_cx_connect_fail")
        .await;
    let second = s.start_processor(&[]).await;
    // Envoy reconnects on its own: answers from the processor resume.
    let base = s.stat(answered).await;
    s.wait_for_stat(answered, base + 16, "answers from the restarted processor")
        .await;
    let after_start = s.snapshot().await;
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
    let after_end = s.snapshot().await;
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

/// A request for `audience` through Envoy (plain HTTP, curl).
async fn get(s: &Stack, audience: &str) -> support::curl::Reply {
    let url = format!("{}/drain?kubernetes-audience={audience}", s.upstream.url());
    support::curl::via_proxy(&s.envoy.proxy_url(), &url, &[]).await
}

/// `200 with token`, or the status and, for the processor's own answers,
/// the reason it gave.
fn outcome(s: &Stack, reply: &support::curl::Reply, audience: &str) -> String {
    if reply.status == 200 {
        let got = s.upstream.last().expect("the upstream got it");
        assert_eq!(got.verdict.audiences(), [audience]);
        return "200 with token".to_owned();
    }
    // The reason up to its retry advice (which depends on timing).
    let reason = reply.body.lines().next().unwrap_or("");
    let reason = reason.split(';').next().unwrap_or("").trim();
    if reason.is_empty() {
        reply.status.to_string()
    } else {
        format!("{} ({reason})", reply.status)
    }
}

/// SIGTERM while requests wait in the processor for TokenRequests: one slow
/// (answered within the drain), one that never comes (the request's own
/// `--token-request-timeout` ends it). Both get an answer; a request during
/// the drain delay is still served; the process exits 0 within the drain
/// bound (`--shutdown-delay` + 10 s for in-flight streams); after that,
/// Envoy answers 500 itself.
#[tokio::test]
async fn sigterm_answers_every_in_flight_request_and_exits_zero() {
    let (s, processor) = stack(
        false,
        &["--shutdown-delay", "1s", "--token-request-timeout", "3s"],
    )
    .await;
    let s = std::sync::Arc::new(s);
    let drain_bound = Duration::from_secs(1 + 10);
    assert_eq!(
        outcome(&s, &get(&s, "cached").await, "cached"),
        "200 with token"
    );
    // The next TokenRequest takes 2 s; the one after never gets an answer.
    s.api.inject(Fault::Delay(Duration::from_secs(2)), 1);
    s.api.inject(Fault::Hang, 1);
    let arrived = s.api.token_requests_arrived();
    let (slow, hung) = (s.clone(), s.clone());
    let slow = tokio::spawn(async move { get(&slow, "slow").await });
    s.api
        .wait_for_token_requests_arrived(arrived + 1, Duration::from_secs(10))
        .await;
    let hung = tokio::spawn(async move { get(&hung, "hung").await });
    s.api
        .wait_for_token_requests_arrived(arrived + 2, Duration::from_secs(10))
        .await;
    let signalled = tokio::time::Instant::now();
    let terminated = tokio::spawn(processor.terminate());
    // Still served during the drain delay (the token is cached).
    let during = get(&s, "cached").await;
    let during = outcome(&s, &during, "cached");
    let slow = slow.await.unwrap();
    let slow = outcome(&s, &slow, "slow");
    let hung = hung.await.unwrap();
    let hung = outcome(&s, &hung, "hung");
    let (status, logs) = terminated.await.unwrap();
    let took = signalled.elapsed();
    assert!(!logs.contains("panicked"), "{logs}");
    println!("SIGTERM to exit: {took:?}");
    let after = get(&s, "cached").await;
    let observed = format!(
        "slow TokenRequest: {slow}; hung TokenRequest: {hung}; during the drain delay: {during}; \
         exit {} {} the drain bound; afterwards Envoy: {}",
        status.code().unwrap_or(-1),
        if took <= drain_bound {
            "within"
        } else {
            "AFTER"
        },
        after.status,
    );
    reliability::check("processor-sigterm-in-flight", &observed);
}

/// SIGTERM while a request waits on a TokenRequest that outlasts Envoy's
/// `message_timeout` (`--token-request-timeout 30s`, above the shipped 5 s):
/// Envoy ends the request at its timeout and drops the stream, and the
/// drain ends with it; nothing waits for the 30 s.
#[tokio::test]
async fn sigterm_with_a_token_request_past_message_timeout() {
    let (s, processor) = stack(
        false,
        &["--shutdown-delay", "0s", "--token-request-timeout", "30s"],
    )
    .await;
    let s = std::sync::Arc::new(s);
    s.api.inject(Fault::Hang, 1);
    let arrived = s.api.token_requests_arrived();
    let hung = s.clone();
    let sent = tokio::time::Instant::now();
    let hung = tokio::spawn(async move { (get(&hung, "hung").await, sent.elapsed()) });
    s.api
        .wait_for_token_requests_arrived(arrived + 1, Duration::from_secs(10))
        .await;
    let signalled = tokio::time::Instant::now();
    let terminated = tokio::spawn(processor.terminate());
    let (reply, answered_after) = hung.await.unwrap();
    let (status, logs) = terminated.await.unwrap();
    let exited_after = signalled.elapsed();
    assert!(!logs.contains("panicked"), "{logs}");
    println!(
        "client {} after {answered_after:?}; exit after {exited_after:?}",
        reply.status
    );
    let at_timeout =
        answered_after >= MESSAGE_TIMEOUT && answered_after <= MESSAGE_TIMEOUT + MARGIN;
    let observed = format!(
        "client: {} from Envoy {} message_timeout; exit {} {} the drain bound",
        outcome(&s, &reply, "hung"),
        if at_timeout { "at" } else { "NOT at" },
        status.code().unwrap_or(-1),
        if exited_after <= Duration::from_secs(10) {
            "within"
        } else {
            "AFTER"
        },
    );
    reliability::check("processor-sigterm-past-message-timeout", &observed);
}
