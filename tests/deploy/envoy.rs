//! The Envoy configuration each package ships as a generated ConfigMap:
//! equal to `envoy/envoy.yaml` (or its one documented variant), accepted by
//! the real Envoy, mounted by Envoy only, admin socket in Envoy's own volume.

use std::path::Path;
use std::process::Command;

use crate::render::{Rendered, render, root};
use crate::support;

/// The modes that run their own Envoy.
const ENVOY_MODES: [&str; 2] = ["sidecar", "standalone"];

fn shipped() -> String {
    std::fs::read_to_string(root().join("envoy/envoy.yaml")).unwrap()
}

/// The proxy listener line of the shipped config, and the standalone variant's.
const LOOPBACK: &str = "      socket_address: { address: 127.0.0.1, port_value: 8080 }\n";
const ANY: &str = "      socket_address: { address: 0.0.0.0, port_value: 8080 }\n";

/// What the package's ConfigMap must hold: `envoy/envoy.yaml` verbatim, or
/// (standalone, where the client is another pod) with the proxy listener on
/// 0.0.0.0 instead of loopback; nothing else differs.
fn expected(mode: &str) -> String {
    let shipped = shipped();
    match mode {
        "sidecar" => shipped,
        _ => {
            assert_eq!(shipped.matches(LOOPBACK).count(), 1);
            shipped.replacen(LOOPBACK, ANY, 1)
        }
    }
}

fn envoy_config(r: &Rendered) -> String {
    let cm = r.config_map("kube-audience-proxy-envoy");
    cm.data.clone().unwrap()["envoy.yaml"].clone()
}

#[test]
fn the_configmaps_carry_the_shipped_envoy_config() {
    for mode in ENVOY_MODES {
        let r = render(mode);
        let (got, want) = (envoy_config(&r), expected(mode));
        let first_difference = got.lines().zip(want.lines()).position(|(a, b)| a != b);
        assert!(
            got == want,
            "deploy/{mode}/envoy.yaml is out of date (first differing line: {first_difference:?}, \
             lengths {} and {}): run scripts/sync-deploy",
            got.len(),
            want.len()
        );
        // The pod mounts that very ConfigMap (kustomize's hashed name).
        let volume = r
            .pod()
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "envoy-config")
            .unwrap();
        let name = volume.config_map.clone().unwrap().name;
        assert_eq!(
            Some(&name),
            r.config_map("kube-audience-proxy-envoy")
                .metadata
                .name
                .as_ref()
        );
        let envoy = r.container("envoy");
        let args = envoy.args.clone().unwrap();
        let mount = envoy
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "envoy-config")
            .unwrap();
        assert_eq!(mount.read_only, Some(true));
        assert!(
            args.windows(2)
                .any(|w| w == ["-c", &format!("{}/envoy.yaml", mount.mount_path)])
        );
    }
}

#[test]
fn envoy_accepts_the_configmaps() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ENVOY_MODES {
        let file = dir.path().join(format!("{mode}.yaml"));
        std::fs::write(&file, envoy_config(&render(mode))).unwrap();
        let output = Command::new(support::envoy::binary())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "deploy/{mode}:\n{text}");
        assert!(text.contains("OK"), "{text}");
    }
}

#[test]
fn envoy_admin_socket_lives_in_a_volume_only_envoy_mounts() {
    let config: serde_yaml::Value = serde_yaml::from_str(&shipped()).unwrap();
    let socket = config["admin"]["address"]["pipe"]["path"]
        .as_str()
        .expect("admin on a socket");
    let dir = Path::new(socket).parent().unwrap();
    for mode in ENVOY_MODES {
        let r = render(mode);
        let volume = r
            .pod()
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "envoy-admin")
            .unwrap();
        assert_eq!(
            volume.empty_dir.clone().unwrap().medium.as_deref(),
            Some("Memory")
        );
        for c in r.containers() {
            let admin = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "envoy-admin");
            if c.name == "envoy" {
                let admin = admin.expect("Envoy mounts its admin socket's directory");
                assert_eq!(Path::new(&admin.mount_path), dir, "deploy/{mode}");
            } else {
                assert!(
                    admin.is_none(),
                    "deploy/{mode}: {} mounts Envoy's admin socket",
                    c.name
                );
            }
        }
    }
}

/// Envoy's cluster for the processor dials the processor's gRPC listener.
#[test]
fn envoy_dials_the_processors_grpc_listener() {
    for mode in ENVOY_MODES {
        let r = render(mode);
        let config: serde_yaml::Value = serde_yaml::from_str(&envoy_config(&r)).unwrap();
        let cluster = config["static_resources"]["clusters"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "kube_audience_proxy")
            .unwrap();
        let sa = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        let dialled = format!(
            "{}:{}",
            sa["address"].as_str().unwrap(),
            sa["port_value"].as_u64().unwrap()
        );
        assert_eq!(
            r.processor_flag("--grpc-listen-address"),
            Some(dialled),
            "deploy/{mode}"
        );
    }
}
