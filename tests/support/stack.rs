//! The usual end-to-end stack: the TokenRequest-compatible API server, the
//! JWT-checking upstream (plain HTTP), the real processor binary and the
//! real Envoy with the shipped `envoy/envoy.yaml` pointing at it. Test
//! files add their own methods (`impl Stack` in the test crate).

use serde_yaml::Value;

use super::Kubeconfig;
use super::apiserver::{ApiServerOptions, FakeApiServer};
use super::curl;
use super::envoy::{self, Envoy};
use super::processor::Processor;
use super::upstream::Upstream;

pub struct Stack {
    pub api: FakeApiServer,
    pub upstream: Upstream,
    pub processor: Processor,
    pub envoy: Envoy,
    pub kubeconfig: Kubeconfig,
}

impl Stack {
    /// A default API server and a processor started with `processor_args`
    /// (after `support::COMMON_ARGS`).
    pub async fn start(processor_args: &[&str]) -> Stack {
        Stack::start_with(processor_args, |_| {}).await
    }

    /// As [`start`](Self::start); `edit` may change the shipped config
    /// before Envoy starts.
    pub async fn start_with(processor_args: &[&str], edit: impl FnOnce(&mut Value)) -> Stack {
        let api = FakeApiServer::start(ApiServerOptions::default()).await;
        Stack::start_on(api, processor_args, edit).await
    }

    /// As [`start_with`](Self::start_with), on an API server the test set up.
    pub async fn start_on(
        api: FakeApiServer,
        processor_args: &[&str],
        edit: impl FnOnce(&mut Value),
    ) -> Stack {
        let upstream = Upstream::start(api.verifier()).await;
        let kubeconfig = Kubeconfig::of(&api);
        let processor = Processor::start(&kubeconfig.path, processor_args).await;
        let mut config = envoy::shipped_config();
        envoy::point_at_processor(&mut config, &processor.grpc);
        edit(&mut config);
        let envoy = Envoy::start(&config).await;
        Stack {
            api,
            upstream,
            processor,
            envoy,
            kubeconfig,
        }
    }

    /// curl through Envoy to `path_and_query` on the upstream.
    pub async fn get(&self, path_and_query: &str, extra: &[&str]) -> curl::Reply {
        let url = format!("{}{path_and_query}", self.upstream.url());
        curl::via_proxy(&self.envoy.proxy_url(), &url, extra).await
    }
}
