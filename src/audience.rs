//! Audience resolution: which audience a request asks for, and what the
//! request looks like once the audience markers are removed.
//!
//! Pure code: no I/O, no clock. The first source that names an audience
//! wins (README.md, "Choosing the audience"):
//!
//! 1. the audience request header (default `x-kubernetes-audience`);
//! 2. the audience query parameter (default `kubernetes-audience`);
//! 3. Envoy-side configuration: the gRPC initial metadata of the ext_proc
//!    stream (`x-kubernetes-audience`, settable per route);
//! 4. the first destination rule matching the request's destination
//!    (`--audience-rule`, see `crate::destination`), unless its audience
//!    is `*`;
//! 5. the default audience, if configured.
//!
//! Whether the resolved audience may go to the destination at all (the
//! rules' binding) is checked by the caller, `ext_proc::decision`.
//!
//! The header and the query parameter are always removed before the request
//! goes upstream, whichever source won, so the client cannot leak them.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use percent_encoding::percent_decode;

use crate::allowlist::Allowlist;
use crate::destination::{Destination, DestinationRules};

/// Longest audience accepted, in bytes (after percent-decoding).
pub(crate) const MAX_AUDIENCE_LEN: usize = 1024;

/// The gRPC metadata key Envoy sets (per route) to name the audience.
pub(crate) const METADATA_KEY: &str = "x-kubernetes-audience";

/// A validated audience: non-empty, at most [`MAX_AUDIENCE_LEN`] bytes, UTF-8
/// without control characters. Audiences are not secret; they may be logged.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Audience(Arc<str>);

impl Audience {
    /// Validates `raw` as an audience coming from `source`.
    pub fn parse(raw: &[u8], source: Source) -> Result<Audience, Rejection> {
        if raw.is_empty() {
            return Err(Rejection::Empty { from: source });
        }
        if raw.len() > MAX_AUDIENCE_LEN {
            return Err(Rejection::TooLong { from: source });
        }
        let text = std::str::from_utf8(raw).map_err(|_| Rejection::Malformed { from: source })?;
        if text.chars().any(char::is_control) {
            return Err(Rejection::Malformed { from: source });
        }
        Ok(Audience(Arc::from(text)))
    }

    /// The audience as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Where an audience came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The audience request header.
    Header,
    /// The audience query parameter.
    QueryParameter,
    /// The ext_proc stream's gRPC initial metadata (Envoy configuration).
    Metadata,
    /// The processor's `--default-audience`.
    Default,
    /// A destination rule (`--audience-rule`).
    Rule,
}

impl Source {
    /// A stable name for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Header => "header",
            Source::QueryParameter => "query parameter",
            Source::Metadata => "Envoy metadata",
            Source::Default => "default",
            Source::Rule => "destination rule",
        }
    }
}

/// Why a request's audience was refused. Each maps to an HTTP status in
/// `ext_proc::response`; the upstream never sees a refused request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The audience is present but empty.
    #[error("the audience ({}) is empty", .from.as_str())]
    Empty { from: Source },
    /// The audience is longer than [`MAX_AUDIENCE_LEN`].
    #[error("the audience ({}) is longer than {MAX_AUDIENCE_LEN} bytes", .from.as_str())]
    TooLong { from: Source },
    /// The audience is not UTF-8, has a control character or a bad escape.
    #[error("the audience ({}) is not valid UTF-8 text without control characters", .from.as_str())]
    Malformed { from: Source },
    /// The same source names two different audiences.
    #[error("the request names more than one audience ({})", .from.as_str())]
    Ambiguous { from: Source },
    /// The audience is not in `--allowed-audience`.
    #[error("the audience {audience:?} is not allowed by this proxy")]
    NotAllowed { audience: Audience },
    /// Destination rules exist and none matching the destination admits the
    /// audience; `host` is the destination (`http://host:port`).
    #[error(
        "the audience {audience:?} may not be sent to {host:?}: no --audience-rule for this destination admits it"
    )]
    NotBound { audience: Audience, host: String },
    /// The audience is one of the Kubernetes API server's own (a token for
    /// it acts as the ServiceAccount against the API server); refused unless
    /// `--allow-apiserver-audience`.
    #[error(
        "the audience {audience:?} is the Kubernetes API server's own: a token for it would act as this proxy's ServiceAccount against the API server, so this proxy does not mint one"
    )]
    ApiServerAudience { audience: Audience },
}

