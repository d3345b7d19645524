//! README.md against the code (issue 9 item 7).
//!
//! - The "## Flags" table has exactly one row per flag clap defines, with
//!   the flag's value name (or its possible values), its environment
//!   variable (and "comma-separated" exactly for list flags) and its default,
//!   and the real binary's `--help` shows the same flags, variables and
//!   defaults.
//! - The "## Troubleshooting" section quotes the reasons the processor and
//!   Envoy's configuration actually produce: every literal piece of each
//!   quoted reason shape occurs in the shipped source, every `details`
//!   string is one the processor sends, every `outcome` one it counts.
//! - The Envoy stats it names exist in the real Envoy running the shipped
//!   `envoy/envoy.yaml`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use clap::{ArgAction, CommandFactory};
use kube_audience_proxy::config::Cli;

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text of the `## heading` section, up to the next `## ` heading.
fn section(readme: &str, heading: &str) -> String {
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no `## {heading}` section"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 4);
    rest[..end].to_owned()
}

/// The cells of a Markdown table row, split on `|` not escaped as `\|`
/// (the escape is kept out of the cell's text).
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.iter().map(|c| c.trim().to_owned()).collect()
}

/// The `code spans` of a cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// What the README row of a flag must say, from clap's definition.
#[derive(Debug, PartialEq, Eq)]
struct FlagRow {
    flag: String,
    env: String,
    comma_separated: bool,
    default: String,
}

fn expected_rows() -> BTreeMap<String, FlagRow> {
    let command = Cli::command();
    let mut rows = BTreeMap::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let long = arg.get_long().expect("every flag has a long name");
        let takes_value = !matches!(arg.get_action(), ArgAction::SetTrue);
        // A switch shows no value, a flag with a fixed set of values shows
        // them (`deny|allow`, as `--help` lists them), any other its value name.
        let possible: Vec<_> = arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_owned())
            .collect();
        let flag = if !takes_value {
            format!("--{long}")
        } else if !possible.is_empty() {
            format!("--{long} {}", possible.join("|"))
        } else {
            let names = arg
                .get_value_names()
                .unwrap_or_else(|| panic!("--{long} has no value name"));
            let names: Vec<_> = names.iter().map(|n| n.as_str()).collect();
            format!("--{long} {}", names.join(" "))
        };
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{long} has no environment fallback"))
            .to_string_lossy()
            .into_owned();
        let default = if !takes_value {
            "off".to_owned()
        } else {
            let values: Vec<_> = arg
                .get_default_values()
                .iter()
                .map(|v| format!("`{}`", v.to_string_lossy()))
                .collect();
            values.join(", ")
        };
        rows.insert(
            format!("--{long}"),
            FlagRow {
                flag,
                env,
                comma_separated: arg.get_value_delimiter() == Some(','),
                default,
            },
        );
    }
    rows
}

/// The README's rows, keyed by flag; a flag listed twice is an error.
fn readme_rows(text: &str) -> (BTreeMap<String, FlagRow>, Vec<String>) {
    let mut rows = BTreeMap::new();
    let mut problems = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("| `--")) {
        let cells = cells(line);
        assert!(
            cells.len() >= 4,
            "a Flags row with fewer than 4 cells: {line}"
        );
        let flag = code_spans(&cells[0]).concat();
        let key = flag.split(' ').next().unwrap_or_default().to_owned();
        let env = code_spans(&cells[1]).into_iter().next().unwrap_or_default();
        // A default written in code is a value clap must have; anything else
        // ("off", "none", "(required)", "in-cluster config") says there is
        // none, and only "off" stands for a switch.
        let spans = code_spans(&cells[2]);
        let default = if cells[2] == "off" {
            "off".to_owned()
        } else {
            spans
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let row = FlagRow {
            flag,
            env,
            comma_separated: cells[1].contains("comma-separated"),
            default,
        };
        if rows.insert(key.clone(), row).is_some() {
            problems.push(format!("{key}: listed more than once"));
        }
    }
    (rows, problems)
}

#[test]
fn flags_table_has_one_row_per_flag_with_its_env_and_default() {
    let expected = expected_rows();
    let (found, mut problems) = readme_rows(&section(&readme(), "Flags"));
    for (key, want) in &expected {
        match found.get(key) {
            None => problems.push(format!("{key}: no row (expected {want:?})")),
            Some(got) if got != want => {
                problems.push(format!("{key}:\n    README: {got:?}\n    clap:   {want:?}"))
            }
            Some(_) => {}
        }
    }
    for key in found.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!(
            "{key}: a README row for a flag clap does not define"
        ));
    }
    assert!(
        problems.is_empty(),
        "README.md \"## Flags\" differs from the command line:\n  {}",
        problems.join("\n  ")
    );
    assert!(expected.len() > 30, "clap defines {} flags", expected.len());
}

