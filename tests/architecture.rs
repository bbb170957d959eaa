//! The shape of the code, checked: the supervisor's core has no system interface,
//! the crate's modules import each other without a cycle, and the master's shell
//! stays small (DESIGN.md, "The master loop: a pure core in a thin shell").
//!
//! Reads the sources as text: comments are skipped, so a doc line naming
//! `crate::master` is not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The file's code without its comment lines.
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("a source file")
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_supervisor_core_makes_no_system_call_and_reads_no_clock() {
    const FORBIDDEN: [&str; 12] = [
        "nix::",
        "libc::",
        "signal_hook",
        "socket2",
        "std::fs",
        "std::process",
        "std::net",
        "std::os",
        "std::thread",
        "Instant::now",
        "SystemTime",
        "crate::",
    ];
    let core = src().join("supervisor");
    let files = sources(&core);
    assert!(
        files.len() >= 5,
        "src/supervisor/ holds the core: {files:?}"
    );
    let mut found = Vec::new();
    for file in files {
        // The simulator is a test: it may read the clock once for its base time.
        if file.ends_with("simulation.rs") {
            continue;
        }
        let text = code(&file);
        // Unit tests at the end of a file may build times from Instant::now().
        let tests_from = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
        for word in FORBIDDEN {
            let tolerated = |at: usize| word == "Instant::now" && at > tests_from;
            if text.match_indices(word).any(|(at, _)| !tolerated(at)) {
                found.push(format!("{}: {word}", file.display()));
            }
        }
    }
    assert!(found.is_empty(), "the core touches the system: {found:#?}");
}

#[test]
fn the_modules_import_each_other_without_a_cycle() {
    let src = src();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&src) {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative.iter().next().expect("a name").to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if ["bin", "main", "lib"].contains(&top.as_str()) {
            continue;
        }
        let text = code(&file);
        let mut deps = BTreeSet::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            if let Some(rest) = rest.strip_prefix('{') {
                let group = rest.split('}').next().unwrap_or("");
                for item in group.split(',') {
                    deps.insert(item.trim().split("::").next().unwrap_or("").to_string());
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                deps.insert(name);
            }
        }
        deps.retain(|d| !d.is_empty() && *d != top && d != "self");
        graph.entry(top).or_default().extend(deps);
    }
    assert!(graph.contains_key("supervisor") && graph.contains_key("master"));
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
    assert!(
        graph["supervisor"].is_empty(),
        "the core imports {:?}",
        graph["supervisor"]
    );
}

#[test]
fn the_master_shell_holds_at_most_fourteen_fields() {
    let text = code(&src().join("master").join("mod.rs"));
    let body = text
        .split("pub struct Master {")
        .nth(1)
        .and_then(|rest| rest.split("\n}").next())
        .expect("pub struct Master in src/master/mod.rs");
    let fields: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| l.contains(':') && !l.starts_with('#'))
        .collect();
    assert!(!fields.is_empty());
    assert!(
        fields.len() <= 14,
        "Master has {} fields: {fields:#?}",
        fields.len()
    );
}
