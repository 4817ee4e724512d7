//! Help on the command line: `render --help` and `explain --help` print their usage (and do
//! nothing else), `help [render|explain]` prints the same texts, and explain's usage names the
//! modes explain actually runs. No root, no kernel.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kube-proxy-rs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn render_help_prints_usage_not_a_ruleset() {
    for flag in ["--help", "-h"] {
        let (code, stdout, stderr) =
            run(&["render", "--objects", "examples/demo-cluster.yaml", flag]);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stdout.contains("kube-proxy-rs render [--objects FILE...]"),
            "render {flag} printed:\n{stdout}"
        );
        assert!(stdout.contains("--node-ip"), "{stdout}");
        assert!(
            !stdout.contains("*filter") && !stdout.contains("KUBE-"),
            "render {flag} rendered rules:\n{stdout}"
        );
    }
}

#[test]
fn help_command_prints_the_usages() {
    let (code, daemon, stderr) = run(&["help"]);
    assert_eq!(code, 0, "{stderr}");
    let (_, flag_help, _) = run(&["--help"]);
    assert_eq!(daemon, flag_help, "`help` and `--help` differ");
    assert!(daemon.contains("--proxy-mode"), "{daemon}");
    assert!(
        daemon.contains("kube-proxy help [render|explain]"),
        "{daemon}"
    );
    for sub in ["render", "explain"] {
        let (code, topic, stderr) = run(&["help", sub]);
        assert_eq!(code, 0, "{stderr}");
        let (_, own, _) = run(&[sub, "--help"]);
        assert_eq!(topic, own, "`help {sub}` and `{sub} --help` differ");
        assert!(topic.contains(&format!("kube-proxy-rs {sub} ")), "{topic}");
    }
    let (code, _, stderr) = run(&["help", "nonsense"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("help render"), "{stderr}");
}

/// The modes explain's usage names are the ones it runs.
#[test]
fn explain_help_names_the_modes_explain_runs() {
    let (code, usage, stderr) = run(&["explain", "--help"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        usage.contains("--mode MODE           iptables, ipvs or nftables;"),
        "{usage}"
    );
    assert!(!usage.contains("not supported"), "{usage}");
    for mode in ["iptables", "ipvs", "nftables"] {
        let (code, stdout, stderr) = run(&[
            "explain",
            "--mode",
            mode,
            "--objects",
            "examples/demo-cluster.yaml",
            "--to",
            "10.96.0.10:80",
        ]);
        assert_eq!(code, 0, "explain --mode {mode}: {stderr}");
        assert!(
            stdout.contains("10.244.1.11:8080"),
            "explain --mode {mode} names no endpoint: {stdout}"
        );
    }
}
