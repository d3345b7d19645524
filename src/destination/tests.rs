//! Parsing (good and bad), matching tables, templates, the order of
//! resolution and the binding.

use super::*;
use crate::audience::{RequestParts, Rules};

fn rules(raw: &[&str]) -> DestinationRules {
    DestinationRules::new(raw, None).unwrap_or_else(|e| panic!("{raw:?}: {e:?}"))
}

fn aud(raw: &str) -> Audience {
    Audience::parse(raw.as_bytes(), Source::Header).unwrap()
}

fn plain(authority: &'static str) -> Destination<'static> {
    Destination::from_authority(authority.as_bytes(), false).unwrap()
}

fn tls(authority: &'static str) -> Destination<'static> {
    Destination::from_authority(authority.as_bytes(), true).unwrap()
}

/// The audience the rules supply for `destination`, as text.
fn supplied(rules: &DestinationRules, destination: &Destination<'_>) -> Option<String> {
    rules
        .supply(destination)
        .map(|a| a.unwrap().as_str().to_owned())
}

#[test]
fn good_rules_parse_to_their_normal_form() {
    for (raw, normal) in [
        ("api.example=aud", "api.example=aud"),
        (" API.Example. = aud ", "api.example=aud"),
        ("api.example:8443=aud", "api.example:8443=aud"),
        (
            "*.Svc.Cluster.Local=https://{host}",
            "*.svc.cluster.local=https://{host}",
        ),
        ("*.svc:443=*", "*.svc:443=*"),
        ("10.0.0.1=aud", "10.0.0.1=aud"),
        ("10.0.0.1:9100=aud", "10.0.0.1:9100=aud"),
        ("::1=aud", "::1=aud"),
        ("[::1]=aud", "::1=aud"),
        ("[::1]:443=aud", "[::1]:443=aud"),
        ("10.0.0.0/8=aud", "10.0.0.0/8=aud"),
        ("10.0.0.0/8:443=aud", "10.0.0.0/8:443=aud"),
        ("fd00::/8=aud", "fd00::/8=aud"),
        ("[fd00::/8]:443=aud", "[fd00::/8]:443=aud"),
        ("https://api.example=aud", "https://api.example=aud"),
        ("HTTPS://api.example:443=aud", "https://api.example:443=aud"),
        ("https://[fd00::/8]:443=*", "https://[fd00::/8]:443=*"),
        // The first `=` splits: an audience may contain more.
        ("h=https://x.example/?a=b", "h=https://x.example/?a=b"),
        ("h={host}:{host}", "h={host}:{host}"),
    ] {
        let parsed = rules(&[raw]);
        assert_eq!(parsed.rules()[0].to_string(), normal, "{raw:?}");
        // The normal form reads back as the same rule.
        assert_eq!(rules(&[normal]), parsed, "{raw:?}");
    }
}

#[test]
fn bad_rules_are_refused_each_with_its_value() {
    let bad = [
        ("", "expected HOST=AUDIENCE"),
        ("api.example", "expected HOST=AUDIENCE"),
        ("=aud", "HOST must be"),
        ("*=aud", "HOST must be"),
        ("*.=aud", "HOST must be"),
        ("a b=aud", "HOST must be"),
        ("a..b=aud", "HOST must be"),
        ("api.example:0=aud", "port 0"),
        ("api.example:99999=aud", "HOST must be"),
        ("api.example:x=aud", "HOST must be"),
        ("[::1=aud", "HOST must be"),
        ("[::1]x=aud", "HOST must be"),
        ("10.0.0.0/33=aud", "HOST must be"),
        ("[fd00::/8=aud", "HOST must be"),
        ("10.0.0.1/8=aud", "host bits set; write 10.0.0.0/8"),
        ("fd00::1/8=aud", "host bits set; write fd00::/8"),
        ("http://api.example=aud", "http:// is not a HOST prefix"),
        ("https://=aud", "HOST must be"),
        ("https://api.example/=aud", "HOST must be"),
        ("h=", "is empty"),
        ("h=a\u{1}b", "control characters"),
        ("h={hostname}", "the only placeholder in AUDIENCE is {host}"),
        ("h={host", "the only placeholder"),
        ("h=}", "the only placeholder"),
    ];
    let raw: Vec<&str> = bad.iter().map(|(raw, _)| *raw).collect();
    let errors = DestinationRules::new(&raw, None).unwrap_err();
    assert_eq!(errors.len(), bad.len(), "every bad rule is reported");
    for (error, (raw, reason)) in errors.iter().zip(bad) {
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("--audience-rule {raw:?}: ")),
            "{text}"
        );
        assert!(text.contains(reason), "{raw:?}: {text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
    // Good rules among bad ones do not hide the bad ones.
    let errors = DestinationRules::new(["ok=a", "bad", "ok2=b"], None).unwrap_err();
    assert_eq!(errors.len(), 1);
}

#[test]
fn templates_that_could_outgrow_an_audience_are_refused() {
    let fits = format!("{}{{host}}", "a".repeat(MAX_AUDIENCE - MAX_NAME));
    assert!(DestinationRules::new([format!("h={fits}")], None).is_ok());
    let too_long = format!("{}{{host}}", "a".repeat(MAX_AUDIENCE - MAX_NAME + 1));
    let errors = DestinationRules::new([format!("h={too_long}")], None).unwrap_err();
    assert!(errors[0].to_string().contains("can expand to 1025 bytes"));
}

const MAX_AUDIENCE: usize = crate::audience::MAX_AUDIENCE_LEN;
const MAX_NAME: usize = crate::intercept::MAX_NAME_LEN;

#[test]
fn literal_audiences_must_be_allowed() {
    let allowlist = Allowlist::new(["https://*.example"]).unwrap();
    assert!(DestinationRules::new(["h=https://a.example"], Some(&allowlist)).is_ok());
    let errors = DestinationRules::new(["h=other"], Some(&allowlist)).unwrap_err();
    assert_eq!(
        errors[0].to_string(),
        "--audience-rule \"h=other\": the audience \"other\" is not allowed by --allowed-audience"
    );
    // Templates and `*` are checked per request, after expansion.
    assert!(DestinationRules::new(["h=https://{host}", "h=*"], Some(&allowlist)).is_ok());
}

#[test]
fn destinations_read_from_the_authority() {
    for (authority, tls, want) in [
        ("api.example", false, "http://api.example:80"),
        ("api.example", true, "https://api.example:443"),
        ("API.Example.:8443", true, "https://api.example:8443"),
        ("10.0.0.1:9100", false, "http://10.0.0.1:9100"),
        ("[FD00::1]:443", false, "http://[fd00::1]:443"),
        ("[::1]", true, "https://[::1]:443"),
    ] {
        let destination = Destination::from_authority(authority.as_bytes(), tls).unwrap();
        assert_eq!(destination.to_string(), want, "{authority}");
    }
    for bad in [&b""[..], b"a b", b"host:x", b"\xff", b"[::1"] {
        assert_eq!(Destination::from_authority(bad, false), None, "{bad:?}");
    }
}

#[test]
fn hosts_match_by_name_suffix_ip_cidr_and_port() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "api.example",
            &[
                "api.example",
                "API.EXAMPLE",
                "api.example.",
                "Api.Example.:8443",
            ],
            &[
                "x.api.example",
                "api.example.evil",
                "apiexample",
                "10.0.0.1",
            ],
        ),
        (
            "api.example.",
            &["api.example", "API.example."],
            &["x.api.example"],
        ),
        (
            "*.svc.cluster.local",
            &["a.svc.cluster.local", "A.B.SVC.cluster.local.:9100"],
            &[
                "svc.cluster.local",
                "asvc.cluster.local",
                "svc.cluster.local.evil",
            ],
        ),
        (
            "10.0.0.1",
            &["10.0.0.1", "10.0.0.1:80"],
            &["10.0.0.2", "[::ffff:10.0.0.1]", "ten.example"],
        ),
        (
            "10.0.0.0/8",
            &["10.0.0.1", "10.255.255.255:9100"],
            &[
                "11.0.0.1",
                "9.255.255.255",
                "[::ffff:10.0.0.1]",
                "ten.example",
            ],
        ),
        (
            "0.0.0.0/0",
            &["1.2.3.4", "127.0.0.1"],
            &["[::1]", "any.example"],
        ),
        (
            "fd00::/8",
            &["[fd00::1]", "[FDFF:ffff::1]:443"],
            &["[fe80::1]", "[::1]", "10.0.0.1"],
        ),
        ("::1", &["[::1]", "[0:0:0:0:0:0:0:1]:80"], &["127.0.0.1"]),
        (
            "api.example:8443",
            &["api.example:8443", "API.example.:8443"],
            &["api.example", "api.example:443", "api.example:8444"],
        ),
        (
            "10.0.0.0/8:9100",
            &["10.1.2.3:9100"],
            &["10.1.2.3", "10.1.2.3:9101"],
        ),
        (
            "[fd00::/8]:443",
            &["[fd00::1]:443"],
            &["[fd00::1]:80", "[fd00::1]"],
        ),
        // A portless plain request goes to 80.
        (
            "api.example:80",
            &["api.example", "api.example:80"],
            &["api.example:81"],
        ),
    ];
    for (host, yes, no) in cases {
        let rules = rules(&[&format!("{host}=aud")]);
        for authority in *yes {
            let destination = plain(authority);
            assert_eq!(
                supplied(&rules, &destination).as_deref(),
                Some("aud"),
                "{host} vs {authority}"
            );
        }
        for authority in *no {
            assert_eq!(
                supplied(&rules, &plain(authority)),
                None,
                "{host} vs {authority}"
            );
        }
    }
}

