//! The Istio EnvoyFilter: the shipped one is valid against Istio's
//! EnvoyFilter schema (that it is `envoy-config --format=istio` for its
//! deployment's flags is checked in tests/deploy), and the patches the
//! generator writes work in the real Envoy (spliced into the shipped
//! bootstrap as Istio would apply them, then driven end to end with curl).
//! Istio itself cannot run on this machine.

mod support;

use std::path::Path;

use serde_yaml::Value;
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::{TokenVerdict, Upstream};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn envoy_filter() -> Value {
    let text = std::fs::read_to_string(root().join("deploy/istio/envoyfilter.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn patch<'a>(filter: &'a Value, apply_to: &str) -> &'a Value {
    filter["spec"]["configPatches"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["applyTo"] == apply_to)
        .unwrap_or_else(|| panic!("no {apply_to} patch"))
}

#[test]
fn the_envoy_filter_matches_istios_schema() {
    let schema_text = std::fs::read_to_string(
        root().join("tests/fixtures/istio/envoyfilter-v1alpha3.schema.json"),
    )
    .unwrap();
    let schema: serde_json::Value = serde_json::from_str(&schema_text).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    let filter: serde_json::Value = serde_json::to_value(envoy_filter()).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&filter)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(filter["apiVersion"], "networking.istio.io/v1alpha3");
    assert_eq!(filter["kind"], "EnvoyFilter");

    // The schema is not a rubber stamp: a wrong patch is refused.
    let mut broken = filter.clone();
    broken["spec"]["configPatches"][0]["applyTo"] = "NOT_A_TARGET".into();
    assert!(!validator.is_valid(&broken));
}

/// The shipped bootstrap with `filter`'s patches applied as Istio applies
/// them to the sidecar's outbound chain: the HTTP filter before the
/// router (in place of our own ext_proc filter), the processor cluster,
/// the route configuration's header removal merged; `route` (if any)
/// first among the routes.
fn patched_bootstrap(filter: &Value, processor: &str, route: Option<Value>) -> Value {
    let mut config = envoy::shipped_config();
    let hcm = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filters = hcm["http_filters"].as_sequence_mut().unwrap();
    filters.retain(|f| f["name"] != "envoy.filters.http.ext_proc");
    let router = filters.len() - 1;
    filters.insert(
        router,
        patch(filter, "HTTP_FILTER")["patch"]["value"].clone(),
    );
    let merge = &patch(filter, "ROUTE_CONFIGURATION")["patch"];
    assert_eq!(merge["operation"], "MERGE");
    hcm["route_config"]["request_headers_to_remove"] =
        merge["value"]["request_headers_to_remove"].clone();
    let clusters = config["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    clusters.retain(|c| c["name"] != "kube_audience_proxy");
    clusters.push(patch(filter, "CLUSTER")["patch"]["value"].clone());
    if let Some(route) = route {
        envoy::routes_mut(&mut config).insert(0, route);
    }
    envoy::point_at_processor(&mut config, processor);
    config
}

/// Two upstreams, a processor whose rules give `fast` the audience
/// `node-exporter` (the fast path) and admit any audience for `dynamic`,
/// and the EnvoyFilter `envoy-config --format=istio` generates for the
/// processor's very flags.
struct Patched {
    _api: FakeApiServer,
    fast: Upstream,
    dynamic: Upstream,
    _kubeconfig: support::Kubeconfig,
    processor: Processor,
    filter: Value,
}

impl Patched {
    async fn start() -> Patched {
        let api = FakeApiServer::start(ApiServerOptions::default()).await;
        let fast = Upstream::start(api.verifier()).await;
        let dynamic = Upstream::start(api.verifier()).await;
        let kubeconfig = support::Kubeconfig::of(&api);
        let rules = [
            format!(
                "--audience-rule=127.0.0.1:{}=node-exporter",
                fast.addr().port()
            ),
            format!("--audience-rule=127.0.0.1:{}=*", dynamic.addr().port()),
        ];
        let rule_args: Vec<&str> = rules.iter().map(String::as_str).collect();
        let processor = Processor::start(&kubeconfig.path, &rule_args).await;
        let mut args = vec!["--format=istio".to_owned()];
        args.extend(support::COMMON_ARGS.iter().map(|a| a.to_string()));
        args.extend(rules);
        args.push(format!("--grpc-listen-address={}", processor.grpc));
        let filter = envoy::generated_config(&args);
        Patched {
            _api: api,
            fast,
            dynamic,
            _kubeconfig: kubeconfig,
            processor,
            filter,
        }
    }
}

/// The patches `envoy-config --format=istio` generates, in the real Envoy:
/// the rule's destination gets its token from Envoy itself (no ext_proc
/// stream), a dynamic audience from the processor, and the audience header
/// never reaches the upstream on either path.
#[tokio::test]
async fn the_generated_patches_work_in_envoy() {
    // Kept whole: the API server and kubeconfig must outlive the test.
    let patched = Patched::start().await;
    let (fast, dynamic, processor, filter) = (
        &patched.fast,
        &patched.dynamic,
        &patched.processor,
        &patched.filter,
    );
    let envoy = Envoy::start(&patched_bootstrap(filter, &processor.grpc, None)).await;
    let streams = "http.forward_proxy.ext_proc.streams_started";

    let url = format!("{}/metrics", fast.url());
    let header = ["-H", "x-kubernetes-audience: node-exporter"];
    for extra in [&[][..], &header[..]] {
        let reply = support::curl::via_proxy(&envoy.proxy_url(), &url, extra).await;
        assert_eq!(reply.status, 200, "{reply:?}\n{}", envoy.logs());
        let got = fast.received().pop().unwrap();
        assert_eq!(got.header("x-kubernetes-audience"), None);
        match got.verdict {
            TokenVerdict::Valid(claims) => assert_eq!(claims.aud, ["node-exporter"]),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(envoy.stat(streams).await.unwrap_or(0), 0);

    let url = format!("{}/metrics?x=1", dynamic.url());
    let reply = support::curl::via_proxy(
        &envoy.proxy_url(),
        &url,
        &["-H", "x-kubernetes-audience: other"],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got = dynamic.received().pop().unwrap();
    assert_eq!(got.path, "/metrics?x=1");
    assert_eq!(got.header("x-kubernetes-audience"), None);
    match got.verdict {
        TokenVerdict::Valid(claims) => assert_eq!(claims.aud, ["other"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(envoy.stat(streams).await, Some(1));
}

/// A per-route audience (README, "Per-route audience"): a route's
/// `typed_per_filter_config` for `envoy.filters.http.ext_proc` still
/// reaches the ext_proc filter when the fast path wraps it in the
/// composite filter, so a request that names no audience gets a token for
/// the route's audience; other routes get none.
#[tokio::test]
async fn a_per_route_audience_reaches_ext_proc_behind_the_fast_path() {
    let patched = Patched::start().await;
    let (dynamic, processor, filter) = (&patched.dynamic, &patched.processor, &patched.filter);
    let composite = &patch(filter, "HTTP_FILTER")["patch"]["value"];
    assert_eq!(composite["name"], "envoy.filters.http.ext_proc");
    assert!(
        composite["typed_config"]["@type"]
            .as_str()
            .unwrap()
            .ends_with("ExtensionWithMatcher")
    );
    let route: Value = serde_yaml::from_str(
        r#"
match: { prefix: "/per-route/" }
route: { cluster: dynamic_forward_proxy }
typed_per_filter_config:
  envoy.filters.http.ext_proc:
    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
    overrides:
      grpc_initial_metadata:
      - key: x-kubernetes-audience
        value: per-route
"#,
    )
    .unwrap();
    let envoy = Envoy::start(&patched_bootstrap(filter, &processor.grpc, Some(route))).await;

    let url = format!("{}/per-route/metrics", dynamic.url());
    let reply = support::curl::via_proxy(&envoy.proxy_url(), &url, &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", envoy.logs());
    match dynamic.received().pop().unwrap().verdict {
        TokenVerdict::Valid(claims) => assert_eq!(claims.aud, ["per-route"]),
        other => panic!("{other:?}"),
    }
    let reply =
        support::curl::via_proxy(&envoy.proxy_url(), &format!("{}/other", dynamic.url()), &[])
            .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(matches!(
        dynamic.received().pop().unwrap().verdict,
        TokenVerdict::Missing
    ));
}
