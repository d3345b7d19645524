//! The Envoy configuration each package ships (a ConfigMap kustomize
//! generates, or Istio's EnvoyFilter): byte for byte what `kube-audience-proxy
//! envoy-config` prints for the package's own processor flags, accepted by
//! the real Envoy, mounted by Envoy only, admin socket in Envoy's own volume.

use std::path::Path;
use std::process::Command;

use crate::render::{Rendered, render, root};
use crate::support;

/// The modes that run their own Envoy.
const ENVOY_MODES: [&str; 2] = ["sidecar", "standalone"];

/// What the package's Envoy configuration must be: `envoy-config` with
/// exactly the flags of the package's processor container (one source of
/// truth for the destination rules and fast-path audiences), plus Envoy's
/// statistics on loopback for the sidecar (its Prometheus scrapes them),
/// the proxy listener on 0.0.0.0 for standalone (the client is another pod)
/// and `--format=istio` for Istio.
fn expected(mode: &str, r: &Rendered) -> String {
    let mut args = match mode {
        "sidecar" => vec!["--envoy-stats-listen-address=127.0.0.1:9902".to_owned()],
        "standalone" => vec!["--proxy-listen-address=0.0.0.0:8080".to_owned()],
        "istio" => vec!["--format=istio".to_owned()],
        _ => Vec::new(),
    };
    args.extend(r.processor_args());
    support::envoy::generated(&args)
}

/// The differing line, for a readable failure.
fn assert_same(mode: &str, file: &str, got: &str, want: &str) {
    let first_difference = got
        .lines()
        .zip(want.lines())
        .position(|(a, b)| a != b)
        .map(|i| (i + 1, got.lines().nth(i), want.lines().nth(i)));
    assert!(
        got == want,
        "deploy/{mode}/{file} is not what envoy-config generates for the package's processor \
         flags (first differing line: {first_difference:?}, lengths {} and {}): run scripts/sync-deploy",
        got.len(),
        want.len()
    );
}

#[test]
fn the_istio_envoy_filter_is_generated_from_the_processors_flags() {
    let r = render("istio");
    let shipped = std::fs::read_to_string(root().join("deploy/istio/envoyfilter.yaml")).unwrap();
    assert_same(
        "istio",
        "envoyfilter.yaml",
        &shipped,
        &expected("istio", &r),
    );
}

fn envoy_config(r: &Rendered) -> String {
    let cm = r.config_map("kube-audience-proxy-envoy");
    cm.data.clone().unwrap()["envoy.yaml"].clone()
}

#[test]
fn the_configmaps_carry_the_shipped_envoy_config() {
    for mode in ENVOY_MODES {
        let r = render(mode);
        let (got, want) = (envoy_config(&r), expected(mode, &r));
        assert_same(mode, "envoy.yaml", &got, &want);
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
    let shipped = std::fs::read_to_string(root().join("envoy/envoy.yaml")).unwrap();
    let config: serde_yaml::Value = serde_yaml::from_str(&shipped).unwrap();
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
