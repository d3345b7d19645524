//! State-of-the-world secret streams (`StreamSecrets`): every request
//! names the whole set wanted; every answer carries every secret of the set
//! that may be minted. Secrets are re-minted and the set is sent again
//! before the soonest one expires. Token secrets (see [`super::tokens`])
//! are in the set while usable; a new token, or a token gone unusable,
//! sends the set again.

use std::collections::HashMap;

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Name;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::certs::{self, Certificates};
use super::tokens::{self, TokenSecrets};
use super::{StreamEnv, check_type, closed, earliest, hold, note_ack, sleep_until};

pub(super) async fn serve_sotw(
    StreamEnv {
        certs,
        tokens,
        mut closing,
    }: StreamEnv,
    mut inbound: Streaming<DiscoveryRequest>,
    out: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let mut token_watch = tokens.as_ref().map(TokenSecrets::watch);
    let mut stream = SotwStream::new(certs.as_deref(), tokens.as_ref());
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
            () = sleep_until(stream.next_wakeup()) => true,
            () = tokens::changed(token_watch.as_mut()) => stream.tokens_changed(),
            () = closed(&mut closing) => return,
        };
        if send && out.send(Ok(stream.response().await)).await.is_err() {
            return;
        }
    }
}

/// One state-of-the-world stream: the names Envoy asked for last, the
/// slots they hold, and when the soonest secret must be rotated.
pub(super) struct SotwStream<'a> {
    certs: Option<&'a Certificates>,
    tokens: Option<&'a TokenSecrets>,
    /// The admitted token secret names among `names`.
    token_names: tokens::Subscriptions,
    /// Sorted, without duplicates.
    names: Vec<String>,
    slots: HashMap<String, certs::Slot<'a>>,
    rotation: Option<Instant>,
    nonce: u64,
}

impl<'a> SotwStream<'a> {
    pub(super) fn new(
        certs: Option<&'a Certificates>,
        tokens: Option<&'a TokenSecrets>,
    ) -> SotwStream<'a> {
        SotwStream {
            certs,
            tokens,
            token_names: tokens::Subscriptions::default(),
            names: Vec::new(),
            slots: HashMap::new(),
            rotation: None,
            nonce: 0,
        }
    }

    /// Takes the requested names; whether they changed. Names no longer
    /// asked for give their slots back.
    pub(super) fn set_names(&mut self, mut requested: Vec<String>) -> bool {
        requested.sort();
        requested.dedup();
        let changed = requested != self.names;
        self.names = requested;
        let names = &self.names;
        self.slots
            .retain(|name, _| names.binary_search(name).is_ok());
        self.token_names
            .retain(|name| names.binary_search_by(|n| n.as_str().cmp(name)).is_ok());
        if let Some(secrets) = self.tokens {
            for name in &self.names {
                if tokens::audience_of(name).is_some()
                    && !self.token_names.contains(name)
                    && secrets.admit(name).is_ok()
                {
                    self.token_names.add(name);
                }
            }
        }
        changed
    }

    /// When to send the set again: the soonest leaf rotation or token end.
    pub(super) fn next_wakeup(&self) -> Option<Instant> {
        earliest(self.rotation, self.token_names.next_expiry())
    }

    /// Whether a token in the set changed (new, or gone unusable) since
    /// the last response; a response follows if so.
    pub(super) fn tokens_changed(&mut self) -> bool {
        let Some(secrets) = self.tokens else {
            return false;
        };
        self.token_names.pending(secrets, Instant::now())
    }

    /// Every asked-for name that holds (or now gets) a slot and can be
    /// minted, under its name as asked; the others are left out (SotW has
    /// no way to refuse a name).
    pub(super) async fn response(&mut self) -> DiscoveryResponse {
        for name in &self.names {
            if tokens::audience_of(name).is_none()
                && !self.slots.contains_key(name)
                && let Ok(slot) = hold(self.certs, name)
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
            if let Ok(minted) = slot.certs().get(slot).await {
                self.rotation = Some(
                    self.rotation
                        .map_or(minted.rotate_at, |r| r.min(minted.rotate_at)),
                );
                resources.push(minted.any(name));
            }
        }
        if let Some(secrets) = self.tokens {
            resources.extend(self.token_names.set(secrets, Instant::now()));
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
