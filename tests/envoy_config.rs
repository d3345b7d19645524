//! Every Envoy configuration this repository ships is accepted by the real
//! Envoy (`--mode validate`), and keeps the settings the processor relies on.

mod support;

use std::path::Path;
use std::process::Command;

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
    // Everything binds loopback.
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy.yaml"))
            .unwrap();
    for line in text
        .lines()
        .filter(|l| l.contains("address:") && l.contains("port_value"))
    {
        assert!(line.contains("127.0.0.1"), "non-loopback address: {line}");
    }
}
