//! Delta secret streams (`DeltaSecrets`, what the shipped config uses):
//! subscribed names with the version sent, refusals through
//! `removed_resources`, leaf rotation and token pushes on the open stream.

use std::collections::HashMap;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use prost::Name;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::certs::{self, Certificates};
use super::tokens::{self, TokenSecrets};
use super::{StreamEnv, check_type, closed, earliest, hold, note_ack, sleep_until};

/// One delta stream: subscribed names (as requested) with the version sent
/// and when it must be rotated, each holding a `--max-certificates` slot.
pub(super) struct DeltaStream<'a> {
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
    pub(super) fn new(
        certs: Option<&'a Certificates>,
        tokens: Option<&'a TokenSecrets>,
    ) -> DeltaStream<'a> {
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
    pub(super) async fn on_request(
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

    pub(super) fn next_rotation(&self) -> Option<Instant> {
        let leaves = self.subscribed.values().map(|s| s.rotate_at).min();
        earliest(leaves, self.token_names.next_expiry())
    }

    /// Re-mints every secret due and returns the push, if any.
    pub(super) async fn rotate(&mut self) -> Option<DeltaDiscoveryResponse> {
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

pub(super) async fn serve_delta(
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
