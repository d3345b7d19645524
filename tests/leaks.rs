//! No credential reaches a file: the real processor runs under strace, which
//! records every file it opens for writing, creates, renames or links, while
//! it mints a CA, signs a leaf for an intercepted HTTPS request through the
//! real Envoy and injects a token. Every file it wrote is then read back:
//! without `--ca-key-file` none holds a private key; with it, the CA key is
//! in that one file (mode 0600) and nowhere else; no file holds a token or a
//! leaf key. (Logs, error bodies and metrics: `tests/redaction.rs`; Debug
//! output and panic messages: `src/leaks.rs`.)

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::curl;
use support::envoy::{self, Envoy};
use support::processor::Processor;
use support::upstream::Upstream;

/// The strace binary (Debian's `strace`, installed by `.ci/run`).
fn strace() -> String {
    let path = std::env::var("STRACE_BIN").unwrap_or_else(|_| "strace".to_owned());
    let found = std::process::Command::new(&path).arg("-V").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{path} is missing: install Debian's strace (`.ci/run` does) or set STRACE_BIN"
    );
    path
}

/// Paths written by the traced process: opened with `O_WRONLY`, `O_RDWR`
/// or `O_CREAT`, created, or the target of a rename or a link (strace
/// `-e trace=%file` output; one syscall per line, `-f` prefixes the pid).
fn written_paths(trace: &str) -> BTreeSet<PathBuf> {
    let mut written = BTreeSet::new();
    for line in trace.lines() {
        let Some(call) = line.split_whitespace().nth(1) else {
            continue;
        };
        let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        let target = if call.starts_with("openat(") || call.starts_with("open(") {
            let writes = ["O_WRONLY", "O_RDWR", "O_CREAT"]
                .iter()
                .any(|f| line.contains(f));
            if writes { quoted.first() } else { None }
        } else if call.starts_with("creat(") {
            quoted.first()
        } else if ["rename", "link", "symlink"]
            .iter()
            .any(|c| call.starts_with(c))
        {
            quoted.last()
        } else {
            None
        };
        if let Some(path) = target
            && !["/dev/", "/proc/", "/sys/"]
                .iter()
                .any(|p| path.starts_with(p))
            && !line.contains("= -1 ")
        {
            written.insert(PathBuf::from(path));
        }
    }
    written
}

/// Every line of a PEM body, or every part of a JWT.
fn pieces(secret: &str) -> Vec<&str> {
    if secret.contains("-----BEGIN") {
        secret
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .collect()
    } else {
        secret.split('.').collect()
    }
}

fn holds(contents: &str, secret: &str) -> bool {
    pieces(secret).iter().any(|piece| contents.contains(piece))
}

/// Runs the traced processor through a token injection inside intercepted
/// TLS; returns the files it wrote (with their contents), the tokens the API
/// server issued, and the directory. (A leaf key is a private key too: the
/// checks for `PRIVATE KEY` cover the leaf Envoy was served.)
async fn traced_run(
    with_key_file: bool,
) -> (Vec<(PathBuf, String)>, Vec<String>, tempfile::TempDir) {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let upstream = Upstream::start_tls(api.verifier(), &["localhost"]).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.log");
    let ca_file = dir.path().join("ca.crt");
    let key_file = dir.path().join("ca.key");
    let cert_file = dir.path().join("ca.pem");
    let mut extra = vec![];
    if with_key_file {
        extra = vec![
            "--ca-key-file",
            key_file.to_str().unwrap(),
            "--ca-cert-file",
            cert_file.to_str().unwrap(),
        ];
    }
    let args = support::intercept_args(&ca_file, &["localhost"], &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let strace = strace();
    let wrapper = [
        &strace,
        "-f",
        "-qq",
        "-e",
        "trace=%file",
        "-o",
        trace.to_str().unwrap(),
        "--",
    ];
    let processor = Processor::start_wrapped(&wrapper, &kubeconfig.path, &args).await;

    let upstream_ca = dir.path().join("upstream-ca.crt");
    upstream.write_ca(&upstream_ca);
    let mut config = envoy::shipped_config();
    envoy::point_at_processor(&mut config, &processor.grpc);
    envoy::trust_upstream_ca(&mut config, &upstream_ca);
    let envoy = Envoy::start(&config).await;
    let url = format!(
        "https://localhost:{}/r?kubernetes-audience=A",
        upstream.addr().port()
    );
    let reply = curl::via_proxy(
        &envoy.proxy_url(),
        &url,
        &["--cacert", ca_file.to_str().unwrap()],
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", processor.logs());
    assert!(
        upstream.only_received().verdict.is_valid(),
        "the upstream got a valid token"
    );
    drop(envoy);

    let (status, logs) = processor.terminate().await;
    assert!(status.success(), "{logs}");
    let trace = std::fs::read_to_string(&trace).unwrap();
    let files = written_paths(&trace)
        .into_iter()
        .filter(|path| path.is_file())
        .map(|path| {
            let contents = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            (path, contents)
        })
        .collect();
    (files, api.issued_tokens(), dir)
}

fn assert_no_token(files: &[(PathBuf, String)], tokens: &[String]) {
    assert_eq!(tokens.len(), 1, "one token was minted");
    for (path, contents) in files {
        for token in tokens {
            let signature_and_payload = token.split('.').skip(1).any(|p| contents.contains(p));
            assert!(!signature_and_payload, "{} holds a token", path.display());
        }
    }
}

#[tokio::test]
async fn without_a_key_file_no_file_holds_a_private_key_or_a_token() {
    let (files, tokens, dir) = traced_run(false).await;
    let names: Vec<&Path> = files.iter().map(|(p, _)| p.as_path()).collect();
    assert!(
        names.contains(&dir.path().join("ca.crt").as_path()),
        "strace saw the CA certificate written: {names:?}"
    );
    for (path, contents) in &files {
        assert!(
            !contents.contains("PRIVATE KEY"),
            "{} holds a private key",
            path.display()
        );
    }
    assert_no_token(&files, &tokens);
}

#[tokio::test]
async fn with_a_key_file_the_ca_key_is_in_that_file_only() {
    let (files, tokens, dir) = traced_run(true).await;
    let key_file = dir.path().join("ca.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is the owner's only");
    let holding: Vec<&Path> = files
        .iter()
        .filter(|(_, contents)| holds(contents, &key) || contents.contains("PRIVATE KEY"))
        .map(|(path, _)| path.as_path())
        .collect();
    assert_eq!(holding, [key_file.as_path()], "files holding a private key");
    assert_no_token(&files, &tokens);
}

#[test]
fn the_trace_parser_sees_writes_renames_and_links_only() {
    let trace = r#"12 openat(AT_FDCWD, "/tmp/a", O_RDONLY|O_CLOEXEC) = 3
12 openat(AT_FDCWD, "/tmp/b.tmp", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0600) = 4
13 rename("/tmp/b.tmp", "/tmp/b") = 0
13 openat(AT_FDCWD, "/dev/null", O_RDWR) = 5
13 openat(AT_FDCWD, "/tmp/c", O_RDWR) = -1 EACCES (Permission denied)
14 linkat(AT_FDCWD, "/tmp/d.tmp", AT_FDCWD, "/tmp/d", 0) = 0
14 creat("/tmp/e", 0644) = 6
"#;
    let written: Vec<PathBuf> = written_paths(trace).into_iter().collect();
    let want: Vec<PathBuf> = ["/tmp/b", "/tmp/b.tmp", "/tmp/d", "/tmp/e"]
        .iter()
        .map(PathBuf::from)
        .collect();
    assert_eq!(written, want);
}
