//! The daemon's shape, checked from its source: no module imports one that imports it back, each
//! area (frame, control, services, host, api) uses only the areas below it, and the frame path
//! has no tokio.
//!
//! It reads every `.rs` file under `src/`, finds the paths that name other modules of the crate
//! (`crate::…`, `super::…`, `self::…`, in `use` trees and in code, and `mod` declarations), and
//! builds the graph of file modules. Comments and string literals are skipped. Inline modules
//! (`mod tests { … }`) count as part of their file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which top-level areas each area may use. An area not listed may use anything (the crate root
/// and the wiring, which assemble the rest).
const LAYERS: &[(&str, &[&str])] = &[
    ("frame", &[]),
    ("host", &[]),
    ("services", &["host"]),
    ("control", &["frame", "services", "host"]),
    ("metrics", &["frame", "control"]),
    ("config", &["services", "control"]),
    ("api", &["control", "services", "host", "frame", "metrics"]),
    ("docker", &["api", "control", "services", "host", "frame", "metrics"]),
];

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let g = graph(&src());
    let cycles = cycles(&g);
    assert!(cycles.is_empty(), "module circles (each line is one; break them):\n{}", show(&cycles));
}

#[test]
fn areas_use_only_the_areas_below_them() {
    let g = graph(&src());
    let mut wrong = Vec::new();
    for (from, tos) in &g {
        let area = top(from);
        let Some((_, allowed)) = LAYERS.iter().find(|(a, _)| *a == area) else { continue };
        for to in tos {
            let t = top(to);
            if t != area && !allowed.contains(&t) {
                wrong.push(format!("{from} uses {to} ({area} may use only {allowed:?})"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_frame_path_has_no_tokio() {
    for (module, text) in sources(&src()) {
        if top(&module) == "frame" {
            let code = strip(&text);
            assert!(!code.contains("tokio"), "{module} uses tokio: the frame path runs on std threads");
            assert!(!code.contains("async "), "{module} has async code: the frame path runs on std threads");
        }
    }
}

#[test]
fn the_checker_finds_circles_and_reads_paths() {
    // A made-up crate: a uses b through a use tree, b uses a in code, c only uses a.
    let files = vec![
        ("lib".to_string(), "pub mod a; pub mod b; pub mod c;".to_string()),
        ("a".to_string(), "use crate::{b::Thing, c as _x};\n// use crate::zzz;\nfn f() { let s = \"crate::c\"; }".to_string()),
        ("b".to_string(), "fn g() { crate::a::f(); }".to_string()),
        ("c".to_string(), "use super::a;\nmod tests { use super::*; }".to_string()),
        ("d::x".to_string(), "use super::y::Z; use self::inner::W; mod inner {}".to_string()),
        ("d::y".to_string(), "".to_string()),
        ("d".to_string(), "mod x; mod y;".to_string()),
    ];
    let g = graph_of(&files);
    assert_eq!(g["a"], BTreeSet::from(["b".to_string(), "c".to_string()]));
    assert_eq!(g["b"], BTreeSet::from(["a".to_string()]));
    assert_eq!(g["c"], BTreeSet::from(["a".to_string()]));
    assert_eq!(g["d::x"], BTreeSet::from(["d::y".to_string()]));
    let c = cycles(&g);
    assert_eq!(c, vec![vec!["a".to_string(), "b".to_string(), "c".to_string()]], "{c:?}");
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// (module path, text) of every file: `src/frame/tx.rs` is `frame::tx`, `src/frame/mod.rs` is
/// `frame`, `src/lib.rs` is `lib`.
fn sources(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&d).expect("read src").map(|e| e.expect("entry").path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(dir).expect("under src").with_extension("");
                let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                if parts.last().is_some_and(|l| l == "mod") {
                    parts.pop();
                }
                let module = if parts == ["lib"] { "lib".to_string() } else { parts.join("::") };
                out.push((module, std::fs::read_to_string(&p).expect("read file")));
            }
        }
    }
    out
}

fn graph(dir: &Path) -> Graph {
    graph_of(&sources(dir))
}

fn graph_of(files: &[(String, String)]) -> Graph {
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut g = Graph::new();
    for (module, text) in files {
        let mut deps = BTreeSet::new();
        for path in paths(&strip(text)) {
            if let Some(target) = resolve(module, &path, &modules) {
                if &target != module {
                    deps.insert(target);
                }
            }
        }
        g.insert(module.clone(), deps);
    }
    g
}

/// A path as written, with how deep inside inline modules of its file it appears.
struct Written {
    segments: Vec<String>,
    inline_depth: usize,
}

/// The module a written path names: the longest prefix that is a module of the crate.
fn resolve(module: &str, w: &Written, modules: &BTreeSet<String>) -> Option<String> {
    let mut segs = w.segments.iter().map(String::as_str).peekable();
    let here: Vec<&str> = if module == "lib" { Vec::new() } else { module.split("::").collect() };
    let mut base: Vec<&str> = match segs.peek().copied() {
        Some("crate") => {
            segs.next();
            Vec::new()
        }
        Some("self") | Some("super") => {
            let mut b = here.clone();
            // Inside an inline module, the first `super` steps out of it, back to the file.
            let mut depth = w.inline_depth;
            if segs.peek() == Some(&"self") {
                segs.next();
            }
            while segs.peek() == Some(&"super") {
                segs.next();
                if depth > 0 {
                    depth -= 1;
                } else {
                    b.pop();
                }
            }
            b
        }
        _ => return None,
    };
    let mut best = None;
    for s in segs {
        base.push(s);
        let name = base.join("::");
        if modules.contains(&name) {
            best = Some(name);
        }
    }
    best
}

/// Every module path in `code`: `use` trees expanded, paths in code, `mod x;` declarations.
fn paths(code: &str) -> Vec<Written> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    // Brace depths at which inline modules were opened.
    let mut inline: Vec<usize> = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            depth += 1;
            i += 1;
            continue;
        }
        if c == b'}' {
            if inline.last() == Some(&depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if is_ident_start(c) && (i == 0 || !is_ident(b[i - 1])) {
            let (word, end) = ident(code, i);
            let prev_colons = i >= 2 && &code[i - 2..i] == "::";
            if word == "use" {
                let stop = code[end..].find(';').map_or(code.len(), |k| end + k);
                let mut trees = Vec::new();
                expand(code[end..stop].trim(), &mut Vec::new(), &mut trees);
                out.extend(trees.into_iter().map(|segments| Written { segments, inline_depth: inline.len() }));
                i = stop;
                continue;
            }
            if word == "mod" {
                let (name, after) = ident(code, skip_ws(code, end));
                let next = skip_ws(code, after);
                if code[next..].starts_with(';') {
                    out.push(Written { segments: vec!["self".into(), name.to_string()], inline_depth: inline.len() });
                } else if code[next..].starts_with('{') {
                    inline.push(depth + 1);
                }
                i = after;
                continue;
            }
            if (word == "crate" || word == "super" || word == "self") && !prev_colons && code[end..].starts_with("::") {
                let mut segments = vec![word.to_string()];
                let mut j = end;
                while code[j..].starts_with("::") {
                    let (s, e) = ident(code, j + 2);
                    if s.is_empty() {
                        break;
                    }
                    segments.push(s.to_string());
                    j = e;
                }
                out.push(Written { segments, inline_depth: inline.len() });
                i = j;
                continue;
            }
            i = end;
            continue;
        }
        i += 1;
    }
    out
}

/// Expands a `use` tree (`crate::{a, b::{c, d}}`) into paths.
fn expand(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open].split("::").map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        let close = tree.rfind('}').unwrap_or(tree.len());
        let inner = &tree[open + 1..close];
        let n = prefix.len();
        prefix.extend(head);
        for part in split_top(inner) {
            expand(part, prefix, out);
        }
        prefix.truncate(n);
    } else {
        let main = tree.split(" as ").next().unwrap_or(tree);
        let mut p = prefix.clone();
        p.extend(main.split("::").map(str::trim).filter(|s| !s.is_empty() && *s != "*").map(String::from));
        if !p.is_empty() {
            out.push(p);
        }
    }
}

/// Splits a use list at commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident(code: &str, start: usize) -> (&str, usize) {
    let b = code.as_bytes();
    let mut e = start;
    while e < b.len() && is_ident(b[e]) {
        e += 1;
    }
    (&code[start..e], e)
}

fn skip_ws(code: &str, mut i: usize) -> usize {
    let b = code.as_bytes();
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The code without comments and without the contents of string and char literals.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if text[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            let mut depth = 0;
            while i < b.len() {
                if text[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if text[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (text[i..].starts_with("r\"") || text[i..].starts_with("r#")) && (i == 0 || !is_ident(b[i - 1])) {
            // Raw string: r"..." or r#"..."#.
            let hashes = text[i + 1..].bytes().take_while(|c| *c == b'#').count();
            let open = i + 1 + hashes;
            if b.get(open) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            i = text[open + 1..].find(&close).map_or(b.len(), |k| open + 1 + k + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('x' or '\n'); lifetimes have no closing quote.
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("' '");
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The strongly connected components with more than one module (Tarjan), each sorted.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !g.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), next: 0, out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v.as_str());
        }
    }
    t.out.sort();
    t.out
}

fn show(cycles: &[Vec<String>]) -> String {
    cycles.iter().map(|c| c.join(" <-> ")).collect::<Vec<_>>().join("\n")
}
