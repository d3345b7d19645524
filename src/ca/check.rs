//! The startup check of a CA loaded from `--ca-key-file`/`--ca-cert-file`:
//! a CA that cannot sign leaves the client will accept for the whole
//! `--certificate-validity`, for every `--intercept-host`, is refused with
//! one clear line (and exit code 64) rather than discovered later as failed
//! handshakes.
//!
//! Refused: a CA that expired or is not valid yet; one that ends sooner than
//! `--certificate-validity` from now (a leaf never outlives its CA, so leaves
//! would be cut short from the start); one whose name constraints do not
//! permit an intercepted host. Only DNS and IP address constraints are read
//! (the only name types a leaf carries); a CA without a name-constraints
//! extension permits every name. Pure code, apart from reading the PEM.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use x509_parser::extensions::{GeneralName, GeneralSubtree};

use crate::intercept::{HostPattern, InterceptHosts, is_subdomain_of};

/// What the check needs to know about a CA certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CaFacts {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub limits: NameLimits,
}

/// A CA's DNS and IP name constraints (RFC 5280, 4.2.1.10).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NameLimits {
    /// Permitted DNS subtrees, lower case; `None` when DNS names are not
    /// constrained (no permitted DNS subtree at all).
    pub permitted_dns: Option<Vec<String>>,
    /// Permitted IP subnets; `None` when IP addresses are not constrained.
    pub permitted_ips: Option<Vec<Subnet>>,
    pub excluded_dns: Vec<String>,
    pub excluded_ips: Vec<Subnet>,
}

/// An IP subnet of a name constraint: address and mask, 4 or 16 bytes each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Subnet {
    addr: Vec<u8>,
    mask: Vec<u8>,
}

impl Subnet {
    /// From the constraint's encoding: address then mask (8 or 32 bytes).
    fn from_der(bytes: &[u8]) -> Option<Subnet> {
        if bytes.len() != 8 && bytes.len() != 32 {
            return None;
        }
        let (addr, mask) = bytes.split_at(bytes.len() / 2);
        Some(Subnet {
            addr: addr.to_vec(),
            mask: mask.to_vec(),
        })
    }

    fn contains(&self, ip: &IpAddr) -> bool {
        let octets = match ip {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        octets.len() == self.addr.len()
            && octets
                .iter()
                .zip(&self.addr)
                .zip(&self.mask)
                .all(|((o, a), m)| o & m == a & m)
    }
}

/// Reads the validity and name constraints of a CA certificate (PEM);
/// refuses a certificate that is not a CA.
pub(crate) fn read(pem: &str) -> Result<CaFacts, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("the certificate is not PEM ({e})"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("the certificate cannot be read ({e})"))?;
    if !cert.is_ca() {
        return Err("the certificate is not a CA".into());
    }
    let validity = cert.validity();
    let limits = match cert.name_constraints() {
        Ok(None) => NameLimits::default(),
        Ok(Some(nc)) => NameLimits {
            permitted_dns: dns(nc.value.permitted_subtrees.as_deref()),
            permitted_ips: ips(nc.value.permitted_subtrees.as_deref())?,
            excluded_dns: dns(nc.value.excluded_subtrees.as_deref()).unwrap_or_default(),
            excluded_ips: ips(nc.value.excluded_subtrees.as_deref())?.unwrap_or_default(),
        },
        Err(e) => return Err(format!("its name constraints cannot be read ({e})")),
    };
    Ok(CaFacts {
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        limits,
    })
}

