//! The process disables core dumps of itself at start: its core file limit
//! is 0 (soft and hard) and it is not dumpable, checked from outside on the
//! real binary, against an unprotected control started the same way.

#[path = "faults/kubeconfig.rs"]
mod kubeconfig;
mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kubeconfig::dead_kubeconfig;
use support::reliability;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `Max core file size` soft and hard limits of `pid`.
fn core_limits(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit line");
    let fields: Vec<&str> = line["Max core file size".len()..]
        .split_whitespace()
        .collect();
    format!("{} {}", fields[0], fields[1])
}

/// Spawns `program args` with no core size limit (a value free of the
/// shell's block unit) and, when the test runs as root, as user `nobody`;
/// returns the child once its stderr shows `ready` (or at once when `ready`
/// is empty).
async fn spawn_dumpable(program: &Path, args: &[&str], ready: &str) -> tokio::process::Child {
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c");
    if root {
        command.arg("ulimit -c unlimited && exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$0\" \"$@\"");
    } else {
        command.arg("ulimit -c unlimited && exec \"$0\" \"$@\"");
    }
    command
        .arg(program)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    if ready.is_empty() {
        return child;
    }
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(ready) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "{program:?} did not log {ready:?}:\n{seen}"
    );
    // Keep reading, so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Who owns `/proc/PID/status`: the process's user, or root when the process is not
/// dumpable (the kernel's only outside view of PR_SET_DUMPABLE).
fn proc_owner(pid: u32) -> &'static str {
    // Not /proc/PID itself: the kernel keeps the directory with the
    // process's user, only the files in it change hands.
    let owner = std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid();
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    match owner {
        0 => "root",
        o if o == me || o == 65534 => "its user",
        _ => "someone else",
    }
}

#[tokio::test]
async fn the_process_disables_its_core_dumps() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_kubeconfig(dir.path());
    // The control: the same wrapper around a plain program leaves it with
    // the raised limit, owned by its user (dumpable).
    let control = spawn_dumpable(Path::new("/bin/sleep"), &["30"], "").await;
    let control_pid = control.id().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Polls until the wrapper has exec'd sleep (its limit line changes then).
    while std::fs::read_link(format!("/proc/{control_pid}/exe"))
        .map(|exe| !exe.ends_with("sleep"))
        .unwrap_or(true)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sleep did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let control_seen = format!(
        "{}, /proc owned by {}",
        core_limits(control_pid),
        proc_owner(control_pid)
    );
    let mut args = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    args.extend_from_slice(support::COMMON_ARGS);
    let processor = spawn_dumpable(
        &support::processor::binary(),
        &args,
        "kube-audience-proxy ready",
    )
    .await;
    let pid = processor.id().unwrap();
    let seen = format!("{}, /proc owned by {}", core_limits(pid), proc_owner(pid));
    let observed = format!("{seen} (unprotected control: {control_seen})");
    reliability::check("core-dumps-disabled", &observed);
}
