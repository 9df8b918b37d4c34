//! `cargo xtask modules`: fails when the top-level modules of a crate import
//! each other in a circle. Imports are read from `crate::` paths (and
//! `super::` in top-level files); test modules (`#[cfg(test)] mod ... { }`
//! blocks and `tests.rs` files) are left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{bail, Context as _, Result};

/// The crates whose module graph must stay acyclic.
pub const CRATES: [&str; 2] = ["lb-userspace/src", "lb-ebpf/src"];

/// Module graph of one crate: top-level module to the ones it imports.
pub fn graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut tops = BTreeSet::new();
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let module_dir = path.is_dir() && stem != "bin";
        let module_file =
            path.extension().is_some_and(|e| e == "rs") && !["lib", "main"].contains(&stem);
        if module_dir || module_file {
            tops.insert(stem.to_string());
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for top in &tops {
        let mut files = Vec::new();
        let file = src.join(format!("{top}.rs"));
        if file.exists() {
            files.push((file, true));
        }
        collect_rs(&src.join(top), &mut files)?;
        let refs = edges.entry(top.clone()).or_default();
        for (file, top_level) in files {
            let text = strip_tests(&fs::read_to_string(&file)?);
            let mut found = paths(&text, "crate");
            if top_level {
                found.extend(paths(&text, "super"));
            }
            refs.extend(found.into_iter().filter(|m| m != top && tops.contains(m)));
        }
    }
    Ok(edges)
}

fn collect_rs(dir: &Path, out: &mut Vec<(std::path::PathBuf, bool)>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push((path, false));
        }
    }
    Ok(())
}

/// The text without `#[cfg(test)] mod name { ... }` blocks.
fn strip_tests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let is_mod = after["#[cfg(test)]".len()..]
            .trim_start()
            .trim_start_matches("pub ")
            .starts_with("mod ");
        let Some(open) = after.find('{').filter(|_| is_mod) else {
            out.push_str("#[cfg(test)]");
            rest = &after["#[cfg(test)]".len()..];
            continue;
        };
        let mut depth = 0;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// First path segments after `root::`, including each item of a
/// `root::{a::x, b, c::{..}}` group.
fn paths(text: &str, root: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let needle = format!("{root}::");
    let mut from = 0;
    while let Some(at) = text[from..].find(&needle) {
        let start = from + at;
        from = start + needle.len();
        let preceded = text[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if preceded {
            continue;
        }
        let rest = &text[from..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && c == ',' {
                    push_ident(&item, &mut found);
                    item.clear();
                } else {
                    item.push(c);
                }
            }
            push_ident(&item, &mut found);
        } else {
            push_ident(rest, &mut found);
        }
    }
    found
}

fn push_ident(text: &str, found: &mut BTreeSet<String>) {
    let ident: String = text
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !ident.is_empty() {
        found.insert(ident);
    }
}

/// A circle in the graph, if there is one.
pub fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        v: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == v) {
            let mut circle = path[at..].to_vec();
            circle.push(v.to_string());
            return Some(circle);
        }
        if done.contains(v) {
            return None;
        }
        path.push(v.to_string());
        for w in edges.get(v).into_iter().flatten() {
            if let Some(c) = visit(w, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(v.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|v| visit(v, edges, &mut Vec::new(), &mut done))
}

/// Checks every crate; prints each graph, fails on a circle.
pub fn check(root: &Path) -> Result<()> {
    let mut circles = Vec::new();
    for krate in CRATES {
        let edges = graph(&root.join(krate))?;
        println!("{krate}:");
        for (m, deps) in &edges {
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            println!("  {m} -> {}", deps.join(", "));
        }
        if let Some(c) = cycle(&edges) {
            circles.push(format!("{krate}: {}", c.join(" -> ")));
        }
    }
    if !circles.is_empty() {
        bail!(
            "modules import each other in a circle:\n{}",
            circles.join("\n")
        );
    }
    println!("no import circle");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_groups_name_their_first_segment() {
        let text = "use crate::{api::{A, B}, balancer::Balancer, config};\nlet x = crate::maglev::build();\nuse my_crate::x;";
        let found: Vec<String> = paths(text, "crate").into_iter().collect();
        assert_eq!(found, ["api", "balancer", "config", "maglev"]);
    }

    #[test]
    fn test_modules_do_not_count() {
        let text = "use crate::a::X;\n#[cfg(test)]\nmod tests {\n    use crate::b::{Y, Z};\n}\nfn f() { crate::c::g() }";
        let found: Vec<String> = paths(&strip_tests(text), "crate").into_iter().collect();
        assert_eq!(found, ["a", "c"]);
    }

    #[test]
    fn a_circle_is_found_and_a_chain_is_not() {
        let g = |pairs: &[(&str, &str)]| {
            let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in pairs {
                e.entry(a.to_string()).or_default().insert(b.to_string());
                e.entry(b.to_string()).or_default();
            }
            e
        };
        assert_eq!(cycle(&g(&[("agent", "api"), ("api", "config")])), None);
        let c = cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).unwrap();
        assert_eq!(c, ["a", "b", "c", "a"]);
    }
}
