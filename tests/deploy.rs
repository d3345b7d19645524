//! The shipped Kubernetes manifests: well-formed, least privilege (only the
//! processor container holds a ServiceAccount token), hardened, and carrying
//! the shipped Envoy config verbatim.

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

/// The kubelet's path for a ServiceAccount token, where kube's in-cluster
/// configuration reads `token` and `ca.crt`.
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Names of the pod's volumes that hold a ServiceAccount token.
fn token_volumes(pod: &serde_yaml::Value) -> Vec<&str> {
    pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|v| {
            v["projected"]["sources"]
                .as_sequence()
                .is_some_and(|s| s.iter().any(|s| !s["serviceAccountToken"].is_null()))
        })
        .map(|v| v["name"].as_str().unwrap())
        .collect()
}

#[test]
fn only_the_processor_holds_a_service_account_token() {
    let docs = documents();
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    // No container gets the token by default, whatever the ServiceAccount says.
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        kind(&docs, "ServiceAccount")["automountServiceAccountToken"],
        false
    );

    // One projected token: the API server's default audience (no audience
    // field), a bounded lifetime, the cluster CA and the namespace beside it.
    let volumes = token_volumes(pod);
    assert_eq!(volumes, ["kube-api-access"]);
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "kube-api-access")
        .unwrap();
    let sources = volume["projected"]["sources"].as_sequence().unwrap();
    let token = &sources
        .iter()
        .find(|s| !s["serviceAccountToken"].is_null())
        .unwrap()["serviceAccountToken"];
    assert_eq!(token["path"], "token");
    assert!(token["audience"].is_null(), "default audience: {token:?}");
    let lifetime = token["expirationSeconds"].as_u64().unwrap();
    assert!((600..=86400).contains(&lifetime), "{lifetime}");
    let ca = sources.iter().find(|s| !s["configMap"].is_null()).unwrap();
    assert_eq!(ca["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(ca["configMap"]["items"][0]["key"], "ca.crt");
    assert_eq!(ca["configMap"]["items"][0]["path"], "ca.crt");
    let ns = sources
        .iter()
        .find(|s| !s["downwardAPI"].is_null())
        .unwrap();
    assert_eq!(ns["downwardAPI"]["items"][0]["path"], "namespace");
    assert_eq!(
        ns["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    // Exactly the processor mounts it, read-only, where kube's in-cluster
    // configuration and the default --namespace-file read it; no other
    // container mounts any token volume or anything at the token path.
    let mut holders = Vec::new();
    for c in pod["containers"].as_sequence().unwrap() {
        let name = c["name"].as_str().unwrap();
        for m in c["volumeMounts"].as_sequence().cloned().unwrap_or_default() {
            let holds_token = volumes.contains(&m["name"].as_str().unwrap());
            let at_token_path = m["mountPath"]
                .as_str()
                .is_some_and(|p| p.starts_with("/var/run/secrets"));
            assert_eq!(holds_token, at_token_path, "{name}: {m:?}");
            if holds_token {
                assert_eq!(m["mountPath"], TOKEN_DIR, "{name}");
                assert_eq!(m["readOnly"], true, "{name}");
                holders.push(name);
            }
        }
    }
    assert_eq!(holders, ["kube-audience-proxy"]);
    let cli =
        <kube_audience_proxy::config::Cli as clap::Parser>::try_parse_from(["kube-audience-proxy"])
            .unwrap();
    assert_eq!(
        cli.namespace_file,
        Path::new(TOKEN_DIR).join("namespace"),
        "--namespace-file defaults to the mounted namespace"
    );
    assert!(pod["initContainers"].is_null() && pod["ephemeralContainers"].is_null());
}

#[test]
fn envoy_admin_socket_lives_in_a_volume_only_envoy_mounts() {
    let docs = documents();
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let shipped = support_envoy_admin_path();
    let dir = Path::new(&shipped).parent().unwrap();
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "envoy-admin")
        .unwrap();
    assert_eq!(volume["emptyDir"]["medium"], "Memory");
    for c in pod["containers"].as_sequence().unwrap() {
        let mounts = c["volumeMounts"].as_sequence().cloned().unwrap_or_default();
        let admin = mounts.iter().find(|m| m["name"] == "envoy-admin");
        if c["name"] == "envoy" {
            let admin = admin.expect("Envoy mounts its admin socket's directory");
            assert_eq!(admin["mountPath"].as_str().map(Path::new), Some(dir));
        } else {
            assert!(
                admin.is_none(),
                "{:?} mounts Envoy's admin socket",
                c["name"]
            );
        }
    }
}

/// The admin socket path of the shipped Envoy config.
fn support_envoy_admin_path() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy.yaml");
    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    config["admin"]["address"]["pipe"]["path"]
        .as_str()
        .expect("Envoy's admin on a Unix socket")
        .to_owned()
}

/// The processor's arguments in the manifest are a valid configuration for
/// the real parser (the pod's environment filled in), and they bind the
/// audience to its destination with an `https://` rule.
#[test]
fn the_processor_arguments_parse_and_bind_audiences_to_destinations() {
    use clap::Parser;
    use kube_audience_proxy::config::{Cli, Config};

    let docs = documents();
    let pod = &kind(&docs, "Deployment")["spec"]["template"]["spec"];
    let proc = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kube-audience-proxy")
        .unwrap();
    let mut argv = vec!["kube-audience-proxy".to_owned()];
    for arg in proc["args"].as_sequence().unwrap() {
        argv.push(arg.as_str().unwrap().replace("$(POD_IP)", "127.0.0.1"));
    }
    assert!(
        argv.iter()
            .any(|a| a.starts_with("--audience-rule=https://")),
        "the shipped pod binds its audience to a destination: {argv:?}"
    );
    // What the downward API and the projected volume provide in the pod.
    argv.extend(
        [
            "--namespace=monitoring",
            "--pod-name=client-0",
            "--pod-uid=0c1d",
        ]
        .map(str::to_owned),
    );
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    if let Err(errors) = Config::try_from(cli) {
        panic!("the manifest's processor arguments are refused:\n{errors}");
    }
}
