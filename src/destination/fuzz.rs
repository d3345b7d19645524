//! Property tests (proptest) for host and pattern matching: the readers of
//! `crate::intercept` (hosts, `--intercept-host` patterns) and the
//! `--audience-rule` destination rules. `PROPTEST_CASES=N` runs longer
//! (README.md, "Fuzzing"); failures are kept in
//! `proptest-regressions/destination/fuzz.txt`.

use proptest::prelude::*;

use super::*;
use crate::intercept::{InterceptHosts, dns_name, normalized_dns_name};

/// A valid DNS name in mixed case (1 to 3 labels).
fn dns() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,8}[a-zA-Z0-9_])?(\\.[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,8}[a-zA-Z0-9_])?){0,2}"
}

/// Authority-like text: mostly plausible hosts with hostile characters and
/// ports mixed in, sometimes anything at all.
fn authority() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (dns(), "[./?#@\\\\%:\\[\\]a-zA-Z0-9-]{0,6}", proptest::option::of(any::<u16>()))
            .prop_map(|(host, junk, port)| {
                let mut a = format!("{host}{junk}");
                if let Some(port) = port {
                    a.push_str(&format!(":{port}"));
                }
                a
            }),
        1 => any::<String>(),
        1 => any::<std::net::IpAddr>().prop_map(|ip| match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        }),
    ]
}

/// URL separators a host pattern must never match across.
const SEPARATORS: &[char] = &['/', '?', '#', '@', '\\', '%'];

proptest! {
    /// Normalising a name twice changes nothing; a trailing dot changes
    /// nothing; a normalised name is lower case and a valid name.
    #[test]
    fn normalisation_is_idempotent(raw in prop_oneof![dns(), any::<String>()]) {
        if let Some(once) = normalized_dns_name(&raw) {
            prop_assert_eq!(normalized_dns_name(&once), Some(once.clone()));
            prop_assert_eq!(once.clone(), once.to_ascii_lowercase());
            prop_assert_eq!(dns_name(&once), Some(once.as_str()));
            if !raw.ends_with('.') {
                prop_assert_eq!(normalized_dns_name(&format!("{raw}.")), Some(once));
            }
        }
    }

    /// Intercept patterns: parsing never panics, the normalised form reads
    /// back as the same pattern, and matching is case-insensitive and never
    /// crosses a URL separator: a matched host is a plain name or IP, and
    /// under `*.suffix` a proper subdomain of it.
    #[test]
    fn intercept_patterns_match_hosts_only(
        pattern in prop_oneof![dns().prop_map(|d| format!("*.{d}")), dns(), any::<String>()],
        host in authority(),
    ) {
        let Ok(parsed) = HostPattern::parse(&pattern) else {
            return Ok(());
        };
        prop_assert_eq!(HostPattern::parse(&parsed.to_string()), Ok(parsed.clone()));
        let intercept = InterceptHosts::new([pattern.as_str()]).expect("parsed above");
        let Some(h) = Host::parse(&host) else {
            return Ok(());
        };
        let matched = intercept.matches(&h);
        prop_assert_eq!(matched, parsed.matches(&h));
        for variant in [host.to_ascii_uppercase(), host.to_ascii_lowercase()] {
            let v = Host::parse(&variant).expect("case does not change validity");
            prop_assert_eq!(intercept.matches(&v), matched);
        }
        if matched {
            prop_assert!(!host.contains(SEPARATORS));
            if let (HostPattern::Suffix(suffix), Host::Name(name)) = (&parsed, h) {
                let lower = name.to_ascii_lowercase();
                let dotted = format!(".{suffix}");
                prop_assert!(lower.ends_with(&dotted));
                prop_assert!(lower.len() > suffix.len() + 1);
            }
        }
    }

    /// Destination rules: any rule text parses or is refused without a
    /// panic; a parsed rule's normalised form reads back as the same rule.
    #[test]
    fn rules_parse_and_normalise(raw in prop_oneof![
        (dns(), proptest::option::of(any::<u16>()), "[a-z{}/:.*]{1,12}")
            .prop_map(|(host, port, aud)| match port {
                Some(port) => format!("*.{host}:{port}={aud}"),
                None => format!("{host}={aud}"),
            }),
        any::<String>(),
    ]) {
        if let Ok(rules) = DestinationRules::new([raw.as_str()], None) {
            let normalised = rules.rules()[0].to_string();
            let again = DestinationRules::new([normalised.as_str()], None);
            prop_assert_eq!(again, Ok(rules));
        }
    }

    /// A `*.suffix` rule supplies and admits its audience only for proper
    /// subdomains of the suffix, whatever the case of the request's host,
    /// never for an authority with a URL separator in its host; the binding
    /// agrees with `admits`.
    #[test]
    fn suffix_rules_bind_subdomains_only(
        suffix in dns(),
        label in "[a-zA-Z0-9]{1,8}",
        authority in authority(),
        pick in any::<bool>(),
        tls in any::<bool>(),
    ) {
        let rules = DestinationRules::new([format!("*.{suffix}=aud")], None).expect("a valid rule");
        let audience = Audience::parse(b"aud", Source::Header).expect("valid");
        let authority = if pick { format!("{label}.{suffix}") } else { authority };
        let lower = authority.to_ascii_lowercase();
        let upper = authority.to_ascii_uppercase();
        let results: Vec<(bool, bool)> = [authority.as_str(), lower.as_str(), upper.as_str()]
            .iter()
            .map(|a| {
                let destination = Destination::from_authority(a.as_bytes(), tls);
                let admits = destination.as_ref().is_some_and(|d| rules.admits(d, &audience));
                let bound = rules.bind(destination.as_ref(), a.as_bytes(), &audience).is_ok();
                (admits, bound)
            })
            .collect();
        for &(admits, bound) in &results {
            prop_assert_eq!(admits, bound);
            prop_assert_eq!((admits, bound), results[0]);
        }
        if results[0].0 {
            let destination = Destination::from_authority(lower.as_bytes(), tls).expect("admitted");
            let host = destination.host_text();
            let dotted = format!(".{}", suffix.to_ascii_lowercase());
            prop_assert!(host.ends_with(&dotted));
            prop_assert!(!host.contains(SEPARATORS));
            prop_assert_eq!(
                rules.supply(&destination).map(|r| r.map(|a| a.as_str().to_owned())),
                Some(Ok("aud".to_owned()))
            );
        }
        // A numeric "subdomain" of a numeric suffix may read as an IP
        // address (`0` under `0.0.0`): not a name, so not a subdomain.
        if pick && crate::intercept::ip_literal(&authority).is_none() {
            prop_assert!(results[0].0, "a subdomain is admitted");
        }
    }
}

// === Regression cases found by the properties above ===

/// Found by `suffix_rules_bind_subdomains_only`: under `*.0.0.0`, the
/// authority `0.0.0.0` is an IPv4 address, not a subdomain, so the rule
/// neither admits nor supplies anything for it; `a.0.0.0` is a name.
#[test]
fn a_name_that_reads_as_an_ip_is_not_a_subdomain() {
    let rules = DestinationRules::new(["*.0.0.0=aud"], None).expect("a valid rule");
    let audience = Audience::parse(b"aud", Source::Header).expect("valid");
    let ip = Destination::from_authority(b"0.0.0.0", false).expect("an IP");
    assert!(!rules.admits(&ip, &audience));
    assert_eq!(rules.supply(&ip), None);
    let name = Destination::from_authority(b"a.0.0.0", false).expect("a name");
    assert!(rules.admits(&name, &audience));
}
