//! The interception CA: generated at startup (or loaded), it signs
//! short-lived leaf certificates for the intercepted hosts, which Envoy
//! fetches over SDS.
//!
//! The CA private key lives in this process's memory only. Only the CA
//! certificate is written to disk (`--ca-file-destination`), atomically and
//! world-readable, for the client to trust. With `--ca-key-file` and
//! `--ca-cert-file` the CA is loaded from (or, on first start, written to)
//! those files instead, so a restarted processor keeps the CA a running
//! client already trusts; such a CA is checked first (see [`check`]).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType, SerialNumber,
};

use crate::intercept::{HostPattern, InterceptHosts};
use crate::secret::{KeyPem, Redacted};

pub(crate) mod check;

/// Tolerated clock skew: certificates are valid from this long ago.
const BACKDATE: Duration = Duration::from_secs(300);

/// Where the CA comes from and goes to.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// Where the CA certificate is written for clients (`--ca-file-destination`).
    pub destination: PathBuf,
    /// Existing CA key and certificate (`--ca-key-file`, `--ca-cert-file`).
    pub persisted: Option<(PathBuf, PathBuf)>,
    /// Validity of a generated CA (`--ca-validity`).
    pub validity: Duration,
}

/// The CA could not be set up, or a leaf could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Generating or signing failed.
    #[error("cannot create a certificate: {0}")]
    Generate(rcgen::Error),
    /// A file could not be read or written.
    #[error("{action} {path}: {reason}")]
    File {
        /// What was attempted, e.g. "cannot write".
        action: &'static str,
        path: PathBuf,
        reason: std::io::Error,
    },
    /// Only one of the two persisted files exists.
    #[error(
        "--ca-key-file {key} and --ca-cert-file {cert} must both exist (to load the CA) or both be absent (to create it)"
    )]
    HalfPersisted { key: PathBuf, cert: PathBuf },
    /// The loaded files do not form a usable CA.
    #[error("the CA in {path} is unusable: {reason}")]
    Unusable {
        /// The file at fault: the key file for a key that cannot be
        /// read, else the certificate file.
        path: PathBuf,
        reason: String,
    },
    /// The loaded CA cannot serve this configuration (see [`check`]).
    #[error(
        "the CA in {path} cannot be used: {reason}; replace --ca-key-file and --ca-cert-file, or delete both to have a new CA created (clients must then trust it)"
    )]
    Refused {
        /// The certificate file.
        path: PathBuf,
        reason: String,
    },
    /// The CA's own validity ended: it signs nothing more.
    #[error("the interception CA expired at {0}")]
    Expired(String),
}

// The reason is interpolated into the message, so it is not also a
// `source` (an error chain printer would show it twice).
impl From<rcgen::Error> for CaError {
    fn from(error: rcgen::Error) -> CaError {
        CaError::Generate(error)
    }
}

/// A minted leaf: certificate chain (leaf, then CA) and its private key.
pub(crate) struct Leaf {
    /// Leaf then CA, as Envoy wants the chain.
    pub chain_pem: String,
    /// PEM private key (PKCS#8).
    pub key: KeyPem,
    pub not_after: SystemTime,
}

/// The CA. Its signing key sits in the [`Redacted`] issuer, so the derived
/// `Debug` shows the (public) certificate and never the key.
#[derive(Debug)]
pub(crate) struct CertificateAuthority {
    issuer: Redacted<Issuer<'static, KeyPair>>,
    cert_pem: String,
    not_after: SystemTime,
}

