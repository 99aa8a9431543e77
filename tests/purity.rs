//! The pure core stays pure: `src/event.rs`, `src/deal/`, `src/chain.rs`,
//! `src/ledger.rs` and `src/index.rs` do no I/O and read no clock, so they can be tested,
//! replayed and benchmarked deterministically.
//!
//! The check is textual: each file is stripped of comments and string and
//! character literals, its `use` trees are expanded (`use std::{fs, io}` is
//! `std::fs` and `std::io`), and every path, imported or written inline
//! (`tokio::spawn`, `std::fs::read`), is compared with the forbidden list.
//! A self-check runs the same scanner on samples, so the test is known to be
//! able to fail. Cargo.toml is checked too: chrono without its clock.

use std::path::Path;

/// The files of the pure core, relative to the crate root; a folder stands
/// for every `.rs` file in it, so a file added there is checked too.
const PURE_CORE: &[&str] = &[
    "src/event.rs",
    "src/deal/",
    "src/chain.rs",
    "src/ledger.rs",
    "src/index.rs",
    "src/timeline.rs",
];

/// Paths the pure core must not name: (path segments, why). A path is
/// forbidden when these segments appear in it, consecutively; a rule whose
/// first segment is a crate (`tokio`) or `std` must start the path.
const FORBIDDEN: &[(&[&str], &str)] = &[
    (&["tokio"], "async runtime and I/O"),
    (&["rdkafka"], "Kafka client"),
    (&["sled"], "storage engine"),
    (&["std", "fs"], "file system"),
    (&["std", "net"], "network"),
    (&["std", "time"], "clock"),
    (&["std", "thread"], "threads"),
    (&["std", "process"], "processes"),
    (&["std", "env"], "environment"),
    (&["Utc", "now"], "clock"),
    (&["Local"], "clock and local time zone"),
    (&["SystemTime"], "clock"),
    (&["Instant"], "clock"),
];

/// Crate-like first segments: rules starting with them only match at the
/// start of a path. The others (`Utc::now`, `Local`, ...) match anywhere.
const ROOTS: &[&str] = &["tokio", "rdkafka", "sled", "std"];

/// One forbidden path found in a source text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finding {
    /// 1-based line number.
    line: usize,
    /// The path as written (use trees expanded), e.g. `std::fs::read`.
    path: String,
    /// The forbidden rule it matched, e.g. `std::fs`.
    rule: String,
    /// Why that is forbidden.
    why: &'static str,
}

/// `source` with comments and string, byte-string and character literals
/// replaced by spaces; line breaks are kept so line numbers stay right.
/// Handles `//` (and doc) comments, nested `/* */`, escapes, raw strings
/// (`r#"..."#`) and tells character literals from lifetimes. Rough, but
/// enough for code that compiles.
fn strip(source: &str) -> String {
    let c: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied();
        let ident_before = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
        match c[i] {
            '/' if at(i + 1) == Some('/') => {
                while i < c.len() && c[i] != '\n' {
                    out.push(' ');
                    i += 1;
                }
            }
            '/' if at(i + 1) == Some('*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && at(i + 1) == Some('*') {
                        depth += 1;
                        out.push_str("  ");
                        i += 2;
                    } else if c[i] == '*' && at(i + 1) == Some('/') {
                        depth -= 1;
                        out.push_str("  ");
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        blank(&mut out, c[i]);
                        i += 1;
                    }
                }
            }
            // Raw strings: r"..", r#".."#, br#".."# (not part of an identifier).
            _ if !ident_before && raw_string_hashes(&c, i).is_some() => {
                let hashes = raw_string_hashes(&c, i).expect("checked");
                // Skip the prefix (b, r, hashes) and the opening quote.
                let mut k = i + usize::from(c[i] == 'b') + 1 + hashes + 1;
                loop {
                    match at(k) {
                        None => break,
                        Some('"') if (1..=hashes).all(|h| at(k + h) == Some('#')) => {
                            k += 1 + hashes;
                            break;
                        }
                        Some(_) => k += 1,
                    }
                }
                for &ch in &c[i..k.min(c.len())] {
                    blank(&mut out, ch);
                }
                i = k;
            }
            '"' => {
                blank(&mut out, c[i]);
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' && i + 1 < c.len() {
                        blank(&mut out, c[i]);
                        i += 1;
                    }
                    blank(&mut out, c[i]);
                    i += 1;
                }
                if i < c.len() {
                    out.push(' ');
                    i += 1;
                }
            }
            // A character literal ('x', '\n', '\u{1F600}'), not a lifetime ('a).
            '\'' => {
                let end = if at(i + 1) == Some('\\') {
                    (i + 3..c.len().min(i + 13)).find(|&k| c[k] == '\'')
                } else if at(i + 2) == Some('\'') {
                    Some(i + 2)
                } else {
                    None
                };
                match end {
                    Some(end) => {
                        for &ch in &c[i..=end] {
                            blank(&mut out, ch);
                        }
                        i = end + 1;
                    }
                    None => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// If a raw string literal (`r"`, `r#"`, `br##"`, ...) starts at `c[i]`, the
/// number of `#`s it is delimited with.
fn raw_string_hashes(c: &[char], i: usize) -> Option<usize> {
    let mut k = i + usize::from(c[i] == 'b');
    if c.get(k) != Some(&'r') {
        return None;
    }
    k += 1;
    let hashes = c[k..].iter().take_while(|&&ch| ch == '#').count();
    (c.get(k + hashes) == Some(&'"')).then_some(hashes)
}

/// A token of stripped code that matters for paths.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Other(char),
}

/// Tokens with their 1-based line numbers.
fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push((Tok::PathSep, line));
            i += 2;
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            // Raw identifiers: r#tokio is tokio.
            if word == "r" && c.get(i) == Some(&'#') {
                i += 1;
                continue;
            }
            out.push((Tok::Ident(word), line));
        } else if ch.is_ascii_digit() {
            // Numbers, with suffixes and fractions: never path segments.
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || c[i] == '.') {
                i += 1;
            }
        } else {
            out.push((Tok::Other(ch), line));
            i += 1;
        }
    }
    out
}

