//! Token secrets: the first part of the native fast path. Each fast-path
//! audience's current token is served as an SDS `generic_secret`, for
//! Envoy's `credential_injector` filter (Generic credential) to inject.
//!
//! - Name: [`PREFIX`] followed by the audience exactly as configured
//!   (`kube-audience-proxy-token/https://kubernetes.default.svc`). The `/`
//!   can be in neither a DNS name nor an IP address, so a token name never
//!   collides with an SNI name (whose leaf the same service serves).
//! - Value: `generic_secret.secret.inline_string` = `Bearer <token>` (the
//!   whole `Authorization` value: the Generic credential injects the secret
//!   as is, no `header_value_prefix` needed).
//! - Which audiences: the fast-path ones, held in the token cache's
//!   [`Pinned`] store (every `--prefetch-audience` and every literal
//!   `--audience-rule` audience): minted at startup, refreshed on their
//!   timer. Any other audience's name is refused like an SNI name that is
//!   not intercepted (delta: `removed_resources`; SotW and fetch: left out).
//! - Push: each open stream watches the store; when a subscribed audience's
//!   token is replaced, the new one is sent on the stream (the refresh comes
//!   at 80 % of the lifetime, long before the last 30 s).
//! - Withdrawal: when a sent token reaches the end of its usable time
//!   without a successor, the secret is sent again with an EMPTY value
//!   (delta and SotW alike), so Envoy fails closed instead of sending an
//!   expired token: the Generic credential refuses an empty secret ("Failed
//!   to get credential from secret") and `credential_injector` answers 401
//!   (unless `allow_request_without_credential`). Removing the resource
//!   would not do: Envoy ignores a delta SDS removal of a secret it uses
//!   (`SdsApi::onConfigUpdate`: "attempting to remove a resource ...
//!   Ignoring.") and rejects a SotW response without it (one secret per
//!   subscription), and would keep injecting the old token past its
//!   expiry. A token minted again is sent again.
//!
//! The token stays in its [`Token`] until it is written into the protobuf:
//! versions are per-mint serials, never derived from the token.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    GenericSecret, Secret, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prost::{Message, Name};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::apiserver::ApiServerAudiences;
use crate::metrics::Registry;
use crate::secret::Token;
use crate::tokens::cache::prefetch::Pinned;

/// What every token secret's name starts with; the audience follows.
pub(crate) const PREFIX: &str = "kube-audience-proxy-token/";

/// The secret name of `audience`'s token.
pub(crate) fn secret_name(audience: &str) -> String {
    format!("{PREFIX}{audience}")
}

/// The audience a token secret name stands for; `None` for any other name
/// (an SNI name, or the no-SNI name).
pub(crate) fn audience_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX)
}

/// The token secrets over the fast-path audiences' store. Cheap to clone.
#[derive(Clone)]
pub(crate) struct TokenSecrets {
    pinned: Pinned,
    /// The API server's own audiences (`None` with
    /// `--allow-apiserver-audience`): never served, even when configured,
    /// because discovery may learn the issuer after the configuration was
    /// checked.
    refused: Option<ApiServerAudiences>,
    metrics: std::sync::Arc<TokenMetrics>,
}

/// A token ready to be sent.
#[derive(Debug)]
pub(crate) struct Ready {
    /// The mint's serial.
    pub serial: u64,
    /// When the token stops being usable (and the secret is withdrawn).
    pub usable_until: Instant,
    token: Token,
}

/// A name that is not a fast-path audience's.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotFastPath;

/// The withdrawn form of `name`'s secret: a generic secret with an empty
/// value, which the Generic credential refuses to inject.
pub(crate) fn withdrawn_any(name: &str) -> Any {
    secret_any(name, String::new())
}

/// A withdrawn secret as a delta resource; `version` differs from the
/// last token's.
pub(crate) fn withdrawn_resource(name: &str, version: String) -> Resource {
    Resource {
        name: name.to_owned(),
        version,
        resource: Some(withdrawn_any(name)),
        ..Default::default()
    }
}

