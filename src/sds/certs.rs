//! Leaf certificates per secret name: which names may be minted, the minted
//! secrets (cached, coalesced, rotated), and the bound on names held.
//!
//! A secret name is the SNI Envoy saw (the SNI certificate mapper), or
//! [`NO_SNI_SECRET`] for a client that sent none; that one is answered with a
//! certificate whose SANs are the intercepted IP addresses.
//!
//! Names are normalised before they become a cache key or take a slot: a
//! DNS name in lower case without its trailing dot, an IP address in its
//! canonical form. `A.Example.com.` and `a.example.com` share one leaf and
//! one `--max-certificates` slot; each is still answered under the exact
//! name it was asked for (Envoy matches a secret by that name). Envoy
//! keeps one secret (and one stream) per exact name, so the spellings
//! beyond each name's first are bounded too (see [`slots`]).
//!
//! Every SDS path goes through a [`Slot`]: a leaf is only minted or served
//! for a name that holds one, so delta, state-of-the-world and fetch all
//! count against `--max-certificates`.
//!
//! Minting (key generation and signing) is CPU work of about a millisecond:
//! it runs on tokio's blocking pool, never on the async runtime, whose one
//! worker thread (`--worker-threads 1`) also answers every ext_proc stream.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::ca::CertificateAuthority;
use crate::intercept::{Host, InterceptHosts};
use crate::secret::Redacted;

/// The secret name Envoy's SNI mapper uses for clients without SNI
/// (`default_value` in the shipped config). It is checked before any name
/// parsing, so a client that sends it as its SNI gets the same certificate
/// as a client without SNI: one for the intercepted IPs only.
pub(crate) const NO_SNI_SECRET: &str = "_kube-audience-proxy-no-sni";

/// The soonest a leaf is re-minted after it was minted. Rotation happens
/// after two thirds of a leaf's life; a leaf cut short by a CA near its end
/// (a leaf never outlives its CA) would otherwise be re-minted and pushed
/// ever sooner, and without pause once the CA has expired.
pub(crate) const MIN_ROTATION: Duration = Duration::from_secs(60);

/// Why a name is not minted. Refusals are counted and logged (names are not
/// secret), never signed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The name is not matched by `--intercept-host`.
    #[error("not an intercepted host")]
    NotIntercepted,
    /// An SNI-less client, but no IP address is intercepted.
    #[error("no SNI and no intercepted IP address")]
    NoSniNoIps,
    /// The name is not a host name or IP address.
    #[error("not a host name")]
    InvalidName,
    /// `--max-certificates` names are held already.
    #[error("too many certificates held (--max-certificates)")]
    TooMany,
    /// A new spelling (case, trailing dot) of a held name, but the bound on
    /// spellings beyond each name's first is reached (see [`slots`]).
    #[error(
        "too many spellings of held names (case or trailing-dot variants: {per} per --max-certificates, at least {min})",
        per = slots::VARIANTS_PER_CERTIFICATE,
        min = slots::MIN_VARIANTS
    )]
    TooManyVariants,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Mint(String),
}

/// A minted leaf, shared by every name that normalises to `key`. The
/// certificate holds the private key, so it is [`Redacted`] and the derived
/// `Debug` never shows it.
#[derive(Debug)]
pub(crate) struct Minted {
    /// Version (changes with every mint).
    pub version: String,
    /// When to mint a successor and push it: two thirds of the validity,
    /// at least [`MIN_ROTATION`] from the mint.
    pub rotate_at: Instant,
    tls: Redacted<TlsCertificate>,
}

impl Minted {
    /// As a delta xDS resource named `name` (the name as requested).
    pub(crate) fn resource(&self, name: &str) -> Resource {
        Resource {
            name: name.to_owned(),
            version: self.version.clone(),
            resource: Some(self.any(name)),
            ..Default::default()
        }
    }

    /// As a `Secret` named `name` (the name as requested: Envoy refuses a
    /// secret whose name is not the one it subscribed to).
    pub(crate) fn any(&self, name: &str) -> Any {
        let secret = Secret {
            name: name.to_owned(),
            r#type: Some(secret::Type::TlsCertificate(
                self.tls.expose_secret().clone(),
            )),
        };
        Any {
            type_url: Secret::type_url(),
            value: secret.encode_to_vec(),
        }
    }
}

