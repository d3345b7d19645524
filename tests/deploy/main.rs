//! The shipped kustomize packages (`deploy/sidecar`, `deploy/standalone`,
//! `deploy/istio`), rendered by the real kubectl and parsed into their
//! k8s-openapi types: least-privilege RBAC, only the processor holding a
//! ServiceAccount token, hardened containers sized from BENCHMARKS.md, probes
//! on the processor's admin endpoints, the downward API, and processor
//! arguments that the real configuration parser accepts.

#[path = "../support/mod.rs"]
mod support;

mod envoy;
mod network;
mod render;

use std::path::Path;

use clap::{CommandFactory, Parser};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube_audience_proxy::config::{Cli, Config};
use render::{MODES, Rendered, render};

/// The kubelet's path for a ServiceAccount token, where kube's in-cluster
/// configuration reads `token` and `ca.crt`.
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[test]
fn every_mode_renders_into_its_kubernetes_types() {
    for mode in MODES {
        let r = render(mode);
        let mut kinds = r.kinds.clone();
        kinds.sort();
        kinds.dedup();
        let expected: &[&str] = match mode {
            "sidecar" => &[
                "ConfigMap",
                "Deployment",
                "Role",
                "RoleBinding",
                "ServiceAccount",
            ],
            "standalone" => &[
                "ConfigMap",
                "Deployment",
                "NetworkPolicy",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
            ],
            _ => &[
                "Deployment",
                "EnvoyFilter",
                "Role",
                "RoleBinding",
                "ServiceAccount",
            ],
        };
        assert_eq!(kinds, expected, "deploy/{mode}");
        assert_eq!(r.deployments.len(), 1, "deploy/{mode}");
        // Every object lands in one namespace, the one the RoleBinding names.
        let ns =
            |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.namespace.clone();
        assert_eq!(
            ns(&r.deployments[0].metadata).as_deref(),
            Some("monitoring")
        );
        assert!(
            r.roles
                .iter()
                .all(|x| ns(&x.metadata).as_deref() == Some("monitoring"))
        );
        assert!(
            r.services
                .iter()
                .all(|x| ns(&x.metadata).as_deref() == Some("monitoring"))
        );
    }
}

#[test]
fn rbac_allows_creating_tokens_for_the_pods_service_account_only() {
    for mode in MODES {
        let r = render(mode);
        let sa = r.pod().service_account_name.clone().unwrap();
        assert_eq!(r.processor_flag("--service-account").as_deref(), Some(&*sa));
        assert_eq!(r.roles.len(), 1, "deploy/{mode}");
        let rules = r.roles[0].rules.clone().unwrap();
        assert_eq!(rules.len(), 1, "deploy/{mode}: {rules:?}");
        let rule = &rules[0];
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["serviceaccounts/token".to_owned()][..])
        );
        assert_eq!(rule.verbs, ["create"]);
        assert_eq!(rule.resource_names.as_deref(), Some(&[sa.clone()][..]));

        assert_eq!(r.role_bindings.len(), 1);
        let binding = &r.role_bindings[0];
        assert_eq!(binding.role_ref.kind, "Role");
        assert_eq!(
            Some(&binding.role_ref.name),
            r.roles[0].metadata.name.as_ref()
        );
        let subjects = binding.subjects.clone().unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, sa);
        assert_eq!(subjects[0].namespace.as_deref(), Some("monitoring"));
    }
}

/// The largest processor RSS BENCHMARKS.md reports, in MiB.
fn benchmarked_processor_rss_mib() -> f64 {
    let text = std::fs::read_to_string(render::root().join("BENCHMARKS.md")).unwrap();
    let section = text
        .split("## Memory (processor RSS)")
        .nth(1)
        .expect("BENCHMARKS.md has a memory section");
    let section = section.split("\n## ").next().unwrap();
    let rss: Vec<f64> = section
        .lines()
        .filter_map(|l| l.trim_end_matches('|').trim().strip_suffix("MiB"))
        .filter_map(|l| l.rsplit('|').next()?.trim().parse().ok())
        .collect();
    assert!(rss.len() >= 3, "RSS rows in BENCHMARKS.md: {rss:?}");
    rss.into_iter().fold(0.0, f64::max)
}

