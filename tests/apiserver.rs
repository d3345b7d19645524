//! The API server, protected both ways, end to end (real curl -> the shipped
//! Envoy -> the processor binary -> the TokenRequest-compatible API server):
//!
//! - its own audiences are refused with 403 before any TokenRequest (the
//!   well-known names, the URL the processor uses, the issuer it publishes,
//!   learned at startup or, when that fails, in the background), unless
//!   `--allow-apiserver-audience`;
//! - its refusals hold for requests too: after a 429 (or a 5xx) for an
//!   audience without a token, requests in the back-off window get 503 with
//!   `retry-after` and make no TokenRequest, also when a client gave up
//!   while the TokenRequest ran; at most `--max-concurrent-token-requests`
//!   TokenRequests are in flight at once.

mod support;

use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::{TokenVerdict, Upstream};
use tokio::task::JoinSet;

/// An issuer that is none of the well-known names, so only discovery can
/// know it.
const ISSUER: &str = "https://oidc.fake-cluster.test/id/7";

/// Bound on waiting for an event (a log line, a recovery).
const DEADLINE: Duration = Duration::from_secs(20);

struct Stack {
    api: FakeApiServer,
    upstream: Upstream,
    processor: Processor,
    envoy: Envoy,
    _kubeconfig: support::Kubeconfig,
}

impl Stack {
    /// The stack around an API server whose issuer is [`ISSUER`]; `prepare`
    /// runs before the processor starts (to inject discovery faults).
    async fn start(processor_args: &[&str], prepare: impl FnOnce(&FakeApiServer)) -> Stack {
        let api = FakeApiServer::start(ApiServerOptions {
            issuer: ISSUER.into(),
            ..ApiServerOptions::default()
        })
        .await;
        prepare(&api);
        let upstream = Upstream::start(api.verifier()).await;
        let kubeconfig = support::Kubeconfig::of(&api);
        let processor = Processor::start(&kubeconfig.path, processor_args).await;
        let mut config = envoy::shipped_config();
        envoy::point_at_processor(&mut config, &processor.grpc);
        let envoy = Envoy::start(&config).await;
        Stack {
            api,
            upstream,
            processor,
            envoy,
            _kubeconfig: kubeconfig,
        }
    }

    /// A GET through the proxy; `-i` puts the response headers in the body.
    async fn get(&self, path_and_query: &str, extra: &[&str]) -> curl::Reply {
        let url = format!("{}{path_and_query}", self.upstream.url());
        let mut args = vec!["-i"];
        args.extend_from_slice(extra);
        curl::via_proxy(&self.envoy.proxy_url(), &url, &args).await
    }

    /// A GET naming `audience` in the audience header.
    async fn get_for(&self, audience: &str) -> curl::Reply {
        let header = format!("x-kubernetes-audience: {audience}");
        self.get("/x", &["-H", &header]).await
    }
}

