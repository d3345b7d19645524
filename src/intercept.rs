//! Which hosts are intercepted (`--intercept-host`): TLS to these hosts is
//! terminated by Envoy with a leaf certificate from the processor's CA, so a
//! token can be injected; every other host is tunnelled untouched.
//!
//! Patterns are an exact host name, `*.suffix` (any name ending in
//! `.suffix`, not `suffix` itself), or an IP address. Matching is
//! case-insensitive. Pure code.
//!
//! This module also owns the crate's one reading of a host: [`ip_literal`]
//! (an IP address, IPv6 optionally in matching brackets), [`dns_name`] (the
//! one host-name validator) and [`Host`] (a host from an `:authority` or an
//! SNI). Everything that names a host (patterns, requests, SNIs, leaf SANs)
//! goes through them, so a name accepted in one place is accepted in all.

use std::fmt;
use std::net::IpAddr;

// === Host names and IP literals ===

/// Longest DNS name in its text form without the trailing dot (RFC 1035:
/// 255 octets on the wire, less the length octets).
pub(crate) const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// An IP address literal: IPv4, or IPv6 bare (`::1`) or in matching brackets
/// (`[::1]`, as in a URL or an `:authority`). A lone bracket (`[::1`,
/// `::1]`) is not an address. Brackets around IPv4 (`[127.0.0.1]`) are
/// accepted, as they always were here, though URLs reserve them for IPv6.
/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) stays IPv6: it is not
/// the same host as its IPv4 form for matching or for a certificate SAN.
pub(crate) fn ip_literal(raw: &str) -> Option<IpAddr> {
    let inner = match raw.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']')?,
        None => raw,
    };
    inner.parse().ok()
}

/// The one host-name validator: `raw` without its trailing dot (one at most)
/// if it is a DNS name, else `None`. Labels are letters, digits, `-` and
/// `_` (in service names and in the wild, though not in RFC 1123 host
/// names), 1..=63 bytes, not starting or ending with `-`; 253 bytes in all.
/// Case is kept: compare with `eq_ignore_ascii_case`, or store
/// [`normalized_dns_name`].
pub(crate) fn dns_name(raw: &str) -> Option<&str> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then_some(name)
}

/// A DNS name in the form names are stored and compared in: lower case,
/// without the trailing dot. `None` if [`dns_name`] refuses it.
pub(crate) fn normalized_dns_name(raw: &str) -> Option<String> {
    dns_name(raw).map(str::to_ascii_lowercase)
}

