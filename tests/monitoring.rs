//! `deploy/monitoring`: the alerting rules through the real promtool (`check
//! rules`, and `test rules` on `alerts_test.yaml`), the PrometheusRule kept
//! equal to the plain rules file, the kustomize package rendered by the real
//! kubectl, and every dashboard and alert query run by a real Prometheus
//! (Debian's package) against a real processor's `/metrics`.
//!
//! promtool, prometheus and kubectl are required: a missing one fails the
//! test (`.ci/run` installs them).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::apiserver::{ApiServerOptions, FakeApiServer};
use support::curl;
use support::processor::Processor;

const PREFIX: &str = "kube_audience_proxy_";
/// Envoy's statistics in Prometheus format.
const ENVOY_PREFIX: &str = "envoy_";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn monitoring(file: &str) -> PathBuf {
    root().join("deploy/monitoring").join(file)
}

/// `$ENV`, else `name` on `PATH`; panics (never skips) when it is missing.
fn tool(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return path.into();
    }
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{name} not found on PATH (nor ${env}): install Debian's `prometheus` package \
             (.ci/run does); these tests need the real {name}"
        )
    })
}

fn kubectl() -> PathBuf {
    std::env::var_os("KUBECTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/kubectl"))
}

/// Runs `program args` in `deploy/monitoring`; panics with its output
/// unless it succeeds; returns stdout.
fn run_ok(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .current_dir(monitoring(""))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{}",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn yaml(file: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(monitoring(file)).unwrap()).unwrap()
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(monitoring("dashboard.json")).unwrap()).unwrap()
}

/// Every panel query of the dashboard, with Grafana's `$__rate_interval`
/// replaced by a range Prometheus parses.
fn dashboard_queries() -> Vec<String> {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut queries = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel without queries: {panel}");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            queries.push(expr.replace("$__rate_interval", "1m"));
        }
    }
    queries
}

/// Every alert expression of `rules.yaml`.
fn alert_exprs() -> Vec<String> {
    let rules = yaml("rules.yaml");
    let mut exprs = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("expr").to_owned());
        }
    }
    exprs
}

/// The part of an alert condition that selects series: the left operand of
/// its final comparison. The condition itself is empty while all is well
/// (that is the point of an alert), so it cannot prove the names are right.
fn selecting_part(expr: &str) -> &str {
    let at = [" < ", " > "]
        .iter()
        .filter_map(|op| expr.rfind(op))
        .max()
        .unwrap_or_else(|| panic!("no final comparison in {expr}"));
    expr[..at].trim()
}

/// The `kube_audience_proxy_*` names an expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.match_indices(PREFIX)
        .map(|(at, _)| {
            expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect()
        })
        .collect()
}

#[test]
fn promtool_checks_the_rules() {
    let out = run_ok(
        &tool("PROMTOOL_BIN", "promtool"),
        &["check", "rules", "rules.yaml"],
    );
    assert!(out.contains("SUCCESS: 4 rules found"), "{out}");
}

#[test]
fn promtool_unit_tests_fire_and_stay_silent() {
    let out = run_ok(
        &tool("PROMTOOL_BIN", "promtool"),
        &["test", "rules", "alerts_test.yaml"],
    );
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert is exercised by the unit tests.
    let tests = std::fs::read_to_string(monitoring("alerts_test.yaml")).unwrap();
    for rule in yaml("rules.yaml")["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
    {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} untested"
        );
    }
}

#[test]
fn the_prometheus_rule_holds_the_rules_file() {
    let rule = yaml("alerts.yaml");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"],
        yaml("rules.yaml")["groups"],
        "alerts.yaml spec.groups differs from rules.yaml"
    );
}

#[test]
fn kustomize_renders_the_rule_and_the_dashboard() {
    let rendered = run_ok(&kubectl(), &["kustomize", "."]);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect();
    assert_eq!(docs.len(), 2, "{rendered}");
    let of_kind = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}:\n{rendered}"))
    };
    let rule = of_kind("PrometheusRule");
    assert_eq!(rule["spec"], yaml("alerts.yaml")["spec"]);
    let config_map = of_kind("ConfigMap");
    assert_eq!(
        config_map["metadata"]["labels"]["grafana_dashboard"], "1",
        "the label Grafana's dashboard sidecar looks for"
    );
    let json = config_map["data"]["dashboard.json"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(json).unwrap(), dashboard());
}

