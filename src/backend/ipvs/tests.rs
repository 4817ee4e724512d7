//! Golden tests for IPVS-mode rendering, ported from upstream's
//! `pkg/proxy/ipvs/proxier_test.go` expectations (fake proxier conventions: node
//! "test-node", node IP 100.101.102.103, no local detector, mark 0x4000, scheduler rr).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::ipset::{self as sets, IpSetSpec};
use super::render::*;
use super::rules;
use crate::backend::netfilter::LocalDetector;
use crate::backend::netfilter::parse::{Dump, builtin_chains};
use crate::kernel::ipvs::codec::{
    ForwardMethod, IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED2, Protocol as IpvsProtocol,
    RealServer, ServiceFlags, VirtualService,
};
use crate::model::{
    Cidr, Endpoint, IpFamily, NodeInfo, Protocol, ProxyModel, ServiceName, ServicePort,
    ServicePortName, ServiceType, SourceRanges,
};

const NODE: &str = "test-node";
const NODE_IP: &str = "100.101.102.103";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn spn(ns: &str, name: &str, port: &str, proto: Protocol) -> ServicePortName {
    ServicePortName::new(ns, name, port, proto)
}

fn svc(name: &ServicePortName, cluster_ip: &str, port: u16) -> ServicePort {
    ServicePort::basic(name.clone(), ip(cluster_ip), port)
}

fn ep(addr: &str, port: u16) -> Endpoint {
    Endpoint::ready(ip(addr), port)
}

fn local(mut e: Endpoint) -> Endpoint {
    e.is_local = true;
    e
}

fn model(
    services: Vec<ServicePort>,
    endpoints: Vec<(ServicePortName, Vec<Endpoint>)>,
) -> ProxyModel {
    ProxyModel::for_tests(NODE, services, endpoints)
}

/// Upstream's fake proxier: one node IP, no detector, rr, no --random-fully.
fn cfg() -> IpvsConfig {
    IpvsConfig {
        node_ips: vec![ip(NODE_IP)],
        ..IpvsConfig::default()
    }
}

/// Every `-j` target is a chain of the same table or a builtin target, every
/// `--match-set` names a rendered set, and the rule counts are right.
fn check_consistency(d: &IpvsDesired) {
    let dump = Dump::parse(&d.iptables_restore)
        .unwrap_or_else(|e| panic!("unparsable restore input: {e}\n{}", d.iptables_restore));
    assert_eq!(
        d.filter_rules,
        dump.rule_count("filter"),
        "filter rule count"
    );
    assert_eq!(d.nat_rules, dump.rule_count("nat"), "nat rule count");
    let set_names: BTreeSet<&str> = d.ipsets.iter().map(|s| s.name.as_str()).collect();
    const TARGETS: &[&str] = &["ACCEPT", "DROP", "RETURN", "REJECT", "MASQUERADE", "MARK"];
    for table in &dump.tables {
        let chains: BTreeSet<&str> = table.chains.iter().map(|c| c.name.as_str()).collect();
        for chain in &table.chains {
            assert!(
                !builtin_chains(&table.name).contains(&chain.name.as_str()),
                "IPVS mode must not write builtin chain {} in {}",
                chain.name,
                table.name
            );
            for r in &chain.rules {
                let t = r
                    .target()
                    .unwrap_or_else(|| panic!("rule without target: {}", r.raw));
                assert!(
                    chains.contains(t) || TARGETS.contains(&t),
                    "{}: target {t} is neither a {} chain nor a builtin target",
                    r.raw,
                    table.name
                );
                for (i, w) in r.args.iter().enumerate() {
                    if w == "--match-set" {
                        let name = r.args[i + 1].as_str();
                        assert!(set_names.contains(name), "{}: unknown set {name}", r.raw);
                    }
                }
            }
        }
    }
}

fn render_ok(m: &ProxyModel, c: &IpvsConfig) -> IpvsDesired {
    let d = render(m, c);
    check_consistency(&d);
    d
}

fn entries(d: &IpvsDesired, set: &str) -> Vec<String> {
    d.ipset(set)
        .unwrap_or_else(|| panic!("set {set} not rendered"))
        .entries
        .iter()
        .cloned()
        .collect()
}

/// Sets with entries, by name.
fn non_empty_sets(d: &IpvsDesired) -> BTreeMap<String, Vec<String>> {
    d.ipsets
        .iter()
        .filter(|s| !s.entries.is_empty())
        .map(|s| (s.name.clone(), s.entries.iter().cloned().collect()))
        .collect()
}

/// `(VIP:port/proto, [real servers])` for every virtual server, in render order.
fn ipvs_table(d: &IpvsDesired) -> Vec<(String, Vec<String>)> {
    d.services
        .iter()
        .map(|s| {
            let proto = match s.vs.protocol {
                IpvsProtocol::Tcp => "TCP",
                IpvsProtocol::Udp => "UDP",
                IpvsProtocol::Sctp => "SCTP",
                IpvsProtocol::Other(_) => "?",
            };
            (
                format!("{}:{}/{proto}", s.vs.address, s.vs.port),
                s.dests
                    .iter()
                    .map(|r| format!("{}:{}", r.address, r.port))
                    .collect(),
            )
        })
        .collect()
}

fn vs_of<'a>(d: &'a IpvsDesired, addr: &str, port: u16) -> &'a DesiredService {
    d.services
        .iter()
        .find(|s| s.vs.address == ip(addr) && s.vs.port == port)
        .unwrap_or_else(|| panic!("no virtual server {addr}:{port} in {:?}", ipvs_table(d)))
}

/// The rules of `chain` in `table`, as `(target, match-set or "")` like upstream's
/// `checkIptables` expectations.
fn chain_rules(d: &IpvsDesired, table: &str, chain: &str) -> Vec<(String, String)> {
    let dump = Dump::parse(&d.iptables_restore).unwrap();
    dump.chain(table, chain)
        .unwrap_or_else(|| panic!("no {table} chain {chain}"))
        .rules
        .iter()
        .map(|r| {
            let set = r
                .args
                .iter()
                .position(|w| w == "--match-set")
                .map(|i| r.args[i + 1].clone())
                .unwrap_or_default();
            (r.target().unwrap_or("").to_string(), set)
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// === virtual servers ===

#[test]
fn cluster_ip_services_with_and_without_endpoints() {
    // TestClusterIP / TestClusterIPNoEndpoint: one VS per ClusterIP:port, weight-1 NAT real
    // servers, ClusterIPs bound to kube-ipvs0 and listed in KUBE-CLUSTER-IP/KUBE-IPVS-IPS.
    let p80 = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let p8080 = spn("ns2", "svc2", "p8080", Protocol::Tcp);
    let empty = spn("ns3", "svc3", "p80", Protocol::Udp);
    let m = model(
        vec![
            svc(&p80, "10.20.30.41", 80),
            svc(&p8080, "10.20.30.42", 8080),
            svc(&empty, "10.20.30.43", 80),
        ],
        vec![
            (p80.clone(), vec![ep("10.180.0.1", 80)]),
            (
                p8080.clone(),
                vec![ep("10.180.0.2", 8080), ep("10.180.0.3", 8080)],
            ),
        ],
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(
        ipvs_table(&d),
        vec![
            ("10.20.30.41:80/TCP".to_string(), strs(&["10.180.0.1:80"])),
            (
                "10.20.30.42:8080/TCP".to_string(),
                strs(&["10.180.0.2:8080", "10.180.0.3:8080"])
            ),
            ("10.20.30.43:80/UDP".to_string(), vec![]),
        ]
    );
    let vs = &vs_of(&d, "10.20.30.41", 80).vs;
    let mut want = VirtualService::new(ip("10.20.30.41"), IpvsProtocol::Tcp, 80, "rr");
    want.flags = ServiceFlags::exactly(0);
    assert_eq!(vs, &want);
    assert_eq!(
        vs_of(&d, "10.20.30.41", 80).dests,
        vec![RealServer::new(ip("10.180.0.1"), 80, 1)]
    );
    assert_eq!(
        vs_of(&d, "10.20.30.41", 80).dests[0].forward,
        ForwardMethod::Masq
    );
    assert!(!vs_of(&d, "10.20.30.41", 80).local_only);
    assert_eq!(
        non_empty_sets(&d),
        BTreeMap::from([
            (
                sets::CLUSTER_IP.to_string(),
                strs(&[
                    "10.20.30.41,tcp:80",
                    "10.20.30.42,tcp:8080",
                    "10.20.30.43,udp:80"
                ])
            ),
            (
                sets::IPVS_IPS.to_string(),
                strs(&["10.20.30.41", "10.20.30.42", "10.20.30.43"])
            ),
        ])
    );
    assert_eq!(
        d.bound_addrs,
        BTreeSet::from([ip("10.20.30.41"), ip("10.20.30.42"), ip("10.20.30.43")])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_SERVICES),
        pairs(&[
            ("RETURN", ""),
            ("KUBE-MARK-MASQ", sets::CLUSTER_IP),
            ("KUBE-NODE-PORT", ""),
            ("ACCEPT", sets::CLUSTER_IP),
        ])
    );
}

#[test]
fn every_set_of_upstream_is_rendered_in_order_even_when_empty() {
    let d = render_ok(&model(vec![], vec![]), &cfg());
    let got: Vec<(&str, &str)> = d
        .ipsets
        .iter()
        .map(|s| (s.name.as_str(), s.set_type.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("KUBE-LOOP-BACK", "hash:ip,port,ip"),
            ("KUBE-CLUSTER-IP", "hash:ip,port"),
            ("KUBE-EXTERNAL-IP", "hash:ip,port"),
            ("KUBE-EXTERNAL-IP-LOCAL", "hash:ip,port"),
            ("KUBE-LOAD-BALANCER", "hash:ip,port"),
            ("KUBE-LOAD-BALANCER-FW", "hash:ip,port"),
            ("KUBE-LOAD-BALANCER-LOCAL", "hash:ip,port"),
            ("KUBE-LOAD-BALANCER-SOURCE-IP", "hash:ip,port,ip"),
            ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "hash:ip,port,net"),
            ("KUBE-NODE-PORT-TCP", "bitmap:port"),
            ("KUBE-NODE-PORT-LOCAL-TCP", "bitmap:port"),
            ("KUBE-NODE-PORT-UDP", "bitmap:port"),
            ("KUBE-NODE-PORT-LOCAL-UDP", "bitmap:port"),
            ("KUBE-NODE-PORT-SCTP-HASH", "hash:ip,port"),
            ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "hash:ip,port"),
            ("KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port"),
            ("KUBE-IPVS-IPS", "hash:ip"),
        ]
    );
    assert!(d.ipsets.iter().all(|s| s.entries.is_empty()));
    assert!(d.services.is_empty() && d.bound_addrs.is_empty());
    // With no sets filled, only the unconditional rules remain.
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_SERVICES),
        pairs(&[("RETURN", ""), ("KUBE-NODE-PORT", "")])
    );
    assert_eq!(d.nat_rules, 7);
    assert_eq!(d.filter_rules, 10);
}

