//! The Secret Discovery Service Envoy fetches interception certificates from
//! (`envoy.service.secret.v3.SecretDiscoveryService`).
//!
//! - `DeltaSecrets` (what the shipped config uses, `api_type: DELTA_GRPC`):
//!   Envoy's on-demand certificate selector subscribes to one name per SNI.
//!   A name that may be minted is answered with its secret; any other is
//!   refused at once through `removed_resources`, which fails that TLS
//!   handshake instead of leaving it waiting. Secrets are re-minted and
//!   pushed on the open stream before they expire.
//! - `StreamSecrets` (state of the world) and `FetchSecrets` answer the
//!   names that may be minted; SotW has no way to refuse a name.
//!
//! Every path holds a `--max-certificates` slot per name it serves (a
//! stream for as long as the name is subscribed, a fetch for the call), and
//! case variants of one name share it (see [`certs`]). Each secret is sent
//! under the exact name it was asked for.
//!
//! The same service serves the fast-path audiences' tokens as generic
//! secrets under names of their own (see [`tokens`]); without interception
//! it serves only those, and refuses every other name.
//!
//! ACK/NACK: every response carries a nonce; Envoy's next request echoes it,
//! with `error_detail` set for a NACK. A NACK is logged; the same resource
//! is not sent again until it changes (no resend loops).

pub(crate) mod certs;
mod delta;
pub(crate) mod metrics;
mod sotw;
pub(crate) mod tokens;

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use futures_util::Stream;
use prost::Name;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use certs::Certificates;
use tokens::TokenSecrets;

/// The SDS service. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Sds {
    /// Leaves for intercepted hosts (`None`: no interception).
    certs: Option<Arc<Certificates>>,
    /// The fast-path audiences' tokens (`None`: none configured).
    tokens: Option<TokenSecrets>,
    /// Open streams.
    streams: prometheus_client::metrics::gauge::Gauge,
    closing: Arc<watch::Sender<bool>>,
}

impl Sds {
    /// A service over `certs`.
    #[cfg(test)]
    pub(crate) fn new(certs: Arc<Certificates>) -> Sds {
        Sds::serving(Some(certs), None)
    }

    /// A service over `certs` and `tokens` (at least one of them).
    pub(crate) fn serving(certs: Option<Arc<Certificates>>, tokens: Option<TokenSecrets>) -> Sds {
        let streams = match (&certs, &tokens) {
            (Some(certs), _) => certs.counters.metrics.streams.clone(),
            (None, Some(tokens)) => tokens.metrics().streams.clone(),
            (None, None) => prometheus_client::metrics::gauge::Gauge::default(),
        };
        Sds {
            certs,
            tokens,
            streams,
            closing: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Ends every open stream (SDS streams live as long as Envoy does, so a
    /// graceful shutdown would otherwise wait for them forever).
    pub(crate) fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// The service to add to the gRPC server (delta, SotW and fetch).
    pub(crate) fn into_service(self) -> SecretDiscoveryServiceServer<Sds> {
        SecretDiscoveryServiceServer::new(self)
    }

    /// Runs one stream's loop in its own task; its answers are the response.
    fn spawn<T, F, Fut>(&self, serve: F) -> Response<BoxStream<T>>
    where
        T: Send + 'static,
        F: FnOnce(StreamEnv, mpsc::Sender<Result<T, Status>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        let env = StreamEnv {
            certs: self.certs.clone(),
            tokens: self.tokens.clone(),
            closing: self.closing.subscribe(),
        };
        // Counted open for as long as the stream's loop runs.
        let open = crate::metrics::OpenGuard::new(self.streams.clone());
        let serving = serve(env, tx);
        tokio::spawn(async move {
            serving.await;
            drop(open);
        });
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }
}

/// What every stream loop shares with the service.
struct StreamEnv {
    certs: Option<Arc<Certificates>>,
    tokens: Option<TokenSecrets>,
    closing: watch::Receiver<bool>,
}

/// Holds a certificate slot for `name`, refusing every name without
/// interception.
/// The sooner of two optional deadlines (`None`: no deadline).
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn hold<'a>(
    certs: Option<&'a Certificates>,
    name: &str,
) -> Result<certs::Slot<'a>, certs::Refusal> {
    match certs {
        Some(certs) => certs.hold(name),
        None => Err(certs::Refusal::NotIntercepted),
    }
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == Secret::type_url() {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "this server only serves {} (asked for {type_url:?})",
            Secret::type_url()
        )))
    }
}

/// Records an ACK or NACK carried by a request.
fn note_ack(nonce: &str, error: Option<&envoy_types::pb::google::rpc::Status>) {
    if nonce.is_empty() {
        return;
    }
    match error {
        Some(error) => {
            tracing::warn!(nonce, code = error.code, message = %error.message, "Envoy rejected a secret (NACK)");
        }
        None => tracing::trace!(nonce, "Envoy accepted a secret (ACK)"),
    }
}

/// Completes when the server starts closing streams (or the signal is gone).
async fn closed(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await.map(|_| ());
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let inbound = request.into_inner();
        Ok(self.spawn(|env, out| delta::serve_delta(env, inbound, out)))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let inbound = request.into_inner();
        Ok(self.spawn(|env, out| sotw::serve_sotw(env, inbound, out)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut request = request.into_inner();
        check_type(&request.type_url)?;
        request.resource_names.sort();
        request.resource_names.dedup();
        // Slots for the call's duration: a fetch counts like a stream.
        let slots: Vec<(&String, certs::Slot<'_>)> = request
            .resource_names
            .iter()
            .filter(|name| tokens::audience_of(name).is_none())
            .filter_map(|name| Some((name, hold(self.certs.as_deref(), name).ok()?)))
            .collect();
        let mut resources = Vec::new();
        let mut version = Vec::new();
        for (name, slot) in &slots {
            if let Ok(minted) = slot.certs().get(slot).await {
                version.push(minted.version.clone());
                resources.push(minted.any(name));
            }
        }
        // Token secrets: the fast-path audiences' usable tokens.
        if let Some(secrets) = &self.tokens {
            for name in &request.resource_names {
                if tokens::audience_of(name).is_some()
                    && secrets.admit(name).is_ok()
                    && let Some(ready) = secrets.ready(name, Instant::now())
                {
                    version.push(ready.serial.to_string());
                    resources.push(ready.any(name));
                }
            }
        }
        Ok(Response::new(DiscoveryResponse {
            version_info: version.join(","),
            resources,
            type_url: Secret::type_url(),
            nonce: "fetch".into(),
            ..Default::default()
        }))
    }
}

#[cfg(test)]
use delta::DeltaStream;
#[cfg(test)]
mod tests;
