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
    let mut failing: Vec<u16> = Vec::new();
    let mut reached = 0;
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
                reached += usize::from(seen.is_some());
                refused += 1;
            }
            other => panic!("status {other}\n{}", s.envoy.logs()),
        }
        if failing.last() != Some(&status) {
            failing.push(status);
        }
        tokio::time::sleep(POLL).await;
    }
    let failing: Vec<String> = failing.iter().map(u16::to_string).collect();

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
    let streams = s.ext_proc_streams().await - streams_before;
    let reached = match reached {
        0 => "none reached the upstream".to_owned(),
        n => format!("{n} reached the upstream"),
    };
    let streams = match streams {
        0 => "no ext_proc stream".to_owned(),
        n => format!("{n} ext_proc streams"),
    };
    support::reliability::check(
        "fast-apiserver-past-usable-end",
        &format!(
            "rotation: 200 with a new jti, no failure; API server failing: {}, {reached}; \
             recovery: 200 with a token; {streams}",
            failing.join(" then ")
        ),
    );
}

/// Inside intercepted TLS: the sidecar package's `https://HOST:PORT=AUDIENCE`
/// rule. A request to that host, in a TLS connection opened for it, gets
/// the token from Envoy (no ext_proc stream on the intercept listener); a
/// request whose host is not the connection's SNI is left to the
/// processor, which refuses it (421) as before, and the fast path injects
/// nothing for it.
#[tokio::test]
async fn intercepted_tls_takes_the_fast_path_only_for_the_sni_it_was_opened_for() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start_tls(api.verifier(), &["localhost", "127.0.0.1"]).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let port = upstream.addr().port();
    let rule = format!("--audience-rule=https://localhost:{port}=aud-tls");
    let args = support::intercept_args(
        &dir.path().join("ca.crt"),
        &["localhost", "127.0.0.1"],
        &[&rule],
    );
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &arg_refs).await;
    let mut flags: Vec<String> = support::COMMON_ARGS.iter().map(|a| a.to_string()).collect();
    flags.extend(args.iter().cloned());
    flags.push(format!("--grpc-listen-address={}", processor.grpc));
    let mut config = envoy::generated_config(&flags);
    envoy::point_at_processor(&mut config, &processor.grpc);
    let upstream_ca = dir.path().join("upstream-ca.crt");
    upstream.write_ca(&upstream_ca);
    envoy::trust_upstream_ca(&mut config, &upstream_ca);
    let envoy = Envoy::start(&config).await;
    let ca = dir.path().join("ca.crt");
    let get = |host: &str, extra: Vec<String>| {
        let url = format!("https://{host}:{port}/metrics");
        let mut args = vec!["--cacert".to_owned(), ca.to_str().unwrap().to_owned()];
        args.extend(extra);
        let proxy = envoy.proxy_url();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            support::curl::via_proxy(&proxy, &url, &args).await
        }
    };
    let injected = "http.intercept.credential_injector.injected";
    let streams = "http.intercept.ext_proc.streams_started";

    for version in ["--http1.1", "--http2"] {
        let reply = get("localhost", vec![version.to_owned()]).await;
        assert_eq!(reply.status, 200, "{reply:?}\n{}", envoy.logs());
        verified(
            &upstream.received().pop().expect("the upstream got it"),
            "aud-tls",
        );
    }
    assert_eq!(envoy.stat(injected).await, Some(2));
    assert_eq!(envoy.stat(streams).await.unwrap_or(0), 0);

    // TLS opened for 127.0.0.1 (no SNI), the request names localhost: not
    // the fast path; the processor answers 421.
    let reply = get(
        "127.0.0.1",
        vec![
            "--http1.1".into(),
            "-H".into(),
            format!("Host: localhost:{port}"),
        ],
    )
    .await;
    assert_eq!(reply.status, 421, "{reply:?}");
    assert_eq!(envoy.stat(injected).await, Some(2));
    assert_eq!(envoy.stat(streams).await, Some(1));
    drop(api);
}

