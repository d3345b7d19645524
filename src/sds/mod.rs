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
//! ACK/NACK: every response carries a nonce; Envoy's next request echoes it,
//! with `error_detail` set for a NACK. A NACK is logged; the same resource
//! is not sent again until it changes (no resend loops).

pub(crate) mod certs;

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

/// The SDS service. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Sds {
    certs: Arc<Certificates>,
    closing: Arc<watch::Sender<bool>>,
}

impl Sds {
    /// A service over `certs`.
    pub(crate) fn new(certs: Arc<Certificates>) -> Sds {
        Sds {
            certs,
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
            closing: self.closing.subscribe(),
        };
        tokio::spawn(serve(env, tx));
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }
}

/// What every stream loop shares with the service.
struct StreamEnv {
    certs: Arc<Certificates>,
    closing: watch::Receiver<bool>,
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

/// One delta stream: subscribed names with the version sent and when it must
/// be rotated, each holding one `--max-certificates` slot.
struct DeltaStream<'a> {
    certs: &'a Certificates,
    subscribed: HashMap<String, (String, Instant, certs::Slot<'a>)>,
    nonce: u64,
}

impl<'a> DeltaStream<'a> {
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
            if name == "*" || self.subscribed.contains_key(&name) {
                continue;
            }
            match self.subscribe(&name).await {
                Ok(resource) => response.resources.push(resource),
                Err(_) => response.removed_resources.push(name),
            }
        }
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
        self.certs.check(name)?;
        let slot = self
            .certs
            .hold()
            .inspect_err(|refusal| self.certs.refused(name, refusal))?;
        let minted = self.certs.get(name).await?;
        self.subscribed.insert(
            name.to_owned(),
            (minted.version.clone(), minted.rotate_at, slot),
        );
        Ok(minted.resource())
    }

    fn next_rotation(&self) -> Option<Instant> {
        self.subscribed.values().map(|(_, at, _)| *at).min()
    }

    /// Re-mints every secret due and returns the push, if any.
    async fn rotate(&mut self) -> Option<DeltaDiscoveryResponse> {
        let now = Instant::now();
        let due: Vec<String> = self
            .subscribed
            .iter()
            .filter(|(_, (_, at, _))| *at <= now)
            .map(|(name, _)| name.clone())
            .collect();
        let mut response = DeltaDiscoveryResponse {
            type_url: Secret::type_url(),
            ..Default::default()
        };
        for name in due {
            match self.certs.get(&name).await {
                Ok(minted) => {
                    if let Some(entry) = self.subscribed.get_mut(&name) {
                        entry.0 = minted.version.clone();
                        entry.1 = minted.rotate_at;
                    }
                    response.resources.push(minted.resource());
                }
                Err(_) => {
                    self.subscribed.remove(&name);
                    response.removed_resources.push(name);
                }
            }
        }
        if response.resources.is_empty() && response.removed_resources.is_empty() {
            return None;
        }
        response.nonce = self.next_nonce();
        Some(response)
    }
}