/// The configured rules for finding an audience in a request.
#[derive(Clone, Debug)]
pub struct Rules {
    /// Lower-case name of the audience request header.
    pub header: String,
    /// Name of the audience query parameter.
    pub parameter: String,
    /// Audience used when the request and Envoy name none.
    pub default: Option<Audience>,
    /// Audiences that may be used.
    pub allowlist: Allowlist,
    /// `--audience-rule`: audiences per destination, and their binding.
    pub destinations: DestinationRules,
}

/// The parts of a request that audience resolution reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestParts<'a> {
    /// Values of the audience header, in order (Envoy may send a repeated
    /// header as several entries).
    pub header_values: &'a [&'a [u8]],
    /// The `:path` pseudo-header.
    pub path: Option<&'a [u8]>,
    /// The audience named by the ext_proc stream's metadata.
    pub metadata: Option<&'a [u8]>,
    /// Where the request goes, for the destination rules (`None`: no rules,
    /// or the `:authority` is not a host).
    pub destination: Option<Destination<'a>>,
}

/// The outcome of resolution for an accepted request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// The audience to mint a token for, and where it came from; `None`
    /// means the request passes through untouched.
    pub audience: Option<(Audience, Source)>,
    /// The request carries the audience header, which must be removed.
    pub remove_header: bool,
    /// The new `:path` without the audience parameter, when it had one.
    pub new_path: Option<Vec<u8>>,
}

impl Rules {
    /// Resolves the audience of one request.
    pub fn resolve(&self, parts: RequestParts<'_>) -> Result<Resolution, Rejection> {
        let from_header = single(parts.header_values.iter().copied(), Source::Header)?;
        let (from_query, new_path) = match parts.path {
            Some(path) => self.strip_parameter(path)?,
            None => (None, None),
        };
        let audience = if let Some(raw) = from_header {
            Some((Audience::parse(raw, Source::Header)?, Source::Header))
        } else if let Some(raw) = from_query {
            let decoded = decode_component(raw).ok_or(Rejection::Malformed {
                from: Source::QueryParameter,
            })?;
            Some((
                Audience::parse(&decoded, Source::QueryParameter)?,
                Source::QueryParameter,
            ))
        } else if let Some(raw) = parts.metadata {
            Some((Audience::parse(raw, Source::Metadata)?, Source::Metadata))
        } else if let Some(supplied) = parts
            .destination
            .and_then(|destination| self.destinations.supply(&destination))
        {
            Some((supplied?, Source::Rule))
        } else {
            self.default.clone().map(|a| (a, Source::Default))
        };
        if let Some((audience, _)) = &audience
            && !self.allowlist.allows(audience)
        {
            return Err(Rejection::NotAllowed {
                audience: audience.clone(),
            });
        }
        Ok(Resolution {
            audience,
            remove_header: !parts.header_values.is_empty(),
            new_path,
        })
    }

    /// Finds the audience parameter in `path`'s query and returns its raw
    /// (still encoded) value and the path without it. Every other parameter
    /// keeps its exact bytes and order; a fragment is kept. Allocates only
    /// the new path, and only when there is a parameter to remove.
    #[allow(clippy::type_complexity)]
    fn strip_parameter<'a>(
        &self,
        path: &'a [u8],
    ) -> Result<(Option<&'a [u8]>, Option<Vec<u8>>), Rejection> {
        let Some(q) = path.iter().position(|&b| b == b'?') else {
            return Ok((None, None));
        };
        let (base, rest) = path.split_at(q);
        let rest = &rest[1..];
        let (query, fragment) = match rest.iter().position(|&b| b == b'#') {
            Some(h) => rest.split_at(h),
            None => (rest, &[][..]),
        };
        let segments = || {
            query.split(|&b| b == b'&').map(|segment| {
                let (name, value) = match segment.iter().position(|&b| b == b'=') {
                    Some(eq) => (&segment[..eq], &segment[eq + 1..]),
                    None => (segment, &[][..]),
                };
                (segment, self.is_parameter(name), value)
            })
        };
        let mut found: Option<&[u8]> = None;
        for (_, is_parameter, value) in segments() {
            if !is_parameter {
                continue;
            }
            match found {
                None => found = Some(value),
                Some(previous) if same_component(previous, value) => {}
                Some(_) => {
                    return Err(Rejection::Ambiguous {
                        from: Source::QueryParameter,
                    });
                }
            }
        }
        if found.is_none() {
            return Ok((None, None));
        }
        let mut new_path = Vec::with_capacity(path.len());
        new_path.extend_from_slice(base);
        let mut separator = b'?';
        for (segment, is_parameter, _) in segments() {
            if !is_parameter {
                new_path.push(separator);
                new_path.extend_from_slice(segment);
                separator = b'&';
            }
        }
        new_path.extend_from_slice(fragment);
        Ok((found, Some(new_path)))
    }

    fn is_parameter(&self, name: &[u8]) -> bool {
        if name == self.parameter.as_bytes() {
            return true;
        }
        // Only an encoded name can still match after decoding.
        if !name.iter().any(|&b| b == b'%' || b == b'+') {
            return false;
        }
        decode_component(name).is_some_and(|decoded| decoded == self.parameter.as_bytes())
    }
}

