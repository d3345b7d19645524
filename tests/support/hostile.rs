//! Shared by the hostile-input tests (`tests/hostile_ext_proc.rs`,
//! `tests/hostile_sds.rs`): the processor's resident memory, and the probe
//! that says whether it still serves (a normal request gets its token,
//! gRPC health is SERVING). Both return verdict words for the Observed
//! cells of `RELIABILITY.md`, computed from what was measured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Phase;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use tonic_health::pb::health_check_response::ServingStatus;

use super::apiserver::{ApiServerOptions, FakeApiServer};
use super::inproc::{connect, get, process_one};
use super::processor::Processor;

/// The resident set size of process `pid`, in KiB (`VmRSS` in
/// `/proc/<pid>/status`); `None` once the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A memory bound: the resident size sampled at creation plus a margin.
pub struct RssBound {
    pid: u32,
    baseline: u64,
    margin_kib: u64,
}

impl RssBound {
    /// Samples the baseline of `pid` now; `margin_mib` is the growth allowed.
    pub fn new(pid: u32, margin_mib: u64) -> RssBound {
        let baseline = rss_kib(pid).expect("the processor is running");
        RssBound {
            pid,
            baseline,
            margin_kib: margin_mib * 1024,
        }
    }

    /// `rss bounded` when the resident size now is within the bound, `rss
    /// grew` otherwise (the numbers go to the test's output, not the cell).
    pub fn verdict(&self, what: &str) -> &'static str {
        let now = rss_kib(self.pid);
        eprintln!(
            "{what}: VmRSS {} KiB -> {now:?} KiB (bound: +{} KiB)",
            self.baseline, self.margin_kib
        );
        match now {
            Some(now) if now <= self.baseline + self.margin_kib => "rss bounded",
            Some(_) => "rss grew",
            None => "process gone",
        }
    }
}

/// `up` when the processor still serves: on a fresh connection, a normal
/// request gets a valid token for its audience (a JWT the API server signed)
/// and gRPC health answers SERVING. `down` (with the reason printed)
/// otherwise; never panics, so the verdict lands in the Observed cell.
pub async fn still_up(proc: &Processor, api: &FakeApiServer) -> &'static str {
    match tokio::time::timeout(Duration::from_secs(20), probe(proc, api)).await {
        Ok(Ok(())) => "up",
        Ok(Err(reason)) => {
            eprintln!("the processor is not serving: {reason}");
            "down"
        }
        Err(_) => {
            eprintln!("the probe did not finish within 20 s");
            "down"
        }
    }
}

async fn probe(proc: &Processor, api: &FakeApiServer) -> Result<(), String> {
    if rss_kib(proc.pid()).is_none() {
        return Err("the process is gone".into());
    }
    let channel = connect_checked(&proc.grpc).await?;
    let mut client =
        envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(channel.clone());
    let answer = process_one(&mut client, get("/probe?kubernetes-audience=probe"), None)
        .await
        .map_err(|e| format!("ext_proc: {e}"))?;
    let token = bearer(&answer).ok_or("no token injected")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let claims = api
        .verifier()
        .verify(&token, Some("probe"), now)
        .map_err(|e| format!("invalid token: {e:?}"))?;
    if claims.aud != ["probe"] {
        return Err(format!("wrong audience {:?}", claims.aud));
    }
    // Health turns SERVING once a token was had (readiness): poll briefly.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| format!("health: {e}"))?
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            return Err(format!("health status {status}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect_checked(target: &str) -> Result<tonic::transport::Channel, String> {
    let target = target.to_owned();
    tokio::spawn(async move { connect(&target).await })
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// The token of an `authorization: Bearer` header the answer sets.
pub fn bearer(answer: &ProcessingResponse) -> Option<String> {
    let Some(Response::RequestHeaders(headers)) = &answer.response else {
        return None;
    };
    headers
        .response
        .as_ref()?
        .header_mutation
        .as_ref()?
        .set_headers
        .iter()
        .filter_map(|option| option.header.as_ref())
        .find(|header| header.key == "authorization")
        .and_then(|header| std::str::from_utf8(&header.raw_value).ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// The value of the metric `kube_audience_proxy_<name>` (a gauge without
/// labels) on the processor's admin listener; `None` if unreadable.
pub async fn metric(proc: &Processor, name: &str) -> Option<f64> {
    let url = format!("http://{}/metrics", proc.admin);
    let reply = super::curl::run(&[&url]).await;
    let series = format!("kube_audience_proxy_{name} ");
    reply
        .body
        .lines()
        .find_map(|line| line.strip_prefix(&series))?
        .trim()
        .parse()
        .ok()
}

/// Polls `metric` every 50 ms until `done` holds for its value; the last
/// value read (whatever it is) once `deadline` has passed.
pub async fn wait_metric(
    proc: &Processor,
    name: &str,
    deadline: Duration,
    done: impl Fn(f64) -> bool,
) -> Option<f64> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let value = metric(proc, name).await;
        if value.is_some_and(&done) || tokio::time::Instant::now() >= until {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Growth of the resident size allowed over a whole test, far above what
/// the cases need when nothing leaks, far below what a leak of their input
/// (tens of MiB per case) would add.
pub const RSS_MARGIN_MIB: u64 = 64;

/// The real processor binary (the shared test flags) and its API server.
pub struct Setup {
    pub api: FakeApiServer,
    pub proc: Processor,
    _kubeconfig: super::Kubeconfig,
}

/// Starts the API server stand-in and the processor binary.
pub async fn setup() -> Setup {
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = super::Kubeconfig::of(&api);
    let proc = Processor::start(&kubeconfig.path, &[]).await;
    Setup {
        api,
        proc,
        _kubeconfig: kubeconfig,
    }
}

/// A header as Envoy sends it: the value in `raw_value` only.
pub fn header(key: &str, value: &[u8]) -> HeaderValue {
    HeaderValue {
        key: key.to_owned(),
        value: String::new(),
        raw_value: value.to_vec(),
    }
}

/// A `request_headers` message with exactly `headers` (raw bytes).
pub fn headers(headers: Vec<HeaderValue>) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Phase::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap { headers }),
            end_of_stream: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A GET for the raw `path` with `extra` headers.
pub fn get_raw(path: &[u8], extra: Vec<HeaderValue>) -> ProcessingRequest {
    let mut all = vec![
        header(":method", b"GET"),
        header(":scheme", b"http"),
        header(":authority", b"upstream.test"),
        header(":path", path),
    ];
    all.extend(extra);
    headers(all)
}