fn mebibytes(q: &Quantity) -> f64 {
    let s = &q.0;
    let (n, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = n.parse().unwrap();
    match unit {
        "Mi" => n,
        "Gi" => n * 1024.0,
        "Ki" => n / 1024.0,
        other => panic!("unexpected memory unit {other:?} in {s}"),
    }
}

#[test]
fn containers_are_hardened_and_sized() {
    let peak = benchmarked_processor_rss_mib();
    for mode in MODES {
        let r = render(mode);
        let pod = r.pod();
        let psc = pod.security_context.clone().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true), "deploy/{mode}");
        assert!(psc.run_as_user.is_some_and(|u| u != 0));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        for c in r.containers() {
            let at = format!("deploy/{mode}: {}", c.name);
            let sc = c.security_context.clone().unwrap_or_else(|| panic!("{at}"));
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{at}");
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{at}");
            assert_eq!(
                sc.capabilities.unwrap().drop,
                Some(vec!["ALL".to_owned()]),
                "{at}"
            );
            assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault", "{at}");
            assert_ne!(sc.privileged, Some(true), "{at}");
            let res = c
                .resources
                .clone()
                .unwrap_or_else(|| panic!("{at}: no resources"));
            let requests = res.requests.unwrap_or_else(|| panic!("{at}: no requests"));
            let limits = res.limits.unwrap_or_else(|| panic!("{at}: no limits"));
            assert!(
                requests.contains_key("cpu") && requests.contains_key("memory"),
                "{at}"
            );
            assert!(limits.contains_key("memory"), "{at}");
        }
        // The processor's memory from the benchmark: the request covers the
        // largest RSS measured, the limit leaves room for twice that.
        let res = r.processor().resources.clone().unwrap();
        let request = mebibytes(&res.requests.unwrap()["memory"]);
        let limit = mebibytes(&res.limits.unwrap()["memory"]);
        assert!(
            request >= peak,
            "deploy/{mode}: request {request} MiB < {peak} MiB"
        );
        assert!(
            limit >= 2.0 * peak,
            "deploy/{mode}: limit {limit} MiB < 2 x {peak} MiB"
        );
    }
}

/// The processor (and in the sidecar mode Envoy) are native sidecars:
/// initContainers with `restartPolicy: Always`, started before the client.
#[test]
fn the_proxy_runs_as_native_sidecars() {
    for mode in MODES {
        let r = render(mode);
        let init: Vec<&Container> = r.pod().init_containers.iter().flatten().collect();
        let expected: &[&str] = match mode {
            "sidecar" => &["kube-audience-proxy", "envoy"],
            _ => &["kube-audience-proxy"],
        };
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, expected, "deploy/{mode}");
        for c in init {
            assert_eq!(c.restart_policy.as_deref(), Some("Always"), "{}", c.name);
        }
    }
}

#[test]
fn probes_point_at_the_processors_admin_listener() {
    for mode in MODES {
        let r = render(mode);
        let admin = r.processor_flag("--admin-listen-address").unwrap();
        assert_eq!(
            admin, "$(POD_IP):18081",
            "deploy/{mode}: on the pod IP, for the kubelet"
        );
        let port = admin.rsplit_once(':').unwrap().1.parse::<i32>().unwrap();
        let p = r.processor();
        let probes = [
            (p.liveness_probe.clone(), "/healthz"),
            (p.readiness_probe.clone(), "/readyz"),
            (p.startup_probe.clone(), "/readyz"),
        ];
        for (probe, path) in probes {
            let get = probe
                .and_then(|p| p.http_get)
                .unwrap_or_else(|| panic!("deploy/{mode}"));
            assert_eq!(get.path.as_deref(), Some(path), "deploy/{mode}");
            assert_eq!(
                get.port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
            );
            assert!(get.host.is_none(), "the kubelet probes the pod IP");
        }
    }
}

/// The probed paths answer 200 on a real processor's admin listener.
#[tokio::test]
async fn the_probed_paths_are_served() {
    let r = render("sidecar");
    let api = support::apiserver::FakeApiServer::start(Default::default()).await;
    let kubeconfig = support::Kubeconfig::of(&api);
    let common = support::common_args_refusing_local();
    let processor = support::processor::Processor::start_with(&kubeconfig.path, &common, &[]).await;
    let p = r.processor();
    for probe in [&p.liveness_probe, &p.readiness_probe, &p.startup_probe] {
        let path = probe.clone().unwrap().http_get.unwrap().path.unwrap();
        let (status, _) = support::curl::get(&format!("http://{}{path}", processor.admin)).await;
        assert_eq!(status, 200, "{path}");
    }
}

#[test]
fn the_downward_api_feeds_the_processors_pod_flags() {
    // The flags whose environment fallbacks the manifests set.
    let command = Cli::command();
    let env_of = |id: &str| {
        command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_else(|| panic!("--{id} has no env fallback"))
    };
    let fields = [
        (env_of("pod_name"), "metadata.name"),
        (env_of("pod_uid"), "metadata.uid"),
        (env_of("namespace"), "metadata.namespace"),
    ];
    for mode in MODES {
        let r = render(mode);
        let env = r.processor().env.clone().unwrap();
        let field_of = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.clone()?.field_ref)
                .map(|f| f.field_path)
        };
        for (var, path) in &fields {
            assert_eq!(
                field_of(var).as_deref(),
                Some(*path),
                "deploy/{mode}: {var}"
            );
        }
        assert_eq!(field_of("POD_IP").as_deref(), Some("status.podIP"));
        assert!(
            r.processor_args().contains(&"--bind-pod".to_owned()),
            "deploy/{mode}"
        );
    }
}

