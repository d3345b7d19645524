//! The shipped Istio EnvoyFilter: valid against Istio's EnvoyFilter schema,
//! and the Envoy configuration inside its patches works in the real Envoy
//! (spliced into the shipped bootstrap in place of our own ext_proc filter
//! and processor cluster, then driven end to end with curl). Istio itself
//! cannot run on this machine.

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

#[tokio::test]
async fn the_patched_filter_and_cluster_work_in_envoy() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let processor = Processor::start(&kubeconfig.path, &[]).await;

    let filter = envoy_filter();
    let mut config = envoy::shipped_config();
    // The ext_proc filter Istio would insert before the router.
    let hcm = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filters = hcm["http_filters"].as_sequence_mut().unwrap();
    filters.retain(|f| f["name"] != "envoy.filters.http.ext_proc");
    let router = filters.len() - 1;
    filters.insert(
        router,
        patch(&filter, "HTTP_FILTER")["patch"]["value"].clone(),
    );
    // The processor cluster Istio would add.
    let clusters = config["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    clusters.retain(|c| c["name"] != "kube_audience_proxy");
    clusters.push(patch(&filter, "CLUSTER")["patch"]["value"].clone());
    envoy::point_at_processor(&mut config, &processor.grpc);
    let envoy = Envoy::start(&config).await;

    let url = format!(
        "{}/metrics?kubernetes-audience=node-exporter&x=1",
        upstream.url()
    );
    let reply = support::curl::via_proxy(&envoy.proxy_url(), &url, &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", envoy.logs());
    let got = upstream.received().pop().unwrap();
    assert_eq!(got.path, "/metrics?x=1");
    match got.verdict {
        TokenVerdict::Valid(claims) => assert_eq!(claims.aud, ["node-exporter"]),
        other => panic!("{other:?}"),
    }
}

/// The per-route patch: a route carrying the EnvoyFilter's MERGE value names
/// the audience in the ext_proc stream's metadata, so a request that names
/// none gets a token for it; other routes get none.
#[tokio::test]
async fn the_per_route_patch_names_the_audience_in_envoy() {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start(api.verifier()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let processor = Processor::start(&kubeconfig.path, &[]).await;

    let filter = envoy_filter();
    let route_patch = patch(&filter, "HTTP_ROUTE");
    assert_eq!(route_patch["patch"]["operation"], "MERGE");
    assert_eq!(route_patch["match"]["context"], "SIDECAR_OUTBOUND");
    let vhost = route_patch["match"]["routeConfiguration"]["vhost"]["name"]
        .as_str()
        .unwrap();
    assert!(
        vhost.ends_with(":9100"),
        "Istio names vhosts HOST:PORT: {vhost}"
    );

    let mut config = envoy::shipped_config();
    let hcm = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let filters = hcm["http_filters"].as_sequence_mut().unwrap();
    filters.retain(|f| f["name"] != "envoy.filters.http.ext_proc");
    let router = filters.len() - 1;
    filters.insert(
        router,
        patch(&filter, "HTTP_FILTER")["patch"]["value"].clone(),
    );
    let clusters = config["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    clusters.retain(|c| c["name"] != "kube_audience_proxy");
    clusters.push(patch(&filter, "CLUSTER")["patch"]["value"].clone());
    // The route Istio would generate for that virtual host, with the patch
    // merged into it.
    let mut route: Value = serde_yaml::from_str(
        "match: { prefix: \"/node-exporter/\" }\nroute: { cluster: dynamic_forward_proxy }",
    )
    .unwrap();
    for (key, value) in route_patch["patch"]["value"].as_mapping().unwrap() {
        route[key.as_str().unwrap()] = value.clone();
    }
    envoy::routes_mut(&mut config).insert(0, route);
    envoy::point_at_processor(&mut config, &processor.grpc);
    let envoy = Envoy::start(&config).await;

    let url = format!("{}/node-exporter/metrics", upstream.url());
    let reply = support::curl::via_proxy(&envoy.proxy_url(), &url, &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", envoy.logs());
    let audience = route_patch["patch"]["value"]["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
        ["overrides"]["grpc_initial_metadata"][0]["value"]
        .as_str()
        .unwrap();
    match upstream.received().pop().unwrap().verdict {
        TokenVerdict::Valid(claims) => assert_eq!(claims.aud, [audience]),
        other => panic!("{other:?}"),
    }
    let reply = support::curl::via_proxy(
        &envoy.proxy_url(),
        &format!("{}/other", upstream.url()),
        &[],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(matches!(
        upstream.received().pop().unwrap().verdict,
        TokenVerdict::Missing
    ));
}
