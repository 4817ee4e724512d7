//! `kube-proxy-rs explain` against rules in a real kernel: the demo cluster is synced into a
//! fresh network namespace by the iptables proxier (chains plus jump rules), then the built
//! binary runs `explain` inside that namespace (`ip netns exec`) and reads the rules back with
//! iptables-save, for both iptables back ends. Needs root; fails, never skips, without it.

mod support;

use std::collections::BTreeSet;
use std::process::Output;

use kube_proxy_rs::backend::iptables::proxier::{IptablesProxier, render_config};
use kube_proxy_rs::backend::{Backend, SyncRequest};
use kube_proxy_rs::config::parse_render_args;
use kube_proxy_rs::kernel::iptables::{Iptables, IptablesVariant};
use kube_proxy_rs::kernel::{Addresses, Conntrack, IpFamily};
use kube_proxy_rs::render::{DEMO_CLUSTER, state_from};
use kube_proxy_rs::watch::file::{Objects, parse_objects};
use support::netns::Netns;

const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");

/// A namespace holding the node address 192.168.50.1 and the demo cluster's rules.
async fn synced_node(variant: IptablesVariant) -> Netns {
    support::require_root();
    let ns = Netns::new("kexpl");
    // No dummy links on every kernel: the node address goes on lo.
    ns.ip(&["addr", "add", "192.168.50.1/32", "dev", "lo"]);

    let mut objects = Objects::default();
    parse_objects("demo", DEMO_CLUSTER, &mut objects, &mut Vec::new()).unwrap();
    let model =
        state_from(&objects, "node1", &mut Vec::new()).snapshot(kube_proxy_rs::model::IpFamily::V4);
    let args = parse_render_args(&["--cluster-cidr=10.244.0.0/16".to_string()], "node1").unwrap();
    let ipt = Iptables::new(variant, IpFamily::V4).with_netns(ns.name());
    let mut config = render_config(
        &args.options,
        &model.node,
        kube_proxy_rs::model::IpFamily::V4,
        Vec::new(),
    );
    config.random_fully = true;
    let mut p = IptablesProxier::new(
        ipt,
        Conntrack::new().with_netns(ns.name()),
        Addresses::new().with_netns(ns.name()),
        config,
    );
    let facts = kube_proxy_rs::host::HostSettings::from_options(&args.options)
        .facts(&model.node, kube_proxy_rs::model::IpFamily::V4);
    p.sync(SyncRequest {
        model: &model,
        changed: &BTreeSet::new(),
        full: true,
        node_facts: &facts,
    })
    .await
    .expect("full sync into the namespace");
    ns
}

fn explain(ns: &Netns, args: &[&str]) -> Output {
    let mut full = vec!["explain"];
    full.extend_from_slice(args);
    ns.command(BIN, &full)
        .env_remove("KUBE_PROXY_RS_IPTABLES_MODE")
        .output()
        .expect("run kube-proxy-rs explain")
}