/// The DNS subtrees (lower case), or `None` if there is none.
fn dns(subtrees: Option<&[GeneralSubtree<'_>]>) -> Option<Vec<String>> {
    let names: Vec<String> = subtrees?
        .iter()
        .filter_map(|s| match s.base {
            GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then_some(names)
}

/// The IP subnets, or `None` if there is none.
fn ips(subtrees: Option<&[GeneralSubtree<'_>]>) -> Result<Option<Vec<Subnet>>, String> {
    let Some(subtrees) = subtrees else {
        return Ok(None);
    };
    let mut subnets = Vec::new();
    for subtree in subtrees {
        if let GeneralName::IPAddress(bytes) = subtree.base {
            subnets.push(Subnet::from_der(bytes).ok_or_else(|| {
                "its name constraints hold a malformed IP address range".to_owned()
            })?);
        }
    }
    Ok((!subnets.is_empty()).then_some(subnets))
}

fn system_time(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(magnitude)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Whether a CA with `facts` may sign the leaves for `hosts`, each valid
/// `leaf_validity`, from `now` on; the reason (one clause) if not.
pub(crate) fn usable(
    facts: &CaFacts,
    hosts: &InterceptHosts,
    leaf_validity: Duration,
    now: SystemTime,
) -> Result<(), String> {
    let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if facts.not_after <= now {
        return Err(format!("it expired at {}", at(facts.not_after)));
    }
    if facts.not_before > now {
        return Err(format!("it is not valid before {}", at(facts.not_before)));
    }
    if facts.not_after < now + leaf_validity {
        return Err(format!(
            "it expires at {}, sooner than --certificate-validity ({}) from now, and a leaf never outlives its CA",
            at(facts.not_after),
            humantime::format_duration(leaf_validity)
        ));
    }
    let refused: Vec<String> = hosts
        .patterns()
        .iter()
        .filter(|p| !facts.limits.permits(p))
        .map(ToString::to_string)
        .collect();
    if !refused.is_empty() {
        return Err(format!(
            "its name constraints do not permit --intercept-host {}",
            refused.join(", ")
        ));
    }
    Ok(())
}

impl NameLimits {
    /// Whether every name `pattern` stands for may appear in a leaf.
    fn permits(&self, pattern: &HostPattern) -> bool {
        match pattern {
            HostPattern::Exact(name) => {
                self.permitted_dns
                    .as_ref()
                    .is_none_or(|bases| bases.iter().any(|b| dns_permits(b, name)))
                    && !self.excluded_dns.iter().any(|b| dns_permits(b, name))
            }
            HostPattern::Suffix(suffix) => {
                self.permitted_dns
                    .as_ref()
                    .is_none_or(|bases| bases.iter().any(|b| permits_subdomains(b, suffix)))
                    && !self
                        .excluded_dns
                        .iter()
                        .any(|b| touches_subdomains(b, suffix))
            }
            HostPattern::Ip(ip) => {
                self.permitted_ips
                    .as_ref()
                    .is_none_or(|subnets| subnets.iter().any(|s| s.contains(ip)))
                    && !self.excluded_ips.iter().any(|s| s.contains(ip))
            }
        }
    }
}

/// Whether the DNS constraint `base` covers `name` (lower case, no trailing
/// dot): `example.com` covers it and its subdomains; `.example.com` (a form
/// OpenSSL and others accept) only the subdomains; an empty base everything.
fn dns_permits(base: &str, name: &str) -> bool {
    match base.strip_prefix('.') {
        _ if base.is_empty() => true,
        Some(parent) => is_subdomain_of(name, parent),
        None => name.eq_ignore_ascii_case(base) || is_subdomain_of(name, base),
    }
}

/// Whether `base` covers every proper subdomain of `suffix` (`*.suffix`).
fn permits_subdomains(base: &str, suffix: &str) -> bool {
    let parent = base.strip_prefix('.').unwrap_or(base);
    parent.is_empty() || suffix.eq_ignore_ascii_case(parent) || is_subdomain_of(suffix, parent)
}

/// Whether `base` covers at least one proper subdomain of `suffix` (so an
/// exclusion reaches into `*.suffix`).
fn touches_subdomains(base: &str, suffix: &str) -> bool {
    let parent = base.strip_prefix('.').unwrap_or(base);
    permits_subdomains(base, suffix) || is_subdomain_of(parent, suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(ip: &str, prefix: u8) -> Subnet {
        let cidr = rcgen::CidrSubnet::from_addr_prefix(ip.parse().unwrap(), prefix);
        let mut der = Vec::new();
        // rcgen's own encoding of a constraint: address then mask.
        match cidr {
            rcgen::CidrSubnet::V4(addr, mask) => {
                der.extend(addr);
                der.extend(mask);
            }
            rcgen::CidrSubnet::V6(addr, mask) => {
                der.extend(addr);
                der.extend(mask);
            }
        }
        Subnet::from_der(&der).unwrap()
    }

    fn pattern(raw: &str) -> HostPattern {
        HostPattern::parse(raw).unwrap()
    }

    #[test]
    fn dns_constraints_follow_rfc_5280_and_the_leading_dot_form() {
        let limits = NameLimits {
            permitted_dns: Some(vec!["example.com".into(), ".svc.local".into()]),
            excluded_dns: vec!["secret.example.com".into()],
            ..NameLimits::default()
        };
        for (raw, want) in [
            ("example.com", true),
            ("a.example.com", true),
            ("*.example.com", false), // reaches secret.example.com
            ("*.a.example.com", true),
            ("secret.example.com", false),
            ("x.secret.example.com", false),
            ("*.secret.example.com", false),
            ("notexample.com", false),
            ("evil.test", false),
            ("svc.local", false), // the leading dot: subdomains only
            ("a.svc.local", true),
            ("*.svc.local", true),
            ("*.local", false),
            ("127.0.0.1", true), // IPs are not constrained here
        ] {
            assert_eq!(limits.permits(&pattern(raw)), want, "{raw}");
        }
    }

    #[test]
    fn ip_constraints_are_subnets_per_family() {
        let limits = NameLimits {
            permitted_ips: Some(vec![subnet("10.0.0.0", 8), subnet("::1", 128)]),
            excluded_ips: vec![subnet("10.9.0.0", 16)],
            ..NameLimits::default()
        };
        for (raw, want) in [
            ("10.1.2.3", true),
            ("10.9.0.1", false),
            ("11.0.0.1", false),
            ("::1", true),
            ("::2", false),
            ("::ffff:10.1.2.3", false),
            ("any.name", true), // names are not constrained here
        ] {
            assert_eq!(limits.permits(&pattern(raw)), want, "{raw}");
        }
        assert_eq!(Subnet::from_der(&[1, 2, 3]), None);
    }

    #[test]
    fn no_constraints_permit_everything() {
        let limits = NameLimits::default();
        for raw in ["example.com", "*.x.y", "10.0.0.1", "::1"] {
            assert!(limits.permits(&pattern(raw)), "{raw}");
        }
        let empty_base = NameLimits {
            permitted_dns: Some(vec![String::new()]),
            ..NameLimits::default()
        };
        assert!(empty_base.permits(&pattern("*.anything")));
    }

    #[test]
    fn validity_is_checked_against_now_and_the_leaf_validity() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let day = Duration::from_secs(86_400);
        let hosts = InterceptHosts::new(["localhost"]).unwrap();
        let facts = |not_before, not_after| CaFacts {
            not_before,
            not_after,
            limits: NameLimits::default(),
        };
        assert_eq!(
            usable(&facts(now - day, now + day), &hosts, day, now),
            Ok(())
        );
        let expired = usable(&facts(now - day, now - day / 2), &hosts, day, now).unwrap_err();
        assert_eq!(expired, "it expired at 2023-11-14T10:13:20Z");
        let at_end = usable(&facts(now - day, now), &hosts, day, now).unwrap_err();
        assert!(at_end.starts_with("it expired at"), "{at_end}");
        let early = usable(&facts(now + day, now + 9 * day), &hosts, day, now).unwrap_err();
        assert_eq!(early, "it is not valid before 2023-11-15T22:13:20Z");
        let short = usable(&facts(now - day, now + day / 2), &hosts, day, now).unwrap_err();
        assert_eq!(
            short,
            "it expires at 2023-11-15T10:13:20Z, sooner than --certificate-validity (1day) from now, and a leaf never outlives its CA"
        );
        let uncovered = CaFacts {
            limits: NameLimits {
                permitted_dns: Some(vec!["example.com".into()]),
                ..NameLimits::default()
            },
            ..facts(now - day, now + 9 * day)
        };
        let hosts = InterceptHosts::new(["a.example.com", "localhost", "*.other.test"]).unwrap();
        assert_eq!(
            usable(&uncovered, &hosts, day, now).unwrap_err(),
            "its name constraints do not permit --intercept-host localhost, *.other.test"
        );
    }
}
