//! The soak: several audiences through the real Envoy at a steady load for
//! a while, with tokens the API server makes short-lived (so each is
//! refreshed several times) and API server faults on a schedule: outages
//! shorter than a token's remaining service time, and 429 bursts. Every
//! response is checked: the upstream verified a JWT of exactly the audience
//! asked for, at least 30 s from its expiry (the upstream reports `exp`
//! against its own clock); no request takes longer than Envoy's ext_proc
//! `message_timeout`; the processor's memory and open streams stay flat.
//!
//! `SOAK_SECS` sets the length (CI: 60 s); `SOAK_SECS=900 cargo test --test
//! soak -- --nocapture` is the long run, and prints the samples.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use serde_json::Value;
use support::apiserver::{ApiServerOptions, FakeApiServer, Fault};
use support::processor::Processor;
use support::stack::Stack;
use tokio::net::TcpStream;

/// The audiences: the first is prefetched (refreshed by its timer), the
/// others are refreshed by their requests.
const AUDIENCES: [&str; 3] = ["soak-a", "soak-b", "soak-c"];
/// Clients, each with its own connection to Envoy, each sending every
/// [`PACE`].
const CLIENTS: usize = 6;
const PACE: Duration = Duration::from_millis(100);
/// What the API server grants: served 30 s, refreshed after 22.5–24 s.
const LIFETIME: Duration = Duration::from_secs(60);
/// Envoy's ext_proc `message_timeout` in the shipped config.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A fault cycle: a 3 s outage (every TokenRequest answered 503) at 5 s, a
/// burst of three 429s (`Retry-After: 1`) at 12 s. The outage is shorter
/// than the 6 s a token is still served after its refresh starts.
const CYCLE: Duration = Duration::from_secs(20);
const OUTAGE: Duration = Duration::from_secs(3);

fn soak_length() -> Duration {
    let secs = std::env::var("SOAK_SECS").map_or(60, |s| s.parse().expect("SOAK_SECS: seconds"));
    Duration::from_secs(secs)
}

/// What one request saw.
#[derive(Debug)]
struct Outcome {
    audience: &'static str,
    status: u16,
    latency: Duration,
    /// The upstream's description of the request (its verdict on the token).
    seen: Option<Value>,
}

impl Outcome {
    /// Why the upstream's description is wrong, if it is.
    fn defect(&self) -> Option<String> {
        if self.status != 200 {
            return Some(format!("status {}", self.status));
        }
        let Some(seen) = self.seen.as_ref() else {
            return Some("a 200 without the upstream's description of the request".into());
        };
        let verdict = &seen["verdict"];
        if verdict["token"] != "valid" {
            return Some(format!("token {}", verdict));
        }
        if verdict["aud"] != serde_json::json!([self.audience]) {
            return Some(format!("audience {} for {}", verdict["aud"], self.audience));
        }
        // `exp` and the upstream's clock are whole seconds.
        let left = verdict["exp_in_secs"].as_i64().unwrap_or(i64::MIN);
        if left < 29 {
            return Some(format!("token {left} s from its expiry"));
        }
        if seen["path"]
            .as_str()
            .is_some_and(|p| p.contains("kubernetes-audience"))
        {
            return Some(format!(
                "audience parameter reached the upstream: {}",
                seen["path"]
            ));
        }
        None
    }
}

/// One client: a keep-alive HTTP/1.1 connection to Envoy, a request every
/// [`PACE`] (absolute-form, as a client configured with the proxy sends),
/// cycling through the audiences, until `stop`.
async fn client(id: usize, proxy: String, upstream: String, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let stream = TcpStream::connect(&proxy).await.unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut outcomes = Vec::new();
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = id;
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        let audience = AUDIENCES[n % AUDIENCES.len()];
        n += 1;
        let request = http::Request::get(format!(
            "{upstream}/soak?n={n}&kubernetes-audience={audience}&client={id}"
        ))
        .header("host", upstream.trim_start_matches("http://"))
        .body(Empty::new())
        .unwrap();
        let started = Instant::now();
        let answer = tokio::time::timeout(MESSAGE_TIMEOUT * 3, async {
            let response = sender.send_request(request).await.unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        })
        .await;
        let (status, body) = answer.unwrap_or_else(|_| panic!("client {id}: a request hung"));
        outcomes.push(Outcome {
            audience,
            status,
            latency: started.elapsed(),
            seen: serde_json::from_slice(&body).ok(),
        });
    }
    outcomes
}

