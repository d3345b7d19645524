//! Local destinations: requests the proxy refuses because their target is
//! the proxy's own machine or its network link (Envoy's admin, the
//! processor's gRPC and admin ports, any other service bound to loopback,
//! the cloud metadata service), unless `--allow-local-destinations` is set.
//!
//! A destination is local when its host is
//!
//! - a loopback address (`127.0.0.0/8`, `::1`), an unspecified address
//!   (`0.0.0.0/8`, `::`; Linux connects them to this machine) or a
//!   link-local one (`169.254.0.0/16`, `fe80::/10`), IPv6 forms that embed
//!   an IPv4 address (`::ffff:127.0.0.1`, `::127.0.0.1`) read as that IPv4
//!   address;
//! - a host name the resolver reads as an IPv4 number (`inet_aton` forms:
//!   `127.1`, `0x7f.1`, `2130706433`, `017700000001`, `0`), read as glibc
//!   reads it (checked against glibc 2.36), then classified as above;
//! - `localhost`, any `*.localhost` (RFC 6761), and the loopback names
//!   Linux distributions put in `/etc/hosts` (`ip6-localhost`,
//!   `ip6-loopback`, `localhost.localdomain`, `localhost4`, `localhost6`,
//!   `localhost4.localdomain4`, `localhost6.localdomain6`);
//! - a well-known cloud metadata endpoint outside those ranges:
//!   `metadata.google.internal`, `metadata.goog` (GCE), `fd00:ec2::254`
//!   (AWS IMDS over IPv6) and `100.100.100.200` (Alibaba Cloud).
//!
//! Names compare case-insensitively, without a trailing dot. A host that is
//! neither a host name nor an IP address cannot be classified and is
//! refused too (400): the check fails closed.
//!
//! What this does not see: a DNS name that resolves to a local address (a
//! name in `/etc/hosts`, `127.0.0.1.nip.io`); Envoy resolves names after the
//! processor has answered. README.md, "Security", says what remains.
//!
//! Pure code.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::intercept::Host;

/// Whether requests to local destinations are refused (the default) or
/// forwarded (`--allow-local-destinations`: tests, demos, local development).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalDestinations {
    /// Refuse them with 403 (400 for a host that cannot be read).
    #[default]
    Refuse,
    /// Forward them like any other request.
    Allow,
}

impl LocalDestinations {
    /// The setting for `--allow-local-destinations`.
    pub(crate) fn from_flag(allow: bool) -> LocalDestinations {
        if allow {
            LocalDestinations::Allow
        } else {
            LocalDestinations::Refuse
        }
    }
}

/// Why a host is local.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LocalKind {
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `localhost`, `*.localhost` and the distributions' loopback names.
    LoopbackName,
    /// A cloud metadata endpoint outside the ranges above.
    Metadata,
}

impl LocalKind {
    /// For the refusal's reason.
    fn describe(self) -> &'static str {
        match self {
            LocalKind::Loopback => "a loopback address",
            LocalKind::Unspecified => "an unspecified address, which reaches this machine",
            LocalKind::LinkLocal => "a link-local address",
            LocalKind::LoopbackName => "a name of this machine",
            LocalKind::Metadata => "a cloud metadata endpoint",
        }
    }
}

/// A request refused for its destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LocalRefusal {
    /// 403: the destination is local.
    Local {
        /// The request's `:authority`, shortened to [`MAX_SHOWN`] bytes.
        authority: String,
        kind: LocalKind,
    },
    /// 400: the `:authority` is not `host[:port]` with a host name or an IP
    /// address, so it cannot be checked.
    Unreadable {
        /// The request's `:authority`, shortened to [`MAX_SHOWN`] bytes.
        authority: String,
    },
}

/// Most bytes of an `:authority` quoted in a reason (and a log line).
const MAX_SHOWN: usize = 255;

impl fmt::Display for LocalRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalRefusal::Local { authority, kind } => write!(
                f,
                "the destination {authority:?} is {}: this proxy does not forward requests \
                 to its own machine or network link (--allow-local-destinations)",
                kind.describe()
            ),
            LocalRefusal::Unreadable { authority } => write!(
                f,
                "the destination {authority:?} is not a host name or IP address with an \
                 optional port, so it cannot be checked for a local destination"
            ),
        }
    }
}

/// Checks a request's `:authority` (`host[:port]`, also a CONNECT target).
pub(crate) fn check_authority(authority: &[u8]) -> Result<(), LocalRefusal> {
    let parsed = std::str::from_utf8(authority)
        .ok()
        .and_then(Host::from_authority);
    let shown = || shorten(authority);
    match parsed {
        None => Err(LocalRefusal::Unreadable { authority: shown() }),
        Some((host, _port)) => match classify(&host) {
            Some(kind) => Err(LocalRefusal::Local {
                authority: shown(),
                kind,
            }),
            None => Ok(()),
        },
    }
}

