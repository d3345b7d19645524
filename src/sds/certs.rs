//! Leaf certificates per secret name: which names may be minted, the minted
//! secrets (cached, coalesced, rotated), and the bound on names held.
//!
//! A secret name is the SNI Envoy saw (the SNI certificate mapper), or
//! [`NO_SNI_SECRET`] for a client that sent none; that one is answered with a
//! certificate whose SANs are the intercepted IP addresses.
//!
//! Minting (key generation and signing) is CPU work of about a millisecond:
//! it runs on tokio's blocking pool, never on the async runtime, whose one
//! worker thread (`--worker-threads 1`) also answers every ext_proc stream.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Signing failed.
    #[error("signing failed: {0}")]
    Mint(String),
}

/// A minted secret, ready to send. The encoded `Secret` holds the private
/// key, so it is [`Redacted`] and the derived `Debug` never shows it.
#[derive(Debug)]
pub(crate) struct Minted {
    /// The SNI, or [`NO_SNI_SECRET`].
    pub name: String,
    /// Version (changes with every mint).
    pub version: String,
    /// When to mint a successor and push it (2/3 of the validity).
    pub rotate_at: Instant,
    secret: Redacted<Any>,
}

impl Minted {
    /// As a delta xDS resource.
    pub(crate) fn resource(&self) -> Resource {
        Resource {
            name: self.name.clone(),
            version: self.version.clone(),
            resource: Some(self.any()),
            ..Default::default()
        }
    }

    /// As a state-of-the-world resource.
    pub(crate) fn any(&self) -> Any {
        self.secret.expose_secret().clone()
    }
}

/// Counters for refused and minted names.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Names refused.
    pub refused: AtomicU64,
    /// Leaves signed.
    pub minted: AtomicU64,
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
    cache: moka::future::Cache<String, Arc<Minted>>,
    validity: Duration,
    max_names: usize,
    held: AtomicUsize,
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

/// One subscription slot (see [`Certificates::hold`]); released on drop.
pub(crate) struct Slot<'a> {
    certs: &'a Certificates,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.certs.held.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Certificates {
    /// A store minting from `ca` for `hosts`; at most `max_names` names are
    /// cached or subscribed at once; leaves live `validity`.
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
                .max_capacity(u64::try_from(max_names).unwrap_or(u64::MAX))
                .build(),
            validity,
            max_names,
            held: AtomicUsize::new(0),
            versions: AtomicU64::new(0),
            signers: Arc::new(Semaphore::new(signers())),
            counters: Counters::default(),
            #[cfg(test)]
            before_sign: None,
        }
    }

    /// Reserves one of the `--max-certificates` subscription slots.
    pub(crate) fn hold(&self) -> Result<Slot<'_>, Refusal> {
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            if held >= self.max_names {
                return Err(Refusal::TooMany);
            }
            match self
                .held
                .compare_exchange(held, held + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(Slot { certs: self }),
                Err(now) => held = now,
            }
        }
    }

    /// Whether `name` may be minted (without minting it); a refusal is
    /// counted and logged.
    pub(crate) fn check(&self, name: &str) -> Result<(), Refusal> {
        self.leaf_names(name)
            .map(|_| ())
            .inspect_err(|refusal| self.refused(name, refusal))
    }

    /// Counts and logs a refusal.
    pub(crate) fn refused(&self, name: &str, refusal: &Refusal) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(name, %refusal, "refused a certificate");
    }

    /// The current secret for `name`, minted if absent or due for rotation.
    /// Concurrent requests for one name share one mint.
    pub(crate) async fn get(&self, name: &str) -> Result<Arc<Minted>, Refusal> {
        let result = self.get_inner(name).await;
        if let Err(refusal) = &result {
            self.refused(name, refusal);
        }
        result
    }

    async fn get_inner(&self, name: &str) -> Result<Arc<Minted>, Refusal> {
        let (dns, ips) = self.leaf_names(name)?;
        if let Some(minted) = self.cache.get(name).await {
            if Instant::now() < minted.rotate_at {
                return Ok(minted);
            }
            crate::moka_ext::remove_if_same(&self.cache, name, &minted).await;
        }
        self.cache
            .try_get_with_by_ref(name, async {
                let minted = self.mint(name, dns, ips).await?;
                self.counters.minted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(name, version = %minted.version, "minted a leaf certificate");
                Ok::<_, Refusal>(Arc::new(minted))
            })
            .await
            .map_err(|e| (*e).clone())
    }

    /// The DNS name and IP SANs a leaf for `name` carries.
    fn leaf_names(&self, name: &str) -> Result<(Option<String>, Vec<IpAddr>), Refusal> {
        if name == NO_SNI_SECRET {
            let ips = self.hosts.ips();
            return if ips.is_empty() {
                Err(Refusal::NoSniNoIps)
            } else {
                Ok((None, ips))
            };
        }
        let host = Host::parse(name).ok_or(Refusal::InvalidName)?;
        if !self.hosts.matches(&host) {
            return Err(Refusal::NotIntercepted);
        }
        match host {
            Host::Name(dns) => Ok((Some(dns.to_ascii_lowercase()), Vec::new())),
            Host::Ip(ip) => Ok((None, vec![ip])),
        }
    }

    /// Signs a leaf for `dns`/`ips` on the blocking pool and wraps it as the
    /// secret `name`. The caller (one per name, see [`Certificates::get`])
    /// waits without holding the runtime's worker.
    async fn mint(
        &self,
        name: &str,
        dns: Option<String>,
        ips: Vec<IpAddr>,
    ) -> Result<Minted, Refusal> {
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
        let secret_name = name.to_owned();
        #[cfg(test)]
        let before_sign = self.before_sign.clone();
        let signed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            #[cfg(test)]
            if let Some(hook) = before_sign {
                hook(&secret_name);
            }
            sign(&ca, &secret_name, dns.as_deref(), &ips, validity)
        })
        .await;
        let (secret, not_after) = match signed {
            Ok(signed) => signed?,
            // The reason only: a panic's message is not ours to repeat.
            Err(join) if join.is_panic() => {
                return Err(Refusal::Mint("the signing task panicked".into()));
            }
            Err(_) => return Err(Refusal::Mint("the signing task was cancelled".into())),
        };
        let lifetime = not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Minted {
            name: name.to_owned(),
            version: version.to_string(),
            rotate_at: Instant::now() + lifetime.mul_f64(2.0 / 3.0),
            secret: Redacted::new(secret),
        })
    }
}

