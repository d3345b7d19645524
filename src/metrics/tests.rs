use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::tokens::Error;

fn lines(registry: &Registry) -> Vec<String> {
    registry
        .encode()
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_label_value_is_exposed_from_the_start() {
    let metrics = Arc::new(Metrics::default());
    let lines = lines(&Registry::new(&metrics));
    for outcome in Outcome::ALL {
        let line = format!(
            "kube_audience_proxy_requests_total{{outcome=\"{}\"}} 0",
            outcome.as_str()
        );
        assert!(lines.contains(&line), "{line} missing");
    }
    for result in TokenResult::ALL {
        let line = format!(
            "kube_audience_proxy_token_requests_total{{result=\"{}\"}} 0",
            result.as_str()
        );
        assert!(lines.contains(&line), "{line} missing");
    }
    assert_eq!(lines.last().map(String::as_str), Some("# EOF"));
}

#[test]
fn decisions_and_token_requests_are_counted_and_timed() {
    let metrics = Arc::new(Metrics::default());
    let registry = Registry::new(&metrics);
    metrics.decided(Outcome::Injected, Duration::from_micros(70));
    metrics.decided(Outcome::Injected, Duration::from_millis(3));
    metrics.token_request(TokenResult::Throttled, Duration::from_millis(20));
    let lines = lines(&registry);
    for expected in [
        "kube_audience_proxy_requests_total{outcome=\"injected\"} 2",
        "kube_audience_proxy_decision_duration_seconds_count 2",
        "kube_audience_proxy_decision_duration_seconds_bucket{le=\"0.00005\"} 0",
        "kube_audience_proxy_decision_duration_seconds_bucket{le=\"0.0001\"} 1",
        "kube_audience_proxy_decision_duration_seconds_bucket{le=\"5.0\"} 2",
        "kube_audience_proxy_token_requests_total{result=\"throttled\"} 1",
        "kube_audience_proxy_token_request_duration_seconds_count 1",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected} missing:\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn open_guards_count_while_alive() {
    let metrics = Metrics::default();
    let a = metrics.stream_opened();
    let b = metrics.stream_opened();
    assert_eq!(metrics.streams.get(), 2);
    drop(a);
    assert_eq!(metrics.streams.get(), 1);
    drop(b);
    assert_eq!(metrics.streams.get(), 0);
}

#[test]
fn build_info_names_version_commit_and_compiler() {
    let lines = lines(&Registry::new(&Arc::default()));
    let line = lines
        .iter()
        .find(|l| l.starts_with("kube_audience_proxy_build_info{"))
        .expect("build_info");
    assert!(
        line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
    assert!(line.contains("commit=\""), "{line}");
    assert!(line.contains("rustc=\""), "{line}");
    assert!(line.ends_with("} 1"), "{line}");
}

#[test]
fn token_errors_map_to_results_and_non_requests_to_none() {
    let cases = [
        (Error::Unauthorized, Some("unauthorized")),
        (Error::Forbidden, Some("forbidden")),
        (Error::NotFound, Some("not_found")),
        (Error::Invalid { status: 422 }, Some("invalid")),
        (Error::RateLimited { retry_after: None }, Some("throttled")),
        (Error::Server { status: 503 }, Some("server_error")),
        (Error::Unexpected { status: 302 }, Some("other")),
        (Error::Transport("refused".into()), Some("connect_error")),
        (Error::Timeout(Duration::from_secs(1)), Some("timeout")),
        (Error::BadResponse("empty"), Some("other")),
        (
            Error::Busy {
                limit: 1,
                timeout: Duration::from_secs(1),
            },
            None,
        ),
        (Error::Abandoned, None),
        (
            Error::BackingOff {
                cause: Box::new(Error::Forbidden),
                retry_in: Duration::from_secs(1),
            },
            None,
        ),
    ];
    for (error, expected) in cases {
        assert_eq!(
            TokenResult::of_error(&error).map(TokenResult::as_str),
            expected,
            "{error:?}"
        );
    }
}
