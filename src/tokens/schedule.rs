//! The refresh policy, as pure functions of durations (no clock inside).
//!
//! - A token is refreshed in the background once 80 % of its lifetime has
//!   passed (the kubelet's rule for projected tokens), minus a little jitter
//!   so that many audiences minted together do not refresh together; a
//!   short-lived one (an API server whose clock is behind) no later than 80 %
//!   of its usable time, so the refresh and its retries come while it can
//!   still be served.
//! - A token is served until [`Policy::expiry_margin`] before it expires,
//!   even while refreshes fail; after that the proxy fails closed.
//! - Failed refreshes are retried with exponential backoff; a `Retry-After`
//!   from the API server is honoured (clamped to a sane window).
//! - A failed TokenRequest for an audience without a usable token opens a
//!   back-off window for that audience ([`Policy::failure_window`]): requests
//!   in it get the failure at once instead of asking the API server again.

use std::time::Duration;

use super::Error;

/// Refresh and retry tuning. [`Policy::default`] is what the proxy uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Policy {
    /// Fraction of the lifetime after which a refresh starts.
    pub refresh_fraction: f64,
    /// Largest fraction of the lifetime the refresh may start earlier.
    pub jitter_fraction: f64,
    /// A token is not handed out closer than this to its expiry.
    pub expiry_margin: Duration,
    /// First retry delay after a failed refresh.
    pub min_backoff: Duration,
    /// Longest retry delay (exponential growth stops here).
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured.
    pub max_retry_after: Duration,
    /// Longest back-off window after a failed TokenRequest for an audience
    /// without a token (requests get 503 meanwhile, so keep it short).
    pub max_failure_window: Duration,
    /// The window after an answer that retrying will not change (401, 403,
    /// 404, 400/422, an unusable answer): short, so a fixed RBAC rule or
    /// ServiceAccount is picked up quickly.
    pub refusal_window: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            refresh_fraction: 0.8,
            jitter_fraction: 0.05,
            expiry_margin: Duration::from_secs(30),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            max_failure_window: Duration::from_secs(60),
            refusal_window: Duration::from_secs(5),
        }
    }
}

impl Policy {
    /// When, after receipt, a token of `lifetime` should be refreshed.
    /// `jitter` is a number in `[0, 1)` (random in production).
    ///
    /// Never later than [`Policy::latest_refresh`]: a token the API server
    /// states to expire soon (its clock behind ours) would otherwise stop
    /// being usable before its 80 % point, with no refresh tried while it
    /// could still be served.
    pub(crate) fn refresh_after(&self, lifetime: Duration, jitter: f64) -> Duration {
        let jitter = jitter.clamp(0.0, 1.0);
        let fraction = (self.refresh_fraction - self.jitter_fraction * jitter).max(0.0);
        lifetime
            .mul_f64(fraction)
            .min(self.latest_refresh(lifetime))
    }

    /// The latest refresh point of a token of `lifetime`: one
    /// [`Policy::expiry_margin`] before it stops being usable, or, for a
    /// short one, the refresh fraction of its usable time, so that retries
    /// always fit before the end. Above 300 s of lifetime it is later than
    /// the 80 % point (no effect on tokens of the lifetimes one may ask for).
    fn latest_refresh(&self, lifetime: Duration) -> Duration {
        let usable = self.usable_for(lifetime);
        usable
            .saturating_sub(self.expiry_margin)
            .max(usable.mul_f64(self.refresh_fraction))
    }

    /// For how long, after receipt, a token of `lifetime` may be handed out.
    /// Zero means the token is useless.
    pub(crate) fn usable_for(&self, lifetime: Duration) -> Duration {
        lifetime.saturating_sub(self.expiry_margin)
    }

    /// How long to wait before retry number `attempt` (0 for the first
    /// retry) after a failure; `retry_after` is the server's hint.
    pub(crate) fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .min_backoff
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff);
        match retry_after {
            Some(hint) => exponential.max(hint.min(self.max_retry_after)),
            None => exponential,
        }
    }
}

