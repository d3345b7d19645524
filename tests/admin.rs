//! The admin listener under abuse (issue 8 item 6): connections that never
//! finish their headers are closed by the header read timeout, connections
//! beyond the cap are closed at once, and `/healthz` keeps answering while a
//! few hundred stalled connections are open. Loopback only.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::inproc::{InProcess, config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// `admin::HEADER_READ_TIMEOUT` in the crate.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `admin::MAX_CONNECTIONS` in the crate.
const MAX_CONNECTIONS: usize = 512;
/// Slack on top of the header timeout for a loaded 2-core CI machine.
const MARGIN: Duration = Duration::from_secs(5);

/// A request line and one header, without the blank line that ends them.
const PARTIAL_REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n";

struct Setup {
    _api: FakeApiServer,
    proc: InProcess,
    _kubeconfig: support::Kubeconfig,
}

async fn setup() -> Setup {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let proc = InProcess::start(config(&kubeconfig.path, &[])).await;
    Setup {
        _api: api,
        proc,
        _kubeconfig: kubeconfig,
    }
}

/// Opens `n` connections to `admin`, each sending `partial` (possibly empty)
/// and then nothing more.
async fn stalled(admin: SocketAddr, n: usize, partial: &[u8]) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(admin).await.unwrap();
        if !partial.is_empty() {
            stream.write_all(partial).await.unwrap();
        }
        streams.push(stream);
    }
    streams
}

/// Waits until the server closes `stream` (EOF or reset), or `deadline`.
/// Whatever the server writes before closing is skipped.
async fn closed_by_server(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Ok(Err(e)) => panic!("unexpected read error: {e}"),
        }
    }
}

/// Whether the server has not closed `stream` yet (nothing to read, no EOF).
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn healthz(admin: SocketAddr) -> (u16, String) {
    support::curl::get(&format!("http://{admin}/healthz")).await
}

#[tokio::test]
async fn stalled_connections_are_closed_by_the_header_timeout_and_healthz_keeps_answering() {
    let setup = setup().await;
    let admin = setup.proc.admin;
    let opened = Instant::now();
    let mut streams = stalled(admin, 300, PARTIAL_REQUEST).await;

    // The listener accepts in order, so these requests are served after all
    // 300 stalled connections were accepted and hold a slot each.
    for _ in 0..3 {
        assert_eq!(healthz(admin).await, (200, "ok\n".to_owned()));
    }
    let (status, body) = support::curl::get(&format!("http://{admin}/readyz")).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let deadline = opened + HEADER_READ_TIMEOUT + MARGIN;
    for (i, stream) in streams.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, deadline).await,
            "stalled connection {i} still open after the header timeout"
        );
    }
    assert_eq!(healthz(admin).await, (200, "ok\n".to_owned()));
    setup.proc.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_slots_come_back() {
    let setup = setup().await;
    let admin = setup.proc.admin;
    let opened = Instant::now();
    // Silent connections: the header timeout runs from the start, too.
    let mut held = stalled(admin, MAX_CONNECTIONS, b"").await;
    let mut extra = stalled(admin, 5, b"").await;

    // The extra connections are closed while the first ones, opened earlier
    // and subject to the same header timeout, are still open: they were
    // refused for the cap, not timed out.
    let deadline = opened + HEADER_READ_TIMEOUT + MARGIN;
    for (i, stream) in extra.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, deadline).await,
            "connection {i} beyond the cap still open"
        );
    }
    assert!(
        held.iter().all(still_open),
        "the connections within the cap are still open"
    );

    // The stalled ones time out, and their slots serve probes again.
    for (i, stream) in held.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, deadline).await,
            "connection {i} within the cap still open after the header timeout"
        );
    }
    assert_eq!(healthz(admin).await, (200, "ok\n".to_owned()));
    setup.proc.stop().await;
}
