//! Reading one `--audience-rule HOST=AUDIENCE`.

use ipnet::IpNet;

use super::{AudienceRule, DestinationRule, HOST_PLACEHOLDER, HostMatch};
use crate::allowlist::Allowlist;
use crate::audience::{Audience, MAX_AUDIENCE_LEN, Source};
use crate::intercept::{HostPattern, MAX_NAME_LEN, split_authority};

/// A rule that cannot be used, with the reason; one line per rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--audience-rule {rule:?}: {reason}")]
pub struct RuleError {
    rule: String,
    reason: String,
}

const FORM: &str = "expected HOST=AUDIENCE (rules are separated by ',' in the environment, so an audience cannot contain one)";
const HOST_FORM: &str = "HOST must be a name, *.suffix, an IP address or a CIDR block, optionally with :PORT (IPv6 in brackets: [::1]:443, [fd00::/8]:443)";

/// Parses one rule (surrounding white space ignored, also around `=`).
pub(super) fn rule(raw: &str, allowlist: Option<&Allowlist>) -> Result<DestinationRule, RuleError> {
    parse(raw.trim(), allowlist).map_err(|reason| RuleError {
        rule: raw.to_owned(),
        reason,
    })
}

fn parse(raw: &str, allowlist: Option<&Allowlist>) -> Result<DestinationRule, String> {
    // A host never contains `=`; an audience may.
    let (host, audience) = raw.split_once('=').ok_or(FORM)?;
    let (https_only, host) = scheme(host.trim())?;
    let (host, port) = host_and_port(host)?;
    let audience = audience_rule(audience.trim(), allowlist)?;
    Ok(DestinationRule {
        https_only,
        host,
        port,
        audience,
    })
}

/// Strips an `https://` prefix (scheme case-insensitive); any other scheme
/// is refused.
fn scheme(host: &str) -> Result<(bool, &str), String> {
    match host.split_once("://") {
        None => Ok((false, host)),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => Ok((true, rest)),
        Some((scheme, _)) => Err(format!(
            "{scheme}:// is not a HOST prefix: only https:// is (the rule then covers intercepted TLS only); without a prefix it covers plain HTTP and intercepted TLS"
        )),
    }
}

fn host_and_port(raw: &str) -> Result<(HostMatch, Option<u16>), String> {
    let (host, port) = split_authority(raw).ok_or(HOST_FORM)?;
    if port == Some(0) {
        return Err("port 0 is no destination".to_owned());
    }
    let host = if host.contains('/') {
        HostMatch::Net(cidr(host)?)
    } else {
        HostMatch::Pattern(HostPattern::parse(host).map_err(|_| HOST_FORM)?)
    };
    Ok((host, port))
}

/// A CIDR block, IPv6 optionally in brackets, with its host bits zero (a
/// block written with them is most likely a typo for a narrower rule).
fn cidr(raw: &str) -> Result<IpNet, String> {
    let inner = match raw.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']').ok_or(HOST_FORM)?,
        None => raw,
    };
    let net: IpNet = inner.parse().map_err(|_| HOST_FORM)?;
    if net.trunc() != net {
        return Err(format!(
            "the CIDR block {net} has host bits set; write {}",
            net.trunc()
        ));
    }
    Ok(net)
}

fn audience_rule(raw: &str, allowlist: Option<&Allowlist>) -> Result<AudienceRule, String> {
    if raw == "*" {
        return Ok(AudienceRule::Any);
    }
    let audience = Audience::parse(raw.as_bytes(), Source::Rule).map_err(|r| r.to_string())?;
    if raw.contains(['{', '}']) {
        if raw.replace(HOST_PLACEHOLDER, "").contains(['{', '}']) {
            return Err(format!(
                "the only placeholder in AUDIENCE is {HOST_PLACEHOLDER}"
            ));
        }
        let hosts = raw.matches(HOST_PLACEHOLDER).count();
        let longest = raw.len() - hosts * HOST_PLACEHOLDER.len() + hosts * MAX_NAME_LEN;
        if longest > MAX_AUDIENCE_LEN {
            return Err(format!(
                "AUDIENCE can expand to {longest} bytes (a host name has up to {MAX_NAME_LEN}), more than the {MAX_AUDIENCE_LEN} an audience may have"
            ));
        }
        return Ok(AudienceRule::Template(raw.to_owned()));
    }
    if let Some(allowlist) = allowlist
        && !allowlist.allows(&audience)
    {
        return Err(format!(
            "the audience {audience:?} is not allowed by --allowed-audience"
        ));
    }
    Ok(AudienceRule::Literal(audience))
}

impl DestinationRule {
    /// The audience of a rule whose AUDIENCE is a literal (`None` for `*`
    /// and templates), for the configuration's checks of literal audiences
    /// (the API server's own audiences are refused at startup).
    pub(crate) fn literal_audience(&self) -> Option<&Audience> {
        match &self.audience {
            AudienceRule::Literal(audience) => Some(audience),
            AudienceRule::Any | AudienceRule::Template(_) => None,
        }
    }
}
