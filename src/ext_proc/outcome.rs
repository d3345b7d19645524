//! Which `requests_total{outcome}` a decision counts under: every
//! [`Verdict`] and every injection result maps to exactly one [`Outcome`]
//! (a `match` without a catch-all, so a new variant needs its outcome).
//!
//! | decision | outcome |
//! |---|---|
//! | `Verdict::PassThrough` | `passthrough` |
//! | `Verdict::Refuse`: `Empty`, `TooLong`, `Malformed`, `Ambiguous` | `invalid_audience` |
//! | `Verdict::Refuse`: `NotAllowed` | `not_allowed` |
//! | `Verdict::Refuse`: `NotBound` | `not_bound` |
//! | `Verdict::Refuse`: `ApiServerAudience` | `apiserver_audience` |
//! | `Verdict::LocalDestination` | `local_destination` |
//! | `Verdict::Misdirected` | `sni_mismatch` |
//! | `Verdict::Connect`, intercepted host | `connect_intercepted` |
//! | `Verdict::Connect`, any other host | `connect_tunnelled` |
//! | injection, token | `injected` |
//! | injection, no token, `--on-token-error deny` | `token_unavailable` |
//! | injection, no token, `--on-token-error allow` | `fail_open` |

use super::OnTokenError;
use super::decision::Verdict;
use crate::audience::Rejection;
use crate::metrics::Outcome;

/// The outcome of a decision answered without a token.
pub(crate) fn of_verdict(verdict: &Verdict<'_>) -> Outcome {
    match verdict {
        Verdict::PassThrough => Outcome::Passthrough,
        Verdict::Refuse(rejection) => of_rejection(rejection),
        Verdict::Connect { intercept, .. } => {
            if *intercept {
                Outcome::ConnectIntercepted
            } else {
                Outcome::ConnectTunnelled
            }
        }
        Verdict::Misdirected(_) => Outcome::SniMismatch,
        Verdict::LocalDestination(_) => Outcome::LocalDestination,
    }
}

/// The outcome of a refused audience.
pub(crate) fn of_rejection(rejection: &Rejection) -> Outcome {
    match rejection {
        Rejection::Empty { .. }
        | Rejection::TooLong { .. }
        | Rejection::Malformed { .. }
        | Rejection::Ambiguous { .. } => Outcome::InvalidAudience,
        Rejection::NotAllowed { .. } => Outcome::NotAllowed,
        Rejection::NotBound { .. } => Outcome::NotBound,
        Rejection::ApiServerAudience { .. } => Outcome::ApiserverAudience,
    }
}

/// The outcome of an injection: whether a token came, and what
/// `--on-token-error` does when none did.
pub(crate) fn of_injection(got_token: bool, on_token_error: OnTokenError) -> Outcome {
    match (got_token, on_token_error) {
        (true, _) => Outcome::Injected,
        (false, OnTokenError::Deny) => Outcome::TokenUnavailable,
        (false, OnTokenError::Allow) => Outcome::FailOpen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::{Audience, Source};
    use crate::local::LocalRefusal;

    fn audience() -> Audience {
        Audience::parse(b"aud", Source::Header).unwrap()
    }

    #[test]
    fn every_verdict_maps_to_its_outcome() {
        let connect = |intercept| Verdict::Connect {
            authority: b"h:443",
            intercept,
            client_marked: false,
        };
        let cases = [
            (Verdict::PassThrough, "passthrough"),
            (connect(true), "connect_intercepted"),
            (connect(false), "connect_tunnelled"),
            (Verdict::Misdirected("x".into()), "sni_mismatch"),
            (
                Verdict::LocalDestination(LocalRefusal::Unreadable {
                    authority: "x y".into(),
                }),
                "local_destination",
            ),
        ];
        for (verdict, expected) in cases {
            assert_eq!(of_verdict(&verdict).as_str(), expected, "{verdict:?}");
        }
    }

    #[test]
    fn every_rejection_maps_to_its_outcome() {
        let from = Source::Header;
        let cases = [
            (Rejection::Empty { from }, "invalid_audience"),
            (Rejection::TooLong { from }, "invalid_audience"),
            (Rejection::Malformed { from }, "invalid_audience"),
            (Rejection::Ambiguous { from }, "invalid_audience"),
            (
                Rejection::NotAllowed {
                    audience: audience(),
                },
                "not_allowed",
            ),
            (
                Rejection::NotBound {
                    audience: audience(),
                    host: "h".into(),
                },
                "not_bound",
            ),
            (
                Rejection::ApiServerAudience {
                    audience: audience(),
                },
                "apiserver_audience",
            ),
        ];
        for (rejection, expected) in cases {
            assert_eq!(of_rejection(&rejection).as_str(), expected, "{rejection:?}");
            let verdict = Verdict::Refuse(rejection);
            assert_eq!(of_verdict(&verdict).as_str(), expected);
        }
    }

    #[test]
    fn injections_map_by_token_and_policy() {
        assert_eq!(of_injection(true, OnTokenError::Deny), Outcome::Injected);
        assert_eq!(of_injection(true, OnTokenError::Allow), Outcome::Injected);
        assert_eq!(
            of_injection(false, OnTokenError::Deny),
            Outcome::TokenUnavailable
        );
        assert_eq!(of_injection(false, OnTokenError::Allow), Outcome::FailOpen);
    }

    #[test]
    fn outcome_labels_are_distinct() {
        let mut labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
