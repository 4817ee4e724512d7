//! Bad input at the edges an operator controls (issue 11, "Bad input"): deeply nested or huge
//! YAML/JSON is refused within a second with a clear error, both by `render --objects` and
//! by the daemon's `--config`; an invalid config names its field, exits non-zero and leaves
//! the kernel of the node namespace exactly as it was.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::netns::Netns;

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");
const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
/// Generous for a debug build on a busy 2-core machine: the guard answers in milliseconds,
/// the unguarded decoder took 3–40 s on these documents.
const QUICK: Duration = Duration::from_secs(2);

/// 200 KB documents nested every way YAML allows.
fn nested_documents() -> Vec<(&'static str, String)> {
    let n = 100_000;
    vec![
        (
            "flow sequence",
            format!("{}{}", "[".repeat(n), "]".repeat(n)),
        ),
        (
            "flow mapping",
            format!("{}1{}", "{a: ".repeat(n / 4), "}".repeat(n / 4)),
        ),
        (
            "JSON",
            format!("{}1{}", "{\"a\":".repeat(n / 5), "}".repeat(n / 5)),
        ),
    ]
}

fn timed(cmd: &mut Command) -> (Output, Duration) {
    let start = Instant::now();
    let out = cmd.output().expect("run kube-proxy-rs");
    (out, start.elapsed())
}

fn assert_refused(what: &str, out: &Output, took: Duration, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: accepted\n{stderr}");
    assert!(
        stderr.contains(want),
        "{what}: error does not say {want:?}:\n{stderr}"
    );
    assert!(took < QUICK, "{what}: refused only after {took:?}");
    assert!(out.stdout.is_empty(), "{what}: printed a render");
}

#[test]
fn render_refuses_deeply_nested_objects_quickly() {
    let dir = tempfile::tempdir().unwrap();
    for (what, doc) in nested_documents() {
        let file = dir.path().join("nested.yaml");
        std::fs::write(&file, &doc).unwrap();
        let (out, took) = timed(Command::new(BIN).args(["render", "--objects"]).arg(&file));
        assert_refused(what, &out, took, "nesting deeper than 128 levels");
        // The same nesting after a valid first document: the error names document 2.
        std::fs::write(
            &file,
            format!("apiVersion: v1\nkind: List\nitems: []\n---\n{doc}"),
        )
        .unwrap();
        let (out, took) = timed(Command::new(BIN).args(["render", "--objects"]).arg(&file));
        assert_refused(what, &out, took, "nesting deeper than 128 levels");
    }
}

#[test]
fn config_refuses_deeply_nested_or_huge_files_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    let mut cases: Vec<(&str, String, &str)> = nested_documents()
        .into_iter()
        .map(|(what, doc)| {
            (
                what,
                format!("{HEADER}featureGates: {doc}\n"),
                "nesting deeper",
            )
        })
        .collect();
    cases.push((
        "2 MB of comments",
        format!(
            "{HEADER}{}",
            "# padding padding padding padding\n".repeat(60_000)
        ),
        "more than the 1048576-byte limit",
    ));
    for (what, text, want) in cases {
        std::fs::write(&file, text).unwrap();
        // `--cleanup` would touch the kernel; plain start-up must fail at the config.
        let (out, took) = timed(
            Command::new(BIN)
                .arg("--config")
                .arg(&file)
                .arg("--kubeconfig=/nonexistent"),
        );
        assert_refused(what, &out, took, want);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("config.yaml"),
            "{what}: error does not name the file"
        );
    }
}

/// Everything kube-proxy could have changed in a namespace: both families' rule sets and the
/// sysctls it writes.
fn kernel_state(ns: &Netns) -> String {
    let mut s = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let out = ns.run_ok(tool, Vec::<&str>::new());
        // Counters and the save-time comment change on their own.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            s.push_str(line);
            s.push('\n');
        }
    }
    for key in [
        "net.ipv4.conf.all.route_localnet",
        "net.ipv4.ip_forward",
        "net.ipv4.vs.conntrack",
    ] {
        let out = ns.run("sysctl", ["-n", key]);
        s.push_str(&format!("{key}={}", String::from_utf8_lossy(&out.stdout)));
    }
    s
}

fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{HEADER}{body}")).unwrap();
    p
}

#[test]
fn invalid_config_names_the_field_and_changes_nothing_in_the_kernel() {
    support::require_root();
    let ns = Netns::new("badcfg");
    // Something of someone else's to keep, and the kernel tables loaded.
    ns.run_ok("iptables", ["-t", "nat", "-N", "FOREIGN"]);
    ns.run_ok(
        "iptables",
        [
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-s",
            "192.0.2.7",
            "-j",
            "DROP",
        ],
    );
    ns.run_ok("ip6tables", ["-t", "nat", "-N", "FOREIGN6"]);
    let before = kernel_state(&ns);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("iptables: {masqueradeBit: x}\n", "iptables.masqueradeBit"),
        ("iptables: {masqueradeBit: 40}\n", "iptables.masqueradeBit"),
        ("mode: bogus\n", "mode"),
        ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR"),
        (
            "conntrack: {tcpEstablishedTimeout: 5parsecs}\n",
            "conntrack.tcpEstablishedTimeout",
        ),
        ("nodePortAddresses: [300.1.1.0/24]\n", "nodePortAddresses"),
        ("ipvs: {scheduler: 7}\n", "ipvs.scheduler"),
        ("metricsBindAddress: [a]\n", "metricsBindAddress"),
    ];
    for (i, (body, field)) in cases.iter().enumerate() {
        let file = write(dir.path(), &format!("c{i}.yaml"), body);
        let out = ns
            .command(BIN, [format!("--config={}", file.display())])
            .args(["--hostname-override=node1", "--kubeconfig=/nonexistent"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{body:?} accepted:\n{stderr}");
        assert!(
            stderr.contains(field),
            "{body:?}: error does not name {field}:\n{stderr}"
        );
        assert_eq!(
            kernel_state(&ns),
            before,
            "{body:?} changed the kernel:\n{stderr}"
        );
    }
}