#[test]
fn https_rules_cover_intercepted_tls_only() {
    let rules = rules(&["https://api.example=secure", "other.example=both"]);
    assert_eq!(
        supplied(&rules, &tls("api.example")).as_deref(),
        Some("secure")
    );
    assert_eq!(supplied(&rules, &plain("api.example")), None);
    assert!(rules.admits(&tls("api.example:443"), &aud("secure")));
    assert!(!rules.admits(&plain("api.example:443"), &aud("secure")));
    // Without a scheme, both.
    assert_eq!(
        supplied(&rules, &tls("other.example")).as_deref(),
        Some("both")
    );
    assert_eq!(
        supplied(&rules, &plain("other.example")).as_deref(),
        Some("both")
    );
    // A portless request inside TLS goes to 443.
    let port = self::rules(&["https://api.example:443=secure"]);
    assert!(port.admits(&tls("api.example"), &aud("secure")));
    assert!(!port.admits(&tls("api.example:8443"), &aud("secure")));
}

#[test]
fn templates_expand_the_normalised_host() {
    let rules = rules(&[
        "*.example=https://{host}/{host}",
        "0.0.0.0/0=ip:{host}",
        "::/0=ip:{host}",
    ]);
    for (authority, want) in [
        ("A.Example.:8443", "https://a.example/a.example"),
        ("10.0.0.1:80", "ip:10.0.0.1"),
        ("[FD00::1]:443", "ip:[fd00::1]"),
    ] {
        let destination = plain(authority);
        assert_eq!(
            supplied(&rules, &destination).as_deref(),
            Some(want),
            "{authority}"
        );
        assert!(rules.admits(&destination, &aud(want)), "{authority}");
    }
    // The expansion is compared exactly (audiences are case-sensitive).
    assert!(!rules.admits(&plain("a.example"), &aud("https://A.example/a.example")));
    assert!(!rules.admits(&plain("a.example"), &aud("https://b.example/b.example")));
}

