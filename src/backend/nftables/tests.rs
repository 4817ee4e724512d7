//! Goldens: upstream's `TestOverallNFTablesRules` (state after the first sync, compared in
//! upstream's sorted form) and the exact first-sync transactions derived from upstream's
//! code, plus per-feature and partial-sync checks against the in-memory table.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::render::{RenderConfig, render};
use super::table::{Table, sort_transaction};
use super::tx::{Committed, Existing, Owned, Prior, build, build_partial};
use crate::backend::netfilter::LocalDetector;
use crate::host::NodePortDestinations;
use crate::model::{
    Endpoint, IpFamily, Protocol, ProxyModel, ServiceName, ServicePort, ServicePortName,
    ServiceType, SourceRanges,
};

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn spn(ns: &str, name: &str) -> ServicePortName {
    ServicePortName::new(ns, name, "p80", Protocol::Tcp)
}

pub(super) fn ep(addr: &str, port: u16, local: bool) -> Endpoint {
    let mut e = Endpoint::ready(ip(addr), port);
    e.is_local = local;
    e
}

/// The upstream fake proxier's settings (mark `0x4000`, pod CIDR 10.0.0.0/8, ServiceCIDR
/// 172.30.0.0/16, node ports on 192.168.0.2).
pub(super) fn golden_config() -> RenderConfig {
    RenderConfig {
        family: IpFamily::V4,
        mark: "0x4000".into(),
        masquerade_all: false,
        local_detector: LocalDetector::Cidr("10.0.0.0/8".parse().unwrap()),
        node_ports: NodePortDestinations::Ips(vec![ip("192.168.0.2")]),
        primary_node_ip: Some(ip("192.168.0.2")),
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        large_cluster_threshold: super::render::LARGE_CLUSTER_THRESHOLD,
    }
}

fn port(ns: &str, name: &str, cip: &str) -> ServicePort {
    ServicePort::basic(spn(ns, name), ip(cip), 80)
}

/// The inputs of upstream's `TestOverallNFTablesRules`.
pub(super) fn overall_model() -> ProxyModel {
    let svc1 = port("ns1", "svc1", "172.30.0.41");
    let mut svc2 = port("ns2", "svc2", "172.30.0.42");
    svc2.service_type = ServiceType::LoadBalancer;
    svc2.node_port = 3001;
    svc2.external_policy_local = true;
    svc2.load_balancer_ips = vec![ip("1.2.3.4")];
    svc2.external_ips = vec![ip("192.168.99.22")];
    svc2.health_check_node_port = 30000;
    let mut svc3 = port("ns3", "svc3", "172.30.0.43");
    svc3.service_type = ServiceType::NodePort;
    svc3.node_port = 3003;
    let mut svc4 = port("ns4", "svc4", "172.30.0.44");
    svc4.service_type = ServiceType::NodePort;
    svc4.external_ips = vec![ip("192.168.99.33")];
    let mut svc5 = port("ns5", "svc5", "172.30.0.45");
    svc5.service_type = ServiceType::LoadBalancer;
    svc5.node_port = 3002;
    svc5.load_balancer_ips = vec![ip("5.6.7.8")];
    svc5.health_check_node_port = 30000;
    svc5.source_ranges = SourceRanges::Only(vec!["203.0.113.0/25".parse().unwrap()]);
    svc5.session_affinity_timeout = Some(10800);
    let svc6 = port("ns6", "svc6", "172.30.0.46");
    ProxyModel::for_tests(
        "test-node",
        vec![svc1, svc2, svc3, svc4, svc5, svc6],
        vec![
            (spn("ns1", "svc1"), vec![ep("10.180.0.1", 80, false)]),
            (spn("ns2", "svc2"), vec![ep("10.180.0.2", 80, false)]),
            (spn("ns3", "svc3"), vec![ep("10.180.0.3", 80, false)]),
            (
                spn("ns4", "svc4"),
                vec![ep("10.180.0.4", 80, false), ep("10.180.0.5", 80, true)],
            ),
            (spn("ns5", "svc5"), vec![ep("10.180.0.3", 80, false)]),
        ],
    )
}

