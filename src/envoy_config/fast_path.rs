//! The fast path in Envoy's terms: which requests Envoy may give a token by
//! itself (composite filter -> `credential_injector` with the audience's
//! SDS token secret), written as an xDS matcher tree.
//!
//! A request takes the fast path only where the processor would have given
//! it exactly that token; everything else falls through (`on_no_match`) to
//! the ext_proc filter, which is always right. So every condition here errs
//! towards the processor:
//!
//! - a destination rule (`HOST=AUDIENCE`, literal audience, exact name or IP
//!   address, see [`DestinationRules::fast_rules`]): `:authority` is that
//!   host (any case, a trailing dot, the rule's port or the listener's
//!   default port), the request names no audience (no audience header, no
//!   query that might hold the audience parameter), and inside intercepted
//!   TLS the SNI names the same host;
//! - an audience header whose value is a fast-path audience: with rules,
//!   only for a destination a fast rule of that very audience covers (the
//!   binding); without rules, for any DNS name that is not a local one
//!   (`localhost`, the metadata names), in plain HTTP only (inside TLS the
//!   processor's SNI check cannot be written as a matcher);
//! - the query must hold neither the parameter's name (any case) nor a `%`
//!   (an encoded name): such a request might name an audience.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::yaml::{Lines, quote};
use crate::audience::Audience;
use crate::config::EnvoySettings;
use crate::destination::{FastRule, HTTP_PORT, HTTPS_PORT};
use crate::intercept::Host;

/// One matcher: all of `predicates`, then inject the token of `audience`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) predicates: Vec<Predicate>,
    pub(crate) audience: Audience,
}

/// One single predicate over a request input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Predicate {
    /// The input matches the RE2 regex (fully).
    Regex(Input, String),
    /// The input equals the string.
    Exact(Input, String),
    /// Not (the input matches the RE2 regex).
    NotRegex(Input, String),
}

/// What a predicate reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// A request header (`:authority`, `:path` or the audience header).
    Header(String),
    /// The TLS SNI of the downstream connection.
    ServerName,
}

/// Which listener a matcher is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The forward proxy: plain HTTP.
    Plain,
    /// Inside intercepted TLS.
    Intercept,
}