fn node_port_svc(name: &ServicePortName, node_port: u16) -> ServicePort {
    let mut s = svc(name, "10.20.30.41", 80);
    s.service_type = ServiceType::NodePort;
    s.node_port = node_port;
    s
}

#[test]
fn node_port_tcp_gets_a_virtual_server_per_node_ip_and_a_bitmap_entry() {
    // TestNodePortIPv4 "1 service with node port, has 2 endpoints" (IPv4 part), with two
    // node IPs: one VS per node IP, none on loopback.
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let m = model(
        vec![node_port_svc(&n, 3001)],
        vec![(n.clone(), vec![ep("10.180.0.1", 80)])],
    );
    let mut c = cfg();
    c.node_ips = vec![ip(NODE_IP), ip("127.0.0.1"), ip("100.101.102.104")];
    let d = render_ok(&m, &c);
    assert_eq!(
        ipvs_table(&d),
        vec![
            ("10.20.30.41:80/TCP".to_string(), strs(&["10.180.0.1:80"])),
            (
                "100.101.102.103:3001/TCP".to_string(),
                strs(&["10.180.0.1:80"])
            ),
            (
                "100.101.102.104:3001/TCP".to_string(),
                strs(&["10.180.0.1:80"])
            ),
        ]
    );
    assert_eq!(entries(&d, sets::NODE_PORT_TCP), strs(&["3001"]));
    assert!(entries(&d, sets::NODE_PORT_LOCAL_TCP).is_empty());
    // Node IPs are never bound to kube-ipvs0.
    assert_eq!(d.bound_addrs, BTreeSet::from([ip("10.20.30.41")]));
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_NODE_PORT),
        pairs(&[("KUBE-MARK-MASQ", sets::NODE_PORT_TCP)])
    );
    let dump = Dump::parse(&d.iptables_restore).unwrap();
    let np = &dump.chain("nat", rules::KUBE_NODE_PORT).unwrap().rules[0];
    assert_eq!(
        np.raw,
        "-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for \
         masquerade purpose\" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ"
    );
}

#[test]
fn node_port_udp_and_its_iptables_chains() {
    // TestNodePortIPv4 "1 UDP service with node port, has endpoints".
    let n = spn("ns1", "svc1", "p80", Protocol::Udp);
    let m = model(
        vec![node_port_svc(&n, 3001)],
        vec![(n.clone(), vec![ep("10.180.0.1", 80)])],
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(
        ipvs_table(&d),
        vec![
            ("10.20.30.41:80/UDP".to_string(), strs(&["10.180.0.1:80"])),
            (
                "100.101.102.103:3001/UDP".to_string(),
                strs(&["10.180.0.1:80"])
            ),
        ]
    );
    assert_eq!(entries(&d, sets::NODE_PORT_UDP), strs(&["3001"]));
    assert!(entries(&d, sets::NODE_PORT_TCP).is_empty());
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_NODE_PORT),
        pairs(&[("KUBE-MARK-MASQ", sets::NODE_PORT_UDP)])
    );
    assert_eq!(
        chain_rules(&d, "filter", rules::KUBE_NODE_PORT),
        pairs(&[("ACCEPT", sets::HEALTH_CHECK_NODE_PORT)])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_SERVICES),
        pairs(&[
            ("RETURN", ""),
            ("KUBE-MARK-MASQ", sets::CLUSTER_IP),
            ("KUBE-NODE-PORT", ""),
            ("ACCEPT", sets::CLUSTER_IP),
        ])
    );
}

#[test]
fn node_port_without_endpoints_still_gets_virtual_servers() {
    // TestNodePortIPv4 "service has node port but no endpoints".
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let d = render_ok(&model(vec![node_port_svc(&n, 3001)], vec![]), &cfg());
    assert_eq!(
        ipvs_table(&d),
        vec![
            ("10.20.30.41:80/TCP".to_string(), vec![]),
            ("100.101.102.103:3001/TCP".to_string(), vec![]),
        ]
    );
}

#[test]
fn node_port_sctp_uses_hash_entries_per_node_ip() {
    // TestNodePortIPv4 "node port service with protocol sctp on a node with multiple nodeIPs".
    let n = spn("ns1", "svc1", "p80", Protocol::Sctp);
    let m = model(
        vec![node_port_svc(&n, 3001)],
        vec![(n.clone(), vec![ep("10.180.0.1", 80)])],
    );
    let mut c = cfg();
    c.node_ips = vec![
        ip("100.101.102.103"),
        ip("100.101.102.104"),
        ip("100.101.102.105"),
    ];
    let d = render_ok(&m, &c);
    assert_eq!(d.services.len(), 4);
    for a in ["100.101.102.103", "100.101.102.104", "100.101.102.105"] {
        let s = vs_of(&d, a, 3001);
        assert_eq!(s.vs.protocol, IpvsProtocol::Sctp);
        assert_eq!(s.dests, vec![RealServer::new(ip("10.180.0.1"), 80, 1)]);
    }
    assert_eq!(
        entries(&d, sets::NODE_PORT_SCTP),
        strs(&[
            "100.101.102.103,sctp:3001",
            "100.101.102.104,sctp:3001",
            "100.101.102.105,sctp:3001"
        ])
    );
    assert!(entries(&d, sets::NODE_PORT_LOCAL_SCTP).is_empty());
    let dump = Dump::parse(&d.iptables_restore).unwrap();
    let r = &dump.chain("nat", rules::KUBE_NODE_PORT).unwrap().rules[0];
    assert!(r.raw.starts_with("-A KUBE-NODE-PORT -p sctp -m comment"));
    assert!(
        r.raw
            .ends_with("--match-set KUBE-NODE-PORT-SCTP-HASH dst,dst -j KUBE-MARK-MASQ")
    );
}

