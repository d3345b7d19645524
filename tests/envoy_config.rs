//! Every Envoy configuration this repository ships is accepted by the real
//! Envoy (`--mode validate`), and keeps the settings the processor relies on.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use serde::Deserialize as _;
use serde_yaml::Value;

fn shipped_configs() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy");
    let mut configs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    configs.sort();
    assert!(!configs.is_empty(), "no Envoy config in {}", dir.display());
    configs
}

#[test]
fn envoy_accepts_the_shipped_configs() {
    for config in shipped_configs() {
        let output = Command::new(support::envoy::binary())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}:\n{text}", config.display());
        assert!(text.contains("OK"), "{text}");
    }
}

#[test]
fn the_ext_proc_filter_fails_closed_and_sends_headers_only() {
    let config = support::envoy::shipped_config();
    let filters = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"];
    let ext_proc = &filters[0];
    assert_eq!(
        ext_proc["name"], "envoy.filters.http.ext_proc",
        "ext_proc runs first"
    );
    let c = &ext_proc["typed_config"];
    assert_eq!(c["failure_mode_allow"], false);
    assert_eq!(
        c["grpc_service"]["envoy_grpc"]["cluster_name"],
        "kube_audience_proxy"
    );
    assert_eq!(c["processing_mode"]["request_header_mode"], "SEND");
    for skipped in [
        "response_header_mode",
        "request_trailer_mode",
        "response_trailer_mode",
    ] {
        assert_eq!(c["processing_mode"][skipped], "SKIP");
    }
}

/// Every `socket_address` (with its path) in `value` and below.
fn socket_addresses(value: &Value, path: &str, found: &mut Vec<(String, Value)>) {
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                let key = key
                    .as_str()
                    .map_or_else(|| format!("{key:?}"), str::to_owned);
                let path = format!("{path}.{key}");
                if key == "socket_address" {
                    found.push((path.clone(), child.clone()));
                }
                socket_addresses(child, &path, found);
            }
        }
        Value::Sequence(items) => {
            for (i, child) in items.iter().enumerate() {
                socket_addresses(child, &format!("{path}[{i}]"), found);
            }
        }
        Value::Tagged(tagged) => socket_addresses(&tagged.value, path, found),
        _ => {}
    }
}

/// The `(address, port)` of every `socket_address` in the YAML documents of
/// `file`, each checked to be an IP literal and a port number.
fn addresses_in(file: &Path) -> Vec<(String, IpAddr, u16)> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut found = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let document = Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{}: document {i}: {e}", file.display()));
        socket_addresses(&document, &format!("{}#{i}", file.display()), &mut found);
    }
    found
        .into_iter()
        .map(|(path, sa)| {
            let ip = sa["address"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .unwrap_or_else(|| panic!("{path}: address is not an IP: {sa:?}"));
            let port = sa["port_value"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("{path}: port_value is not a port: {sa:?}"));
            (path, ip, port)
        })
        .collect()
}

#[test]
fn every_shipped_envoy_address_is_loopback() {
    // deploy/sidecar carries envoy/envoy.yaml verbatim, deploy/standalone with
    // the proxy listener on 0.0.0.0 for its client pod (tests/deploy/envoy.rs).
    let mut files = shipped_configs();
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/istio/envoyfilter.yaml"));
    for file in files {
        let addresses = addresses_in(&file);
        assert!(
            !addresses.is_empty(),
            "{}: no socket_address",
            file.display()
        );
        for (path, ip, port) in &addresses {
            assert!(ip.is_loopback(), "{path}: {ip}:{port} is not loopback");
        }
    }
    // The walk sees what the proxy binds and dials: forward proxy,
    // processor. Envoy's admin has no TCP address at all (next test).
    let envoy_yaml = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy.yaml");
    let ports: Vec<u16> = addresses_in(&envoy_yaml)
        .into_iter()
        .map(|(_, _, port)| port)
        .collect();
    for port in [8080, 18080] {
        assert!(ports.contains(&port), "port {port} not found in {ports:?}");
    }
}

#[test]
fn envoy_admin_listens_on_a_private_unix_socket_only() {
    let config = support::envoy::shipped_config();
    let address = &config["admin"]["address"];
    let mut found = Vec::new();
    socket_addresses(address, "admin.address", &mut found);
    assert!(found.is_empty(), "admin on TCP: {found:?}");
    let path = address["pipe"]["path"].as_str().expect("admin on a pipe");
    assert_eq!(path, "/tmp/kube-audience-proxy-envoy-admin.sock");
    // 0600: only Envoy's own user may connect.
    assert_eq!(address["pipe"]["mode"].as_u64(), Some(0o600));
}
