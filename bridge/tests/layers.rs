//! The dependency rule of `docs/ARCHITECTURE.md`, checked on the source: every module of
//! `bridge/src` sits in one layer (its top-level folder or file says which), and imports
//! only from its own layer and the layers below it. A few pairs inside a layer are ruled
//! out too (the journal knows no hotplug type; channels and backends know no operation).
//! Reads the `crate::` paths of non-test code, as text.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The layers, top down, and the top-level modules each holds.
const LAYERS: &[(&str, &[&str])] = &[
    ("edge", &["lib", "main", "notify"]),
    ("front ends", &["api"]),
    ("service", &["service"]),
    ("connections", &["net"]),
    ("policy", &["policy"]),
    ("VMs", &["vms"]),
    ("operations", &["hotplug", "journal", "signals"]),
    ("channels and backends", &["session", "backend"]),
    (
        "leaves",
        &[
            "config", "names", "peer", "call", "error", "metrics", "fault",
        ],
    ),
];

/// Imports ruled out although the layers allow them: (importer, imported).
const FORBIDDEN: &[(&str, &str)] = &[
    ("journal", "hotplug"),
    ("session", "backend"),
    ("backend", "session"),
];

/// The layer of top-level module `m`, by its index in [`LAYERS`].
fn layer(m: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&m))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of `text` without comments and without its inline test module.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            // An inline test module runs to the end of the file by convention; a
            // `mod tests;` declaration is a file of its own, skipped by name.
            break;
        }
        let line = line.split("//").next().unwrap_or_default();
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level modules `code` names through `crate::`, grouped `use` lists included.
fn imports(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c, d::{e, f}}`: the first segment of each depth-1 item.
            let mut depth = 0;
            let mut item_start = true;
            for (i, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[i..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && depth == 0 && c.is_ascii_alphabetic() => {
                        found.push(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.push(ident(rest));
        }
    }
    found
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The top-level module a source file belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

#[test]
fn every_module_imports_only_its_own_layer_and_the_ones_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let me = module_of(&src, file);
        let Some(mine) = layer(&me) else {
            broken.push(format!("{}: module `{me}` is in no layer", file.display()));
            continue;
        };
        let text = fs::read_to_string(file).expect("readable");
        for other in imports(&code(&text)) {
            if other == me || other.is_empty() || other == "self" {
                continue;
            }
            let Some(theirs) = layer(&other) else {
                broken.push(format!(
                    "{}: `crate::{other}` is in no layer",
                    file.display()
                ));
                continue;
            };
            if theirs < mine {
                broken.push(format!(
                    "{}: `{me}` ({}) imports `{other}`, which is above it ({})",
                    file.display(),
                    LAYERS[mine].0,
                    LAYERS[theirs].0
                ));
            }
            if FORBIDDEN.contains(&(me.as_str(), other.as_str())) {
                broken.push(format!(
                    "{}: `{me}` must not import `{other}`",
                    file.display()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "the dependency rule is broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_reader_finds_grouped_and_inline_imports() {
    let code = code(
        "use crate::{a::B, c, d::{e, f}};\n// crate::g\nfn x() { crate::h::i(); }\n\
         #[cfg(test)]\nmod tests { use crate::j; }\n",
    );
    assert_eq!(imports(&code), ["a", "c", "d", "h"]);
}