/// Expands the use tree starting at `toks[*pos]` under `prefix` into full
/// paths, each with the line of its last segment. Stops after the tree (at
/// `,`, `}` or `;`, which it does not consume).
fn expand_use(
    toks: &[(Tok, usize)],
    pos: &mut usize,
    prefix: Vec<String>,
    line: usize,
    out: &mut Vec<(Vec<String>, usize)>,
) {
    let (mut path, mut line) = (prefix, line);
    while let Some((tok, l)) = toks.get(*pos) {
        match tok {
            Tok::Ident(word) if word == "as" => *pos += 2,
            Tok::Ident(word) => {
                path.push(word.clone());
                line = *l;
                *pos += 1;
            }
            Tok::PathSep => *pos += 1,
            Tok::Other('*') => {
                path.push("*".into());
                *pos += 1;
            }
            Tok::Other('{') => {
                *pos += 1;
                loop {
                    match toks.get(*pos) {
                        None => return,
                        Some((Tok::Other('}'), _)) => {
                            *pos += 1;
                            return;
                        }
                        Some((Tok::Other(','), _)) => *pos += 1,
                        Some(_) => expand_use(toks, pos, path.clone(), line, out),
                    }
                }
            }
            _ => break,
        }
    }
    if !path.is_empty() {
        out.push((path, line));
    }
}