fn secret_any(name: &str, value: String) -> Any {
    let secret = Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::GenericSecret(GenericSecret {
            secret: Some(DataSource {
                specifier: Some(Specifier::InlineString(value)),
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    Any {
        type_url: Secret::type_url(),
        value: secret.encode_to_vec(),
    }
}

impl Ready {
    /// As a delta xDS resource named `name`.
    pub(crate) fn resource(&self, name: &str) -> Resource {
        Resource {
            name: name.to_owned(),
            version: self.serial.to_string(),
            resource: Some(self.any(name)),
            ..Default::default()
        }
    }

    /// As a `Secret` named `name`.
    pub(crate) fn any(&self, name: &str) -> Any {
        secret_any(name, format!("Bearer {}", self.token.expose_secret()))
    }
}

impl TokenSecrets {
    /// Token secrets for the audiences `pinned` holds, except those
    /// `refused` holds (now or once discovery learns them).
    pub(crate) fn new(pinned: Pinned, refused: Option<ApiServerAudiences>) -> TokenSecrets {
        TokenSecrets {
            pinned,
            refused,
            metrics: std::sync::Arc::default(),
        }
    }

    /// The metrics (registered at startup).
    pub(crate) fn metrics(&self) -> &TokenMetrics {
        &self.metrics
    }

    /// Whether `name` may be subscribed: a fast-path audience's.
    pub(crate) fn admit(&self, name: &str) -> Result<(), NotFastPath> {
        match audience_of(name) {
            Some(audience) if self.pinned.contains(audience) => Ok(()),
            _ => {
                self.metrics.refused.inc();
                Err(NotFastPath)
            }
        }
    }

    /// The usable token behind the admitted `name` at `now`, if any.
    /// An API server audience has none: a sent one is withdrawn.
    pub(crate) fn ready(&self, name: &str, now: Instant) -> Option<Ready> {
        let audience = audience_of(name)?;
        if self
            .refused
            .as_ref()
            .is_some_and(|refused| refused.refuses(audience))
        {
            return None;
        }
        let (token, serial, usable_until) = self.pinned.token(audience, now)?;
        Some(Ready {
            serial,
            usable_until,
            token,
        })
    }

    /// The secret names served, in the order configured.
    pub(crate) fn names(&self) -> Vec<String> {
        self.pinned.audiences().map(secret_name).collect()
    }

    /// Sees every write to the store.
    pub(crate) fn watch(&self) -> watch::Receiver<()> {
        self.pinned.subscribe()
    }
}

/// One stream's token subscriptions: each admitted name with what was
/// sent last.
#[derive(Default)]
pub(crate) struct Subscriptions {
    names: HashMap<String, Sent>,
}

/// What a stream was sent last for one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    /// Nothing yet (no token since the subscription).
    Nothing,
    /// The token of this serial, usable until then.
    Token(u64, Instant),
    /// The empty secret, after the token of this serial.
    Withdrawn(u64),
}

/// What a [`Subscriptions::sync`] changed.
#[derive(Default)]
pub(crate) struct Changes {
    /// Names with a new token, and the token.
    pub sent: Vec<(String, Ready)>,
    /// Names whose token went unusable without a successor, with the
    /// version to withdraw them under.
    pub withdrawn: Vec<(String, String)>,
}

impl Subscriptions {
    /// Subscribes an admitted name (no-op if subscribed).
    pub(crate) fn add(&mut self, name: &str) {
        self.names.entry(name.to_owned()).or_insert(Sent::Nothing);
    }

    /// Unsubscribes `name`.
    pub(crate) fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    /// Keeps only the names `keep` admits.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.names.retain(|name, _| keep(name));
    }

    /// Whether `name` is subscribed.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Compares what was sent with the store at `now`: a new token to send
    /// for a name whose serial changed, a withdrawal for a sent token that
    /// is no longer usable (delta: only what changed is sent).
    pub(crate) fn sync(&mut self, secrets: &TokenSecrets, now: Instant) -> Changes {
        let mut changes = Changes::default();
        for (name, sent) in &mut self.names {
            let ready = secrets.ready(name, now);
            match advance(secrets, sent, ready.as_ref()) {
                Some(Sent::Token(..)) => {
                    if let Some(ready) = ready {
                        changes.sent.push((name.clone(), ready));
                    }
                }
                Some(Sent::Withdrawn(serial)) => changes
                    .withdrawn
                    .push((name.clone(), withdrawn_version(serial))),
                Some(Sent::Nothing) | None => {}
            }
        }
        changes.sent.sort_by(|a, b| a.0.cmp(&b.0));
        changes.withdrawn.sort();
        changes
    }

    /// The whole set at `now`, for a state-of-the-world response: every
    /// usable token, and the empty secret for every name whose token was
    /// withdrawn (Envoy rejects a response without it and would keep the
    /// old token). Records what it carries, as [`sync`](Self::sync) does.
    pub(crate) fn set(&mut self, secrets: &TokenSecrets, now: Instant) -> Vec<Any> {
        let mut set = Vec::new();
        for (name, sent) in &mut self.names {
            let ready = secrets.ready(name, now);
            advance(secrets, sent, ready.as_ref());
            match (ready, *sent) {
                (Some(ready), _) => set.push(ready.any(name)),
                (None, Sent::Withdrawn(_)) => set.push(withdrawn_any(name)),
                (None, Sent::Token(..) | Sent::Nothing) => {}
            }
        }
        set
    }

    /// Whether [`sync`](Self::sync) would change anything at `now`.
    pub(crate) fn pending(&self, secrets: &TokenSecrets, now: Instant) -> bool {
        self.names
            .iter()
            .any(|(name, sent)| transition(secrets.ready(name, now).as_ref(), *sent).is_some())
    }

    /// When the soonest sent token stops being usable (and must be
    /// withdrawn unless replaced before).
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.names
            .values()
            .filter_map(|sent| match sent {
                Sent::Token(_, until) => Some(*until),
                Sent::Nothing | Sent::Withdrawn(_) => None,
            })
            .min()
    }
}

/// What a name's record becomes given the token usable now (`None`:
/// unchanged): the one state machine of token subscriptions.
fn transition(ready: Option<&Ready>, sent: Sent) -> Option<Sent> {
    match (ready, sent) {
        (Some(ready), Sent::Token(serial, _)) if ready.serial == serial => None,
        (Some(ready), _) => Some(Sent::Token(ready.serial, ready.usable_until)),
        (None, Sent::Token(serial, _)) => Some(Sent::Withdrawn(serial)),
        (None, Sent::Nothing | Sent::Withdrawn(_)) => None,
    }
}

/// Applies [`transition`] to `sent` and counts it; the new record, if it changed.
fn advance(secrets: &TokenSecrets, sent: &mut Sent, ready: Option<&Ready>) -> Option<Sent> {
    let next = transition(ready, *sent)?;
    *sent = next;
    match next {
        Sent::Token(..) => secrets.metrics.sent.inc(),
        Sent::Withdrawn(_) => secrets.metrics.withdrawn.inc(),
        Sent::Nothing => 0,
    };
    Some(next)
}

/// The delta version of a withdrawn secret: differs from the token's.
fn withdrawn_version(serial: u64) -> String {
    format!("{serial}-withdrawn")
}

/// Waits for the next write to the store; never completes without one
/// (no store, or the store is gone).
pub(crate) async fn changed(watch: Option<&mut watch::Receiver<()>>) {
    match watch {
        Some(watch) => {
            if watch.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Token secret metrics: `sds_token_secrets_sent_total`,
/// `sds_token_secrets_withdrawn_total`, `sds_token_secrets_refused_total`.
#[derive(Debug, Default)]
pub(crate) struct TokenMetrics {
    sent: Counter,
    withdrawn: Counter,
    refused: Counter,
    /// SDS streams open now (registered here only without interception).
    pub(crate) streams: Gauge,
}

impl TokenMetrics {
    /// Adds these metrics to `registry`, with `sds_streams` when
    /// `with_streams` (the certificate metrics register it otherwise).
    pub(crate) fn register(&self, registry: &mut Registry, with_streams: bool) {
        registry.register(
            "sds_token_secrets_sent",
            "Token secrets sent on SDS streams (first sends and pushes after a refresh)",
            self.sent.clone(),
        );
        registry.register(
            "sds_token_secrets_withdrawn",
            "Token secrets sent empty on SDS streams: no usable token any more (Envoy fails closed)",
            self.withdrawn.clone(),
        );
        registry.register(
            "sds_token_secrets_refused",
            "Token secret names refused: not a fast-path audience",
            self.refused.clone(),
        );
        if with_streams {
            registry.register("sds_streams", "SDS streams open now", self.streams.clone());
        }
    }

    /// (sent, withdrawn, refused), for tests.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (self.sent.get(), self.withdrawn.get(), self.refused.get())
    }
}

#[cfg(test)]
mod tests;
