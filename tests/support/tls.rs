//! TLS pieces shared by the test servers: a throwaway certificate authority
//! ([`TestCa`]) that issues serving certificates, and the accept loop that
//! serves HTTP/1.1 and HTTP/2, over TLS or not, recording per connection
//! what the client negotiated ([`ConnInfo`]).
//!
//! Test fixture only; never part of the shipped binary.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// A self-signed test CA (ECDSA P-256) that issues serving certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    common_name: String,
}

impl TestCa {
    /// A new CA whose subject is `CN=common_name`.
    pub fn generate(common_name: &str) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA cert");
        TestCa {
            issuer,
            common_name: common_name.to_owned(),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's subject common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// A rustls server configuration (ALPN `h2`, `http/1.1`) with a fresh
    /// ECDSA P-256 serving certificate issued by this CA for `names` (entries
    /// that parse as IP addresses become IP SANs, the others DNS SANs) and
    /// subject `CN=common_name`.
    pub fn server_config(&self, names: &[&str], common_name: &str) -> rustls::ServerConfig {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("server key");
        // `CertificateParams::new` makes IP SANs of what parses as an IP address.
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

/// How the connection a request arrived on was set up; inserted by
/// [`spawn_accept_loop`] into the extensions of every request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnInfo {
    pub tls: bool,
    /// The SNI the client sent (TLS only; clients send none for IP addresses).
    pub sni: Option<String>,
}

/// Accepts connections on `listener` (optionally TLS) and serves HTTP/1.1 and
/// HTTP/2 with `handler`; every request carries a [`ConnInfo`] extension.
/// Aborting the returned task closes every connection.
pub fn spawn_accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: F,
) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else {
                        // Not synchronisation: a failed accept (such as too
                        // many open files) is retried after a pause, not spun on.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let handler = handler.clone();
                    let tls = tls.clone();
                    conns.spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let service = move |info: ConnInfo| {
                            service_fn(move |mut req: Request<Incoming>| {
                                req.extensions_mut().insert(info.clone());
                                let fut = handler(req);
                                async move { Ok::<_, Infallible>(fut.await) }
                            })
                        };
                        let builder = auto::Builder::new(TokioExecutor::new());
                        match tls {
                            Some(acceptor) => {
                                let handshake =
                                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                                let Ok(Ok(stream)) = handshake.await else {
                                    return;
                                };
                                let info = ConnInfo {
                                    tls: true,
                                    sni: stream.get_ref().1.server_name().map(str::to_owned),
                                };
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service(info))
                                    .await;
                            }
                            None => {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service(ConnInfo::default()))
                                    .await;
                            }
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}
