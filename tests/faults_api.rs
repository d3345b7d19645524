//! The API server failing in every way the fault table lists, end to end:
//! real curl -> the shipped Envoy -> the processor binary -> the
//! TokenRequest-compatible API server over TLS; the upstream verifies every
//! JWT it receives.
//!
//! Tokens live 40 s (`FakeApiServer::set_lifetime`): usable for 10 s (the
//! processor stops 30 s before the stated expiry), refreshed in the
//! background from 8 s. Each fault hits a cached audience, and a client
//! polls it every [`POLL`] through four phases: healthy (200), failing while
//! the token is still usable (200 while the refresh fails), failing with no
//! usable token (503, or 200 without a token with `--on-token-error allow`),
//! and healthy again (200 after recovery, no restart). The API server's
//! TokenRequest count over the failing phase shows the back-off: at most
//! [`BOUND`] for about 20 client requests (a hot loop makes one per request).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer, Fault, Listening};
use support::curl;
use support::reliability;
use support::stack::Stack;
use tokio::time::Instant;

/// How long every token lives.
const LIFETIME: Duration = Duration::from_secs(40);
/// The client's pace.
const POLL: Duration = Duration::from_millis(500);
/// Most TokenRequests one audience may cost over its failing phase (about
/// 12 s): the first background refresh and its retries (1 s, 2 s: at most
/// 3 before the token stops being usable), then foreground attempts at the
/// ends of the back-off windows (1 s, 2 s, 4 s; 5 s for refusals), with
/// slack for a slow machine. A client request per TokenRequest would be
/// about 24.
const BOUND: usize = 8;
/// How long the outage goes on once the client is out of tokens.
const OUTAGE_TAIL: Duration = Duration::from_secs(3);
/// Bound on waiting for a phase to be reached.
const DEADLINE: Duration = Duration::from_secs(30);

const HEALTHY: u8 = 0;
const FAILING: u8 = 1;
const RECOVERING: u8 = 2;

impl Stack {
    /// The stack with [`LIFETIME`] tokens and a 2 s `--token-request-timeout`.
    async fn short_lived(extra: &[&str]) -> Stack {
        let api = FakeApiServer::start(ApiServerOptions::default()).await;
        api.set_lifetime(Some(LIFETIME));
        let mut args = vec!["--token-request-timeout", "2s"];
        args.extend_from_slice(extra);
        Stack::start_on(api, &args, |_| {}).await
    }

