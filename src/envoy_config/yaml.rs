//! Writing YAML by lines: the generated configuration keeps the layout and
//! comments of the shipped files, which a serializer would lose.

use std::fmt::Write as _;

/// YAML text under construction.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    text: String,
    /// The column of a `- ` that the next line at that column + 2 starts.
    item: Option<usize>,
}

impl Lines {
    /// One line at `indent` columns.
    pub(crate) fn line(&mut self, indent: usize, text: &str) {
        match self.item.take() {
            Some(dash) if indent == dash + 2 => {
                let _ = writeln!(self.text, "{:dash$}- {text}", "");
            }
            _ => {
                let _ = writeln!(self.text, "{:indent$}{text}", "");
            }
        }
    }

    /// The next line written at `dash + 2` opens a sequence item at `dash`.
    pub(crate) fn open_item(&mut self, dash: usize) {
        self.item = Some(dash);
    }

    /// Lines already formatted (a template's block), each moved right by `indent`.
    pub(crate) fn block(&mut self, indent: usize, block: &str) {
        for line in block.lines() {
            if line.is_empty() {
                self.text.push('\n');
            } else {
                self.line(indent, line);
            }
        }
    }

    pub(crate) fn into_string(self) -> String {
        self.text
    }
}

/// `text` as a YAML double-quoted scalar (JSON string escapes, which YAML
/// reads the same way).
pub(crate) fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_what_yaml_must_not_read() {
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(quote("x\ny"), "\"x\\u000ay\"");
    }

    #[test]
    fn an_item_opens_on_the_next_line_two_columns_in() {
        let mut lines = Lines::default();
        lines.line(0, "list:");
        lines.open_item(2);
        lines.line(4, "a: 1");
        lines.line(4, "b: 2");
        assert_eq!(lines.into_string(), "list:\n  - a: 1\n    b: 2\n");
    }
}
