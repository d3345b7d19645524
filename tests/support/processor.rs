//! Runs the real `kube-audience-proxy` binary on ephemeral loopback ports and
//! collects everything it writes to stderr (its log).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The processor binary: Cargo's path for integration tests; for examples
/// (the demo), the binary next to the `examples/` folder they are built in.
pub fn binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_kube-audience-proxy") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join("kube-audience-proxy");
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --bin kube-audience-proxy`",
        path.display()
    );
    path
}

/// A running processor; killed on drop.
pub struct Processor {
    child: Child,
    /// The gRPC address Envoy uses (`IP:PORT` or `unix:PATH`).
    pub grpc: String,
    pub admin: SocketAddr,
    /// Everything logged so far; receivers see every appended line.
    log: Arc<watch::Sender<String>>,
    /// The tasks copying stderr and stdout into `log`; each ends at EOF.
    readers: Vec<JoinHandle<()>>,
    /// Started under a wrapper (the processor is the child's child).
    wrapped: bool,
}

impl Processor {
    /// Starts the binary with `--kubeconfig kubeconfig`, namespace `demo`,
    /// ServiceAccount `app`, ephemeral ports, no drain delay, local
    /// destinations allowed, debug logs, and `extra` arguments (later flags
    /// win). Waits for its "ready" log line.
    pub async fn start(kubeconfig: &Path, extra: &[&str]) -> Processor {
        Processor::start_with(kubeconfig, crate::support::COMMON_ARGS, extra).await
    }

    /// As [`start`](Self::start), with `common` instead of `COMMON_ARGS`
    /// (e.g. without `--allow-local-destinations`).
    pub async fn start_with(kubeconfig: &Path, common: &[&str], extra: &[&str]) -> Processor {
        Processor::spawn(Command::new(binary()), false, kubeconfig, common, extra).await
    }

    /// As [`start`](Self::start), under `wrapper` (e.g. `strace -f -o FILE
    /// --`), which must run the binary as its only child; [`pid`](Self::pid)
    /// and [`terminate`](Self::terminate) address the processor itself.
    pub async fn start_wrapped(wrapper: &[&str], kubeconfig: &Path, extra: &[&str]) -> Processor {
        let mut command = Command::new(wrapper[0]);
        command.args(&wrapper[1..]).arg(binary());
        let common = crate::support::COMMON_ARGS;
        Processor::spawn(command, true, kubeconfig, common, extra).await
    }

    async fn spawn(
        mut command: Command,
        wrapped: bool,
        kubeconfig: &Path,
        common: &[&str],
        extra: &[&str],
    ) -> Processor {
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(common)
            .args(["--log-level", "debug"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn kube-audience-proxy");
        let log = Arc::new(watch::Sender::new(String::new()));
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut readers = Vec::new();
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            let ready_tx = ready_tx.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("kube-audience-proxy ready") {
                        let _ = ready_tx.send(line.clone());
                    }
                    log.send_modify(|log| {
                        log.push_str(&line);
                        log.push('\n');
                    });
                }
            }));
        }
        drop(ready_tx);
        let line = match tokio::time::timeout(Duration::from_secs(20), ready_rx.recv()).await {
            Ok(Some(line)) => line,
            _ => {
                let status = child.try_wait().ok().flatten();
                panic!("processor did not start ({status:?}):\n{}", *log.borrow());
            }
        };
        let grpc = field(&line, "grpc").expect("grpc= in the ready line");
        let admin = field(&line, "admin")
            .and_then(|a| a.parse().ok())
            .expect("admin= in the ready line");
        Processor {
            child,
            grpc,
            admin,
            log,
            readers,
            wrapped,
        }
    }

    /// The processor's process id (under a wrapper: the wrapper's child).
    pub fn pid(&self) -> u32 {
        let pid = self.child.id().expect("running");
        if !self.wrapped {
            return pid;
        }
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        let mut children = children.split_whitespace();
        let child = children.next().expect("the wrapper runs the processor");
        assert!(children.next().is_none(), "the wrapper runs one child");
        child.parse().unwrap()
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.log.borrow().clone()
    }

    /// Waits until the log contains `needle` (the process writes its log
    /// through a pipe, so a line can arrive after the event it reports);
    /// panics with the log after `deadline`.
    pub async fn wait_for_log(&self, needle: &str, deadline: Duration) {
        let mut log = self.log.subscribe();
        let found = matches!(
            tokio::time::timeout(deadline, log.wait_for(|log| log.contains(needle))).await,
            Ok(Ok(_))
        );
        assert!(
            found,
            "{needle:?} not logged within {deadline:?}:\n{}",
            self.logs()
        );
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(mut self) -> (ExitStatus, String) {
        let pid = self.pid().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        self.reap("SIGTERM").await
    }

    /// Waits (bounded) for the exit status after `signal`, then for the log
    /// readers to reach the end of the pipes (they close with the process).
    async fn reap(&mut self, signal: &str) -> (ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the processor exits after {signal}"))
            .unwrap();
        for reader in std::mem::take(&mut self.readers) {
            tokio::time::timeout(Duration::from_secs(20), reader)
                .await
                .expect("the log readers reach the end of the pipes")
                .unwrap();
        }
        (status, self.logs())
    }
}

// === process faults (tests/faults_process.rs, tests/faults_envoy.rs) ===

impl Processor {
    /// Sends SIGKILL, waits (bounded) until the process is gone and its pipes
    /// are drained; returns the exit status and everything it logged.
    pub async fn kill(mut self) -> (ExitStatus, String) {
        self.child.start_kill().expect("SIGKILL");
        self.reap("SIGKILL").await
    }
}

/// A free loopback address for a processor that must come back on the same
/// address after a restart (bound, read back, released).
pub fn free_loopback_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// The value of `key` in a JSON log line or of `key=` in a logfmt line.
fn field(line: &str, key: &str) -> Option<String> {
    if line.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        return json.get(key)?.as_str().map(str::to_owned);
    }
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        Some(quoted[..quoted.find('"')?].to_owned())
    } else {
        Some(rest.split_whitespace().next()?.to_owned())
    }
}
