//! Property tests (proptest) for audience resolution and `:path`
//! rewriting. `PROPTEST_CASES=N` runs longer (README.md, "Fuzzing"); a
//! failing case is kept in `proptest-regressions/audience/fuzz.txt` and
//! replayed first on every run.

use percent_encoding::{NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};
use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

const PARAMETER: &str = "kubernetes-audience";

fn rules() -> Rules {
    Rules {
        header: "x-kubernetes-audience".into(),
        parameter: PARAMETER.into(),
        default: None,
        allowlist: Allowlist::default(),
        destinations: DestinationRules::default(),
    }
}

fn resolve_path(path: &[u8]) -> Result<Resolution, Rejection> {
    rules().resolve(RequestParts {
        path: Some(path),
        ..Default::default()
    })
}

/// The oracle for "this query segment names the audience parameter",
/// written apart from the code under test: form-decode leniently (`+` is a
/// space, a bad escape stays as it is) and compare. A bad escape leaves a
/// `%` the parameter name does not have, so leniency changes nothing.
fn names_parameter(segment: &[u8]) -> bool {
    let name = segment.split(|&b| b == b'=').next().unwrap_or_default();
    let spaced: Vec<u8> = name
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&spaced).collect::<Vec<u8>>() == PARAMETER.as_bytes()
}

/// The query segments of `path` (after the first `?`, before the next
/// `#`), or none without a `?`.
fn segments(path: &[u8]) -> Vec<&[u8]> {
    let Some(q) = path.iter().position(|&b| b == b'?') else {
        return Vec::new();
    };
    let rest = &path[q + 1..];
    let query = rest.split(|&b| b == b'#').next().unwrap_or_default();
    query.split(|&b| b == b'&').collect()
}

/// Bytes that may appear in a query segment: anything but `&` and `#`.
fn segment_byte() -> impl Strategy<Value = u8> {
    any::<u8>().prop_filter("segment separator", |b| *b != b'&' && *b != b'#')
}

/// A query segment that never names the parameter: a name of at most 8
/// bytes cannot decode to the 19-byte parameter name (decoding shortens).
fn other_segment() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(segment_byte().prop_filter("no =", |b| *b != b'='), 0..8),
        proptest::option::of(vec(segment_byte(), 0..16)),
    )
        .prop_map(|(mut name, value)| {
            if let Some(value) = value {
                name.push(b'=');
                name.extend(value);
            }
            name
        })
}

/// A valid audience (printable, no control characters).
fn audience_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/._~ %+&=?#é-]{1,40}"
}

/// One spelling of the parameter: name plain or percent-encoded, value
/// form-encoded (percent escapes, or `+` for a space).
fn spelled(audience: &str, encode_name: bool, plus: bool) -> Vec<u8> {
    let name = if encode_name {
        utf8_percent_encode(PARAMETER, NON_ALPHANUMERIC).to_string()
    } else {
        PARAMETER.to_owned()
    };
    let mut value = utf8_percent_encode(audience, NON_ALPHANUMERIC).to_string();
    if plus {
        value = value.replace("%20", "+");
    }
    format!("{name}={value}").into_bytes()
}

