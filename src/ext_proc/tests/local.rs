//! Local destinations through the processor: refused first (before CONNECT
//! routing, the SNI check and audience resolution), no TokenRequest; with
//! `--allow-local-destinations` decided as before.

use super::*;

/// Requests to this machine, each with an audience that would otherwise get
/// a token: refused before anything else (CONNECT routing, the SNI check,
/// audience resolution), with no TokenRequest.
#[tokio::test]
async fn local_destinations_are_refused_first() {
    /// Name, headers, stream context, SNI.
    type LocalCase = (
        &'static str,
        Vec<(&'static str, &'static [u8])>,
        StreamContext,
        Option<&'static str>,
    );
    let local: &[LocalCase] = &[
        (
            "GET to loopback",
            vec![
                (":method", b"GET"),
                (":authority", b"127.0.0.1:9901"),
                (":path", b"/?kubernetes-audience=node-exporter"),
            ],
            StreamContext::default(),
            None,
        ),
        (
            "GET to localhost with a header audience",
            vec![
                (":method", b"GET"),
                (":authority", b"LOCALHOST.:8080"),
                (":path", b"/"),
                (AUD, b"node-exporter"),
            ],
            StreamContext::default(),
            None,
        ),
        (
            "GET to [::1] with a route audience",
            vec![
                (":method", b"GET"),
                (":authority", b"[::1]:80"),
                (":path", b"/"),
            ],
            StreamContext {
                audience: Some(Bytes::from_static(b"from-route")),
                intercepted: false,
            },
            None,
        ),
        (
            "CONNECT to the processor's port",
            vec![(":method", b"CONNECT"), (":authority", b"127.0.0.1:18080")],
            StreamContext::default(),
            None,
        ),
        (
            "CONNECT in an inet_aton form",
            vec![(":method", b"CONNECT"), (":authority", b"0x7f.1:18080")],
            StreamContext::default(),
            None,
        ),
        (
            "inside TLS, host and SNI agree on localhost",
            vec![
                (":method", b"GET"),
                (":authority", b"localhost"),
                (":path", b"/"),
                (AUD, b"a1"),
            ],
            intercepted(),
            Some("localhost"),
        ),
    ];
    for (name, headers, context, sni) in local {
        let (processor, fake) = processor(Some("fallback"), OnTokenError::Deny);
        let answer = processor
            .handle(message(headers, *sni), context)
            .await
            .unwrap();
        assert_eq!(outcome(answer), refused(403, "local_destination"), "{name}");
        assert_eq!(
            fake.mints.load(Ordering::SeqCst),
            0,
            "{name}: TokenRequests"
        );

        // With --allow-local-destinations the same request is decided as before.
        let (processor, fake) = processor_with(
            Some("fallback"),
            OnTokenError::Deny,
            &[],
            LocalDestinations::Allow,
        );
        let answer = processor
            .handle(message(headers, *sni), context)
            .await
            .unwrap();
        assert!(
            matches!(outcome(answer), Outcome::Continue { .. }),
            "{name}: allowed"
        );
        let minted = fake.mints.load(Ordering::SeqCst);
        let is_connect = headers
            .iter()
            .any(|(k, v)| *k == ":method" && *v == b"CONNECT");
        assert_eq!(
            minted,
            usize::from(!is_connect),
            "{name}: TokenRequests when allowed"
        );
    }
}

#[tokio::test]
async fn the_local_check_comes_before_the_sni_check() {
    let headers = inside_tls("127.0.0.1");
    for (local, expect) in [
        (LocalDestinations::Refuse, refused(403, "local_destination")),
        (
            LocalDestinations::Allow,
            refused(421, "misdirected_request"),
        ),
    ] {
        let (processor, _) = processor_with(None, OnTokenError::Deny, &[], local);
        let answer = processor
            .handle(
                message(&headers, Some("api.intercept.test")),
                &intercepted(),
            )
            .await
            .unwrap();
        assert_eq!(outcome(answer), expect, "{local:?}");
    }
}

#[tokio::test]
async fn an_unreadable_destination_is_a_bad_request() {
    for authority in [
        &b""[..],
        b"127.0.0.1:http",
        b"[fe80::1%25eth0]:80",
        b"a@localhost",
    ] {
        let (processor, fake) = processor(Some("fallback"), OnTokenError::Deny);
        let headers = [
            (":method", &b"GET"[..]),
            (":authority", authority),
            (":path", b"/"),
        ];
        let answer = processor
            .handle(message(&headers, None), &StreamContext::default())
            .await
            .unwrap();
        assert_eq!(
            outcome(answer),
            refused(400, "unreadable_destination"),
            "{authority:?}"
        );
        assert_eq!(fake.mints.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn the_local_refusal_reason_reaches_the_client() {
    let refusal = crate::local::check_authority(b"localhost:9901").unwrap_err();
    let Some(Response::ImmediateResponse(immediate)) =
        response::local_destination(&refusal).response
    else {
        panic!("an immediate response")
    };
    assert_eq!(immediate.status.unwrap().code, 403);
    let body = String::from_utf8(immediate.body).unwrap();
    assert_eq!(body, format!("kube-audience-proxy: {refusal}\n"));
    assert!(body.contains("\"localhost:9901\""), "{body}");
}
