//! No credential from the kubeconfig (or `--master`) appears in anything the daemon prints, at
//! the highest verbosity: not in the error for a malformed kubeconfig (its YAML parser quotes
//! the lines around the error), named by `--kubeconfig` or found through `$KUBECONFIG`, and not
//! in the API client's debug logs while it runs with a valid one. The daemon runs in its own
//! network namespace (root); fails, never skips, without it. The in-cluster service-account
//! token (well-formed or malformed) is never printed either.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use support::daemon::{BIN, Daemon};
use support::fakeapi::FakeApiServer;
use support::netns::Netns;

const SECRET: &str = "SECRET-7f3a9c1e5b2d";

fn kubeconfig(server: &str, broken: bool) -> String {
    let tail = if broken { "   oops: [\n" } else { "" };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n\
         users:\n- name: u\n  user:\n    token: {SECRET}\n    password: {SECRET}-pw\n{tail}"
    )
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_in(ns: &Netns, args: &[String], env: &[(&str, &str)]) -> Output {
    let mut cmd = ns.command(BIN, args);
    cmd.stdin(Stdio::null()).env_remove("KUBECONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kube-proxy-rs")
}

/// What is checked, the arguments, the environment.
type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>);

#[test]
fn malformed_kubeconfig_errors_name_the_place_not_the_secret() {
    support::require_root();
    let ns = Netns::new("kcsecret");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig("http://127.0.0.1:1", true)).unwrap();
    let flags = |extra: &[&str]| -> Vec<String> {
        let mut a = vec!["--hostname-override=node1".to_string(), "-v=10".to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let named = format!("--kubeconfig={}", path.display());
    let home = dir.path().display().to_string();
    let cases: Vec<Case> = vec![
        ("--kubeconfig", flags(&[&named]), vec![]),
        (
            "$KUBECONFIG",
            flags(&[]),
            vec![("KUBECONFIG", path.to_str().unwrap()), ("HOME", &home)],
        ),
        (
            "--kubeconfig, JSON logs",
            flags(&[&named, "--logging-format=json"]),
            vec![],
        ),
    ];
    for (what, args, env) in cases {
        let out = run_in(&ns, &args, &env);
        let text = output_text(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: {text}");
        assert!(
            !text.contains(SECRET),
            "{what}: the secret was printed:\n{text}"
        );
        assert!(
            text.contains("line 18, column 4"),
            "{what}: the error should say where the YAML is broken:\n{text}"
        );
    }
}

#[test]
fn master_url_credentials_are_not_printed() {
    support::require_root();
    let ns = Netns::new("kcmaster");
    let out = run_in(
        &ns,
        &[
            format!("--master=https://admin:{SECRET}@bad host"),
            "--hostname-override=node1".into(),
            "-v=10".into(),
        ],
        &[],
    );
    let text = output_text(&out);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains(SECRET), "the secret was printed:\n{text}");
}

#[test]
fn running_daemon_logs_no_credential_at_v10() {
    support::require_root();
    let ns = Netns::new("kcrun");
    let api = FakeApiServer::start_in(Some(&ns), IpAddr::V4(Ipv4Addr::LOCALHOST));
    api.apply_demo_web("node1", "192.168.50.1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig(&api.url(), false)).unwrap();
    let mut proxy = Daemon::builder(&ns, &api, dir.path())
        .kubeconfig(&path)
        .arg("-v=10")
        .start();
    // Until the first sync: lists, watches and an Event post have been made with the token.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.logs().contains("sync done") {
        assert!(Instant::now() < deadline, "no sync:\n{}", proxy.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    proxy.terminate(Duration::from_secs(3));
    let text = proxy.logs();
    assert!(
        text.contains("kube_client"),
        "the API client's debug logs should be on at -v=10:\n{text}"
    );
    assert!(!text.contains(SECRET), "a credential was logged:\n{text}");
}

/// In-cluster configuration (no kubeconfig): the service-account token, well-formed or not
/// (a newline and control bytes make it an invalid header value), is never printed, neither
/// while the client fails against a server that does not speak TLS nor at start-up. The
/// token directory is a tmpfs mounted over /run inside `ip netns exec`'s own mount
/// namespace, so the host's /run is untouched.
#[test]
fn service_account_token_is_not_printed() {
    support::require_root();
    let ns = Netns::new("kcsa");
    let api = FakeApiServer::start_in(Some(&ns), IpAddr::V4(Ipv4Addr::LOCALHOST));
    let dir = tempfile::tempdir().unwrap();
    let ca = "/etc/ssl/certs/ca-certificates.crt";
    assert!(
        std::path::Path::new(ca).exists(),
        "{ca} (ca-certificates) is needed as a CA bundle"
    );
    for (what, token) in [
        ("well-formed token", SECRET.to_string()),
        ("malformed token", format!("{SECRET}\n\u{1}bad {SECRET}")),
    ] {
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &token).unwrap();
        let sa = "/run/secrets/kubernetes.io/serviceaccount";
        let script = format!(
            "mount -t tmpfs kprs-sa /run && mkdir -p {sa} && cp {} {sa}/token && cp {ca} {sa}/ca.crt \
             && echo kube-system > {sa}/namespace && exec timeout -s KILL 6 {BIN} \
             --hostname-override=node1 --conntrack-max-per-core=0 -v=10",
            token_file.display()
        );
        let out = ns
            .command("sh", ["-c", &script])
            .stdin(Stdio::null())
            .env_remove("KUBECONFIG")
            .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
            .env("KUBERNETES_SERVICE_PORT", api.addr().port().to_string())
            .env("HOME", dir.path())
            .output()
            .expect("run kube-proxy-rs in-cluster");
        let text = output_text(&out);
        assert!(
            text.contains("kube_client::client") || text.contains("invalid bearer token"),
            "{what}: the client never ran:\n{text}"
        );
        assert!(
            !text.contains(SECRET),
            "{what}: the token was printed:\n{text}"
        );
    }
}