    /// A GET naming `audience` in the audience header, classified.
    async fn poll(&self, audience: &str) -> Reply {
        let url = format!("{}/x", self.upstream.url());
        let header = format!("x-kubernetes-audience: {audience}");
        let reply = curl::via_proxy(&self.envoy.proxy_url(), &url, &["-i", "-H", &header]).await;
        let body = reply
            .body
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned());
        let verdict: Option<serde_json::Value> = serde_json::from_str(&body).ok();
        let token = verdict.as_ref().map(|v| &v["verdict"]);
        let token_state = match token.and_then(|t| t["token"].as_str()) {
            Some("valid") => {
                assert_eq!(
                    token.unwrap()["aud"],
                    serde_json::json!([audience]),
                    "{body}"
                );
                let exp_in = token.unwrap()["exp_in_secs"].as_i64().unwrap();
                // 30 s before the stated expiry when the processor decided,
                // less the time the request took to reach the upstream.
                assert!(exp_in >= 29, "a token {exp_in} s from its expiry: {body}");
                TokenState::Valid
            }
            Some("missing") => TokenState::Missing,
            _ => TokenState::Other,
        };
        Reply {
            status: reply.status,
            token: token_state,
            body,
        }
    }

    /// TokenRequests the processor counted, whatever their result.
    async fn token_requests_sent(&self) -> u64 {
        let url = format!("http://{}/metrics", self.processor.admin);
        let (status, text) = curl::get(&url).await;
        assert_eq!(status, 200);
        text.lines()
            .filter(|l| l.starts_with("kube_audience_proxy_token_requests_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenState {
    Valid,
    Missing,
    Other,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    token: TokenState,
    body: String,
}

/// What one client saw, reply by reply: the label of each (phase, reply,
/// and whether a TokenRequest had been made since the fault began).
#[derive(Default)]
struct Seen {
    labels: Vec<String>,
    bodies_503: Vec<String>,
}

impl Seen {
    /// The labels with repeats collapsed: `200, 200 while the refresh
    /// fails, 503, 200 after recovery`.
    fn sequence(&self) -> String {
        let mut out: Vec<&str> = Vec::new();
        for label in &self.labels {
            if out.last() != Some(&label.as_str()) {
                out.push(label);
            }
        }
        out.join(", ")
    }

    fn saw_503(&self) -> bool {
        self.labels
            .iter()
            .any(|l| l.starts_with("503") || l.contains("without"))
    }
}

fn label(phase: u8, reply: &Reply, refreshed: bool) -> String {
    let token = match reply.token {
        TokenState::Valid => "",
        TokenState::Missing => " without token",
        TokenState::Other => " with a bad token",
    };
    match (phase, reply.status) {
        (HEALTHY, 200) => format!("200{token}"),
        (FAILING, 200) if reply.token == TokenState::Missing => "200 without token".into(),
        (FAILING, 200) if refreshed => format!("200{token} while the refresh fails"),
        (FAILING, 200) => format!("200{token}"),
        (RECOVERING, 200) => format!("200{token} after recovery"),
        (_, status) => status.to_string(),
    }
}

/// Polls `audience` until the phase is [`RECOVERING`] and a 200 came;
/// `requests` counts the TokenRequests made for it so far.
async fn client(
    stack: Arc<Stack>,
    audience: String,
    phase: Arc<AtomicU8>,
    out_of_tokens: Arc<AtomicUsize>,
    requests: impl Fn(&Stack) -> usize,
) -> Seen {
    let mut seen = Seen::default();
    let mut at_fault: Option<usize> = None;
    let deadline = Instant::now() + 3 * DEADLINE;
    loop {
        let now = phase.load(Ordering::SeqCst);
        let made = requests(&stack);
        if now != HEALTHY && at_fault.is_none() {
            at_fault = Some(made);
        }
        let reply = stack.poll(&audience).await;
        if phase.load(Ordering::SeqCst) != now {
            // The reply straddles a phase change: it belongs to neither.
            continue;
        }
        let refreshed = at_fault.is_some_and(|before| requests(&stack) > before);
        if reply.status == 503 {
            seen.bodies_503.push(reply.body.clone());
        }
        let first_without = now == FAILING && !seen.saw_503();
        seen.labels.push(label(now, &reply, refreshed));
        if first_without && seen.saw_503() {
            out_of_tokens.fetch_add(1, Ordering::SeqCst);
        }
        if now == RECOVERING && reply.status == 200 && reply.token == TokenState::Valid {
            return seen;
        }
        assert!(Instant::now() < deadline, "{audience}: {}", seen.sequence());
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `done` holds, polling; panics after [`DEADLINE`].
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what} not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One row per audience: its fault and the text its 503 must carry.
const ROWS: &[(&str, &str)] = &[
    ("api-500", "the API server failed (HTTP 500)"),
    ("api-503", "the API server failed (HTTP 503)"),
    ("api-429-retry-after", "429 Too Many Requests"),
    ("api-429", "429 Too Many Requests"),
    ("api-401", "401 Unauthorized"),
    ("api-403", "403 Forbidden"),
    ("api-404", "404 Not Found"),
    ("api-422", "as invalid (HTTP 422)"),
    ("api-not-json", "unusable: not a TokenRequest"),
    ("api-no-expiration", "unusable: no expirationTimestamp"),
    ("api-expired", "unusable: the token expires too soon"),
    ("api-reset", "could not reach the API server"),
    ("api-slow", "did not answer the TokenRequest within 2s"),
];

fn fault_of(id: &str) -> Fault {
    match id {
        "api-500" => Fault::Status(500),
        "api-503" => Fault::Status(503),
        "api-429-retry-after" => Fault::TooManyRequests {
            retry_after_secs: 3,
        },
        "api-429" => Fault::TooManyRequestsWithoutRetryAfter,
        "api-401" => Fault::Status(401),
        "api-403" => Fault::Status(403),
        "api-404" => Fault::Status(404),
        "api-422" => Fault::Status(422),
        "api-not-json" => Fault::NotJson,
        "api-no-expiration" => Fault::NoExpiration,
        "api-expired" => Fault::ExpiresIn(-60),
        "api-reset" => Fault::Reset,
        "api-slow" => Fault::Delay(Duration::from_secs(4)),
        other => panic!("no fault for {other}"),
    }
}

/// `200 ...; 503 "reason"; backed off` from what a client saw.
fn observed(seen: &Seen, reason: &str, attempts: usize) -> String {
    let reasons = if seen.bodies_503.is_empty() {
        String::new()
    } else if seen.bodies_503.iter().all(|b| b.contains(reason)) {
        format!("; 503 says \"{reason}\"")
    } else {
        format!("; 503 says {:?}", seen.bodies_503)
    };
    let backoff = if attempts <= BOUND {
        format!("<= {BOUND} TokenRequests")
    } else {
        format!("{attempts} TokenRequests")
    };
    format!("{}{reasons}; {backoff}", seen.sequence())
}

#[tokio::test]
async fn cached_tokens_outlive_each_api_server_fault_and_recover() {
    let stack = Arc::new(Stack::short_lived(&[]).await);
    let phase = Arc::new(AtomicU8::new(HEALTHY));
    let out_of_tokens = Arc::new(AtomicUsize::new(0));
    let mut clients = BTreeMap::new();
    for (id, _) in ROWS {
        let audience = (*id).to_owned();
        let counted = audience.clone();
        let task = tokio::spawn(client(
            stack.clone(),
            audience,
            phase.clone(),
            out_of_tokens.clone(),
            move |s| s.api.requests_for_audience(&counted),
        ));
        clients.insert(*id, task);
    }
    // Every audience holds a token, then its fault begins.
    until("a token for every audience", || {
        ROWS.iter()
            .all(|(id, _)| stack.api.requests_for_audience(id) >= 1)
    })
    .await;
    let before: BTreeMap<&str, usize> = ROWS
        .iter()
        .map(|(id, _)| (*id, stack.api.requests_for_audience(id)))
        .collect();
    assert!(before.values().all(|n| *n == 1), "{before:?}");
    for (id, _) in ROWS {
        stack.api.inject_for(id, fault_of(id), usize::MAX);
    }
    phase.store(FAILING, Ordering::SeqCst);
    let failing_since = Instant::now();
    // The tokens stop being usable 10 s after they were minted; once every
    // client got its 503, a measured window of [`OUTAGE_TAIL`] shows the
    // back-off with no token left.
    until("every audience out of tokens", || {
        out_of_tokens.load(Ordering::SeqCst) == ROWS.len()
    })
    .await;
    tokio::time::sleep(OUTAGE_TAIL).await;
    let after: BTreeMap<&str, usize> = ROWS
        .iter()
        .map(|(id, _)| (*id, stack.api.requests_for_audience(id)))
        .collect();
    let failing_for = failing_since.elapsed();
    phase.store(RECOVERING, Ordering::SeqCst);
    stack.api.clear_faults();
    let mut outcome = BTreeMap::new();
    for (id, reason) in ROWS {
        let seen = clients.remove(id).unwrap().await.unwrap();
        let attempts = after[id] - before[id];
        println!(
            "{id}: {attempts} TokenRequests in {failing_for:?}: {}",
            seen.sequence()
        );
        assert!(seen.saw_503(), "{id}: {}", seen.sequence());
        outcome.insert(*id, observed(&seen, reason, attempts));
    }
    // One call per row, each naming its row (tests/reliability.rs reads them).
    let of = |id: &str| outcome[id].clone();
    reliability::check("api-500", &of("api-500"));
    reliability::check("api-503", &of("api-503"));
    reliability::check("api-429-retry-after", &of("api-429-retry-after"));
    reliability::check("api-429", &of("api-429"));
    reliability::check("api-401", &of("api-401"));
    reliability::check("api-403", &of("api-403"));
    reliability::check("api-404", &of("api-404"));
    reliability::check("api-422", &of("api-422"));
    reliability::check("api-not-json", &of("api-not-json"));
    reliability::check("api-no-expiration", &of("api-no-expiration"));
    reliability::check("api-expired", &of("api-expired"));
    reliability::check("api-reset", &of("api-reset"));
    reliability::check("api-slow", &of("api-slow"));
}

/// One audience through a fault of the whole API server: `fail` starts
/// it, `heal` ends it; returns what the client saw and how many
/// TokenRequests the processor made while the fault lasted.
async fn whole_server_fault(
    stack: Arc<Stack>,
    audience: &str,
    fail: impl AsyncFnOnce(&Stack),
    heal: impl AsyncFnOnce(&Stack),
) -> (Seen, u64) {
    let phase = Arc::new(AtomicU8::new(HEALTHY));
    let out_of_tokens = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    // The processor's own count: a TokenRequest that never reaches the API
    // server (refused, TLS) is counted there only.
    let sampler = {
        let (stack, sent) = (stack.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                let n = stack.token_requests_sent().await;
                sent.store(usize::try_from(n).unwrap(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let counted = sent.clone();
    let task = tokio::spawn(client(
        stack.clone(),
        audience.to_owned(),
        phase.clone(),
        out_of_tokens.clone(),
        move |_| counted.load(Ordering::SeqCst),
    ));
    until("a token", || stack.upstream.count() >= 1).await;
    let before = stack.token_requests_sent().await;
    fail(&stack).await;
    phase.store(FAILING, Ordering::SeqCst);
    until("out of tokens", || {
        out_of_tokens.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(OUTAGE_TAIL).await;
    let attempts = stack.token_requests_sent().await - before;
    phase.store(RECOVERING, Ordering::SeqCst);
    heal(&stack).await;
    let seen = task.await.unwrap();
    sampler.abort();
    println!("{audience}: {attempts} TokenRequests: {}", seen.sequence());
    (seen, attempts)
}

#[tokio::test]
async fn an_api_server_that_goes_down_and_comes_back() {
    let stack = Arc::new(Stack::short_lived(&[]).await);
    let (seen, attempts) = whole_server_fault(
        stack.clone(),
        "down",
        async |s: &Stack| s.api.stop_listening(),
        async |s: &Stack| s.api.listen_again(Listening::Normal).await,
    )
    .await;
    let attempts = usize::try_from(attempts).unwrap();
    reliability::check(
        "api-down-and-back",
        &observed(&seen, "could not reach the API server", attempts),
    );
}

#[tokio::test]
async fn a_tls_failure_with_fail_open_passes_requests_without_a_token() {
    let stack = Arc::new(Stack::short_lived(&["--on-token-error", "allow"]).await);
    let (seen, attempts) = whole_server_fault(
        stack.clone(),
        "tls",
        async |s: &Stack| s.api.listen_again(Listening::WrongCa).await,
        async |s: &Stack| s.api.listen_again(Listening::Normal).await,
    )
    .await;
    let attempts = usize::try_from(attempts).unwrap();
    reliability::check("api-tls-fail-open", &observed(&seen, "", attempts));
}

#[tokio::test]
async fn a_tls_handshake_cut_short() {
    let stack = Arc::new(Stack::short_lived(&[]).await);
    let (seen, attempts) = whole_server_fault(
        stack.clone(),
        "handshake",
        async |s: &Stack| s.api.listen_again(Listening::CloseInHandshake).await,
        async |s: &Stack| s.api.listen_again(Listening::Normal).await,
    )
    .await;
    let attempts = usize::try_from(attempts).unwrap();
    reliability::check(
        "api-tls-handshake-closed",
        &observed(&seen, "could not reach the API server", attempts),
    );
}
