//! Destination rules (`--audience-rule HOST=AUDIENCE`): which audience a
//! destination gets when a request names none, and, once any rule exists,
//! the only audiences a destination may receive a token for.
//!
//! - HOST: an exact name, `*.suffix` (a proper subdomain, as for
//!   `--intercept-host`), an IP address or a CIDR block, each optionally with
//!   `:PORT` (`[::1]:443`, `10.0.0.0/8:443`, `[fd00::/8]:443`); names compare
//!   case-insensitively and without a trailing dot. With an `https://` prefix
//!   the rule only covers requests that arrived inside intercepted TLS;
//!   without one it covers plain HTTP and intercepted TLS alike.
//! - AUDIENCE: a literal, a template with `{host}` (the request's host as in
//!   a URL: lower case, no trailing dot, IPv6 in brackets), or `*` (any
//!   audience the request names; still subject to `--allowed-audience`).
//!
//! A request's destination is its `:authority` (inside intercepted TLS the
//! decision has already checked that it names the SNI); a missing port is 80
//! for plain HTTP and 443 inside TLS, the ports Envoy connects to.
//!
//! Two uses, both from [`crate::ext_proc::decision`] (README.md,
//! "Destination rules"):
//!
//! - supply ([`DestinationRules::supply`]): a request that names no audience
//!   (header, query parameter, Envoy metadata) gets the audience of the
//!   first rule matching its destination whose AUDIENCE is not `*`; only
//!   then does `--default-audience` apply;
//! - binding ([`DestinationRules::bind`]): with at least one rule, a token
//!   for an audience goes to a destination only if a rule matching that
//!   destination admits the audience; otherwise the request is refused (403)
//!   before any TokenRequest. Without rules every destination may receive
//!   every (allowed) audience, as before rules existed.
//!
//! Pure code. Hosts are read by the readers of [`crate::intercept`], so a
//! host means the same here as for interception.

#[cfg(test)]
mod fuzz;
mod parse;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::allowlist::Allowlist;
use crate::audience::{Audience, Rejection, Source};
use crate::intercept::{Host, HostPattern};
pub(crate) use parse::RuleError;

/// Port of a plain-HTTP destination whose `:authority` names none.
pub(crate) const HTTP_PORT: u16 = 80;
/// Port of an intercepted-TLS destination whose `:authority` names none.
pub(crate) const HTTPS_PORT: u16 = 443;

/// The placeholder a template replaces with the request's host.
const HOST_PLACEHOLDER: &str = "{host}";

// === Destination ===

/// Where a request goes, as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination<'a> {
    host: Host<'a>,
    /// The `:authority`'s port, else the scheme's default.
    port: u16,
    /// The request arrived inside intercepted TLS.
    tls: bool,
}

impl<'a> Destination<'a> {
    /// The destination of a request with this `:authority`; `tls` when it
    /// arrived inside intercepted TLS. `None` when the authority is not
    /// `host[:port]`.
    pub fn from_authority(authority: &'a [u8], tls: bool) -> Option<Destination<'a>> {
        let (host, port) = Host::from_authority(std::str::from_utf8(authority).ok()?)?;
        let port = port.unwrap_or(if tls { HTTPS_PORT } else { HTTP_PORT });
        Some(Destination { host, port, tls })
    }

    /// The host as in a URL: a name in lower case without its trailing dot,
    /// an IPv6 address in brackets. What `{host}` expands to.
    pub fn host_text(&self) -> String {
        match self.host {
            Host::Name(name) => name.to_ascii_lowercase(),
            Host::Ip(IpAddr::V4(ip)) => ip.to_string(),
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
        }
    }
}

impl fmt::Display for Destination<'_> {
    /// `http://host:port` or `https://host:port`, for refusal messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host_text(), self.port)
    }
}

