//! A kubeconfig for an API server that is not there, for the tests that
//! start the binary without needing one.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A kubeconfig for `https://127.0.0.1:PORT`, where nothing listens, in
/// `dir` (world-readable, for the core dump test's unprivileged user).
pub fn dead_kubeconfig(dir: &Path) -> std::path::PathBuf {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: dead\n\
             clusters:\n- name: dead\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: dead\n  user:\n    token: not-a-real-token\n\
             contexts:\n- name: dead\n  context:\n    cluster: dead\n    user: dead\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}