/// The processor's arguments in each mode are a valid configuration for the
/// real parser (the pod's environment filled in), bind the audience to its
/// destination with a rule, and refuse local destinations.
#[test]
fn the_processor_arguments_parse_and_bind_audiences_to_destinations() {
    for mode in MODES {
        let r = render(mode);
        let mut argv = vec!["kube-audience-proxy".to_owned()];
        argv.extend(
            r.processor_args()
                .iter()
                .map(|a| a.replace("$(POD_IP)", "127.0.0.1")),
        );
        let rule = r
            .processor_flag("--audience-rule")
            .unwrap_or_else(|| panic!("deploy/{mode}"));
        if mode == "sidecar" {
            // Intercepted TLS only: the token never travels in clear text.
            assert!(rule.starts_with("https://"), "deploy/{mode}: {rule}");
        }
        assert!(
            !argv
                .iter()
                .any(|a| a.starts_with("--allow-local-destinations")),
            "deploy/{mode}: local destinations are refused in a cluster"
        );
        // What the downward API and the projected volume provide in the pod.
        argv.extend(
            [
                "--namespace=monitoring",
                "--pod-name=client-0",
                "--pod-uid=0c1d",
            ]
            .map(str::to_owned),
        );
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        if let Err(errors) = Config::try_from(cli) {
            panic!("deploy/{mode}: the processor arguments are refused:\n{errors}");
        }
    }
}

/// Names of the pod's volumes that hold a ServiceAccount token.
fn token_volumes(r: &Rendered) -> Vec<String> {
    r.pod()
        .volumes
        .iter()
        .flatten()
        .filter(|v| {
            v.projected.as_ref().is_some_and(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.service_account_token.is_some())
            })
        })
        .map(|v| v.name.clone())
        .collect()
}

#[test]
fn only_the_processor_holds_a_service_account_token() {
    let default_ns_file = Cli::try_parse_from(["kube-audience-proxy"])
        .unwrap()
        .namespace_file;
    assert_eq!(default_ns_file, Path::new(TOKEN_DIR).join("namespace"));
    for mode in MODES {
        let r = render(mode);
        let pod = r.pod();
        // No container gets the token by default, whatever the ServiceAccount says.
        assert_eq!(
            pod.automount_service_account_token,
            Some(false),
            "deploy/{mode}"
        );
        assert_eq!(r.service_accounts.len(), 1);
        assert_eq!(
            r.service_accounts[0].automount_service_account_token,
            Some(false)
        );

        // One projected token: the API server's default audience, a bounded
        // lifetime, the cluster CA and the namespace beside it.
        assert_eq!(token_volumes(&r), ["kube-api-access"], "deploy/{mode}");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "kube-api-access")
            .unwrap();
        let sources = volume.projected.clone().unwrap().sources.unwrap();
        let token = sources
            .iter()
            .find_map(|s| s.service_account_token.clone())
            .unwrap();
        assert_eq!(token.path, "token");
        assert_eq!(token.audience, None, "the API server's default audience");
        assert!((600..=86400).contains(&token.expiration_seconds.unwrap()));
        let ca = sources.iter().find_map(|s| s.config_map.clone()).unwrap();
        assert_eq!(ca.name, "kube-root-ca.crt");
        let items = ca.items.unwrap();
        assert_eq!(
            (items[0].key.as_str(), items[0].path.as_str()),
            ("ca.crt", "ca.crt")
        );
        let ns = sources.iter().find_map(|s| s.downward_api.clone()).unwrap();
        let ns = &ns.items.unwrap()[0];
        assert_eq!(ns.path, "namespace");
        assert_eq!(
            ns.field_ref.clone().unwrap().field_path,
            "metadata.namespace"
        );

        // Exactly the processor mounts it, read-only, where kube's in-cluster
        // configuration and the default --namespace-file read it; nobody else
        // mounts a token volume or anything at the token path.
        let mut holders = Vec::new();
        for c in r.containers() {
            for m in c.volume_mounts.iter().flatten() {
                let holds_token = m.name == "kube-api-access";
                assert_eq!(
                    holds_token,
                    m.mount_path.starts_with("/var/run/secrets"),
                    "{}",
                    c.name
                );
                if holds_token {
                    assert_eq!(m.mount_path, TOKEN_DIR);
                    assert_eq!(m.read_only, Some(true));
                    holders.push(c.name.as_str());
                }
            }
        }
        assert_eq!(holders, ["kube-audience-proxy"], "deploy/{mode}");
        assert!(pod.ephemeral_containers.is_none());
    }
}
