//! The real curl, as a client through the proxy. Every call is bounded in
//! time (`--max-time`) and targets loopback only.

use std::process::Stdio;

use tokio::process::Command;

/// What curl got.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status (0 when curl failed to get one).
    pub status: u16,
    pub body: String,
    /// curl's stderr (errors).
    pub stderr: String,
}

/// Runs curl with `args` (plus `-sS --max-time 15`); the status is taken from
/// `--write-out`.
pub async fn run(args: &[&str]) -> Reply {
    let output = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "15",
            "--noproxy",
            "",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("curl must be installed (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    Reply {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A plain GET without a proxy (admin endpoints).
pub async fn get(url: &str) -> (u16, String) {
    let reply = run(&[url]).await;
    (reply.status, reply.body)
}

/// A GET over the Unix socket `socket` (Envoy's admin), no proxy.
pub async fn get_unix(socket: &std::path::Path, path_and_query: &str) -> (u16, String) {
    let socket = socket.to_str().expect("a UTF-8 socket path");
    let url = format!("http://localhost{path_and_query}");
    let reply = run(&["--unix-socket", socket, &url]).await;
    (reply.status, reply.body)
}

/// A request through the forward proxy `proxy` (`http://IP:PORT`).
pub async fn via_proxy(proxy: &str, url: &str, extra: &[&str]) -> Reply {
    let mut args = vec!["-x", proxy];
    args.extend_from_slice(extra);
    args.push(url);
    run(&args).await
}
