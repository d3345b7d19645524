//! Property tests (proptest) for `--allowed-audience` patterns.
//! `PROPTEST_CASES=N` runs longer (README.md, "Fuzzing"); failures are
//! kept in `proptest-regressions/allowlist/fuzz.txt`.

use proptest::prelude::*;

use super::*;
use crate::audience::Source;

fn audience(text: &str) -> Option<Audience> {
    Audience::parse(text.as_bytes(), Source::Header).ok()
}

/// Literal text without pattern syntax (`*`, `?`, `[`).
fn literal() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/._#@%\\\\-]{0,12}"
}

proptest! {
    /// `*` between two literals admits exactly the middles without a URL
    /// separator (`/ ? # @ \ %`), and `?` exactly one such character:
    /// a wildcard never reaches across a separator.
    #[test]
    fn wildcards_never_cross_separators(
        prefix in literal(),
        suffix in literal(),
        middle in "[a-zA-Z0-9/?#@%\\\\.é]{0,8}",
    ) {
        let Some(text) = audience(&format!("{prefix}{middle}{suffix}")) else {
            return Ok(());
        };
        let clean = !middle.contains(SEPARATORS);
        let star = Allowlist::new([format!("{prefix}*{suffix}")]).expect("a valid pattern");
        prop_assert_eq!(star.allows(&text), clean);
        let one = Allowlist::new([format!("{prefix}?{suffix}")]).expect("a valid pattern");
        prop_assert_eq!(one.allows(&text), clean && middle.chars().count() == 1);
    }

    /// Any pattern and any audience: no panic. A pattern without a literal
    /// separator admits no audience containing one; a pattern without
    /// wildcards admits exactly itself (case-sensitively).
    #[test]
    fn any_pattern_and_audience(pattern in any::<String>(), text in any::<String>()) {
        let Ok(allowlist) = Allowlist::new([pattern.as_str()]) else {
            return Ok(());
        };
        let Some(aud) = audience(&text) else {
            return Ok(());
        };
        let allowed = allowlist.allows(&aud);
        if allowed && !pattern.contains(['/', '#', '@', '\\', '%']) {
            prop_assert!(!text.contains(SEPARATORS), "{:?} admitted {:?}", pattern, text);
        }
        if !pattern.contains(['*', '?', '[']) {
            prop_assert_eq!(allowed, pattern == text);
            if let Some(upper) = audience(&text.to_uppercase()) {
                prop_assert_eq!(allowlist.allows(&upper), pattern == text.to_uppercase());
            }
        }
    }
}