/// A rule Envoy applies by itself: see [`DestinationRules::fast_rules`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastRule<'a> {
    /// An exact name (lower case, no trailing dot) or an IP address.
    pub host: Host<'a>,
    /// `None`: any port.
    pub port: Option<u16>,
    /// The audience it supplies (and admits).
    pub audience: &'a Audience,
}

// === Rules ===

/// Which hosts a rule covers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostMatch {
    /// An exact name, `*.suffix` or an IP address (as `--intercept-host`).
    Pattern(HostPattern),
    /// A CIDR block (host bits zero).
    Net(IpNet),
}

impl HostMatch {
    fn matches(&self, host: &Host<'_>) -> bool {
        match (self, host) {
            (HostMatch::Pattern(pattern), host) => pattern.matches(host),
            (HostMatch::Net(net), Host::Ip(ip)) => net.contains(ip),
            (HostMatch::Net(_), Host::Name(_)) => false,
        }
    }
}

/// Which audiences a rule admits, and what it supplies.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AudienceRule {
    /// `*`: admits any audience the request names; supplies none.
    Any,
    /// Admits and supplies exactly this audience.
    Literal(Audience),
    /// Admits and supplies the template with `{host}` expanded.
    Template(String),
}

/// One `--audience-rule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    /// `https://`: only requests inside intercepted TLS.
    https_only: bool,
    host: HostMatch,
    /// `None`: any port.
    port: Option<u16>,
    audience: AudienceRule,
}

impl DestinationRule {
    fn matches(&self, destination: &Destination<'_>) -> bool {
        (!self.https_only || destination.tls)
            && self.port.is_none_or(|port| port == destination.port)
            && self.host.matches(&destination.host)
    }

    /// The audience this rule supplies for `destination` (`None` for `*`).
    fn supplies(&self, destination: &Destination<'_>) -> Option<Result<Audience, Rejection>> {
        match &self.audience {
            AudienceRule::Any => None,
            AudienceRule::Literal(audience) => Some(Ok(audience.clone())),
            AudienceRule::Template(template) => {
                let expanded = expand(template, destination);
                Some(Audience::parse(expanded.as_bytes(), Source::Rule))
            }
        }
    }

    fn admits(&self, destination: &Destination<'_>, audience: &Audience) -> bool {
        match &self.audience {
            AudienceRule::Any => true,
            AudienceRule::Literal(literal) => literal == audience,
            AudienceRule::Template(template) => expand(template, destination) == audience.as_str(),
        }
    }
}

fn expand(template: &str, destination: &Destination<'_>) -> String {
    template.replace(HOST_PLACEHOLDER, &destination.host_text())
}

impl fmt::Display for DestinationRule {
    /// The rule in its normalised form (`https://*.svc:443=https://{host}`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.https_only {
            f.write_str("https://")?;
        }
        let host = match &self.host {
            HostMatch::Pattern(pattern) => pattern.to_string(),
            HostMatch::Net(net) => net.to_string(),
        };
        match self.port {
            Some(port) if host.contains(':') => write!(f, "[{host}]:{port}")?,
            Some(port) => write!(f, "{host}:{port}")?,
            None => f.write_str(&host)?,
        }
        match &self.audience {
            AudienceRule::Any => f.write_str("=*"),
            AudienceRule::Literal(audience) => write!(f, "={audience}"),
            AudienceRule::Template(template) => write!(f, "={template}"),
        }
    }
}

/// Every configured `--audience-rule`, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationRules {
    rules: Vec<DestinationRule>,
}

