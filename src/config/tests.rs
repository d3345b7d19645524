//! Configuration: defaults, every refusal, errors reported together.

use clap::Parser;

use super::*;

fn parse(args: &[&str]) -> Result<Config, ConfigErrors> {
    let mut argv = vec!["kube-audience-proxy"];
    argv.extend_from_slice(args);
    Config::try_from(Cli::try_parse_from(argv).unwrap())
}

#[test]
fn defaults() {
    let c = parse(&["--service-account", "app", "--namespace", "demo"]).unwrap();
    assert_eq!(
        c.server.grpc,
        ListenAddress::Tcp("127.0.0.1:18080".parse().unwrap())
    );
    assert_eq!(c.server.admin, "127.0.0.1:18081".parse().unwrap());
    assert_eq!(c.audience.header, "x-kubernetes-audience");
    assert_eq!(c.audience.parameter, "kubernetes-audience");
    assert_eq!(c.tokens.expiration, Duration::from_secs(3600));
    assert_eq!(c.tokens.on_token_error, OnTokenError::Deny);
    assert_eq!(c.tokens.bound_pod, None);
    assert_eq!(c.cache.max_audiences, 1000);
}

#[test]
fn namespace_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("namespace");
    std::fs::write(&file, "  team-a\n").unwrap();
    let c = parse(&[
        "--service-account",
        "app",
        "--namespace-file",
        file.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(c.tokens.namespace, "team-a");
    // --namespace wins over the file.
    let c = parse(&[
        "--service-account",
        "app",
        "--namespace-file",
        file.to_str().unwrap(),
        "--namespace",
        "b",
    ])
    .unwrap();
    assert_eq!(c.tokens.namespace, "b");
    let missing = dir.path().join("nope");
    let err = parse(&[
        "--service-account",
        "app",
        "--namespace-file",
        missing.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("could not be read"), "{err}");
}

#[test]
fn clear_errors_for_bad_input() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--allowed-audience",
                "https://**.example.com",
            ],
            "`**` is not supported",
        ),
        (
            &["--namespace", "demo"],
            "--service-account NAME or set SERVICE_ACCOUNT",
        ),
        (
            &["--service-account", "App!", "--namespace", "demo"],
            "not a valid Kubernetes name",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--token-expiration",
                "9m",
            ],
            "below the API server's minimum of 10m",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--grpc-listen-address",
                "0.0.0.0:1",
            ],
            "only listens on loopback",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--grpc-listen-address",
                "nope",
            ],
            "expected a loopback IP:PORT",
        ),
        (
            &["--service-account", "a", "--namespace", "d", "--bind-pod"],
            "--bind-pod needs",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--allowed-audience",
                "x",
                "--default-audience",
                "y",
            ],
            "not allowed",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--audience-header",
                "bad header",
            ],
            "not a valid HTTP header name",
        ),
        (
            &[
                "--service-account",
                "a",
                "--namespace",
                "d",
                "--apiserver",
                "::",
            ],
            "not a valid URL",
        ),
    ];
    for (args, want) in cases {
        let err = parse(args).unwrap_err().to_string();
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn unix_sockets_and_pod_binding() {
    let c = parse(&[
        "--service-account",
        "a",
        "--namespace",
        "d",
        "--grpc-listen-address",
        "unix:/tmp/kap.sock",
        "--bind-pod",
        "--pod-name",
        "p",
        "--pod-uid",
        "u-1",
        "--token-expiration",
        "10m",
    ])
    .unwrap();
    assert_eq!(c.server.grpc, ListenAddress::Unix("/tmp/kap.sock".into()));
    assert_eq!(
        c.tokens.bound_pod,
        Some(BoundPod {
            name: "p".into(),
            uid: "u-1".into()
        })
    );
    assert_eq!(c.tokens.expiration, Duration::from_secs(600));
    assert!(matches!(
        parse(&[
            "--service-account",
            "a",
            "--namespace",
            "d",
            "--grpc-listen-address",
            "[::1]:9"
        ])
        .unwrap()
        .server
        .grpc,
        ListenAddress::Tcp(_)
    ));
}

#[test]
fn clap_rejects_unknown_values() {
    for args in [
        vec!["x", "--log-level", "loud"],
        vec!["x", "--on-token-error", "maybe"],
        vec!["x", "--max-audiences", "0"],
        vec!["x", "--token-expiration", "soon"],
    ] {
        assert!(Cli::try_parse_from(args).is_err());
    }
}
#[test]
fn every_invalid_flag_is_reported_at_once() {
    let errors = parse(&[
        "--namespace",
        "Bad_NS",
        "--token-expiration",
        "1m",
        "--token-request-timeout",
        "0s",
        "--audience-idle-timeout",
        "0s",
        "--audience-header",
        "bad header",
        "--audience-parameter",
        "",
        "--allowed-audience",
        "[",
        "--audience-rule",
        "no-audience",
        "--audience-rule",
        "http://h=a",
        "--intercept-host",
        "not a host",
        "--certificate-validity",
        "1m",
        "--grpc-listen-address",
        "0.0.0.0:1",
        "--admin-listen-address",
        "localhost",
        "--apiserver",
        "::",
        "--bind-pod",
        "--max-concurrent-token-requests",
        "0",
        "--default-audience",
        "https://kubernetes.default.svc",
    ])
    .unwrap_err();
    let kinds: Vec<&str> = errors
        .iter()
        .map(|e| match e {
            ConfigError::MissingServiceAccount => "service-account",
            ConfigError::NamespaceFile { .. } => "namespace-file",
            ConfigError::InvalidName { .. } => "name",
            ConfigError::ListenAddress { flag, .. } => flag,
            ConfigError::NotLoopback(_) => "not-loopback",
            ConfigError::ApiServer(_) => "apiserver",
            ConfigError::TokenExpiration(_) => "token-expiration",
            ConfigError::AudienceHeader(_) => "audience-header",
            ConfigError::AudienceParameter => "audience-parameter",
            ConfigError::DefaultAudience(_) => "default-audience",
            ConfigError::AllowedAudience(_) => "allowed-audience",
            ConfigError::AudienceRule(_) => "audience-rule",
            ConfigError::MissingPod => "bind-pod",
            ConfigError::InterceptHost(_) => "intercept-host",
            ConfigError::CertificateValidity => "certificate-validity",
            ConfigError::ZeroDuration(flag) => flag,
            ConfigError::MaxConcurrentTokenRequests => "max-concurrent-token-requests",
            ConfigError::DefaultAudienceIsApiServer(_) => "default-audience-apiserver",
            ConfigError::RuleAudienceIsApiServer { .. } => "audience-rule-apiserver",
            ConfigError::TokenRequestTimeout(_) => "token-request-timeout",
            ConfigError::PrefetchAudience(_) => "prefetch-audience",
            ConfigError::PrefetchAudienceIsApiServer(_) => "prefetch-audience-apiserver",
            ConfigError::TooManyPrefetchAudiences { .. } => "prefetch-audience-count",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "apiserver",
            "service-account",
            "name",
            "token-expiration",
            "--token-request-timeout",
            "bind-pod",
            "--audience-idle-timeout",
            "max-concurrent-token-requests",
            "audience-header",
            "audience-parameter",
            "allowed-audience",
            "audience-rule",
            "audience-rule",
            "intercept-host",
            "certificate-validity",
            "not-loopback",
            "--admin-listen-address",
            "default-audience-apiserver",
        ]
    );
    // One line per error, so the binary prints each on its own line.
    assert_eq!(errors.to_string().lines().count(), kinds.len());
}

#[test]
fn address_flags_parse_alike() {
    let base = ["--service-account", "a", "--namespace", "d"];
    for flag in ["--grpc-listen-address", "--admin-listen-address"] {
        let mut args = base.to_vec();
        args.extend([flag, "nope"]);
        let errors = parse(&args).unwrap_err();
        assert!(
            matches!(
                errors.iter().collect::<Vec<_>>()[..],
                [ConfigError::ListenAddress { flag: f, .. }] if *f == flag
            ),
            "{flag}: {errors}"
        );
    }
    let mut args = base.to_vec();
    args.extend(["--admin-listen-address", "[::1]:0"]);
    assert_eq!(
        parse(&args).unwrap().server.admin,
        "[::1]:0".parse().unwrap()
    );
}

#[test]
fn limits_in_help_and_messages_come_from_the_constants() {
    let limit = humantime::format_duration(MIN_TOKEN_EXPIRATION).to_string();
    let help = <Cli as clap::CommandFactory>::command()
        .render_long_help()
        .to_string();
    assert!(help.contains(&format!("at least {limit}")), "{help}");
    let most = humantime::format_duration(MAX_TOKEN_REQUEST_TIMEOUT).to_string();
    assert!(help.contains(&format!("at most {most}")), "{help}");
    let errors = parse(&[
        "--service-account",
        "a",
        "--namespace",
        "d",
        "--certificate-validity",
        "5m",
    ])
    .unwrap_err();
    let expected = humantime::format_duration(MIN_CERTIFICATE_VALIDITY).to_string();
    assert!(errors.to_string().contains(&expected), "{errors}");
}

#[test]
fn local_destinations_are_refused_unless_allowed() {
    let base = ["--service-account", "app", "--namespace", "demo"];
    let c = parse(&base).unwrap();
    assert_eq!(c.local_destinations, LocalDestinations::Refuse);
    let c = parse(&[&base[..], &["--allow-local-destinations"]].concat()).unwrap();
    assert_eq!(c.local_destinations, LocalDestinations::Allow);
}

#[test]
fn api_server_audiences_in_rules_and_long_timeouts_are_refused() {
    let base = ["--service-account", "app", "--namespace", "demo"];
    let errors = parse(
        &[
            &base[..],
            &[
                "--audience-rule",
                "api.example=https://api.example",
                "--audience-rule",
                "x.example=https://Kubernetes.Default.svc/",
                "--audience-rule",
                "*.example=https://{host}",
                "--audience-rule",
                "y.example=*",
                "--audience-rule",
                "https://z.example:443=kubernetes.default.svc.cluster.local",
                "--token-request-timeout",
                "61s",
            ],
        ]
        .concat(),
    )
    .unwrap_err();
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{errors}");
    assert!(lines[0].starts_with("--token-request-timeout 1m 1s is longer than the maximum of 1m"));
    assert!(lines[1].starts_with(
        "--audience-rule \"x.example=https://Kubernetes.Default.svc/\": \"https://Kubernetes.Default.svc/\" is an audience of the Kubernetes API server itself"
    ));
    assert!(lines[2].starts_with(
        "--audience-rule \"https://z.example:443=kubernetes.default.svc.cluster.local\":"
    ));
    // The opt-in admits them; 1m is the longest timeout.
    let c = parse(
        &[
            &base[..],
            &[
                "--allow-apiserver-audience",
                "--audience-rule",
                "x.example=https://kubernetes.default.svc",
                "--token-request-timeout",
                "1m",
            ],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(c.tokens.request_timeout, MAX_TOKEN_REQUEST_TIMEOUT);
    assert_eq!(c.cache.request_timeout, MAX_TOKEN_REQUEST_TIMEOUT);
    // An --apiserver URL counts too.
    let errors = parse(
        &[
            &base[..],
            &[
                "--apiserver",
                "https://10.0.0.1:6443",
                "--audience-rule",
                "x.example=https://10.0.0.1:6443",
            ],
        ]
        .concat(),
    )
    .unwrap_err();
    assert!(
        matches!(
            errors.iter().collect::<Vec<_>>()[..],
            [ConfigError::RuleAudienceIsApiServer { .. }]
        ),
        "{errors}"
    );
}
