//! The native fast path end to end: the real Envoy runs the bootstrap that
//! `kube-audience-proxy envoy-config` generates for the processor's own
//! flags; real curl; an upstream that verifies every JWT; the processor
//! binary minting from the TokenRequest-compatible API server.
//!
//! Two upstreams on loopback: `fast` has the rule `127.0.0.1:PORT=aud-a`
//! (a literal audience: Envoy injects it itself), `dynamic` the rule
//! `127.0.0.1:PORT=*` (any audience the request names: only the processor
//! can serve it).
//!
//! Proves: a request to the rule's destination gets a verified token with
//! no ext_proc stream (Envoy's own ext_proc counter stays put, and moves for
//! the requests that do take ext_proc); the audience header naming the
//! rule's audience takes the fast path too and never reaches the upstream;
//! a dynamic audience and a refused audience take the ext_proc path as
//! before; rotation (40 s tokens) is used without a failed request; with
//! the API server down past the usable end Envoy refuses (401) and no
//! expired token reaches the upstream; recovery injects again.

mod support;

use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::envoy::{self, Envoy};
use support::jwt::now_unix;
use support::processor::Processor;
use support::upstream::{Received, TokenVerdict, Upstream};

const AUDIENCE: &str = "aud-a";
/// Bound on each phase.
const DEADLINE: Duration = Duration::from_secs(45);
/// The client's pace in the rotation phases.
const POLL: Duration = Duration::from_millis(300);
/// Envoy's counter of ext_proc streams on the forward proxy listener.
const EXT_PROC_STREAMS: &str = "http.forward_proxy.ext_proc.streams_started";

struct Fast {
    api: FakeApiServer,
    fast: Upstream,
    dynamic: Upstream,
    processor: Processor,
    envoy: Envoy,
    _kubeconfig: support::Kubeconfig,
    requests: std::sync::atomic::AtomicUsize,
}

impl Fast {
    async fn start(api: FakeApiServer) -> Fast {
        let fast = Upstream::start(api.verifier()).await;
        let dynamic = Upstream::start(api.verifier()).await;
        let kubeconfig = support::Kubeconfig::of(&api);
        let rules = [
            format!(
                "--audience-rule=127.0.0.1:{}={AUDIENCE}",
                fast.addr().port()
            ),
            format!("--audience-rule=127.0.0.1:{}=*", dynamic.addr().port()),
        ];
        let rule_args: Vec<&str> = rules.iter().map(String::as_str).collect();
        let processor = Processor::start(&kubeconfig.path, &rule_args).await;
        // The processor's own flags, as a deployment would pass them to both.
        let mut args: Vec<String> = support::COMMON_ARGS.iter().map(|a| a.to_string()).collect();
        args.extend(rules.iter().cloned());
        args.push(format!("--grpc-listen-address={}", processor.grpc));
        let mut config = envoy::generated_config(&args);
        envoy::point_at_processor(&mut config, &processor.grpc);
        let envoy = Envoy::start(&config).await;
        Fast {
            api,
            fast,
            dynamic,
            processor,
            envoy,
            _kubeconfig: kubeconfig,
            requests: Default::default(),
        }
    }

    /// One request through Envoy to `upstream`, `query` appended to a path
    /// of its own: the status and what the upstream saw of it.
    async fn get(
        &self,
        upstream: &Upstream,
        query: &str,
        extra: &[&str],
    ) -> (u16, Option<Received>) {
        let n = self
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = format!("/scrape-{n}");
        let url = format!("{}{path}{query}", upstream.url());
        let mut args = vec!["-H", "authorization: Bearer client-sent"];
        args.extend_from_slice(extra);
        let reply = support::curl::via_proxy(&self.envoy.proxy_url(), &url, &args).await;
        let seen = upstream
            .received()
            .into_iter()
            .find(|r| r.path == path || r.path.starts_with(&format!("{path}?")));
        (reply.status, seen)
    }

    async fn ext_proc_streams(&self) -> u64 {
        self.envoy.stat(EXT_PROC_STREAMS).await.unwrap_or(0)
    }
}

/// The token the upstream verified: for exactly `audience`, never within
/// the last 30 s of its life (15 s of margin for Envoy's clock of use).
fn verified(seen: &Received, audience: &str) -> String {
    match &seen.verdict {
        TokenVerdict::Valid(claims) => {
            assert_eq!(claims.aud, vec![audience.to_owned()]);
            assert!(claims.exp - now_unix() >= 15, "a token near its expiry");
            claims.jti.clone()
        }
        other => panic!("the upstream got {other:?}"),
    }
}