proptest! {
    /// Every parameter other than the audience survives byte for byte and
    /// in order, the fragment too; the audience is the decoded value,
    /// however often (identically) it is repeated and however spelled.
    #[test]
    fn other_parameters_survive_in_order(
        base in vec(any::<u8>().prop_filter("no ? or #", |b| *b != b'?' && *b != b'#'), 0..16),
        others in vec(other_segment(), 0..12),
        audience in audience_text(),
        spellings in vec((any::<bool>(), any::<bool>(), any::<prop::sample::Index>()), 1..4),
        fragment in proptest::option::of(vec(any::<u8>(), 0..16)),
    ) {
        let mut query: Vec<Vec<u8>> = others.clone();
        for (encode_name, plus, at) in &spellings {
            let at = at.index(query.len() + 1);
            query.insert(at, spelled(&audience, *encode_name, *plus));
        }
        let mut path = b"/".to_vec();
        path.extend(&base);
        path.push(b'?');
        path.extend(query.join(&b'&'));
        let mut tail = Vec::new();
        if let Some(fragment) = &fragment {
            tail.push(b'#');
            tail.extend(fragment);
        }
        path.extend(&tail);

        let resolution = resolve_path(&path).expect("a valid audience is accepted");
        let (got, source) = resolution.audience.expect("an audience");
        prop_assert_eq!(got.as_str(), audience.as_str());
        prop_assert_eq!(source, Source::QueryParameter);
        let mut want = b"/".to_vec();
        want.extend(&base);
        if !others.is_empty() {
            want.push(b'?');
            want.extend(others.join(&b'&'));
        }
        want.extend(&tail);
        prop_assert_eq!(resolution.new_path, Some(want));
    }

    /// On any path whatsoever: no panic; a path naming the parameter is
    /// refused or rewritten to exactly its other segments, in order, and
    /// its fragment; any other path is left alone.
    #[test]
    fn any_path_is_resolved_without_the_parameter(path in vec(any::<u8>(), 0..200)) {
        let result = resolve_path(&path);
        let Some(q) = path.iter().position(|&b| b == b'?') else {
            prop_assert_eq!(result, Ok(Resolution { audience: None, remove_header: false, new_path: None }));
            return Ok(());
        };
        let rest = &path[q + 1..];
        let h = rest.iter().position(|&b| b == b'#').unwrap_or(rest.len());
        let (query, fragment) = rest.split_at(h);
        let named = query.split(|&b| b == b'&').any(names_parameter);
        let kept: Vec<&[u8]> = query
            .split(|&b| b == b'&')
            .filter(|s| !names_parameter(s))
            .collect();
        match result {
            Ok(Resolution { new_path: Some(new_path), audience, .. }) => {
                prop_assert!(named);
                prop_assert!(audience.is_some());
                let mut want = path[..q].to_vec();
                if !kept.is_empty() {
                    want.push(b'?');
                    want.extend(kept.join(&b'&'));
                }
                want.extend(fragment);
                prop_assert_eq!(new_path, want);
            }
            Ok(Resolution { new_path: None, audience, .. }) => {
                prop_assert!(!named);
                prop_assert!(audience.is_none());
            }
            Err(_) => prop_assert!(named),
        }
    }

    /// The same with parameter-like names mixed in: encoded, `+`, cased.
    #[test]
    fn parameter_like_names_are_told_apart(
        parts in vec(prop_oneof![
            Just(b"kubernetes-audience=a".to_vec()),
            Just(b"kubernetes%2Daudience=a".to_vec()),
            Just(b"kubernetes%2daudience=%61".to_vec()),
            Just(b"Kubernetes-audience=b".to_vec()),
            Just(b"kubernetes-audience+=b".to_vec()),
            Just(b"kubernetes-audience%=b".to_vec()),
            Just(b"kubernetes-audiences=b".to_vec()),
            Just(b"kubernetes-audience".to_vec()),
            other_segment(),
        ], 0..8),
    ) {
        let mut path = b"/p?".to_vec();
        path.extend(parts.join(&b'&'));
        let named = segments(&path).into_iter().any(names_parameter);
        match resolve_path(&path) {
            Ok(resolution) => {
                prop_assert_eq!(resolution.new_path.is_some(), named);
                if let Some(new_path) = resolution.new_path {
                    prop_assert!(!segments(&new_path).into_iter().any(names_parameter));
                }
            }
            Err(_) => prop_assert!(named),
        }
    }

    /// Decoding never panics, and undoes percent-encoding exactly once.
    #[test]
    fn decoding_never_panics_and_round_trips(raw in vec(any::<u8>(), 0..64)) {
        let _ = decode_component(&raw);
        let encoded = percent_encoding::percent_encode(&raw, NON_ALPHANUMERIC).to_string();
        let decoded = decode_component(encoded.as_bytes()).expect("well-formed escapes");
        prop_assert_eq!(decoded.as_ref(), raw.as_slice());
        // Encoding twice decodes to the once-encoded text, never further.
        let twice = utf8_percent_encode(&encoded, NON_ALPHANUMERIC).to_string();
        let once = decode_component(twice.as_bytes()).expect("well-formed escapes");
        prop_assert_eq!(once.as_ref(), encoded.as_bytes());
    }

    /// Any audience header values and metadata: no panic; an accepted
    /// audience is valid and, from the header, all values were equal.
    #[test]
    fn any_header_values_and_metadata(
        values in vec(vec(any::<u8>(), 0..24), 0..4),
        metadata in proptest::option::of(vec(any::<u8>(), 0..24)),
    ) {
        let values: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let result = rules().resolve(RequestParts {
            header_values: &values,
            metadata: metadata.as_deref(),
            ..Default::default()
        });
        if let Ok(Resolution { audience: Some((audience, source)), remove_header, .. }) = result {
            let text = audience.as_str();
            prop_assert!(!text.is_empty() && text.len() <= MAX_AUDIENCE_LEN);
            prop_assert!(!text.chars().any(char::is_control));
            prop_assert_eq!(remove_header, !values.is_empty());
            match source {
                Source::Header => prop_assert!(values.iter().all(|v| *v == text.as_bytes())),
                Source::Metadata => {
                    prop_assert!(values.is_empty());
                    prop_assert_eq!(metadata.as_deref(), Some(text.as_bytes()));
                }
                other => prop_assert!(false, "unexpected source {:?}", other),
            }
        }
    }
}