/// The first-sync transaction of `model` on a host without the table.
pub(super) fn first_sync(model: &ProxyModel, cfg: &RenderConfig) -> super::Transaction {
    build(
        &render(model, cfg),
        Prior::Known(&Committed::default()),
        true,
        true,
    )
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// Upstream's golden, compared as upstream compares it: the state after the sync, sorted.
#[test]
fn overall_rules_match_upstream_golden_after_upstream_sort() {
    let tx = first_sync(&overall_model(), &golden_config());
    let mut table = Table::default();
    table.apply(&tx.text).unwrap();
    let got = sort_transaction(&table.dump().join("\n"));
    let want = sort_transaction(include_str!("testdata/overall-sorted.golden"));
    assert_eq!(got, want);
}

/// The exact transaction text, in upstream's operation order (services in name order).
#[test]
fn overall_first_sync_transaction_is_upstreams_byte_for_byte() {
    let tx = first_sync(&overall_model(), &golden_config());
    assert_eq!(
        lines(&tx.text),
        lines(include_str!("testdata/overall-first-sync.nft"))
    );
    assert_eq!(tx.ops, 171);
}

/// ClusterIP with two endpoints plus a NodePort (the reference's small example).
#[test]
fn small_first_sync_transaction_is_upstreams_byte_for_byte() {
    let svc1 = port("ns1", "svc1", "172.30.0.41");
    let mut svc3 = port("ns3", "svc3", "172.30.0.43");
    svc3.service_type = ServiceType::NodePort;
    svc3.node_port = 3003;
    let m = ProxyModel::for_tests(
        "test-node",
        vec![svc1, svc3],
        vec![
            (
                spn("ns1", "svc1"),
                vec![ep("10.0.1.1", 80, false), ep("10.0.1.2", 80, false)],
            ),
            (spn("ns3", "svc3"), vec![ep("10.180.0.3", 80, false)]),
        ],
    );
    let tx = first_sync(&m, &golden_config());
    assert_eq!(
        lines(&tx.text),
        lines(include_str!("testdata/small-first-sync.nft"))
    );
}

/// A second sync of the same model writes nothing; a later full sync skips the base-chain
/// add+delete pairs.
#[test]
fn unchanged_partial_sync_is_empty_and_later_full_sync_keeps_base_chains() {
    let m = overall_model();
    let cfg = golden_config();
    let tx = first_sync(&m, &cfg);
    let again = build(&render(&m, &cfg), Prior::Known(&tx.next), false, false);
    assert_eq!(again.text, "");
    let full = build(&render(&m, &cfg), Prior::Known(&tx.next), true, false);
    assert!(!full.text.contains("delete chain"));
    assert!(
        !full.text.contains("add element ip kube-proxy service-ips"),
        "elements already committed"
    );
    let mut t = Table::default();
    t.apply(&tx.text).unwrap();
    t.apply(&full.text).unwrap();
    let mut fresh = Table::default();
    fresh.apply(&tx.text).unwrap();
    assert_eq!(t, fresh);
}

fn applied(texts: &[&str]) -> Table {
    let mut t = Table::default();
    for text in texts {
        t.apply(text).unwrap();
    }
    t
}

/// One endpoint added: only that service's chains and the new endpoint chain are written,
/// their rules as `add chain` blocks (no `add rule`, for which nft 1.0.6 would fetch every
/// chain of the table), and the result equals a fresh full sync of the new model.
#[test]
fn partial_sync_writes_only_the_changed_service_and_converges() {
    let cfg = golden_config();
    let mut m = overall_model();
    let tx1 = first_sync(&m, &cfg);
    m.endpoints
        .get_mut(&spn("ns1", "svc1"))
        .unwrap()
        .push(ep("10.180.0.9", 80, false));
    let tx2 = build(&render(&m, &cfg), Prior::Known(&tx1.next), false, false);
    let want = [
        "add chain ip kube-proxy endpoint-R7UVCGCT-ns1/svc1/tcp/p80__10.180.0.9/80",
        "flush chain ip kube-proxy endpoint-R7UVCGCT-ns1/svc1/tcp/p80__10.180.0.9/80",
        "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80",
        "flush chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80",
        "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 { ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade ; numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , 1 : goto endpoint-R7UVCGCT-ns1/svc1/tcp/p80__10.180.0.9/80 } ; }",
        "add chain ip kube-proxy endpoint-R7UVCGCT-ns1/svc1/tcp/p80__10.180.0.9/80 { ip saddr 10.180.0.9 jump mark-for-masquerade ; meta l4proto tcp dnat to 10.180.0.9:80 ; }",
    ];
    assert_eq!(lines(&tx2.text), want);
    let fresh = first_sync(&m, &cfg);
    assert_eq!(applied(&[&tx1.text, &tx2.text]), applied(&[&fresh.text]));
}

/// An endpoint added to a session-affinity service: its service chain's rules name the new
/// endpoint's affinity set, so they stay `add rule` lines (nft resolves `@set` only with
/// its set cache) written after that set's `add set`.
#[test]
fn partial_sync_of_an_affinity_service_adds_its_set_before_the_rules_naming_it() {
    let cfg = golden_config();
    let mut m = overall_model();
    let tx1 = first_sync(&m, &cfg);
    m.endpoints
        .get_mut(&spn("ns5", "svc5"))
        .unwrap()
        .push(ep("10.180.0.8", 80, false));
    let tx2 = build(&render(&m, &cfg), Prior::Known(&tx1.next), false, false);
    let text = lines(&tx2.text);
    let set = text
        .iter()
        .position(|l| l.starts_with("add set") && l.contains("10.180.0.8"))
        .expect("the new endpoint's affinity set");
    let uses: Vec<usize> = (0..text.len())
        .filter(|i| text[*i].contains("@affinity-") && text[*i].contains("10.180.0.8"))
        .collect();
    assert!(
        !uses.is_empty() && uses.iter().all(|i| *i > set),
        "{text:#?}"
    );
    assert!(uses.iter().all(|i| text[*i].starts_with("add rule")));
    let fresh = first_sync(&m, &cfg);
    assert_eq!(applied(&[&tx1.text, &tx2.text]), applied(&[&fresh.text]));
}

/// Removing a service deletes its elements and flushes its chains (deleted later by the
/// proxier); removing an affinity service deletes its affinity set at once.
#[test]
fn removed_service_is_flushed_and_its_elements_deleted() {
    let cfg = golden_config();
    let mut m = overall_model();
    let tx1 = first_sync(&m, &cfg);
    m.services.remove(&spn("ns5", "svc5"));
    m.endpoints.remove(&spn("ns5", "svc5"));
    let tx2 = build(&render(&m, &cfg), Prior::Known(&tx1.next), false, false);
    let want = [
        "flush chain ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80",
        "flush chain ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80",
        "flush chain ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80",
        "flush chain ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80",
        "delete set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80",
        "delete element ip kube-proxy cluster-ips { 172.30.0.45 }",
        "delete element ip kube-proxy service-ips { 172.30.0.45 . tcp . 80 }",
        "delete element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 }",
        "delete element ip kube-proxy firewall-ips { 5.6.7.8 . tcp . 80 }",
        "delete element ip kube-proxy service-nodeports { tcp . 3002 }",
    ];
    assert_eq!(lines(&tx2.text), want);
    assert_eq!(tx2.flushed_stale.len(), 4);
    let mut t = applied(&[&tx1.text, &tx2.text]);
    let deletes: String = tx2
        .flushed_stale
        .iter()
        .map(|c| format!("delete chain ip kube-proxy {c}\n"))
        .collect();
    t.apply(&deletes).unwrap();
    assert_eq!(t, applied(&[&first_sync(&m, &cfg).text]));
}

/// Endpoints gone: the service moves from `service-ips` to a reject entry (value change of
/// the same key is a delete + add).
#[test]
fn service_losing_its_endpoints_switches_to_reject() {
    let cfg = golden_config();
    let mut m = overall_model();
    let tx1 = first_sync(&m, &cfg);
    m.endpoints.remove(&spn("ns1", "svc1"));
    let tx2 = build(&render(&m, &cfg), Prior::Known(&tx1.next), false, false);
    assert!(tx2.text.contains("add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment \"ns1/svc1:p80\" : goto reject-chain }"));
    assert!(
        tx2.text
            .contains("delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }")
    );
    applied(&[&tx1.text, &tx2.text]);
    // And back: the reject entry goes, the chain comes back.
    let m2 = overall_model();
    let tx3 = build(&render(&m2, &cfg), Prior::Known(&tx2.next), false, false);
    let t = applied(&[&tx1.text, &tx2.text, &tx3.text]);
    // Element order differs (re-added last); compare sorted dumps.
    assert_eq!(
        sort_transaction(&t.dump().join("\n")),
        sort_transaction(&applied(&[&first_sync(&m2, &cfg).text]).dump().join("\n"))
    );
}

/// After a restart (contents unknown), a full sync flushes the element containers and
/// flushes leftover service chains it finds.
#[test]
fn unknown_prior_flushes_containers_and_leftover_chains() {
    let cfg = golden_config();
    let m = overall_model();
    let old = first_sync(&m, &cfg);
    let mut m2 = overall_model();
    m2.services.remove(&spn("ns1", "svc1"));
    let existing = Existing {
        chains: old.next.chains.keys().cloned().collect(),
        sets: old.next.sets.iter().cloned().collect(),
    };
    let tx = build(
        &render(&m2, &cfg),
        Prior::Unknown {
            existing: &existing,
        },
        true,
        true,
    );
    for c in ["cluster-ips", "service-ips", "no-endpoint-services"] {
        assert!(tx.text.contains(&format!(" {c}\n")), "{c} flushed");
    }
    let stale: BTreeSet<&str> = tx.flushed_stale.iter().map(String::as_str).collect();
    assert_eq!(
        stale,
        BTreeSet::from([
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        ])
    );
    let mut t = applied(&[&old.text, &tx.text]);
    let deletes: String = stale
        .iter()
        .map(|c| format!("delete chain ip kube-proxy {c}\n"))
        .collect();
    t.apply(&deletes).unwrap();
    assert_eq!(
        sort_transaction(&t.dump().join("\n")),
        sort_transaction(&applied(&[&first_sync(&m2, &cfg).text]).dump().join("\n"))
    );
}

/// Per-service lines of a transaction (the fixed section is covered by the goldens above).
fn service_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.contains("/tcp/")).collect()
}