/// Counters for refused and minted names.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Names refused.
    pub refused: AtomicU64,
    /// Leaves signed.
    pub minted: AtomicU64,
    /// The same events, by reason, and the open SDS streams, for `/metrics`.
    pub metrics: super::metrics::CertMetrics,
}

/// Called on the signing thread before each leaf is signed: lets a unit
/// test see where signing runs, hold it, or make it panic.
#[cfg(test)]
type SignHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The leaf store.
pub(crate) struct Certificates {
    /// Shared with the signing tasks on the blocking pool.
    ca: Arc<CertificateAuthority>,
    hosts: InterceptHosts,
    /// Leaves by normalised name. Only held names are minted, and names
    /// whose last slot went are dropped before the next mint (see
    /// [`Certificates::forget_released`]), so the cache holds the held
    /// names' leaves and never evicts (or refuses to admit) one, which
    /// would split one name over several leaves. Its bound is a backstop
    /// with room for the released names another task is about to drop.
    cache: moka::future::Cache<String, Arc<Minted>>,
    validity: Duration,
    /// The names and spellings held, and those released since the last
    /// mint, under one lock (see [`slots`]).
    held: Mutex<slots::Held>,
    versions: AtomicU64,
    /// Bounds the signing tasks in flight (see [`signers`]).
    signers: Arc<Semaphore>,
    /// Names refused and leaves signed (read by tests; metrics will).
    pub counters: Counters,
    #[cfg(test)]
    before_sign: Option<SignHook>,
}

/// How many leaves may be signed at once: one per CPU. Signing is pure CPU
/// work, so more signers than cores would only queue in the kernel; and the
/// bound keeps a burst of new names (or callers that give up and retry)
/// from growing tokio's blocking pool towards its 512 threads.
fn signers() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// A normalised secret name and the SANs of its leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LeafName {
    /// Lower-case DNS name without the trailing dot, canonical IP address,
    /// or [`NO_SNI_SECRET`].
    key: String,
    dns: Option<String>,
    ips: Vec<IpAddr>,
}

/// A name held against `--max-certificates` (see [`Certificates::hold`]);
/// released on drop. Every slot on one normalised name counts once; every
/// exact spelling once against the bound on spellings.
pub(crate) struct Slot<'a> {
    certs: &'a Certificates,
    leaf: LeafName,
    /// The name as asked for.
    exact: String,
}

impl<'a> Slot<'a> {
    /// The store this slot is held in.
    pub(crate) fn certs(&self) -> &'a Certificates {
        self.certs
    }

    /// The normalised name this slot holds.
    #[cfg(test)]
    pub(crate) fn key(&self) -> &str {
        &self.leaf.key
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.certs.lock_held().release(&self.leaf.key, &self.exact);
    }
}

/// Seconds after the mint at which a leaf living `lifetime` is rotated:
/// two thirds of its life, never less than [`MIN_ROTATION`].
pub(crate) fn rotation_delay(lifetime: Duration) -> Duration {
    lifetime.mul_f64(2.0 / 3.0).max(MIN_ROTATION)
}

impl Certificates {
    /// A store minting from `ca` for `hosts`; at most `max_names`
    /// (normalised) names are held at once; leaves live `validity`, or less
    /// when the CA ends sooner.
    pub(crate) fn new(
        ca: CertificateAuthority,
        hosts: InterceptHosts,
        validity: Duration,
        max_names: usize,
    ) -> Certificates {
        Certificates {
            ca: Arc::new(ca),
            hosts,
            cache: moka::future::Cache::builder()
                .max_capacity(u64::try_from(max_names.saturating_mul(2)).unwrap_or(u64::MAX))
                .build(),
            validity,
            held: Mutex::new(slots::Held::new(max_names)),
            versions: AtomicU64::new(0),
            signers: Arc::new(Semaphore::new(signers())),
            counters: Counters::default(),
            #[cfg(test)]
            before_sign: None,
        }
    }