/// The local-destination refusal holds with the fast path configured: a
/// rule naming a loopback destination, without --allow-local-destinations,
/// is left out of Envoy's matchers, and the processor refuses the request
/// (403) without a token, as it always did.
#[tokio::test]
async fn a_rule_for_a_local_destination_is_still_refused() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let rule = format!(
        "--audience-rule=127.0.0.1:{}={AUDIENCE}",
        upstream.addr().port()
    );
    let common = support::common_args_refusing_local();
    let processor = Processor::start_with(&kubeconfig.path, &common, &[&rule]).await;
    let mut flags: Vec<String> = common.iter().map(|a| a.to_string()).collect();
    flags.push(rule);
    flags.push(format!("--grpc-listen-address={}", processor.grpc));
    let config = envoy::generated_config(&flags);
    let filter = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"][0];
    assert!(
        filter["typed_config"]["@type"]
            .as_str()
            .unwrap()
            .ends_with("ExternalProcessor"),
        "a local destination got a fast path: {filter:?}"
    );
    let mut config = config;
    envoy::point_at_processor(&mut config, &processor.grpc);
    let envoy = Envoy::start(&config).await;
    let url = format!("{}/metrics", upstream.url());
    let reply = support::curl::via_proxy(&envoy.proxy_url(), &url, &[]).await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(upstream.count(), 0);
    assert_eq!(envoy.stat(EXT_PROC_STREAMS).await, Some(1));
}

/// RELIABILITY.md `fast-processor-sigkill`: with the processor killed,
/// Envoy keeps injecting the token it holds (still valid: it was sent
/// long before its usable end), while requests that need the processor get
/// Envoy's 500; the processor restarted on the same address mints again and
/// Envoy's SDS stream takes the new token by itself.
#[tokio::test]
async fn the_fast_path_outlives_a_killed_processor_with_the_token_it_holds() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let fast = Upstream::start(api.verifier()).await;
    let dynamic = Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let grpc = support::processor::free_loopback_address();
    let flags = [
        format!(
            "--audience-rule=127.0.0.1:{}={AUDIENCE}",
            fast.addr().port()
        ),
        format!("--audience-rule=127.0.0.1:{}=*", dynamic.addr().port()),
        format!("--grpc-listen-address={grpc}"),
    ];
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &flag_refs).await;
    let mut args: Vec<String> = support::COMMON_ARGS.iter().map(|a| a.to_string()).collect();
    args.extend(flags.iter().cloned());
    let mut config = envoy::generated_config(&args);
    envoy::point_at_processor(&mut config, &grpc);
    let envoy = Envoy::start(&config).await;
    let proxy = envoy.proxy_url();
    let get_fast = || async {
        let reply = support::curl::via_proxy(&proxy, &format!("{}/m", fast.url()), &[]).await;
        let jti = (reply.status == 200).then(|| {
            verified(
                &fast.received().pop().expect("the upstream got it"),
                AUDIENCE,
            )
        });
        (reply.status, jti)
    };
    let get_dynamic = || async {
        let url = format!("{}/d?kubernetes-audience=aud-b", dynamic.url());
        support::curl::via_proxy(&proxy, &url, &[]).await.status
    };
    let (status, held) = get_fast().await;
    assert_eq!(status, 200);
    let held = held.unwrap();
    assert_eq!(get_dynamic().await, 200);

    processor.kill().await;
    let mut down = Vec::new();
    for _ in 0..5 {
        let (status, jti) = get_fast().await;
        down.push((status, jti == Some(held.clone())));
    }
    let fast_down = if down.iter().all(|d| *d == (200, true)) {
        "200 with the held token"
    } else {
        panic!("while the processor was down: {down:?}")
    };
    let dynamic_down = get_dynamic().await;

    let _restarted = Processor::start(&kubeconfig.path, &flag_refs).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let fast_after = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new token never reached Envoy"
        );
        let (status, jti) = get_fast().await;
        assert_eq!(status, 200, "a fast-path request failed across the restart");
        if jti.as_ref() != Some(&held) {
            break "200 with the new token";
        }
        tokio::time::sleep(POLL).await;
    };
    let dynamic_after = get_dynamic().await;
    support::reliability::check(
        "fast-processor-sigkill",
        &format!(
            "down: fast path {fast_down}, ext_proc path {dynamic_down}; \
             restarted: fast path {fast_after}, ext_proc path {dynamic_after}"
        ),
    );
}