/// `authority` as text (invalid UTF-8 replaced), cut to [`MAX_SHOWN`]
/// bytes on a character boundary: what a refusal quotes of a request's
/// `:authority`, which a client can make as long as Envoy admits headers.
/// Quote it with `{:?}` so control characters are escaped.
pub(crate) fn shorten(authority: &[u8]) -> String {
    let text = String::from_utf8_lossy(authority);
    let mut end = text.len().min(MAX_SHOWN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Whether `host` is local, and why.
pub(crate) fn classify(host: &Host<'_>) -> Option<LocalKind> {
    match host {
        Host::Ip(ip) => classify_ip(*ip),
        Host::Name(name) => classify_name(name),
    }
}

/// Names of this machine in `/etc/hosts` of common Linux distributions
/// (Debian, Ubuntu, Fedora, RHEL), besides `localhost` itself.
pub(crate) const LOOPBACK_NAMES: &[&str] = &[
    "localhost",
    "ip6-localhost",
    "ip6-loopback",
    "localhost.localdomain",
    "localhost4",
    "localhost6",
    "localhost4.localdomain4",
    "localhost6.localdomain6",
];

/// Cloud metadata endpoints reached by name.
pub(crate) const METADATA_NAMES: &[&str] = &["metadata.google.internal", "metadata.goog"];

/// AWS IMDS over IPv6.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// Alibaba Cloud's metadata service.
const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);

/// `name` comes without its trailing dot (see [`Host`]).
fn classify_name(name: &str) -> Option<LocalKind> {
    if let Some(ip) = inet_aton(name) {
        return classify_ipv4(ip);
    }
    let is = |known: &&str| name.eq_ignore_ascii_case(known);
    if LOOPBACK_NAMES.iter().any(is) || crate::intercept::is_subdomain_of(name, "localhost") {
        return Some(LocalKind::LoopbackName);
    }
    METADATA_NAMES.iter().any(is).then_some(LocalKind::Metadata)
}

/// Whether `ip` is local, and why.
pub(crate) fn classify_ip(ip: IpAddr) -> Option<LocalKind> {
    match ip {
        IpAddr::V4(v4) => classify_ipv4(v4),
        IpAddr::V6(v6) => classify_ipv6(v6),
    }
}

fn classify_ipv4(ip: Ipv4Addr) -> Option<LocalKind> {
    if ip.is_loopback() {
        Some(LocalKind::Loopback)
    } else if ip.octets()[0] == 0 {
        Some(LocalKind::Unspecified)
    } else if ip.is_link_local() {
        Some(LocalKind::LinkLocal)
    } else if ip == ALIBABA_METADATA {
        Some(LocalKind::Metadata)
    } else {
        None
    }
}

fn classify_ipv6(ip: Ipv6Addr) -> Option<LocalKind> {
    if ip.is_loopback() {
        Some(LocalKind::Loopback)
    } else if ip.is_unspecified() {
        Some(LocalKind::Unspecified)
    } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
        Some(LocalKind::LinkLocal)
    } else if ip == AWS_METADATA_V6 {
        Some(LocalKind::Metadata)
    } else {
        // IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`)
        // addresses reach the IPv4 address they carry.
        ip.to_ipv4().and_then(classify_ipv4)
    }
}

/// `name` read as an IPv4 address the way glibc's `inet_aton` (and so
/// `getaddrinfo`, which Envoy resolves names with) reads it: one to four
/// dot-separated numbers, each decimal, octal (leading `0`) or hexadecimal
/// (`0x`), the last filling the bytes left (`a`, `a.b` = 8.24 bits,
/// `a.b.c` = 8.8.16, `a.b.c.d`). `None` if it is not such a number. A bare
/// `0x`, which glibc 2.36 refuses but older C libraries read as 0, is read
/// as 0: the check may refuse more than the resolver accepts, never less.
pub(crate) fn inet_aton(name: &str) -> Option<Ipv4Addr> {
    let parts: Vec<u64> = name.split('.').map(number).collect::<Option<_>>()?;
    let (last, leading) = parts.split_last()?;
    if leading.len() > 3 || leading.iter().any(|&part| part > 0xff) {
        return None;
    }
    let last_bits = 32 - 8 * leading.len() as u32;
    if *last >= 1 << last_bits {
        return None;
    }
    let high = leading
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, &part)| acc | (part << (24 - 8 * i)));
    u32::try_from(high | last).ok().map(Ipv4Addr::from)
}

/// One part of an `inet_aton` address; `None` beyond 32 bits.
fn number(part: &str) -> Option<u64> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            if hex.is_empty() {
                return Some(0);
            }
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .filter(|&n| n <= u64::from(u32::MAX))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
