//! The house rules, checked: the crates' shape stays what `DESIGN.md` and each `lib.rs`'s layout
//! say, so a change that tangles it fails here rather than in review.
//!
//! - The proxy depends on the API crate alone: no control-plane, etcd or Kubernetes code in its
//!   dependency tree (`cargo tree`).
//! - No library file is over 800 lines before its tests: a file that grows past that is doing more
//!   than one job.
//! - No import cycle between files of different folders: a folder is a subsystem, and two
//!   subsystems that need each other are one knot. Imports are read from the source (`crate::`,
//!   `super::`, `self::` paths and a module's `use child::...`), tests left out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const LIBRARIES: [&str; 3] = ["proxy/src", "control-api/src", "control-plane/src"];
const MAX_LINES: usize = 800;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, by its path relative to `dir`.
fn sources(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                files.insert(relative, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    files
}

/// A file's code before its tests module (by convention the last thing in a file), without
/// comments.
fn code(text: &str) -> String {
    let before_tests = text.find("#[cfg(test)]\nmod ").map_or(text, |at| &text[..at]);
    before_tests.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// The module path of a file: `http/mod.rs` and `http.rs` are both `http`, `lib.rs` is the root.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file.trim_end_matches(".rs").split('/').map(str::to_owned).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The file a module path lands in: the deepest module of the path that is a file of the crate.
fn resolve(path: &[String], modules: &HashMap<Vec<String>, String>) -> Option<String> {
    (1..=path.len()).rev().find_map(|n| modules.get(&path[..n]).cloned())
}

/// Each file's imports of other files of the crate.
fn imports(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let modules: HashMap<Vec<String>, String> = files.keys().map(|f| (module_of(f), f.clone())).collect();
    let path = regex::Regex::new(r"\b(crate|super(?:::super)*|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)(::\{)?").unwrap();
    let child = regex::Regex::new(r"(?m)^\s*(?:pub(?:\([a-z]+\))?\s+)?use\s+([a-z_][a-z0-9_]*)::").unwrap();
    let mut graph = BTreeMap::new();
    for (file, text) in files {
        let code = code(text);
        let here = module_of(file);
        let mut targets = BTreeSet::new();
        for found in path.captures_iter(&code) {
            let base: Vec<String> = match &found[1] {
                "crate" => Vec::new(),
                "self" => here.clone(),
                supers => here[..here.len().saturating_sub(supers.matches("super").count())].to_vec(),
            };
            let mut segments = base;
            segments.extend(found[2].split("::").filter(|s| !s.is_empty()).map(str::to_owned));
            if found.get(3).is_some() {
                // A group: each item resolves on its own; the group's base is not itself imported.
                let start = found.get(3).unwrap().end();
                let end = code[start..].find('}').map_or(code.len(), |e| start + e);
                for item in code[start..end].split(',') {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    if item.is_empty() || item == "self" {
                        continue;
                    }
                    let mut full = segments.clone();
                    full.extend(item.split("::").map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()));
                    targets.extend(resolve(&full, &modules));
                }
            } else {
                targets.extend(resolve(&segments, &modules));
            }
        }
        if file.ends_with("mod.rs") || file.ends_with("lib.rs") {
            for found in child.captures_iter(&code) {
                let mut segments = here.clone();
                segments.push(found[1].to_owned());
                targets.extend(modules.get(&segments).cloned());
            }
        }
        targets.remove(file);
        graph.insert(file.clone(), targets);
    }
    graph
}

/// Strongly connected components of `graph` (Tarjan's algorithm).
fn components(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        let next = state.index.len();
        state.index.insert(node, next);
        state.low.insert(node, next);
        state.stack.push(node);
        for target in &state.graph[node] {
            if !state.index.contains_key(target.as_str()) {
                visit(state, target);
                let low = state.low[node].min(state.low[target.as_str()]);
                state.low.insert(node, low);
            } else if state.stack.contains(&target.as_str()) {
                let low = state.low[node].min(state.index[target.as_str()]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                component.push(member.to_owned());
                if member == node {
                    break;
                }
            }
            state.found.push(component);
        }
    }
    let mut state = State { graph, index: HashMap::new(), low: HashMap::new(), stack: Vec::new(), found: Vec::new() };
    for node in graph.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.found
}

fn folder(file: &str) -> &str {
    file.rsplit_once('/').map_or("", |(folder, _)| folder)
}

#[test]
fn no_import_cycle_spans_folders() {
    let mut knots = Vec::new();
    for library in LIBRARIES {
        let graph = imports(&sources(&root().join(library)));
        for component in components(&graph) {
            let folders: BTreeSet<&str> = component.iter().map(|f| folder(f)).collect();
            if folders.len() > 1 {
                let edges: Vec<String> = component
                    .iter()
                    .map(|f| {
                        format!("  {f} -> {:?}", graph[f].iter().filter(|t| component.contains(t)).collect::<Vec<_>>())
                    })
                    .collect();
                knots.push(format!("{library}:\n{}", edges.join("\n")));
            }
        }
    }
    assert!(knots.is_empty(), "files of different folders import each other:\n{}", knots.join("\n"));
}

/// The checker itself finds a cycle across folders, and none within one.
#[test]
fn the_cycle_checker_sees_cycles() {
    let files: BTreeMap<String, String> = [
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        ("a/mod.rs", "use crate::b::thing;\nmod x;\n"),
        ("a/x.rs", "use super::y;\n"),
        ("b/mod.rs", "use crate::a::{self, x::Z};\n"),
    ]
    .iter()
    .map(|(f, t)| ((*f).to_owned(), (*t).to_owned()))
    .collect();
    let graph = imports(&files);
    assert_eq!(graph["a/mod.rs"], BTreeSet::from(["b/mod.rs".to_owned()]));
    assert_eq!(graph["b/mod.rs"], BTreeSet::from(["a/x.rs".to_owned()]));
    let graph = imports(&BTreeMap::from([
        ("a/mod.rs".to_owned(), "use crate::b::f;\n".to_owned()),
        ("b/mod.rs".to_owned(), "use crate::a::g;\n#[cfg(test)]\nmod tests { use crate::a::h; }\n".to_owned()),
    ]));
    let knots: Vec<_> = components(&graph).into_iter().filter(|c| c.len() > 1).collect();
    assert_eq!(knots.len(), 1, "{graph:?}");
}

#[test]
fn no_library_file_is_over_800_lines_before_its_tests() {
    let mut long = Vec::new();
    for library in LIBRARIES {
        for (file, text) in sources(&root().join(library)) {
            let before_tests = text.find("#[cfg(test)]\nmod ").map_or(text.as_str(), |at| &text[..at]);
            let lines = before_tests.lines().count();
            if lines > MAX_LINES {
                long.push(format!("{library}/{file}: {lines} lines"));
            }
        }
    }
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn the_proxy_links_no_control_plane_code() {
    let output = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-p", "remora-proxy", "-e", "normal,build", "--prefix", "none", "--format", "{p}"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(tree.contains("remora-control-api"), "{tree}");
    for foreign in ["remora-control-plane", "kube", "k8s-openapi", "etcd"] {
        assert!(
            !tree.lines().any(|line| line.split_whitespace().next().is_some_and(|name| name.starts_with(foreign))),
            "the proxy depends on {foreign}:\n{tree}"
        );
    }
}