impl Policy {
    /// For how long, after failure number `attempt` (0 for the first) of a
    /// TokenRequest for an audience without a usable token, requests for
    /// that audience get the failure at once. `None`: no window.
    ///
    /// - 429: `Retry-After` (at least the exponential backoff), capped at
    ///   [`Policy::max_failure_window`];
    /// - 5xx, timeout, connection failure: exponential backoff (1 s, 2 s,
    ///   4 s, ...) capped at [`Policy::max_failure_window`];
    /// - 401, 403, 404, 400/422, other statuses, an unusable answer:
    ///   [`Policy::refusal_window`], so requests stop hammering a refusal;
    /// - the proxy's own in-flight limit (including a TokenRequest cut short
    ///   by waiting for a slot) and an abandoned mint: none (the API server
    ///   said nothing).
    pub(crate) fn failure_window(&self, attempt: u32, error: &Error) -> Option<Duration> {
        match error {
            Error::RateLimited { retry_after } => Some(
                self.backoff(attempt, *retry_after)
                    .min(self.max_failure_window),
            ),
            Error::Server { .. } | Error::Timeout(_) | Error::Transport(_) => {
                Some(self.backoff(attempt, None).min(self.max_failure_window))
            }
            Error::Unauthorized
            | Error::Forbidden
            | Error::NotFound
            | Error::Invalid { .. }
            | Error::Unexpected { .. }
            | Error::BadResponse(_) => Some(self.refusal_window),
            Error::Busy { .. } | Error::Abandoned | Error::BackingOff { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn refresh_at_eighty_percent_minus_jitter() {
        let p = Policy::default();
        assert_eq!(p.refresh_after(HOUR, 0.0), Duration::from_secs(2880));
        assert_eq!(p.refresh_after(HOUR, 1.0), Duration::from_secs(2700));
        let jittered = p.refresh_after(HOUR, 0.5);
        assert!(jittered < Duration::from_secs(2880) && jittered > Duration::from_secs(2700));
        // Out-of-range jitter is clamped rather than trusted.
        assert_eq!(p.refresh_after(HOUR, -3.0), Duration::from_secs(2880));
        assert_eq!(p.refresh_after(HOUR, 7.0), Duration::from_secs(2700));
    }

    #[test]
    fn usable_until_thirty_seconds_before_expiry() {
        let p = Policy::default();
        assert_eq!(p.usable_for(HOUR), Duration::from_secs(3570));
        assert_eq!(p.usable_for(Duration::from_secs(30)), Duration::ZERO);
        assert_eq!(p.usable_for(Duration::from_secs(5)), Duration::ZERO);
    }

    #[test]
    fn refresh_always_happens_while_the_token_is_still_usable() {
        let p = Policy::default();
        for secs in [600u64, 601, 3600, 86_400, 172_800] {
            let lifetime = Duration::from_secs(secs);
            for jitter in [0.0, 0.5, 0.999] {
                assert!(p.refresh_after(lifetime, jitter) < p.usable_for(lifetime));
            }
        }
    }

    #[test]
    fn a_short_lifetime_is_refreshed_while_still_usable() {
        let p = Policy::default();
        // A token stated to live 40 s (the API server's clock behind ours):
        // usable for 10 s, refreshed after 8 s, not at 32 s.
        let secs = |d: Duration| d.as_secs_f64();
        assert_eq!(secs(p.refresh_after(Duration::from_secs(40), 0.0)), 8.0);
        assert_eq!(secs(p.refresh_after(Duration::from_secs(100), 0.5)), 56.0);
        for secs in 31u64..=600 {
            let lifetime = Duration::from_secs(secs);
            for jitter in [0.0, 0.5, 0.999] {
                let at = p.refresh_after(lifetime, jitter);
                let usable = p.usable_for(lifetime);
                assert!(
                    at < usable,
                    "{secs} s: refresh at {at:?}, usable {usable:?}"
                );
                // Room for retries: 30 s, or a fifth of a short usable time.
                let room = (usable / 5).min(p.expiry_margin);
                assert!(usable - at >= room - Duration::from_millis(1), "{secs} s");
            }
        }
        // Lifetimes one may ask for (>= 600 s) keep the 80 % rule exactly.
        assert_eq!(
            p.refresh_after(Duration::from_secs(600), 0.0),
            Duration::from_secs(480)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = Policy::default();
        let secs: Vec<u64> = (0..9).map(|a| p.backoff(a, None).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(p.backoff(u32::MAX, None), p.max_backoff);
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let p = Policy::default();
        assert_eq!(
            p.backoff(0, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        // Never shorter than our own backoff.
        assert_eq!(
            p.backoff(5, Some(Duration::from_secs(1))),
            Duration::from_secs(32)
        );
        // A huge hint is clamped.
        assert_eq!(
            p.backoff(0, Some(Duration::from_secs(86_400))),
            p.max_retry_after
        );
    }

    #[test]
    fn failure_windows() {
        let p = Policy::default();
        let limited = |secs| Error::RateLimited {
            retry_after: Some(Duration::from_secs(secs)),
        };
        let window = |attempt, error: &Error| p.failure_window(attempt, error).map(|d| d.as_secs());
        // Retry-After is honoured, never below our own backoff, capped at 60 s.
        assert_eq!(window(0, &limited(5)), Some(5));
        assert_eq!(window(4, &limited(5)), Some(16));
        assert_eq!(window(0, &limited(3600)), Some(60));
        assert_eq!(
            window(2, &Error::RateLimited { retry_after: None }),
            Some(4)
        );
        // Transient failures back off exponentially up to 60 s.
        let transient = [
            Error::Server { status: 503 },
            Error::Timeout(Duration::from_secs(4)),
            Error::Transport("refused".into()),
        ];
        for error in &transient {
            let secs: Vec<_> = (0..8).map(|a| window(a, error).unwrap()).collect();
            assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60], "{error}");
        }
        // Refusals get a short fixed window.
        for error in [
            Error::Unauthorized,
            Error::Forbidden,
            Error::NotFound,
            Error::Invalid { status: 422 },
            Error::Unexpected { status: 302 },
            Error::BadResponse("x"),
        ] {
            assert_eq!(window(0, &error), Some(5), "{error}");
            assert_eq!(window(9, &error), Some(5), "{error}");
        }
        // Our own limit is no reason to stop asking.
        let busy = Error::Busy {
            limit: 8,
            timeout: Duration::from_secs(4),
        };
        assert_eq!(window(0, &busy), None);
        assert_eq!(window(0, &Error::Abandoned), None);
    }
}
