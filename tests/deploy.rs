//! The shipped Kubernetes manifests: well-formed, least privilege, hardened,
//! and carrying the shipped Envoy config verbatim.

use std::path::Path;

fn documents() -> Vec<serde_yaml::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sidecar.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn rbac_allows_creating_tokens_for_one_service_account_only() {
    let docs = documents();
    let role = kind(&docs, "Role");
    let rules = role["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["resources"],
        serde_yaml::to_value(["serviceaccounts/token"]).unwrap()
    );
    assert_eq!(rules[0]["verbs"], serde_yaml::to_value(["create"]).unwrap());
    assert_eq!(
        rules[0]["resourceNames"],
        serde_yaml::to_value(["client"]).unwrap()
    );
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding")
    );
}

#[test]
fn containers_are_hardened_and_the_processor_matches_rbac() {
    let docs = documents();
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    for c in pod["containers"].as_sequence().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{:?}", c["name"]);
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{:?}", c["name"]);
    }
    let proc = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kube-audience-proxy")
        .unwrap();
    let args: Vec<&str> = proc["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--service-account=client"));
    assert!(args.contains(&"--grpc-listen-address=127.0.0.1:18080"));
    assert!(proc["readinessProbe"]["httpGet"]["path"] == "/readyz");

    // The CA key lives in a memory-backed volume that only the processor
    // mounts; the client mounts the certificate volume read-only.
    let volume = |name: &str| {
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(volume("ca-key")["emptyDir"]["medium"], "Memory");
    assert!(args.contains(&"--ca-key-file=/var/run/kube-audience-proxy-ca/ca.key"));
    for c in pod["containers"].as_sequence().unwrap() {
        let mounts = c["volumeMounts"].as_sequence().cloned().unwrap_or_default();
        let has_key = mounts.iter().any(|m| m["name"] == "ca-key");
        assert_eq!(
            has_key,
            c["name"] == "kube-audience-proxy",
            "{:?}",
            c["name"]
        );
        if c["name"] == "client" {
            let ca = mounts.iter().find(|m| m["name"] == "ca").unwrap();
            assert_eq!(ca["readOnly"], true);
        }
    }
}

#[test]
fn the_configmap_carries_the_shipped_envoy_config() {
    let docs = documents();
    let cm = kind(&docs, "ConfigMap");
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy.yaml"))
            .unwrap();
    assert_eq!(
        cm["data"]["envoy.yaml"].as_str().unwrap(),
        shipped,
        "deploy/sidecar.yaml is out of date: copy envoy/envoy.yaml into its ConfigMap"
    );
}
