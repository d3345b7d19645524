//! State-of-the-world secret streams (`StreamSecrets`): every request
//! names the whole set wanted; every answer carries every secret of the set
//! that may be minted. Secrets are re-minted and the set is sent again
//! before the soonest one expires.

use std::collections::HashMap;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Name;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::certs::{self, Certificates};
use super::{StreamEnv, check_type, closed, note_ack, sleep_until};

pub(super) async fn serve_sotw(
    StreamEnv { certs, mut closing }: StreamEnv,
    mut inbound: Streaming<DiscoveryRequest>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let mut stream = SotwStream::new(&certs);
    loop {
        let send = tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if let Err(status) = check_type(&request.type_url) {
                        let _ = out.send(Err(status)).await;
                        return;
                    }
                    note_ack(&request.response_nonce, request.error_detail.as_ref());
                    let first = request.response_nonce.is_empty();
                    // An ACK/NACK of the current set needs no answer.
                    stream.set_names(request.resource_names) || first
                }
                Ok(None) | Err(_) => return,
            },
            () = sleep_until(stream.rotation) => true,
            () = closed(&mut closing) => return,
        };
        if send && out.send(Ok(stream.response().await)).await.is_err() {
            return;
        }
    }
}

/// One state-of-the-world stream: the names Envoy asked for last, the
/// slots they hold, and when the soonest secret must be rotated.
struct SotwStream<'a> {
    certs: &'a Certificates,
    /// Sorted, without duplicates.
    names: Vec<String>,
    slots: HashMap<String, certs::Slot<'a>>,
    rotation: Option<Instant>,
    nonce: u64,
}

impl<'a> SotwStream<'a> {
    fn new(certs: &'a Certificates) -> SotwStream<'a> {
        SotwStream {
            certs,
            names: Vec::new(),
            slots: HashMap::new(),
            rotation: None,
            nonce: 0,
        }
    }

    /// Takes the requested names; whether they changed. Names no longer
    /// asked for give their slots back.
    fn set_names(&mut self, mut requested: Vec<String>) -> bool {
        requested.sort();
        requested.dedup();
        let changed = requested != self.names;
        self.names = requested;
        let names = &self.names;
        self.slots
            .retain(|name, _| names.binary_search(name).is_ok());
        changed
    }

    /// Every asked-for name that holds (or now gets) a slot and can be
    /// minted, under its name as asked; the others are left out (SotW has
    /// no way to refuse a name).
    async fn response(&mut self) -> DiscoveryResponse {
        for name in &self.names {
            if !self.slots.contains_key(name)
                && let Ok(slot) = self.certs.hold(name)
            {
                self.slots.insert(name.clone(), slot);
            }
        }
        let mut resources = Vec::new();
        self.rotation = None;
        for name in &self.names {
            let Some(slot) = self.slots.get(name) else {
                continue;
            };
            if let Ok(minted) = self.certs.get(slot).await {
                self.rotation = Some(
                    self.rotation
                        .map_or(minted.rotate_at, |r| r.min(minted.rotate_at)),
                );
                resources.push(minted.any(name));
            }
        }
        self.nonce += 1;
        DiscoveryResponse {
            version_info: self.nonce.to_string(),
            resources,
            type_url: Secret::type_url(),
            nonce: self.nonce.to_string(),
            ..Default::default()
        }
    }
}
