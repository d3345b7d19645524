//! The names held against `--max-certificates` and against the bound on
//! their spellings: pure bookkeeping under one lock, no I/O.
//!
//! Two bounds apply:
//!
//! - at most `--max-certificates` normalised names (certificate slots); the
//!   variants of one name (`A.Example.com`, `a.example.com.`) share one;
//! - at most [`max_variants`] spellings beyond the first across all held
//!   names. Envoy subscribes to and keeps one secret per exact name, on one
//!   stream each, so a hostile upstream that sends a client to ever new
//!   case variants of one intercepted name (`metrics.monitoring.svc` has
//!   2^20) would otherwise grow Envoy and the processor without limit.
//!   Every held name's first spelling is outside this bound, so variants
//!   never keep a distinct name out; beyond it a new spelling is refused
//!   as a full cache refuses a new name.
//!
//! In all, Envoy is served at most `--max-certificates` +
//! [`max_variants`] distinct secret names at once.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use super::Refusal;

/// Spellings beyond the first allowed per `--max-certificates` slot, on
/// average: clients send one spelling of a name (browsers and Go lower-case
/// the SNI), so a few per name is generous.
pub(crate) const VARIANTS_PER_CERTIFICATE: usize = 4;

/// Spellings beyond the first allowed whatever `--max-certificates` is, so
/// a small bound still serves a name's odd spellings (the 50 case
/// variants of one name with `--max-certificates 1`).
pub(crate) const MIN_VARIANTS: usize = 64;

/// The bound on spellings beyond each held name's first, for `max_names`
/// slots: [`VARIANTS_PER_CERTIFICATE`] per slot, at least [`MIN_VARIANTS`].
pub(crate) fn max_variants(max_names: usize) -> usize {
    max_names
        .saturating_mul(VARIANTS_PER_CERTIFICATE)
        .max(MIN_VARIANTS)
}

/// The held names, with every exact spelling of each and its holders, and
/// the names whose last holder went (for the leaf cache to forget). One
/// value behind one lock, so releasing a name and recording it as released
/// are one step: no admission can fall between them.
#[derive(Debug)]
pub(super) struct Held {
    max_names: usize,
    max_variants: usize,
    /// Normalised name -> exact spelling -> holders (never empty).
    names: HashMap<String, HashMap<String, usize>>,
    /// Spellings beyond the first of each name: `Σ (spellings - 1)`.
    variants: usize,
    /// Names whose last holder went since the last [`Held::take_released`].
    released: Vec<String>,
}

impl Held {
    /// Nothing held; at most `max_names` names, and [`max_variants`] of
    /// that spellings beyond the first.
    pub(super) fn new(max_names: usize) -> Held {
        Held {
            max_names,
            max_variants: max_variants(max_names),
            names: HashMap::new(),
            variants: 0,
            released: Vec::new(),
        }
    }

    /// One more holder of `exact`, a spelling of the normalised `key`.
    pub(super) fn admit(&mut self, key: &str, exact: &str) -> Result<(), Refusal> {
        let names = self.names.len();
        match self.names.get_mut(key) {
            Some(spellings) => match spellings.entry(exact.to_owned()) {
                Entry::Occupied(mut holders) => *holders.get_mut() += 1,
                Entry::Vacant(_) if self.variants >= self.max_variants => {
                    return Err(Refusal::TooManyVariants);
                }
                Entry::Vacant(spelling) => {
                    spelling.insert(1);
                    self.variants += 1;
                }
            },
            None if names >= self.max_names => return Err(Refusal::TooMany),
            None => {
                self.names
                    .insert(key.to_owned(), HashMap::from([(exact.to_owned(), 1)]));
            }
        }
        Ok(())
    }

    /// One holder of `exact` (admitted for `key`) fewer. The last holder of
    /// a spelling frees it; the last of a name frees its slot and records
    /// the name as released.
    pub(super) fn release(&mut self, key: &str, exact: &str) {
        let Some(spellings) = self.names.get_mut(key) else {
            return;
        };
        let Some(holders) = spellings.get_mut(exact) else {
            return;
        };
        *holders -= 1;
        if *holders > 0 {
            return;
        }
        spellings.remove(exact);
        if spellings.is_empty() {
            self.names.remove(key);
            self.released.push(key.to_owned());
        } else {
            self.variants -= 1;
        }
    }

    /// Whether `key` is held.
    #[cfg(test)]
    pub(super) fn contains(&self, key: &str) -> bool {
        self.names.contains_key(key)
    }

    /// The names released since the last call that are not held again.
    pub(super) fn take_released(&mut self) -> Vec<String> {
        let mut released = std::mem::take(&mut self.released);
        released.retain(|key| !self.names.contains_key(key));
        released
    }

    /// Held names and spellings beyond the first.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.names.len(), self.variants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variant_bound_scales_with_the_slots_and_has_a_floor() {
        assert_eq!(max_variants(1), MIN_VARIANTS);
        assert_eq!(max_variants(16), MIN_VARIANTS);
        assert_eq!(max_variants(100), 400);
        assert_eq!(max_variants(usize::MAX), usize::MAX);
    }

    #[test]
    fn spellings_beyond_the_bound_are_refused_but_never_a_new_name() {
        let mut held = Held::new(2);
        held.admit("a.example", "a.example").unwrap();
        for i in 0..MIN_VARIANTS {
            held.admit("a.example", &format!("{i}")).unwrap();
        }
        assert_eq!(held.counts(), (1, MIN_VARIANTS));
        // A new spelling is refused; a spelling already held, and the
        // first spelling of another name, are not.
        assert_eq!(
            held.admit("a.example", "A.example"),
            Err(Refusal::TooManyVariants)
        );
        held.admit("a.example", "0").unwrap();
        held.admit("b.example", "B.example").unwrap();
        assert_eq!(
            held.admit("b.example", "b.example"),
            Err(Refusal::TooManyVariants)
        );
        assert_eq!(held.admit("c.example", "c.example"), Err(Refusal::TooMany));
        // A spelling is freed by its last holder only.
        held.release("a.example", "0");
        assert_eq!(held.counts(), (2, MIN_VARIANTS));
        held.release("a.example", "0");
        assert_eq!(held.counts(), (2, MIN_VARIANTS - 1));
        held.admit("b.example", "b.example").unwrap();
        assert!(held.take_released().is_empty());
    }

    #[test]
    fn a_name_is_released_with_its_last_spelling_in_the_same_step() {
        let mut held = Held::new(1);
        held.admit("a.example", "a.example").unwrap();
        held.admit("a.example", "A.EXAMPLE").unwrap();
        held.release("a.example", "a.example");
        assert!(held.contains("a.example"), "another spelling holds it");
        assert_eq!(held.counts(), (1, 0));
        held.release("a.example", "A.EXAMPLE");
        // Freed and recorded as released at once.
        assert!(!held.contains("a.example"));
        assert_eq!(held.released, ["a.example"]);
        held.admit("b.example", "b.example").unwrap();
        assert_eq!(held.take_released(), ["a.example"]);
        assert!(held.take_released().is_empty());
        // A name held again before the cache forgets it is kept.
        held.release("b.example", "b.example");
        held.admit("b.example", "B.example").unwrap();
        assert!(held.take_released().is_empty());
        // Releasing what is not held changes nothing.
        held.release("c.example", "c.example");
        held.release("b.example", "b.example");
        assert_eq!(held.counts(), (1, 0));
    }
}
