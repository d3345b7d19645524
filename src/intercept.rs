//! Which hosts are intercepted (`--intercept-host`): TLS to these hosts is
//! terminated by Envoy with a leaf certificate from the processor's CA, so a
//! token can be injected; every other host is tunnelled untouched.
//!
//! Patterns are an exact host name, `*.suffix` (any name ending in
//! `.suffix`, not `suffix` itself), or an IP address. Matching is
//! case-insensitive. Pure code.

use std::fmt;
use std::net::IpAddr;

/// One `--intercept-host` pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// An exact DNS name (lower case).
    Exact(String),
    /// `*.suffix`: stored as `.suffix` (lower case).
    Suffix(String),
    /// An IP address.
    Ip(IpAddr),
}

/// A pattern that is not a host name, `*.suffix` or an IP address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--intercept-host {0:?}: expected a host name, *.suffix or an IP address")]
pub struct PatternError(pub String);

impl HostPattern {
    /// Parses one pattern.
    pub fn parse(raw: &str) -> Result<HostPattern, PatternError> {
        let lower = raw.trim().to_ascii_lowercase();
        if let Ok(ip) = lower
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(HostPattern::Ip(ip));
        }
        if let Some(suffix) = lower.strip_prefix("*.") {
            if is_dns_name(suffix) {
                return Ok(HostPattern::Suffix(format!(".{suffix}")));
            }
        } else if is_dns_name(&lower) {
            return Ok(HostPattern::Exact(lower));
        }
        Err(PatternError(raw.to_owned()))
    }

    fn matches(&self, host: &Host<'_>) -> bool {
        match (self, host) {
            (HostPattern::Exact(name), Host::Name(h)) => name.eq_ignore_ascii_case(h),
            (HostPattern::Suffix(suffix), Host::Name(h)) => {
                h.len() > suffix.len() && h[h.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
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
            HostPattern::Suffix(suffix) => write!(f, "*{suffix}"),
            HostPattern::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A host as it appears in an `:authority` or an SNI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host<'a> {
    /// A DNS name (as given; compare case-insensitively).
    Name(&'a str),
    /// An IP literal.
    Ip(IpAddr),
}

impl<'a> Host<'a> {
    /// Parses a bare host (no port): an IP literal (IPv6 with or without
    /// brackets) or a DNS name. `None` for anything else.
    pub fn parse(raw: &'a str) -> Option<Host<'a>> {
        let unbracketed = raw
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(raw);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Some(Host::Ip(ip));
        }
        let name = raw.strip_suffix('.').unwrap_or(raw);
        is_dns_name(&name.to_ascii_lowercase()).then_some(Host::Name(name))
    }

    /// Splits `host[:port]` (an `:authority`) and parses the host.
    pub fn from_authority(authority: &'a str) -> Option<(Host<'a>, Option<u16>)> {
        let (host, port) = split_authority(authority)?;
        Some((Host::parse(host)?, port))
    }

    /// Whether two hosts are the same (names compared case-insensitively,
    /// a trailing dot ignored).
    pub fn same_as(&self, other: &Host<'_>) -> bool {
        match (self, other) {
            (Host::Name(a), Host::Name(b)) => a.eq_ignore_ascii_case(b),
            (Host::Ip(a), Host::Ip(b)) => a == b,
            (Host::Name(_), Host::Ip(_)) | (Host::Ip(_), Host::Name(_)) => false,
        }
    }
}

/// `host:port`, `[v6]:port`, `host` or `[v6]` → (host, port).
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
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

/// A syntactically valid DNS name (lower case expected): labels of letters,
/// digits, `-` and `_`, 1..=63 bytes each, 253 in all.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
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

    /// The patterns.
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
}
