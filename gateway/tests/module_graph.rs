//! The architecture, checked: the crate's top-level modules import each other without a
//! cycle (ARCHITECTURE.md draws the graph), every source file says what it owns in a
//! `//!` line, and raw system calls appear only in `sys/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to (`migration/source.rs` → `migration`).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).expect("under src");
    let first = rel.components().next().expect("component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// The code outside `#[cfg(test)]` test modules (tests may reach anywhere).
fn production_code(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Top-level module → the top-level modules it names through `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(f))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(file);
        if from == "lib" || from == "main" || file.ends_with("tests_inprocess.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read");
        let code = production_code(&text);
        let deps = graph.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != from && modules.contains(&name) {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = graph();
    // Depth-first search; a grey node seen again closes a cycle.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        state.insert(node, 1);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => panic!("import cycle: {} -> {next}", path.join(" -> ")),
                Some(_) => {}
                None => visit(next, graph, state, path),
            }
        }
        path.pop();
        state.insert(node, 2);
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str()) {
            visit(node, &graph, &mut state, &mut Vec::new());
        }
    }
}

#[test]
fn leaves_import_nothing_above_them() {
    let graph = graph();
    for leaf in ["names", "spec", "sys", "journal", "identity"] {
        let deps = graph.get(leaf).cloned().unwrap_or_default();
        let allowed: BTreeSet<String> = ["names", "sys"].iter().map(ToString::to_string).collect();
        assert!(
            deps.is_subset(&allowed),
            "{leaf} imports {deps:?}; a leaf may use only names and sys"
        );
    }
    // Transfer knows how bytes and CRIU's pages travel, nothing above that.
    let transfer = graph.get("transfer").cloned().unwrap_or_default();
    let allowed: BTreeSet<String> = ["names", "sys", "criu"]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        transfer.is_subset(&allowed),
        "transfer imports {transfer:?}"
    );
    // The transport knows neither the workload registry nor migrations.
    let peer = &graph["peer"];
    for above in ["workload", "migration", "plugins", "proxy", "api"] {
        assert!(!peer.contains(above), "peer imports {above}");
    }
}

#[test]
fn every_file_says_what_it_owns() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(
            text.starts_with("//!"),
            "{} does not start with a //! line",
            file.display()
        );
    }
}

#[test]
fn raw_system_calls_live_only_in_sys() {
    let mut files = Vec::new();
    sources(&src(), &mut files);
    for file in files {
        if module_of(&file) == "sys" || file.ends_with("tests_inprocess.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        for needle in ["unsafe ", "unsafe{", "libc::"] {
            assert!(
                !production_code(&text).contains(needle),
                "{} uses {needle:?}; raw calls belong in sys/",
                file.display()
            );
        }
    }
}

#[test]
fn architecture_md_lists_the_imports_the_code_has() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    let doc = std::fs::read_to_string(&doc_path).expect("ARCHITECTURE.md at the repository root");
    let begin = doc
        .find("<!-- module-imports:begin -->")
        .expect("begin marker");
    let end = doc.find("<!-- module-imports:end -->").expect("end marker");
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in doc[begin..end].lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 3 || !cells[1].starts_with('`') {
            continue;
        }
        let names = |cell: &str| -> BTreeSet<String> {
            cell.split(',')
                .map(|n| n.trim().trim_matches('`').to_string())
                .filter(|n| !n.is_empty() && n != "(none)")
                .collect()
        };
        let module = cells[1].trim_matches('`').to_string();
        documented.insert(module, names(cells[2]));
    }
    let actual = graph();
    for (module, deps) in &actual {
        assert_eq!(
            documented.get(module),
            Some(deps),
            "ARCHITECTURE.md's row for {module} differs from the code"
        );
    }
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        actual.keys().collect::<Vec<_>>(),
        "ARCHITECTURE.md lists other modules than the code has"
    );
}
