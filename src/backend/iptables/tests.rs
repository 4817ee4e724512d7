//! Golden and packet-flow tests ported from upstream's pkg/proxy/iptables/proxier_test.go
//! and number_generated_rules_test.go (conventions of upstream's NewFakeProxier: pod CIDR
//! 10.0.0.0/8, node IP 192.168.0.2, node name "test-node", mark 0x4000, nfacct counters
//! present, localhost node ports on).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::render::*;
use super::tracer::{Packet, trace_packet};
use crate::backend::netfilter::parse::{Dump, Rule};
use crate::model::{
    Cidr, Endpoint, Protocol, ProxyModel, ServiceName, ServicePort, ServicePortName, ServiceType,
    SourceRanges,
};

const TEST_NODE_NAME: &str = "test-node";
const TEST_NODE_IP: &str = "192.168.0.2";
const TEST_NODE_IP_ALT: &str = "192.168.1.2";
const TEST_EXTERNAL_IP: &str = "192.168.99.11";
const TEST_EXTERNAL_CLIENT: &str = "203.0.113.2";
const TEST_EXTERNAL_CLIENT_BLOCKED: &str = "203.0.113.130";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// upstream's testNodeIPs (IPv4 ones; the IPv6 ones never match IPv4 packets).
fn test_node_ips() -> Vec<IpAddr> {
    vec![ip(TEST_NODE_IP), ip(TEST_NODE_IP_ALT), ip(TEST_EXTERNAL_IP)]
}

fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
    ServicePortName::new(ns, name, port, Protocol::Tcp)
}

fn svc(ns: &str, name: &str, port_name: &str, cluster_ip: &str, port: u16) -> ServicePort {
    ServicePort::basic(spn(ns, name, port_name), ip(cluster_ip), port)
}

fn ep(addr: &str, port: u16) -> Endpoint {
    Endpoint::ready(ip(addr), port)
}

fn local(mut e: Endpoint) -> Endpoint {
    e.is_local = true;
    e
}

fn cond(mut e: Endpoint, ready: bool, serving: bool, terminating: bool) -> Endpoint {
    e.ready = ready;
    e.serving = serving;
    e.terminating = terminating;
    e
}

/// The fake proxier's configuration.
fn upstream_config() -> RenderConfig {
    RenderConfig {
        local_detector: LocalDetector::Cidr(cidr("10.0.0.0/8")),
        node_ips: vec![
            ip("127.0.0.1"),
            ip(TEST_NODE_IP),
            ip(TEST_NODE_IP_ALT),
            ip(TEST_EXTERNAL_IP),
        ],
        primary_node_ip: Some(ip(TEST_NODE_IP)),
        localhost_node_ports: true,
        nfacct_ct_state_invalid: true,
        nfacct_localhost_nodeports: true,
        ..RenderConfig::default()
    }
}

/// Builds a model the way the watch layer would: endpoints sorted by `ip:port` and
/// de-duplicated, node "test-node".
fn model(
    services: Vec<ServicePort>,
    endpoints: Vec<(ServicePortName, Vec<Endpoint>)>,
) -> ProxyModel {
    ProxyModel::for_tests(TEST_NODE_NAME, services, endpoints)
}

fn render_with(m: &ProxyModel, cfg: &RenderConfig) -> Rendered {
    let r = render(&RenderInput {
        model: m,
        config: cfg,
        scope: SyncScope::Full,
        existing_nat_chains: None,
    });
    if let Err(e) = check_rule_jumps(&r.text) {
        panic!("inconsistent full sync: {e}\n{}", r.text);
    }
    let dump = Dump::parse(&r.text).unwrap();
    assert_eq!(
        r.filter_rules,
        dump.rule_count("filter"),
        "filter rule count"
    );
    assert_eq!(r.nat_rules, dump.rule_count("nat"), "nat rule count");
    r
}

fn render_full(m: &ProxyModel) -> Rendered {
    render_with(m, &upstream_config())
}

/// The fake proxier uses mark "0x4000"; the real one writes `%#08x` ("0x00004000").
fn as_fake_mark(text: &str) -> String {
    text.replace("0x00004000", "0x4000")
}

fn dedent(s: &str) -> String {
    let mut out = String::new();
    for line in s.lines() {
        let t = line.trim();
        if !t.is_empty() {
            out.push_str(t);
            out.push('\n');
        }
    }
    out
}

// === upstream's sortIPTablesRules / assertIPTablesRulesEqual ===

fn comment_service(rule: &Rule) -> Option<&str> {
    let c = rule.comment.as_deref()?;
    Some(match c.find([' ', ':']) {
        Some(i) => &c[..i],
        None => c,
    })
}

fn by_service(a: &Rule, b: &Rule) -> bool {
    match (comment_service(a), comment_service(b)) {
        (Some(x), Some(y)) => x < y,
        _ => false,
    }
}

/// Stable insertion sort with a "less" predicate, like Go's sort.SliceStable.
fn stable_sort(rules: &mut [Rule], less: impl Fn(&Rule, &Rule) -> bool) {
    for i in 1..rules.len() {
        let mut j = i;
        while j > 0 && less(&rules[j], &rules[j - 1]) {
            rules.swap(j, j - 1);
            j -= 1;
        }
    }
}

fn is_last_rule(r: &Rule) -> bool {
    r.comment
        .as_deref()
        .is_some_and(|c| c.contains("must be the last rule"))
}

/// Sorts restore text so it does not depend on service order, keeping the order of
/// related rules (upstream `sortIPTablesRules`).
fn sort_rules(text: &str) -> String {
    let mut dump = Dump::parse(text).unwrap();
    dump.tables.sort_by(|a, b| a.name.cmp(&b.name));
    for t in &mut dump.tables {
        t.chains.sort_by_key(|c| {
            let rank = match c.name.as_str() {
                "KUBE-NODEPORTS" => 0,
                "KUBE-SERVICES" => 1,
                n if n.starts_with("KUBE-") => 2,
                _ => 3,
            };
            (rank, c.name.clone())
        });
    }
    for table in ["filter", "nat"] {
        if let Some(c) = dump.chain_mut(table, "KUBE-NODEPORTS") {
            stable_sort(&mut c.rules, by_service);
        }
    }
    if let Some(c) = dump.chain_mut("filter", "KUBE-SERVICES") {
        stable_sort(&mut c.rules, by_service);
    }
    if let Some(c) = dump.chain_mut("nat", "KUBE-SERVICES") {
        stable_sort(&mut c.rules, |a, b| {
            if is_last_rule(a) {
                false
            } else if is_last_rule(b) {
                true
            } else {
                by_service(a, b)
            }
        });
    }
    dump.to_string()
}

#[track_caller]
fn assert_rules_equal(expected: &str, rendered: &str) {
    let expected = dedent(expected);
    let got = sort_rules(&as_fake_mark(rendered));
    if expected != got {
        let exp: Vec<&str> = expected.lines().collect();
        let got_l: Vec<&str> = got.lines().collect();
        let mut diff = String::new();
        for l in &exp {
            if !got_l.contains(l) {
                diff.push_str(&format!("- {l}\n"));
            }
        }
        for l in &got_l {
            if !exp.contains(l) {
                diff.push_str(&format!("+ {l}\n"));
            }
        }
        panic!("rules differ:\n{diff}\nfull result:\n{got}");
    }
}

/// The rules of one chain, raw, one per line (upstream `assertIPTablesChainEqual`).
fn chain_text(rendered: &str, table: &str, chain: &str) -> String {
    let dump = Dump::parse(&as_fake_mark(rendered)).unwrap();
    dump.chain(table, chain)
        .map(|c| c.rules.iter().map(|r| format!("{}\n", r.raw)).collect())
        .unwrap_or_default()
}

/// upstream `checkIPTablesRuleJumps`: every jump goes to a created chain that has rules,
/// every rule goes into a created chain, and no created chain is unused.
fn check_rule_jumps(text: &str) -> Result<(), String> {
    let dump = Dump::parse(text).map_err(|e| e.to_string())?;
    const BUILTIN_TARGETS: [&str; 8] = [
        "ACCEPT",
        "REJECT",
        "DROP",
        "MARK",
        "RETURN",
        "DNAT",
        "SNAT",
        "MASQUERADE",
    ];
    const TOP_LEVEL: [&str; 8] = [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-FORWARD",
        "KUBE-MARK-MASQ",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ];
    for t in &dump.tables {
        let created: BTreeSet<&str> = t
            .chains
            .iter()
            .filter(|c| !c.deleted)
            .map(|c| c.name.as_str())
            .collect();
        let filled: BTreeSet<&str> = t
            .chains
            .iter()
            .filter(|c| !c.rules.is_empty())
            .map(|c| c.name.as_str())
            .collect();
        let jumped: BTreeSet<&str> = t
            .chains
            .iter()
            .flat_map(|c| c.rules.iter())
            .filter_map(|r| r.jump.as_deref())
            .filter(|j| !BUILTIN_TARGETS.contains(j))
            .collect();
        let missing: Vec<_> = jumped.difference(&created).collect();
        if !missing.is_empty() {
            return Err(format!(
                "{}: jumps to chains not created: {missing:?}",
                t.name
            ));
        }
        let empty: Vec<_> = jumped
            .difference(&filled)
            .filter(|c| **c != "KUBE-NODEPORTS")
            .collect();
        if !empty.is_empty() {
            return Err(format!(
                "{}: jumps to chains without rules: {empty:?}",
                t.name
            ));
        }
        let extra: Vec<_> = created
            .difference(&jumped)
            .filter(|c| !TOP_LEVEL.contains(c))
            .collect();
        if !extra.is_empty() {
            return Err(format!("{}: chains created but unused: {extra:?}", t.name));
        }
    }
    Ok(())
}

#[test]
fn check_rule_jumps_catches_each_kind_of_mistake() {
    let ok = "*filter\nCOMMIT\n*nat\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n-A KUBE-SERVICES -d 10.20.30.41 -j KUBE-SVC-X\n-A KUBE-SVC-X ! -s 10.0.0.0/24 -j KUBE-MARK-MASQ\nCOMMIT\n";
    assert!(check_rule_jumps(ok).is_ok());
    let not_created =
        "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n";
    assert!(
        check_rule_jumps(not_created)
            .unwrap_err()
            .contains("not created")
    );
    let no_rules = "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n";
    assert!(
        check_rule_jumps(no_rules)
            .unwrap_err()
            .contains("without rules")
    );
    let unused = "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-A KUBE-SERVICES -j ACCEPT\n-A KUBE-SVC-X -j ACCEPT\nCOMMIT\n";
    assert!(check_rule_jumps(unused).unwrap_err().contains("unused"));
}

// === TestOverallIPTablesRules ===

fn overall_model() -> ProxyModel {
    let s1 = svc("ns1", "svc1", "p80", "172.30.0.41", 80);

    let mut s2 = svc("ns2", "svc2", "p80", "172.30.0.42", 80);
    s2.service_type = ServiceType::LoadBalancer;
    s2.external_policy_local = true;
    s2.node_port = 3001;
    s2.load_balancer_ips = vec![ip("1.2.3.4")];
    s2.external_ips = vec![ip("192.168.99.22")];
    s2.health_check_node_port = 30000;

    let mut s3 = svc("ns3", "svc3", "p80", "172.30.0.43", 80);
    s3.service_type = ServiceType::NodePort;
    s3.node_port = 3003;

    let mut s4 = svc("ns4", "svc4", "p80", "172.30.0.44", 80);
    s4.service_type = ServiceType::NodePort;
    s4.external_ips = vec![ip("192.168.99.33")];

    let mut s5 = svc("ns5", "svc5", "p80", "172.30.0.45", 80);
    s5.service_type = ServiceType::LoadBalancer;
    s5.node_port = 3002;
    s5.load_balancer_ips = vec![ip("5.6.7.8")];
    s5.health_check_node_port = 30000;
    s5.source_ranges = SourceRanges::Only(vec![cidr("203.0.113.0/25")]);
    s5.session_affinity_timeout = Some(10800);

    let s6 = svc("ns6", "svc6", "p80", "172.30.0.46", 80);

    model(
        vec![s1, s2, s3, s4, s5, s6],
        vec![
            (spn("ns1", "svc1", "p80"), vec![ep("10.180.0.1", 80)]),
            (spn("ns2", "svc2", "p80"), vec![ep("10.180.0.2", 80)]),
            (spn("ns3", "svc3", "p80"), vec![ep("10.180.0.3", 80)]),
            (
                spn("ns4", "svc4", "p80"),
                vec![ep("10.180.0.4", 80), local(ep("10.180.0.5", 80))],
            ),
            (spn("ns5", "svc5", "p80"), vec![ep("10.180.0.3", 80)]),
        ],
    )
}

const OVERALL_EXPECTED: &str = r#"
    *filter
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    -A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
    -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
    COMMIT
    *nat
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-POSTROUTING - [0:0]
    :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
    :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
    :KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
    :KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
    :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
    :KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
    :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
    -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3003 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3002 -m nfacct --nfacct-name localhost_nps_accepted_pkts -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
    -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
    -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
    -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
    COMMIT
"#;

#[test]
fn overall_iptables_rules_match_upstream_golden() {
    let m = overall_model();
    let r = render_full(&m);
    assert_rules_equal(OVERALL_EXPECTED, &r.text);
    // The metric counts exactly the rules in the restore input.
    assert_eq!(r.nat_rules, Dump::parse(&r.text).unwrap().rule_count("nat"));
    assert_eq!(r.nat_rules, 55);
    assert_eq!(r.filter_rules, 10);
    assert_eq!(r.no_local_endpoints_external, 1);
    assert_eq!(r.no_local_endpoints_internal, 0);
    assert!(r.deleted_chains.is_empty() && !r.large_cluster);
    assert_eq!(
        r.health_check_node_ports,
        BTreeMap::from([(ServiceName::new("ns2", "svc2"), (30000, 0))])
    );
    let service_chains = Dump::parse(&r.text).unwrap().chain_names("nat");
    let service_chains = service_chains
        .iter()
        .filter(|c| crate::backend::netfilter::names::is_service_chain(c));
    assert_eq!(service_chains.count(), 16);
}

#[test]
fn exact_restore_text_keeps_upstream_write_order() {
    let m = model(
        vec![svc("ns1", "svc1", "p80", "172.30.0.41", 80)],
        vec![(spn("ns1", "svc1", "p80"), vec![ep("10.180.0.1", 80)])],
    );
    let r = render_full(&m);
    let expected = dedent(
        r#"
        *filter
        :KUBE-SERVICES - [0:0]
        :KUBE-EXTERNAL-SERVICES - [0:0]
        :KUBE-FORWARD - [0:0]
        :KUBE-NODEPORTS - [0:0]
        :KUBE-PROXY-FIREWALL - [0:0]
        :KUBE-FIREWALL - [0:0]
        -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
        -A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
        *nat
        :KUBE-SERVICES - [0:0]
        :KUBE-NODEPORTS - [0:0]
        :KUBE-POSTROUTING - [0:0]
        :KUBE-MARK-MASQ - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        -A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
        -A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
        -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
        -A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
        COMMIT
        "#,
    );
    assert_eq!(r.text, expected);
}

#[test]
fn masquerade_mark_follows_the_bit_like_go_percent_hash_08x() {
    let mut cfg = RenderConfig::default();
    assert_eq!(cfg.masquerade_mark(), "0x00004000");
    cfg.masquerade_bit = 0;
    assert_eq!(cfg.masquerade_mark(), "0x00000001");
    cfg.masquerade_bit = 31;
    assert_eq!(cfg.masquerade_mark(), "0x80000000");
    let r = render_with(&model(vec![], vec![]), &cfg);
    assert!(
        r.text
            .contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x80000000\n")
    );
    assert!(
        r.text
            .contains("! --mark 0x80000000/0x80000000 -j RETURN\n")
    );
}