fn explain_ok(ns: &Netns, args: &[&str]) -> String {
    let out = explain(ns, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "explain {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn assert_has(text: &str, wants: &[&str]) {
    for w in wants {
        assert!(text.contains(w), "missing {w:?} in:\n{text}");
    }
}

async fn check(variant: IptablesVariant) {
    let ns = synced_node(variant).await;
    let origin = format!("Rules:      kernel (iptables-{variant}-save -t nat, -t filter)");

    // ClusterIP from a pod: three endpoints, a third each (the kernel prints the probabilities
    // as 0.33333333349 and 0.50000000000), no masquerade (source in the cluster CIDR).
    let text = explain_ok(&ns, &["--to", "10.96.0.10:80", "--from", "10.244.7.7"]);
    assert_has(
        &text,
        &[
            &origin,
            "nat/PREROUTING",
            "\"demo/web:http cluster IP\"",
            "Endpoints (3)",
            "33.33%  10.244.1.11:8080  via KUBE-SEP-4R67FX26EEAQJQLI  \"demo/web:http -> 10.244.1.11:8080\"",
            "33.33%  10.244.2.12:8080",
            "33.33%  10.244.3.13:8080",
            "Masquerade: no",
            "Result: DNAT to one of 3 endpoints",
        ],
    );
    assert!(
        !text.contains("WARNING"),
        "jump rules are installed:\n{text}"
    );

    // The same from outside the cluster CIDR: masqueraded by the KUBE-SVC rule.
    let text = explain_ok(&ns, &["--to", "10.96.0.10:80", "--from", "172.16.0.9"]);
    assert_has(
        &text,
        &["Masquerade: yes", "the source is not in 10.244.0.0/16"],
    );

    // No endpoints: REJECT with the rule's comment.
    let text = explain_ok(&ns, &["--to", "10.96.0.130:80"]);
    assert_has(
        &text,
        &["Result: REJECTED by filter/KUBE-SERVICES \"demo/empty:http has no endpoints\""],
    );

    // Load balancer source ranges: dropped outside the range, local endpoint only inside it.
    let text = explain_ok(&ns, &["--to", "203.0.113.10:443", "--from", "203.0.113.99"]);
    assert_has(&text, &["DROPPED by filter/KUBE-PROXY-FIREWALL"]);
    let text = explain_ok(&ns, &["--to", "203.0.113.10:443", "--from", "198.51.100.7"]);
    assert_has(&text, &["100.00%  10.244.1.31:8443", "KUBE-SVL-"]);

    // NodePort on the node's address, with ClientIP affinity; from the node itself it enters
    // nat OUTPUT.
    let text = explain_ok(
        &ns,
        &["--to", "192.168.50.1:30080", "--from", "192.168.60.9"],
    );
    assert_has(
        &text,
        &[
            "nat/KUBE-NODEPORTS",
            "50.00%  10.244.1.21:8080",
            "50.00%  10.244.2.22:8080",
            "Session affinity: ClientIP, 600s",
            "Masquerade: yes",
        ],
    );
    let text = explain_ok(
        &ns,
        &["--to", "10.96.0.53:53/udp", "--from", "192.168.50.1"],
    );
    assert_has(
        &text,
        &[
            "Enters:     nat/OUTPUT",
            "\"kube-system/dns:dns cluster IP\"",
            "50.00%  10.244.1.53:53",
        ],
    );

    // Not a service.
    let text = explain_ok(&ns, &["--to", "10.96.0.99:80"]);
    assert_has(&text, &["it is not a service address"]);

    // nftables on an iptables-mode node: a clear error, non-zero exit. IPVS on this host
    // kernel (no IPVS): a clear error naming the cause (tests/kernel_ipvs.rs explains a real
    // IPVS table in the VM).
    let out = explain(&ns, &["--to", "10.96.0.10:80", "--mode", "nftables"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "there is no `ip kube-proxy` nftables table: is kube-proxy running in nftables mode?"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = explain(&ns, &["--to", "10.96.0.10:80", "--mode", "ipvs"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the IPVS table") && err.contains("IPVS is not available"),
        "{err}"
    );
}

#[tokio::test]
async fn explain_reads_legacy_rules_from_the_kernel() {
    check(IptablesVariant::Legacy).await;
}

#[tokio::test]
async fn explain_reads_nft_rules_from_the_kernel() {
    check(IptablesVariant::Nft).await;
}

/// A namespace holding the node address 192.168.50.1 and the demo cluster's `ip kube-proxy`
/// table, synced by the nftables proxier with the layout `threshold` picks.
async fn nft_synced_node(threshold: usize) -> Netns {
    use kube_proxy_rs::backend::nftables::proxier::{NftablesProxier, render_config};
    use kube_proxy_rs::kernel::nft::Nft;
    support::require_root();
    let ns = Netns::new("kexpn");
    ns.ip(&["addr", "add", "192.168.50.1/32", "dev", "lo"]);
    let mut objects = Objects::default();
    parse_objects("demo", DEMO_CLUSTER, &mut objects, &mut Vec::new()).unwrap();
    let model =
        state_from(&objects, "node1", &mut Vec::new()).snapshot(kube_proxy_rs::model::IpFamily::V4);
    let args = parse_render_args(
        &[
            "--proxy-mode=nftables".to_string(),
            "--cluster-cidr=10.244.0.0/16".to_string(),
        ],
        "node1",
    )
    .unwrap();
    let mut config = render_config(&args.options, kube_proxy_rs::model::IpFamily::V4);
    config.large_cluster_threshold = threshold;
    let mut p = NftablesProxier::new(
        Nft::new().with_netns(ns.name()),
        Conntrack::new().with_netns(ns.name()),
        Addresses::new().with_netns(ns.name()),
        config,
    );
    let facts = kube_proxy_rs::host::HostSettings::from_options(&args.options)
        .facts(&model.node, kube_proxy_rs::model::IpFamily::V4);
    p.sync(SyncRequest {
        model: &model,
        changed: &BTreeSet::new(),
        full: true,
        node_facts: &facts,
    })
    .await
    .expect("full sync into the namespace");
    ns
}

/// `explain --mode nftables` reads the live table (`nft list table ip kube-proxy`) in both
/// layouts: the endpoints and their odds, the maps matched, masquerading, rejects and drops.
#[tokio::test]
async fn explain_reads_the_nftables_table_from_the_kernel() {
    for (threshold, layout) in [(1000, "Layout: upstream"), (0, "Layout: large-cluster")] {
        let ns = nft_synced_node(threshold).await;
        let nft = |args: &[&str]| {
            let mut full = vec!["--mode", "nftables"];
            full.extend_from_slice(args);
            explain_ok(&ns, &full)
        };
        let text = nft(&["--to", "10.96.0.10:80", "--from", "172.16.0.9"]);
        assert_has(
            &text,
            &[
                "Rules: kernel (nft list table ip kube-proxy)",
                layout,
                "@service-ips { 10.96.0.10 . tcp . 80 : goto service-AXK6CI2C-demo/web/tcp/http }",
                "Endpoints (3):",
                " 33.3%  10.244.1.11:8080  via endpoint-S4ZL6AMI-demo/web/tcp/http__10.244.1.11/8080",
                " 33.3%  10.244.2.12:8080",
                " 33.3%  10.244.3.13:8080",
                "masqueraded: marked by service-AXK6CI2C-demo/web/tcp/http: ip daddr 10.96.0.10 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
            ],
        );
        let text = nft(&["--to", "10.96.0.10:80", "--from", "10.244.7.7"]);
        assert_eq!(
            text.matches("not masqueraded (source address kept)")
                .count(),
            3,
            "{text}"
        );
        let text = nft(&["--to", "10.96.0.80:80"]);
        assert_has(
            &text,
            &[
                "Endpoints (2):",
                " 50.0%  10.244.1.21:8080",
                "@affinity-V7TIFHB5-demo/shop/tcp/http__10.244.1.21/8080 (timeout 10m)",
            ],
        );
        let text = nft(&["--to", "10.96.0.130:80"]);
        assert_has(
            &text,
            &[
                "Result: REJECT by reject-chain: reject",
                "@no-endpoint-services { 10.96.0.130 . tcp . 80 comment \"demo/empty:http\" : goto reject-chain }",
            ],
        );
        let text = nft(&["--to", "203.0.113.10:443"]);
        assert_has(
            &text,
            &[
                "Result: DROP by firewall-LLLKJ2GE-demo/edge/tcp/https: ip saddr != 198.51.100.0/24 drop",
            ],
        );
        let text = nft(&["--to", "10.96.0.10:80", "--from", "192.168.50.1"]);
        assert_has(
            &text,
            &[
                "Hooks: filter-output-pre-dnat -> nat-output",
                "Endpoints (3):",
            ],
        );
    }
}