/// A Prometheus on a free loopback port scraping `target` every second,
/// with its config and storage in a temporary directory; killed on drop.
struct Prometheus {
    child: tokio::process::Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        Prometheus::start_with_jobs(&format!(
            "- job_name: kube-audience-proxy\n  static_configs:\n  - targets: ['{target}']\n"
        ))
        .await
    }

    /// Prometheus scraping every second with these `scrape_configs` entries.
    async fn start_with_jobs(jobs: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n{jobs}"
            ),
        )
        .unwrap();
        // A port the kernel just handed out; Prometheus binds it right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = tokio::process::Command::new(tool("PROMETHEUS_BIN", "prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn prometheus");
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let ready = format!("{}/-/ready", prometheus.url);
        prometheus
            .wait("Prometheus ready", || async {
                curl::get(&ready).await.0 == 200
            })
            .await;
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `done` until it holds; panics with Prometheus's log after 30 s.
    async fn wait<F, Fut>(&self, what: &str, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 30s; Prometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The result vector of an instant query (panics on a query error).
    async fn query(&self, expr: &str) -> Vec<Value> {
        let url = format!("{}/api/v1/query", self.url);
        let query = format!("query={expr}");
        let reply = curl::run(&["-G", "--data-urlencode", &query, &url]).await;
        assert_eq!(reply.status, 200, "{expr}: {reply:?}");
        let json: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(json["status"], "success", "{expr}: {json}");
        json["data"]["result"].as_array().unwrap().clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn a_real_prometheus_answers_every_dashboard_and_alert_query() {
    // A processor that exposes every family: interception on (certificate,
    // SDS and CA metrics) and a prefetched audience (per-audience gauges).
    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let dir = tempfile::tempdir().unwrap();
    let args = support::intercept_args(
        &dir.path().join("ca.crt"),
        &["localhost"],
        &["--prefetch-audience", "dashboard"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let processor = Processor::start(&kubeconfig.path, &args).await;
    // Ready means the prefetched token is cached (README: Readiness).
    let readyz = format!("http://{}/readyz", processor.admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while curl::get(&readyz).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready:\n{}",
            processor.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api.token_requests(), 1);

    // Envoy's own statistics are queried in the fast-path test below.
    let dashboard: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|e| !e.contains(ENVOY_PREFIX))
        .collect();
    let alerts: Vec<String> = alert_exprs()
        .iter()
        .map(|e| selecting_part(e).to_owned())
        .collect();

    // Every name the queries use is one the processor exposes.
    let (status, text) = curl::get(&format!("http://{}/metrics", processor.admin)).await;
    assert_eq!(status, 200);
    let exposed: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let used: BTreeSet<String> = dashboard
        .iter()
        .chain(alert_exprs().iter())
        .flat_map(|e| metric_names(e))
        .collect();
    assert!(used.len() >= 14, "{used:?}");
    for name in &used {
        assert!(
            exposed.contains(name.as_str()),
            "{name} is not exported:\n{text}"
        );
    }

    // A real Prometheus scrapes it; each query returns series once it has
    // scraped enough samples for its rate() windows.
    let prometheus = Prometheus::start(&processor.admin.to_string()).await;
    prometheus
        .wait("the target is up", || async {
            let up = prometheus.query("up").await;
            up.len() == 1 && up[0]["value"][1] == "1"
        })
        .await;
    for expr in dashboard.iter().chain(&alerts) {
        prometheus
            .wait(&format!("series for {expr}"), || async {
                !prometheus.query(expr).await.is_empty()
            })
            .await;
    }
    // The per-audience series name the prefetched audience.
    let expiry = prometheus
        .query(&format!("{PREFIX}token_expiry_timestamp_seconds - time()"))
        .await;
    assert_eq!(expiry.len(), 1, "{expiry:?}");
    assert_eq!(expiry[0]["metric"]["audience"], "dashboard");
    let left: f64 = expiry[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(
        left > 300.0,
        "a fresh token does not look near expiry: {left}"
    );
}

/// The dashboard's fast-path panel from Envoy's statistics: the real Envoy
/// runs the bootstrap `envoy-config --envoy-stats-listen-address` generates
/// for a processor with a destination rule; a real Prometheus scrapes
/// `/stats/prometheus` on that listener (and the processor); requests take
/// both paths; every dashboard query on Envoy's names returns series, and
/// both paths show traffic. The listener serves nothing else.
#[tokio::test]
async fn a_real_prometheus_sees_which_path_served_requests_from_envoys_statistics() {
    use support::envoy::{self, Envoy};
    use support::upstream::Upstream;

    let api = FakeApiServer::start(ApiServerOptions::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let upstream = Upstream::start(api.verifier()).await;
    let rule = format!(
        "--audience-rule=127.0.0.1:{}=dashboard",
        upstream.addr().port()
    );
    let processor = Processor::start(&kubeconfig.path, &[&rule]).await;
    let stats_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut flags: Vec<String> = support::COMMON_ARGS.iter().map(|a| a.to_string()).collect();
    flags.push(rule);
    flags.push(format!("--grpc-listen-address={}", processor.grpc));
    flags.push(format!(
        "--envoy-stats-listen-address=127.0.0.1:{stats_port}"
    ));
    let mut config = envoy::generated_config(&flags);
    envoy::point_at_processor(&mut config, &processor.grpc);
    let envoy = Envoy::start(&config).await;
    let stats = format!("http://127.0.0.1:{stats_port}");
    // Only GET /stats/prometheus: not the admin interface behind it.
    for path in [
        "/stats",
        "/quitquitquit",
        "/config_dump",
        "/stats/prometheus/x",
    ] {
        assert_eq!(curl::get(&format!("{stats}{path}")).await.0, 404, "{path}");
    }
    let post = curl::run(&["-X", "POST", &format!("{stats}/stats/prometheus")]).await;
    assert_eq!(post.status, 404);

    // Traffic on both paths: the rule's destination (fast path) and a
    // named audience (ext_proc), a few times each.
    for i in 0..5 {
        let fast = format!("{}/fast-{i}", upstream.url());
        assert_eq!(
            curl::via_proxy(&envoy.proxy_url(), &fast, &[]).await.status,
            200
        );
        let named = format!("{}/named-{i}?kubernetes-audience=dashboard", upstream.url());
        assert_eq!(
            curl::via_proxy(&envoy.proxy_url(), &named, &[])
                .await
                .status,
            200
        );
    }

    let prometheus = Prometheus::start_with_jobs(&format!(
        "- job_name: envoy\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: ['127.0.0.1:{stats_port}']\n\
         - job_name: kube-audience-proxy\n  static_configs:\n  - targets: ['{}']\n",
        processor.admin
    ))
    .await;
    prometheus
        .wait("both targets are up", || async {
            let up = prometheus.query("up == 1").await;
            up.len() == 2
        })
        .await;
    let envoy_queries: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|e| e.contains(ENVOY_PREFIX))
        .collect();
    assert_eq!(envoy_queries.len(), 3, "{envoy_queries:?}");
    for expr in &envoy_queries {
        prometheus
            .wait(&format!("series for {expr}"), || async {
                !prometheus.query(expr).await.is_empty()
            })
            .await;
    }
    // The counters behind the panel: 5 requests on each path.
    let value =
        |result: Vec<Value>| -> f64 { result[0]["value"][1].as_str().unwrap().parse().unwrap() };
    let injected = value(
        prometheus
            .query("sum(envoy_http_credential_injector_injected)")
            .await,
    );
    let streams = value(
        prometheus
            .query("sum(envoy_http_ext_proc_streams_started)")
            .await,
    );
    assert_eq!((injected, streams), (5.0, 5.0));
    drop(envoy);
}

#[test]
fn selecting_part_strips_the_final_comparison() {
    assert_eq!(selecting_part("(a - time()) < 300"), "(a - time())");
    assert_eq!(
        selecting_part("sum without (r) (rate(x{r!=\"s\"}[5m])) > 0"),
        "sum without (r) (rate(x{r!=\"s\"}[5m]))"
    );
    assert_eq!(
        metric_names("kube_audience_proxy_a_total - kube_audience_proxy_b{x=\"y\"}"),
        BTreeSet::from([
            "kube_audience_proxy_a_total".into(),
            "kube_audience_proxy_b".into()
        ])
    );
}
