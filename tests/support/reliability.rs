//! The fault table in `RELIABILITY.md`, read by the tests that prove it.
//!
//! Each row of the table names a fault, what the client sees, what the
//! processor does, how it recovers, the outcome a test observes (a short
//! string in backticks) and that test. A fault test computes its observed
//! outcome from what really happened and calls [`check`]: if behaviour and
//! document drift apart, the test fails and says which cell to change.
//! `tests/reliability.rs` checks the table itself (unique ids, every row's
//! test exists and calls `check` with its id).

use std::path::PathBuf;

/// Where the table lives.
pub fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("RELIABILITY.md")
}

/// One row of the fault table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub fault: String,
    pub client_sees: String,
    pub processor_does: String,
    pub recovery: String,
    /// The observed outcome, without its backticks.
    pub observed: String,
    /// `tests/FILE.rs::function` (or `src/...::function` for unit tests).
    pub test: String,
}

/// The column headers, in order (the checker refuses a table without them).
pub const COLUMNS: [&str; 7] = [
    "ID",
    "Fault",
    "Client sees",
    "Processor does",
    "Recovery",
    "Observed",
    "Test",
];

/// Every row of every fault table in `RELIABILITY.md` (a table is one whose
/// header row is [`COLUMNS`]).
pub fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(path()).unwrap();
    parse(&text)
}

/// Parses the fault tables out of markdown `text`.
pub fn parse(text: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells = cells(line);
        if cells.iter().map(String::as_str).eq(COLUMNS) {
            in_table = true;
            continue;
        }
        if !in_table
            || cells
                .iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        assert_eq!(
            cells.len(),
            COLUMNS.len(),
            "RELIABILITY.md: a fault table row needs {} cells: {line}",
            COLUMNS.len()
        );
        rows.push(Row {
            id: unquote(&cells[0]),
            fault: cells[1].clone(),
            client_sees: cells[2].clone(),
            processor_does: cells[3].clone(),
            recovery: cells[4].clone(),
            observed: unquote(&cells[5]),
            test: unquote(&cells[6]),
        });
    }
    rows
}

/// Splits a markdown table row into trimmed cells (`\|` stays in a cell).
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_owned()).collect()
}

fn unquote(cell: &str) -> String {
    cell.trim().trim_matches('`').to_owned()
}

/// The row `id`; panics (the test fails) if the table has none.
pub fn row(id: &str) -> Row {
    rows()
        .into_iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("RELIABILITY.md has no fault table row `{id}`"))
}

/// Asserts that what the test observed for fault `id` is what the table
/// states in its Observed column.
pub fn check(id: &str, observed: &str) {
    let row = row(id);
    assert_eq!(
        row.observed, observed,
        "RELIABILITY.md row `{id}` ({}) states `{}` but the test observed `{observed}`: \
         fix the code or the table",
        row.fault, row.observed
    );
}
