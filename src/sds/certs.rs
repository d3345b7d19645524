//! Leaf certificates per secret name: which names may be minted, the minted
//! secrets (cached, coalesced, rotated), and the bound on names held.
//!
//! A secret name is the SNI Envoy saw (the SNI certificate mapper), or
//! [`NO_SNI_SECRET`] for a client that sent none; that one is answered with a
//! certificate whose SANs are the intercepted IP addresses.

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
use tokio::time::Instant;

use crate::ca::CertificateAuthority;
use crate::intercept::{Host, InterceptHosts};

/// The secret name Envoy's SNI mapper uses for clients without SNI
/// (`default_value` in the shipped config). Not a valid DNS name, so it can
/// never collide with an SNI.
pub const NO_SNI_SECRET: &str = "_kube-audience-proxy-no-sni";

/// Why a name is not minted. Refusals are counted and logged (names are not
/// secret), never signed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
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

/// A minted secret, ready to send. `Debug` never shows the key.
pub struct Minted {
    /// Secret name.
    pub name: String,
    /// Version (changes with every mint).
    pub version: String,
    /// When to mint a successor and push it (2/3 of the validity).
    pub rotate_at: Instant,
    /// The encoded `Secret` (holds the private key).
    any: Any,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

impl Minted {
    /// As a delta xDS resource.
    pub fn resource(&self) -> Resource {
        Resource {
            name: self.name.clone(),
            version: self.version.clone(),
            resource: Some(self.any.clone()),
            ..Default::default()
        }
    }

    /// As a state-of-the-world resource.
    pub fn any(&self) -> Any {
        self.any.clone()
    }
}

/// Counters for refused and minted names.
#[derive(Debug, Default)]
pub struct Counters {
    /// Names refused.
    pub refused: AtomicU64,
    /// Leaves signed.
    pub minted: AtomicU64,
}

/// The leaf store.
pub struct Certificates {
    ca: CertificateAuthority,
    hosts: InterceptHosts,
    cache: moka::future::Cache<String, Arc<Minted>>,
    validity: Duration,
    max_names: usize,
    held: AtomicUsize,
    versions: AtomicU64,
    /// Counters.
    pub counters: Counters,
}

/// One subscription slot (see [`Certificates::hold`]); released on drop.
pub struct Slot<'a> {
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
    pub fn new(
        ca: CertificateAuthority,
        hosts: InterceptHosts,
        validity: Duration,
        max_names: usize,
    ) -> Certificates {
        Certificates {
            ca,
            hosts,
            cache: moka::future::Cache::builder()
                .max_capacity(u64::try_from(max_names).unwrap_or(u64::MAX))
                .build(),
            validity,
            max_names,
            held: AtomicUsize::new(0),
            versions: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// The CA certificate PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Reserves one of the `--max-certificates` subscription slots.
    pub fn hold(&self) -> Result<Slot<'_>, Refusal> {
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
    pub fn check(&self, name: &str) -> Result<(), Refusal> {
        self.leaf_names(name)
            .map(|_| ())
            .inspect_err(|refusal| self.refused(name, refusal))
    }

    /// Counts and logs a refusal.
    pub fn refused(&self, name: &str, refusal: &Refusal) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(name, %refusal, "refused a certificate");
    }

    /// The current secret for `name`, minted if absent or due for rotation.
    /// Concurrent requests for one name share one mint.
    pub async fn get(&self, name: &str) -> Result<Arc<Minted>, Refusal> {
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
                let minted = self.mint(name, dns.as_deref(), &ips)?;
                self.counters.minted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(name, version = %minted.version, "minted a leaf certificate");
                Ok::<_, Refusal>(Arc::new(minted))
            })
            .await
            .map_err(|e| (*e).clone())
    }

    /// The DNS name and IP SANs a leaf for `name` carries.
    fn leaf_names(&self, name: &str) -> Result<(Option<String>, Vec<std::net::IpAddr>), Refusal> {
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

    fn mint(
        &self,
        name: &str,
        dns: Option<&str>,
        ips: &[std::net::IpAddr],
    ) -> Result<Minted, Refusal> {
        let dns: Vec<&str> = dns.into_iter().collect();
        let leaf = self
            .ca
            .mint_leaf(&dns, ips, self.validity, SystemTime::now())
            .map_err(|e| Refusal::Mint(e.to_string()))?;
        let lifetime = leaf
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        let secret = Secret {
            name: name.to_owned(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(leaf.chain_pem.into_bytes())),
                private_key: Some(inline(leaf.key.expose_secret().as_bytes().to_vec())),
                ..Default::default()
            })),
        };
        Ok(Minted {
            name: name.to_owned(),
            version: version.to_string(),
            rotate_at: Instant::now() + lifetime.mul_f64(2.0 / 3.0),
            any: Any {
                type_url: Secret::type_url(),
                value: secret.encode_to_vec(),
            },
        })
    }
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
        assert!(!format!("{a:?}").contains("PRIVATE"));
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
