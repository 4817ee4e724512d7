//! The `render` subcommand as an operator runs it: YAML objects in, iptables-restore text out,
//! no root, no kernel.

use std::process::Command;

fn render(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-proxy-rs"))
        .arg("render")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kube-proxy-rs render");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_cluster_renders_the_golden_ruleset() {
    let (code, stdout, stderr) = render(&[
        "--objects",
        "examples/demo-cluster.yaml",
        "--cluster-cidr",
        "10.244.0.0/16",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let golden = include_str!("golden/demo-cluster.iptables");
    assert_eq!(
        stdout, golden,
        "render output drifted from tests/golden/demo-cluster.iptables"
    );
    // Spot checks that the golden itself says what the demo cluster means.
    assert!(golden.contains("-A KUBE-SERVICES -m comment --comment \"demo/empty:http has no endpoints\" -m tcp -p tcp -d 10.96.0.130 --dport 80 -j REJECT"));
    assert!(golden.contains("--to-destination 10.244.1.11:8080"));
    assert!(
        !golden.contains("demo/db"),
        "headless service must produce no rules"
    );
    assert!(
        !golden.contains("demo/search"),
        "ExternalName service must produce no rules"
    );
}

#[test]
fn no_objects_renders_the_bundled_demo() {
    let (code, stdout, _) = render(&["--cluster-cidr", "10.244.0.0/16"]);
    assert_eq!(code, 0);
    assert_eq!(stdout, include_str!("golden/demo-cluster.iptables"));
}

#[test]
fn bad_objects_are_warned_about_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: v1
kind: Service
metadata: {name: good, namespace: ns}
spec: {clusterIP: 10.96.1.1, ports: [{name: p, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good-1, namespace: ns, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{name: p, port: 8080}]
endpoints: [{addresses: [10.244.1.1]}, {addresses: [10.244.1.999]}]
---
apiVersion: v1
kind: Service
metadata: {name: badip, namespace: ns}
spec: {clusterIP: 10.96.1.999, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: ns}
spec: {clusterIP: 10.96.1.2, ports: [{name: a, port: 70000}, {name: b, port: 5, protocol: ICMP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: f-1, namespace: ns, labels: {kubernetes.io/service-name: good}}
addressType: FQDN
endpoints: [{addresses: [example.com]}]
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = render(&["--objects", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    for want in [
        "ns/badip",
        "10.96.1.999",
        "70000",
        "ICMP",
        "FQDN",
        "10.244.1.999",
    ] {
        assert!(stderr.contains(want), "no warning naming {want}:\n{stderr}");
    }
    assert!(
        stdout.contains("--to-destination 10.244.1.1:8080"),
        "the good service must still render"
    );
    assert!(!stdout.contains("10.96.1.999") && !stdout.contains("ns/badport"));
}

#[test]
fn syntax_error_is_a_clear_failure() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, "a: [\n").unwrap();
    let (code, stdout, stderr) = render(&["--objects", file.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(stdout.is_empty());
    assert!(stderr.contains("broken.yaml: document 1"), "{stderr}");
}

/// nftables mode prints the first-sync `nft -f -` transaction of upstream's ruleset.
#[test]
fn demo_cluster_renders_the_nftables_golden() {
    let (code, stdout, stderr) = render(&[
        "--objects",
        "examples/demo-cluster.yaml",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--proxy-mode",
        "nftables",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let golden = include_str!("golden/demo-cluster.nft");
    assert_eq!(
        stdout, golden,
        "render drifted from tests/golden/demo-cluster.nft"
    );
    assert!(golden.starts_with("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n"));
    // The real mark (%#08x), the primary node IP as the only node-port address (nftables
    // mode's default), and the eTP=Local LB's firewall.
    assert!(
        golden.contains("add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000\n")
    );
    assert!(golden.contains("add element ip kube-proxy nodeport-ips { 192.168.50.1 }\n"));
    assert!(golden.contains("ip saddr != { 198.51.100.0/24 } drop\n"));
    assert!(golden.contains("comment \"demo/empty:http\" : goto reject-chain }"));
}