async fn serve_delta(
    StreamEnv { certs, mut closing }: StreamEnv,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) {
    let mut stream = DeltaStream {
        certs: &certs,
        subscribed: HashMap::new(),
        nonce: 0,
    };
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

// === impl state of the world ===

async fn serve_sotw(
    StreamEnv { certs, mut closing }: StreamEnv,
    mut inbound: Streaming<DiscoveryRequest>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let mut names: Vec<String> = Vec::new();
    let mut nonce = 0u64;
    let mut rotation: Option<Instant> = None;
    loop {
        let send = tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if let Err(status) = check_type(&request.type_url) {
                        let _ = out.send(Err(status)).await;
                        return;
                    }
                    note_ack(&request.response_nonce, request.error_detail.as_ref());
                    let mut requested = request.resource_names;
                    requested.sort();
                    requested.dedup();
                    // An ACK/NACK of the current set needs no answer.
                    let changed = requested != names;
                    names = requested;
                    changed || request.response_nonce.is_empty()
                }
                Ok(None) | Err(_) => return,
            },
            () = sleep_until(rotation) => true,
            () = closed(&mut closing) => return,
        };
        if !send {
            continue;
        }
        let mut resources = Vec::new();
        rotation = None;
        for name in &names {
            if let Ok(minted) = certs.get(name).await {
                rotation =
                    Some(rotation.map_or(minted.rotate_at, |r: Instant| r.min(minted.rotate_at)));
                resources.push(minted.any());
            }
        }
        nonce += 1;
        let response = DiscoveryResponse {
            version_info: nonce.to_string(),
            resources,
            type_url: Secret::type_url(),
            nonce: nonce.to_string(),
            ..Default::default()
        };
        if out.send(Ok(response)).await.is_err() {
            return;
        }
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
        Ok(self.spawn(|env, out| serve_sotw(env, inbound, out)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let request = request.into_inner();
        check_type(&request.type_url)?;
        let mut resources = Vec::new();
        let mut version = Vec::new();
        for name in &request.resource_names {
            if let Ok(minted) = self.certs.get(name).await {
                version.push(minted.version.clone());
                resources.push(minted.any());
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
mod tests {
    use std::time::Duration;

    use super::*;

    use super::certs::test_store as store;

    fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> (Vec<&str>, Vec<&str>) {
        (
            response.resources.iter().map(|r| r.name.as_str()).collect(),
            response
                .removed_resources
                .iter()
                .map(String::as_str)
                .collect(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn delta_serves_refuses_bounds_and_rotates() {
        let certs = store(2);
        let mut stream = DeltaStream {
            certs: &certs,
            subscribed: HashMap::new(),
            nonce: 0,
        };
        let first = stream
            .on_request(subscribe(&["localhost", "evil.test"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(names(&first), (vec!["localhost"], vec!["evil.test"]));
        assert_eq!(first.nonce, "1");
        assert_eq!(first.type_url, Secret::type_url());
        let version = first.resources[0].version.clone();

        // An ACK (or a NACK) of that answer, and a repeated subscription,
        // need no answer.
        let ack = DeltaDiscoveryRequest {
            type_url: Secret::type_url(),
            response_nonce: "1".into(),
            ..Default::default()
        };
        assert!(stream.on_request(ack).await.unwrap().is_none());
        assert!(
            stream
                .on_request(subscribe(&["localhost"]))
                .await
                .unwrap()
                .is_none()
        );

        // Two names at most; unsubscribing frees a slot.
        let second = stream
            .on_request(subscribe(&["a.example.com", "b.example.com"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            names(&second),
            (vec!["a.example.com"], vec!["b.example.com"])
        );
        let unsubscribe = DeltaDiscoveryRequest {
            type_url: Secret::type_url(),
            resource_names_unsubscribe: vec!["a.example.com".into()],
            ..Default::default()
        };
        assert!(stream.on_request(unsubscribe).await.unwrap().is_none());
        let third = stream
            .on_request(subscribe(&["b.example.com"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(names(&third), (vec!["b.example.com"], vec![]));

        // Nothing to rotate yet; after two thirds of the validity, every
        // subscribed secret is re-minted and pushed with a new version.
        assert!(stream.rotate().await.is_none());
        let due = stream.next_rotation().unwrap();
        tokio::time::advance(Duration::from_secs(16 * 3600 + 1)).await;
        assert!(Instant::now() >= due);
        let pushed = stream.rotate().await.unwrap();
        let mut pushed_names = names(&pushed).0;
        pushed_names.sort();
        assert_eq!(pushed_names, ["b.example.com", "localhost"]);
        let localhost = pushed
            .resources
            .iter()
            .find(|r| r.name == "localhost")
            .unwrap();
        assert_ne!(localhost.version, version);
        assert!(stream.rotate().await.is_none());
    }

    #[tokio::test]
    async fn reconnects_resubscribe_through_initial_versions() {
        let certs = store(4);
        let mut stream = DeltaStream {
            certs: &certs,
            subscribed: HashMap::new(),
            nonce: 0,
        };
        let request = DeltaDiscoveryRequest {
            type_url: Secret::type_url(),
            initial_resource_versions: [("localhost".to_owned(), "7".to_owned())].into(),
            ..Default::default()
        };
        let response = stream.on_request(request).await.unwrap().unwrap();
        assert_eq!(names(&response).0, ["localhost"]);
    }

    #[tokio::test]
    async fn other_resource_types_are_an_error() {
        let certs = store(4);
        let mut stream = DeltaStream {
            certs: &certs,
            subscribed: HashMap::new(),
            nonce: 0,
        };
        let request = DeltaDiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..Default::default()
        };
        let status = stream.on_request(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