#[test]
fn the_first_rule_that_names_an_audience_supplies_it() {
    let rules = rules(&[
        "*.example=*",
        "a.example:8443=first",
        "a.example=second",
        "*.example=third",
    ]);
    assert_eq!(
        supplied(&rules, &plain("a.example:8443")).as_deref(),
        Some("first")
    );
    assert_eq!(
        supplied(&rules, &plain("a.example")).as_deref(),
        Some("second")
    );
    assert_eq!(
        supplied(&rules, &plain("b.example")).as_deref(),
        Some("third")
    );
    assert_eq!(supplied(&rules, &plain("example")), None);
    // Every matching rule admits, not only the first.
    for audience in ["first", "second", "third", "anything"] {
        assert!(
            rules.admits(&plain("a.example:8443"), &aud(audience)),
            "{audience}"
        );
    }
    let only_star = self::rules(&["*.example=*"]);
    assert_eq!(supplied(&only_star, &plain("a.example")), None);
}

#[test]
fn the_binding_refuses_what_no_matching_rule_admits() {
    let audience = aud("node-exporter");
    let none = DestinationRules::default();
    assert_eq!(none.bind(None, b"anything", &audience), Ok(()));
    let rules = rules(&["10.0.0.0/8:9100=node-exporter", "kubelet.example=*"]);
    let ok = plain("10.1.2.3:9100");
    assert_eq!(rules.bind(Some(&ok), b"", &audience), Ok(()));
    let any = plain("kubelet.example");
    assert_eq!(rules.bind(Some(&any), b"", &aud("whatever")), Ok(()));
    let other_port = plain("10.1.2.3:9101");
    assert_eq!(
        rules.bind(Some(&other_port), b"", &audience),
        Err(Rejection::NotBound {
            audience: audience.clone(),
            host: "http://10.1.2.3:9101".into()
        })
    );
    assert_eq!(
        rules
            .bind(Some(&other_port), b"", &audience)
            .unwrap_err()
            .to_string(),
        "the audience \"node-exporter\" may not be sent to \"http://10.1.2.3:9101\": no --audience-rule for this destination admits it"
    );
    // No host at all: nothing admits it.
    assert_eq!(
        rules.bind(None, b"bad host", &audience),
        Err(Rejection::NotBound {
            audience,
            host: "bad host".into()
        })
    );
}