/// Every fast-path matcher for `listener`, in the order Envoy tries them.
pub(crate) fn entries(settings: &EnvoySettings, listener: Listener) -> Vec<Entry> {
    let tls = listener == Listener::Intercept;
    let rules = &settings.audience.destinations;
    // Each fast rule with the predicates that select its destination.
    let fast: Vec<(FastRule<'_>, Vec<Predicate>)> = rules
        .fast_rules(tls, settings.allow_local)
        .into_iter()
        .filter_map(|rule| Some((rule, destination_predicates(&rule, tls)?)))
        .collect();
    let header = &settings.audience.header;
    let no_audience_query = Predicate::NotRegex(
        Input::Header(":path".into()),
        format!(
            "(?is)[^?]*\\?.*({}|%).*",
            escape(&settings.audience.parameter)
        ),
    );
    let no_audience_header = Predicate::NotRegex(Input::Header(header.clone()), "(?s).*".into());
    let entry = |mut predicates: Vec<Predicate>, audience: &Audience| {
        predicates.push(no_audience_query.clone());
        Entry {
            predicates,
            audience: audience.clone(),
        }
    };
    let mut entries = Vec::new();
    for (rule, destination) in &fast {
        let mut predicates = destination.clone();
        predicates.push(no_audience_header.clone());
        entries.push(entry(predicates, rule.audience));
    }
    for audience in &settings.fast_path {
        let named = Predicate::Exact(Input::Header(header.clone()), audience.as_str().into());
        if rules.is_empty() {
            // Inside TLS the host = SNI check cannot be a matcher here.
            if !tls {
                let mut predicates = vec![named, dns_name_predicate()];
                if !settings.allow_local {
                    predicates.push(not_local_name_predicate());
                }
                entries.push(entry(predicates, audience));
            }
            continue;
        }
        for (_, destination) in fast.iter().filter(|(rule, _)| rule.audience == audience) {
            let mut predicates = vec![named.clone()];
            predicates.extend(destination.iter().cloned());
            entries.push(entry(predicates, audience));
        }
    }
    entries
}

/// The predicates that select `rule`'s destination: its `:authority`, and
/// inside intercepted TLS the SNI naming the same host (the processor
/// answers 421 otherwise). `None`: the rule cannot be checked so (an IP
/// address inside TLS: clients send no SNI for one), it stays with the
/// processor.
fn destination_predicates(rule: &FastRule<'_>, tls: bool) -> Option<Vec<Predicate>> {
    let authority = authority_predicate(rule, tls);
    if !tls {
        return Some(vec![authority]);
    }
    match rule.host {
        Host::Name(name) => Some(vec![
            authority,
            Predicate::Regex(Input::ServerName, format!("(?i){}\\.?", escape(name))),
        ]),
        Host::Ip(_) => None,
    }
}

/// `:authority` names the rule's host: any case, a trailing dot, the
/// rule's port (or any port when it names none); the port may be left out
/// when it is the listener's default (80, or 443 inside TLS).
fn authority_predicate(rule: &FastRule<'_>, tls: bool) -> Predicate {
    let host = match rule.host {
        Host::Name(name) => format!("(?i){}\\.?", escape(name)),
        Host::Ip(IpAddr::V4(ip)) => escape(&ip.to_string()),
        Host::Ip(IpAddr::V6(ip)) => format!("(?i)\\[{}\\]", escape(&ip.to_string())),
    };
    let default = if tls { HTTPS_PORT } else { HTTP_PORT };
    let port = match rule.port {
        None => "(:[0-9]+)?".to_owned(),
        Some(port) if port == default => format!("(:{port})?"),
        Some(port) => format!(":{port}"),
    };
    Predicate::Regex(Input::Header(":authority".into()), format!("{host}{port}"))
}

/// A DNS name (at least two labels, the last starting with a letter, so
/// never an IP address in any of the forms `inet_aton` reads), with an
/// optional port.
fn dns_name_predicate() -> Predicate {
    Predicate::Regex(
        Input::Header(":authority".into()),
        "(?i)([a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\\.)+[a-z]([a-z0-9-]*[a-z0-9])?\\.?(:[0-9]+)?".into(),
    )
}

/// Not one of the names the processor refuses as local (`localhost`, its
/// subdomains, the distributions' loopback names, the metadata names).
fn not_local_name_predicate() -> Predicate {
    let mut names = String::from("(.*\\.)?localhost");
    for name in crate::local::LOOPBACK_NAMES
        .iter()
        .chain(crate::local::METADATA_NAMES)
    {
        let _ = write!(names, "|{}", escape(name));
    }
    Predicate::NotRegex(
        Input::Header(":authority".into()),
        format!("(?i)({names})\\.?(:[0-9]+)?"),
    )
}

/// `text` as a literal inside an RE2 regex.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The matcher tree under `xds_matcher:`, written at `indent`; every
/// matched entry executes `inject(audience)`, anything else `fallback`.
pub(crate) fn write_matcher(
    out: &mut Lines,
    indent: usize,
    entries: &[Entry],
    inject: &dyn Fn(&mut Lines, usize, &Audience),
    fallback: &dyn Fn(&mut Lines, usize),
) {
    out.line(indent, "matcher_list:");
    out.line(indent + 2, "matchers:");
    for entry in entries {
        out.line(indent + 2, "- predicate:");
        let at = indent + 6;
        if let [single] = entry.predicates.as_slice() {
            write_predicate(out, at, single);
        } else {
            out.line(at, "and_matcher:");
            out.line(at + 2, "predicate:");
            for predicate in &entry.predicates {
                out.open_item(at + 2);
                write_predicate(out, at + 4, predicate);
            }
        }
        out.line(indent + 4, "on_match:");
        inject(out, indent + 6, &entry.audience);
    }
    out.line(indent, "on_no_match:");
    fallback(out, indent + 2);
}

fn write_predicate(out: &mut Lines, indent: usize, predicate: &Predicate) {
    let (input, value, negated) = match predicate {
        Predicate::Regex(input, regex) => (input, regex_value(regex), false),
        Predicate::NotRegex(input, regex) => (input, regex_value(regex), true),
        Predicate::Exact(input, exact) => (input, format!("{{ exact: {} }}", quote(exact)), false),
    };
    let indent = if negated {
        out.line(indent, "not_matcher:");
        indent + 2
    } else {
        indent
    };
    out.line(indent, "single_predicate:");
    out.line(indent + 2, "input:");
    match input {
        Input::Header(name) => {
            out.line(indent + 4, &format!("name: {}", quote(name)));
            out.line(indent + 4, "typed_config:");
            out.line(
                indent + 6,
                "\"@type\": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            );
            out.line(indent + 6, &format!("header_name: {}", quote(name)));
        }
        Input::ServerName => {
            out.line(indent + 4, "name: server-name");
            out.line(indent + 4, "typed_config:");
            out.line(
                indent + 6,
                "\"@type\": type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.ServerNameInput",
            );
        }
    }
    out.line(indent + 2, &format!("value_match: {value}"));
}

fn regex_value(regex: &str) -> String {
    format!(
        "{{ safe_regex: {{ google_re2: {{}}, regex: {} }} }}",
        quote(regex)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_a_host_literal() {
        assert_eq!(escape("a.b-c"), "a\\.b-c");
        assert_eq!(escape("x*y"), "x\\*y");
    }
}
