//! Who reaches whom: the client and its proxy settings, the CA it trusts
//! (sidecar), the standalone NetworkPolicy and Service, and the Istio
//! EnvoyFilter's selector.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::render::{Rendered, render};

fn labels(r: &Rendered) -> BTreeMap<String, String> {
    let template = &r.deployments[0].spec.template;
    template.metadata.clone().unwrap().labels.unwrap()
}

#[test]
fn the_sidecar_client_trusts_the_ca_the_processor_writes_through_memory() {
    let r = render("sidecar");
    let pod = r.pod();
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap()
            .clone()
    };
    for name in ["ca", "ca-key"] {
        assert_eq!(
            volume(name).empty_dir.unwrap().medium.as_deref(),
            Some("Memory"),
            "{name}"
        );
    }
    let mount = |c: &str, v: &str| {
        r.container(c)
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == v)
            .cloned()
    };
    // The processor writes the certificate into `ca`, keeps the key in `ca-key`.
    let ca_dir = mount("kube-audience-proxy", "ca").unwrap().mount_path;
    let ca_file = r.processor_flag("--ca-file-destination").unwrap();
    assert_eq!(ca_file, format!("{ca_dir}/ca.crt"));
    let key_dir = mount("kube-audience-proxy", "ca-key").unwrap().mount_path;
    assert!(
        r.processor_flag("--ca-key-file")
            .unwrap()
            .starts_with(&format!("{key_dir}/"))
    );
    for c in r.containers() {
        let has_key = mount(&c.name, "ca-key").is_some();
        assert_eq!(has_key, c.name == "kube-audience-proxy", "{}", c.name);
    }
    // The client reads the same file, read-only, and sends through Envoy.
    let client = mount("prometheus", "ca").unwrap();
    assert_eq!(client.mount_path, ca_dir);
    assert_eq!(client.read_only, Some(true));
    let prometheus = r.config_map("prometheus").data.clone().unwrap()["prometheus.yml"].clone();
    let prometheus: serde_yaml::Value = serde_yaml::from_str(&prometheus).unwrap();
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(
        job["tls_config"]["ca_file"].as_str(),
        Some(ca_file.as_str())
    );
    assert_eq!(job["proxy_url"], "http://127.0.0.1:8080");
    assert_eq!(job["scheme"], "https");
    // The scraped target is the one the processor's https:// rule names.
    let target = job["static_configs"][0]["targets"][0].as_str().unwrap();
    let rule = r.processor_flag("--audience-rule").unwrap();
    assert!(
        rule.starts_with(&format!("https://{target}=")),
        "{rule} vs {target}"
    );
    let env = r.container("prometheus").env.clone().unwrap();
    for var in ["HTTP_PROXY", "HTTPS_PROXY"] {
        let value = env
            .iter()
            .find(|e| e.name == var)
            .and_then(|e| e.value.clone());
        assert_eq!(value.as_deref(), Some("http://127.0.0.1:8080"), "{var}");
    }
}

#[test]
fn standalone_admits_only_the_client_and_only_to_the_proxy_port() {
    let r = render("standalone");
    let pod_labels = labels(&r);
    assert_eq!(r.network_policies.len(), 1);
    let spec = r.network_policies[0].spec.clone().unwrap();
    assert_eq!(
        spec.pod_selector.unwrap().match_labels.as_ref(),
        Some(&pod_labels)
    );
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    let ingress = spec.ingress.unwrap();
    assert_eq!(ingress.len(), 1, "one rule: the client, to the proxy port");
    let from = ingress[0].from.clone().unwrap();
    assert_eq!(from.len(), 1);
    let client = from[0].pod_selector.clone().unwrap().match_labels.unwrap();
    assert_eq!(
        client,
        BTreeMap::from([("app".to_owned(), "client".to_owned())])
    );
    assert!(from[0].namespace_selector.is_none() && from[0].ip_block.is_none());
    assert_ne!(client, pod_labels, "the proxy does not admit itself");
    let ports = ingress[0].ports.clone().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(IntOrString::Int(8080)));
    // 8080 is Envoy's proxy port; the admin port is in no rule at all.
    let envoy_ports = r.container("envoy").ports.clone().unwrap();
    assert_eq!(envoy_ports[0].container_port, 8080);
    let admin = r.processor_flag("--admin-listen-address").unwrap();
    assert!(
        !ports
            .iter()
            .any(|p| admin.ends_with(&format!(":{:?}", p.port)))
    );

    // The Service selects the proxy pod and exposes the proxy port only.
    assert_eq!(r.services.len(), 1);
    let service = r.services[0].spec.clone().unwrap();
    assert_eq!(service.selector.as_ref(), Some(&pod_labels));
    let service_ports = service.ports.unwrap();
    assert_eq!(service_ports.len(), 1);
    assert_eq!(service_ports[0].target_port, Some(IntOrString::Int(8080)));
}

#[test]
fn the_envoy_filter_selects_the_pod_that_runs_the_processor() {
    let r = render("istio");
    assert_eq!(r.custom.len(), 1);
    let filter = &r.custom[0];
    assert_eq!(filter["metadata"]["namespace"], "monitoring");
    let selector: BTreeMap<String, String> =
        serde_yaml::from_value(filter["spec"]["workloadSelector"]["labels"].clone()).unwrap();
    let pod_labels = labels(&r);
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "{selector:?}"
    );
    // The EnvoyFilter's processor cluster dials the processor's gRPC port.
    let cluster = filter["spec"]["configPatches"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["applyTo"] == "CLUSTER")
        .unwrap();
    let sa = &cluster["patch"]["value"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    let dialled = format!(
        "{}:{}",
        sa["address"].as_str().unwrap(),
        sa["port_value"].as_u64().unwrap()
    );
    assert_eq!(r.processor_flag("--grpc-listen-address"), Some(dialled));
    // No CA in this mode: Istio originates TLS, nothing is intercepted.
    assert!(r.processor_flag("--intercept-host").is_none());
}