#[test]
fn node_port_sctp_with_local_policy() {
    // TestNodePortIPv4 "node port service with protocol sctp and externalTrafficPolicy local":
    // the ClusterIP keeps both endpoints, the node port only the local one.
    let n = spn("ns1", "svc1", "p80", Protocol::Sctp);
    let mut s = node_port_svc(&n, 3001);
    s.external_policy_local = true;
    let m = model(
        vec![s],
        vec![(
            n.clone(),
            vec![local(ep("10.180.0.1", 80)), ep("10.180.1.1", 80)],
        )],
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(
        ipvs_table(&d),
        vec![
            (
                "10.20.30.41:80/SCTP".to_string(),
                strs(&["10.180.0.1:80", "10.180.1.1:80"])
            ),
            (
                "100.101.102.103:3001/SCTP".to_string(),
                strs(&["10.180.0.1:80"])
            ),
        ]
    );
    assert!(vs_of(&d, NODE_IP, 3001).local_only);
    assert!(!vs_of(&d, "10.20.30.41", 80).local_only);
    assert_eq!(
        entries(&d, sets::NODE_PORT_SCTP),
        strs(&["100.101.102.103,sctp:3001"])
    );
    assert_eq!(
        entries(&d, sets::NODE_PORT_LOCAL_SCTP),
        strs(&["100.101.102.103,sctp:3001"])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_NODE_PORT),
        pairs(&[
            ("RETURN", sets::NODE_PORT_LOCAL_SCTP),
            ("KUBE-MARK-MASQ", sets::NODE_PORT_SCTP),
        ])
    );
    assert_eq!(
        chain_rules(&d, "filter", rules::KUBE_NODE_PORT),
        pairs(&[("ACCEPT", sets::HEALTH_CHECK_NODE_PORT)])
    );
}

#[test]
fn only_local_node_ports() {
    // TestOnlyLocalNodePorts.
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = node_port_svc(&n, 3001);
    s.external_policy_local = true;
    let m = model(
        vec![s],
        vec![(
            n.clone(),
            vec![local(ep("10.180.0.1", 80)), ep("10.180.1.1", 80)],
        )],
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(d.services.len(), 2);
    assert_eq!(
        vs_of(&d, NODE_IP, 3001).dests,
        vec![RealServer::new(ip("10.180.0.1"), 80, 1)]
    );
    assert_eq!(entries(&d, sets::NODE_PORT_TCP), strs(&["3001"]));
    assert_eq!(entries(&d, sets::NODE_PORT_LOCAL_TCP), strs(&["3001"]));
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_SERVICES),
        pairs(&[
            ("RETURN", ""),
            ("KUBE-MARK-MASQ", sets::CLUSTER_IP),
            ("KUBE-NODE-PORT", ""),
            ("ACCEPT", sets::CLUSTER_IP),
        ])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_NODE_PORT),
        pairs(&[
            ("RETURN", sets::NODE_PORT_LOCAL_TCP),
            ("KUBE-MARK-MASQ", sets::NODE_PORT_TCP),
        ])
    );
    // Hairpin for the local endpoint only.
    assert_eq!(
        entries(&d, sets::LOOP_BACK),
        strs(&["10.180.0.1,tcp:80,10.180.0.1"])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_POSTROUTING)[0],
        ("MASQUERADE".to_string(), sets::LOOP_BACK.to_string())
    );
}

#[test]
fn node_ports_need_node_ips_and_skip_the_health_check_port_without_them() {
    // Upstream `continue`s the service loop when no node IP is known, which also skips the
    // health-check node port entry of that service.
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = node_port_svc(&n, 3001);
    s.service_type = ServiceType::LoadBalancer;
    s.external_policy_local = true;
    s.health_check_node_port = 30000;
    let m = model(
        vec![s],
        vec![(n.clone(), vec![local(ep("10.180.0.1", 80))])],
    );
    let mut c = cfg();
    c.node_ips = vec![ip("127.0.0.1")];
    let d = render_ok(&m, &c);
    assert_eq!(
        ipvs_table(&d),
        vec![("10.20.30.41:80/TCP".to_string(), strs(&["10.180.0.1:80"]))]
    );
    assert!(entries(&d, sets::NODE_PORT_TCP).is_empty());
    assert!(entries(&d, sets::HEALTH_CHECK_NODE_PORT).is_empty());
    // The health check server is still told about it.
    assert_eq!(
        d.health_checks,
        BTreeMap::from([(ServiceName::new("ns1", "svc1"), (30000, 1))])
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(entries(&d, sets::HEALTH_CHECK_NODE_PORT), strs(&["30000"]));
}

#[test]
fn health_check_node_ports_only_for_local_load_balancers() {
    // TestHealthCheckNodePort: eTP=Cluster services' healthCheckNodePort is ignored.
    let mut services = Vec::new();
    for (name, hc, local_policy) in [
        ("valid-svc1", 30000, true),
        ("valid-svc2", 30001, true),
        ("invalid-svc3", 30002, false),
    ] {
        let n = spn("ns1", name, "p80", Protocol::Tcp);
        let mut s = node_port_svc(&n, 3000);
        s.service_type = ServiceType::LoadBalancer;
        s.external_policy_local = local_policy;
        s.health_check_node_port = hc;
        services.push(s);
    }
    let d = render_ok(&model(services, vec![]), &cfg());
    assert_eq!(
        entries(&d, sets::HEALTH_CHECK_NODE_PORT),
        strs(&["30000", "30001"])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_NODE_PORT),
        pairs(&[
            ("RETURN", sets::NODE_PORT_LOCAL_TCP),
            ("KUBE-MARK-MASQ", sets::NODE_PORT_TCP),
        ])
    );
    assert_eq!(
        d.health_checks
            .keys()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>(),
        vec!["valid-svc1", "valid-svc2"]
    );
}

fn lb_svc(name: &ServicePortName) -> ServicePort {
    let mut s = svc(name, "10.20.30.41", 80);
    s.service_type = ServiceType::LoadBalancer;
    s.load_balancer_ips = vec![ip("1.2.3.4")];
    s
}

#[test]
fn load_balancer() {
    // TestLoadBalancer.
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = lb_svc(&n);
    s.node_port = 3001;
    let m = model(vec![s], vec![(n.clone(), vec![ep("10.180.0.1", 80)])]);
    let d = render_ok(&m, &cfg());
    assert_eq!(
        ipvs_table(&d),
        vec![
            ("1.2.3.4:80/TCP".to_string(), strs(&["10.180.0.1:80"])),
            ("10.20.30.41:80/TCP".to_string(), strs(&["10.180.0.1:80"])),
            (
                "100.101.102.103:3001/TCP".to_string(),
                strs(&["10.180.0.1:80"])
            ),
        ]
    );
    assert_eq!(entries(&d, sets::LOAD_BALANCER), strs(&["1.2.3.4,tcp:80"]));
    assert!(entries(&d, sets::LOAD_BALANCER_LOCAL).is_empty());
    assert!(entries(&d, sets::LOAD_BALANCER_FW).is_empty());
    // LB IPs are bound to kube-ipvs0 unless already local.
    assert_eq!(
        d.bound_addrs,
        BTreeSet::from([ip("1.2.3.4"), ip("10.20.30.41")])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_SERVICES),
        pairs(&[
            ("RETURN", ""),
            ("KUBE-LOAD-BALANCER", sets::LOAD_BALANCER),
            ("KUBE-MARK-MASQ", sets::CLUSTER_IP),
            ("KUBE-NODE-PORT", ""),
            ("ACCEPT", sets::CLUSTER_IP),
            ("ACCEPT", sets::LOAD_BALANCER),
        ])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_LOAD_BALANCER),
        pairs(&[("KUBE-MARK-MASQ", "")])
    );
    let mut c = cfg();
    c.host_addrs = vec![ip("1.2.3.4")];
    let d = render_ok(&m, &c);
    assert_eq!(d.bound_addrs, BTreeSet::from([ip("10.20.30.41")]));
    assert_eq!(entries(&d, sets::IPVS_IPS), strs(&["10.20.30.41"]));
    assert!(d.services.iter().any(|s| s.vs.address == ip("1.2.3.4")));
}

#[test]
fn only_local_load_balancing() {
    // TestOnlyLocalLoadBalancing.
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = lb_svc(&n);
    s.node_port = 3001;
    s.external_policy_local = true;
    let m = model(
        vec![s],
        vec![(
            n.clone(),
            vec![local(ep("10.180.0.1", 80)), ep("10.180.1.1", 80)],
        )],
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(
        ipvs_table(&d),
        vec![
            ("1.2.3.4:80/TCP".to_string(), strs(&["10.180.0.1:80"])),
            (
                "10.20.30.41:80/TCP".to_string(),
                strs(&["10.180.0.1:80", "10.180.1.1:80"])
            ),
            (
                "100.101.102.103:3001/TCP".to_string(),
                strs(&["10.180.0.1:80"])
            ),
        ]
    );
    assert_eq!(entries(&d, sets::LOAD_BALANCER), strs(&["1.2.3.4,tcp:80"]));
    assert_eq!(
        entries(&d, sets::LOAD_BALANCER_LOCAL),
        strs(&["1.2.3.4,tcp:80"])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_LOAD_BALANCER),
        pairs(&[
            ("RETURN", sets::LOAD_BALANCER_LOCAL),
            ("KUBE-MARK-MASQ", "")
        ])
    );
    assert_eq!(d.no_local_endpoints_external, 0);
}