/// The processor's resident memory (KiB) and open Process streams.
async fn sample(processor: &Processor) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", processor.pid())).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let (_, metrics) = support::curl::get(&format!("http://{}/metrics", processor.admin)).await;
    let streams = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kube_audience_proxy_ext_proc_streams "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap() as u64;
    (rss, streams)
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_with_short_tokens_and_scheduled_faults() {
    let length = soak_length();
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    api.set_lifetime(Some(LIFETIME));
    let stack = Stack::start_on(
        api,
        &["--log-level", "info", "--prefetch-audience", AUDIENCES[0]],
        |_| {},
    )
    .await;
    let (api, upstream, processor) = (&stack.api, &stack.upstream, &stack.processor);
    let proxy = stack
        .envoy
        .proxy_url()
        .trim_start_matches("http://")
        .to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(id, proxy.clone(), upstream.url(), stop.clone())))
        .collect();

    // The fault schedule and the samples, once a second, until the end.
    let start = Instant::now();
    let mut samples = Vec::new();
    let (mut outages, mut bursts) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut outage_until: Option<Instant> = None;
    while start.elapsed() < length {
        tick.tick().await;
        let in_cycle = Duration::from_secs(start.elapsed().as_secs() % CYCLE.as_secs());
        if in_cycle == Duration::from_secs(5) && outage_until.is_none() {
            api.inject(Fault::Status(503), 1_000_000);
            outage_until = Some(Instant::now() + OUTAGE);
            outages += 1;
        }
        if outage_until.is_some_and(|until| Instant::now() >= until) {
            api.clear_faults();
            outage_until = None;
        }
        if in_cycle == Duration::from_secs(12) {
            api.inject(
                Fault::TooManyRequests {
                    retry_after_secs: 1,
                },
                3,
            );
            bursts += 1;
        }
        samples.push((start.elapsed(), sample(processor).await));
    }
    api.clear_faults();
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.extend(client.await.unwrap());
    }

    // Every request: 200, a verified JWT of its audience, not near expiry.
    let defects: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.defect().map(|d| format!("{}: {d}", o.audience)))
        .collect();
    let slowest = outcomes.iter().map(|o| o.latency).max().unwrap();
    let mints: Vec<usize> = AUDIENCES
        .iter()
        .map(|a| api.requests_for_audience(a))
        .collect();
    println!(
        "soak: {:?}, {} requests, {} defects, slowest {slowest:?}, {outages} outages, \
         {bursts} 429 bursts, TokenRequests per audience {mints:?} ({} answered)",
        length,
        outcomes.len(),
        defects.len(),
        api.token_response_statuses().len(),
    );
    // Memory and streams: the last third against the first (after 5 s of
    // warm-up), sampled once a second.
    let third = samples.len() / 3;
    let rss: Vec<u64> = samples.iter().map(|(_, (rss, _))| *rss).collect();
    let streams: Vec<u64> = samples.iter().map(|(_, (_, s))| *s).collect();
    let early = median(&mut rss[5.min(third)..third.max(6)].to_vec());
    let late = median(&mut rss[samples.len() - third..].to_vec());
    println!(
        "soak: rss KiB early median {early}, late median {late}, max {}; streams max {}, \
         samples (s, rss KiB, streams): {:?}",
        rss.iter().max().unwrap(),
        streams.iter().max().unwrap(),
        samples
            .iter()
            .map(|(t, (r, s))| (t.as_secs(), *r, *s))
            .collect::<Vec<_>>()
    );

    assert!(
        outcomes.len() as f64 >= length.as_secs_f64() * 10.0,
        "the load ran"
    );
    assert!(
        outages >= 2 && bursts >= 2,
        "the faults ran: {outages} outages, {bursts} bursts"
    );
    let ok = defects.is_empty();
    let in_time = slowest < MESSAGE_TIMEOUT;
    // Each audience was minted and refreshed (at least once per 30 s of
    // service), and the faults did not start a retry loop: at most one
    // TokenRequest per second per audience.
    let refreshed = mints.iter().all(|&m| m as u64 > length.as_secs() / 30);
    let bounded = mints.iter().all(|&m| m as u64 <= length.as_secs());
    let flat = late <= early + early / 4 + 8 * 1024;
    let streams_bounded = streams.iter().all(|&s| s <= CLIENTS as u64 * 2);
    let observed = format!(
        "{}; {}; {}; {}; {}",
        if ok {
            "every request 200 with a valid token"
        } else {
            "defects"
        },
        if in_time {
            "none slower than message_timeout"
        } else {
            "slow requests"
        },
        if refreshed && bounded {
            "refreshed, no retry loop"
        } else {
            "refresh count off"
        },
        if flat { "rss flat" } else { "rss grew" },
        if streams_bounded {
            "streams bounded"
        } else {
            "streams grew"
        },
    );
    assert!(
        ok,
        "{} defects, first: {:?}",
        defects.len(),
        &defects[..defects.len().min(10)]
    );
    assert!(in_time, "slowest request {slowest:?}");
    assert!(
        refreshed && bounded,
        "TokenRequests per audience {mints:?} in {length:?}"
    );
    assert!(flat, "rss {early} KiB early, {late} KiB late");
    assert!(streams_bounded, "streams {streams:?}");
    support::reliability::check("soak", &observed);
}
