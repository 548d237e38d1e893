//! The size limits `cargo xtask test` keeps: no file over 500 lines and no
//! function over 70 in the project's own code, tests included, and the
//! daemon's `main.rs` under 60. An inline test module does not count to its
//! file's lines (a `tests.rs` of its own does); test functions and the XDP
//! entry point (one verifier-friendly body) are exempt from the function
//! limit. Parsed with syn, so a limit is counted on
//! items, not guessed from braces.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use syn::spanned::Spanned as _;

const MAX_FILE_LINES: usize = 500;
const MAX_FUNCTION_LINES: usize = 70;
const MAX_MAIN_LINES: usize = 60;

/// The folders whose code the limits cover.
const CHECKED: [&str; 11] = [
    "filter-agent/src",
    "filter-agent/build.rs",
    "filter-agent/examples",
    "filter-agent/tests",
    "filter-common/src",
    "filter-ebpf/src",
    "fuzz/src",
    "fuzz/fuzz_targets",
    "scenarios/src",
    "testbed/src",
    "xtask/src",
];

/// One file or function over its limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Breach {
    pub place: String,
    pub lines: usize,
    pub limit: usize,
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} lines (limit {})",
            self.place, self.lines, self.limit
        )
    }
}

/// Checks every file under [`CHECKED`]; fails naming each breach.
pub fn check() -> anyhow::Result<()> {
    let root = crate::util::workspace_root();
    let mut breaches = Vec::new();
    for folder in CHECKED {
        for file in rust_files(&root.join(folder))? {
            let source = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let shown = file
                .strip_prefix(&root)
                .unwrap_or(&file)
                .display()
                .to_string();
            breaches
                .extend(breaches_in(&shown, &source).with_context(|| format!("parsing {shown}"))?);
        }
    }
    if breaches.is_empty() {
        println!("limits: files <= {MAX_FILE_LINES} lines, functions <= {MAX_FUNCTION_LINES}: ok");
        return Ok(());
    }
    for breach in &breaches {
        eprintln!("limits: {breach}");
    }
    anyhow::bail!(
        "{} files or functions over their size limit",
        breaches.len()
    )
}

/// The `.rs` files at or under `path`.
fn rust_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    if !path.exists() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        if path.is_dir() {
            files.extend(rust_files(&path)?);
        } else if name.ends_with(".rs") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The breaches in one file's `source`, `shown` as its name.
pub fn breaches_in(shown: &str, source: &str) -> anyhow::Result<Vec<Breach>> {
    let file = syn::parse_file(source)?;
    let mut counter = Counter::default();
    counter.items(&file.items);
    let lines = source.lines().count() - counter.test_lines;
    let file_limit = if shown.ends_with("filter-agent/src/main.rs") {
        MAX_MAIN_LINES - 1
    } else {
        MAX_FILE_LINES
    };
    let mut breaches: Vec<Breach> = counter
        .functions
        .into_iter()
        .filter(|(_, lines)| *lines > MAX_FUNCTION_LINES)
        .map(|(name, lines)| Breach {
            place: format!("{shown}: fn {name}"),
            lines,
            limit: MAX_FUNCTION_LINES,
        })
        .collect();
    if lines > file_limit {
        breaches.insert(
            0,
            Breach {
                place: shown.to_string(),
                lines,
                limit: file_limit,
            },
        );
    }
    Ok(breaches)
}

/// Functions and their lengths, and the lines test modules take.
#[derive(Default)]
struct Counter {
    functions: Vec<(String, usize)>,
    test_lines: usize,
}

impl Counter {
    fn items(&mut self, items: &[syn::Item]) {
        for item in items {
            match item {
                syn::Item::Fn(function)
                    if !is_test(&function.attrs) && !is_xdp_entry(&function.attrs) =>
                {
                    self.function(&function.sig.ident, function.span());
                }
                syn::Item::Mod(module) if is_test(&module.attrs) => {
                    self.test_lines += lines(module.span());
                }
                syn::Item::Mod(module) => {
                    if let Some((_, items)) = &module.content {
                        self.items(items);
                    }
                }
                syn::Item::Impl(block) if !is_test(&block.attrs) => {
                    for item in &block.items {
                        if let syn::ImplItem::Fn(function) = item {
                            self.function(&function.sig.ident, function.span());
                        }
                    }
                }
                syn::Item::Trait(block) => {
                    for item in &block.items {
                        if let syn::TraitItem::Fn(function) = item {
                            self.function(&function.sig.ident, function.span());
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn function(&mut self, name: &syn::Ident, span: proc_macro2::Span) {
        self.functions.push((name.to_string(), lines(span)));
    }
}

fn lines(span: proc_macro2::Span) -> usize {
    span.end().line - span.start().line + 1
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        attr.path().is_ident("test")
            || (attr.path().is_ident("cfg")
                && attr
                    .parse_args::<syn::Ident>()
                    .is_ok_and(|ident| ident == "test"))
    })
}

/// `#[xdp]`: the one function the limit exempts.
fn is_xdp_entry(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| attr.path().is_ident("xdp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(lines: usize) -> String {
        "    let _ = 1;\n".repeat(lines)
    }

    #[test]
    fn a_long_function_is_named_and_a_test_module_is_not_counted() {
        let source = format!(
            "fn short() {{\n{}}}\nfn long() {{\n{}}}\n#[cfg(test)]\nmod tests {{\n    fn huge() {{\n{}    }}\n}}\n",
            body(3),
            body(MAX_FUNCTION_LINES),
            body(600)
        );
        let breaches = breaches_in("x.rs", &source).unwrap();
        assert_eq!(
            breaches,
            vec![Breach {
                place: "x.rs: fn long".into(),
                lines: MAX_FUNCTION_LINES + 2,
                limit: MAX_FUNCTION_LINES
            }]
        );
    }

    #[test]
    fn a_long_file_and_a_long_method_are_named() {
        let source = format!(
            "struct S;\nimpl S {{\n    fn method(&self) {{\n{}    }}\n}}\n{}",
            body(MAX_FUNCTION_LINES),
            "const A: u8 = 0;\n".repeat(MAX_FILE_LINES)
        );
        let places: Vec<String> = breaches_in("y.rs", &source)
            .unwrap()
            .into_iter()
            .map(|b| b.place)
            .collect();
        assert_eq!(places, ["y.rs", "y.rs: fn method"]);
    }

    #[test]
    fn the_xdp_entry_point_is_exempt() {
        let source = format!(
            "#[xdp]\npub fn filter(ctx: u32) -> u32 {{\n{}    0\n}}\n",
            body(200)
        );
        assert!(breaches_in("z.rs", &source).unwrap().is_empty());
    }
}