impl DestinationRules {
    /// Parses every rule; each bad one is reported. A literal audience must
    /// be allowed by `allowlist` (`None`: the allowlist is itself invalid,
    /// so that check is left to its own error).
    pub fn new<I, S>(
        raw: I,
        allowlist: Option<&Allowlist>,
    ) -> Result<DestinationRules, Vec<RuleError>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        for rule in raw {
            match parse::rule(rule.as_ref(), allowlist) {
                Ok(rule) => rules.push(rule),
                Err(error) => errors.push(error),
            }
        }
        if errors.is_empty() {
            Ok(DestinationRules { rules })
        } else {
            Err(errors)
        }
    }

    /// No rule: any destination may receive any (allowed) audience.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[DestinationRule] {
        &self.rules
    }

    /// The literal audiences (no `{host}`, not `*`), in rule order: known
    /// in advance, so they take the native fast path (token secrets).
    pub fn literal_audiences(&self) -> impl Iterator<Item = &Audience> {
        self.rules.iter().filter_map(|rule| match &rule.audience {
            AudienceRule::Literal(audience) => Some(audience),
            AudienceRule::Any | AudienceRule::Template(_) => None,
        })
    }

    /// The rules Envoy can apply by itself (the fast path, see
    /// `envoy_config`) for requests in plain HTTP (`tls` false) or inside
    /// intercepted TLS: an exact name or an IP address, a literal audience,
    /// not a local destination (unless `allow_local`), and no earlier rule
    /// that might supply another audience for the same host and port. Any
    /// other rule is left to the processor, which is always right; the fast
    /// path only has to never disagree with it.
    pub fn fast_rules(&self, tls: bool, allow_local: bool) -> Vec<FastRule<'_>> {
        let mut fast = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.https_only && !tls {
                continue;
            }
            let (AudienceRule::Literal(audience), HostMatch::Pattern(pattern)) =
                (&rule.audience, &rule.host)
            else {
                continue;
            };
            let host = match pattern {
                HostPattern::Exact(name) => Host::Name(name),
                HostPattern::Ip(ip) => Host::Ip(*ip),
                HostPattern::Suffix(_) => continue,
            };
            if !allow_local && crate::local::classify(&host).is_some() {
                continue;
            }
            let shadowed = self.rules[..index].iter().any(|earlier| {
                !matches!(earlier.audience, AudienceRule::Any)
                    && (!earlier.https_only || tls)
                    && match (earlier.port, rule.port) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    }
                    && earlier.host.matches(&host)
            });
            if !shadowed {
                fast.push(FastRule {
                    host,
                    port: rule.port,
                    audience,
                });
            }
        }
        fast
    }

    /// The audience for a request to `destination` that names none: that
    /// of the first matching rule whose AUDIENCE is not `*`. A template
    /// that expands to an invalid audience (too long) is a rejection, not
    /// a skip (configuration parsing makes it impossible).
    pub fn supply(&self, destination: &Destination<'_>) -> Option<Result<Audience, Rejection>> {
        self.rules
            .iter()
            .filter(|rule| rule.matches(destination))
            .find_map(|rule| rule.supplies(destination))
    }

    /// Whether a rule matching `destination` admits `audience`.
    pub fn admits(&self, destination: &Destination<'_>, audience: &Audience) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.matches(destination) && rule.admits(destination, audience))
    }

    /// The binding: `Ok` when there are no rules or a rule matching the
    /// destination admits `audience`; else [`Rejection::NotBound`]. A
    /// request whose `authority` is not a host (`destination` is `None`) is
    /// admitted by no rule; its refusal quotes the authority shortened as
    /// [`crate::local::shorten`] does.
    pub fn bind(
        &self,
        destination: Option<&Destination<'_>>,
        authority: &[u8],
        audience: &Audience,
    ) -> Result<(), Rejection> {
        if self.is_empty() {
            return Ok(());
        }
        match destination {
            Some(destination) if self.admits(destination, audience) => Ok(()),
            Some(destination) => Err(Rejection::NotBound {
                audience: audience.clone(),
                host: destination.to_string(),
            }),
            // Not a host: any bytes of any length, so quoted shortened
            // (a host, above, is at most 253 bytes).
            None => Err(Rejection::NotBound {
                audience: audience.clone(),
                host: crate::local::shorten(authority),
            }),
        }
    }
}
