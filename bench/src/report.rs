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

/// A Markdown text split at its level-2 headings: what comes before the first (`head`),
/// then each `## ` section (title, text from its heading line up to the next heading).
/// Concatenating `head` and every section's text gives back the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sections {
    /// Everything before the first `## ` line.
    pub head: String,
    /// `(title, text)` in order.
    pub sections: Vec<(String, String)>,
}

/// The last section of every report; sections new to a file go before it.
pub const LAST_SECTION: &str = "Reading the figures";

impl Sections {
    /// Splits `text`.
    pub fn parse(text: &str) -> Self {
        let mut head = String::new();
        let mut sections: Vec<(String, String)> = Vec::new();
        for line in text.split_inclusive('\n') {
            if let Some(title) = line.strip_prefix("## ") {
                sections.push((title.trim_end().to_string(), String::new()));
            }
            match sections.last_mut() {
                Some((_, body)) => body.push_str(line),
                None => head.push_str(line),
            }
        }
        Self { head, sections }
    }

    /// Replaces each section of `new` that this one has, in place; inserts the others
    /// before [`LAST_SECTION`] (or at the end). Returns the titles taken from `new`.
    pub fn replace(&mut self, new: &Sections) -> Vec<String> {
        let mut titles = Vec::new();
        for (title, text) in &new.sections {
            titles.push(title.clone());
            if let Some(slot) = self.sections.iter_mut().find(|(t, _)| t == title) {
                slot.1 = text.clone();
            } else {
                let at = self
                    .sections
                    .iter()
                    .position(|(t, _)| t == LAST_SECTION)
                    .unwrap_or(self.sections.len());
                self.sections.insert(at, (title.clone(), text.clone()));
            }
        }
        titles
    }

    /// Records in the head that `titles` were re-run alone: one line per section, right
    /// after the `Written by` line (so it reads as part of that paragraph), replacing the
    /// section's earlier line.
    pub fn note_rerun(&mut self, titles: &[String], note: &dyn Fn(&str) -> String) {
        let mut lines: Vec<String> = self.head.lines().map(str::to_string).collect();
        lines.retain(|l| {
            !(l.starts_with(RERUN_PREFIX)
                && titles
                    .iter()
                    .any(|t| l.starts_with(&format!("{RERUN_PREFIX}{t}”"))))
        });
        let written = lines.iter().position(|l| l.starts_with("Written by"));
        let mut at = match written {
            Some(i) => i + 1,
            None => lines.len().min(1),
        };
        while lines.get(at).is_some_and(|l| l.starts_with(RERUN_PREFIX)) {
            at += 1;
        }
        for t in titles {
            lines.insert(at, format!("{RERUN_PREFIX}{t}” {}", note(t)));
            at += 1;
        }
        self.head = lines.join("\n") + "\n";
    }

    /// The whole text again.
    pub fn text(&self) -> String {
        let mut out = self.head.clone();
        for (_, text) in &self.sections {
            out.push_str(text);
        }
        out
    }
}

/// How a head line about a section re-run alone starts; the section title follows, closed
/// by `”`.
const RERUN_PREFIX: &str = "Section “";

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "# Benchmarks\n\nWritten by x. Date: d1. Commit: `c1`.\n\nFigures.\n\n## A\n\na\n\n\n## B\n\nb\n\n\n## Reading the figures\n\nr\n";

    #[test]
    fn parse_round_trips() {
        let s = Sections::parse(OLD);
        assert_eq!(s.text(), OLD);
        let titles: Vec<&str> = s.sections.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(titles, ["A", "B", "Reading the figures"]);
    }

    #[test]
    fn replaces_in_place_and_inserts_before_the_last_section() {
        let mut s = Sections::parse(OLD);
        let new = Sections::parse("\n## B\n\nb2\n\n\n## C\n\nc\n\n\n## Reading the figures\n\nr\n");
        let titles = s.replace(&new);
        assert_eq!(titles, ["B", "C", "Reading the figures"]);
        let order: Vec<&str> = s.sections.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(order, ["A", "B", "C", "Reading the figures"]);
        assert!(s.text().contains("## A\n\na\n"));
        assert!(s.text().contains("## B\n\nb2\n"));
        assert!(!s.text().contains("\nb\n"));
    }

    #[test]
    fn rerun_notes_replace_earlier_ones() {
        let mut s = Sections::parse(OLD);
        s.note_rerun(&["B".into()], &|_| "re-run on d2.".into());
        s.note_rerun(&["C".into()], &|_| "re-run on d3.".into());
        s.note_rerun(&["B".into()], &|_| "re-run on d4.".into());
        assert!(s.head.starts_with(
            "# Benchmarks\n\nWritten by x. Date: d1. Commit: `c1`.\nSection “C” re-run on d3.\nSection “B” re-run on d4.\n\nFigures.\n"
        ), "{}", s.head);
    }
}