#[test]
fn compute_probability_matches_go_formatting() {
    for (n, want) in [
        (1, "1.0000000000"),
        (2, "0.5000000000"),
        (3, "0.3333333333"),
        (10, "0.1000000000"),
        (100, "0.0100000000"),
        (1000, "0.0010000000"),
        (10000, "0.0001000000"),
        (100000, "0.0000100000"),
        (100001, "0.0000099999"),
    ] {
        assert_eq!(probability(n), want, "n={n}");
    }
    let mut prev = 0.0;
    for n in (2..=100_000).rev() {
        let p: f64 = probability(n).parse().unwrap();
        assert!(p > prev, "probability not increasing at {n}");
        prev = p;
    }
}

#[test]
fn probabilities_are_one_over_remaining_endpoints() {
    let eps: Vec<Endpoint> = (1..=3).map(|i| ep(&format!("10.180.0.{i}"), 80)).collect();
    let m = model(
        vec![svc("ns1", "svc1", "p80", "172.30.0.41", 80)],
        vec![(spn("ns1", "svc1", "p80"), eps)],
    );
    let r = render_full(&m);
    let svc_chain = chain_text(&r.text, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O");
    let probs: Vec<Option<String>> = Dump::parse(&format!(
        "*nat\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n{svc_chain}COMMIT\n"
    ))
    .unwrap()
    .chain("nat", "KUBE-SVC-XPGD46QRK7WJZT7O")
    .unwrap()
    .rules
    .iter()
    .filter(|r| {
        r.jump
            .as_deref()
            .is_some_and(|j| j.starts_with("KUBE-SEP-"))
    })
    .map(|r| r.probability.clone())
    .collect();
    assert_eq!(
        probs,
        [
            Some("0.3333333333".into()),
            Some("0.5000000000".into()),
            None
        ]
    );
}

// === packet flows ===

struct Flow {
    name: &'static str,
    src: &'static str,
    proto: Protocol,
    dst: &'static str,
    port: u16,
    output: String,
    masq: bool,
}

fn flow(
    name: &'static str,
    src: &'static str,
    dst: &'static str,
    port: u16,
    output: &str,
    masq: bool,
) -> Flow {
    Flow {
        name,
        src,
        proto: Protocol::Tcp,
        dst,
        port,
        output: output.to_string(),
        masq,
    }
}

#[track_caller]
fn run_flows(text: &str, flows: &[Flow]) {
    let dump = Dump::parse(text).unwrap();
    let mut errors = Vec::new();
    for f in flows {
        let pkt = Packet {
            source: ip(f.src),
            protocol: f.proto,
            destination: ip(f.dst),
            dport: f.port,
            in_interface: None,
        };
        let t = trace_packet(&dump, &test_node_ips(), &pkt);
        if t.output() != f.output || t.masquerade != f.masq {
            errors.push(format!(
                "{:?} {} -> {}:{}: got ({:?}, masq {}) want ({:?}, masq {})\n  matched:\n    {}",
                f.name,
                f.src,
                f.dst,
                f.port,
                t.output(),
                t.masquerade,
                f.output,
                f.masq,
                t.matched_rules.join("\n    ")
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

const TRACE_PACKET_RULES: &str = r#"
    *filter
    :INPUT - [0:0]
    :FORWARD - [0:0]
    :OUTPUT - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    -A INPUT -m comment --comment kubernetes health check service ports -j KUBE-NODEPORTS
    -A INPUT -m conntrack --ctstate NEW -m comment --comment kubernetes externally-visible service portals -j KUBE-EXTERNAL-SERVICES
    -A FORWARD -m comment --comment kubernetes forwarding rules -j KUBE-FORWARD
    -A FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes service portals -j KUBE-SERVICES
    -A FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes externally-visible service portals -j KUBE-EXTERNAL-SERVICES
    -A OUTPUT -m conntrack --ctstate NEW -m comment --comment kubernetes service portals -j KUBE-SERVICES
    -A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
    -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
    COMMIT
    *nat
    :PREROUTING - [0:0]
    :INPUT - [0:0]
    :OUTPUT - [0:0]
    :POSTROUTING - [0:0]
    :KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-NODEPORTS - [0:0]
    :KUBE-POSTROUTING - [0:0]
    :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
    :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
    :KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
    :KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
    :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
    :KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
    -A PREROUTING -m comment --comment kubernetes service portals -j KUBE-SERVICES
    -A OUTPUT -m comment --comment kubernetes service portals -j KUBE-SERVICES
    -A POSTROUTING -m comment --comment kubernetes postrouting rules -j KUBE-POSTROUTING
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
    -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
    -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
    -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
    -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
    COMMIT
"#;

#[test]
fn trace_packet_against_static_rules() {
    run_flows(
        TRACE_PACKET_RULES,
        &[
            flow("no match", "10.0.0.2", "10.0.0.3", 80, "", false),
            flow(
                "single endpoint",
                "10.0.0.2",
                "172.30.0.41",
                80,
                "10.180.0.1:80",
                false,
            ),
            flow(
                "multiple endpoints",
                "10.0.0.2",
                "172.30.0.44",
                80,
                "10.180.0.4:80, 10.180.0.5:80",
                false,
            ),
            flow(
                "LOCAL, KUBE-MARK-MASQ",
                TEST_NODE_IP,
                "192.168.99.22",
                80,
                "10.180.0.2:80",
                true,
            ),
            flow(
                "DROP",
                TEST_EXTERNAL_CLIENT,
                "192.168.99.22",
                80,
                "DROP",
                false,
            ),
            flow(
                "ACCEPT (NodePortHealthCheck)",
                TEST_NODE_IP,
                TEST_NODE_IP,
                30000,
                "ACCEPT",
                false,
            ),
            flow("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT", false),
        ],
    );
}

#[test]
fn overall_rules_packet_flows() {
    let r = render_full(&overall_model());
    run_flows(
        &r.text,
        &[
            flow(
                "pod to svc1",
                "10.0.0.2",
                "172.30.0.41",
                80,
                "10.180.0.1:80",
                false,
            ),
            flow(
                "external to eTP:Local svc2 external IP without local endpoints",
                TEST_EXTERNAL_CLIENT,
                "192.168.99.22",
                80,
                "DROP",
                false,
            ),
            flow(
                "pod to eTP:Local svc2 LB IP is short-circuited",
                "10.0.0.2",
                "1.2.3.4",
                80,
                "10.180.0.2:80",
                false,
            ),
            flow(
                "external to svc3 node port",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3003,
                "10.180.0.3:80",
                true,
            ),
            flow(
                "localhost to svc3 node port",
                "127.0.0.1",
                "127.0.0.1",
                3003,
                "10.180.0.3:80",
                true,
            ),
            flow(
                "external to svc4 external IP",
                TEST_EXTERNAL_CLIENT,
                "192.168.99.33",
                80,
                "10.180.0.4:80, 10.180.0.5:80",
                true,
            ),
            flow(
                "allowed source to svc5 LB",
                TEST_EXTERNAL_CLIENT,
                "5.6.7.8",
                80,
                "10.180.0.3:80",
                true,
            ),
            flow(
                "blocked source to svc5 LB",
                TEST_EXTERNAL_CLIENT_BLOCKED,
                "5.6.7.8",
                80,
                "DROP",
                false,
            ),
            flow(
                "svc6 has no endpoints",
                "10.0.0.2",
                "172.30.0.46",
                80,
                "REJECT",
                false,
            ),
            flow(
                "health check node port",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                30000,
                "ACCEPT",
                false,
            ),
        ],
    );
}

fn lb_service(ns: &str, name: &str, port_name: &str, cluster_ip: &str) -> ServicePort {
    let mut s = svc(ns, name, port_name, cluster_ip, 80);
    s.service_type = ServiceType::LoadBalancer;
    s
}

#[test]
fn no_endpoints_reject_everywhere() {
    let mut s = lb_service("ns1", "svc1", "p80", "172.30.0.41");
    s.external_ips = vec![ip("192.168.99.11")];
    s.node_port = 3001;
    s.load_balancer_ips = vec![ip("1.2.3.4")];
    let r = render_full(&model(vec![s], vec![]));
    assert!(!r.text.contains("KUBE-SVC-") && !r.text.contains("KUBE-EXT-"));
    assert_eq!(r.nat_rules, 5);
    run_flows(
        &r.text,
        &[
            flow(
                "pod to cluster IP with no endpoints",
                "10.0.0.2",
                "172.30.0.41",
                80,
                "REJECT",
                false,
            ),
            flow(
                "external to external IP with no endpoints",
                TEST_EXTERNAL_CLIENT,
                "192.168.99.11",
                80,
                "REJECT",
                false,
            ),
            flow(
                "pod to NodePort with no endpoints",
                "10.0.0.2",
                TEST_NODE_IP,
                3001,
                "REJECT",
                false,
            ),
            flow(
                "external to NodePort with no endpoints",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3001,
                "REJECT",
                false,
            ),
            flow(
                "pod to LoadBalancer IP with no endpoints",
                "10.0.0.2",
                "1.2.3.4",
                80,
                "REJECT",
                false,
            ),
            flow(
                "external to LoadBalancer IP with no endpoints",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                "REJECT",
                false,
            ),
        ],
    );
}

#[test]
fn cluster_ip_general() {
    let s1 = svc("ns1", "svc1", "http", "172.30.0.41", 80);
    let s2 = [
        ("http", Protocol::Tcp, 80u16, 80u16),
        ("https", Protocol::Tcp, 443, 8443),
        ("dns-udp", Protocol::Udp, 53, 53),
        ("dns-tcp", Protocol::Tcp, 53, 5353),
        ("dns-sctp", Protocol::Sctp, 53, 53),
    ];
    let mut services = vec![s1];
    let mut endpoints = vec![(
        spn("ns1", "svc1", "http"),
        vec![local(ep("10.180.0.1", 80))],
    )];
    for (port_name, proto, port, target) in s2 {
        let name = ServicePortName::new("ns2", "svc2", port_name, proto);
        services.push(ServicePort::basic(name.clone(), ip("172.30.0.42"), port));
        endpoints.push((
            name,
            vec![local(ep("10.180.0.1", target)), ep("10.180.2.1", target)],
        ));
    }
    let r = render_full(&model(services, endpoints));
    assert!(r.text.contains("-m sctp -p sctp -d 172.30.0.42 --dport 53"));
    let mut flows = vec![
        flow(
            "simple clusterIP",
            "10.180.0.2",
            "172.30.0.41",
            80,
            "10.180.0.1:80",
            false,
        ),
        flow(
            "hairpin to cluster IP",
            "10.180.0.1",
            "172.30.0.41",
            80,
            "10.180.0.1:80",
            true,
        ),
        flow(
            "clusterIP with multiple endpoints",
            "10.180.0.2",
            "172.30.0.42",
            80,
            "10.180.0.1:80, 10.180.2.1:80",
            false,
        ),
        flow(
            "clusterIP with TargetPort",
            "10.180.0.2",
            "172.30.0.42",
            443,
            "10.180.0.1:8443, 10.180.2.1:8443",
            false,
        ),
        flow(
            "same port (TCP)",
            "10.180.0.2",
            "172.30.0.42",
            53,
            "10.180.0.1:5353, 10.180.2.1:5353",
            false,
        ),
        flow(
            "same port (UDP)",
            "10.180.0.2",
            "172.30.0.42",
            53,
            "10.180.0.1:53, 10.180.2.1:53",
            false,
        ),
        flow(
            "same port (SCTP)",
            "10.180.0.2",
            "172.30.0.42",
            53,
            "10.180.0.1:53, 10.180.2.1:53",
            false,
        ),
        flow(
            "TCP-only port does not match UDP traffic",
            "10.180.0.2",
            "172.30.0.42",
            80,
            "",
            false,
        ),
        flow(
            "svc1 does not accept svc2's ports",
            "10.180.0.2",
            "172.30.0.41",
            443,
            "",
            false,
        ),
    ];
    flows[5].proto = Protocol::Udp;
    flows[6].proto = Protocol::Sctp;
    flows[7].proto = Protocol::Udp;
    run_flows(&r.text, &flows);
}

#[test]
fn load_balancer_source_ranges() {
    let mut s = lb_service("ns1", "svc1", "p80", "172.30.0.41");
    s.node_port = 3001;
    s.load_balancer_ips = vec![ip("1.2.3.4"), ip("5.6.7.8")];
    s.source_ranges = SourceRanges::Only(vec![cidr("192.168.0.0/24"), cidr("203.0.113.0/25")]);
    let m = model(
        vec![s],
        vec![(spn("ns1", "svc1", "p80"), vec![ep("10.180.0.1", 80)])],
    );
    let r = render_full(&m);
    // The node IP is inside a source range, so the LB IPs are admitted as sources too.
    assert_eq!(
        chain_text(&r.text, "nat", "KUBE-FW-XPGD46QRK7WJZT7O"),
        dedent(
            r#"
            -A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 192.168.0.0/24 -j KUBE-EXT-XPGD46QRK7WJZT7O
            -A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O
            -A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 1.2.3.4 -j KUBE-EXT-XPGD46QRK7WJZT7O
            -A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 5.6.7.8 -j KUBE-EXT-XPGD46QRK7WJZT7O
            -A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"
            "#
        )
    );
    let out = "10.180.0.1:80";
    run_flows(
        &r.text,
        &[
            flow(
                "pod to cluster IP",
                "10.0.0.2",
                "172.30.0.41",
                80,
                out,
                false,
            ),
            flow(
                "external to nodePort",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3001,
                out,
                true,
            ),
            flow(
                "nodePort bypasses LoadBalancerSourceRanges",
                TEST_EXTERNAL_CLIENT_BLOCKED,
                TEST_NODE_IP,
                3001,
                out,
                true,
            ),
            flow(
                "accepted external to LB1",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                out,
                true,
            ),
            flow(
                "accepted external to LB2",
                TEST_EXTERNAL_CLIENT,
                "5.6.7.8",
                80,
                out,
                true,
            ),
            flow(
                "blocked external to LB1",
                TEST_EXTERNAL_CLIENT_BLOCKED,
                "1.2.3.4",
                80,
                "DROP",
                false,
            ),
            flow(
                "blocked external to LB2",
                TEST_EXTERNAL_CLIENT_BLOCKED,
                "5.6.7.8",
                80,
                "DROP",
                false,
            ),
            flow(
                "pod to LB1 (blocked by LoadBalancerSourceRanges)",
                "10.0.0.2",
                "1.2.3.4",
                80,
                "DROP",
                false,
            ),
            flow(
                "pod to LB2 (blocked by LoadBalancerSourceRanges)",
                "10.0.0.2",
                "5.6.7.8",
                80,
                "DROP",
                false,
            ),
            flow(
                "node to LB1 (allowed by LoadBalancerSourceRanges)",
                TEST_NODE_IP,
                "1.2.3.4",
                80,
                out,
                true,
            ),
            flow(
                "node to LB2 (allowed by LoadBalancerSourceRanges)",
                TEST_NODE_IP,
                "5.6.7.8",
                80,
                out,
                true,
            ),
            flow(
                "same node to LB1, SNATted to LB1 (implicitly allowed)",
                "1.2.3.4",
                "1.2.3.4",
                80,
                out,
                true,
            ),
            flow(
                "same node to LB2, SNATted to LB2 (implicitly allowed)",
                "5.6.7.8",
                "5.6.7.8",
                80,
                out,
                true,
            ),
        ],
    );
}

#[test]
fn node_ports_with_localhost_and_node_port_addresses() {
    struct Case {
        name: &'static str,
        localhost: bool,
        addresses: Option<Vec<Cidr>>,
        allow_alt_node_ip: bool,
        expect_firewall: bool,
    }
    let cases = [
        Case {
            name: "localhost-nodeports enabled",
            localhost: true,
            addresses: None,
            allow_alt_node_ip: true,
            expect_firewall: true,
        },
        Case {
            name: "localhost-nodeports disabled",
            localhost: false,
            addresses: None,
            allow_alt_node_ip: true,
            expect_firewall: false,
        },
        Case {
            name: "localhost-nodeports disabled, localhost in nodeport-addresses",
            localhost: false,
            addresses: Some(vec![cidr("192.168.0.0/24"), cidr("127.0.0.1/32")]),
            allow_alt_node_ip: false,
            expect_firewall: false,
        },
        Case {
            name: "multiple nodeport-addresses",
            localhost: false,
            addresses: Some(vec![
                cidr("192.168.0.0/24"),
                cidr("192.168.1.0/24"),
                cidr("2001:db8::/64"),
            ]),
            allow_alt_node_ip: true,
            expect_firewall: false,
        },
    ];
    for c in cases {
        let mut cfg = upstream_config();
        cfg.localhost_node_ports = c.localhost;
        cfg.node_port_addresses = c.addresses.clone();
        let mut s = svc("ns1", "svc1", "p80", "172.30.0.41", 80);
        s.service_type = ServiceType::NodePort;
        s.node_port = 3001;
        let m = model(
            vec![s],
            vec![(
                spn("ns1", "svc1", "p80"),
                vec![ep("10.180.0.1", 80), local(ep("10.180.2.1", 80))],
            )],
        );
        let r = render_with(&m, &cfg);
        let out = "10.180.0.1:80, 10.180.2.1:80";
        let mut flows = vec![
            flow(
                "pod to cluster IP",
                "10.0.0.2",
                "172.30.0.41",
                80,
                out,
                false,
            ),
            flow(
                "external to nodePort",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3001,
                out,
                true,
            ),
            flow(
                "node to nodePort",
                TEST_NODE_IP,
                TEST_NODE_IP,
                3001,
                out,
                true,
            ),
        ];
        if c.localhost {
            flows.push(flow(
                "localhost to nodePort gets masqueraded",
                "127.0.0.1",
                "127.0.0.1",
                3001,
                out,
                true,
            ));
        } else {
            flows.push(flow(
                "localhost to nodePort is ignored",
                "127.0.0.1",
                "127.0.0.1",
                3001,
                "",
                false,
            ));
        }
        if c.allow_alt_node_ip {
            flows.push(flow(
                "external to nodePort on secondary IP",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP_ALT,
                3001,
                out,
                true,
            ));
        } else {
            flows.push(flow(
                "secondary nodeIP ignores NodePorts",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP_ALT,
                3001,
                "",
                false,
            ));
        }
        run_flows(&r.text, &flows);
        let expected = if c.expect_firewall {
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"
        } else {
            ""
        };
        assert_eq!(
            chain_text(&r.text, "filter", "KUBE-FIREWALL"),
            expected,
            "{}",
            c.name
        );
    }
}

#[test]
fn node_port_addresses_expand_to_one_rule_per_node_ip() {
    let mut cfg = upstream_config();
    cfg.node_port_addresses = Some(vec![cidr("192.168.0.0/16"), cidr("2001:db8::/64")]);
    let r = render_with(&model(vec![], vec![]), &cfg);
    let c = "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    assert_eq!(
        chain_text(&r.text, "nat", "KUBE-SERVICES"),
        format!(
            "-A KUBE-SERVICES -m comment --comment {c} -d 192.168.0.2 -j KUBE-NODEPORTS\n\
             -A KUBE-SERVICES -m comment --comment {c} -d 192.168.1.2 -j KUBE-NODEPORTS\n\
             -A KUBE-SERVICES -m comment --comment {c} -d 192.168.99.11 -j KUBE-NODEPORTS\n"
        )
    );
    // 127.0.0.0/8 is excluded by the addresses, so localhost node ports are off.
    assert!(!cfg.effective_localhost_node_ports());
    assert!(!r.text.contains("KUBE-FIREWALL"));

    // Loopback listed explicitly: kept only while localhost node ports are enabled.
    cfg.node_port_addresses = Some(vec![cidr("127.0.0.0/8")]);
    let r = render_with(&model(vec![], vec![]), &cfg);
    assert!(
        r.text
            .contains(&format!("--comment {c} -d 127.0.0.1 -j KUBE-NODEPORTS"))
    );
    cfg.localhost_node_ports = false;
    let r = render_with(&model(vec![], vec![]), &cfg);
    assert!(!r.text.contains("-j KUBE-NODEPORTS"));

    // 0.0.0.0/0 means all local addresses; IPv6-only lists fall back to it too.
    for addrs in [
        vec![cidr("0.0.0.0/0"), cidr("192.168.0.0/24")],
        vec![cidr("2001:db8::/64")],
    ] {
        cfg.node_port_addresses = Some(addrs);
        assert_eq!(cfg.node_port_destinations(), NodePortDestinations::AllLocal);
        let r = render_with(&model(vec![], vec![]), &cfg);
        assert!(r.text.contains(&format!(
            "--comment {c} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"
        )));
    }
}

#[test]
fn health_check_node_port_is_accepted_while_the_service_exists() {
    let mut cfg = upstream_config();
    cfg.node_port_addresses = Some(vec![cidr("127.0.0.0/8")]);
    let mut s = lb_service("ns1", "svc1", "p80", "172.30.0.42");
    s.node_port = 3001;
    s.health_check_node_port = 30000;
    s.external_policy_local = true;
    let r = render_with(&model(vec![s.clone()], vec![]), &cfg);
    run_flows(
        &r.text,
        &[flow(
            "firewall accepts HealthCheckNodePort",
            "1.2.3.4",
            TEST_NODE_IP,
            30000,
            "ACCEPT",
            false,
        )],
    );
    assert_eq!(
        r.health_check_node_ports,
        BTreeMap::from([(ServiceName::new("ns1", "svc1"), (30000, 0))])
    );
    let r = render_with(&model(vec![], vec![]), &cfg);
    run_flows(
        &r.text,
        &[flow(
            "HealthCheckNodePort no longer has any rule",
            "1.2.3.4",
            TEST_NODE_IP,
            30000,
            "",
            false,
        )],
    );

    // Only LoadBalancer services with eTP=Local have a health check port.
    s.external_policy_local = false;
    let r = render_with(&model(vec![s.clone()], vec![]), &cfg);
    assert!(!r.text.contains("health check node port") && r.health_check_node_ports.is_empty());
    s.external_policy_local = true;
    s.service_type = ServiceType::NodePort;
    let r = render_with(&model(vec![s], vec![]), &cfg);
    assert!(!r.text.contains("health check node port") && r.health_check_node_ports.is_empty());
}

#[test]
fn health_check_counts_distinct_local_ready_endpoint_ips() {
    let mut a = lb_service("ns1", "svc1", "p80", "172.30.0.42");
    a.external_policy_local = true;
    a.node_port = 3001;
    a.health_check_node_port = 30000;
    let mut b = a.clone();
    b.name = spn("ns1", "svc1", "p443");
    b.port = 443;
    let m = model(
        vec![a, b],
        vec![
            (
                spn("ns1", "svc1", "p80"),
                vec![
                    local(ep("10.0.1.1", 80)),
                    local(ep("10.0.1.2", 80)),
                    ep("10.0.1.3", 80),
                    cond(local(ep("10.0.1.4", 80)), false, true, true),
                ],
            ),
            (spn("ns1", "svc1", "p443"), vec![local(ep("10.0.1.1", 443))]),
        ],
    );
    let r = render_full(&m);
    assert_eq!(
        r.health_check_node_ports,
        BTreeMap::from([(ServiceName::new("ns1", "svc1"), (30000, 2))])
    );
    // One ACCEPT per service port, like upstream.
    assert_eq!(
        chain_text(&r.text, "filter", "KUBE-NODEPORTS")
            .lines()
            .count(),
        2
    );
}

#[test]
fn drop_invalid_rule_variants() {
    let rest = "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
                -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
    for (nfacct, liberal, drop) in [
        (
            false,
            false,
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        ),
        (
            true,
            false,
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n",
        ),
        (false, true, ""),
    ] {
        let mut cfg = upstream_config();
        cfg.nfacct_ct_state_invalid = nfacct;
        cfg.conntrack_tcp_be_liberal = liberal;
        let r = render_with(&model(vec![], vec![]), &cfg);
        assert_eq!(
            chain_text(&r.text, "filter", "KUBE-FORWARD"),
            format!("{drop}{rest}")
        );
    }
}

#[test]
fn masquerade_rule_variants() {
    let base = "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n";
    let masq =
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j";
    for (random_fully, snat, node_ip, target) in [
        (false, false, TEST_NODE_IP, "MASQUERADE"),
        (true, false, TEST_NODE_IP, "MASQUERADE --random-fully"),
        (false, true, TEST_NODE_IP, "SNAT --to-source 192.168.0.2"),
        (
            true,
            true,
            TEST_NODE_IP,
            "SNAT --to-source 192.168.0.2 --random-fully",
        ),
        (false, true, "127.0.0.1", "MASQUERADE"),
    ] {
        let mut cfg = upstream_config();
        cfg.random_fully = random_fully;
        cfg.snat_to_node_ip = snat;
        cfg.primary_node_ip = Some(ip(node_ip));
        let r = render_with(&model(vec![], vec![]), &cfg);
        assert_eq!(
            chain_text(&r.text, "nat", "KUBE-POSTROUTING"),
            format!("{base}{masq} {target}\n")
        );
    }
}

fn etp_service(local_policy: bool) -> ServicePort {
    let mut s = lb_service("ns1", "svc1", "p80", "172.30.0.41");
    s.external_ips = vec![ip("192.168.99.11")];
    s.node_port = 3001;
    s.load_balancer_ips = vec![ip("1.2.3.4")];
    if local_policy {
        s.external_policy_local = true;
        s.health_check_node_port = 30000;
    }
    s
}

#[test]
fn external_traffic_policy_local() {
    let m = model(
        vec![etp_service(true)],
        vec![(
            spn("ns1", "svc1", "p80"),
            vec![ep("10.180.0.1", 80), local(ep("10.180.2.1", 80))],
        )],
    );
    let r = render_full(&m);
    let both = "10.180.0.1:80, 10.180.2.1:80";
    let only_local = "10.180.2.1:80";
    run_flows(
        &r.text,
        &[
            flow(
                "pod to cluster IP hits both endpoints, unmasqueraded",
                "10.0.0.2",
                "172.30.0.41",
                80,
                both,
                false,
            ),
            flow(
                "pod to external IP hits both endpoints, unmasqueraded",
                "10.0.0.2",
                "192.168.99.11",
                80,
                both,
                false,
            ),
            flow(
                "external to external IP hits only local endpoint, unmasqueraded",
                TEST_EXTERNAL_CLIENT,
                "192.168.99.11",
                80,
                only_local,
                false,
            ),
            flow(
                "pod to LB IP hits only both endpoints, unmasqueraded",
                "10.0.0.2",
                "1.2.3.4",
                80,
                both,
                false,
            ),
            flow(
                "external to LB IP hits only local endpoint, unmasqueraded",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                only_local,
                false,
            ),
            flow(
                "pod to NodePort hits both endpoints, unmasqueraded",
                "10.0.0.2",
                TEST_NODE_IP,
                3001,
                both,
                false,
            ),
            flow(
                "external to NodePort hits only local endpoint, unmasqueraded",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3001,
                only_local,
                false,
            ),
        ],
    );
    assert_eq!(
        chain_text(&r.text, "nat", "KUBE-EXT-XPGD46QRK7WJZT7O"),
        dedent(
            r#"
            -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-XPGD46QRK7WJZT7O
            -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
            -A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O
            -A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O
            "#
        )
    );
    assert_eq!(
        chain_text(&r.text, "nat", "KUBE-SVL-XPGD46QRK7WJZT7O"),
        "-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.2.1:80\" -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ\n"
    );
    assert_eq!(r.no_local_endpoints_external, 0);
    assert_eq!(
        r.health_check_node_ports,
        BTreeMap::from([(ServiceName::new("ns1", "svc1"), (30000, 1))])
    );
}

#[test]
fn external_traffic_policy_local_without_local_endpoints() {
    let m = model(
        vec![etp_service(true)],
        vec![(spn("ns1", "svc1", "p80"), vec![ep("10.180.0.1", 80)])],
    );
    let r = render_full(&m);
    assert!(
        !r.text.contains("KUBE-SVL-"),
        "no local endpoints, no SVL chain"
    );
    assert_eq!(r.no_local_endpoints_external, 1);
    assert_eq!(
        chain_text(&r.text, "filter", "KUBE-EXTERNAL-SERVICES"),
        dedent(
            r#"
            -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.11 --dport 80 -j DROP
            -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
            -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
            "#
        )
    );
    run_flows(
        &r.text,
        &[
            flow(
                "external to LB is dropped",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                "DROP",
                false,
            ),
            flow(
                "external to NodePort is dropped",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3001,
                "DROP",
                false,
            ),
            flow(
                "pod to LB is short-circuited",
                "10.0.0.2",
                "1.2.3.4",
                80,
                "10.180.0.1:80",
                false,
            ),
            flow(
                "node to LB is short-circuited and masqueraded",
                TEST_NODE_IP,
                "1.2.3.4",
                80,
                "10.180.0.1:80",
                true,
            ),
            flow(
                "cluster IP still works",
                "10.0.0.2",
                "172.30.0.41",
                80,
                "10.180.0.1:80",
                false,
            ),
        ],
    );
}

#[test]
fn external_traffic_policy_cluster() {
    let m = model(
        vec![etp_service(false)],
        vec![(
            spn("ns1", "svc1", "p80"),
            vec![ep("10.180.0.1", 80), local(ep("10.180.2.1", 80))],
        )],
    );
    let r = render_full(&m);
    let both = "10.180.0.1:80, 10.180.2.1:80";
    run_flows(
        &r.text,
        &[
            flow(
                "pod to cluster IP hits both endpoints, unmasqueraded",
                "10.0.0.2",
                "172.30.0.41",
                80,
                both,
                false,
            ),
            flow(
                "pod to external IP hits both endpoints, masqueraded",
                "10.0.0.2",
                "192.168.99.11",
                80,
                both,
                true,
            ),
            flow(
                "external to external IP hits both endpoints, masqueraded",
                TEST_EXTERNAL_CLIENT,
                "192.168.99.11",
                80,
                both,
                true,
            ),
            flow(
                "pod to LB IP hits both endpoints, masqueraded",
                "10.0.0.2",
                "1.2.3.4",
                80,
                both,
                true,
            ),
            flow(
                "external to LB IP hits both endpoints, masqueraded",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                both,
                true,
            ),
            flow(
                "pod to NodePort hits both endpoints, masqueraded",
                "10.0.0.2",
                TEST_NODE_IP,
                3001,
                both,
                true,
            ),
            flow(
                "external to NodePort hits both endpoints, masqueraded",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3001,
                both,
                true,
            ),
        ],
    );
    assert!(r.health_check_node_ports.is_empty());
}

fn terminating_service(local_policy: bool) -> ServicePort {
    let mut s = lb_service("ns1", "svc1", "", "172.30.1.1");
    s.load_balancer_ips = vec![ip("1.2.3.4")];
    s.health_check_node_port = 30000;
    s.external_policy_local = local_policy;
    s
}

fn run_terminating_cases(local_policy: bool, cases: Vec<(&str, Vec<Endpoint>, &str, &str, bool)>) {
    let name = spn("ns1", "svc1", "");
    for (case, eps, to_cluster_ip, to_lb, lb_masq) in cases {
        let m = model(
            vec![terminating_service(local_policy)],
            vec![(name.clone(), eps)],
        );
        let r = render_full(&m);
        let flows = [
            flow(
                "pod to clusterIP",
                "10.0.0.2",
                "172.30.1.1",
                80,
                to_cluster_ip,
                false,
            ),
            flow(
                "external to LB",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                to_lb,
                lb_masq,
            ),
        ];
        let dump = Dump::parse(&r.text).unwrap();
        for f in &flows {
            let t = trace_packet(
                &dump,
                &test_node_ips(),
                &Packet::tcp(ip(f.src), ip(f.dst), f.port),
            );
            assert_eq!(
                (t.output(), t.masquerade),
                (f.output.clone(), f.masq),
                "{case}: {}",
                f.name
            );
        }
        // Endpoints deleted: everything is rejected.
        let r = render_full(&model(vec![terminating_service(local_policy)], vec![]));
        run_flows(
            &r.text,
            &[
                flow(
                    "pod to clusterIP after endpoints deleted",
                    "10.0.0.2",
                    "172.30.1.1",
                    80,
                    "REJECT",
                    false,
                ),
                flow(
                    "external to LB after endpoints deleted",
                    TEST_EXTERNAL_CLIENT,
                    "1.2.3.4",
                    80,
                    "REJECT",
                    false,
                ),
            ],
        );
    }
}

#[test]
fn terminating_endpoints_traffic_policy_local() {
    let e = |a: &str| ep(a, 80);
    run_terminating_cases(
        true,
        vec![
            (
                "ready endpoints exist",
                vec![
                    local(e("10.0.1.1")),
                    local(e("10.0.1.2")),
                    cond(local(e("10.0.1.3")), false, true, true),
                    cond(local(e("10.0.1.4")), false, false, true),
                    e("10.0.1.5"),
                ],
                "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                "10.0.1.1:80, 10.0.1.2:80",
                false,
            ),
            (
                "only terminating endpoints exist",
                vec![
                    cond(local(e("10.0.1.2")), false, true, true),
                    cond(local(e("10.0.1.3")), false, true, true),
                    cond(local(e("10.0.1.4")), false, false, true),
                    e("10.0.1.5"),
                ],
                "10.0.1.5:80",
                "10.0.1.2:80, 10.0.1.3:80",
                false,
            ),
            (
                "terminating endpoints on remote node",
                vec![cond(e("10.0.1.5"), false, true, true)],
                "10.0.1.5:80",
                "DROP",
                false,
            ),
            (
                "no usable endpoints on any node",
                vec![cond(local(e("10.0.1.5")), false, false, true)],
                "REJECT",
                "REJECT",
                false,
            ),
        ],
    );
}

#[test]
fn terminating_endpoints_traffic_policy_cluster() {
    let e = |a: &str| ep(a, 80);
    run_terminating_cases(
        false,
        vec![
            (
                "ready endpoints exist",
                vec![
                    local(e("10.0.1.1")),
                    local(e("10.0.1.2")),
                    cond(e("10.0.1.3"), false, true, true),
                    cond(e("10.0.1.4"), false, false, true),
                    e("10.0.1.5"),
                ],
                "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                true,
            ),
            (
                "only terminating endpoints exist",
                vec![
                    cond(local(e("10.0.1.2")), false, true, true),
                    cond(local(e("10.0.1.3")), false, true, true),
                    cond(e("10.0.1.4"), false, false, true),
                    cond(e("10.0.1.5"), false, true, true),
                ],
                "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
                "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
                true,
            ),
            (
                "terminating endpoints on remote node",
                vec![cond(e("10.0.1.5"), false, true, true)],
                "10.0.1.5:80",
                "10.0.1.5:80",
                true,
            ),
            (
                "no usable endpoints on any node",
                vec![cond(local(e("10.0.1.5")), false, false, true)],
                "REJECT",
                "REJECT",
                false,
            ),
        ],
    );
}

#[test]
fn internal_traffic_policy() {
    let name = spn("ns1", "svc1", "");
    let cases: [(&str, bool, Vec<Endpoint>, &str); 4] = [
        (
            "cluster",
            false,
            vec![
                local(ep("10.0.1.1", 80)),
                ep("10.0.1.2", 80),
                ep("10.0.1.3", 80),
            ],
            "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80",
        ),
        (
            "local, one local endpoint",
            true,
            vec![
                local(ep("10.0.1.1", 80)),
                ep("10.0.1.2", 80),
                ep("10.0.1.3", 80),
            ],
            "10.0.1.1:80",
        ),
        (
            "local, two local endpoints",
            true,
            vec![
                local(ep("10.0.1.1", 80)),
                local(ep("10.0.1.2", 80)),
                ep("10.0.1.3", 80),
            ],
            "10.0.1.1:80, 10.0.1.2:80",
        ),
        (
            "local, no local endpoints",
            true,
            vec![ep("10.0.1.1", 80), ep("10.0.1.2", 80), ep("10.0.1.3", 80)],
            "DROP",
        ),
    ];
    for (case, itp_local, eps, out) in cases {
        let mut s = svc("ns1", "svc1", "", "172.30.1.1", 80);
        s.internal_policy_local = itp_local;
        let r = render_full(&model(vec![s.clone()], vec![(name.clone(), eps)]));
        let dump = Dump::parse(&r.text).unwrap();
        let t = trace_packet(
            &dump,
            &test_node_ips(),
            &Packet::tcp(ip("10.0.0.2"), ip("172.30.1.1"), 80),
        );
        assert_eq!(
            (t.output(), t.masquerade),
            (out.to_string(), false),
            "{case}"
        );
        assert_eq!(
            r.no_local_endpoints_internal,
            usize::from(out == "DROP"),
            "{case}"
        );
        if out == "DROP" {
            assert!(r.text.contains("-A KUBE-SERVICES -m comment --comment \"ns1/svc1 has no local endpoints\" -m tcp -p tcp -d 172.30.1.1 --dport 80 -j DROP\n"));
            assert!(!r.text.contains("KUBE-SEP-"));
        }
        if itp_local && out != "DROP" {
            // Cluster IP goes straight to the SVL chain, which carries the masquerade rule.
            assert!(r.text.contains("-j KUBE-SVL-"));
            assert!(!r.text.contains("KUBE-SVC-"));
        }
        let r = render_full(&model(vec![s], vec![]));
        run_flows(
            &r.text,
            &[flow(
                "endpoints deleted",
                "10.0.0.2",
                "172.30.1.1",
                80,
                "REJECT",
                false,
            )],
        );
    }
}

#[test]
fn internal_external_masquerade() {
    let mut s1 = lb_service("ns1", "svc1", "p80", "172.30.0.41");
    s1.node_port = 3001;
    s1.health_check_node_port = 30001;
    s1.load_balancer_ips = vec![ip("1.2.3.4")];
    let mut s2 = lb_service("ns2", "svc2", "p80", "172.30.0.42");
    s2.node_port = 3002;
    s2.health_check_node_port = 30002;
    s2.external_policy_local = true;
    s2.load_balancer_ips = vec![ip("5.6.7.8")];
    let mut s3 = lb_service("ns3", "svc3", "p80", "172.30.0.43");
    s3.node_port = 3003;
    s3.health_check_node_port = 30003;
    s3.internal_policy_local = true;
    s3.load_balancer_ips = vec![ip("9.10.11.12")];
    let m = model(
        vec![s1, s2, s3],
        (1..=3)
            .map(|i| {
                let name = spn(&format!("ns{i}"), &format!("svc{i}"), "p80");
                (
                    name,
                    vec![
                        local(ep(&format!("10.180.0.{i}"), 80)),
                        ep(&format!("10.180.1.{i}"), 80),
                    ],
                )
            })
            .collect(),
    );

    let all1 = "10.180.0.1:80, 10.180.1.1:80";
    let all2 = "10.180.0.2:80, 10.180.1.2:80";
    let all3 = "10.180.0.3:80, 10.180.1.3:80";
    let base = [
        (
            "pod to ClusterIP",
            "10.0.0.2",
            "172.30.0.41",
            80,
            all1,
            false,
        ),
        (
            "pod to NodePort",
            "10.0.0.2",
            TEST_NODE_IP,
            3001,
            all1,
            true,
        ),
        ("pod to LB", "10.0.0.2", "1.2.3.4", 80, all1, true),
        (
            "node to ClusterIP",
            TEST_NODE_IP,
            "172.30.0.41",
            80,
            all1,
            true,
        ),
        (
            "node to NodePort",
            TEST_NODE_IP,
            TEST_NODE_IP,
            3001,
            all1,
            true,
        ),
        (
            "localhost to NodePort",
            "127.0.0.1",
            "127.0.0.1",
            3001,
            all1,
            true,
        ),
        ("node to LB", TEST_NODE_IP, "1.2.3.4", 80, all1, true),
        (
            "external to ClusterIP",
            TEST_EXTERNAL_CLIENT,
            "172.30.0.41",
            80,
            all1,
            true,
        ),
        (
            "external to NodePort",
            TEST_EXTERNAL_CLIENT,
            TEST_NODE_IP,
            3001,
            all1,
            true,
        ),
        (
            "external to LB",
            TEST_EXTERNAL_CLIENT,
            "1.2.3.4",
            80,
            all1,
            true,
        ),
        (
            "pod to ClusterIP with eTP:Local",
            "10.0.0.2",
            "172.30.0.42",
            80,
            all2,
            false,
        ),
        (
            "pod to NodePort with eTP:Local",
            "10.0.0.2",
            TEST_NODE_IP,
            3002,
            all2,
            false,
        ),
        (
            "pod to LB with eTP:Local",
            "10.0.0.2",
            "5.6.7.8",
            80,
            all2,
            false,
        ),
        (
            "node to ClusterIP with eTP:Local",
            TEST_NODE_IP,
            "172.30.0.42",
            80,
            all2,
            true,
        ),
        (
            "node to NodePort with eTP:Local",
            TEST_NODE_IP,
            TEST_NODE_IP,
            3001,
            all1,
            true,
        ),
        (
            "localhost to NodePort with eTP:Local",
            "127.0.0.1",
            "127.0.0.1",
            3002,
            all2,
            true,
        ),
        (
            "node to LB with eTP:Local",
            TEST_NODE_IP,
            "5.6.7.8",
            80,
            all2,
            true,
        ),
        (
            "external to ClusterIP with eTP:Local",
            TEST_EXTERNAL_CLIENT,
            "172.30.0.42",
            80,
            all2,
            true,
        ),
        (
            "external to NodePort with eTP:Local",
            TEST_EXTERNAL_CLIENT,
            TEST_NODE_IP,
            3002,
            "10.180.0.2:80",
            false,
        ),
        (
            "external to LB with eTP:Local",
            TEST_EXTERNAL_CLIENT,
            "5.6.7.8",
            80,
            "10.180.0.2:80",
            false,
        ),
        (
            "pod to ClusterIP with iTP:Local",
            "10.0.0.2",
            "172.30.0.43",
            80,
            "10.180.0.3:80",
            false,
        ),
        (
            "pod to NodePort with iTP:Local",
            "10.0.0.2",
            TEST_NODE_IP,
            3003,
            all3,
            true,
        ),
        (
            "pod to LB with iTP:Local",
            "10.0.0.2",
            "9.10.11.12",
            80,
            all3,
            true,
        ),
        (
            "node to ClusterIP with iTP:Local",
            TEST_NODE_IP,
            "172.30.0.43",
            80,
            "10.180.0.3:80",
            true,
        ),
        (
            "node to NodePort with iTP:Local",
            TEST_NODE_IP,
            TEST_NODE_IP,
            3003,
            all3,
            true,
        ),
        (
            "localhost to NodePort with iTP:Local",
            "127.0.0.1",
            "127.0.0.1",
            3003,
            all3,
            true,
        ),
        (
            "node to LB with iTP:Local",
            TEST_NODE_IP,
            "9.10.11.12",
            80,
            all3,
            true,
        ),
        (
            "external to ClusterIP with iTP:Local",
            TEST_EXTERNAL_CLIENT,
            "172.30.0.43",
            80,
            "10.180.0.3:80",
            true,
        ),
        (
            "external to NodePort with iTP:Local",
            TEST_EXTERNAL_CLIENT,
            TEST_NODE_IP,
            3003,
            all3,
            true,
        ),
        (
            "external to LB with iTP:Local",
            TEST_EXTERNAL_CLIENT,
            "9.10.11.12",
            80,
            all3,
            true,
        ),
    ];
    type Overrides = &'static [(&'static str, Option<&'static str>, Option<bool>)];
    let no_detector: Overrides = &[
        ("node to ClusterIP", None, Some(false)),
        ("node to ClusterIP with eTP:Local", None, Some(false)),
        ("node to ClusterIP with iTP:Local", None, Some(false)),
        ("external to ClusterIP", None, Some(false)),
        ("external to ClusterIP with eTP:Local", None, Some(false)),
        ("external to ClusterIP with iTP:Local", None, Some(false)),
        (
            "pod to NodePort with eTP:Local",
            Some("10.180.0.2:80"),
            None,
        ),
        ("pod to LB with eTP:Local", Some("10.180.0.2:80"), None),
    ];
    let masq_all: Overrides = &[
        ("pod to ClusterIP", None, Some(true)),
        ("pod to ClusterIP with eTP:Local", None, Some(true)),
        ("pod to ClusterIP with iTP:Local", None, Some(true)),
    ];
    let masq_all_no_detector: Overrides = &[
        ("pod to ClusterIP", None, Some(true)),
        ("pod to ClusterIP with eTP:Local", None, Some(true)),
        ("pod to ClusterIP with iTP:Local", None, Some(true)),
        (
            "pod to NodePort with eTP:Local",
            Some("10.180.0.2:80"),
            None,
        ),
        ("pod to LB with eTP:Local", Some("10.180.0.2:80"), None),
    ];
    for (case, masquerade_all, detector, overrides) in [
        ("base", false, true, &[][..]),
        ("no LocalTrafficDetector", false, false, no_detector),
        ("masqueradeAll", true, true, masq_all),
        (
            "masqueradeAll, no LocalTrafficDetector",
            true,
            false,
            masq_all_no_detector,
        ),
    ] {
        let mut cfg = upstream_config();
        cfg.masquerade_all = masquerade_all;
        if !detector {
            cfg.local_detector = LocalDetector::None;
        }
        let r = render_with(&m, &cfg);
        let mut applied = 0;
        let flows: Vec<Flow> = base
            .iter()
            .map(|&(name, src, dst, port, out, masq)| {
                let mut f = flow(name, src, dst, port, out, masq);
                if let Some(&(_, o, q)) = overrides.iter().find(|o| o.0 == name) {
                    applied += 1;
                    if let Some(o) = o {
                        assert_ne!(f.output, o, "{case}/{name}: override equals base");
                        f.output = o.to_string();
                    }
                    if let Some(q) = q {
                        assert_ne!(f.masq, q, "{case}/{name}: override equals base");
                        f.masq = q;
                    }
                }
                f
            })
            .collect();
        assert_eq!(applied, overrides.len(), "{case}: unmatched overrides");
        run_flows(&r.text, &flows);
    }
}

#[test]
fn masquerade_all_marks_every_cluster_ip_packet() {
    let mut cfg = upstream_config();
    cfg.masquerade_all = true;
    let m = model(
        vec![svc("ns1", "svc1", "p80", "172.30.0.41", 80)],
        vec![(spn("ns1", "svc1", "p80"), vec![ep("10.180.0.1", 80)])],
    );
    let r = render_with(&m, &cfg);
    assert_eq!(
        chain_text(&r.text, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O")
            .lines()
            .next(),
        Some(
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ"
        )
    );
    // Without a detector and without masquerade-all there is no masquerade rule at all.
    cfg.masquerade_all = false;
    cfg.local_detector = LocalDetector::None;
    let r = render_with(&m, &cfg);
    assert_eq!(
        chain_text(&r.text, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O")
            .lines()
            .count(),
        1
    );
}

#[test]
fn interface_local_detectors() {
    let mut s = etp_service(true);
    s.external_ips.clear();
    s.load_balancer_ips.clear();
    let m = model(
        vec![s],
        vec![(
            spn("ns1", "svc1", "p80"),
            vec![ep("10.180.0.1", 80), local(ep("10.180.2.1", 80))],
        )],
    );
    for (detector, not_local, is_local, pod_iface, other_iface) in [
        (
            LocalDetector::BridgeInterface("cbr0".into()),
            "! -i cbr0",
            "-i cbr0",
            "cbr0",
            "eth0",
        ),
        (
            LocalDetector::InterfaceNamePrefix("veth".into()),
            "! -i veth+",
            "-i veth+",
            "veth1234",
            "eth0",
        ),
    ] {
        let mut cfg = upstream_config();
        cfg.local_detector = detector;
        let r = render_with(&m, &cfg);
        assert!(
            r.text
                .contains(&format!("--dport 80 {not_local} -j KUBE-MARK-MASQ\n")),
            "{}",
            r.text
        );
        assert!(r.text.contains(&format!(
            "external destinations\" {is_local} -j KUBE-SVC-XPGD46QRK7WJZT7O\n"
        )));
        let dump = Dump::parse(&r.text).unwrap();
        let mut pkt = Packet::tcp(ip("10.0.0.2"), ip(TEST_NODE_IP), 3001);
        // A pod (arriving on the pod interface) to the eTP:Local node port is short-circuited.
        pkt.in_interface = Some(pod_iface.into());
        assert_eq!(
            trace_packet(&dump, &test_node_ips(), &pkt).output(),
            "10.180.0.1:80, 10.180.2.1:80"
        );
        // Arriving from elsewhere only reaches the local endpoint.
        pkt.in_interface = Some(other_iface.into());
        assert_eq!(
            trace_packet(&dump, &test_node_ips(), &pkt).output(),
            "10.180.2.1:80"
        );
        // Cluster IP from a non-pod interface is masqueraded; from a pod it is not.
        let mut pkt = Packet::tcp(ip("10.0.0.2"), ip("172.30.0.41"), 80);
        pkt.in_interface = Some(other_iface.into());
        assert!(trace_packet(&dump, &test_node_ips(), &pkt).masquerade);
        pkt.in_interface = Some(pod_iface.into());
        assert!(!trace_packet(&dump, &test_node_ips(), &pkt).masquerade);
    }
}

// === large clusters and partial syncs ===

fn dnat_lines(text: &str, matching: &str) -> (String, usize, usize) {
    let (mut first, mut n, mut comments) = (String::new(), 0, 0);
    for line in text.lines() {
        if line.starts_with("-A KUBE-SEP-") && line.contains("-j DNAT") {
            n += 1;
            if line.contains("--comment") {
                comments += 1;
            }
            if line.contains(matching) {
                first = line.to_string();
            }
        }
    }
    (first, n, comments)
}

fn render_partial(
    m: &ProxyModel,
    cfg: &RenderConfig,
    changed: &[(&str, &str)],
    existing: Option<&BTreeSet<String>>,
) -> Rendered {
    let changed: BTreeSet<ServiceName> = changed
        .iter()
        .map(|(ns, n)| ServiceName::new(*ns, *n))
        .collect();
    render(&RenderInput {
        model: m,
        config: cfg,
        scope: SyncScope::Partial { changed: &changed },
        existing_nat_chains: existing,
    })
}

#[test]
fn large_cluster_mode_drops_endpoint_comments() {
    let mut cfg = upstream_config();
    cfg.masquerade_all = true;
    let half = LARGE_CLUSTER_THRESHOLD / 2 - 1;
    let s1 = svc("ns1", "svc1", "p80", "172.30.0.41", 80);
    let s2 = svc("ns2", "svc2", "p8080", "172.30.0.42", 8080);
    let s3 = svc("ns3", "svc3", "p8081", "172.30.0.43", 8081);
    let eps1: Vec<Endpoint> = (0..half)
        .map(|i| ep(&format!("10.0.{}.{}", i % 256, i / 256), 80))
        .collect();
    let eps2: Vec<Endpoint> = (0..half)
        .map(|i| ep(&format!("10.1.{}.{}", i % 256, i / 256), 8080))
        .collect();
    let mut m = model(
        vec![s1, s2, s3],
        vec![
            (spn("ns1", "svc1", "p80"), eps1),
            (spn("ns2", "svc2", "p8080"), eps2),
        ],
    );
    let r = render_with(&m, &cfg);
    assert!(!r.large_cluster);
    let (first, n, comments) = dnat_lines(&r.text, "10.0.0.0:80");
    assert_eq!(
        first,
        "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    );
    assert_eq!((n, comments), (2 * half, 2 * half));

    // Crossing the threshold in a partial sync only rewrites the changed service.
    m.endpoints.insert(
        spn("ns3", "svc3", "p8081"),
        vec![
            ep("203.0.113.12", 8081),
            ep("203.0.113.4", 8081),
            ep("203.0.113.8", 8081),
        ],
    );
    let r = render_partial(&m, &cfg, &[("ns3", "svc3")], None);
    assert!(r.large_cluster);
    let (first, n, comments) = dnat_lines(&r.text, "203.0.113.4");
    assert_eq!(
        first,
        "-A KUBE-SEP-RUVVH7YV3PHQBDOS -m tcp -p tcp -j DNAT --to-destination 203.0.113.4:8081"
    );
    assert_eq!((n, comments), (3, 0));
    let svc3_chain = crate::backend::netfilter::names::service_chain(&spn("ns3", "svc3", "p8081"));
    let svc3_rules = chain_text(&r.text, "nat", &svc3_chain);
    assert_eq!(
        svc3_rules
            .lines()
            .filter(|l| l.contains("-j KUBE-SEP-") && !l.contains("--comment"))
            .count(),
        3,
        "per-endpoint comments dropped in SVC chains too:\n{svc3_rules}"
    );
    assert!(
        r.text.contains("--comment \"ns3/svc3:p8081 cluster IP\""),
        "service comments stay"
    );

    // A full sync rewrites everything without comments.
    let r = render_with(&m, &cfg);
    let (first, n, comments) = dnat_lines(&r.text, "10.0.0.0:80");
    assert_eq!(
        first,
        "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    );
    assert_eq!((n, comments), (2 * half + 3, 0));

    // Adding svc4 syncs only svc4.
    m.services.insert(
        spn("ns4", "svc4", "p8082"),
        svc("ns4", "svc4", "p8082", "172.30.0.44", 8082),
    );
    m.endpoints
        .insert(spn("ns4", "svc4", "p8082"), vec![ep("10.4.0.1", 8082)]);
    let r = render_partial(&m, &cfg, &[("ns4", "svc4")], None);
    let (line, n, _) = dnat_lines(&r.text, "10.4.0.1");
    assert_eq!(
        line,
        "-A KUBE-SEP-SU5STNODRYEWJAUF -m tcp -p tcp -j DNAT --to-destination 10.4.0.1:8082"
    );
    assert_eq!(n, 1);
    let mut kernel = Dump::default();
    kernel.apply_restore(&render_with(&m, &cfg).text).unwrap();
    let existing = kernel.chain_names("nat");

    // Deleting it without a stale-chain scan leaves its chains alone...
    m.services.remove(&spn("ns4", "svc4", "p8082"));
    m.endpoints.remove(&spn("ns4", "svc4", "p8082"));
    let r = render_partial(&m, &cfg, &[("ns4", "svc4")], None);
    assert_eq!(dnat_lines(&r.text, "10.4.0.1").1, 0);
    assert!(!r.text.contains("-X "));
    // ...and the periodic scan deletes them.
    let r = render_partial(&m, &cfg, &[], Some(&existing));
    assert!(r.text.contains("-X KUBE-SVC-EBDQOQU5SJFXRIL3\n"));
    assert!(r.text.contains("-X KUBE-SEP-SU5STNODRYEWJAUF\n"));
    assert_eq!(
        r.deleted_chains,
        ["KUBE-SEP-SU5STNODRYEWJAUF", "KUBE-SVC-EBDQOQU5SJFXRIL3"]
    );
    kernel.apply_restore(&r.text).unwrap();
}

/// Chains of every table sorted by name, for comparing kernel states.
fn canonical(d: &Dump) -> String {
    let mut d = d.clone();
    d.tables.sort_by(|a, b| a.name.cmp(&b.name));
    for t in &mut d.tables {
        t.chains.sort_by(|a, b| a.name.cmp(&b.name));
    }
    d.to_string()
}

#[test]
fn partial_syncs_match_upstream_and_converge_to_a_full_sync() {
    let cfg = upstream_config();
    let mut kernel = Dump::default();
    let mut total = 0usize;

    // Applies a sync to the fake kernel and checks the kernel equals what a fresh full
    // sync of the same model produces: partial syncs must never diverge.
    let mut step = |m: &ProxyModel, r: &Rendered, expected: &str, total_delta: isize| {
        assert_rules_equal(expected, &r.text);
        kernel.apply_restore(&r.text).expect("restore applies");
        let mut fresh = Dump::default();
        fresh.apply_restore(&render_full(m).text).unwrap();
        assert_eq!(
            canonical(&kernel),
            canonical(&fresh),
            "partial sync diverged"
        );
        total = total.checked_add_signed(total_delta).unwrap();
        assert_eq!(r.nat_rules, total, "nat rules total");
        assert_eq!(r.nat_rules, fresh.rule_count("nat"));
        let written = Dump::parse(&r.text).unwrap().rule_count("nat");
        assert_eq!(r.nat_rules_written, written, "nat rules written");
        kernel.chain_names("nat")
    };

    let filter = r#"
        *filter
        :KUBE-NODEPORTS - [0:0]
        :KUBE-SERVICES - [0:0]
        :KUBE-EXTERNAL-SERVICES - [0:0]
        :KUBE-FIREWALL - [0:0]
        :KUBE-FORWARD - [0:0]
        :KUBE-PROXY-FIREWALL - [0:0]
        -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
        -A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
        -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        COMMIT
    "#;
    let nat_head = r#"
        *nat
        :KUBE-NODEPORTS - [0:0]
        :KUBE-SERVICES - [0:0]
        :KUBE-MARK-MASQ - [0:0]
        :KUBE-POSTROUTING - [0:0]
    "#;
    let nat_fixed = r#"
        -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
        -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
        -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
        -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
    "#;
    let cluster_ip = |ns: &str, port: &str, ip: &str, p: u16, chain: &str| {
        format!(
            "-A KUBE-SERVICES -m comment --comment \"{ns}/svc{}:{port} cluster IP\" -m tcp -p tcp -d {ip} --dport {p} -j {chain}\n",
            &ns[2..]
        )
    };
    let svc1_ip = cluster_ip("ns1", "p80", "172.30.0.41", 80, "KUBE-SVC-XPGD46QRK7WJZT7O");
    let svc2_ip = cluster_ip(
        "ns2",
        "p8080",
        "172.30.0.42",
        8080,
        "KUBE-SVC-2VJB64SDSIJUP5T6",
    );
    let svc3_ip = cluster_ip("ns3", "p80", "172.30.0.43", 80, "KUBE-SVC-X27LE4BHSL4DOUIK");
    let svc4_ip = cluster_ip("ns4", "p80", "172.30.0.44", 80, "KUBE-SVC-4SW47YFZTEDKD3PK");
    let golden = |chains: &str, services: &[&String], rest: &str, filter_extra: &str| {
        let f = filter.replace(
            "-A KUBE-FIREWALL",
            &format!("{filter_extra}-A KUBE-FIREWALL"),
        );
        let s: String = services.iter().map(|s| s.as_str()).collect();
        format!("{f}{nat_head}{chains}\n{s}{nat_fixed}{rest}COMMIT\n")
    };

    // 1. Full sync of svc1 and svc2.
    let mut m = model(
        vec![
            svc("ns1", "svc1", "p80", "172.30.0.41", 80),
            svc("ns2", "svc2", "p8080", "172.30.0.42", 8080),
        ],
        vec![
            (spn("ns1", "svc1", "p80"), vec![ep("10.0.1.1", 80)]),
            (spn("ns2", "svc2", "p8080"), vec![ep("10.0.2.1", 8080)]),
        ],
    );
    let r = render(&RenderInput {
        model: &m,
        config: &cfg,
        scope: SyncScope::Full,
        existing_nat_chains: Some(&BTreeSet::new()),
    });
    let mut existing = step(
        &m,
        &r,
        &golden(
            ":KUBE-SEP-SNQ3ZNILQDEJNDQO - [0:0]\n:KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]\n:KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
            &[&svc1_ip, &svc2_ip],
            r#"
            -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -s 10.0.1.1 -j KUBE-MARK-MASQ
            -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80
            -A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -s 10.0.2.1 -j KUBE-MARK-MASQ
            -A KUBE-SEP-UHEGFW77JX3KXTOV -m comment --comment ns2/svc2:p8080 -m tcp -p tcp -j DNAT --to-destination 10.0.2.1:8080
            -A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 8080 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-2VJB64SDSIJUP5T6 -m comment --comment "ns2/svc2:p8080 -> 10.0.2.1:8080" -j KUBE-SEP-UHEGFW77JX3KXTOV
            -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.0.1.1:80" -j KUBE-SEP-SNQ3ZNILQDEJNDQO
            "#,
            "",
        ),
        15,
    );

    // 2. Add svc3 and its endpoints: only svc3's chains are written.
    m.services.insert(
        spn("ns3", "svc3", "p80"),
        svc("ns3", "svc3", "p80", "172.30.0.43", 80),
    );
    m.endpoints
        .insert(spn("ns3", "svc3", "p80"), vec![ep("10.0.3.1", 80)]);
    let r = render_partial(&m, &cfg, &[("ns3", "svc3")], Some(&existing));
    existing = step(
        &m,
        &r,
        &golden(
            ":KUBE-SEP-BSWRHOQ77KEXZLNL - [0:0]\n:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]",
            &[&svc1_ip, &svc2_ip, &svc3_ip],
            r#"
            -A KUBE-SEP-BSWRHOQ77KEXZLNL -m comment --comment ns3/svc3:p80 -s 10.0.3.1 -j KUBE-MARK-MASQ
            -A KUBE-SEP-BSWRHOQ77KEXZLNL -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.1:80
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.1:80" -j KUBE-SEP-BSWRHOQ77KEXZLNL
            "#,
            "",
        ),
        5,
    );

    // 3. Delete svc2: its chains are flushed and deleted.
    m.services.remove(&spn("ns2", "svc2", "p8080"));
    m.endpoints.remove(&spn("ns2", "svc2", "p8080"));
    let r = render_partial(&m, &cfg, &[("ns2", "svc2")], Some(&existing));
    assert_eq!(
        r.deleted_chains,
        ["KUBE-SEP-UHEGFW77JX3KXTOV", "KUBE-SVC-2VJB64SDSIJUP5T6"]
    );
    existing = step(
        &m,
        &r,
        &golden(
            ":KUBE-SEP-UHEGFW77JX3KXTOV - [0:0]\n:KUBE-SVC-2VJB64SDSIJUP5T6 - [0:0]",
            &[&svc1_ip, &svc3_ip],
            "-X KUBE-SEP-UHEGFW77JX3KXTOV\n-X KUBE-SVC-2VJB64SDSIJUP5T6\n",
            "",
        ),
        -5,
    );

    // 4. Add svc4 without endpoints: only a REJECT in filter.
    m.services.insert(
        spn("ns4", "svc4", "p80"),
        svc("ns4", "svc4", "p80", "172.30.0.44", 80),
    );
    let r = render_partial(&m, &cfg, &[("ns4", "svc4")], Some(&existing));
    existing = step(
        &m,
        &r,
        &golden(
            "",
            &[&svc1_ip, &svc3_ip],
            "",
            "-A KUBE-SERVICES -m comment --comment \"ns4/svc4:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j REJECT\n",
        ),
        0,
    );

    // 5. svc4 gets an endpoint.
    m.endpoints
        .insert(spn("ns4", "svc4", "p80"), vec![ep("10.0.4.1", 80)]);
    let r = render_partial(&m, &cfg, &[("ns4", "svc4")], Some(&existing));
    existing = step(
        &m,
        &r,
        &golden(
            ":KUBE-SEP-AYCN5HPXMIRJNJXU - [0:0]\n:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]",
            &[&svc1_ip, &svc3_ip, &svc4_ip],
            r#"
            -A KUBE-SEP-AYCN5HPXMIRJNJXU -m comment --comment ns4/svc4:p80 -s 10.0.4.1 -j KUBE-MARK-MASQ
            -A KUBE-SEP-AYCN5HPXMIRJNJXU -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.4.1:80
            -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.0.4.1:80" -j KUBE-SEP-AYCN5HPXMIRJNJXU
            "#,
            "",
        ),
        5,
    );

    // 6. svc3's endpoint moves: its SVC and SEP chains are rewritten, the old SEP deleted.
    m.endpoints
        .insert(spn("ns3", "svc3", "p80"), vec![ep("10.0.3.2", 80)]);
    let r = render_partial(&m, &cfg, &[("ns3", "svc3")], Some(&existing));
    existing = step(
        &m,
        &r,
        &golden(
            ":KUBE-SEP-BSWRHOQ77KEXZLNL - [0:0]\n:KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]\n:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]",
            &[&svc1_ip, &svc3_ip, &svc4_ip],
            r#"
            -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ
            -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -j KUBE-SEP-DKCFIS26GWF2WLWC
            -X KUBE-SEP-BSWRHOQ77KEXZLNL
            "#,
            "",
        ),
        0,
    );

    // 7. svc3 gains a second endpoint.
    m.endpoints.insert(
        spn("ns3", "svc3", "p80"),
        vec![ep("10.0.3.2", 80), ep("10.0.3.3", 80)],
    );
    let r = render_partial(&m, &cfg, &[("ns3", "svc3")], Some(&existing));
    existing = step(
        &m,
        &r,
        &golden(
            ":KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]\n:KUBE-SEP-JVVZVJ7BSEPPRNBS - [0:0]\n:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]",
            &[&svc1_ip, &svc3_ip, &svc4_ip],
            r#"
            -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ
            -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80
            -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -s 10.0.3.3 -j KUBE-MARK-MASQ
            -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.3:80
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-DKCFIS26GWF2WLWC
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.3:80" -j KUBE-SEP-JVVZVJ7BSEPPRNBS
            "#,
            "",
        ),
        3,
    );

    // 8. Nothing changed: no per-service chain is written.
    let r = render_partial(&m, &cfg, &[], Some(&existing));
    existing = step(
        &m,
        &r,
        &golden("", &[&svc1_ip, &svc3_ip, &svc4_ip], "", ""),
        0,
    );

    // 9. Full sync after deleting svc4.
    m.services.remove(&spn("ns4", "svc4", "p80"));
    m.endpoints.remove(&spn("ns4", "svc4", "p80"));
    let r = render(&RenderInput {
        model: &m,
        config: &cfg,
        scope: SyncScope::Full,
        existing_nat_chains: Some(&existing),
    });
    step(
        &m,
        &r,
        &golden(
            ":KUBE-SEP-AYCN5HPXMIRJNJXU - [0:0]\n:KUBE-SEP-DKCFIS26GWF2WLWC - [0:0]\n:KUBE-SEP-JVVZVJ7BSEPPRNBS - [0:0]\n:KUBE-SEP-SNQ3ZNILQDEJNDQO - [0:0]\n:KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]\n:KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
            &[&svc1_ip, &svc3_ip],
            r#"
            -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -s 10.0.3.2 -j KUBE-MARK-MASQ
            -A KUBE-SEP-DKCFIS26GWF2WLWC -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.2:80
            -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -s 10.0.3.3 -j KUBE-MARK-MASQ
            -A KUBE-SEP-JVVZVJ7BSEPPRNBS -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.3.3:80
            -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -s 10.0.1.1 -j KUBE-MARK-MASQ
            -A KUBE-SEP-SNQ3ZNILQDEJNDQO -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-DKCFIS26GWF2WLWC
            -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.0.3.3:80" -j KUBE-SEP-JVVZVJ7BSEPPRNBS
            -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
            -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.0.1.1:80" -j KUBE-SEP-SNQ3ZNILQDEJNDQO
            -X KUBE-SEP-AYCN5HPXMIRJNJXU
            -X KUBE-SVC-4SW47YFZTEDKD3PK
            "#,
            "",
        ),
        -5,
    );
}

// === number_generated_rules_test.go ===

fn generated(n_services: u32, n_endpoints: u32, load_balancer: bool) -> ProxyModel {
    let mut services = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..n_services {
        let name = spn("namespace", &format!("svc{i}"), "8080");
        let cluster_ip = IpAddr::from(std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(10, 0, 0, 1)) + i,
        ));
        let mut s = ServicePort::basic(name.clone(), cluster_ip, 80 + i as u16);
        if load_balancer {
            s.service_type = ServiceType::LoadBalancer;
            s.external_ips = vec![ip("1.2.3.4")];
            s.source_ranges = SourceRanges::Only(vec![cidr("1.2.3.4/28")]);
            s.load_balancer_ips = vec![ip("1.2.3.4")];
            s.node_port = 30000 + i as u16;
            s.health_check_node_port = (32000 + n_services + i) as u16;
        }
        services.push(s);
        let eps = (0..n_endpoints)
            .map(|j| {
                Endpoint::ready(
                    IpAddr::from(std::net::Ipv4Addr::from(
                        u32::from(std::net::Ipv4Addr::new(172, 16, 0, 1)) + j,
                    )),
                    8080,
                )
            })
            .collect();
        endpoints.push((name, eps));
    }
    model(services, endpoints)
}

#[test]
fn number_of_generated_rules_matches_upstream() {
    // (services, endpoints per service, filter rules, nat rules)
    let cluster_ip = [
        (0, 0, 4, 5),
        (1, 0, 5, 5),
        (1, 1, 4, 10),
        (1, 2, 4, 13),
        (1, 10, 4, 37),
        (10, 0, 14, 5),
        (10, 1, 4, 55),
        (10, 2, 4, 85),
        (10, 10, 4, 325),
    ];
    let load_balancer = [
        (0, 0, 4, 5),
        (1, 0, 8, 5),
        (1, 1, 5, 18),
        (1, 2, 5, 21),
        (1, 10, 5, 45),
        (10, 0, 44, 5),
        (10, 1, 14, 135),
        (10, 2, 14, 165),
        (10, 10, 14, 405),
    ];
    for (lb, table) in [(false, &cluster_ip), (true, &load_balancer)] {
        for &(svcs, eps, filter, nat) in table.iter() {
            let r = render_full(&generated(svcs, eps, lb));
            assert_eq!(
                (r.filter_rules, r.nat_rules),
                (filter, nat),
                "lb={lb} {svcs} services x {eps} endpoints"
            );
        }
    }
    // The 10 x 10 ClusterIP oracle: baseline 5 plus 2 + 3N per service.
    assert_eq!(
        render_full(&generated(10, 10, false)).nat_rules,
        5 + 10 * (2 + 3 * 10)
    );
}

#[test]
fn no_local_endpoints_counts() {
    type Case = (
        &'static str,
        bool,
        bool,
        &'static [(&'static str, bool)],
        usize,
        usize,
    );
    let cases: [Case; 7] = [
        (
            "iTP local, local endpoints",
            true,
            false,
            &[("10.0.1.1", true), ("10.0.1.2", false), ("10.0.1.3", false)],
            0,
            0,
        ),
        (
            "eTP local, local endpoints",
            false,
            true,
            &[("10.0.1.1", true), ("10.0.1.2", false), ("10.0.1.3", false)],
            0,
            0,
        ),
        (
            "both, local endpoints",
            true,
            true,
            &[("10.0.1.1", true), ("10.0.1.2", false), ("10.0.1.3", false)],
            0,
            0,
        ),
        (
            "iTP local, no local endpoints",
            true,
            false,
            &[
                ("10.0.1.1", false),
                ("10.0.1.2", false),
                ("10.0.1.3", false),
            ],
            1,
            0,
        ),
        (
            "eTP local, no local endpoints",
            false,
            true,
            &[
                ("10.0.1.1", false),
                ("10.0.1.2", false),
                ("10.0.1.3", false),
            ],
            0,
            1,
        ),
        (
            "both, no local endpoints",
            true,
            true,
            &[
                ("10.0.1.1", false),
                ("10.0.1.2", false),
                ("10.0.1.3", false),
            ],
            1,
            1,
        ),
        ("both, no endpoints at all", true, true, &[], 0, 0),
    ];
    for (case, itp, etp, eps, internal, external) in cases {
        let mut s = svc("ns1", "svc1", "", "172.30.1.1", 80);
        s.node_port = 123;
        s.internal_policy_local = itp;
        if etp {
            s.service_type = ServiceType::NodePort;
            s.external_policy_local = true;
        }
        let eps = eps
            .iter()
            .map(|&(a, is_local)| {
                if is_local {
                    local(ep(a, 80))
                } else {
                    ep(a, 80)
                }
            })
            .collect();
        let r = render_full(&model(vec![s], vec![(spn("ns1", "svc1", ""), eps)]));
        assert_eq!(
            (r.no_local_endpoints_internal, r.no_local_endpoints_external),
            (internal, external),
            "{case}"
        );
    }
}

#[test]
fn session_affinity_rules() {
    let mut s = svc("ns1", "svc1", "p80", "172.30.0.41", 80);
    s.session_affinity_timeout = Some(600);
    let m = model(
        vec![s],
        vec![(
            spn("ns1", "svc1", "p80"),
            vec![ep("10.180.0.1", 80), ep("10.180.0.2", 80)],
        )],
    );
    let r = render_full(&m);
    let sep1 = crate::backend::netfilter::names::endpoint_chain_for(
        &spn("ns1", "svc1", "p80"),
        "10.180.0.1:80",
    );
    let sep2 = crate::backend::netfilter::names::endpoint_chain_for(
        &spn("ns1", "svc1", "p80"),
        "10.180.0.2:80",
    );
    assert_eq!(
        chain_text(&r.text, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O"),
        format!(
            "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n\
             -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m recent --name {sep1} --rcheck --seconds 600 --reap -j {sep1}\n\
             -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.2:80\" -m recent --name {sep2} --rcheck --seconds 600 --reap -j {sep2}\n\
             -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j {sep1}\n\
             -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.2:80\" -j {sep2}\n"
        )
    );
    assert_eq!(
        chain_text(&r.text, "nat", &sep2),
        format!(
            "-A {sep2} -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ\n\
             -A {sep2} -m comment --comment ns1/svc1:p80 -m recent --name {sep2} --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80\n"
        )
    );
    // The tracer ignores affinity checks (no history), so both endpoints are candidates.
    run_flows(
        &r.text,
        &[flow(
            "affinity",
            "10.0.0.2",
            "172.30.0.41",
            80,
            "10.180.0.1:80, 10.180.0.2:80",
            false,
        )],
    );
}

// === jump rules and cleanup ===

#[test]
fn jump_rules_are_upstreams_in_order() {
    let rules = crate::backend::netfilter::jumps::jump_rules();
    let rendered: Vec<String> = rules
        .iter()
        .map(|j| format!("{} {} {}", j.table, j.chain, j.args().join(" ")))
        .collect();
    assert_eq!(
        rendered,
        [
            "filter INPUT -m conntrack --ctstate NEW -m comment --comment kubernetes externally-visible service portals -j KUBE-EXTERNAL-SERVICES",
            "filter FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes externally-visible service portals -j KUBE-EXTERNAL-SERVICES",
            "filter INPUT -m comment --comment kubernetes health check service ports -j KUBE-NODEPORTS",
            "filter FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes service portals -j KUBE-SERVICES",
            "filter OUTPUT -m conntrack --ctstate NEW -m comment --comment kubernetes service portals -j KUBE-SERVICES",
            "filter FORWARD -m comment --comment kubernetes forwarding rules -j KUBE-FORWARD",
            "filter INPUT -m conntrack --ctstate NEW -m comment --comment kubernetes load balancer firewall -j KUBE-PROXY-FIREWALL",
            "filter OUTPUT -m conntrack --ctstate NEW -m comment --comment kubernetes load balancer firewall -j KUBE-PROXY-FIREWALL",
            "filter FORWARD -m conntrack --ctstate NEW -m comment --comment kubernetes load balancer firewall -j KUBE-PROXY-FIREWALL",
            "nat OUTPUT -m comment --comment kubernetes service portals -j KUBE-SERVICES",
            "nat PREROUTING -m comment --comment kubernetes service portals -j KUBE-SERVICES",
            "nat POSTROUTING -m comment --comment kubernetes postrouting rules -j KUBE-POSTROUTING",
            "filter INPUT -j KUBE-FIREWALL",
            "filter OUTPUT -j KUBE-FIREWALL",
        ]
    );
    // The comment is one argument (exec'd, not shell-split).
    assert_eq!(
        rules[0].args()[7],
        "kubernetes externally-visible service portals"
    );
}

#[test]
fn cleanup_removes_only_our_chains() {
    // A node running kube-proxy plus foreign chains (Docker, a CNI).
    let mut kernel = Dump::default();
    kernel
        .apply_restore(
            "*nat\n:DOCKER - [0:0]\n:CNI-HOSTPORT-DNAT - [0:0]\n:KUBE-MARK-DROP - [0:0]\n\
             -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n-A PREROUTING -j CNI-HOSTPORT-DNAT\n\
             -A KUBE-MARK-DROP -j MARK --or-mark 0x8000\nCOMMIT\n\
             *filter\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\nCOMMIT\n",
        )
        .unwrap();
    kernel
        .apply_restore(&render_full(&overall_model()).text)
        .unwrap();
    let mut canary = Dump::default();
    canary
        .apply_restore("*nat\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n")
        .unwrap();
    kernel
        .apply_restore("*nat\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n")
        .unwrap();
    // Jump rules as a full sync ensures them (inserted at the top).
    let mut jumps = String::new();
    for table in ["filter", "nat"] {
        jumps.push_str(&format!("*{table}\n"));
        for j in crate::backend::netfilter::jumps::jump_rules()
            .iter()
            .filter(|j| j.table == table)
        {
            let args: Vec<String> = j
                .args()
                .iter()
                .map(|a| {
                    if a.contains(' ') {
                        format!("\"{a}\"")
                    } else {
                        a.clone()
                    }
                })
                .collect();
            jumps.push_str(&format!("-I {} 1 {}\n", j.chain, args.join(" ")));
        }
        jumps.push_str("COMMIT\n");
    }
    kernel.apply_restore(&jumps).unwrap();
    let save = |table: &str| {
        let mut d = kernel.clone();
        d.tables.retain(|t| t.name == table);
        d.to_string()
    };
    let plan =
        crate::backend::netfilter::jumps::cleanup_plan(&save("nat"), &save("filter")).unwrap();
    assert_eq!(plan.delete_chain, ("mangle", "KUBE-PROXY-CANARY"));
    assert_eq!(
        plan.delete_jumps.len(),
        12,
        "kubelet's KUBE-FIREWALL jumps stay"
    );
    assert!(plan.nat_restore.starts_with(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n:KUBE-EXT-"
    ));
    assert_eq!(
        plan.filter_restore,
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
         -X KUBE-SERVICES\n-X KUBE-EXTERNAL-SERVICES\n-X KUBE-FORWARD\n-X KUBE-NODEPORTS\n-X KUBE-PROXY-FIREWALL\nCOMMIT\n"
    );

    // Execute the plan against the fake kernel.
    for j in &plan.delete_jumps {
        let chain = kernel.chain_mut(j.table, j.chain).unwrap();
        let before = chain.rules.len();
        chain.rules.retain(|r| r.args != j.args());
        assert_eq!(chain.rules.len(), before - 1, "jump {j:?} found once");
    }
    kernel
        .apply_restore(&plan.nat_restore)
        .expect("nat cleanup applies");
    kernel
        .apply_restore(&plan.filter_restore)
        .expect("filter cleanup applies");

    let nat = kernel.chain_names("nat");
    assert!(
        nat.iter()
            .all(|c| !c.starts_with("KUBE-") || c == "KUBE-MARK-DROP"),
        "{nat:?}"
    );
    assert!(
        nat.contains("DOCKER")
            && nat.contains("CNI-HOSTPORT-DNAT")
            && nat.contains("KUBE-MARK-DROP")
    );
    assert_eq!(kernel.chain("nat", "PREROUTING").unwrap().rules.len(), 2);
    let filter = kernel.chain_names("filter");
    assert!(filter.contains("DOCKER-USER"));
    // kubelet's KUBE-FIREWALL chain and its jumps are left in place.
    assert!(filter.contains("KUBE-FIREWALL"));
    assert_eq!(kernel.chain("filter", "INPUT").unwrap().rules.len(), 1);
    assert_eq!(kernel.chain("filter", "FORWARD").unwrap().rules.len(), 1);

    // Cleaning a clean node is a no-op restore.
    let plan =
        crate::backend::netfilter::jumps::cleanup_plan("*nat\nCOMMIT\n", "*filter\nCOMMIT\n")
            .unwrap();
    assert_eq!(
        (plan.nat_restore.as_str(), plan.filter_restore.as_str()),
        ("*nat\nCOMMIT\n", "*filter\nCOMMIT\n")
    );
    assert!(
        crate::backend::netfilter::jumps::cleanup_plan("garbage", "*filter\nCOMMIT\n").is_err()
    );
}

#[test]
fn stale_chain_detection_ignores_foreign_and_active_chains() {
    let m = overall_model();
    let existing: BTreeSet<String> = [
        "KUBE-SVC-XPGD46QRK7WJZT7O", // active
        "KUBE-SVC-AAAAAAAAAAAAAAAA", // stale
        "KUBE-SEP-BBBBBBBBBBBBBBBB", // stale
        "KUBE-MARK-DROP",            // kubelet's
        "KUBE-SERVICES",
        "DOCKER",
    ]
    .map(String::from)
    .into();
    let r = render(&RenderInput {
        model: &m,
        config: &upstream_config(),
        scope: SyncScope::Full,
        existing_nat_chains: Some(&existing),
    });
    assert_eq!(
        r.deleted_chains,
        ["KUBE-SEP-BBBBBBBBBBBBBBBB", "KUBE-SVC-AAAAAAAAAAAAAAAA"]
    );
    // "-X" lines come right before the node-ports tail call and are not counted as rules.
    assert!(r.text.contains(
        "-X KUBE-SEP-BBBBBBBBBBBBBBBB\n-X KUBE-SVC-AAAAAAAAAAAAAAAA\n-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports;"
    ));
    assert_eq!(r.nat_rules, 55);
    let parsed = Dump::parse(&r.text).unwrap();
    assert!(
        parsed
            .chain("nat", "KUBE-SVC-AAAAAAAAAAAAAAAA")
            .unwrap()
            .deleted
    );
}

#[test]
fn both_traffic_policies_local_keep_the_cluster_chain_for_short_circuiting() {
    let mut s = etp_service(true);
    s.internal_policy_local = true;
    let m = model(
        vec![s],
        vec![(
            spn("ns1", "svc1", "p80"),
            vec![ep("10.180.0.1", 80), local(ep("10.180.2.1", 80))],
        )],
    );
    // render_full also checks that every jump target exists.
    let r = render_full(&m);
    assert!(r.text.contains(":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n"));
    run_flows(
        &r.text,
        &[
            flow(
                "pod to cluster IP: internal policy Local",
                "10.0.0.2",
                "172.30.0.41",
                80,
                "10.180.2.1:80",
                false,
            ),
            flow(
                "pod to LB: short-circuited to all endpoints",
                "10.0.0.2",
                "1.2.3.4",
                80,
                "10.180.0.1:80, 10.180.2.1:80",
                false,
            ),
            flow(
                "external to LB: external policy Local",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                "10.180.2.1:80",
                false,
            ),
        ],
    );
}

#[test]
fn large_cluster_mode_starts_above_the_threshold() {
    let mut cfg = upstream_config();
    cfg.large_cluster_threshold = 3;
    let name = spn("ns1", "svc1", "p80");
    let s = svc("ns1", "svc1", "p80", "172.30.0.41", 80);
    let eps = |n: usize| {
        (1..=n)
            .map(|i| ep(&format!("10.180.0.{i}"), 80))
            .collect::<Vec<_>>()
    };
    // Endpoints of ports without a service do not count.
    let mut m = model(
        vec![s.clone()],
        vec![
            (name.clone(), eps(3)),
            (spn("ns9", "orphan", "p80"), eps(5)),
        ],
    );
    let r = render_with(&m, &cfg);
    assert!(!r.large_cluster);
    assert_eq!(
        dnat_lines(&r.text, "").2,
        3,
        "at the threshold: comments kept"
    );
    m.endpoints.insert(name, eps(4));
    let r = render_with(&m, &cfg);
    assert!(r.large_cluster);
    assert_eq!(dnat_lines(&r.text, "").1, 4);
    assert_eq!(
        dnat_lines(&r.text, "").2,
        0,
        "above the threshold: comments dropped"
    );
}

// === API objects through the converter: TestBadIPs, hostile names, LB source ranges ===

/// The model the watch layer builds from these objects (Services and EndpointSlices, as
/// JSON), on node "test-node", and the warnings it logs.
fn model_from_objects(objects: &[serde_json::Value]) -> (ProxyModel, Vec<String>) {
    fn of_kind<T: serde::de::DeserializeOwned>(
        objects: &[serde_json::Value],
        kind: &str,
    ) -> Vec<T> {
        objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .map(|o| serde_json::from_value(o.clone()).unwrap())
            .collect()
    }
    let services: Vec<k8s_openapi::api::core::v1::Service> = of_kind(objects, "Service");
    let slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice> =
        of_kind(objects, "EndpointSlice");
    let mut state = crate::model::ClusterState::new(TEST_NODE_NAME);
    let mut warnings = state.replace_services(services.iter());
    warnings.extend(state.replace_slices(slices.iter()));
    let mut m = state.snapshot(crate::model::IpFamily::V4);
    m.node.present = true;
    (m, warnings)
}

/// A Service object with one TCP port `p80` (port 80) and `extra` merged into its spec.
fn service_object(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut spec = serde_json::json!({"clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}]});
    for (k, v) in extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

/// An EndpointSlice for Service `ns/name` port `p80` (80/TCP); endpoints are (address, node).
fn slice_object(ns: &str, name: &str, endpoints: &[(&str, Option<&str>)]) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(a, node)| serde_json::json!({"addresses": [a], "nodeName": node}))
        .collect();
    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": format!("{name}-1"),
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}],
        "endpoints": eps})
}

/// TestOverallIPTablesRules' Services and EndpointSlices as API objects, every address and
/// prefix spelled through `spell` (identity, or the legacy leading-zero form).
fn overall_objects(spell: &dyn Fn(&str) -> String) -> Vec<serde_json::Value> {
    use serde_json::json;
    let s = |v: &str| spell(v);
    let lb_status = |ip: &str| json!({"loadBalancer": {"ingress": [{"ip": s(ip)}]}});
    let mut svc2 = service_object(
        "ns2",
        "svc2",
        &s("172.30.0.42"),
        json!({
        "type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30000,
        "externalIPs": [s("192.168.99.22")],
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]}),
    );
    svc2["status"] = lb_status("1.2.3.4");
    let mut svc5 = service_object(
        "ns5",
        "svc5",
        &s("172.30.0.45"),
        json!({
        "type": "LoadBalancer", "healthCheckNodePort": 30000, "sessionAffinity": "ClientIP",
        "loadBalancerSourceRanges": [s("203.0.113.0/25")],
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3002}]}),
    );
    svc5["status"] = lb_status("5.6.7.8");
    vec![
        service_object("ns1", "svc1", &s("172.30.0.41"), json!({})),
        slice_object("ns1", "svc1", &[(&s("10.180.0.1"), None)]),
        svc2,
        slice_object("ns2", "svc2", &[(&s("10.180.0.2"), None)]),
        service_object(
            "ns3",
            "svc3",
            &s("172.30.0.43"),
            json!({"type": "NodePort",
            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3003}]}),
        ),
        slice_object("ns3", "svc3", &[(&s("10.180.0.3"), None)]),
        service_object(
            "ns4",
            "svc4",
            &s("172.30.0.44"),
            json!({"type": "NodePort",
            "externalIPs": [s("192.168.99.33")]}),
        ),
        slice_object(
            "ns4",
            "svc4",
            &[
                (&s("10.180.0.4"), None),
                (&s("10.180.0.5"), Some(TEST_NODE_NAME)),
            ],
        ),
        svc5,
        slice_object("ns5", "svc5", &[(&s("10.180.0.3"), None)]),
        service_object("ns6", "svc6", &s("172.30.0.46"), json!({})),
    ]
}