/// Whether `name` is a proper subdomain of `suffix` (`a.b.c` of `b.c`, not
/// `b.c` itself nor `ab.c`), case-insensitively. Both are expected without
/// a trailing dot.
pub(crate) fn is_subdomain_of(name: &str, suffix: &str) -> bool {
    name.len() > suffix.len() + 1
        && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// A host as it appears in an `:authority` or an SNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host<'a> {
    /// A DNS name, as given but without the trailing dot (compare
    /// case-insensitively).
    Name(&'a str),
    /// An IP literal.
    Ip(IpAddr),
}

impl<'a> Host<'a> {
    /// Parses a bare host (no port): an [`ip_literal`] or a [`dns_name`].
    /// `None` for anything else.
    pub fn parse(raw: &'a str) -> Option<Host<'a>> {
        match ip_literal(raw) {
            Some(ip) => Some(Host::Ip(ip)),
            None => dns_name(raw).map(Host::Name),
        }
    }

    /// Splits `host[:port]` (an `:authority`) and parses the host.
    pub fn from_authority(authority: &'a str) -> Option<(Host<'a>, Option<u16>)> {
        let (host, port) = split_authority(authority)?;
        Some((Host::parse(host)?, port))
    }

    /// Whether two hosts are the same (names compared case-insensitively;
    /// neither carries a trailing dot once parsed).
    pub fn same_as(&self, other: &Host<'_>) -> bool {
        match (self, other) {
            (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
            (Host::Ip(a), Host::Ip(b)) => a == b,
            (Host::Name(_), Host::Ip(_)) | (Host::Ip(_), Host::Name(_)) => false,
        }
    }
}

/// `host:port`, `[v6]:port`, `host` or `[v6]` → (host, port). The host is
/// returned as written (brackets included) for [`Host::parse`]; a bare IPv6
/// address (more than one `:`) has no port.
pub(crate) fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &authority[..end + 2];
        return match &rest[end + 1..] {
            "" => Some((host, None)),
            tail => Some((host, Some(tail.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port.parse().ok()?))),
        Some(_) => Some((authority, None)), // a bare IPv6 address
        None => Some((authority, None)),
    }
}

// === Intercept patterns ===

/// One `--intercept-host` pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// An exact DNS name (normalised: lower case, no trailing dot).
    Exact(String),
    /// `*.suffix`: the suffix, normalised, without the `*.`.
    Suffix(String),
    /// An IP address.
    Ip(IpAddr),
}

/// A pattern that is not a host name, `*.suffix` or an IP address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--intercept-host {0:?}: expected a host name, *.suffix or an IP address")]
pub struct PatternError(pub String);

impl HostPattern {
    /// Parses one pattern (surrounding white space ignored).
    pub fn parse(raw: &str) -> Result<HostPattern, PatternError> {
        let trimmed = raw.trim();
        let pattern = if let Some(ip) = ip_literal(trimmed) {
            Some(HostPattern::Ip(ip))
        } else if let Some(suffix) = trimmed.strip_prefix("*.") {
            normalized_dns_name(suffix).map(HostPattern::Suffix)
        } else {
            normalized_dns_name(trimmed).map(HostPattern::Exact)
        };
        pattern.ok_or_else(|| PatternError(raw.to_owned()))
    }

    pub fn matches(&self, host: &Host<'_>) -> bool {
        match (self, host) {
            (HostPattern::Exact(name), Host::Name(h)) => name.eq_ignore_ascii_case(h),
            (HostPattern::Suffix(suffix), Host::Name(h)) => is_subdomain_of(h, suffix),
            (HostPattern::Ip(ip), Host::Ip(h)) => ip == h,
            (HostPattern::Exact(_) | HostPattern::Suffix(_), Host::Ip(_))
            | (HostPattern::Ip(_), Host::Name(_)) => false,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Suffix(suffix) => write!(f, "*.{suffix}"),
            HostPattern::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The configured intercept patterns.
#[derive(Clone, Debug, Default)]
pub struct InterceptHosts {
    patterns: Vec<HostPattern>,
}

impl InterceptHosts {
    /// Parses every pattern.
    pub fn new<I, S>(patterns: I) -> Result<InterceptHosts, PatternError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| HostPattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(InterceptHosts { patterns })
    }

    /// Whether `host` is intercepted.
    pub fn matches(&self, host: &Host<'_>) -> bool {
        self.patterns.iter().any(|p| p.matches(host))
    }

    pub fn patterns(&self) -> &[HostPattern] {
        &self.patterns
    }

    /// The IP addresses listed (they go into the certificate for clients
    /// that send no SNI).
    pub fn ips(&self) -> Vec<IpAddr> {
        self.patterns
            .iter()
            .filter_map(|p| match p {
                HostPattern::Ip(ip) => Some(*ip),
                HostPattern::Exact(_) | HostPattern::Suffix(_) => None,
            })
            .collect()
    }

    /// Whether nothing is intercepted.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let hosts = InterceptHosts::new([
            "Kubelet.Example",
            "*.svc.cluster.local",
            "127.0.0.1",
            "[::1]",
        ])
        .unwrap();
        let yes = [
            "kubelet.example",
            "KUBELET.example",
            "a.svc.cluster.local",
            "x.y.svc.cluster.local",
            "127.0.0.1",
            "::1",
            "[::1]",
        ];
        let no = [
            "svc.cluster.local",
            "kubelet.example.evil",
            "evil-kubelet.example",
            "127.0.0.2",
            "localhost",
            "asvc.cluster.local",
        ];
        for h in yes {
            assert!(hosts.matches(&Host::parse(h).unwrap()), "{h}");
        }
        for h in no {
            assert!(!hosts.matches(&Host::parse(h).unwrap()), "{h}");
        }
        assert_eq!(
            hosts.ips(),
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(hosts.patterns()[1].to_string(), "*.svc.cluster.local");
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "", "*", "*.", "a b", "http://x", "x:443", "*.*.x", "a..b", "-a.b",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        let cases = [
            (
                "localhost:8443",
                Some((Host::Name("localhost"), Some(8443))),
            ),
            ("localhost", Some((Host::Name("localhost"), None))),
            (
                "127.0.0.1:443",
                Some((Host::Ip("127.0.0.1".parse().unwrap()), Some(443))),
            ),
            (
                "[::1]:443",
                Some((Host::Ip("::1".parse().unwrap()), Some(443))),
            ),
            ("[::1]", Some((Host::Ip("::1".parse().unwrap()), None))),
            ("::1", Some((Host::Ip("::1".parse().unwrap()), None))),
            ("host:notaport", None),
            ("[::1]x", None),
            ("bad host:1", None),
        ];
        for (authority, want) in cases {
            assert_eq!(Host::from_authority(authority), want, "{authority}");
        }
        assert!(
            Host::parse("Example.COM.")
                .unwrap()
                .same_as(&Host::parse("example.com").unwrap())
        );
    }

    fn ip(raw: &str) -> IpAddr {
        raw.parse().unwrap()
    }

    #[test]
    fn ip_literals_need_matching_brackets() {
        for (raw, want) in [
            ("127.0.0.1", Some(ip("127.0.0.1"))),
            ("::1", Some(ip("::1"))),
            ("[::1]", Some(ip("::1"))),
            ("[2001:DB8::1]", Some(ip("2001:db8::1"))),
            ("[127.0.0.1]", Some(ip("127.0.0.1"))),
            ("[::1", None),
            ("::1]", None),
            ("[[::1]]", None),
            ("[]", None),
            ("", None),
            (" ::1", None),
            ("fe80::1%eth0", None),
            ("127.1", None),
            ("1.2.3.4.5", None),
        ] {
            assert_eq!(ip_literal(raw), want, "{raw:?}");
        }
        // IPv4-mapped IPv6 is its own address, not the IPv4 one.
        let mapped = ip_literal("::ffff:127.0.0.1").unwrap();
        assert!(mapped.is_ipv6());
        assert_ne!(mapped, ip("127.0.0.1"));
        let hosts = InterceptHosts::new(["127.0.0.1"]).unwrap();
        assert!(!hosts.matches(&Host::parse("[::ffff:127.0.0.1]").unwrap()));
    }

    #[test]
    fn one_dns_name_validator() {
        let label63 = "a".repeat(63);
        let label64 = "a".repeat(64);
        // 4 labels of 63 plus 3 dots is 255; trim to exactly 253 and 254.
        let long = [label63.as_str(); 4].join(".");
        let name253 = &long[..253];
        let name254 = &long[..254];
        let name253_dot = format!("{name253}.");
        let good_label = format!("{label63}.example");
        let bad_label = format!("{label64}.example");
        for (raw, want) in [
            ("example.com", Some("example.com")),
            ("Example.COM", Some("Example.COM")),
            ("example.com.", Some("example.com")),
            ("localhost", Some("localhost")),
            ("_srv._tcp.example.com", Some("_srv._tcp.example.com")),
            ("a-b.c", Some("a-b.c")),
            ("1.2.3", Some("1.2.3")),
            (good_label.as_str(), Some(good_label.as_str())),
            (name253, Some(name253)),
            (name253_dot.as_str(), Some(name253)),
            (bad_label.as_str(), None),
            (name254, None),
            ("", None),
            (".", None),
            ("example.com..", None),
            (".example.com", None),
            ("a..b", None),
            ("-a.b", None),
            ("a-.b", None),
            ("a b", None),
            ("a/b", None),
            ("a:443", None),
            ("*.a", None),
            ("[::1", None),
            ("exämple.com", None),
        ] {
            assert_eq!(dns_name(raw), want, "{raw:?}");
        }
        assert_eq!(
            normalized_dns_name("Example.COM.").as_deref(),
            Some("example.com")
        );
    }

    #[test]
    fn suffixes_match_proper_subdomains_only() {
        assert!(is_subdomain_of("a.example.com", "example.com"));
        assert!(is_subdomain_of("A.B.EXAMPLE.com", "example.COM"));
        assert!(!is_subdomain_of("example.com", "example.com"));
        assert!(!is_subdomain_of("aexample.com", "example.com"));
        assert!(!is_subdomain_of(".example.com", "example.com"));
        assert!(!is_subdomain_of("com", "example.com"));
    }

    #[test]
    fn patterns_and_hosts_read_hosts_alike() {
        // A lone bracket is refused as a pattern, as it is as a host.
        for raw in ["[::1", "::1]", "[127.0.0.1", "[[::1]]"] {
            assert!(HostPattern::parse(raw).is_err(), "{raw:?}");
            assert_eq!(Host::parse(raw), None, "{raw:?}");
        }
        // Anything accepted as an exact pattern is accepted as a host, and
        // the other way round.
        for raw in [
            "Example.COM.",
            "example.com",
            "a..b",
            "::1",
            "[::1]",
            "[127.0.0.1]",
            "::ffff:10.0.0.1",
            "_x.y",
            "a b",
            "",
        ] {
            assert_eq!(
                HostPattern::parse(raw).is_ok(),
                Host::parse(raw).is_some(),
                "{raw:?}"
            );
        }
        // Patterns are stored normalised; a trailing dot or case in either
        // the pattern or the host does not matter.
        assert_eq!(
            HostPattern::parse("Example.COM.").unwrap(),
            HostPattern::Exact("example.com".into())
        );
        let suffix = HostPattern::parse(" *.Svc.Cluster.Local. ").unwrap();
        assert_eq!(suffix, HostPattern::Suffix("svc.cluster.local".into()));
        assert_eq!(suffix.to_string(), "*.svc.cluster.local");
        assert!(suffix.matches(&Host::parse("a.SVC.cluster.local.").unwrap()));
        assert!(!suffix.matches(&Host::parse("svc.cluster.local").unwrap()));
        assert_eq!(
            HostPattern::parse("[::1]").unwrap(),
            HostPattern::Ip(ip("::1"))
        );
    }
}
