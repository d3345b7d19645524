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
pub(crate) mod metrics;
mod sotw;
pub(crate) mod tokens;

use std::collections::HashMap;
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

// === impl Delta ===

/// One delta stream: subscribed names (as requested) with the version sent
/// and when it must be rotated, each holding a `--max-certificates` slot.
struct DeltaStream<'a> {
    certs: Option<&'a Certificates>,
    tokens: Option<&'a TokenSecrets>,
    subscribed: HashMap<String, Subscribed<'a>>,
    /// Token secret names subscribed (see [`tokens`]).
    token_names: tokens::Subscriptions,
    nonce: u64,
}

/// One subscribed name.
struct Subscribed<'a> {
    version: String,
    rotate_at: Instant,
    slot: certs::Slot<'a>,
}

impl<'a> DeltaStream<'a> {
    fn new(certs: Option<&'a Certificates>, tokens: Option<&'a TokenSecrets>) -> DeltaStream<'a> {
        DeltaStream {
            certs,
            tokens,
            subscribed: HashMap::new(),
            token_names: tokens::Subscriptions::default(),
            nonce: 0,
        }
    }

    /// Adds the token secrets that changed to `response`.
    fn sync_tokens(&mut self, response: &mut DeltaDiscoveryResponse) {
        let Some(secrets) = self.tokens else {
            return;
        };
        let changes = self.token_names.sync(secrets, Instant::now());
        for (name, ready) in changes.sent {
            response.resources.push(ready.resource(&name));
        }
        for (name, version) in changes.withdrawn {
            response
                .resources
                .push(tokens::withdrawn_resource(&name, version));
        }
    }

    /// Subscribes a token secret name, or refuses it.
    fn subscribe_token(&mut self, name: &str) -> Result<(), tokens::NotFastPath> {
        match self.tokens {
            Some(secrets) => secrets.admit(name)?,
            None => return Err(tokens::NotFastPath),
        }
        self.token_names.add(name);
        Ok(())
    }

    fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Handles one request; returns the response to send, if any.
    async fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        check_type(&request.type_url)?;
        for name in &request.resource_names_unsubscribe {
            self.subscribed.remove(name);
            self.token_names.remove(name);
        }
        // After a reconnect Envoy lists what it holds in
        // initial_resource_versions: those names are subscribed too.
        let mut wanted: Vec<String> = request.resource_names_subscribe;
        wanted.extend(request.initial_resource_versions.into_keys());
        wanted.sort();
        wanted.dedup();
        let mut response = DeltaDiscoveryResponse {
            type_url: Secret::type_url(),
            ..Default::default()
        };
        for name in wanted {
            if name == "*"
                || self.subscribed.contains_key(&name)
                || self.token_names.contains(&name)
            {
                continue;
            }
            if tokens::audience_of(&name).is_some() {
                // Sent below once a token is there; refused at once if the
                // audience is not a fast-path one.
                if self.subscribe_token(&name).is_err() {
                    response.removed_resources.push(name);
                }
                continue;
            }
            match self.subscribe(&name).await {
                Ok(resource) => response.resources.push(resource),
                Err(_) => response.removed_resources.push(name),
            }
        }
        self.sync_tokens(&mut response);
        if response.resources.is_empty() && response.removed_resources.is_empty() {
            return Ok(None);
        }
        response.nonce = self.next_nonce();
        Ok(Some(response))
    }

    async fn subscribe(
        &mut self,
        name: &str,
    ) -> Result<envoy_types::pb::envoy::service::discovery::v3::Resource, certs::Refusal> {
        let slot = hold(self.certs, name)?;
        let minted = slot.certs().get(&slot).await?;
        self.subscribed.insert(
            name.to_owned(),
            Subscribed {
                version: minted.version.clone(),
                rotate_at: minted.rotate_at,
                slot,
            },
        );
        Ok(minted.resource(name))
    }

    fn next_rotation(&self) -> Option<Instant> {
        let leaves = self.subscribed.values().map(|s| s.rotate_at).min();
        match (leaves, self.token_names.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Re-mints every secret due and returns the push, if any.
    async fn rotate(&mut self) -> Option<DeltaDiscoveryResponse> {
        let now = Instant::now();
        let due: Vec<String> = self
            .subscribed
            .iter()
            .filter(|(_, s)| s.rotate_at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        let mut response = DeltaDiscoveryResponse {
            type_url: Secret::type_url(),
            ..Default::default()
        };
        for name in due {
            let minted = match self.subscribed.get(&name) {
                Some(subscribed) => subscribed.slot.certs().get(&subscribed.slot).await,
                None => continue,
            };
            match (minted, self.subscribed.get_mut(&name)) {
                (Ok(minted), Some(subscribed)) => {
                    subscribed.version.clone_from(&minted.version);
                    subscribed.rotate_at = minted.rotate_at;
                    response.resources.push(minted.resource(&name));
                }
                // No successor (the CA expired): the name is dropped, and
                // Envoy fails its handshakes rather than serve a dead leaf.
                _ => {
                    self.subscribed.remove(&name);
                    response.removed_resources.push(name);
                }
            }
        }
        self.sync_tokens(&mut response);
        if response.resources.is_empty() && response.removed_resources.is_empty() {
            return None;
        }
        response.nonce = self.next_nonce();
        Some(response)
    }
}

async fn serve_delta(
    StreamEnv {
        certs,
        tokens,
        mut closing,
    }: StreamEnv,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let mut token_watch = tokens.as_ref().map(TokenSecrets::watch);
    let mut stream = DeltaStream::new(certs.as_deref(), tokens.as_ref());
    loop {
        let rotation = stream.next_rotation();
        let response = tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    note_ack(&request.response_nonce, request.error_detail.as_ref());
                    match stream.on_request(request).await {
                        Ok(response) => response.map(Ok),
                        Err(status) => Some(Err(status)),
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "SDS stream ended");
                    return;
                }
            },
            () = sleep_until(rotation) => stream.rotate().await.map(Ok),
            () = tokens::changed(token_watch.as_mut()) => stream.rotate().await.map(Ok),
            () = closed(&mut closing) => return,
        };
        if let Some(response) = response {
            let end = response.is_err();
            if out.send(response).await.is_err() || end {
                return;
            }
        }
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
        Ok(self.spawn(|env, out| serve_delta(env, inbound, out)))
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
mod tests;
