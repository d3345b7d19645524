//! `--allowed-audience`: which audiences may be minted, as exact strings or
//! URL-aware globs. Pure code.
//!
//! A wildcard stays inside one host label or path segment: `*` (any run of
//! characters), `?` (one character) and `[...]` (one character of a class,
//! `[!...]` negated, `a-z` ranges) never match a URL separator
//! `/ ? # @ \` nor `%` (so a percent-encoded separator cannot stand in for
//! one). `https://*.example.com` therefore admits `https://a.example.com`
//! but not `https://evil.test/x.example.com`, `https://evil.test?.example.com`
//! or `https://a.example.com@evil.test`. `**` is refused: it would read as
//! "any depth" to a reader, and no such wildcard exists here. Matching is
//! case-sensitive, as the API server and every relying party compare `aud`.

use crate::audience::Audience;

/// Characters no wildcard or class matches.
const SEPARATORS: &[char] = &['/', '?', '#', '@', '\\', '%'];

/// A pattern `--allowed-audience` cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{pattern:?}: {reason}")]
pub struct PatternError {
    pattern: String,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    One,
    /// `*`
    Run,
    /// `[...]`: ranges (inclusive), negated with `!` or `^`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    /// Whether this single-character token matches `c`.
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::One | Token::Run => !SEPARATORS.contains(&c),
            Token::Class { negated, ranges } => {
                !SEPARATORS.contains(&c)
                    && ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// One compiled pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern(Vec<Token>);

impl Pattern {
    fn parse(raw: &str) -> Result<Pattern, PatternError> {
        let error = |reason| PatternError {
            pattern: raw.to_owned(),
            reason,
        };
        if raw.is_empty() {
            return Err(error("an empty pattern matches nothing"));
        }
        if raw.contains("**") {
            return Err(error(
                "`**` is not supported: `*` matches within one host label or path segment",
            ));
        }
        let mut tokens = Vec::new();
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' => Token::Run,
                '?' => Token::One,
                '[' => class(&mut chars)
                    .ok_or_else(|| error("an unclosed, empty or reversed `[...]`"))?,
                c => Token::Literal(c),
            });
        }
        Ok(Pattern(tokens))
    }

    /// Whether the whole of `text` matches. Dynamic programming over
    /// (pattern position, text position): linear in both, no backtracking
    /// blow-up whatever the pattern.
    fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        // reachable[j]: the pattern prefix seen so far matches text[..j].
        let mut reachable = vec![false; text.len() + 1];
        reachable[0] = true;
        for token in &self.0 {
            let mut next = vec![false; text.len() + 1];
            match token {
                Token::Run => {
                    for j in 0..=text.len() {
                        next[j] =
                            reachable[j] || (j > 0 && next[j - 1] && token.matches(text[j - 1]));
                    }
                }
                Token::Literal(_) | Token::One | Token::Class { .. } => {
                    for j in 1..=text.len() {
                        next[j] = reachable[j - 1] && token.matches(text[j - 1]);
                    }
                }
            }
            reachable = next;
        }
        reachable[text.len()]
    }
}

/// The body of a `[...]` after the `[`, up to and including `]`. A `]`
/// right after `[` or `[!` is a literal member, as in POSIX globs.
fn class(chars: &mut std::str::Chars<'_>) -> Option<Token> {
    let mut negated = false;
    let mut members: Vec<char> = Vec::new();
    let mut first = true;
    loop {
        let c = chars.next()?;
        match c {
            '!' | '^' if first && !negated => {
                negated = true;
                continue;
            }
            ']' if !first => break,
            c => members.push(c),
        }
        first = false;
    }
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < members.len() {
        match members.get(i + 1..i + 3) {
            Some(&['-', hi]) if members[i] <= hi => {
                ranges.push((members[i], hi));
                i += 3;
            }
            Some(&['-', _]) => return None,
            _ => {
                ranges.push((members[i], members[i]));
                i += 1;
            }
        }
    }
    (!ranges.is_empty()).then_some(Token::Class { negated, ranges })
}

/// The allowlist. Empty means every audience is allowed.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    patterns: Vec<Pattern>,
}

impl Allowlist {
    /// Compiles every pattern; the first invalid one is the error.
    pub(crate) fn new<I, S>(patterns: I) -> Result<Allowlist, PatternError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| Pattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Allowlist { patterns })
    }

    /// Whether `audience` may be used.
    pub(crate) fn allows(&self, audience: &Audience) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(audience.as_str()))
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::Source;

    fn allows(patterns: &[&str], audience: &str) -> bool {
        let audience = Audience::parse(audience.as_bytes(), Source::Header).unwrap();
        Allowlist::new(patterns).unwrap().allows(&audience)
    }

    #[test]
    fn wildcards_stay_inside_one_label_or_segment() {
        let cases: &[(&str, &str, bool)] = &[
            ("https://*.example.com", "https://a.example.com", true),
            ("https://*.example.com", "https://a-b_c.example.com", true),
            ("https://*.example.com", "https://a.b.example.com", true),
            ("https://*.example.com", "https://.example.com", true),
            // Hostile audiences a redirecting upstream could name.
            (
                "https://*.example.com",
                "https://evil.test/x.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://evil.test?.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://evil.test#.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://a.example.com@evil.test",
                false,
            ),
            (
                "https://*.example.com",
                "https://evil.test\\.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://evil.test%2F.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://evil.test%2f.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://evil.test%3F.example.com",
                false,
            ),
            (
                "https://*.example.com",
                "https://a.example.com.evil.test",
                false,
            ),
            ("https://*.example.com", "https://a.example.com/", false),
            // Case-sensitive, as `aud` is compared.
            ("https://*.example.com", "https://a.EXAMPLE.com", false),
            ("https://*.example.com", "HTTPS://a.example.com", false),
            ("https://*.example.com", "https://A.example.com", true),
            // `?` and classes: one character, never a separator.
            ("node-?", "node-a", true),
            ("node-?", "node-/", false),
            ("node-?", "node-ab", false),
            ("node-[a-c]", "node-b", true),
            ("node-[a-c]", "node-d", false),
            ("node-[!a-c]", "node-d", true),
            ("node-[!a-c]", "node-/", false),
            ("node-[]]", "node-]", true),
            // Exact strings.
            ("prometheus", "prometheus", true),
            ("prometheus", "prometheus2", false),
            (
                "https://api.example.com/v1/*",
                "https://api.example.com/v1/x",
                true,
            ),
            (
                "https://api.example.com/v1/*",
                "https://api.example.com/v1/x/y",
                false,
            ),
        ];
        for (pattern, audience, want) in cases {
            assert_eq!(
                allows(&[pattern], audience),
                *want,
                "{pattern} vs {audience}"
            );
        }
    }

    #[test]
    fn empty_allows_all_and_any_pattern_may_admit() {
        assert!(allows(&[], "https://anything/at/all"));
        assert!(allows(&["a", "b*"], "bee"));
        assert!(!allows(&["a", "b*"], "c"));
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        for (pattern, reason) in [
            ("", "empty"),
            ("https://**.example.com", "`**` is not supported"),
            ("[unclosed", "unclosed"),
            ("[]", "unclosed"),
            ("[z-a]", "reversed"),
        ] {
            let error = Allowlist::new([pattern]).unwrap_err();
            assert!(error.to_string().contains(reason), "{pattern}: {error}");
        }
    }

    #[test]
    fn matching_is_linear_for_pathological_patterns() {
        // A backtracking matcher takes exponential time here.
        let pattern = "a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
        let audience = "a".repeat(1000);
        assert!(!allows(&[pattern], &audience));
    }
}