/// IPv6: `ip6` table, `ipv6_addr` types, `[ip]:port` DNAT, dotted endpoint names; match-all
/// node ports use the `fib daddr type local` form against `::1`.
#[test]
fn ipv6_table_golden() {
    let mut svc = ServicePort::basic(spn("ns1", "svc1"), ip("fd00:10:96::41"), 80);
    svc.service_type = ServiceType::NodePort;
    svc.node_port = 3001;
    let m = ProxyModel::for_tests(
        "test-node",
        vec![svc],
        vec![(spn("ns1", "svc1"), vec![ep("fd00:10:180::2:1", 80, false)])],
    );
    let cfg = RenderConfig {
        family: IpFamily::V6,
        local_detector: LocalDetector::Cidr("fd00:10::/64".parse().unwrap()),
        node_ports: NodePortDestinations::AllLocal,
        service_cidrs: vec!["fd00:10:96::/112".parse().unwrap()],
        ..golden_config()
    };
    let tx = first_sync(&m, &cfg);
    let fixed = [
        "add table ip6 kube-proxy { comment \"rules for kube-proxy\" ; }",
        "add set ip6 kube-proxy cluster-ips { type ipv6_addr ; comment \"Active ClusterIPs\" ; }",
        "add rule ip6 kube-proxy cluster-ips-check ip6 daddr { fd00:10:96::/112 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
        "add set ip6 kube-proxy nodeport-ips { type ipv6_addr ; comment \"IPs that accept NodePort traffic\" ; }",
        "delete set ip6 kube-proxy nodeport-ips",
        "add rule ip6 kube-proxy nodeport-endpoints-check ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports",
        "add rule ip6 kube-proxy services fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports",
    ];
    for l in fixed {
        assert!(tx.text.lines().any(|x| x == l), "missing {l}");
    }
    let ep = "endpoint-2CRNCTTE-ns1/svc1/tcp/p80__fd00.10.180..2.1/80";
    let svc = "service-ULMVA6XW-ns1/svc1/tcp/p80";
    let ext = "external-ULMVA6XW-ns1/svc1/tcp/p80";
    let want = [
        format!("add chain ip6 kube-proxy {ep}"),
        format!("flush chain ip6 kube-proxy {ep}"),
        format!("add chain ip6 kube-proxy {svc}"),
        format!("flush chain ip6 kube-proxy {svc}"),
        format!("add chain ip6 kube-proxy {ext}"),
        format!("flush chain ip6 kube-proxy {ext}"),
        format!(
            "add element ip6 kube-proxy service-ips {{ fd00:10:96::41 . tcp . 80 : goto {svc} }}"
        ),
        format!("add element ip6 kube-proxy service-nodeports {{ tcp . 3001 : goto {ext} }}"),
        format!(
            "add rule ip6 kube-proxy {svc} ip6 daddr fd00:10:96::41 ip6 saddr != fd00:10::/64 jump mark-for-masquerade"
        ),
        format!("add rule ip6 kube-proxy {ext} jump mark-for-masquerade"),
        format!("add rule ip6 kube-proxy {ext} goto {svc}"),
        format!("add rule ip6 kube-proxy {svc} numgen random mod 1 vmap {{ 0 : goto {ep} }}"),
        format!("add rule ip6 kube-proxy {ep} ip6 saddr fd00:10:180::2:1 jump mark-for-masquerade"),
        format!("add rule ip6 kube-proxy {ep} meta l4proto tcp dnat to [fd00:10:180::2:1]:80"),
    ];
    assert_eq!(service_lines(&tx.text), want);
    applied(&[&tx.text]);
}