/// Every IPv4 octet and prefix length with leading zeros, as clusters upgraded from old
/// releases may store them (`172.30.0.41` -> `172.030.000.041`, `/25` -> `/025`).
fn legacy_spelling(v: &str) -> String {
    let (addr, len) = v.split_once('/').map_or((v, None), |(a, l)| (a, Some(l)));
    let addr: Vec<String> = addr.split('.').map(|o| format!("{o:0>3}")).collect();
    match len {
        Some(l) => format!("{}/{l:0>3}", addr.join(".")),
        None => addr.join("."),
    }
}

/// TestBadIPs: Services and EndpointSlices whose addresses carry leading zeros program
/// exactly the rules of TestOverallIPTablesRules' golden, as upstream parses them with
/// `ParseIPSloppy` / `ParseCIDRSloppy` and writes them in canonical form.
#[test]
fn bad_ips_match_upstream_golden() {
    assert_eq!(legacy_spelling("203.0.113.0/25"), "203.000.113.000/025");
    let (m, warnings) = model_from_objects(&overall_objects(&legacy_spelling));
    assert!(warnings.is_empty(), "{warnings:?}");
    let r = render_full(&m);
    assert_rules_equal(OVERALL_EXPECTED, &r.text);
    // The very restore text of the model built directly, not just the same rule set.
    assert_eq!(r.text, render_full(&overall_model()).text);
    for legacy in ["041", "/025", ".00"] {
        assert!(!r.text.contains(legacy), "{legacy} written:\n{}", r.text);
    }
}

