//! `--prefetch-audience`: audiences whose tokens are minted at startup and
//! refreshed on a timer; readiness waits for them. The literal audiences
//! of `--audience-rule` join them: together they are the fast-path
//! audiences, whose tokens SDS also serves (see `sds::tokens`). Each must be a valid
//! audience that `--allowed-audience` admits, not one of the API server's
//! own (unless `--allow-apiserver-audience`), and together they must fit in
//! `--max-audiences`.

use super::error::Collector;
use super::{Cli, ConfigError};
use crate::audience::{self, Audience, Rules};

/// The validated `--prefetch-audience` list (duplicates once, in the order
/// given), every bad one reported on its own line. `rules` is `None` when
/// the audience settings are invalid (reported on their own): nothing can
/// be checked against the allowlist then.
pub(super) fn prefetch_audiences(
    cli: &Cli,
    rules: Option<&Rules>,
    errors: &mut Collector,
) -> Option<Vec<Audience>> {
    let mut audiences: Vec<Audience> = Vec::new();
    let mut ok = Some(());
    for raw in &cli.prefetch_audience {
        match prefetch_audience(cli, raw, rules) {
            Ok(Some(audience)) if !audiences.contains(&audience) => audiences.push(audience),
            Ok(_) => {}
            Err(error) => ok = errors.take(Err(error)),
        }
    }
    // The fast path: literal `--audience-rule` audiences are prefetched too
    // (checked against the allowlist and the API server's audiences with
    // the rules themselves).
    if let Some(rules) = rules {
        for audience in rules.destinations.literal_audiences() {
            if !audiences.contains(audience) {
                audiences.push(audience.clone());
            }
        }
    }
    let count = u64::try_from(audiences.len()).unwrap_or(u64::MAX);
    let fits = errors.check(count <= cli.max_audiences, || {
        ConfigError::TooManyPrefetchAudiences {
            count,
            max: cli.max_audiences,
        }
    });
    ok?;
    fits?;
    rules?;
    Some(audiences)
}

/// One `--prefetch-audience`; `Ok(None)` when it cannot be checked (the
/// allowlist is broken, which is reported on its own).
fn prefetch_audience(
    cli: &Cli,
    raw: &str,
    rules: Option<&Rules>,
) -> Result<Option<Audience>, ConfigError> {
    let audience = Audience::parse(raw.as_bytes(), audience::Source::Default)
        .map_err(ConfigError::PrefetchAudience)?;
    if !cli.allow_apiserver_audience
        && crate::apiserver::is_known_apiserver_audience(
            audience.as_str(),
            cli.apiserver.as_deref(),
        )
    {
        return Err(ConfigError::PrefetchAudienceIsApiServer(raw.to_owned()));
    }
    let Some(rules) = rules else {
        return Ok(None);
    };
    if !rules.allowlist.allows(&audience) {
        return Err(ConfigError::PrefetchAudience(
            audience::Rejection::NotAllowed { audience },
        ));
    }
    Ok(Some(audience))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Config, ConfigErrors};
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigErrors> {
        let mut argv = vec![
            "kube-audience-proxy",
            "--service-account",
            "a",
            "--namespace",
            "d",
        ];
        argv.extend_from_slice(extra);
        Config::try_from(Cli::try_parse_from(argv).unwrap())
    }

    fn names(config: &Config) -> Vec<&str> {
        config.prefetch.iter().map(Audience::as_str).collect()
    }

    #[test]
    fn repeatable_deduplicated_in_order() {
        let config = parse(&[
            "--prefetch-audience",
            "https://b.example",
            "--prefetch-audience",
            "https://a.example",
            "--prefetch-audience",
            "https://b.example",
        ])
        .unwrap();
        assert_eq!(names(&config), ["https://b.example", "https://a.example"]);
        assert!(parse(&[]).unwrap().prefetch.is_empty());
    }

    #[test]
    fn literal_rule_audiences_are_fast_path_and_prefetched() {
        let config = parse(&[
            "--prefetch-audience",
            "https://b.example",
            "--audience-rule",
            "metrics.example=https://m.example",
            "--audience-rule",
            "*.svc=https://{host}",
            "--audience-rule",
            "any.example=*",
            "--audience-rule",
            "again.example=https://b.example",
        ])
        .unwrap();
        // The template and `*` are known only per request: not prefetched.
        assert_eq!(names(&config), ["https://b.example", "https://m.example"]);
    }

    #[test]
    fn each_must_be_allowed_and_not_the_api_servers() {
        let errors = parse(&[
            "--allowed-audience",
            "https://*.example",
            "--prefetch-audience",
            "https://ok.example",
            "--prefetch-audience",
            "https://other.test",
            "--prefetch-audience",
            "https://kubernetes.default.svc",
            "--prefetch-audience",
            "",
        ])
        .unwrap_err();
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert_eq!(
            lines[0],
            "--prefetch-audience: the audience \"https://other.test\" is not allowed by this proxy"
        );
        assert!(
            lines[1].starts_with(
                "--prefetch-audience \"https://kubernetes.default.svc\" is an audience of the Kubernetes API server itself"
            ),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("--prefetch-audience: the audience (default) is empty"),
            "{}",
            lines[2]
        );
        // The opt-in admits the API server's audience, as for the default.
        let config = parse(&[
            "--allow-apiserver-audience",
            "--prefetch-audience",
            "https://kubernetes.default.svc",
        ])
        .unwrap();
        assert_eq!(names(&config), ["https://kubernetes.default.svc"]);
    }

    #[test]
    fn they_count_against_max_audiences() {
        let two = [
            "--prefetch-audience",
            "https://a.example",
            "--prefetch-audience",
            "https://b.example",
        ];
        let mut args = two.to_vec();
        args.extend(["--max-audiences", "2"]);
        assert_eq!(parse(&args).unwrap().prefetch.len(), 2);
        let mut args = two.to_vec();
        args.extend(["--max-audiences", "1"]);
        let errors = parse(&args).unwrap_err();
        assert_eq!(
            errors.to_string(),
            "2 --prefetch-audience values do not fit in --max-audiences 1: prefetched audiences count against it"
        );
    }

    #[test]
    fn comma_separated_in_the_environment() {
        // The same `value_delimiter` as --allowed-audience: the environment
        // value splits on commas (clap applies it to env and flags alike).
        let config =
            parse(&["--prefetch-audience", "https://a.example,https://b.example"]).unwrap();
        assert_eq!(names(&config), ["https://a.example", "https://b.example"]);
        let arg = <Cli as clap::CommandFactory>::command()
            .get_arguments()
            .find(|a| a.get_id() == "prefetch_audience")
            .map(|a| (a.get_env().map(|e| e.to_owned()), a.get_value_delimiter()))
            .unwrap();
        assert_eq!(
            arg,
            (
                Some("KUBE_AUDIENCE_PROXY_PREFETCH_AUDIENCES".into()),
                Some(',')
            )
        );
    }
}