#[test]
fn load_balancer_source_ranges_without_the_node() {
    // TestLoadBalancerSourceRanges: the node IP is outside 10.0.0.0/8, so the node itself is
    // blocked from the LB by KUBE-IPVS-OUT-FILTER (#119656).
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = lb_svc(&n);
    s.source_ranges = SourceRanges::Only(vec![cidr("10.0.0.0/8")]);
    let m = model(vec![s], vec![(n.clone(), vec![ep("10.180.0.1", 80)])]);
    let mut c = cfg();
    c.primary_node_ip = Some(ip(NODE_IP));
    let d = render_ok(&m, &c);
    assert_eq!(
        vs_of(&d, "1.2.3.4", 80).dests,
        vec![RealServer::new(ip("10.180.0.1"), 80, 1)]
    );
    assert_eq!(
        non_empty_sets(&d),
        BTreeMap::from([
            (sets::CLUSTER_IP.to_string(), strs(&["10.20.30.41,tcp:80"])),
            (sets::LOAD_BALANCER.to_string(), strs(&["1.2.3.4,tcp:80"])),
            (
                sets::LOAD_BALANCER_FW.to_string(),
                strs(&["1.2.3.4,tcp:80"])
            ),
            (
                sets::LOAD_BALANCER_SOURCE_CIDR.to_string(),
                strs(&["1.2.3.4,tcp:80,10.0.0.0/8"])
            ),
            (
                sets::IPVS_IPS.to_string(),
                strs(&["1.2.3.4", "10.20.30.41"])
            ),
        ])
    );
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_SERVICES),
        pairs(&[
            ("RETURN", ""),
            ("KUBE-LOAD-BALANCER", sets::LOAD_BALANCER),
            ("KUBE-MARK-MASQ", sets::CLUSTER_IP),
            ("KUBE-NODE-PORT", ""),
            ("ACCEPT", sets::CLUSTER_IP),
            ("ACCEPT", sets::LOAD_BALANCER),
        ])
    );
    assert_eq!(
        chain_rules(&d, "filter", rules::KUBE_PROXY_FIREWALL),
        pairs(&[("KUBE-SOURCE-RANGES-FIREWALL", sets::LOAD_BALANCER_FW)])
    );
    assert_eq!(
        chain_rules(&d, "filter", rules::KUBE_SOURCE_RANGES_FIREWALL),
        pairs(&[("RETURN", sets::LOAD_BALANCER_SOURCE_CIDR), ("DROP", "")])
    );
    let dump = Dump::parse(&d.iptables_restore).unwrap();
    let out: Vec<&str> = dump
        .chain("filter", rules::KUBE_IPVS_OUT_FILTER)
        .unwrap()
        .rules
        .iter()
        .map(|r| r.raw.as_str())
        .collect();
    assert_eq!(
        out,
        vec![
            "-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP"
        ]
    );
}

/// Every source range unreadable (issue 7, item 8): the load balancer is still firewalled,
/// with no range admitted, so external traffic to it is dropped rather than let in.
#[test]
fn load_balancer_source_ranges_with_none_readable_admit_nobody() {
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = lb_svc(&n);
    s.source_ranges = SourceRanges::Only(Vec::new());
    let m = model(vec![s], vec![(n.clone(), vec![ep("10.180.0.1", 80)])]);
    let mut c = cfg();
    c.primary_node_ip = Some(ip(NODE_IP));
    let d = render_ok(&m, &c);
    let sets = non_empty_sets(&d);
    assert_eq!(
        sets.get(sets::LOAD_BALANCER_FW),
        Some(&strs(&["1.2.3.4,tcp:80"]))
    );
    assert_eq!(sets.get(sets::LOAD_BALANCER_SOURCE_CIDR), None);
    assert_eq!(sets.get(sets::LOAD_BALANCER_SOURCE_IP), None);
    assert_eq!(
        chain_rules(&d, "filter", rules::KUBE_PROXY_FIREWALL),
        pairs(&[("KUBE-SOURCE-RANGES-FIREWALL", sets::LOAD_BALANCER_FW)])
    );
    let drops = chain_rules(&d, "filter", rules::KUBE_SOURCE_RANGES_FIREWALL);
    assert_eq!(
        drops.last(),
        Some(&("DROP".to_string(), String::new())),
        "{drops:?}"
    );
    // Nor may the node itself reach it (no range holds the node IP).
    let dump = Dump::parse(&d.iptables_restore).unwrap();
    let out = &dump
        .chain("filter", rules::KUBE_IPVS_OUT_FILTER)
        .unwrap()
        .rules;
    assert_eq!(out.len(), 1, "{out:?}");
}

#[test]
fn load_balancer_source_ranges_containing_the_node() {
    // A range holding the node IP admits LB-sourced traffic (KUBE-LOAD-BALANCER-SOURCE-IP)
    // and adds no OUT-FILTER rule.
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = lb_svc(&n);
    s.source_ranges = SourceRanges::Only(vec![cidr("203.0.113.0/24"), cidr("100.101.0.0/16")]);
    let m = model(vec![s], vec![(n.clone(), vec![ep("10.180.0.1", 80)])]);
    let mut c = cfg();
    c.primary_node_ip = Some(ip(NODE_IP));
    let d = render_ok(&m, &c);
    assert_eq!(
        entries(&d, sets::LOAD_BALANCER_SOURCE_CIDR),
        strs(&[
            "1.2.3.4,tcp:80,100.101.0.0/16",
            "1.2.3.4,tcp:80,203.0.113.0/24"
        ])
    );
    assert_eq!(
        entries(&d, sets::LOAD_BALANCER_SOURCE_IP),
        strs(&["1.2.3.4,tcp:80,1.2.3.4"])
    );
    assert!(chain_rules(&d, "filter", rules::KUBE_IPVS_OUT_FILTER).is_empty());
    assert_eq!(
        chain_rules(&d, "filter", rules::KUBE_SOURCE_RANGES_FIREWALL),
        pairs(&[
            ("RETURN", sets::LOAD_BALANCER_SOURCE_CIDR),
            ("RETURN", sets::LOAD_BALANCER_SOURCE_IP),
            ("DROP", ""),
        ])
    );
}