#[test]
fn help_of_the_real_binary_shows_every_flag_env_and_default() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kube-audience-proxy"))
        .arg("--help")
        .output()
        .expect("run kube-audience-proxy --help");
    assert!(output.status.success(), "--help failed: {output:?}");
    let help = String::from_utf8(output.stdout).expect("--help is UTF-8");
    // clap's help: the flag line, then the explanation, then `[env: X=]` and
    // `[default: V]` (also `[possible values: ...]`) before the next flag.
    let mut blocks: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        if line.starts_with("      --") || line.starts_with("  -") {
            let flag = trimmed
                .split([' ', '<'])
                .find(|w| w.starts_with("--"))
                .unwrap_or_default()
                .to_owned();
            current = Some(flag.clone());
            blocks.insert(flag, line.to_owned());
        } else if let Some(flag) = &current {
            let block = blocks.get_mut(flag).unwrap();
            block.push('\n');
            block.push_str(line);
        }
    }
    let (rows, _) = readme_rows(&section(&readme(), "Flags"));
    let mut problems = Vec::new();
    for (key, row) in &rows {
        let Some(block) = blocks.get(key) else {
            problems.push(format!("{key}: not in --help"));
            continue;
        };
        let block = block.split_whitespace().collect::<Vec<_>>().join(" ");
        if !block.contains(&format!("[env: {}=]", row.env)) {
            problems.push(format!("{key}: --help does not show [env: {}=]", row.env));
        }
        for default in code_spans(&row.default) {
            if !block.contains(&format!("[default: {default}]")) {
                problems.push(format!("{key}: --help does not show [default: {default}]"));
            }
        }
    }
    let extra: Vec<_> = blocks
        .keys()
        .filter(|k| !rows.contains_key(*k) && *k != "--help" && *k != "--version")
        .collect();
    assert!(
        extra.is_empty(),
        "flags in --help but not in README.md: {extra:?}"
    );
    assert!(
        problems.is_empty(),
        "README.md vs --help:\n  {}",
        problems.join("\n  ")
    );
}

/// Every `.rs` file under `src/` and the shipped Envoy configuration, with
/// Rust string continuations (`\` at a line end and the next line's
/// indentation) joined, so a reason split over lines reads as one.
fn shipped_text() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = String::new();
    walk(&root.join("src"), &mut text);
    text.push_str(&std::fs::read_to_string(root.join("envoy/envoy.yaml")).unwrap());
    // As Rust reads a string: `\` before a line end skips that line end
    // and all whitespace after it.
    let mut joined = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("\\\n") {
        joined.push_str(&rest[..i]);
        rest = rest[i + 2..].trim_start();
    }
    joined.push_str(rest);
    joined
}

/// The rows of the Troubleshooting table of client-visible answers:
/// `| status | body | details | outcome | what to do |`.
fn troubleshooting_rows() -> Vec<Vec<String>> {
    let text = section(&readme(), "Troubleshooting");
    let rows: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("| `") || l.starts_with("| **"))
        .map(cells)
        .filter(|c| c.len() == 5)
        .collect();
    assert!(
        rows.len() >= 10,
        "the Troubleshooting table has {} rows",
        rows.len()
    );
    rows
}

#[test]
fn troubleshooting_quotes_the_reasons_the_code_produces() {
    let shipped = shipped_text();
    let mut problems = Vec::new();
    let mut pieces = 0;
    for row in troubleshooting_rows() {
        // A reason shape: literal text with <placeholders> for what varies.
        for shape in code_spans(&row[1]) {
            for piece in shape.split('<').enumerate().flat_map(|(i, s)| {
                let literal = if i == 0 {
                    s
                } else {
                    s.split_once('>').map_or("", |p| p.1)
                };
                [literal.trim()]
            }) {
                if piece.len() < 3 {
                    continue;
                }
                pieces += 1;
                if !shipped.contains(piece) {
                    problems.push(format!(
                        "{}: {piece:?} is not in src/ or envoy/envoy.yaml",
                        row[0]
                    ));
                }
            }
        }
        for details in code_spans(&row[2]) {
            if !shipped.contains(&format!("\"{details}\"")) {
                problems.push(format!("{}: details {details:?} is never sent", row[0]));
            }
        }
        for outcome in code_spans(&row[3]) {
            if !shipped.contains(&format!("=> \"{outcome}\"")) {
                problems.push(format!("{}: outcome {outcome:?} is not counted", row[0]));
            }
        }
    }
    assert!(pieces >= 15, "only {pieces} quoted pieces were checked");
    assert!(
        problems.is_empty(),
        "README.md Troubleshooting:\n  {}",
        problems.join("\n  ")
    );
}

/// The Envoy stats the Troubleshooting section names, in a real Envoy that
/// runs the shipped configuration.
#[tokio::test]
async fn troubleshooting_names_real_envoy_stats() {
    let text = section(&readme(), "Troubleshooting");
    let named: Vec<String> = code_spans(&text)
        .into_iter()
        .filter(|s| !s.ends_with('.'))
        .filter(|s| {
            s.starts_with("http.forward_proxy.")
                || s.starts_with("http.intercept.")
                || s.starts_with("dns_cache.")
                || s.starts_with("cluster.kube_audience_proxy.")
                || s.starts_with("listener.envoy_internal_intercept.")
        })
        .collect();
    assert!(named.len() >= 8, "the section names only {named:?}");
    let mut config = support::envoy::shipped_config();
    support::envoy::point_at_processor(&mut config, "127.0.0.1:9");
    let envoy = support::envoy::Envoy::start(&config).await;
    let (status, stats) = envoy.admin_get("/stats").await;
    assert_eq!(status, 200);
    let present: Vec<&str> = stats.lines().filter_map(|l| l.split(": ").next()).collect();
    let missing: Vec<_> = named
        .iter()
        .filter(|n| !present.iter().any(|p| p == n))
        .collect();
    assert!(
        missing.is_empty(),
        "not stats of the shipped Envoy: {missing:?}"
    );
}