/// Item 2 of issue 7: objects whose names the API server would refuse (an injected rule in
/// a namespace, `COMMIT` / `*filter` port names, a space, 1,100 characters) are skipped with
/// one warning each, and everything else is programmed exactly as without them.
#[test]
fn hostile_names_never_reach_the_restore_input() {
    use serde_json::json;
    let good = overall_objects(&|v| v.to_string());
    let injected = "ns\" -j ACCEPT\n-A KUBE-SERVICES -j ACCEPT\n#";
    let long = "x".repeat(1100);
    let port = |name: &str| json!({"ports": [{"name": name, "port": 80, "protocol": "TCP"}]});
    let hostile = [
        service_object(injected, "svc7", "172.30.0.47", json!({})),
        slice_object(injected, "svc7", &[("10.180.0.7", None)]),
        service_object("ns8", "svc8", "172.30.0.48", port("COMMIT")),
        service_object("ns9", "svc9", "172.30.0.49", port("*filter")),
        service_object("ns10", "svc 10", "172.30.0.50", json!({})),
        service_object("ns11", &long, "172.30.0.51", json!({})),
        slice_object("ns11", &long, &[("10.180.0.11", None)]),
    ];
    let mut all = good.clone();
    all.extend(hostile.iter().cloned());
    let (m, warnings) = model_from_objects(&all);
    let r = render_full(&m);
    let foreign = [
        "-A KUBE-SERVICES -j ACCEPT",
        "-j ACCEPT\n#",
        "COMMIT\"",
        "*filter\"",
        "svc 10",
        "xxxxxxxx",
        "172.30.0.47",
        "172.30.0.48",
        "172.30.0.49",
        "172.30.0.50",
        "172.30.0.51",
    ];
    for f in foreign {
        assert!(!r.text.contains(f), "{f:?} in:\n{}", r.text);
    }
    assert_eq!(
        warnings.len(),
        hostile.len(),
        "one warning per object: {warnings:#?}"
    );
    assert!(warnings.iter().all(|w| !w.contains('\n')), "{warnings:#?}");
    assert_eq!(r.text, render_full(&model_from_objects(&good).0).text);
    assert_rules_equal(OVERALL_EXPECTED, &r.text);
}

