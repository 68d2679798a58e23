//! The Markdown report, `docs/BENCHMARKS.md`.

use std::fmt::Write as _;

/// Accumulates Markdown; sections append headings, paragraphs and tables.
#[derive(Default)]
pub struct Report {
    text: String,
}

impl Report {
    /// A level-2 heading.
    pub fn heading(&mut self, title: &str) {
        let _ = write!(self.text, "\n## {title}\n\n");
        eprintln!("bench: {title}");
    }

    /// A paragraph.
    pub fn para(&mut self, text: &str) {
        let _ = write!(self.text, "{text}\n\n");
    }

    /// Starts a table with these column titles.
    pub fn table(&mut self, columns: &[&str]) {
        let _ = writeln!(self.text, "| {} |", columns.join(" | "));
        let _ = writeln!(self.text, "|{}", "---|".repeat(columns.len()));
    }

    /// One table row (also echoed to stderr as progress).
    pub fn row(&mut self, cells: &[String]) {
        let line = format!("| {} |", cells.join(" | "));
        eprintln!("bench: {line}");
        let _ = writeln!(self.text, "{line}");
    }

    /// Ends the current table.
    pub fn end_table(&mut self) {
        self.text.push('\n');
    }

    /// The Markdown so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}
