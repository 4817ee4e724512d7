//! Golden and packet-flow tests ported from upstream's pkg/proxy/iptables/proxier_test.go
//! and number_generated_rules_test.go (conventions of upstream's NewFakeProxier: pod CIDR
//! 10.0.0.0/8, node IP 192.168.0.2, node name "test-node", mark 0x4000, nfacct counters
//! present, localhost node ports on).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::parse::{Dump, Rule};
use super::render::*;
use super::tracer::{Packet, trace_packet};
use crate::model::{
    Cidr, Endpoint, NodeInfo, ProxyModel, Protocol, ServiceName, ServicePort, ServicePortName,
    ServiceType,
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
        node_ips: vec![ip("127.0.0.1"), ip(TEST_NODE_IP), ip(TEST_NODE_IP_ALT), ip(TEST_EXTERNAL_IP)],
        primary_node_ip: Some(ip(TEST_NODE_IP)),
        localhost_node_ports: true,
        nfacct_ct_state_invalid: true,
        nfacct_localhost_nodeports: true,
        ..RenderConfig::default()
    }
}

/// Builds a model the way the watch layer would: endpoints sorted by `ip:port` and
/// de-duplicated, node "test-node".
fn model(services: Vec<ServicePort>, endpoints: Vec<(ServicePortName, Vec<Endpoint>)>) -> ProxyModel {
    let mut m = ProxyModel {
        node: NodeInfo {
            name: TEST_NODE_NAME.into(),
            present: true,
            ..NodeInfo::default()
        },
        ..ProxyModel::default()
    };
    for s in services {
        m.services.insert(s.name.clone(), s);
    }
    for (name, mut eps) in endpoints {
        eps.sort_by_key(Endpoint::addr_string);
        eps.dedup_by_key(|e| e.addr_string());
        m.endpoints.insert(name, eps);
    }
    m
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
    assert_eq!(r.filter_rules, dump.rule_count("filter"), "filter rule count");
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
    r.comment.as_deref().is_some_and(|c| c.contains("must be the last rule"))
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
    const BUILTIN_TARGETS: [&str; 8] =
        ["ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"];
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
        let created: BTreeSet<&str> =
            t.chains.iter().filter(|c| !c.deleted).map(|c| c.name.as_str()).collect();
        let filled: BTreeSet<&str> =
            t.chains.iter().filter(|c| !c.rules.is_empty()).map(|c| c.name.as_str()).collect();
        let jumped: BTreeSet<&str> = t
            .chains
            .iter()
            .flat_map(|c| c.rules.iter())
            .filter_map(|r| r.jump.as_deref())
            .filter(|j| !BUILTIN_TARGETS.contains(j))
            .collect();
        let missing: Vec<_> = jumped.difference(&created).collect();
        if !missing.is_empty() {
            return Err(format!("{}: jumps to chains not created: {missing:?}", t.name));
        }
        let empty: Vec<_> =
            jumped.difference(&filled).filter(|c| **c != "KUBE-NODEPORTS").collect();
        if !empty.is_empty() {
            return Err(format!("{}: jumps to chains without rules: {empty:?}", t.name));
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
    let not_created = "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n";
    assert!(check_rule_jumps(not_created).unwrap_err().contains("not created"));
    let no_rules = "*filter\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n";
    assert!(check_rule_jumps(no_rules).unwrap_err().contains("without rules"));
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
    s5.source_ranges = vec![cidr("203.0.113.0/25")];
    s5.session_affinity_timeout = Some(10800);

    let s6 = svc("ns6", "svc6", "p80", "172.30.0.46", 80);

    model(
        vec![s1, s2, s3, s4, s5, s6],
        vec![
            (spn("ns1", "svc1", "p80"), vec![ep("10.180.0.1", 80)]),
            (spn("ns2", "svc2", "p80"), vec![ep("10.180.0.2", 80)]),
            (spn("ns3", "svc3", "p80"), vec![ep("10.180.0.3", 80)]),
            (spn("ns4", "svc4", "p80"), vec![ep("10.180.0.4", 80), local(ep("10.180.0.5", 80))]),
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
    assert_eq!(r.active_nat_chains.len(), 16);
}
