//! The API server's clock skewed by minutes either way, end to end (real
//! curl -> the shipped Envoy -> the processor binary -> the
//! TokenRequest-compatible API server; the upstream verifies every JWT and
//! reports how far its `exp` is).
//!
//! - Behind: a token the processor asked 600 s for is stated to expire in
//!   20 s or 45 s. It is never injected within 30 s of that expiry (checked
//!   at the upstream on every reply), and one with some usable time left is
//!   refreshed in the background before it runs out (no request waits on
//!   a TokenRequest).
//! - Ahead (or an API server granting more than asked): a token stated to
//!   live an hour longer than asked is planned with the 600 s the processor
//!   asked for (the expiry gauge), so it is refreshed on the processor's
//!   schedule, not trusted on the word of a clock the processor cannot check.

mod support;

use std::time::Duration;

use support::apiserver::Fault;
use support::curl;
use support::jwt::now_unix;
use support::reliability;
use support::stack::Stack;
use tokio::time::Instant;

const POLL: Duration = Duration::from_millis(500);

/// A reply through the proxy: status, and for a 200 the upstream's verdict
/// (`exp_in_secs`, `jti` not exposed: the token's `exp`).
struct Reply {
    status: u16,
    body: String,
    exp_in: Option<i64>,
}

impl Stack {
    async fn skewable() -> Stack {
        Stack::start(&["--token-expiration", "600s"]).await
    }

    async fn get_audience(&self, audience: &str) -> Reply {
        let url = format!("{}/x", self.upstream.url());
        let header = format!("x-kubernetes-audience: {audience}");
        let reply = curl::via_proxy(&self.envoy.proxy_url(), &url, &["-H", &header]).await;
        let exp_in = (reply.status == 200).then(|| {
            let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(v["verdict"]["token"], "valid", "{}", reply.body);
            assert_eq!(v["verdict"]["aud"], serde_json::json!([audience]));
            v["verdict"]["exp_in_secs"].as_i64().unwrap()
        });
        Reply {
            status: reply.status,
            body: reply.body,
            exp_in,
        }
    }

    /// The value of the metric line starting with `prefix`.
    async fn metric(&self, prefix: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.processor.admin);
        let (status, text) = curl::get(&url).await;
        assert_eq!(status, 200);
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }
}

/// Polls `audience` for `window`; returns every reply.
async fn poll_for(s: &Stack, audience: &str, window: Duration) -> Vec<Reply> {
    let end = Instant::now() + window;
    let mut replies = Vec::new();
    while Instant::now() < end {
        replies.push(s.get_audience(audience).await);
        tokio::time::sleep(POLL).await;
    }
    replies
}

/// The statuses of `replies`, repeats collapsed.
fn statuses(replies: &[Reply]) -> String {
    let mut out: Vec<u16> = Vec::new();
    for r in replies {
        if out.last() != Some(&r.status) {
            out.push(r.status);
        }
    }
    out.iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn a_clock_behind_never_gets_a_token_injected_near_its_expiry() {
    let s = Stack::skewable().await;
    // Stated 20 s from now: unusable at once (30 s margin).
    s.api.inject_for("near", Fault::ExpiresIn(20), usize::MAX);
    // Stated 45 s from now: usable 15 s, refreshed from 12 s.
    s.api.inject_for("soon", Fault::ExpiresIn(45), usize::MAX);
    let (near, soon) = tokio::join!(
        poll_for(&s, "near", Duration::from_secs(8)),
        poll_for(&s, "soon", Duration::from_secs(20)),
    );
    // "near": never injected; the refusal window (5 s) paces TokenRequests.
    assert!(near.iter().all(|r| r.status == 503), "{}", statuses(&near));
    let reason = "the token expires too soon to be used";
    let said = if near.iter().all(|r| r.body.contains(reason)) {
        reason.to_owned()
    } else {
        near[0].body.clone()
    };
    let asked = s.api.requests_for_audience("near");
    println!("near: {} replies, {asked} TokenRequests", near.len());
    let paced = if asked <= 3 {
        "<= 3 TokenRequests".to_owned()
    } else {
        format!("{asked} TokenRequests")
    };
    reliability::check(
        "clock-behind-expired",
        &format!("{}; 503 says \"{said}\"; {paced}", statuses(&near)),
    );

    // "soon": every token reached the upstream at least 29 s (30 s when
    // the processor decided, less the trip) before its stated expiry, and
    // the one refresh needed happened in the background: one cache miss
    // (the first request), never a request waiting on a TokenRequest.
    let least = soon.iter().filter_map(|r| r.exp_in).min().unwrap();
    assert!(least >= 29, "a token {least} s before its expiry");
    let minted = s.api.requests_for_audience("soon");
    let misses = s
        .metric("kube_audience_proxy_token_cache_misses_total")
        .await
        .unwrap();
    // "near" misses on every request outside its window; "soon" once.
    let soon_misses = misses as usize - near.len();
    println!(
        "soon: {} replies, {minted} tokens, least exp_in {least}, misses {misses}",
        soon.len()
    );
    let refresh = if minted >= 2 && soon_misses == 1 {
        "refreshed in the background".to_owned()
    } else {
        format!("{minted} tokens, {soon_misses} waited on a TokenRequest")
    };
    let margin = if least >= 29 { ">= 30 s" } else { "< 30 s" };
    reliability::check(
        "clock-behind-near",
        &format!(
            "{}; exp {margin} away at every injection; {refresh}",
            statuses(&soon)
        ),
    );
}

#[tokio::test]
async fn a_clock_ahead_is_not_trusted_beyond_the_lifetime_asked_for() {
    let s = Stack::skewable().await;
    // Stated to live an hour longer than the 600 s asked for.
    s.api
        .inject_for("far", Fault::ExpiresIn(600 + 3600), usize::MAX);
    let reply = s.get_audience("far").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let jwt_exp_in = reply.exp_in.unwrap();
    let planned = s
        .metric("kube_audience_proxy_token_expiry_timestamp_seconds{audience=\"far\"}")
        .await
        .expect("the expiry gauge of \"far\"");
    let planned_in = planned as i64 - now_unix();
    println!("far: JWT exp in {jwt_exp_in} s, planned expiry in {planned_in} s");
    // Rounded to 100 s: the seconds the test itself took do not matter.
    let round = |secs: i64| (secs + 50) / 100 * 100;
    reliability::check(
        "clock-ahead-far",
        &format!(
            "200; JWT exp in {} s, planned with {} s",
            round(jwt_exp_in),
            round(planned_in)
        ),
    );
}