/// eTP=Local with a local endpoint (the `local-` chain and the final `goto local-`),
/// iTP=Local without one (drop), masquerade-all, and an interface-prefix detector.
#[test]
fn local_policies_and_masquerade_all_golden() {
    let mut lb = port("ns1", "lb", "172.30.0.50");
    lb.service_type = ServiceType::LoadBalancer;
    lb.node_port = 3005;
    lb.load_balancer_ips = vec![ip("1.2.3.5")];
    lb.external_policy_local = true;
    lb.health_check_node_port = 30005;
    let mut itp = port("ns1", "itp", "172.30.0.51");
    itp.internal_policy_local = true;
    let m = ProxyModel::for_tests(
        "test-node",
        vec![lb, itp],
        vec![
            (
                spn("ns1", "lb"),
                vec![ep("10.180.1.1", 80, false), ep("10.180.1.2", 80, true)],
            ),
            (spn("ns1", "itp"), vec![ep("10.180.2.1", 80, false)]),
        ],
    );
    let cfg = RenderConfig {
        masquerade_all: true,
        local_detector: LocalDetector::InterfaceNamePrefix("veth".into()),
        ..golden_config()
    };
    let rs = render(&m, &cfg);
    assert_eq!(
        (
            rs.no_local_endpoints_internal,
            rs.no_local_endpoints_external
        ),
        (1, 0)
    );
    let tx = first_sync(&m, &cfg);
    let got = service_lines(&tx.text);
    let svc = "service-FCBKHWL6-ns1/lb/tcp/p80";
    let local = "local-FCBKHWL6-ns1/lb/tcp/p80";
    let ext = "external-FCBKHWL6-ns1/lb/tcp/p80";
    let expected_rules = [
        format!("add rule ip kube-proxy {svc} ip daddr 172.30.0.50 jump mark-for-masquerade"),
        format!("add rule ip kube-proxy {ext} iifname \"veth*\" goto {svc} comment \"short-circuit pod traffic\""),
        format!("add rule ip kube-proxy {ext} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""),
        format!("add rule ip kube-proxy {ext} fib saddr type local goto {svc} comment \"short-circuit local traffic\""),
        format!("add rule ip kube-proxy {ext} goto {local}"),
        "add element ip kube-proxy no-endpoint-services { 172.30.0.51 . tcp . 80 comment \"ns1/itp:p80\" : drop }".to_string(),
    ];
    for l in &expected_rules {
        assert!(
            got.contains(&l.as_str()) || tx.text.lines().any(|x| x == l),
            "missing {l}\n{}",
            got.join("\n")
        );
    }
    assert!(tx.text.contains(&format!(
        "add element ip kube-proxy service-nodeports {{ tcp . 3005 : goto {ext} }}"
    )));
    assert!(tx.text.contains(&format!("add rule ip kube-proxy {local} numgen random mod 1 vmap {{ 0 : goto endpoint-R3QUHIKQ-ns1/lb/tcp/p80__10.180.1.2/80 }}")));
    assert!(
        !tx.text.contains("service-ips { 172.30.0.51"),
        "iTP=Local without local endpoints is not served"
    );
    applied(&[&tx.text]);
}

mod traffic {
    use super::*;
    use crate::backend::nftables::tracer::{Packet, trace_packet};

    fn overall_table() -> Table {
        applied(&[&first_sync(&overall_model(), &golden_config()).text])
    }

    /// The fake node's addresses (upstream's test interfaces).
    fn node_ips() -> Vec<IpAddr> {
        ["127.0.0.1", "192.168.0.2", "192.168.1.2", "192.168.99.11"]
            .into_iter()
            .map(ip)
            .collect()
    }

    /// (name, source, destination, port, output, masquerade), as upstream's packet-flow
    /// tables.
    fn check(t: &Table, flows: &[(&str, &str, &str, u16, &str, bool)]) {
        for (name, src, dst, port, output, masq) in flows {
            let tr = trace_packet(t, &node_ips(), &Packet::tcp(ip(src), ip(dst), *port));
            assert_eq!(
                (tr.output(), tr.masquerade),
                (output.to_string(), *masq),
                "{name}: {:#?}",
                tr.matched_rules
            );
        }
    }

    #[test]
    fn overall_ruleset_packet_flows() {
        check(
            &overall_table(),
            &[
                (
                    "clusterIP from pod",
                    "10.0.0.2",
                    "172.30.0.41",
                    80,
                    "10.180.0.1:80",
                    false,
                ),
                (
                    "clusterIP from outside the pod CIDR",
                    "192.168.0.5",
                    "172.30.0.41",
                    80,
                    "10.180.0.1:80",
                    true,
                ),
                (
                    "hairpin: endpoint to itself",
                    "10.180.0.1",
                    "172.30.0.41",
                    80,
                    "10.180.0.1:80",
                    true,
                ),
                (
                    "clusterIP, wrong port",
                    "10.0.0.2",
                    "172.30.0.41",
                    81,
                    "REJECT",
                    false,
                ),
                (
                    "unallocated clusterIP",
                    "10.0.0.2",
                    "172.30.0.99",
                    80,
                    "DROP",
                    false,
                ),
                (
                    "no endpoints",
                    "10.0.0.2",
                    "172.30.0.46",
                    80,
                    "REJECT",
                    false,
                ),
                (
                    "eTP=Local LB without local endpoint, external source",
                    "203.0.113.1",
                    "1.2.3.4",
                    80,
                    "DROP",
                    false,
                ),
                (
                    "eTP=Local LB, pod source short-circuits",
                    "10.0.0.2",
                    "1.2.3.4",
                    80,
                    "10.180.0.2:80",
                    false,
                ),
                (
                    "eTP=Local LB, host source short-circuits and masquerades",
                    "192.168.0.2",
                    "1.2.3.4",
                    80,
                    "10.180.0.2:80",
                    true,
                ),
                (
                    "eTP=Local node port, external source",
                    "203.0.113.1",
                    "192.168.0.2",
                    3001,
                    "DROP",
                    false,
                ),
                (
                    "node port",
                    "203.0.113.1",
                    "192.168.0.2",
                    3003,
                    "10.180.0.3:80",
                    true,
                ),
                (
                    "node port on an address outside nodePortAddresses",
                    "203.0.113.1",
                    "192.168.1.2",
                    3003,
                    "",
                    false,
                ),
                (
                    "external IP, two endpoints",
                    "203.0.113.1",
                    "192.168.99.33",
                    80,
                    "10.180.0.4:80, 10.180.0.5:80",
                    true,
                ),
                (
                    "LB with source ranges, allowed source",
                    "203.0.113.1",
                    "5.6.7.8",
                    80,
                    "10.180.0.3:80",
                    true,
                ),
                (
                    "LB with source ranges, other source",
                    "203.0.113.200",
                    "5.6.7.8",
                    80,
                    "DROP",
                    false,
                ),
                (
                    "LB node port is not firewalled",
                    "203.0.113.200",
                    "192.168.0.2",
                    3002,
                    "10.180.0.3:80",
                    true,
                ),
            ],
        );
    }

    /// The large-cluster layout serves exactly what upstream's does.
    #[test]
    fn large_cluster_layout_packet_flows() {
        let cfg = RenderConfig {
            large_cluster_threshold: 0,
            ..golden_config()
        };
        let tx = first_sync(&overall_model(), &cfg);
        assert!(!tx.text.contains("vmap {"), "no anonymous map per service");
        check(
            &applied(&[&tx.text]),
            &[
                (
                    "clusterIP from pod",
                    "10.0.0.2",
                    "172.30.0.41",
                    80,
                    "10.180.0.1:80",
                    false,
                ),
                (
                    "external IP, two endpoints",
                    "203.0.113.1",
                    "192.168.99.33",
                    80,
                    "10.180.0.4:80, 10.180.0.5:80",
                    true,
                ),
                (
                    "affinity service",
                    "203.0.113.1",
                    "5.6.7.8",
                    80,
                    "10.180.0.3:80",
                    true,
                ),
                (
                    "no endpoints",
                    "10.0.0.2",
                    "172.30.0.46",
                    80,
                    "REJECT",
                    false,
                ),
            ],
        );
    }

    /// Match-all node ports: any local address but loopback.
    #[test]
    fn match_all_node_ports_flows() {
        let cfg = RenderConfig {
            node_ports: NodePortDestinations::AllLocal,
            ..golden_config()
        };
        let t = applied(&[&first_sync(&overall_model(), &cfg).text]);
        check(
            &t,
            &[
                (
                    "primary IP",
                    "203.0.113.1",
                    "192.168.0.2",
                    3003,
                    "10.180.0.3:80",
                    true,
                ),
                (
                    "secondary IP",
                    "203.0.113.1",
                    "192.168.1.2",
                    3003,
                    "10.180.0.3:80",
                    true,
                ),
                ("loopback", "127.0.0.1", "127.0.0.1", 3003, "", false),
                ("not local", "203.0.113.1", "192.168.5.5", 3003, "", false),
            ],
        );
    }
}

/// The large-cluster layout: one `numgen` rule per endpoint with upstream's odds, and a
/// partial sync crossing the threshold rewrites the policy chains and converges.
#[test]
fn large_cluster_layout_golden_and_switch() {
    let cfg = RenderConfig {
        large_cluster_threshold: 5,
        ..golden_config()
    };
    let m = overall_model();
    let tx = first_sync(&m, &cfg);
    let svc4: Vec<&str> = tx
        .text
        .lines()
        .filter(|l| l.starts_with("add rule ip kube-proxy service-LAUZTJTB"))
        .collect();
    assert_eq!(
        svc4,
        [
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 0 goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80",
        ]
    );
    // Below the threshold again (one service fewer): upstream's layout, by a partial sync.
    let mut small = overall_model();
    small.services.remove(&spn("ns6", "svc6"));
    let tx2 = build(&render(&small, &cfg), Prior::Known(&tx.next), false, false);
    assert!(tx2.text.contains("numgen random mod 2 vmap {"));
    let t = applied(&[&tx.text, &tx2.text]);
    assert_eq!(
        sort_transaction(&t.dump().join("\n")),
        sort_transaction(&applied(&[&first_sync(&small, &cfg).text]).dump().join("\n"))
    );
}

/// The blocks of the changed services' ports in `model`, in port order.
fn blocks_of(
    model: &ProxyModel,
    cfg: &RenderConfig,
    changed: &BTreeSet<ServiceName>,
) -> Vec<super::render::ServiceBlock> {
    let large = super::render::is_large(model, cfg);
    super::render::render_ports(model, cfg, large, |s| changed.contains(&s.name.service)).blocks
}

/// A partial sync that renders only the changed services writes exactly what the whole
/// build writes (the same text and the same record), in both layouts, for additions,
/// removals, endpoint and policy changes, and a destination two services claim.
#[test]
fn partial_build_equals_the_whole_build() {
    type Change = fn(&mut ProxyModel) -> &'static [&'static str];
    let changes: [Change; 6] = [
        |m| {
            let eps = m.endpoints.get_mut(&spn("ns1", "svc1")).unwrap();
            eps.push(ep("10.180.0.9", 80, false));
            &["ns1/svc1"]
        },
        |m| {
            m.services.remove(&spn("ns5", "svc5"));
            m.endpoints.remove(&spn("ns5", "svc5"));
            &["ns5/svc5"]
        },
        |m| {
            m.endpoints.remove(&spn("ns4", "svc4"));
            &["ns4/svc4"]
        },
        |m| {
            let s = m.services.get_mut(&spn("ns3", "svc3")).unwrap();
            s.node_port = 3009;
            s.session_affinity_timeout = Some(60);
            &["ns3/svc3"]
        },
        |m| {
            let mut s = port("ns7", "svc7", "172.30.0.47");
            s.external_ips = vec![ip("192.168.99.33")];
            m.services.insert(s.name.clone(), s);
            m.endpoints
                .insert(spn("ns7", "svc7"), vec![ep("10.180.0.7", 80, true)]);
            m.endpoints.remove(&spn("ns2", "svc2"));
            &["ns7/svc7", "ns2/svc2"]
        },
        |m| {
            m.services.remove(&spn("ns4", "svc4"));
            &["ns4/svc4", "ns9/gone"]
        },
    ];
    for threshold in [super::render::LARGE_CLUSTER_THRESHOLD, 0] {
        let cfg = RenderConfig {
            large_cluster_threshold: threshold,
            ..golden_config()
        };
        let mut m = overall_model();
        let mut record = first_sync(&m, &cfg).next;
        for (i, change) in changes.iter().enumerate() {
            let before = m.clone();
            let changed: BTreeSet<ServiceName> = change(&mut m)
                .iter()
                .map(|s| {
                    let (ns, name) = s.split_once('/').unwrap();
                    ServiceName::new(ns, name)
                })
                .collect();
            let whole = build(&render(&m, &cfg), Prior::Known(&record), false, false);
            let old: Vec<Owned> = blocks_of(&before, &cfg, &changed)
                .iter()
                .map(|b| Owned::of(&b.ops))
                .collect();
            let new = blocks_of(&m, &cfg, &changed);
            let part = build_partial(cfg.family, &old, &new, record.clone());
            assert!(!whole.text.is_empty(), "change {i} wrote nothing");
            assert_eq!(part.text, whole.text, "change {i}, threshold {threshold}");
            assert_eq!(part.next, whole.next, "change {i}, threshold {threshold}");
            assert_eq!(part.flushed_stale, whole.flushed_stale);
            record = whole.next;
        }
    }
}