/// The value of response header `name` in a `curl -i` output.
fn header(reply: &curl::Reply, name: &str) -> Option<String> {
    let (head, _) = reply.body.split_once("\r\n\r\n")?;
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// Percent-encodes an audience for the query parameter.
fn encoded(audience: &str) -> String {
    audience
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// === the API server's own audiences ===

#[tokio::test]
async fn api_server_audiences_are_refused_before_any_token_request() {
    let s = Stack::start(&[], |_| {}).await;
    s.processor
        .wait_for_log("learned the issuer of the API server", DEADLINE)
        .await;
    assert_eq!(s.api.discovery_requests(), 1);
    let own_url = s.api.url();
    let refused = [
        "https://kubernetes.default.svc",
        "https://kubernetes.default.svc.cluster.local",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "HTTPS://Kubernetes.Default.SVC/",
        "https://kubernetes.default.svc.:443",
        ISSUER,
        "https://OIDC.fake-cluster.test/id/7/",
        own_url.as_str(),
    ];
    for audience in refused {
        for reply in [
            s.get_for(audience).await,
            s.get(
                &format!("/x?kubernetes-audience={}", encoded(audience)),
                &[],
            )
            .await,
        ] {
            assert_eq!(reply.status, 403, "{audience}: {reply:?}");
            assert!(
                reply.body.contains(&format!(
                    "the audience {audience:?} is the Kubernetes API server's own"
                )),
                "{audience}: {}",
                reply.body
            );
        }
    }
    assert_eq!(s.upstream.count(), 0, "the upstream never saw them");
    assert_eq!(
        s.api.token_requests_arrived(),
        0,
        "no TokenRequest reached the API server"
    );
    // Any other audience gets its token as before.
    let reply = s.get_for("https://kubelet.example").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        s.upstream.only_received().verdict.audiences(),
        ["https://kubelet.example"]
    );
    assert_eq!(s.api.token_requests(), 1);
}

#[tokio::test]
async fn allow_apiserver_audience_lets_them_through() {
    let s = Stack::start(&["--allow-apiserver-audience"], |_| {}).await;
    s.processor
        .wait_for_log("--allow-apiserver-audience: tokens for the audiences of the API server itself are minted", DEADLINE)
        .await;
    for audience in ["https://kubernetes.default.svc", ISSUER] {
        s.upstream.clear();
        let reply = s.get_for(audience).await;
        assert_eq!(reply.status, 200, "{audience}: {reply:?}");
        let got = s.upstream.only_received();
        assert_eq!(got.verdict.audiences(), [audience]);
        assert!(got.verdict.is_valid(), "{:?}", got.verdict);
        assert_eq!(s.api.requests_for_audience(audience), 1);
    }
    assert_eq!(s.api.discovery_requests(), 0, "nothing to discover");
}

#[tokio::test]
async fn a_default_audience_that_turns_out_to_be_the_issuer_is_refused() {
    let s = Stack::start(&["--default-audience", ISSUER], |_| {}).await;
    s.processor
        .wait_for_log(
            "--default-audience is the issuer of the API server",
            DEADLINE,
        )
        .await;
    let reply = s.get("/no-audience", &[]).await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(s.upstream.count(), 0);
    assert_eq!(s.api.token_requests_arrived(), 0);
}

#[tokio::test]
async fn discovery_failing_at_startup_is_retried_in_the_background() {
    // The first discovery request never gets an answer: startup gives up
    // after its 2 s bound, the background retry (1 s later) succeeds.
    let s = Stack::start(&[], |api| api.inject_discovery(Fault::Hang, 1)).await;
    let logs = s.processor.logs();
    assert!(
        logs.contains("could not learn the issuer of the API server")
            && logs.contains("did not answer /.well-known/openid-configuration within 2s"),
        "{logs}"
    );
    // Meanwhile the well-known audiences are refused.
    let reply = s.get_for("https://kubernetes.default.svc").await;
    assert_eq!(reply.status, 403, "{reply:?}");
    // Once the retry succeeded, the issuer is refused too.
    s.processor
        .wait_for_log("learned the issuer of the API server", DEADLINE)
        .await;
    assert!(s.api.discovery_requests() >= 2);
    let reply = s.get_for(ISSUER).await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert!(reply.body.contains(ISSUER), "{}", reply.body);
    assert_eq!(s.upstream.count(), 0);
    assert_eq!(s.api.token_requests_arrived(), 0);
}

// === the API server's refusals hold for requests ===

#[tokio::test]
async fn a_429_storm_makes_at_most_two_token_requests() {
    let s = Stack::start(&[], |_| {}).await;
    s.api.inject(
        Fault::TooManyRequests {
            retry_after_secs: 5,
        },
        usize::MAX,
    );
    // Twenty clients at once: those that arrive while the first
    // TokenRequest runs share it, the later ones fall in its 5 s window.
    // Even if a loaded machine spreads them over more than 5 s, the window
    // after the second TokenRequest (5 s again) covers the rest.
    let stack = std::sync::Arc::new(s);
    let mut clients = JoinSet::new();
    for _ in 0..20 {
        let stack = stack.clone();
        clients.spawn(async move { stack.get_for("storm").await });
    }
    let replies = clients.join_all().await;
    let s = &*stack;
    for reply in &replies {
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(
            reply.body.contains("429 Too Many Requests"),
            "{}",
            reply.body
        );
        let retry_after: u64 = header(reply, "retry-after")
            .expect("the 503 carries retry-after")
            .parse()
            .unwrap();
        assert!((1..=5).contains(&retry_after), "retry-after {retry_after}");
    }
    let made = s.api.requests_for_audience("storm");
    assert!(
        (1..=2).contains(&made),
        "{made} TokenRequests for 20 requests"
    );
    assert_eq!(s.upstream.count(), 0);
    let statuses: std::collections::BTreeSet<u16> = replies.iter().map(|r| r.status).collect();
    let shared = if made <= 2 {
        "<= 2 TokenRequests".to_owned()
    } else {
        format!("{made} TokenRequests")
    };
    support::reliability::check(
        "api-429-storm",
        &format!("{} x {statuses:?}; {shared}", replies.len()),
    );

    // Recovery: a 429 with `Retry-After: 1`, then a healthy API server. The
    // first answer says 1 s; a client retrying until it succeeds gets its
    // token after the window with exactly one more TokenRequest.
    s.api.clear_faults();
    s.api.inject(
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        1,
    );
    let first = s.get_for("recover").await;
    assert_eq!(first.status, 503, "{first:?}");
    assert_eq!(header(&first, "retry-after").as_deref(), Some("1"));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let reply = loop {
        let reply = s.get_for("recover").await;
        if reply.status != 503 {
            break reply;
        }
        assert_eq!(header(&reply, "retry-after").as_deref(), Some("1"));
        assert!(
            tokio::time::Instant::now() < deadline,
            "no token within {DEADLINE:?}"
        );
        // A client's retry pace; the window (1 s) is what is waited on.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(s.upstream.only_received().verdict.audiences(), ["recover"]);
    assert_eq!(s.api.requests_for_audience("recover"), 2);
}

#[tokio::test]
async fn a_client_that_gives_up_does_not_start_a_second_token_request() {
    let s = Stack::start(&[], |_| {}).await;
    s.api.inject(Fault::Hang, usize::MAX);
    // The client gives up after 1 s (Envoy then resets the ext_proc
    // stream); the TokenRequest, bounded by --token-request-timeout (4 s),
    // runs on.
    let named = "x-kubernetes-audience: hanging";
    let gone = s.get("/x", &["-H", named, "--max-time", "1"]).await;
    assert_eq!(gone.status, 0, "curl gave up: {gone:?}");
    s.api.wait_for_token_requests_arrived(1, DEADLINE).await;
    // The next request waits for that TokenRequest instead of making its
    // own, and gets its failure with the back-off window it opened.
    let next = s.get_for("hanging").await;
    assert_eq!(next.status, 503, "{next:?}");
    assert!(
        next.body
            .contains("the API server did not answer the TokenRequest within 4s"),
        "{}",
        next.body
    );
    assert_eq!(header(&next, "retry-after").as_deref(), Some("1"));
    assert_eq!(s.api.token_requests_arrived(), 1, "one TokenRequest");
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn fail_open_forwards_without_a_token_during_the_back_off() {
    let s = Stack::start(&["--on-token-error", "allow"], |_| {}).await;
    // `Retry-After: 30`: a window long enough for three requests through
    // curl and Envoy however slow the machine.
    s.api.inject(
        Fault::TooManyRequests {
            retry_after_secs: 30,
        },
        usize::MAX,
    );
    for _ in 0..3 {
        let reply = s.get_for("down").await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let received = s.upstream.received();
    assert_eq!(received.len(), 3);
    for got in received {
        assert!(matches!(got.verdict, TokenVerdict::Missing), "{got:?}");
        assert_eq!(got.header("x-kubernetes-audience"), None);
    }
    assert_eq!(
        s.api.requests_for_audience("down"),
        1,
        "the later requests fell in the back-off window"
    );
}

#[tokio::test]
async fn at_most_the_configured_number_of_token_requests_are_in_flight() {
    let s = Stack::start(&["--max-concurrent-token-requests", "2"], |_| {}).await;
    // The API server holds every TokenRequest until the test lets them go,
    // so the first two are in flight together for certain, however the
    // four clients are spread; the other two wait for a slot meanwhile.
    s.api.inject(Fault::Hold, usize::MAX);
    let stack = std::sync::Arc::new(s);
    let mut clients = JoinSet::new();
    for i in 0..4 {
        let stack = stack.clone();
        clients.spawn(async move { (i, stack.get_for(&format!("burst-{i}")).await) });
    }
    stack.api.wait_for_held(2, DEADLINE).await;
    stack.api.release_held();
    for (i, reply) in clients.join_all().await {
        assert_eq!(
            reply.status, 200,
            "burst-{i} waited, was not refused: {reply:?}"
        );
    }
    let s = &*stack;
    assert_eq!(s.api.token_requests(), 4);
    assert_eq!(
        s.api.max_in_flight(),
        2,
        "the cap was reached and never exceeded"
    );
    assert_eq!(s.upstream.count(), 4);
}

// === configuration ===

fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kube-audience-proxy"))
        .env_clear()
        .envs(envs.iter().copied())
        .args(["--service-account", "app", "--namespace", "demo"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn bad_values_exit_64_with_one_line_each() {
    let (code, text) = run(
        &[
            "--max-concurrent-token-requests",
            "0",
            "--default-audience",
            "https://kubernetes.default.svc.cluster.local",
        ],
        &[],
    );
    assert_eq!(code, 64, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(
        lines[0],
        "kube-audience-proxy: --max-concurrent-token-requests must be at least 1"
    );
    assert!(
        lines[1].starts_with("kube-audience-proxy: --default-audience \"https://kubernetes.default.svc.cluster.local\" is an audience of the Kubernetes API server itself"),
        "{text}"
    );
    // The same through the environment.
    let (code, text) = run(
        &[],
        &[
            ("KUBE_AUDIENCE_PROXY_MAX_CONCURRENT_TOKEN_REQUESTS", "0"),
            (
                "KUBE_AUDIENCE_PROXY_DEFAULT_AUDIENCE",
                "kubernetes.default.svc",
            ),
        ],
    );
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("--max-concurrent-token-requests"), "{text}");
    assert!(
        text.contains("is an audience of the Kubernetes API server"),
        "{text}"
    );
}

#[test]
fn an_api_server_audience_in_a_rule_and_an_absurd_timeout_exit_64() {
    let (code, text) = run(
        &[
            "--audience-rule",
            "api.example=https://kubernetes.default.svc",
            "--token-request-timeout",
            "100000000000000000s",
        ],
        &[],
    );
    assert_eq!(code, 64, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("kube-audience-proxy: --token-request-timeout ")
            && lines[0].contains("is longer than the maximum of 1m"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("kube-audience-proxy: --audience-rule \"api.example=https://kubernetes.default.svc\": \"https://kubernetes.default.svc\" is an audience of the Kubernetes API server itself"),
        "{text}"
    );
    // The same through the environment.
    let (code, text) = run(
        &[],
        &[
            (
                "KUBE_AUDIENCE_PROXY_AUDIENCE_RULES",
                "a.example=https://a.example,b.example=kubernetes.default.svc.cluster.local",
            ),
            ("KUBE_AUDIENCE_PROXY_TOKEN_REQUEST_TIMEOUT", "2m"),
        ],
    );
    assert_eq!(code, 64, "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("--token-request-timeout 2m is longer"),
        "{text}"
    );
    assert!(
        text.contains("--audience-rule \"b.example=kubernetes.default.svc.cluster.local\""),
        "{text}"
    );
}

#[test]
fn the_opt_in_admits_an_api_server_default_audience() {
    // With the opt-in (from the environment) the default audience is
    // accepted: what fails next is the missing kubeconfig.
    let (code, text) = run(
        &[
            "--kubeconfig",
            "/nonexistent/kc",
            "--default-audience",
            "https://kubernetes.default.svc",
        ],
        &[("KUBE_AUDIENCE_PROXY_ALLOW_APISERVER_AUDIENCE", "true")],
    );
    assert_eq!(code, 64, "{text}");
    assert!(text.contains("cannot load kubeconfig"), "{text}");
    assert!(!text.contains("API server itself"), "{text}");
}

#[test]
fn help_explains_both_flags() {
    let (code, text) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for expected in [
        "--max-concurrent-token-requests <N>",
        "KUBE_AUDIENCE_PROXY_MAX_CONCURRENT_TOKEN_REQUESTS",
        "[default: 8]",
        "--allow-apiserver-audience",
        "KUBE_AUDIENCE_PROXY_ALLOW_APISERVER_AUDIENCE",
        "WARNING: whoever receives such a token can act as this proxy's",
        "--token-request-timeout <DURATION>",
        "included; at most 1m",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
}
