//! The stack the process fault tests share: the API server stand-in, the
//! JWT-checking upstream, the shipped Envoy, and a processor on a fixed
//! loopback address so that a restarted one takes its place.
// Each test crate uses a part.
#![allow(dead_code)]

use std::time::Duration;

use serde_yaml::Value;

use crate::support;
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::envoy::{self, Envoy};
use support::processor::{self, Processor};
use support::upstream::Upstream;

/// Envoy's ext_proc `message_timeout` in the shipped config.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A request slower than `MESSAGE_TIMEOUT` plus this margin hung.
pub const MARGIN: Duration = Duration::from_secs(3);

/// The API server stand-in, the JWT-checking upstream, and the shipped Envoy
/// pointing at a processor address that survives a restart.
pub struct Stack {
    pub api: FakeApiServer,
    pub upstream: Upstream,
    pub envoy: Envoy,
    pub kubeconfig: support::Kubeconfig,
    /// The processor's gRPC address (`127.0.0.1:PORT`), fixed.
    pub grpc: String,
}

impl Stack {
    pub async fn stat(&self, name: &str) -> u64 {
        self.envoy.stat(name).await.unwrap_or(0)
    }

    /// Waits until Envoy's counter `name` is at least `n` (polled, bounded).
    pub async fn wait_for_stat(&self, name: &str, n: u64, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.stat(name).await;
            if value >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {name} is {value}, expected {n} within 20 s\n{}",
                self.envoy.logs()
            );
            // Polls Envoy's admin socket under the deadline.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until Envoy's counter `name` grew by `more` from now.
    pub async fn wait_for_more(&self, name: &str, more: u64, what: &str) {
        let base = self.stat(name).await;
        self.wait_for_stat(name, base + more, what).await;
    }

    pub async fn start_processor(&self, extra: &[&str]) -> Processor {
        let mut args = vec!["--grpc-listen-address", &self.grpc, "--log-level", "info"];
        args.extend_from_slice(extra);
        Processor::start(&self.kubeconfig.path, &args).await
    }
}

/// The stack with `failure_mode_allow` set as given, and a processor
/// started with `processor_args`.
pub async fn stack(failure_mode_allow: bool, processor_args: &[&str]) -> (Stack, Processor) {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let grpc = processor::free_loopback_address();
    let mut config = envoy::shipped_config();
    envoy::point_at_processor(&mut config, &grpc);
    let filter = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][0];
    assert_eq!(filter["name"], "envoy.filters.http.ext_proc");
    assert_eq!(
        filter["typed_config"]["failure_mode_allow"],
        Value::Bool(false)
    );
    filter["typed_config"]["failure_mode_allow"] = Value::Bool(failure_mode_allow);
    let envoy = Envoy::start(&config).await;
    let stack = Stack {
        api,
        upstream,
        envoy,
        kubeconfig,
        grpc,
    };
    let processor = stack.start_processor(processor_args).await;
    (stack, processor)
}

/// A request for `audience` through Envoy (plain HTTP, curl).
pub async fn get(s: &Stack, audience: &str) -> support::curl::Reply {
    let url = format!("{}/drain?kubernetes-audience={audience}", s.upstream.url());
    support::curl::via_proxy(&s.envoy.proxy_url(), &url, &[]).await
}

/// `200 with token`, or the status and, for the processor's own answers,
/// the reason it gave.
pub fn outcome(s: &Stack, reply: &support::curl::Reply, audience: &str) -> String {
    if reply.status == 200 {
        let got = s.upstream.last().expect("the upstream got it");
        assert_eq!(got.verdict.audiences(), [audience]);
        return "200 with token".to_owned();
    }
    // The reason up to its retry advice (which depends on timing).
    let reason = reply.body.lines().next().unwrap_or("");
    let reason = reason.split(';').next().unwrap_or("").trim();
    if reason.is_empty() {
        reply.status.to_string()
    } else {
        format!("{} ({reason})", reply.status)
    }
}