fn resolver(rules_raw: &[&str], default: Option<&str>) -> Rules {
    Rules {
        header: "x-kubernetes-audience".into(),
        parameter: "kubernetes-audience".into(),
        default: default.map(aud),
        allowlist: Allowlist::new(["h", "q", "m", "r", "d", "https://*.example"]).unwrap(),
        destinations: rules(rules_raw),
    }
}

#[test]
fn a_rule_comes_after_the_request_and_envoy_and_before_the_default() {
    let r = resolver(&["a.example=r"], Some("d"));
    let destination = Some(plain("a.example"));
    let all = RequestParts {
        header_values: &[b"h"],
        path: Some(b"/p?kubernetes-audience=q"),
        metadata: Some(b"m"),
        destination,
    };
    let source = |parts| {
        r.resolve(parts)
            .unwrap()
            .audience
            .map(|(a, s)| (a.as_str().to_owned(), s))
    };
    assert_eq!(source(all), Some(("h".into(), Source::Header)));
    let no_header = RequestParts {
        header_values: &[],
        ..all
    };
    assert_eq!(
        source(no_header),
        Some(("q".into(), Source::QueryParameter))
    );
    let no_query = RequestParts {
        path: Some(b"/p"),
        ..no_header
    };
    assert_eq!(source(no_query), Some(("m".into(), Source::Metadata)));
    let no_metadata = RequestParts {
        metadata: None,
        ..no_query
    };
    assert_eq!(source(no_metadata), Some(("r".into(), Source::Rule)));
    let no_rule = RequestParts {
        destination: Some(plain("b.example")),
        ..no_metadata
    };
    assert_eq!(source(no_rule), Some(("d".into(), Source::Default)));
}

#[test]
fn a_supplied_template_is_still_subject_to_the_allowlist() {
    let r = resolver(&["*.example=https://{host}", "*.test=https://{host}"], None);
    let parts = |destination| RequestParts {
        destination: Some(destination),
        ..RequestParts::default()
    };
    let ok = r.resolve(parts(plain("a.example"))).unwrap();
    assert_eq!(ok.audience, Some((aud("https://a.example"), Source::Rule)));
    assert_eq!(
        r.resolve(parts(plain("a.test"))).unwrap_err(),
        Rejection::NotAllowed {
            audience: aud("https://a.test")
        }
    );
}

#[test]
fn a_refusal_quotes_a_huge_authority_shortened_and_escaped() {
    let rules = rules(&["kubelet.example=*"]);
    let audience = aud("node-exporter");
    // 10 KiB that are no host: a control character, a multi-byte character
    // across the cut, and invalid UTF-8.
    let mut authority = b"evil\n".to_vec();
    authority.extend(std::iter::repeat_n(b'a', 249));
    authority.extend("é".as_bytes());
    authority.extend(std::iter::repeat_n(b'b', 10 * 1024 - authority.len() - 1));
    authority.push(0xff);
    assert_eq!(authority.len(), 10 * 1024);
    assert_eq!(Destination::from_authority(&authority, false), None);
    let Err(Rejection::NotBound { host, .. }) = rules.bind(None, &authority, &audience) else {
        panic!("refused")
    };
    assert_eq!(
        host,
        format!("evil\n{}", "a".repeat(249)),
        "cut before the 'é'"
    );
    let reason = rules
        .bind(None, &authority, &audience)
        .unwrap_err()
        .to_string();
    assert!(reason.len() < 400, "{} bytes: {reason}", reason.len());
    assert!(reason.contains(r#""evil\naaa"#), "escaped: {reason}");
    assert!(!reason.contains('\n'), "{reason}");
    assert!(!reason.contains("bbb"), "{reason}");
}