/// The single value among `values`: repeated identical values are one value,
/// different values are ambiguous.
fn single<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
    source: Source,
) -> Result<Option<&'a [u8]>, Rejection> {
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.any(|other| other != first) {
        return Err(Rejection::Ambiguous { from: source });
    }
    Ok(Some(first))
}

fn same_component(a: &[u8], b: &[u8]) -> bool {
    a == b || decode_component(a) == decode_component(b)
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a
/// space, `%XX` an escaped byte), borrowing when there is nothing to decode.
/// `None` when an escape is incomplete.
fn decode_component(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    let bad_escape = raw.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(raw.len() > i + 2
                && raw[i + 1].is_ascii_hexdigit()
                && raw[i + 2].is_ascii_hexdigit())
    });
    if bad_escape {
        return None;
    }
    if raw.contains(&b'+') {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        return Some(Cow::Owned(percent_decode(&spaced).collect()));
    }
    Some(percent_decode(raw).into())
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            header: "x-kubernetes-audience".into(),
            parameter: "kubernetes-audience".into(),
            default: None,
            allowlist: Allowlist::default(),
            destinations: DestinationRules::default(),
        }
    }

    fn path(rules: &Rules, p: &str) -> Result<Resolution, Rejection> {
        rules.resolve(RequestParts {
            path: Some(p.as_bytes()),
            ..Default::default()
        })
    }

    fn aud(s: &str) -> Audience {
        Audience::parse(s.as_bytes(), Source::Default).unwrap()
    }

    #[test]
    fn query_parameter_is_removed_keeping_everything_else() {
        let r = rules();
        let cases = [
            ("/p?kubernetes-audience=A&x=1", "A", "/p?x=1"),
            ("/p?x=1&kubernetes-audience=A", "A", "/p?x=1"),
            ("/p?x=1&kubernetes-audience=A&y=2", "A", "/p?x=1&y=2"),
            ("/p?kubernetes-audience=A", "A", "/p"),
            // Other parameters keep their exact encoding, repeats and empties.
            (
                "/p?a=%2F%2f&kubernetes-audience=A&a=x+y&&b=",
                "A",
                "/p?a=%2F%2f&a=x+y&&b=",
            ),
            ("/p?a&kubernetes-audience=A&a", "A", "/p?a&a"),
            // The value is form-decoded.
            (
                "/m?kubernetes-audience=https%3A%2F%2Fexample.com%2Fx",
                "https://example.com/x",
                "/m",
            ),
            ("/m?kubernetes-audience=a+b", "a b", "/m"),
            // An encoded parameter name still counts.
            ("/m?kubernetes%2Daudience=A&z", "A", "/m?z"),
            // Repeated identical values are one audience.
            (
                "/m?kubernetes-audience=A&kubernetes-audience=%41",
                "A",
                "/m",
            ),
            // A fragment stays after the query.
            ("/f?kubernetes-audience=A&x=1#frag", "A", "/f?x=1#frag"),
            ("/f?kubernetes-audience=A#frag", "A", "/f#frag"),
        ];
        for (input, audience, rewritten) in cases {
            let res = path(&r, input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                res.audience,
                Some((aud(audience), Source::QueryParameter)),
                "{input}"
            );
            assert_eq!(
                res.new_path.as_deref(),
                Some(rewritten.as_bytes()),
                "{input}"
            );
            assert!(!res.remove_header);
        }
    }

    #[test]
    fn paths_without_the_parameter_are_left_alone() {
        let r = rules();
        for input in [
            "/",
            "/p",
            "/p?",
            "/p?x=1&y",
            "/p?kubernetes-audiences=A",
            "/p#kubernetes-audience=A",
            "/p?xkubernetes-audience=A",
        ] {
            let res = path(&r, input).unwrap();
            assert_eq!(
                res,
                Resolution {
                    audience: None,
                    remove_header: false,
                    new_path: None
                },
                "{input}"
            );
        }
    }

    #[test]
    fn invalid_audiences_are_rejected() {
        let r = rules();
        let q = Source::QueryParameter;
        let long = format!(
            "/p?kubernetes-audience={}",
            "a".repeat(MAX_AUDIENCE_LEN + 1)
        );
        let max = format!("/p?kubernetes-audience={}", "a".repeat(MAX_AUDIENCE_LEN));
        assert!(path(&r, &max).is_ok());
        let cases = [
            ("/p?kubernetes-audience=", Rejection::Empty { from: q }),
            ("/p?kubernetes-audience", Rejection::Empty { from: q }),
            (long.as_str(), Rejection::TooLong { from: q }),
            (
                "/p?kubernetes-audience=a%0Ab",
                Rejection::Malformed { from: q },
            ),
            (
                "/p?kubernetes-audience=a%7Fb",
                Rejection::Malformed { from: q },
            ),
            (
                "/p?kubernetes-audience=%FF",
                Rejection::Malformed { from: q },
            ),
            (
                "/p?kubernetes-audience=%4",
                Rejection::Malformed { from: q },
            ),
            (
                "/p?kubernetes-audience=A&kubernetes-audience=B",
                Rejection::Ambiguous { from: q },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(path(&r, input).unwrap_err(), want, "{input}");
        }
    }

    #[test]
    fn precedence_header_then_query_then_metadata_then_default() {
        let mut r = rules();
        r.default = Some(aud("D"));
        let header: &[&[u8]] = &[b"H"];
        let all = RequestParts {
            header_values: header,
            path: Some(b"/p?kubernetes-audience=Q"),
            metadata: Some(b"M"),
            destination: None,
        };
        let res = r.resolve(all).unwrap();
        assert_eq!(res.audience, Some((aud("H"), Source::Header)));
        // The losing query parameter is still stripped, the header removed.
        assert_eq!(res.new_path.as_deref(), Some(&b"/p"[..]));
        assert!(res.remove_header);

        let res = r
            .resolve(RequestParts {
                header_values: &[],
                ..all
            })
            .unwrap();
        assert_eq!(res.audience, Some((aud("Q"), Source::QueryParameter)));

        let res = r
            .resolve(RequestParts {
                header_values: &[],
                path: Some(b"/p"),
                ..all
            })
            .unwrap();
        assert_eq!(res.audience, Some((aud("M"), Source::Metadata)));
        assert_eq!(res.new_path, None);

        let res = r
            .resolve(RequestParts {
                path: Some(b"/p"),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(res.audience, Some((aud("D"), Source::Default)));

        r.default = None;
        let res = r
            .resolve(RequestParts {
                path: Some(b"/p"),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(res.audience, None);
    }

    #[test]
    fn header_values_are_validated() {
        let r = rules();
        let h = Source::Header;
        let cases: [(&[&[u8]], Rejection); 4] = [
            (&[b""], Rejection::Empty { from: h }),
            (&[b"a\x01"], Rejection::Malformed { from: h }),
            (&[b"\xc3"], Rejection::Malformed { from: h }),
            (&[b"A", b"B"], Rejection::Ambiguous { from: h }),
        ];
        for (values, want) in cases {
            let err = r
                .resolve(RequestParts {
                    header_values: values,
                    ..Default::default()
                })
                .unwrap_err();
            assert_eq!(err, want);
        }
        let ok = r
            .resolve(RequestParts {
                header_values: &[b"A", b"A"],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(ok.audience, Some((aud("A"), Source::Header)));
    }

    #[test]
    fn allowlist_exact_and_glob() {
        let mut r = rules();
        r.allowlist = Allowlist::new(["exact", "https://*.example.com"]).unwrap();
        assert!(path(&r, "/?kubernetes-audience=exact").is_ok());
        assert!(path(&r, "/?kubernetes-audience=https://a.example.com").is_ok());
        assert_eq!(
            path(&r, "/?kubernetes-audience=other").unwrap_err(),
            Rejection::NotAllowed {
                audience: aud("other")
            }
        );
        assert!(matches!(
            path(&r, "/?kubernetes-audience=exactly"),
            Err(Rejection::NotAllowed { .. })
        ));
        // No audience is not a refusal.
        assert_eq!(path(&r, "/").unwrap().audience, None);
    }
}