    /// When the CA ends (whole seconds, as signed).
    pub(crate) fn ca_not_after(&self) -> SystemTime {
        self.ca.not_after()
    }

    /// The held names. A panic elsewhere while holding the lock cannot
    /// leave them half-updated (every update is one step), so a poisoned
    /// lock is used as is.
    fn lock_held(&self) -> std::sync::MutexGuard<'_, slots::Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds `name` against `--max-certificates`: a name whose normalised
    /// form is held already shares its slot (a new spelling of it needs
    /// room under the bound on spellings); a new one needs a free slot.
    /// Refuses names that may not be minted. Refusals are counted and
    /// logged.
    pub(crate) fn hold(&self, name: &str) -> Result<Slot<'_>, Refusal> {
        let result = self.hold_inner(name);
        if let Err(refusal) = &result {
            self.refused(name, refusal);
        }
        result
    }

    fn hold_inner(&self, name: &str) -> Result<Slot<'_>, Refusal> {
        let leaf = self.leaf_name(name)?;
        self.lock_held().admit(&leaf.key, name)?;
        Ok(Slot {
            certs: self,
            leaf,
            exact: name.to_owned(),
        })
    }

    /// Counts and logs a refusal.
    pub(crate) fn refused(&self, name: &str, refusal: &Refusal) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        self.counters.metrics.refused(refusal);
        tracing::info!(name, %refusal, "refused a certificate");
    }

    /// The current leaf for the name `slot` holds, minted if absent or due
    /// for rotation. Concurrent requests for one name share one mint.
    pub(crate) async fn get(&self, slot: &Slot<'_>) -> Result<Arc<Minted>, Refusal> {
        let result = self.get_inner(&slot.leaf).await;
        if let Err(refusal) = &result {
            self.refused(&slot.leaf.key, refusal);
        }
        result
    }

    async fn get_inner(&self, leaf: &LeafName) -> Result<Arc<Minted>, Refusal> {
        self.forget_released().await;
        let key = leaf.key.as_str();
        if let Some(minted) = self.cache.get(key).await {
            if Instant::now() < minted.rotate_at {
                return Ok(minted);
            }
            crate::moka_ext::remove_if_same(&self.cache, key, &minted).await;
        }
        self.cache
            .try_get_with_by_ref(key, async {
                let minted = self.mint(leaf.clone()).await?;
                self.counters.minted.fetch_add(1, Ordering::Relaxed);
                self.counters.metrics.minted();
                tracing::debug!(name = key, version = %minted.version, "minted a leaf certificate");
                Ok::<_, Refusal>(Arc::new(minted))
            })
            .await
            .map_err(|e| (*e).clone())
    }

    /// Drops the cached leaves of names no longer held. A name held again
    /// since is kept (or, when held again while this runs, dropped and
    /// minted anew: harmless).
    async fn forget_released(&self) {
        let released = self.lock_held().take_released();
        for key in released {
            self.cache.invalidate(&key).await;
        }
    }

    /// The normalised name and SANs of the leaf for `name`, if it may be
    /// minted.
    fn leaf_name(&self, name: &str) -> Result<LeafName, Refusal> {
        if name == NO_SNI_SECRET {
            let ips = self.hosts.ips();
            if ips.is_empty() {
                return Err(Refusal::NoSniNoIps);
            }
            return Ok(LeafName {
                key: NO_SNI_SECRET.to_owned(),
                dns: None,
                ips,
            });
        }
        let host = Host::parse(name).ok_or(Refusal::InvalidName)?;
        if !self.hosts.matches(&host) {
            return Err(Refusal::NotIntercepted);
        }
        Ok(match host {
            Host::Name(dns) => {
                let dns = dns.to_ascii_lowercase();
                LeafName {
                    key: dns.clone(),
                    dns: Some(dns),
                    ips: Vec::new(),
                }
            }
            Host::Ip(ip) => LeafName {
                key: ip.to_string(),
                dns: None,
                ips: vec![ip],
            },
        })
    }

    /// Signs a leaf for `leaf` on the blocking pool. The caller (one per
    /// name, see [`Certificates::get`]) waits without holding the runtime's
    /// worker.
    async fn mint(&self, leaf: LeafName) -> Result<Minted, Refusal> {
        // The permit moves into the task: a caller that goes away (its
        // stream closed) leaves its signing task running, and holding the
        // permit there keeps such orphans counted, so callers that retry
        // cannot pile up more signers than the bound.
        let permit = self
            .signers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::Mint("the signing pool is closed".into()))?;
        let ca = self.ca.clone();
        let validity = self.validity;
        let LeafName { key, dns, ips } = leaf;
        #[cfg(test)]
        let before_sign = self.before_sign.clone();
        #[cfg(test)]
        let hook_name = key.clone();
        let signed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            #[cfg(test)]
            if let Some(hook) = before_sign {
                hook(&hook_name);
            }
            sign(&ca, dns.as_deref(), &ips, validity)
        })
        .await;
        let (tls, not_after) = match signed {
            Ok(signed) => signed?,
            // The reason only: a panic's message is not ours to repeat.
            Err(join) if join.is_panic() => {
                return Err(Refusal::Mint("the signing task panicked".into()));
            }
            Err(_) => return Err(Refusal::Mint("the signing task was cancelled".into())),
        };
        let now = SystemTime::now();
        let lifetime = not_after.duration_since(now).unwrap_or(Duration::ZERO);
        if not_after >= self.ca.not_after() {
            tracing::warn!(
                name = %key,
                ca_expires = %humantime::format_rfc3339_seconds(self.ca.not_after()),
                lifetime = %humantime::format_duration(Duration::from_secs(lifetime.as_secs())),
                "the interception CA ends before --certificate-validity: leaves end with it; replace the CA"
            );
        }
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Minted {
            version: version.to_string(),
            rotate_at: Instant::now() + rotation_delay(lifetime),
            tls: Redacted::new(tls),
        })
    }
}

