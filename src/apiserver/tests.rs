//! Matching, the discovery document, and the refusal in the decision.

use super::*;
use crate::allowlist::Allowlist;
use crate::audience::{Audience, Rejection, Rules, Source};
use crate::destination::DestinationRules;
use crate::ext_proc::decision::{Decision, Policy, Request, Verdict};
use crate::intercept::InterceptHosts;
use crate::local::LocalDestinations;

#[test]
fn well_known_names_and_their_variants_are_refused() {
    let set = ApiServerAudiences::new(None);
    for refused in [
        "https://kubernetes.default.svc",
        "https://kubernetes.default.svc.cluster.local",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "http://kubernetes.default.svc",
        "HTTPS://Kubernetes.Default.SVC",
        "https://kubernetes.default.svc/",
        "https://kubernetes.default.svc//",
        "https://kubernetes.default.svc.",
        "https://kubernetes.default.svc.cluster.local.",
        "https://kubernetes.default.svc:443",
        "https://kubernetes.default.svc.:443/",
    ] {
        assert!(set.refuses(refused), "{refused} must be refused");
    }
    for allowed in [
        "https://kubernetes.default.svc.evil.test",
        "https://kubernetes.default.svc:6443",
        "https://kubernetes.default.svc/api",
        "https://kubernetes.default",
        "https://kubernetes",
        "kubernetes",
        "https://evil.test/kubernetes.default.svc",
        "https://kubernetes.default.svc@evil.test",
        "ftp://kubernetes.default.svc",
        "https://kubelet.example",
        "",
    ] {
        assert!(!set.refuses(allowed), "{allowed} must not be refused");
    }
}

#[test]
fn the_path_keeps_its_case() {
    let set = ApiServerAudiences::new(["https://Issuer.Example/Realms/K8s"]);
    assert!(set.refuses("https://issuer.example/Realms/K8s/"));
    assert!(!set.refuses("https://issuer.example/realms/k8s"));
}

#[test]
fn the_api_server_url_is_refused() {
    let set = ApiServerAudiences::new(["https://10.96.0.1:443/"]);
    assert!(set.refuses("https://10.96.0.1"));
    assert!(set.refuses("10.96.0.1"));
    assert!(!set.refuses("https://10.96.0.2"));
    let set = ApiServerAudiences::new(["https://[fd00::1]:6443"]);
    assert!(set.refuses("https://[FD00::1]:6443/"));
    assert!(!set.refuses("https://[fd00::1]"));
}

#[test]
fn learning_adds_once_and_is_seen_by_every_clone() {
    let set = ApiServerAudiences::new(None);
    let shared = set.clone();
    assert!(!shared.refuses("https://oidc.example/id/1"));
    assert!(set.learn("https://oidc.example/id/1"));
    assert!(!set.learn("HTTPS://OIDC.example/id/1/"));
    assert!(shared.refuses("https://oidc.example/id/1"));
    assert!(!set.learn("kubernetes.default.svc"), "already well known");
}

#[test]
fn default_audience_check_covers_the_url_given() {
    assert!(is_known_apiserver_audience("kubernetes.default.svc", None));
    assert!(!is_known_apiserver_audience(
        "https://api.example:6443",
        None
    ));
    assert!(is_known_apiserver_audience(
        "https://api.example:6443",
        Some("https://API.example:6443/")
    ));
}

