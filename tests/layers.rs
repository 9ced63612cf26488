//! The house's shape, checked: layers point downwards (http -> jobs / infer / train ->
//! tags -> model), and no two sibling modules import each other, directly or around a
//! circle. Read from the source's top-level `use` statements (tests' own imports aside).
//! And every file in `src/` is short enough to hold one job.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's module path under `src/` (`infer/engine.rs` -> `infer::engine`,
/// `infer/mod.rs` -> `infer`).
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The paths a file's top-level `use` statements name, as written (`super::x::Y`,
/// `crate::tags::Z`), groups expanded one level (`super::{a, b::C}` -> `super::a`,
/// `super::b::C`).
fn imports(source: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current: Option<String> = None;
    for line in source.lines() {
        if let Some(stmt) = current.as_mut() {
            stmt.push_str(line.trim());
        } else if let Some(rest) = line
            .strip_prefix("use ")
            .or_else(|| line.strip_prefix("pub use "))
            .or_else(|| line.strip_prefix("pub(crate) use "))
            .or_else(|| line.strip_prefix("pub(super) use "))
        {
            current = Some(rest.trim().to_string());
        }
        if current.as_ref().is_some_and(|s| s.ends_with(';')) {
            statements.push(current.take().unwrap().trim_end_matches(';').to_string());
        }
    }
    let mut out = Vec::new();
    for s in statements {
        match s.split_once("::{") {
            Some((prefix, group)) => {
                for item in group.trim_end_matches('}').split(',') {
                    let item = item.trim();
                    if !item.is_empty() {
                        out.push(format!("{prefix}::{item}"));
                    }
                }
            }
            None => out.push(s),
        }
    }
    out
}

/// The modules of the crate that `file` imports, as absolute module paths.
fn imported_modules(file: &Path) -> BTreeSet<Vec<String>> {
    let module = module_of(file);
    let mut out = BTreeSet::new();
    for path in imports(&std::fs::read_to_string(file).unwrap()) {
        let segments: Vec<&str> = path.split("::").map(str::trim).collect();
        let absolute: Vec<String> = match segments[0] {
            "crate" => segments[1..].iter().map(|s| s.to_string()).collect(),
            "super" => {
                // `super` of `a::b` is `a`, whichever file (`a/b.rs`, `a/b/mod.rs`) holds it.
                let mut base = module.clone();
                let mut rest = &segments[..];
                while rest.first() == Some(&"super") {
                    base.pop();
                    rest = &rest[1..];
                }
                base.extend(rest.iter().map(|s| s.to_string()));
                base
            }
            "self" => {
                let mut base = module.clone();
                base.extend(segments[1..].iter().map(|s| s.to_string()));
                base
            }
            _ => continue,
        };
        // The longest prefix that is a module of the crate.
        for n in (1..=absolute.len()).rev() {
            let candidate = &absolute[..n];
            let dir = root().join(candidate.join("/"));
            if dir.is_dir() || dir.with_extension("rs").is_file() {
                out.insert(candidate.to_vec());
                break;
            }
        }
    }
    out
}

/// Module -> the crate's modules it imports.
fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut all = Vec::new();
    files(&root(), &mut all);
    let mut g: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in all {
        if f.starts_with(root().join("bin")) {
            continue;
        }
        let m = module_of(&f);
        let deps = imported_modules(&f);
        g.entry(m).or_default().extend(deps);
    }
    g
}

#[test]
fn layers_point_downwards() {
    // Each top-level module and what it must never import.
    let below: [(&str, &[&str]); 5] = [
        (
            "model",
            &["tags", "infer", "train", "jobs", "http", "service"],
        ),
        ("tags", &["infer", "train", "jobs", "http", "service"]),
        ("infer", &["train", "jobs", "http", "service"]),
        ("train", &["infer", "jobs", "http", "service"]),
        ("jobs", &["http", "service"]),
    ];
    let mut wrong = Vec::new();
    for (module, deps) in graph() {
        let Some(top) = module.first() else { continue };
        let Some((_, forbidden)) = below.iter().find(|(m, _)| m == top) else {
            continue;
        };
        for d in deps {
            if d.first().is_some_and(|t| forbidden.contains(&t.as_str())) {
                wrong.push(format!("{} imports {}", module.join("::"), d.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers: {wrong:#?}");
}

#[test]
fn no_sibling_modules_import_each_other_around_a_circle() {
    let g = graph();
    // Edges between siblings: `a::x` importing `a::y` (or something inside it).
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, deps) in &g {
        if m.is_empty() {
            continue;
        }
        let parent = &m[..m.len() - 1];
        for d in deps {
            if d.len() > parent.len()
                && d[..parent.len()] == *parent
                && d[parent.len()] != m[parent.len()]
            {
                let sibling = d[..=parent.len()].to_vec();
                edges.entry(m.clone()).or_default().insert(sibling);
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        n: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut circle: Vec<String> = stack[i..].iter().map(|m| m.join("::")).collect();
            circle.push(n.join("::"));
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.clone());
        for next in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.clone());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(circle) = visit(n, &edges, &mut Vec::new(), &mut done) {
            panic!("an import circle: {}", circle.join(" -> "));
        }
    }
    assert!(
        !edges.is_empty(),
        "no sibling imports found: the reader is broken"
    );
}

/// A file that grows past this does several jobs; split it by job (a module's tests go
/// in a `tests.rs` of its own).
const MAX_LINES: usize = 450;

#[test]
fn every_source_file_stays_short() {
    let mut all = Vec::new();
    files(&root(), &mut all);
    let long: Vec<String> = all
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(all.len() > 50, "only {} files found", all.len());
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:?}");
}
