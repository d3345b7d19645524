//! `RELIABILITY.md` is checked, not trusted: every fault table row names a
//! test that exists and that checks that very row against what it observed
//! (`support::reliability::check`), and every such check names a row.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use support::reliability::{self, COLUMNS};

/// The body of top-level function `name` in `source`: from its `fn` line to
/// the next top-level item.
fn function_body<'a>(source: &'a str, name: &str) -> Option<&'a str> {
    let start = [format!("\nfn {name}("), format!("\nasync fn {name}(")]
        .iter()
        .filter_map(|needle| source.find(needle.as_str()))
        .min()?;
    let rest = &source[start + 1..];
    let end = rest[1..]
        .find("\n#[")
        .into_iter()
        .chain(rest[1..].find("\nfn "))
        .chain(rest[1..].find("\nasync fn "))
        .min()
        .map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

/// The ids `source` passes to `reliability::check`, whitespace ignored.
fn checked_ids(source: &str) -> Vec<String> {
    let squeezed: String = source.chars().filter(|c| !c.is_whitespace()).collect();
    squeezed
        .match_indices("reliability::check(\"")
        .filter_map(|(i, m)| {
            let rest = &squeezed[i + m.len()..];
            rest.find('"').map(|end| rest[..end].to_owned())
        })
        .collect()
}

#[test]
fn every_row_names_a_test_that_checks_it() {
    let rows = reliability::rows();
    assert!(
        rows.len() >= 20,
        "RELIABILITY.md holds {} fault rows",
        rows.len()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seen = BTreeSet::new();
    for row in &rows {
        assert!(seen.insert(row.id.clone()), "duplicate row id `{}`", row.id);
        assert!(
            !row.id.is_empty()
                && row
                    .id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "row id `{}`: lower-case words joined by `-`",
            row.id
        );
        for (column, cell) in [
            (COLUMNS[1], &row.fault),
            (COLUMNS[2], &row.client_sees),
            (COLUMNS[3], &row.processor_does),
            (COLUMNS[4], &row.recovery),
            (COLUMNS[5], &row.observed),
        ] {
            assert!(!cell.is_empty(), "row `{}`: empty {column}", row.id);
        }
        let (file, function) = row
            .test
            .split_once("::")
            .unwrap_or_else(|| panic!("row `{}`: Test must be `tests/FILE.rs::function`", row.id));
        assert!(
            file.starts_with("tests/"),
            "row `{}`: {file} is not an integration test",
            row.id
        );
        let source = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("row `{}`: {file}: {e}", row.id));
        let body = function_body(&source, function)
            .unwrap_or_else(|| panic!("row `{}`: no function {function} in {file}", row.id));
        assert!(
            checked_ids(body).contains(&row.id),
            "row `{}`: {file}::{function} never calls reliability::check(\"{}\", ...)",
            row.id,
            row.id
        );
    }
}

#[test]
fn every_check_in_the_tests_names_a_row_of_its_file() {
    let rows: BTreeMap<String, String> = reliability::rows()
        .into_iter()
        .map(|r| (r.id, r.test))
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![];
    let mut dirs = vec![root.join("tests")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut checks = 0;
    for path in files {
        let relative = path
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if relative == "tests/reliability.rs" || relative.starts_with("tests/support/") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        for id in checked_ids(&source) {
            checks += 1;
            let test = rows
                .get(&id)
                .unwrap_or_else(|| panic!("{relative} checks `{id}`, which RELIABILITY.md lacks"));
            assert!(
                test.starts_with(&format!("{relative}::")),
                "{relative} checks `{id}`, but the row names {test}"
            );
        }
    }
    assert!(
        checks >= rows.len(),
        "{checks} checks for {} rows",
        rows.len()
    );
}

#[test]
fn the_parser_reads_escaped_pipes_and_skips_other_tables() {
    let text = "\
| A | B |\n|---|---|\n| x | y |\n\n\
| ID | Fault | Client sees | Processor does | Recovery | Observed | Test |\n\
|---|---|---|---|---|---|---|\n\
| `a-b` | one \\| two | 503 | retries | by itself | `503 then 200` | `tests/x.rs::f` |\n";
    let rows = reliability::parse(text);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, "a-b");
    assert_eq!(rows[0].fault, "one | two");
    assert_eq!(rows[0].observed, "503 then 200");
    assert_eq!(rows[0].test, "tests/x.rs::f");
}