/// Blocking: generates a leaf key and signs the leaf. Returns the chain and
/// key as Envoy takes them, with the leaf's end of validity.
fn sign(
    ca: &CertificateAuthority,
    dns: Option<&str>,
    ips: &[IpAddr],
    validity: Duration,
) -> Result<(TlsCertificate, SystemTime), Refusal> {
    let dns: Vec<&str> = dns.into_iter().collect();
    let leaf = ca
        .mint_leaf(&dns, ips, validity, SystemTime::now())
        .map_err(|e| Refusal::Mint(e.to_string()))?;
    let tls = TlsCertificate {
        certificate_chain: Some(inline(leaf.chain_pem.into_bytes())),
        private_key: Some(inline(leaf.key.expose_secret().as_bytes().to_vec())),
        ..Default::default()
    };
    Ok((tls, leaf.not_after))
}

fn inline(bytes: Vec<u8>) -> DataSource {
    DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..Default::default()
    }
}

/// A store for `localhost`, `*.example.com` and `127.0.0.1` with a fresh
/// CA (30 days) and one-day leaves, holding at most `max` names.
#[cfg(test)]
pub(crate) fn test_store(max: usize) -> Certificates {
    let hosts = InterceptHosts::new(["localhost", "*.example.com", "127.0.0.1"]).unwrap();
    let ca =
        CertificateAuthority::generate(&hosts, Duration::from_secs(86_400 * 30), SystemTime::now())
            .unwrap();
    Certificates::new(ca, hosts, Duration::from_secs(86_400), max)
}

/// A store like [`test_store`] whose CA ends at `ca_end` (soon, or in the
/// past), for the tests of a CA near its end.
#[cfg(test)]
pub(crate) fn ending_store(max: usize, ca_end: SystemTime) -> Certificates {
    let hosts = InterceptHosts::new(["localhost", "*.example.com", "127.0.0.1"]).unwrap();
    let validity = Duration::from_secs(86_400);
    let ca = CertificateAuthority::generate(&hosts, validity, ca_end - validity).unwrap();
    Certificates::new(ca, hosts, validity, max)
}

mod slots;
#[cfg(test)]
mod tests;