fn lb_object(ranges: serde_json::Value, annotations: serde_json::Value) -> Vec<serde_json::Value> {
    let mut s = service_object(
        "ns1",
        "svc1",
        "172.30.0.41",
        serde_json::json!({
        "type": "LoadBalancer", "loadBalancerSourceRanges": ranges,
        "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]}),
    );
    s["metadata"]["annotations"] = annotations;
    s["status"] = serde_json::json!({"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}});
    vec![s, slice_object("ns1", "svc1", &[("10.180.0.1", None)])]
}

/// Item 8: only `spec.loadBalancerSourceRanges` restricts the load balancer; a zero-length
/// range means no firewall; an unreadable entry is dropped but the service stays; with no
/// readable range left the load balancer admits nobody (fail closed).
#[test]
fn load_balancer_source_ranges_from_objects() {
    use serde_json::json;
    let out = "10.180.0.1:80";
    let fw = "KUBE-FW-XPGD46QRK7WJZT7O";
    let open = [
        // Upstream does not read the annotation.
        lb_object(
            json!(null),
            json!({"service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/25"}),
        ),
        lb_object(json!(["0.0.0.0/0"]), json!(null)),
        lb_object(json!(["203.0.113.0/25", " 0.0.0.0/0 "]), json!(null)),
    ];
    for objects in &open {
        let (m, _) = model_from_objects(objects);
        let r = render_full(&m);
        assert!(!r.text.contains(fw), "no firewall expected:\n{}", r.text);
        run_flows(
            &r.text,
            &[flow(
                "blocked-range client allowed",
                TEST_EXTERNAL_CLIENT_BLOCKED,
                "1.2.3.4",
                80,
                out,
                true,
            )],
        );
    }

    let (m, warnings) =
        model_from_objects(&lb_object(json!(["bogus", " 203.0.113.0/25"]), json!(null)));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let r = render_full(&m);
    assert_eq!(
        chain_text(&r.text, "nat", fw),
        dedent(
            r#"
            -A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O
            -A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"
        "#
        )
    );
    run_flows(
        &r.text,
        &[
            flow("in range", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, out, true),
            flow(
                "out of range",
                TEST_EXTERNAL_CLIENT_BLOCKED,
                "1.2.3.4",
                80,
                "DROP",
                false,
            ),
        ],
    );

    let (m, warnings) = model_from_objects(&lb_object(json!(["bogus"]), json!(null)));
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    let r = render_full(&m);
    run_flows(
        &r.text,
        &[
            flow(
                "cluster IP still served",
                "10.0.0.2",
                "172.30.0.41",
                80,
                out,
                false,
            ),
            flow(
                "node port still served",
                TEST_EXTERNAL_CLIENT,
                TEST_NODE_IP,
                3001,
                out,
                true,
            ),
            flow(
                "external to LB dropped",
                TEST_EXTERNAL_CLIENT,
                "1.2.3.4",
                80,
                "DROP",
                false,
            ),
            flow(
                "node to LB dropped",
                TEST_NODE_IP,
                "1.2.3.4",
                80,
                "DROP",
                false,
            ),
            flow(
                "pod to LB dropped",
                "10.0.0.2",
                "1.2.3.4",
                80,
                "DROP",
                false,
            ),
        ],
    );
}

/// upstream NewFakeProxier for an IPv6 `ipt`: pod CIDR fd00:10::/64, node IP 2001:db8::1.
fn upstream_config_ipv6() -> RenderConfig {
    RenderConfig {
        family: crate::model::IpFamily::V6,
        local_detector: LocalDetector::Cidr(cidr("fd00:10::/64")),
        node_ips: vec![ip("::1"), ip("2001:db8::1"), ip("2001:db8:1::2")],
        primary_node_ip: Some(ip("2001:db8::1")),
        localhost_node_ports: true,
        nfacct_ct_state_invalid: true,
        nfacct_localhost_nodeports: true,
        ..RenderConfig::default()
    }
}

/// An IPv6-only model: a ClusterIP, a NodePort with affinity, an eTP=Local LoadBalancer with
/// source ranges, and a Service without endpoints.
fn ipv6_model() -> ProxyModel {
    let cip = svc("ns1", "svc1", "p80", "fd00:172:30::41", 80);
    let mut np = svc("ns2", "svc2", "p80", "fd00:172:30::42", 80);
    np.service_type = ServiceType::NodePort;
    np.node_port = 3001;
    np.session_affinity_timeout = Some(10800);
    let mut lb = svc("ns3", "svc3", "p80", "fd00:172:30::43", 80);
    lb.service_type = ServiceType::LoadBalancer;
    lb.node_port = 3003;
    lb.load_balancer_ips = vec![ip("2001:db8:99::10")];
    lb.source_ranges = SourceRanges::Only(vec![cidr("2001:db8:55::/64")]);
    lb.external_policy_local = true;
    lb.health_check_node_port = 30000;
    let none = svc("ns4", "svc4", "p80", "fd00:172:30::44", 80);
    model(
        vec![cip, np, lb, none],
        vec![
            (spn("ns1", "svc1", "p80"), vec![ep("fd00:10::1", 80)]),
            (
                spn("ns2", "svc2", "p80"),
                vec![ep("fd00:10::2", 80), local(ep("fd00:10::3", 80))],
            ),
            (spn("ns3", "svc3", "p80"), vec![local(ep("fd00:10::4", 80))]),
        ],
    )
}

#[test]
fn ipv6_services_match_the_golden() {
    let text = render_with(&ipv6_model(), &upstream_config_ipv6()).text;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/ipv6-services.iptables"
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap();
    assert_eq!(text, want, "rendered:\n{text}");
}

// === the render cache: partial renders format only the changed services ===

fn changed_set(names: &[(&str, &str)]) -> BTreeSet<ServiceName> {
    names
        .iter()
        .map(|(ns, n)| ServiceName::new(*ns, *n))
        .collect()
}

fn render_cached(
    cache: &mut RenderCache,
    m: &ProxyModel,
    cfg: &RenderConfig,
    changed: Option<&BTreeSet<ServiceName>>,
    shared: SharedChains,
) -> Rendered {
    let scope = match changed {
        Some(changed) => SyncScope::Partial { changed },
        None => SyncScope::Full,
    };
    cache.render(
        &RenderInput {
            model: m,
            config: cfg,
            scope,
            existing_nat_chains: None,
        },
        shared,
    )
}

/// Names of the chains a restore input declares in `table`.
fn declared_chains(text: &str, table: &str) -> Vec<String> {
    let mut in_table = false;
    let mut out = Vec::new();
    for l in text.lines() {
        if let Some(t) = l.strip_prefix('*') {
            in_table = t == table;
        } else if let Some(decl) = l.strip_prefix(':').filter(|_| in_table) {
            out.push(decl.split(' ').next().unwrap_or_default().to_string());
        }
    }
    out
}

#[test]
fn cached_partial_render_equals_a_full_render_for_the_changed_chains() {
    let cfg = upstream_config();
    let mut m = overall_model();
    let mut cache = RenderCache::default();
    let first = render_cached(&mut cache, &m, &cfg, None, SharedChains::Rewrite);
    assert_eq!(
        first.text,
        render_full(&m).text,
        "a cached full render is render()'s"
    );

    // One endpoint more for svc4 (a NodePort service with an external IP).
    m.endpoints
        .get_mut(&spn("ns4", "svc4", "p80"))
        .unwrap()
        .push(ep("10.180.0.6", 80));
    let changed = changed_set(&[("ns4", "svc4")]);
    let partial = render_cached(&mut cache, &m, &cfg, Some(&changed), SharedChains::Rewrite);
    let full = render_full(&m);
    // Byte for byte what a render without a cache writes for the same partial sync.
    assert_eq!(
        partial.text,
        render_partial(&m, &cfg, &[("ns4", "svc4")], None).text
    );
    // The changed service's chains are a full render's, and only they are written.
    let chains = declared_chains(&partial.text, "nat");
    let own: Vec<&String> = chains
        .iter()
        .filter(|c| {
            c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-SEP-") || c.starts_with("KUBE-EXT-")
        })
        .collect();
    assert_eq!(
        own.len(),
        1 + 1 + 3,
        "SVC, EXT and three SEP chains: {own:?}"
    );
    for c in chains {
        assert_eq!(
            chain_text(&partial.text, "nat", &c),
            chain_text(&full.text, "nat", &c),
            "chain {c}"
        );
    }
    for c in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-EXTERNAL-SERVICES"] {
        assert_eq!(
            chain_text(&partial.text, "filter", c),
            chain_text(&full.text, "filter", c)
        );
    }
    // Metrics count the whole ruleset, as a full render does.
    assert_eq!(partial.nat_rules, full.nat_rules);
    assert_eq!(partial.filter_rules, full.filter_rules);
    assert_eq!(
        partial.no_local_endpoints_external,
        full.no_local_endpoints_external
    );
    assert_eq!(
        partial.no_local_endpoints_internal,
        full.no_local_endpoints_internal
    );
    assert_eq!(
        partial.health_check_node_ports,
        full.health_check_node_ports
    );
    assert_eq!(partial.large_cluster, full.large_cluster);
    assert_eq!(
        partial.nat_rules_written,
        Dump::parse(&partial.text).unwrap().rule_count("nat")
    );

    // Deleting a service: its counts leave the totals.
    m.services.remove(&spn("ns1", "svc1", "p80"));
    m.endpoints.remove(&spn("ns1", "svc1", "p80"));
    let changed = changed_set(&[("ns1", "svc1")]);
    let partial = render_cached(&mut cache, &m, &cfg, Some(&changed), SharedChains::Rewrite);
    assert_eq!(
        partial.text,
        render_partial(&m, &cfg, &[("ns1", "svc1")], None).text
    );
    assert_eq!(partial.nat_rules, render_full(&m).nat_rules);
}

#[test]
fn cached_partial_render_does_not_format_unchanged_services() {
    let cfg = upstream_config();
    let mut m = overall_model();
    let mut cache = RenderCache::default();
    render_cached(&mut cache, &m, &cfg, None, SharedChains::Rewrite);
    // svc1's port changes but the sync is told only svc6 changed: a render that formats
    // every service would write svc1's new port; the cached one keeps what it wrote.
    m.services.get_mut(&spn("ns1", "svc1", "p80")).unwrap().port = 81;
    let changed = changed_set(&[("ns6", "svc6")]);
    let r = render_cached(&mut cache, &m, &cfg, Some(&changed), SharedChains::Rewrite);
    let services = chain_text(&r.text, "nat", "KUBE-SERVICES");
    assert!(
        services.contains("-d 172.30.0.41 --dport 80 "),
        "{services}"
    );
    assert!(!services.contains("--dport 81"), "{services}");
    // Other settings: nothing cached is reused.
    let mut cfg2 = cfg.clone();
    cfg2.masquerade_all = true;
    let r = render_cached(&mut cache, &m, &cfg2, Some(&changed), SharedChains::Rewrite);
    assert!(chain_text(&r.text, "nat", "KUBE-SERVICES").contains("-d 172.30.0.41 --dport 81 "));
    // Nor when a port appeared that the cache has not seen (the caller missed a change).
    m.services.insert(
        spn("ns7", "svc7", "p80"),
        svc("ns7", "svc7", "p80", "172.30.0.47", 80),
    );
    let r = render_cached(&mut cache, &m, &cfg2, Some(&changed), SharedChains::Rewrite);
    assert!(chain_text(&r.text, "filter", "KUBE-SERVICES").contains("172.30.0.47"));
}

// === editing the shared chains instead of rewriting them ===

/// A series of partial syncs applied to two fake kernels, one through edits of the shared
/// chains, the other through upstream's rewrite: both end up equal, rule order included.
#[test]
fn edited_shared_chains_equal_a_rewrite_after_each_partial_sync() {
    let cfg = upstream_config();
    let mut m = overall_model();
    let (mut edit_cache, mut rewrite_cache) = (RenderCache::default(), RenderCache::default());
    let first = render_cached(&mut edit_cache, &m, &cfg, None, SharedChains::Edit);
    assert!(!first.edited_shared_chains, "a full sync rewrites");
    render_cached(&mut rewrite_cache, &m, &cfg, None, SharedChains::Rewrite);
    let mut edited = Dump::default();
    edited.apply_restore(&first.text).unwrap();
    let mut rewritten = edited.clone();

    type Step = Box<dyn Fn(&mut ProxyModel)>;
    let steps: Vec<(&str, (&str, &str), Step)> = vec![
        (
            "add a service",
            ("ns7", "svc7"),
            Box::new(|m| {
                let mut s = svc("ns7", "svc7", "p80", "172.30.0.40", 80);
                s.service_type = ServiceType::NodePort;
                s.node_port = 3007;
                s.external_ips = vec![ip("192.168.99.77")];
                m.services.insert(spn("ns7", "svc7", "p80"), s);
                m.endpoints
                    .insert(spn("ns7", "svc7", "p80"), vec![ep("10.180.0.7", 80)]);
            }),
        ),
        (
            "change an endpoint",
            ("ns3", "svc3"),
            Box::new(|m| {
                m.endpoints
                    .insert(spn("ns3", "svc3", "p80"), vec![ep("10.180.0.33", 80)]);
            }),
        ),
        (
            "endpoints appear (filter REJECT becomes a nat jump)",
            ("ns6", "svc6"),
            Box::new(|m| {
                m.endpoints
                    .insert(spn("ns6", "svc6", "p80"), vec![ep("10.180.0.6", 80)]);
            }),
        ),
        (
            "endpoints go (nat jumps become filter REJECTs)",
            ("ns2", "svc2"),
            Box::new(|m| {
                m.endpoints.remove(&spn("ns2", "svc2", "p80"));
            }),
        ),
        (
            "change ports",
            ("ns4", "svc4"),
            Box::new(|m| {
                let s = m.services.get_mut(&spn("ns4", "svc4", "p80")).unwrap();
                s.port = 8080;
                s.node_port = 3044;
            }),
        ),
        (
            "delete a service",
            ("ns1", "svc1"),
            Box::new(|m| {
                m.services.remove(&spn("ns1", "svc1", "p80"));
                m.endpoints.remove(&spn("ns1", "svc1", "p80"));
            }),
        ),
    ];
    for (what, changed, step) in steps {
        step(&mut m);
        let changed = changed_set(&[changed]);
        let e = render_cached(
            &mut edit_cache,
            &m,
            &cfg,
            Some(&changed),
            SharedChains::Edit,
        );
        let r = render_cached(
            &mut rewrite_cache,
            &m,
            &cfg,
            Some(&changed),
            SharedChains::Rewrite,
        );
        assert!(e.edited_shared_chains, "{what}");
        assert!(
            !e.text.contains(":KUBE-SERVICES ") && !e.text.contains(":KUBE-NODEPORTS "),
            "{what}: the shared chains are not flushed:\n{}",
            e.text
        );
        assert!(!e.text.contains(":KUBE-POSTROUTING "), "{what}");
        edited
            .apply_restore(&e.text)
            .unwrap_or_else(|err| panic!("{what}: {err}\n{}", e.text));
        rewritten.apply_restore(&r.text).unwrap();
        assert_eq!(
            canonical(&edited),
            canonical(&rewritten),
            "{what}:\n{}",
            e.text
        );
        assert_eq!(
            (e.nat_rules, e.filter_rules),
            (r.nat_rules, r.filter_rules),
            "{what}"
        );
        assert_eq!(
            e.nat_rules_written,
            e.text
                .lines()
                .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
                .count()
                - e.text
                    .lines()
                    .filter(|l| l.starts_with("-I ") && filter_line(&e.text, l))
                    .count(),
            "{what}: nat rules written"
        );
    }
    // The node-ports jump is still last, and the result is a full sync's.
    let mut fresh = Dump::default();
    fresh.apply_restore(&render_full(&m).text).unwrap();
    let services = |d: &Dump| rules_of(d, "nat", "KUBE-SERVICES");
    assert_eq!(services(&edited), services(&fresh));
    assert!(
        services(&edited)
            .last()
            .unwrap()
            .contains("-j KUBE-NODEPORTS")
    );
}

/// Whether the insert `line` is in the filter part of `text`.
fn filter_line(text: &str, line: &str) -> bool {
    let nat_at = text.find("*nat").unwrap_or(text.len());
    text.find(line).is_some_and(|i| i < nat_at)
}

fn rules_of(d: &Dump, table: &str, chain: &str) -> Vec<String> {
    d.chain(table, chain)
        .map(|c| c.rules.iter().map(|r| r.raw.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn edits_only_touch_the_changed_service() {
    let cfg = upstream_config();
    let mut m = overall_model();
    let mut cache = RenderCache::default();
    render_cached(&mut cache, &m, &cfg, None, SharedChains::Edit);
    // An endpoint change that keeps the service's shared-chain rules: no edit at all.
    m.endpoints
        .get_mut(&spn("ns3", "svc3", "p80"))
        .unwrap()
        .push(ep("10.180.0.30", 80));
    let r = render_cached(
        &mut cache,
        &m,
        &cfg,
        Some(&changed_set(&[("ns3", "svc3")])),
        SharedChains::Edit,
    );
    assert!(r.edited_shared_chains);
    assert!(!r.text.contains("*filter"), "{}", r.text);
    assert!(
        !r.text.contains("-D ") && !r.text.contains("-I "),
        "{}",
        r.text
    );
    // A port change: the service's rules deleted by spec and inserted at their place.
    m.services.get_mut(&spn("ns3", "svc3", "p80")).unwrap().port = 81;
    let r = render_cached(
        &mut cache,
        &m,
        &cfg,
        Some(&changed_set(&[("ns3", "svc3")])),
        SharedChains::Edit,
    );
    let edits: Vec<&str> = r
        .text
        .lines()
        .filter(|l| l.starts_with("-D ") || l.starts_with("-I "))
        .collect();
    assert_eq!(
        edits,
        [
            "-D KUBE-SERVICES -m comment --comment \"ns3/svc3:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK",
            "-I KUBE-SERVICES 5 -m comment --comment \"ns3/svc3:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.43 --dport 81 -j KUBE-SVC-X27LE4BHSL4DOUIK",
        ],
        "{}",
        r.text
    );
}

/// Each endpoint's KUBE-SEP chain is hashed once per render and looked up for the Cluster,
/// Local and affinity rules: every jump and every DNAT must still name the endpoint's own
/// chain, whatever the lists' order (Local lists are subsets of the reachable ones), for
/// small ports (scanned) and large ones (searched).
#[test]
fn every_endpoint_rule_names_the_endpoints_own_chain() {
    let mut services = Vec::new();
    let mut endpoints = Vec::new();
    for (i, count) in [(1u8, 6u8), (2, 20)] {
        let mut s = svc(
            "ns1",
            &format!("svc{i}"),
            "p80",
            &format!("172.30.0.{i}"),
            80,
        );
        s.service_type = ServiceType::NodePort;
        s.node_port = 30000 + u16::from(i);
        s.external_policy_local = true;
        s.session_affinity_timeout = Some(10800);
        services.push(s);
        let eps = (0..count)
            .map(|e| {
                let ep = ep(&format!("10.180.{i}.{e}"), 80);
                // The local ones come last in address order and are a subset.
                if e % 3 == 2 { local(ep) } else { ep }
            })
            .collect();
        endpoints.push((spn("ns1", &format!("svc{i}"), "p80"), eps));
    }
    let r = render_full(&model(services, endpoints));
    let dump = Dump::parse(&r.text).unwrap();
    let (mut jumps, mut dnats) = (0, 0);
    for chain in &dump.chain_names("nat") {
        let Some(c) = dump.chain("nat", chain) else {
            continue;
        };
        for rule in &c.rules {
            let words: Vec<&str> = rule.raw.split(' ').collect();
            let after = |w: &str| words.iter().position(|x| *x == w).map(|p| words[p + 1]);
            let name = |svc: &str| spn("ns1", svc.trim_start_matches('"'), "p80");
            if chain.starts_with("KUBE-SVC-") || chain.starts_with("KUBE-SVL-") {
                // `--comment "ns1/svcN:p80 -> ADDR"`
                let Some(arrow) = words.iter().position(|w| *w == "->") else {
                    continue;
                };
                let svc = words[arrow - 1]
                    .trim_start_matches("\"ns1/")
                    .trim_end_matches(":p80");
                let addr = words[arrow + 1].trim_end_matches('"');
                let sep = crate::backend::netfilter::names::endpoint_chain_for(&name(svc), addr);
                assert_eq!(after("-j"), Some(sep.as_str()), "{}", rule.raw);
                if let Some(recent) = after("--name") {
                    assert_eq!(recent, sep, "{}", rule.raw);
                }
                jumps += 1;
            } else if let Some(addr) = after("--to-destination") {
                let svc = after("--comment").unwrap().trim_start_matches("ns1/");
                let svc = svc.trim_end_matches(":p80");
                assert_eq!(
                    *chain,
                    crate::backend::netfilter::names::endpoint_chain_for(&name(svc), addr)
                );
                dnats += 1;
            }
        }
    }
    // Per endpoint: an affinity check and a jump from SVC; the local ones also from SVL.
    let local = 2 + 6;
    assert_eq!(jumps, 2 * (26 + local));
    assert_eq!(dnats, 26);
}