#[test]
fn the_issuer_is_read_from_the_discovery_document() {
    let document =
        br#"{"issuer":"https://oidc.example/id/1","jwks_uri":"https://x/openid/v1/jwks"}"#;
    assert_eq!(parse_issuer(document).unwrap(), "https://oidc.example/id/1");
    for bad in [
        &b"not json"[..],
        br#"{"jwks_uri":"x"}"#,
        br#"{"issuer":""}"#,
        br#"{"issuer":7}"#,
        br#"{"issuer":"a\nb"}"#,
    ] {
        assert!(matches!(
            parse_issuer(bad),
            Err(DiscoveryError::BadDocument(_))
        ));
    }
    let long = format!(r#"{{"issuer":"{}"}}"#, "a".repeat(MAX_ISSUER_LEN + 1));
    assert!(parse_issuer(long.as_bytes()).is_err());
}

// === the refusal in the per-request decision ===

/// A policy that allows any audience and refuses the API server's
/// (`refused`), with `default` as the default audience.
fn policy(refused: Option<ApiServerAudiences>, default: Option<&str>) -> Policy {
    Policy {
        rules: Rules {
            header: "x-kubernetes-audience".into(),
            parameter: "kubernetes-audience".into(),
            default: default.map(|d| Audience::parse(d.as_bytes(), Source::Default).unwrap()),
            allowlist: Allowlist::new(Vec::<String>::new()).unwrap(),
            destinations: DestinationRules::default(),
        },
        intercept: InterceptHosts::default(),
        local: LocalDestinations::Refuse,
        apiserver: refused,
    }
}

fn get<'a>(path: &'a [u8], headers: Vec<&'a [u8]>, metadata: Option<&'a [u8]>) -> Request<'a> {
    Request {
        method: b"GET",
        authority: b"svc:80",
        path: Some(path),
        audience_headers: headers,
        metadata_audience: metadata,
        ..Request::default()
    }
}

fn refused_audience(decision: &Decision<'_>) -> Option<String> {
    match decision {
        Decision::Answer(Verdict::Refuse(Rejection::ApiServerAudience { audience })) => {
            Some(audience.as_str().to_owned())
        }
        _ => None,
    }
}

#[test]
fn every_source_of_an_api_server_audience_is_refused() {
    let refused = ApiServerAudiences::new(["https://10.96.0.1:443"]);
    refused.learn("https://oidc.example/id/1");
    let with_default = policy(
        Some(refused.clone()),
        Some("https://kubernetes.default.svc"),
    );
    let plain = policy(Some(refused), None);
    let header = get(
        b"/",
        vec![b"https://kubernetes.default.svc.cluster.local"],
        None,
    );
    let query = get(
        b"/?kubernetes-audience=https%3A%2F%2F10.96.0.1",
        vec![],
        None,
    );
    let metadata = get(b"/", vec![], Some(b"https://OIDC.example/id/1/"));
    let default = get(b"/", vec![], None);
    assert_eq!(
        refused_audience(&plain.decide(&header)).as_deref(),
        Some("https://kubernetes.default.svc.cluster.local")
    );
    assert_eq!(
        refused_audience(&plain.decide(&query)).as_deref(),
        Some("https://10.96.0.1")
    );
    assert_eq!(
        refused_audience(&plain.decide(&metadata)).as_deref(),
        Some("https://OIDC.example/id/1/")
    );
    assert_eq!(
        refused_audience(&with_default.decide(&default)).as_deref(),
        Some("https://kubernetes.default.svc")
    );
    // Other audiences get a token as before.
    let other = get(
        b"/?kubernetes-audience=https://kubelet.example",
        vec![],
        None,
    );
    assert!(matches!(plain.decide(&other), Decision::Inject(_)));
}

#[test]
fn the_refusal_names_the_audience_and_is_a_403() {
    let rejection = Rejection::ApiServerAudience {
        audience: Audience::parse(b"https://kubernetes.default.svc", Source::Header).unwrap(),
    };
    let reason = rejection.to_string();
    assert!(
        reason.contains("\"https://kubernetes.default.svc\"") && reason.contains("API server"),
        "{reason}"
    );
    assert_eq!(
        crate::ext_proc::response::rejection_status(&rejection) as i32,
        403
    );
}

#[test]
fn allowing_api_server_audiences_injects() {
    let allowed = policy(None, None);
    let header = get(b"/", vec![b"https://kubernetes.default.svc"], None);
    assert!(matches!(allowed.decide(&header), Decision::Inject(_)));
}

#[test]
fn non_ascii_audiences_compare_without_splitting_a_character() {
    let refused = ApiServerAudiences::new(Some("https://é.example"));
    assert!(refused.refuses("https://É.example".to_lowercase().as_str()));
    // Same total length, but the host ends inside the stored key's
    // two-byte `é`: no panic, no match.
    assert!(!refused.refuses("https://a/12345678"));
    assert!(!refused.refuses("https://ab.example"));
}