#[tokio::test]
async fn a_rule_destination_gets_its_token_from_envoy_and_the_rest_from_the_processor() {
    let s = Fast::start(FakeApiServer::start(ApiServerOptions::default()).await).await;

    // The fast path: three requests, a verified token each, no ext_proc.
    for _ in 0..3 {
        let (status, seen) = s.get(&s.fast, "", &[]).await;
        assert_eq!(status, 200, "{}", s.envoy.logs());
        verified(&seen.expect("the upstream got it"), AUDIENCE);
    }
    // The audience header naming the rule's audience: the fast path, and
    // the header never reaches the upstream.
    let (status, seen) = s
        .get(
            &s.fast,
            "",
            &["-H", &format!("x-kubernetes-audience: {AUDIENCE}")],
        )
        .await;
    assert_eq!(status, 200);
    let seen = seen.expect("the upstream got it");
    verified(&seen, AUDIENCE);
    assert_eq!(seen.header("x-kubernetes-audience"), None);
    assert_eq!(
        s.ext_proc_streams().await,
        0,
        "a fast-path request went to ext_proc"
    );
    let injected = s
        .envoy
        .stat("http.forward_proxy.credential_injector.injected")
        .await;
    assert_eq!(
        injected,
        Some(4),
        "{}",
        s.envoy.admin_get("/stats?filter=credential").await.1
    );

    // A dynamic audience: ext_proc, as before, with the parameter removed.
    let (status, seen) = s
        .get(&s.dynamic, "?kubernetes-audience=aud-b&x=1", &[])
        .await;
    assert_eq!(status, 200);
    let seen = seen.expect("the upstream got it");
    verified(&seen, "aud-b");
    assert_eq!(seen.path.split_once('?').map(|(_, q)| q), Some("x=1"));
    assert_eq!(s.ext_proc_streams().await, 1);

    // The fast path's destination asked for another audience (parameter or
    // header): ext_proc, which refuses it (the rule binds aud-a there).
    let (status, seen) = s.get(&s.fast, "?kubernetes-audience=aud-b", &[]).await;
    assert_eq!((status, seen.is_none()), (403, true));
    let (status, seen) = s
        .get(&s.fast, "", &["-H", "x-kubernetes-audience: aud-b"])
        .await;
    assert_eq!((status, seen.is_none()), (403, true));
    // An encoded parameter name is left to the processor too.
    let (status, _) = s.get(&s.fast, "?kubernetes%2Daudience=aud-b", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(s.ext_proc_streams().await, 4);
    // No token in either log.
    let logs = format!("{}{}", s.processor.logs(), s.envoy.logs());
    for token in s.api.issued_tokens() {
        assert!(!logs.contains(&token), "a token is in a log");
    }
}

#[tokio::test]
async fn rotation_is_used_and_envoy_fails_closed_past_the_usable_end() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    // Usable 10 s, refreshed after at most 8 s.
    api.set_lifetime(Some(Duration::from_secs(40)));
    let s = Fast::start(api).await;
    let streams_before = s.ext_proc_streams().await;

    // Rotation: a new jti reaches the upstream; no request fails.
    let mut jtis: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while jtis.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh seen");
        let (status, seen) = s.get(&s.fast, "", &[]).await;
        assert_eq!(status, 200, "a request failed during rotation");
        let jti = verified(&seen.expect("the upstream got it"), AUDIENCE);
        if jtis.last() != Some(&jti) {
            jtis.push(jti);
        }
        tokio::time::sleep(POLL).await;
    }

    // The API server fails: the token is withdrawn at its usable end and
    // Envoy answers 401 itself; nothing reaches the upstream.
    s.api.inject(Fault::Status(503), usize::MAX);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut refused = 0;
    while refused < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Envoy never failed closed"
        );
        let (status, seen) = s.get(&s.fast, "", &[]).await;
        match status {
            200 => {
                assert_eq!(refused, 0, "a token again while the API server fails");
                verified(&seen.expect("the upstream got it"), AUDIENCE);
            }
            401 => {
                assert!(seen.is_none(), "a refused request reached the upstream");
                refused += 1;
            }
            other => panic!("status {other}\n{}", s.envoy.logs()),
        }
        tokio::time::sleep(POLL).await;
    }

    // Recovery: injected again.
    s.api.clear_faults();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no token after recovery"
        );
        let (status, seen) = s.get(&s.fast, "", &[]).await;
        if status == 200 {
            verified(&seen.expect("the upstream got it"), AUDIENCE);
            break;
        }
        assert_eq!(status, 401);
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        s.ext_proc_streams().await,
        streams_before,
        "the fast path used ext_proc"
    );
}