#[test]
fn external_ips_cluster_and_local_policy() {
    // TestExternalIPs / TestOnlyLocalExternalIPs / TestExternalIPsNoEndpoint.
    let a = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let b = spn("ns1", "svc2", "p80", Protocol::Tcp);
    let none = spn("ns1", "svc3", "p80", Protocol::Tcp);
    let mut sa = svc(&a, "10.20.30.41", 80);
    sa.external_ips = vec![ip("50.60.70.81"), ip("127.0.0.1"), ip("192.168.99.11")];
    let mut sb = svc(&b, "10.20.30.42", 80);
    sb.service_type = ServiceType::NodePort;
    sb.node_port = 3002;
    sb.external_ips = vec![ip("50.60.70.82")];
    sb.external_policy_local = true;
    let mut sn = svc(&none, "10.20.30.43", 80);
    sn.external_ips = vec![ip("50.60.70.83")];
    let m = model(
        vec![sa, sb, sn],
        vec![
            (a.clone(), vec![ep("10.180.0.1", 80)]),
            (
                b.clone(),
                vec![local(ep("10.180.0.2", 80)), ep("10.180.1.1", 80)],
            ),
        ],
    );
    let mut c = cfg();
    // 192.168.99.11 is on another interface: it gets a VS but is not bound to kube-ipvs0.
    // Loopback addresses do not count as local (upstream's nodeAddressSet skips them).
    c.host_addrs = vec![ip("127.0.0.1"), ip(NODE_IP), ip("192.168.99.11")];
    let d = render_ok(&m, &c);
    assert_eq!(
        vs_of(&d, "50.60.70.81", 80).dests,
        vec![RealServer::new(ip("10.180.0.1"), 80, 1)]
    );
    assert_eq!(
        vs_of(&d, "127.0.0.1", 80).dests,
        vec![RealServer::new(ip("10.180.0.1"), 80, 1)]
    );
    assert_eq!(
        vs_of(&d, "50.60.70.82", 80).dests,
        vec![RealServer::new(ip("10.180.0.2"), 80, 1)]
    );
    assert!(vs_of(&d, "50.60.70.82", 80).local_only);
    assert!(vs_of(&d, "50.60.70.83", 80).dests.is_empty());
    assert_eq!(
        entries(&d, sets::EXTERNAL_IP),
        strs(&[
            "127.0.0.1,tcp:80",
            "192.168.99.11,tcp:80",
            "50.60.70.81,tcp:80",
            "50.60.70.83,tcp:80"
        ])
    );
    assert_eq!(
        entries(&d, sets::EXTERNAL_IP_LOCAL),
        strs(&["50.60.70.82,tcp:80"])
    );
    assert!(vs_of(&d, "192.168.99.11", 80).dests.len() == 1);
    assert!(!d.bound_addrs.contains(&ip("192.168.99.11")));
    assert!(!entries(&d, sets::IPVS_IPS).contains(&"192.168.99.11".to_string()));
    for a in ["127.0.0.1", "50.60.70.81", "50.60.70.82", "50.60.70.83"] {
        assert!(d.bound_addrs.contains(&ip(a)), "{a} not bound");
    }
    // TestAcceptIPVSTraffic order; the LOCAL set gets the two ACCEPTs but no MARK-MASQ.
    assert_eq!(
        chain_rules(&d, "nat", rules::KUBE_SERVICES),
        pairs(&[
            ("RETURN", ""),
            ("KUBE-MARK-MASQ", sets::CLUSTER_IP),
            ("KUBE-MARK-MASQ", sets::EXTERNAL_IP),
            ("ACCEPT", sets::EXTERNAL_IP),
            ("ACCEPT", sets::EXTERNAL_IP),
            ("ACCEPT", sets::EXTERNAL_IP_LOCAL),
            ("ACCEPT", sets::EXTERNAL_IP_LOCAL),
            ("KUBE-NODE-PORT", ""),
            ("ACCEPT", sets::CLUSTER_IP),
        ])
    );
    let dump = Dump::parse(&d.iptables_restore).unwrap();
    let raw: Vec<&str> = dump
        .chain("nat", rules::KUBE_SERVICES)
        .unwrap()
        .rules
        .iter()
        .map(|r| r.raw.as_str())
        .collect();
    let ext = "-A KUBE-SERVICES -m comment --comment \"Kubernetes service external ip + port for \
               masquerade and filter purpose\" -m set --match-set KUBE-EXTERNAL-IP dst,dst";
    assert_eq!(raw[2], format!("{ext} -j KUBE-MARK-MASQ"));
    assert_eq!(
        raw[3],
        format!("{ext} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
    );
    assert_eq!(
        raw[4],
        format!("{ext} -m addrtype --dst-type LOCAL -j ACCEPT")
    );
}

#[test]
fn external_local_without_local_endpoints_falls_back_to_cluster_endpoints() {
    // Upstream #97081: the external VS gets the cluster endpoints, and the service is
    // counted in sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"} once,
    // however many ports and VIPs it has.
    let p1 = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let p2 = spn("ns1", "svc1", "p81", Protocol::Tcp);
    let mut s1 = node_port_svc(&p1, 3001);
    s1.external_policy_local = true;
    s1.external_ips = vec![ip("50.60.70.81")];
    let mut s2 = svc(&p2, "10.20.30.41", 81);
    s2.service_type = ServiceType::NodePort;
    s2.node_port = 3002;
    s2.external_policy_local = true;
    let m = model(
        vec![s1, s2],
        vec![
            (p1.clone(), vec![ep("10.180.1.1", 80)]),
            (p2.clone(), vec![ep("10.180.1.1", 81)]),
        ],
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(
        vs_of(&d, NODE_IP, 3001).dests,
        vec![RealServer::new(ip("10.180.1.1"), 80, 1)]
    );
    assert_eq!(
        vs_of(&d, "50.60.70.81", 80).dests,
        vec![RealServer::new(ip("10.180.1.1"), 80, 1)]
    );
    assert_eq!(d.no_local_endpoints_external, 1);
    assert_eq!(d.no_local_endpoints_internal, 0);
    // No endpoints anywhere: nothing to count.
    let d = render_ok(
        &model(m.services.values().cloned().collect(), vec![]),
        &cfg(),
    );
    assert_eq!(d.no_local_endpoints_external, 0);
}

#[test]
fn internal_traffic_policy_local() {
    // iTP=Local: the ClusterIP VS only gets local endpoints; with none it gets no real
    // server (there are no cluster endpoints to fall back to) and is counted.
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = svc(&n, "10.20.30.41", 80);
    s.internal_policy_local = true;
    let m = model(
        vec![s.clone()],
        vec![(
            n.clone(),
            vec![local(ep("10.180.0.1", 80)), ep("10.180.1.1", 80)],
        )],
    );
    let d = render_ok(&m, &cfg());
    let cs = vs_of(&d, "10.20.30.41", 80);
    assert_eq!(cs.dests, vec![RealServer::new(ip("10.180.0.1"), 80, 1)]);
    assert!(cs.local_only);
    assert_eq!(d.no_local_endpoints_internal, 0);

    let m = model(vec![s], vec![(n.clone(), vec![ep("10.180.1.1", 80)])]);
    let d = render_ok(&m, &cfg());
    assert!(vs_of(&d, "10.20.30.41", 80).dests.is_empty());
    assert_eq!(d.no_local_endpoints_internal, 1);
    assert_eq!(d.no_local_endpoints_external, 0);
}

#[test]
fn terminating_endpoints_are_used_only_as_a_fallback() {
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut term = ep("10.180.0.2", 80);
    term.ready = false;
    term.terminating = true;
    let mut gone = ep("10.180.0.3", 80);
    gone.ready = false;
    gone.serving = false;
    let s = svc(&n, "10.20.30.41", 80);
    let d = render_ok(
        &model(
            vec![s.clone()],
            vec![(
                n.clone(),
                vec![ep("10.180.0.1", 80), term.clone(), gone.clone()],
            )],
        ),
        &cfg(),
    );
    assert_eq!(
        vs_of(&d, "10.20.30.41", 80).dests,
        vec![RealServer::new(ip("10.180.0.1"), 80, 1)]
    );
    let d = render_ok(&model(vec![s], vec![(n.clone(), vec![term, gone])]), &cfg());
    assert_eq!(
        vs_of(&d, "10.20.30.41", 80).dests,
        vec![RealServer::new(ip("10.180.0.2"), 80, 1)]
    );
}

#[test]
fn loop_back_set_lists_every_local_endpoint_per_protocol() {
    // Hairpin entries come from all local endpoints, whatever their state.
    let tcp = spn("ns1", "dns", "tcp", Protocol::Tcp);
    let udp = spn("ns1", "dns", "udp", Protocol::Udp);
    let mut not_ready = local(ep("10.180.0.9", 53));
    not_ready.ready = false;
    not_ready.serving = false;
    let m = model(
        vec![svc(&tcp, "10.20.30.10", 53), svc(&udp, "10.20.30.10", 53)],
        vec![
            (
                tcp.clone(),
                vec![local(ep("10.180.0.1", 53)), ep("10.180.1.1", 53)],
            ),
            (udp.clone(), vec![local(ep("10.180.0.1", 53)), not_ready]),
        ],
    );
    let d = render_ok(&m, &cfg());
    assert_eq!(
        entries(&d, sets::LOOP_BACK),
        strs(&[
            "10.180.0.1,tcp:53,10.180.0.1",
            "10.180.0.1,udp:53,10.180.0.1",
            "10.180.0.9,udp:53,10.180.0.9",
        ])
    );
    assert_eq!(
        entries(&d, sets::CLUSTER_IP),
        strs(&["10.20.30.10,tcp:53", "10.20.30.10,udp:53"])
    );
    // One address, bound once.
    assert_eq!(entries(&d, sets::IPVS_IPS), strs(&["10.20.30.10"]));
}

// === virtual server flags ===

#[test]
fn session_affinity_sets_persistence_on_every_virtual_server() {
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = lb_svc(&n);
    s.node_port = 3001;
    s.external_ips = vec![ip("50.60.70.81")];
    s.session_affinity_timeout = Some(10800);
    let m = model(vec![s], vec![(n.clone(), vec![ep("10.180.0.1", 80)])]);
    let d = render_ok(&m, &cfg());
    assert_eq!(d.services.len(), 4);
    for s in &d.services {
        assert_eq!(
            s.vs.flags,
            ServiceFlags::exactly(IP_VS_SVC_F_PERSISTENT),
            "{}",
            s.vs
        );
        assert_eq!(s.vs.timeout, 10800, "{}", s.vs);
        assert_eq!(s.vs.netmask, u32::MAX);
    }
    let save = ipvsadm_save(&d);
    assert!(
        save.contains("-A -t 10.20.30.41:80 -s rr -p 10800\n"),
        "{save}"
    );
    assert!(
        save.contains("-A -t 100.101.102.103:3001 -s rr -p 10800\n"),
        "{save}"
    );
}

#[test]
fn scheduler_is_passed_through_and_mh_sets_the_source_hash_flag() {
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let mut s = node_port_svc(&n, 3001);
    let m = model(
        vec![s.clone()],
        vec![(n.clone(), vec![ep("10.180.0.1", 80)])],
    );
    for sched in ["lc", "sh", "wrr"] {
        let mut c = cfg();
        c.scheduler = sched.into();
        let d = render_ok(&m, &c);
        for s in &d.services {
            assert_eq!(s.vs.scheduler, sched);
            assert_eq!(s.vs.flags, ServiceFlags::exactly(0));
        }
    }
    let mut c = cfg();
    c.scheduler = String::new();
    assert!(
        render_ok(&m, &c)
            .services
            .iter()
            .all(|s| s.vs.scheduler == "rr")
    );

    // mh: upstream's FlagSourceHash (0x10), on every VS, combined with persistence.
    s.session_affinity_timeout = Some(60);
    let m = model(vec![s], vec![(n.clone(), vec![ep("10.180.0.1", 80)])]);
    let mut c = cfg();
    c.scheduler = "mh".into();
    let d = render_ok(&m, &c);
    assert_eq!(d.services.len(), 2);
    for s in &d.services {
        assert_eq!(s.vs.scheduler, "mh");
        assert_eq!(
            s.vs.flags,
            ServiceFlags::exactly(IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_SCHED2)
        );
    }
    assert_eq!(
        ipvsadm_save(&d),
        "-A -t 10.20.30.41:80 -s mh -p 60 -b mh-port\n\
         -a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1\n\
         -A -t 100.101.102.103:3001 -s mh -p 60 -b mh-port\n\
         -a -t 100.101.102.103:3001 -r 10.180.0.1:80 -m -w 1\n"
    );
}

// === iptables ===

#[test]
fn cluster_ip_masquerade_rule_follows_masquerade_all_and_the_local_detector() {
    let n = spn("ns1", "svc1", "p80", Protocol::Tcp);
    let m = model(vec![svc(&n, "10.20.30.41", 80)], vec![]);
    let rule = |c: &IpvsConfig| -> String {
        let d = render_ok(&m, c);
        let dump = Dump::parse(&d.iptables_restore).unwrap();
        dump.chain("nat", rules::KUBE_SERVICES).unwrap().rules[1]
            .raw
            .clone()
    };
    let head = "-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for \
                masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP";
    assert_eq!(rule(&cfg()), format!("{head} src,dst -j KUBE-MARK-MASQ"));
    let mut c = cfg();
    c.local_detector = LocalDetector::Cidr(cidr("10.0.0.0/8"));
    assert_eq!(
        rule(&c),
        format!("{head} dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ")
    );
    c.local_detector = LocalDetector::InterfaceNamePrefix("veth".into());
    assert_eq!(
        rule(&c),
        format!("{head} dst,dst ! -i veth+ -j KUBE-MARK-MASQ")
    );
    c.masquerade_all = true;
    assert_eq!(rule(&c), format!("{head} dst,dst -j KUBE-MARK-MASQ"));
}

#[test]
fn masquerade_rule_random_fully_and_mark_bit() {
    // TestMasqueradeRule.
    for random_fully in [false, true] {
        let mut c = cfg();
        c.random_fully = random_fully;
        c.masquerade_bit = 5;
        let d = render_ok(&model(vec![], vec![]), &c);
        let dump = Dump::parse(&d.iptables_restore).unwrap();
        let post: Vec<&str> = dump
            .chain("nat", rules::KUBE_POSTROUTING)
            .unwrap()
            .rules
            .iter()
            .map(|r| r.raw.as_str())
            .collect();
        let masq = if random_fully {
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
        } else {
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE"
        };
        assert_eq!(
            post,
            vec![
                "-A KUBE-POSTROUTING -m mark ! --mark 0x00000020/0x00000020 -j RETURN",
                "-A KUBE-POSTROUTING -j MARK --xor-mark 0x00000020",
                masq,
            ]
        );
        assert!(
            d.iptables_restore
                .contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x00000020\n")
        );
        assert!(d.iptables_restore.contains(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00000020/0x00000020 -j ACCEPT\n"
        ));
    }
}

/// Hand-derived from upstream's `writeIptablesRules` for a node with every kind of set in
/// use: the whole restore input, byte for byte.
#[test]
fn full_ruleset_golden() {
    let web = spn("ns1", "web", "http", Protocol::Tcp);
    let lb = spn("ns1", "lb", "https", Protocol::Tcp);
    let dns = spn("kube-system", "dns", "dns", Protocol::Udp);
    let mut sweb = svc(&web, "172.30.0.10", 80);
    sweb.service_type = ServiceType::NodePort;
    sweb.node_port = 30080;
    sweb.external_ips = vec![ip("192.168.99.11")];
    let mut slb = svc(&lb, "172.30.0.20", 443);
    slb.service_type = ServiceType::LoadBalancer;
    slb.node_port = 30443;
    slb.load_balancer_ips = vec![ip("1.2.3.4")];
    slb.source_ranges = SourceRanges::Only(vec![cidr("203.0.113.0/25")]);
    slb.external_policy_local = true;
    slb.health_check_node_port = 30000;
    let mut sdns = svc(&dns, "172.30.0.53", 53);
    sdns.service_type = ServiceType::NodePort;
    sdns.node_port = 30053;
    let m = model(
        vec![sweb, slb, sdns],
        vec![
            (web.clone(), vec![local(ep("10.0.1.1", 8080))]),
            (lb.clone(), vec![local(ep("10.0.1.2", 8443))]),
            (dns.clone(), vec![ep("10.0.2.1", 53)]),
        ],
    );
    let mut c = cfg();
    c.local_detector = LocalDetector::Cidr(cidr("10.0.0.0/8"));
    c.primary_node_ip = Some(ip(NODE_IP));
    c.random_fully = true;
    let d = render_ok(&m, &c);
    let want = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN
-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-SERVICES -m comment --comment "Kubernetes service lb portal" -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER
-A KUBE-LOAD-BALANCER -m comment --comment "Kubernetes service load balancer ip + port with externalTrafficPolicy=local" -m set --match-set KUBE-LOAD-BALANCER-LOCAL dst,dst -j RETURN
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port with externalTrafficPolicy=local" -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-NODE-PORT -p udp -m comment --comment "Kubernetes nodeport UDP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT
-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m addrtype --dst-type LOCAL -j ACCEPT
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
-A KUBE-PROXY-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port for load balancer with sourceRange" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL
-A KUBE-SOURCE-RANGES-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port + source cidr for packet filter purpose" -m set --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src -j RETURN
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 443 -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
COMMIT
"#;
    assert_eq!(d.iptables_restore, want);
    assert_eq!(d.nat_rules, 19);
    assert_eq!(d.filter_rules, 13);
    assert_eq!(
        non_empty_sets(&d),
        BTreeMap::from([
            (
                sets::LOOP_BACK.to_string(),
                strs(&["10.0.1.1,tcp:8080,10.0.1.1", "10.0.1.2,tcp:8443,10.0.1.2"])
            ),
            (
                sets::CLUSTER_IP.to_string(),
                strs(&[
                    "172.30.0.10,tcp:80",
                    "172.30.0.20,tcp:443",
                    "172.30.0.53,udp:53"
                ])
            ),
            (
                sets::EXTERNAL_IP.to_string(),
                strs(&["192.168.99.11,tcp:80"])
            ),
            (sets::LOAD_BALANCER.to_string(), strs(&["1.2.3.4,tcp:443"])),
            (
                sets::LOAD_BALANCER_FW.to_string(),
                strs(&["1.2.3.4,tcp:443"])
            ),
            (
                sets::LOAD_BALANCER_LOCAL.to_string(),
                strs(&["1.2.3.4,tcp:443"])
            ),
            (
                sets::LOAD_BALANCER_SOURCE_CIDR.to_string(),
                strs(&["1.2.3.4,tcp:443,203.0.113.0/25"])
            ),
            (sets::NODE_PORT_TCP.to_string(), strs(&["30080", "30443"])),
            (sets::NODE_PORT_LOCAL_TCP.to_string(), strs(&["30443"])),
            (sets::NODE_PORT_UDP.to_string(), strs(&["30053"])),
            (sets::HEALTH_CHECK_NODE_PORT.to_string(), strs(&["30000"])),
            (
                sets::IPVS_IPS.to_string(),
                strs(&[
                    "1.2.3.4",
                    "172.30.0.10",
                    "172.30.0.20",
                    "172.30.0.53",
                    "192.168.99.11"
                ])
            ),
        ])
    );
    assert_eq!(
        d.health_checks,
        BTreeMap::from([(ServiceName::new("ns1", "lb"), (30000, 1))])
    );
}

#[test]
fn jump_rules_are_upstreams_iptables_jump_chain() {
    let got: Vec<(String, String, String)> = ipvs_jump_rules()
        .iter()
        .map(|j| {
            assert!(j.extra_args.is_empty());
            (
                format!("{} {}", j.table, j.chain),
                j.target.to_string(),
                j.args().join(" "),
            )
        })
        .collect();
    let want = [
        (
            "nat OUTPUT",
            "KUBE-SERVICES",
            "-m comment --comment kubernetes service portals -j KUBE-SERVICES",
        ),
        (
            "nat PREROUTING",
            "KUBE-SERVICES",
            "-m comment --comment kubernetes service portals -j KUBE-SERVICES",
        ),
        (
            "nat POSTROUTING",
            "KUBE-POSTROUTING",
            "-m comment --comment kubernetes postrouting rules -j KUBE-POSTROUTING",
        ),
        (
            "filter FORWARD",
            "KUBE-FORWARD",
            "-m comment --comment kubernetes forwarding rules -j KUBE-FORWARD",
        ),
        (
            "filter INPUT",
            "KUBE-NODE-PORT",
            "-m comment --comment kubernetes health check rules -j KUBE-NODE-PORT",
        ),
        (
            "filter INPUT",
            "KUBE-PROXY-FIREWALL",
            "-m comment --comment kube-proxy firewall rules -j KUBE-PROXY-FIREWALL",
        ),
        (
            "filter FORWARD",
            "KUBE-PROXY-FIREWALL",
            "-m comment --comment kube-proxy firewall rules -j KUBE-PROXY-FIREWALL",
        ),
        (
            "filter INPUT",
            "KUBE-IPVS-FILTER",
            "-m comment --comment kubernetes ipvs access filter -j KUBE-IPVS-FILTER",
        ),
        (
            "filter OUTPUT",
            "KUBE-IPVS-OUT-FILTER",
            "-m comment --comment kubernetes ipvs access filter -j KUBE-IPVS-OUT-FILTER",
        ),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want);
    // Every jump target is a chain the restore input declares in that table.
    let d = render_ok(&model(vec![], vec![]), &cfg());
    let dump = Dump::parse(&d.iptables_restore).unwrap();
    for j in ipvs_jump_rules() {
        assert!(
            dump.chain(j.table, j.target).is_some(),
            "{} {}",
            j.table,
            j.target
        );
    }
}

// === text formats ===

#[test]
fn ipvsadm_save_format_and_order() {
    // ipvsadm sorts by protocol number, then address with libipvs' wrapping 32-bit
    // difference (192.168.x before 10.x), then port; real servers by address, port.
    let tcp = spn("ns1", "a", "p", Protocol::Tcp);
    let udp = spn("ns1", "b", "p", Protocol::Udp);
    let sctp = spn("ns1", "c", "p", Protocol::Sctp);
    let mut st = svc(&tcp, "10.96.0.10", 80);
    st.service_type = ServiceType::NodePort;
    st.node_port = 30080;
    let m = model(
        vec![
            st,
            svc(&udp, "10.96.0.53", 53),
            svc(&sctp, "10.96.0.90", 9000),
        ],
        vec![
            (
                tcp.clone(),
                vec![ep("10.244.2.2", 8080), ep("10.244.10.1", 8080)],
            ),
            (udp.clone(), vec![ep("10.244.1.5", 53)]),
        ],
    );
    let mut c = cfg();
    c.node_ips = vec![ip("192.168.50.1")];
    let d = render_ok(&m, &c);
    assert_eq!(
        ipvsadm_save(&d),
        "-A -t 192.168.50.1:30080 -s rr\n\
         -a -t 192.168.50.1:30080 -r 10.244.2.2:8080 -m -w 1\n\
         -a -t 192.168.50.1:30080 -r 10.244.10.1:8080 -m -w 1\n\
         -A -t 10.96.0.10:80 -s rr\n\
         -a -t 10.96.0.10:80 -r 10.244.2.2:8080 -m -w 1\n\
         -a -t 10.96.0.10:80 -r 10.244.10.1:8080 -m -w 1\n\
         -A -u 10.96.0.53:53 -s rr\n\
         -a -u 10.96.0.53:53 -r 10.244.1.5:53 -m -w 1\n\
         -A --sctp-service 10.96.0.90:9000 -s rr\n"
    );
    // DesiredService order is plain (address, protocol, port).
    let order: Vec<String> = d.services.iter().map(|s| s.vs.to_string()).collect();
    assert_eq!(
        order,
        strs(&[
            "TCP 10.96.0.10:80",
            "UDP 10.96.0.53:53",
            "SCTP 10.96.0.90:9000",
            "TCP 192.168.50.1:30080"
        ])
    );

    let v6 = spn("ns1", "v6", "p", Protocol::Tcp);
    let m = model(
        vec![svc(&v6, "fd00::10", 80)],
        vec![(v6.clone(), vec![ep("fd00:1::5", 8080)])],
    );
    // The plan filters by family: an IPv6 model is rendered by an IPv6 config.
    let v6_cfg = IpvsConfig {
        family: crate::model::IpFamily::V6,
        ..IpvsConfig::default()
    };
    assert!(render(&m, &IpvsConfig::default()).services.is_empty());
    let d = render(&m, &v6_cfg);
    assert_eq!(
        ipvsadm_save(&d),
        "-A -t [fd00::10]:80 -s rr\n-a -t [fd00::10]:80 -r [fd00:1::5]:8080 -m -w 1\n"
    );
}

#[test]
fn ipset_save_format() {
    let mut bitmap = IpSetSpec::empty(sets::NODE_PORT_TCP, IpFamily::V4).unwrap();
    bitmap.entries = ["30443", "8080", "30080"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut net = IpSetSpec::empty(sets::LOAD_BALANCER_SOURCE_CIDR, IpFamily::V4).unwrap();
    net.entries = ["1.2.3.4,tcp:80,10.0.0.0/8", "1.2.3.4,tcp:80,192.0.2.7/32"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let ips = IpSetSpec::empty(sets::IPVS_IPS, IpFamily::V4).unwrap();
    let d = IpvsDesired {
        ipsets: vec![bitmap, net, ips],
        ..IpvsDesired::default()
    };
    assert_eq!(
        ipset_save(&d),
        "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\n\
         add KUBE-NODE-PORT-TCP 8080\n\
         add KUBE-NODE-PORT-TCP 30080\n\
         add KUBE-NODE-PORT-TCP 30443\n\
         create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536\n\
         add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,10.0.0.0/8\n\
         add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,192.0.2.7\n\
         create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536\n"
    );
}

#[test]
fn ipvs_config_from_options() {
    use crate::config::{NodePortAddresses, ProxyMode};
    let args = crate::config::parse_render_args(
        &strs(&[
            "--proxy-mode",
            "ipvs",
            "--ipvs-scheduler",
            "lc",
            "--ipvs-strict-arp",
        ]),
        "node1",
    )
    .unwrap();
    let mut opts = args.options;
    assert_eq!(opts.mode, ProxyMode::Ipvs);
    let node = NodeInfo {
        name: "node1".into(),
        ips: vec![ip("192.168.50.1")],
        ..NodeInfo::default()
    };
    let local_ips = vec![
        ip("127.0.0.1"),
        ip("192.168.50.1"),
        ip("10.1.0.1"),
        ip("fd00::1"),
    ];
    let c = ipvs_config(&opts, &node, local_ips.clone());
    assert_eq!(c.scheduler, "lc");
    assert!(c.strict_arp);
    assert_eq!(c.node_ips, vec![ip("10.1.0.1"), ip("192.168.50.1")]);
    assert_eq!(c.primary_node_ip, Some(ip("192.168.50.1")));
    assert_eq!(c.masquerade_mark(), "0x00004000");
    opts.node_port_addresses = NodePortAddresses::Cidrs(vec![cidr("192.168.0.0/16")]);
    let c = ipvs_config(&opts, &node, local_ips.clone());
    assert_eq!(c.node_ips, vec![ip("192.168.50.1")]);

    // The primary node IP (LB source-range sets): --bind-address overrides the Node, and
    // `primary` node ports follow it.
    opts.node_port_addresses = NodePortAddresses::Primary;
    opts.bind_address = ip("10.1.0.1");
    let c = ipvs_config(&opts, &node, local_ips);
    assert_eq!(c.primary_node_ip, Some(ip("10.1.0.1")));
    assert_eq!(c.node_ips, vec![ip("10.1.0.1")]);
}

/// `kube-proxy-rs render --proxy-mode ipvs` of the bundled demo cluster (node1).
#[test]
fn demo_cluster_render_golden() {
    let args = crate::config::parse_render_args(&strs(&["--proxy-mode", "ipvs"]), "node1").unwrap();
    let mut warnings = Vec::new();
    let out = crate::render::run(&args, false, &mut warnings).unwrap();
    let golden = include_str!("testdata/demo-cluster.ipvs");
    if out != golden {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/backend/ipvs/testdata/demo-cluster.ipvs.new"
        );
        std::fs::write(path, &out).unwrap();
        panic!("render output differs from the golden file; wrote {path}");
    }
    assert!(warnings.is_empty(), "{warnings:?}");
    // The output is the three renderings of one consistent IpvsDesired.
    let objects = crate::render::load(&args, &mut warnings).unwrap();
    let model = crate::render::state_from(&objects, "node1", &mut warnings)
        .snapshot(crate::model::IpFamily::V4);
    let mut c = ipvs_config(&args.options, &model.node, model.node.ips.clone());
    c.random_fully = true;
    let d = render_ok(&model, &c);
    assert_eq!(
        out,
        format!(
            "# IPVS virtual servers (ipvsadm -Sn)\n{}# ipsets (ipset save)\n{}\
             # iptables (iptables-restore --noflush)\n{}",
            ipvsadm_save(&d),
            ipset_save(&d),
            d.iptables_restore
        )
    );
    assert_eq!(d.no_local_endpoints_internal, 0);
    assert_eq!(
        d.health_checks,
        BTreeMap::from([(ServiceName::new("demo", "edge"), (32100, 1))])
    );
}

// === IPv6 ===

const NODE_IP6: &str = "fd00:50::1";

/// An IPv6 proxier's settings: node fd00:50::1, pods in fd00:244::/48.
fn cfg6() -> IpvsConfig {
    IpvsConfig {
        node_ips: vec![ip(NODE_IP6)],
        primary_node_ip: Some(ip(NODE_IP6)),
        local_detector: LocalDetector::Cidr(cidr("fd00:244::/48")),
        random_fully: true,
        family: IpFamily::V6,
        ..IpvsConfig::default()
    }
}

/// An IPv6-only cluster: a ClusterIP service with ClientIP affinity, a NodePort service, and
/// an externalTrafficPolicy=Local LoadBalancer whose source ranges leave out the node.
fn ipv6_model() -> ProxyModel {
    let web = spn("ns1", "web", "http", Protocol::Tcp);
    let np = spn("ns1", "np", "http", Protocol::Tcp);
    let lb = spn("ns1", "lb", "https", Protocol::Tcp);
    let mut sweb = svc(&web, "fd00:96::10", 80);
    sweb.session_affinity_timeout = Some(10800);
    let mut snp = svc(&np, "fd00:96::20", 80);
    snp.service_type = ServiceType::NodePort;
    snp.node_port = 30080;
    let mut slb = svc(&lb, "fd00:96::30", 443);
    slb.service_type = ServiceType::LoadBalancer;
    slb.node_port = 30443;
    slb.load_balancer_ips = vec![ip("2001:db8:1::4")];
    slb.source_ranges = SourceRanges::Only(vec![cidr("2001:db8:ff::/48"), cidr("fd00:7::5/128")]);
    slb.external_policy_local = true;
    slb.health_check_node_port = 30000;
    model(
        vec![sweb, snp, slb],
        vec![
            (
                web,
                vec![local(ep("fd00:244::11", 8080)), ep("fd00:244:1::12", 8080)],
            ),
            (np, vec![ep("fd00:244:1::12", 8080)]),
            (
                lb,
                vec![local(ep("fd00:244::11", 8443)), ep("fd00:244:1::12", 8443)],
            ),
        ],
    )
}

/// The IPv6 golden: virtual servers, `KUBE-6-*` sets and the ip6tables-restore input of
/// [`ipv6_model`] as `render` prints it for an IPv6 proxier, byte for byte.
#[test]
fn ipv6_render_golden() {
    let args = crate::config::parse_render_args(&strs(&["--proxy-mode", "ipvs"]), NODE).unwrap();
    let facts = crate::host::NodeFacts {
        primary_ip: Some(ip(NODE_IP6)),
        local_detector: LocalDetector::Cidr(cidr("fd00:244::/48")),
        ..Default::default()
    };
    let local = [ip("127.0.0.1"), ip("::1"), ip("fe80::1"), ip(NODE_IP6)];
    let out = super::render_text_for(&args.options, &ipv6_model(), &facts, &local, IpFamily::V6);
    // The same sync as the IPv6 proxier's settings render it, and consistent.
    let d = render_ok(&ipv6_model(), &cfg6());
    assert_eq!(
        out,
        format!(
            "# IPVS virtual servers (ipvsadm -Sn)\n{}# ipsets (ipset save)\n{}\
             # iptables (ip6tables-restore --noflush)\n{}",
            ipvsadm_save(&d),
            ipset_save(&d),
            d.iptables_restore
        )
    );
    let golden = include_str!("testdata/ipv6.ipvs");
    if out != golden {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/backend/ipvs/testdata/ipv6.ipvs.new"
        );
        std::fs::write(path, &out).unwrap();
        panic!("IPv6 render differs from the golden file; wrote {path}");
    }
}

/// Each family's proxier renders only its family's half of a dual-stack model, into its own
/// sets: the IPv4 output keeps upstream's names and loopback rule, the IPv6 one has no IPv4.
#[test]
fn each_family_renders_only_its_half_of_a_dual_stack_model() {
    let v4 = spn("ns1", "web4", "http", Protocol::Tcp);
    let mut m = ipv6_model();
    m.services.insert(v4.clone(), svc(&v4, "172.30.0.10", 80));
    m.endpoints.insert(v4, vec![ep("10.0.1.1", 8080)]);
    let d6 = render_ok(&m, &cfg6());
    assert!(d6.services.iter().all(|s| s.vs.address.is_ipv6()));
    assert!(d6.bound_addrs.iter().all(IpAddr::is_ipv6));
    assert!(d6.ipsets.iter().all(|s| s.name.starts_with("KUBE-6-")));
    assert!(!d6.iptables_restore.contains("127.0.0.0/8"));
    assert!(!d6.iptables_restore.contains("172.30."));
    let d4 = render_ok(&m, &cfg());
    assert_eq!(
        ipvs_table(&d4),
        vec![("172.30.0.10:80/TCP".to_string(), strs(&["10.0.1.1:8080"]))]
    );
    assert!(d4.ipsets.iter().all(|s| !s.name.starts_with("KUBE-6-")));
    assert!(
        d4.iptables_restore
            .contains("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN\n")
    );
    assert!(!d4.iptables_restore.contains("fd00:"));
}

/// A source range holding the IPv6 node IP admits the node through the
/// `KUBE-6-LOAD-BALANCER-SOURCE-IP` set instead of a KUBE-IPVS-OUT-FILTER drop.
#[test]
fn ipv6_source_range_containing_the_node_admits_it() {
    let mut c = cfg6();
    c.primary_node_ip = Some(ip("2001:db8:ff::7"));
    let d = render_ok(&ipv6_model(), &c);
    assert_eq!(
        entries(&d, "KUBE-6-LOAD-BALANCER-SOURCE-IP"),
        strs(&["2001:db8:1::4,tcp:443,2001:db8:1::4"])
    );
    assert!(chain_rules(&d, "filter", "KUBE-IPVS-OUT-FILTER").is_empty());
}

/// The IPv6 proxier's node addresses: only IPv6 ones, without `::1` (no localhost node
/// ports for IPv6, as upstream) and without link-local ones; the primary node IP of the
/// other family does not apply.
#[test]
fn ipv6_config_takes_only_usable_ipv6_node_addresses() {
    let args = crate::config::parse_render_args(&strs(&["--proxy-mode", "ipvs"]), "node1").unwrap();
    let facts = crate::host::NodeFacts {
        primary_ip: Some(ip("192.168.50.1")),
        ..Default::default()
    };
    let local = [
        ip("127.0.0.1"),
        ip("::1"),
        ip("192.168.50.1"),
        ip("fe80::1"),
        ip("fd00:50::1"),
        ip("2001:db8::9"),
    ];
    let c = ipvs_config_for(&args.options, &facts, &local, IpFamily::V6);
    assert_eq!(c.family, IpFamily::V6);
    assert_eq!(c.node_ips, vec![ip("2001:db8::9"), ip("fd00:50::1")]);
    assert_eq!(c.primary_node_ip, None);
    let c4 = ipvs_config_for(&args.options, &facts, &local, IpFamily::V4);
    assert_eq!(c4.node_ips, vec![ip("192.168.50.1")]);
    assert_eq!(c4.primary_node_ip, Some(ip("192.168.50.1")));
}