/// Blocking: generates a leaf key, signs the leaf and encodes the `Secret`
/// named `name` that carries both. Returns it with the leaf's end of
/// validity.
fn sign(
    ca: &CertificateAuthority,
    name: &str,
    dns: Option<&str>,
    ips: &[IpAddr],
    validity: Duration,
) -> Result<(Any, SystemTime), Refusal> {
    let dns: Vec<&str> = dns.into_iter().collect();
    let leaf = ca
        .mint_leaf(&dns, ips, validity, SystemTime::now())
        .map_err(|e| Refusal::Mint(e.to_string()))?;
    let secret = Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(leaf.chain_pem.into_bytes())),
            private_key: Some(inline(leaf.key.expose_secret().as_bytes().to_vec())),
            ..Default::default()
        })),
    };
    let any = Any {
        type_url: Secret::type_url(),
        value: secret.encode_to_vec(),
    };
    Ok((any, leaf.not_after))
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

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_store as store;
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;

    #[tokio::test]
    async fn mints_only_intercepted_names_and_caches_them() {
        let certs = store(10);
        let a = certs.get("a.example.com").await.unwrap();
        let again = certs.get("A.Example.com").await;
        assert!(again.is_ok());
        assert!(Arc::ptr_eq(&a, &certs.get("a.example.com").await.unwrap()));
        assert_eq!(
            certs.counters.minted.load(Ordering::Relaxed),
            2,
            "names are cached as given"
        );
        assert!(certs.get("127.0.0.1").await.is_ok());
        assert!(certs.get(NO_SNI_SECRET).await.is_ok());
        for (name, refusal) in [
            ("example.com", Refusal::NotIntercepted),
            ("evil.test", Refusal::NotIntercepted),
            ("10.0.0.1", Refusal::NotIntercepted),
            ("not a name", Refusal::InvalidName),
        ] {
            assert_eq!(certs.get(name).await.unwrap_err(), refusal, "{name}");
        }
        assert_eq!(certs.counters.refused.load(Ordering::Relaxed), 4);

        // Debug shows the name, never the key: neither the PEM text nor the
        // encoded secret's bytes.
        let shown = format!("{a:?}");
        assert!(shown.contains("a.example.com"), "{shown}");
        let secret = Secret::decode(a.any().value.as_slice()).unwrap();
        let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
            panic!("not a TLS certificate")
        };
        let Some(Specifier::InlineBytes(key)) = tls.private_key.unwrap().specifier else {
            panic!("no inline key")
        };
        let key = String::from_utf8(key).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(!shown.contains(key.lines().nth(1).unwrap()), "{shown}");
        let value = format!("{:?}", a.any().value);
        assert!(!shown.contains(&value[1..40]), "{shown}");
    }

    /// A hook that reports the signing thread once, then holds the signer
    /// until released (bounded, so a broken build fails rather than hangs).
    fn held_signer() -> (
        SignHook,
        tokio::sync::oneshot::Receiver<std::thread::ThreadId>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
        let entered_tx = std::sync::Mutex::new(Some(entered_tx));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let hook: SignHook = Arc::new(move |_name| {
            if let Some(tx) = entered_tx.lock().unwrap().take() {
                let _ = tx.send(std::thread::current().id());
            }
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(10));
        });
        (hook, entered_rx, release_tx)
    }

    const DEADLINE: Duration = Duration::from_secs(10);

    // A current-thread runtime: the test's own thread is the only worker, so
    // a mint that ran on the runtime would block everything below.
    #[tokio::test(flavor = "current_thread")]
    async fn signing_runs_off_the_runtime_and_is_shared_per_name() {
        let mut certs = store(10);
        let (hook, entered, release) = held_signer();
        certs.before_sign = Some(hook);
        let certs = Arc::new(certs);
        let runtime_thread = std::thread::current().id();

        let first = tokio::spawn({
            let certs = certs.clone();
            async move { certs.get("a.example.com").await }
        });
        let signer_thread = tokio::time::timeout(DEADLINE, entered)
            .await
            .expect("signing started")
            .unwrap();
        assert_ne!(signer_thread, runtime_thread, "signing is off the runtime");

        // While the signer is held: a second caller for the same name joins
        // the mint in flight, and the runtime still runs other work (a name
        // refused without signing, another task).
        let second = tokio::spawn({
            let certs = certs.clone();
            async move { certs.get("a.example.com").await }
        });
        assert_eq!(
            tokio::time::timeout(DEADLINE, certs.get("evil.test"))
                .await
                .expect("the runtime answers while a mint is held")
                .unwrap_err(),
            Refusal::NotIntercepted
        );
        let other = tokio::spawn(async { "answered" });
        assert_eq!(
            tokio::time::timeout(DEADLINE, other)
                .await
                .expect("other tasks run while a mint is held")
                .unwrap(),
            "answered"
        );
        assert!(!first.is_finished());

        release.send(()).unwrap();
        let first = tokio::time::timeout(DEADLINE, first)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let second = tokio::time::timeout(DEADLINE, second)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_signer_is_a_refusal() {
        let mut certs = store(10);
        certs.signers = Arc::new(Semaphore::new(1));
        certs.before_sign = Some(Arc::new(|name| {
            assert_ne!(name, "boom.example.com", "a deliberate signing panic");
        }));
        assert_eq!(
            certs.get("boom.example.com").await.unwrap_err(),
            Refusal::Mint("the signing task panicked".into())
        );
        assert_eq!(certs.counters.refused.load(Ordering::Relaxed), 1);
        // The one signing permit came back, and the failure was not cached.
        assert!(certs.get("ok.example.com").await.is_ok());
        certs.before_sign = None;
        assert!(certs.get("boom.example.com").await.is_ok());
        assert_eq!(certs.counters.minted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn sni_less_secret_needs_an_ip() {
        let hosts = InterceptHosts::new(["localhost"]).unwrap();
        let ca =
            CertificateAuthority::generate(&hosts, Duration::from_secs(3600), SystemTime::now())
                .unwrap();
        let certs = Certificates::new(ca, hosts, Duration::from_secs(600), 10);
        assert_eq!(
            certs.get(NO_SNI_SECRET).await.unwrap_err(),
            Refusal::NoSniNoIps
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_after_two_thirds_of_the_validity() {
        let certs = store(10);
        let first = certs.get("localhost").await.unwrap();
        tokio::time::advance(Duration::from_secs(86_400 * 2 / 3 - 60)).await;
        assert_eq!(certs.get("localhost").await.unwrap().version, first.version);
        tokio::time::advance(Duration::from_secs(120)).await;
        let second = certs.get("localhost").await.unwrap();
        assert_ne!(second.version, first.version);
        assert!(second.rotate_at > first.rotate_at);
    }

    #[tokio::test]
    async fn slots_are_bounded_and_released() {
        let certs = store(2);
        let a = certs.hold().unwrap();
        let _b = certs.hold().unwrap();
        assert_eq!(certs.hold().err(), Some(Refusal::TooMany));
        drop(a);
        assert!(certs.hold().is_ok());
    }
}