impl CertificateAuthority {
    /// Sets up the CA per `settings` and writes the certificate for clients.
    /// A loaded CA must be able to sign leaves valid `leaf_validity` for
    /// every host in `hosts` ([`check::usable`]).
    pub(crate) fn init(
        settings: &CaSettings,
        hosts: &InterceptHosts,
        leaf_validity: Duration,
        now: SystemTime,
    ) -> Result<CertificateAuthority, CaError> {
        let ca = match &settings.persisted {
            None => CertificateAuthority::generate(hosts, settings.validity, now)?,
            Some((key, cert)) => match (key.exists(), cert.exists()) {
                (true, true) => {
                    let (ca, facts) = CertificateAuthority::load(key, cert)?;
                    check::usable(&facts, hosts, leaf_validity, now).map_err(|reason| {
                        CaError::Refused {
                            path: cert.clone(),
                            reason,
                        }
                    })?;
                    ca
                }
                (false, false) => {
                    let ca = CertificateAuthority::generate(hosts, settings.validity, now)?;
                    write_atomically(
                        key,
                        ca.issuer.expose_secret().key().serialize_pem().as_bytes(),
                        0o600,
                    )?;
                    write_atomically(cert, ca.cert_pem.as_bytes(), 0o644)?;
                    ca
                }
                _ => {
                    return Err(CaError::HalfPersisted {
                        key: key.clone(),
                        cert: cert.clone(),
                    });
                }
            },
        };
        write_atomically(&settings.destination, ca.cert_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// A new CA: ECDSA P-256, CA:true with path length 0, name-constrained
    /// to the intercepted hosts.
    pub(crate) fn generate(
        hosts: &InterceptHosts,
        validity: Duration,
        now: SystemTime,
    ) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "kube-audience-proxy");
        name.push(
            DnType::CommonName,
            format!(
                "kube-audience-proxy interception CA {:08x}",
                fastrand::u32(..)
            ),
        );
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.name_constraints = name_constraints(hosts);
        params.serial_number = Some(random_serial());
        // Whole seconds, as the certificate holds it.
        let not_after = whole_seconds(now + validity);
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer: Redacted::new(Issuer::new(params, key)),
            not_after,
        })
    }

    /// Loads a CA from PEM files; returns it with what [`check::usable`]
    /// needs to know.
    pub(crate) fn load(
        key_path: &Path,
        cert_path: &Path,
    ) -> Result<(CertificateAuthority, check::CaFacts), CaError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|reason| CaError::File {
                action: "cannot read",
                path: path.to_owned(),
                reason,
            })
        };
        let key_pem = read(key_path)?;
        let cert_pem = read(cert_path)?;
        let unusable = |reason: String| CaError::Unusable {
            path: cert_path.to_owned(),
            reason,
        };
        // Names the key file: that is the file to fix.
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Unusable {
            path: key_path.to_owned(),
            reason: format!("the key cannot be read ({e})"),
        })?;
        let facts = check::read(&cert_pem).map_err(unusable)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| unusable(format!("key and certificate do not match ({e})")))?;
        let ca = CertificateAuthority {
            issuer: Redacted::new(issuer),
            cert_pem,
            not_after: facts.not_after,
        };
        Ok((ca, facts))
    }

    /// The end of the CA's validity, and so of every leaf it signs.
    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA certificate (PEM); at runtime only the written file is read.
    #[cfg(test)]
    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a leaf for `dns_names` and `ips`, valid for `validity` (never
    /// beyond the CA's own end; nothing once the CA expired). CPU-bound (a
    /// key generation and a signature, about a millisecond): async callers
    /// run it on the blocking pool, as `sds::certs` does.
    pub(crate) fn mint_leaf(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
        validity: Duration,
        now: SystemTime,
    ) -> Result<Leaf, CaError> {
        if now >= self.not_after {
            return Err(CaError::Expired(
                humantime::format_rfc3339_seconds(self.not_after).to_string(),
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "kube-audience-proxy");
        params.distinguished_name = name;
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName((*n).try_into()?)))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let not_after = (now + validity).min(self.not_after);
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, self.issuer.expose_secret())?;
        let mut chain_pem = cert.pem();
        chain_pem.push_str(&self.cert_pem);
        Ok(Leaf {
            chain_pem,
            key: KeyPem::new(key.serialize_pem()),
            not_after,
        })
    }
}

/// Name constraints limiting the CA to the intercepted hosts (DNS subtrees
/// for names and suffixes, /32 or /128 for IPs). `None` when nothing is
/// intercepted (no leaf is ever minted then).
fn name_constraints(hosts: &InterceptHosts) -> Option<NameConstraints> {
    let permitted_subtrees: Vec<GeneralSubtree> = hosts
        .patterns()
        .iter()
        .map(|p| match p {
            HostPattern::Exact(name) => GeneralSubtree::DnsName(name.clone()),
            HostPattern::Suffix(suffix) => GeneralSubtree::DnsName(suffix.clone()),
            HostPattern::Ip(ip) => {
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                GeneralSubtree::IpAddress(rcgen::CidrSubnet::from_addr_prefix(*ip, prefix))
            }
        })
        .collect();
    (!permitted_subtrees.is_empty()).then_some(NameConstraints {
        permitted_subtrees,
        excluded_subtrees: Vec::new(),
    })
}

/// `t` without its fraction of a second.
fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs()),
        Err(_) => t,
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

/// Writes `contents` to `path` through a temporary file in the same folder
/// and a rename, so a reader never sees a partial file; `mode` is set before
/// any byte is written.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let error = |action, reason| CaError::File {
        action,
        path: path.to_owned(),
        reason,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A fresh name, created with O_EXCL and mode 0600: a file or symlink
    // planted at that path is never followed or reused, and nobody else can
    // read the contents before they are complete. The final mode is set
    // just before the rename.
    let tmp = dir.join(format!(
        ".{file_name}.{}.{:016x}.tmp",
        std::process::id(),
        fastrand::u64(..)
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        // Nothing was created: nothing to remove.
        .map_err(|reason| error("cannot write", reason))?;
    let result = (|| {
        file.write_all(contents)?;
        file.sync_all()?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)
    })();
    if let Err(reason) = result {
        let _ = fs::remove_file(&tmp);
        return Err(error("cannot write", reason));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
