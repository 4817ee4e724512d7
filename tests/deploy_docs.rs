//! docs/: the generated configuration reference is up to date, the `explain` example in
//! troubleshooting.md is what the binary prints, every `kube-proxy-rs explain` command line in
//! the docs parses, and relative links resolve.
//!
//! `UPDATE_DOCS=1 cargo test --test deploy_docs` rewrites docs/configuration.md.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn docs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    v.sort();
    v
}

#[test]
fn configuration_reference_is_up_to_date() {
    let path = root().join("docs/configuration.md");
    let want = kube_proxy_rs::docgen::configuration_md();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let first = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(have.lines().count().min(want.lines().count()));
        panic!(
            "docs/configuration.md is out of date (first difference at line {}): run \
             `UPDATE_DOCS=1 cargo test --test deploy_docs`\n have: {:?}\n want: {:?}",
            first + 1,
            have.lines().nth(first),
            want.lines().nth(first)
        );
    }
}

#[test]
fn the_same_text_comes_from_the_hidden_subcommand() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .args(["gen-docs", "configuration"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        kube_proxy_rs::docgen::configuration_md()
    );
}

#[test]
fn explain_example_matches_the_binary() {
    let text = std::fs::read_to_string(root().join("docs/troubleshooting.md")).unwrap();
    let marker = "<!-- explain-example: ";
    let start = text.find(marker).expect("explain example marker");
    let rest = &text[start + marker.len()..];
    let (cmd, rest) = rest.split_once(" -->\n").unwrap();
    let body = rest
        .strip_prefix("```text\n")
        .and_then(|b| b.split_once("```\n"))
        .map(|(b, _)| b)
        .expect("a ```text block after the marker");
    let words: Vec<&str> = cmd.split_whitespace().collect();
    assert_eq!(&words[..2], ["kube-proxy-rs", "explain"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .args(&words[1..])
        .current_dir(root())
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        got, body,
        "docs/troubleshooting.md's explain example is stale; the binary prints:\n{got}"
    );
}

#[test]
fn explain_command_lines_in_docs_parse() {
    let mut seen = 0;
    for path in docs() {
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let Some(at) = line.find("kube-proxy-rs explain ") else {
                continue;
            };
            let cmd = line[at..]
                .split('`')
                .next()
                .unwrap()
                .trim_end_matches(" -->");
            let args: Vec<String> = cmd.split_whitespace().skip(2).map(str::to_string).collect();
            // Placeholders in the synopsis are not addresses.
            if args
                .iter()
                .any(|a| a.contains("IP:PORT") || a.contains("FILE"))
            {
                continue;
            }
            kube_proxy_rs::explain::parse_explain_args(&args, "node1")
                .unwrap_or_else(|e| panic!("{}: `{cmd}` does not parse: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected explain examples in docs/");
}

#[test]
fn relative_links_resolve() {
    for path in docs() {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices("](") {
            let target = text[i + 2..].split(')').next().unwrap();
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            assert!(
                path.parent().unwrap().join(file).exists(),
                "{}: broken link {target}",
                path.display()
            );
        }
    }
}