/// Every path in stripped `code`: `use` trees expanded, and inline paths
/// (`a::b::c`, or a lone identifier) not reached through `.` (fields and
/// methods are not paths).
fn paths(code: &str) -> Vec<(Vec<String>, usize)> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Ident(word) if word == "use" => {
                let line = toks[i].1;
                i += 1;
                expand_use(&toks, &mut i, Vec::new(), line, &mut out);
            }
            Tok::Ident(_) | Tok::PathSep => {
                let after_dot = i > 0 && toks[i - 1].0 == Tok::Other('.');
                let mut path = Vec::new();
                let mut line = toks[i].1;
                while let Some((tok, l)) = toks.get(i) {
                    match tok {
                        Tok::Ident(word) => {
                            path.push(word.clone());
                            line = *l;
                        }
                        Tok::PathSep => {}
                        _ => break,
                    }
                    i += 1;
                    // Segments alternate with `::`; two identifiers in a
                    // row are two paths (`mut x`, `fn now`).
                    if matches!(toks.get(i - 1), Some((Tok::Ident(_), _)))
                        && !matches!(toks.get(i), Some((Tok::PathSep, _)))
                    {
                        break;
                    }
                }
                if !after_dot && !path.is_empty() {
                    out.push((path, line));
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The forbidden paths in `source` (Rust code, comments and strings allowed).
fn forbidden_paths(source: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    for (path, line) in paths(&strip(source)) {
        for (rule, why) in FORBIDDEN {
            let anchored = ROOTS.contains(&rule[0]);
            let hit = if anchored {
                path.len() >= rule.len() && path.iter().zip(rule.iter()).all(|(a, b)| a == b)
            } else {
                path.windows(rule.len())
                    .any(|w| w.iter().zip(rule.iter()).all(|(a, b)| a == b))
            };
            if hit {
                found.push(Finding {
                    line,
                    path: path.join("::"),
                    rule: rule.join("::"),
                    why,
                });
            }
        }
    }
    found
}

#[test]
fn pure_core_names_no_io_and_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut report = Vec::new();
    for entry in PURE_CORE {
        let files = if entry.ends_with('/') {
            let mut files: Vec<String> = std::fs::read_dir(root.join(entry))
                .unwrap_or_else(|e| panic!("listing {entry}: {e}"))
                .map(|f| {
                    f.expect("a folder entry")
                        .file_name()
                        .into_string()
                        .expect("UTF-8")
                })
                .filter(|name| name.ends_with(".rs"))
                .map(|name| format!("{entry}{name}"))
                .collect();
            files.sort();
            files
        } else {
            vec![entry.to_string()]
        };
        let mut scanned = 0;
        for file in &files {
            let source = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("reading {file}: {e}"));
            scanned += paths(&strip(&source)).len();
            for f in forbidden_paths(&source) {
                report.push(format!(
                    "{file}:{}: `{}` (forbidden: `{}`, {})",
                    f.line, f.path, f.rule, f.why
                ));
            }
        }
        assert!(
            scanned > 100,
            "{entry}: the scanner finds almost no paths; is it broken?"
        );
    }
    assert!(
        report.is_empty(),
        "the pure core reaches outside itself; move this to the shell:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_scanner_can_fail() {
    let sample = "//! A module.\nuse std::fmt;\nuse sled::Db;\n";
    assert_eq!(
        forbidden_paths(sample),
        vec![Finding {
            line: 3,
            path: "sled::Db".into(),
            rule: "sled".into(),
            why: "storage engine",
        }]
    );
    let rules = |source: &str| -> Vec<(usize, String)> {
        forbidden_paths(source)
            .into_iter()
            .map(|f| (f.line, f.rule))
            .collect()
    };
    let r = |line: usize, rule: &str| (line, rule.to_string());
    // Grouped, nested and renamed imports.
    assert_eq!(
        rules("use std::{collections::BTreeMap, fs::{self, File}, io};"),
        vec![r(1, "std::fs"), r(1, "std::fs")]
    );
    assert_eq!(rules("use std::time as clock;"), vec![r(1, "std::time")]);
    assert_eq!(
        rules("pub(crate) use ::tokio::sync::mpsc;"),
        vec![r(1, "tokio")]
    );
    // Paths written inline, in expressions, types and attributes.
    assert_eq!(
        rules("fn f() {\n    tokio::spawn(async {});\n}"),
        vec![r(2, "tokio")]
    );
    assert_eq!(rules("let t = chrono::Utc::now();"), vec![r(1, "Utc::now")]);
    assert_eq!(rules("let t = Utc::now();"), vec![r(1, "Utc::now")]);
    assert_eq!(
        rules("fn f(t: std::time::Instant) {}"),
        vec![r(1, "std::time"), r(1, "Instant")]
    );
    assert_eq!(rules("let x = std::env::var(k);"), vec![r(1, "std::env")]);
    assert_eq!(
        rules("let d = std::fs::read(p);\nlet n = std::thread::spawn(f);"),
        vec![r(1, "std::fs"), r(2, "std::thread")]
    );
    assert_eq!(
        rules("#[tokio::test]\nasync fn t() {}"),
        vec![r(1, "tokio")]
    );
    assert_eq!(
        rules("let z = Local.timestamp_opt(0, 0);"),
        vec![r(1, "Local")]
    );
    assert_eq!(rules("extern crate rdkafka;"), vec![r(1, "rdkafka")]);
    // Not paths: comments, strings, characters, fields and methods, other
    // crates' modules of the same name, identifiers that merely contain one.
    for clean in [
        "// use tokio::spawn;\n/// std::fs::read\n//! sled",
        "/* std::env /* nested std::net */ still a comment */ let x = 1;",
        r#"let s = "use std::fs; tokio::spawn"; let b = b"sled";"#,
        r##"let s = r#"std::time::Instant "quoted" "#; let c = '"'; let d = '\'';"##,
        "fn f<'a>(x: &'a str) -> &'a str { x } // std::process",
        "let n = self.sled.len(); let m = deal.local; cfg.tokio();",
        "use crate::chain::StreamId; use my::time::Clock; let t = core::fmt::Write;",
        "let local_time = 1; struct InstantView; let utc_now = 2;",
        "use chrono::{DateTime, Utc}; let t: DateTime<Utc> = DateTime::from_timestamp(0, 0);",
    ] {
        assert_eq!(rules(clean), vec![], "{clean}");
    }
}

#[test]
fn chrono_is_built_without_its_clock() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .expect("reading Cargo.toml");
    // The chrono entry of [dependencies]: an inline table on one line, or a
    // [dependencies.chrono] table.
    let mut section = String::new();
    let mut entry = None;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
            if section == "[dependencies.chrono]" {
                entry = Some(String::new());
            }
            continue;
        }
        if section == "[dependencies]"
            && line
                .split_once('=')
                .is_some_and(|(k, _)| k.trim() == "chrono")
        {
            entry = Some(line.to_string());
        } else if section == "[dependencies.chrono]"
            && let Some(e) = entry.as_mut()
        {
            e.push_str(line);
            e.push(',');
        }
    }
    let entry = entry.expect("Cargo.toml has a chrono dependency");
    let compact: String = entry.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(
        compact.contains("default-features=false"),
        "chrono must have default-features = false (its defaults include the clock): {entry}"
    );
    let features: Vec<&str> = compact
        .split_once("features=[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| {
            list.split(',')
                .map(|f| f.trim_matches('"'))
                .filter(|f| !f.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for clock in ["clock", "now"] {
        assert!(
            !features.contains(&clock),
            "chrono feature {clock:?} brings the system clock into the pure core: {entry}"
        );
    }
}
