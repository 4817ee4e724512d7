//! An IPv6 IPVS proxier against a real kernel, proven with packets over IPv6 ULA addresses
//! inside namespaces this test creates: a client outside the node reaches echo "pods"
//! through an IPv6 ClusterIP and an IPv6 NodePort, a service without endpoints refuses, and
//! ClientIP affinity keeps a client on one pod. Along the way it checks the kernel state
//! with tools nobody here wrote (`ipvsadm`, `ipset`, `ip6tables-save`, `ip`): `KUBE-6-*` sets
//! of family inet6, the rules in ip6tables only, kube-ipvs0's /128 addresses usable at once.
//!
//! The node is dual-stack: an IPv4 proxier runs beside the IPv6 one (one per family, as
//! upstream), on the same kube-ipvs0 and IPVS table; each family's syncs leave the other's
//! virtual servers, addresses, sets and rules alone, and the service answers on both of its
//! cluster IPs.
//!
//! The proxiers are built directly (as the daemon's start builds one per family) and fed
//! their family's model and node facts.
//!
//! The host kernel has no IPVS and no dummy links: outside the VM this test re-runs itself in
//! the qemu guest of tests/vm/vmrun. It never skips.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kube_proxy_rs::backend::ipvs::proxier::{IpvsKernel, IpvsProxier, ipvs_settings};
use kube_proxy_rs::backend::ipvs::{ipvs_config_for, ipvsadm_save, render};
use kube_proxy_rs::backend::netfilter::LocalDetector;
use kube_proxy_rs::backend::{Backend, SyncRequest};
use kube_proxy_rs::config::parse_render_args;
use kube_proxy_rs::host::NodeFacts;
use kube_proxy_rs::kernel::iptables::{Iptables, IptablesVariant, detect_variant};
use kube_proxy_rs::kernel::ipvs::IpvsClient;
use kube_proxy_rs::kernel::{Addresses, Conntrack, DummyLink, IpFamily, Ipset, Sysctl};
use kube_proxy_rs::model::{
    Endpoint, IpFamily as Family, NodeInfo, Protocol, ProxyModel, ServicePort, ServicePortName,
    ServiceType,
};
use support::netns::{Netns, veth};
use support::pods::{EchoServer, tcp_request, tcp_request_peer};

const TEST_NAME: &str = "ipvs_ipv6_packets";
const T: Duration = Duration::from_millis(1500);

const NODE_IP: &str = "fd00:50::1";
const CLIENT_IP: &str = "fd00:50::2";
const POD_GATEWAY: &str = "fd00:244::1";
const PODS: [&str; 2] = ["fd00:244::10", "fd00:244::11"];
const POD_CIDR: &str = "fd00:244::/48";
const WEB: &str = "fd00:96::10";
const NODEPORT_SVC: &str = "fd00:96::20";
const STICKY: &str = "fd00:96::30";
const EMPTY: &str = "fd00:96::40";
const NODE_IP4: &str = "192.168.50.1";
const CLIENT_IP4: &str = "192.168.50.2";
const PODS4: [&str; 2] = ["10.244.0.10", "10.244.0.11"];
/// The IPv4 cluster IP of `web` (a dual-stack service).
const WEB4: &str = "10.96.0.10";

#[test]
fn ipvs_ipv6_packets() {
    if !support::vm::in_vm() {
        return support::vm::rerun_in_vm(TEST_NAME, 900);
    }
    support::require_root();
    let net = Net::new();
    let _echo: Vec<EchoServer> = net
        .pods
        .iter()
        .enumerate()
        .map(|(i, ns)| EchoServer::start_tcp(ns, &format!("pod{i}"), sa("::", 8080)))
        .collect();
    let t0 = Instant::now();
    net.node.in_netns(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(scenario(&net))
    });
    eprintln!("IPv6 IPVS scenario took {:?} in the guest", t0.elapsed());
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ------------------------------------------------------------------ the network

/// ```text
///  pod i "eth0" fd00:244::1i/128 ──veth── node "vpod<i>" fd00:244::1/128 (+ route to the pod)
///               10.244.0.1i/32                    10.244.0.1/32
///  client "eth0" fd00:50::2/64   ──veth── node "ext0" fd00:50::1/64
///                192.168.50.2/24                    192.168.50.1/24
/// ```
/// Every address is added `nodad` (usable at once). The node forwards IPv6, as a CNI sets
/// it up (kube-proxy leaves `net.ipv6.conf.all.forwarding` alone, as upstream does).
struct Net {
    node: Netns,
    client: Netns,
    pods: Vec<Netns>,
}

impl Net {
    fn new() -> Net {
        let node = Netns::new("node6");
        node.sysctl("net.ipv6.conf.all.forwarding", "1");
        let client = Netns::new("client6");
        veth(
            &node,
            "ext0",
            Some(&format!("{NODE_IP4}/24")),
            &client,
            "eth0",
            Some(&format!("{CLIENT_IP4}/24")),
        );
        client.set_default_route(NODE_IP4);
        node.ip(&["-6", "addr", "add", "fd00:50::1/64", "dev", "ext0", "nodad"]);
        client.ip(&["-6", "addr", "add", "fd00:50::2/64", "dev", "eth0", "nodad"]);
        client.ip(&["-6", "route", "add", "default", "via", NODE_IP]);
        let mut pods = Vec::new();
        for (i, pod_ip) in PODS.iter().enumerate() {
            let ns = Netns::new(&format!("pod6{i}"));
            let node_if = format!("vpod{i}");
            veth(
                &node,
                &node_if,
                Some("10.244.0.1/32"),
                &ns,
                "eth0",
                Some(&format!("{}/32", PODS4[i])),
            );
            node.add_route(&format!("{}/32", PODS4[i]), &["dev", &node_if]);
            ns.add_route("10.244.0.1/32", &["dev", "eth0"]);
            ns.set_default_route("10.244.0.1");
            node.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{POD_GATEWAY}/128"),
                "dev",
                &node_if,
                "nodad",
            ]);
            node.ip(&[
                "-6",
                "route",
                "add",
                &format!("{pod_ip}/128"),
                "dev",
                &node_if,
            ]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{pod_ip}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
            ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{POD_GATEWAY}/128"),
                "dev",
                "eth0",
            ]);
            ns.ip(&["-6", "route", "add", "default", "via", POD_GATEWAY]);
            pods.push(ns);
        }
        Net { node, client, pods }
    }
}

// ------------------------------------------------------------------ the cluster

fn port_name(svc: &str) -> ServicePortName {
    ServicePortName::new("t", svc, "p", Protocol::Tcp)
}

/// The IPv6 half of a cluster as the IPv6 proxier receives it: `web` (ClusterIP), `np`
/// (NodePort 30080), `sticky` (ClientIP affinity), each on both pods, and `empty` (no
/// endpoints) unless `with_empty` is false.
fn model(with_empty: bool) -> ProxyModel {
    let mut m = ProxyModel {
        node: NodeInfo {
            name: "node1".into(),
            ips: vec![ip(NODE_IP)],
            present: true,
            ..NodeInfo::default()
        },
        ..ProxyModel::default()
    };
    let both: Vec<Endpoint> = PODS
        .iter()
        .map(|p| {
            let mut e = Endpoint::ready(ip(p), 8080);
            e.is_local = true;
            e
        })
        .collect();
    let mut add = |svc: &str, sp: ServicePort, eps: Vec<Endpoint>| {
        m.endpoints.insert(port_name(svc), eps);
        m.services.insert(port_name(svc), sp);
    };
    add(
        "web",
        ServicePort::basic(port_name("web"), ip(WEB), 80),
        both.clone(),
    );
    let mut np = ServicePort::basic(port_name("np"), ip(NODEPORT_SVC), 80);
    np.service_type = ServiceType::NodePort;
    np.node_port = 30080;
    add("np", np, both.clone());
    let mut sticky = ServicePort::basic(port_name("sticky"), ip(STICKY), 80);
    sticky.session_affinity_timeout = Some(10800);
    add("sticky", sticky, both);
    if with_empty {
        add(
            "empty",
            ServicePort::basic(port_name("empty"), ip(EMPTY), 80),
            Vec::new(),
        );
    }
    m
}

/// The IPv4 half: `web` on its IPv4 cluster IP, on both pods.
fn model4() -> ProxyModel {
    let mut m = ProxyModel {
        node: NodeInfo {
            name: "node1".into(),
            ips: vec![ip(NODE_IP4)],
            present: true,
            ..NodeInfo::default()
        },
        ..ProxyModel::default()
    };
    let eps = PODS4
        .iter()
        .map(|p| {
            let mut e = Endpoint::ready(ip(p), 8080);
            e.is_local = true;
            e
        })
        .collect();
    m.endpoints.insert(port_name("web"), eps);
    m.services.insert(
        port_name("web"),
        ServicePort::basic(port_name("web"), ip(WEB4), 80),
    );
    m
}

/// The IPv4 node facts.
fn facts4() -> NodeFacts {
    NodeFacts {
        family: kube_proxy_rs::model::IpFamily::V4,
        primary_ip: Some(ip(NODE_IP4)),
        node_port_cidrs: None,
        localhost_node_ports: false,
        local_detector: LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
    }
}

/// The IPv6 node facts the daemon's sync loop passes the IPv6 proxier.
fn facts() -> NodeFacts {
    NodeFacts {
        family: kube_proxy_rs::model::IpFamily::V6,
        primary_ip: Some(ip(NODE_IP)),
        node_port_cidrs: None,
        localhost_node_ports: false,
        local_detector: LocalDetector::Cidr(POD_CIDR.parse().unwrap()),
    }
}

async fn sync(p: &mut IpvsProxier, m: &ProxyModel) {
    let facts = match p.family() {
        Family::V4 => facts4(),
        Family::V6 => facts(),
    };
    p.sync(SyncRequest {
        model: m,
        changed: &BTreeSet::new(),
        full: true,
        node_facts: &facts,
    })
    .await
    .expect("sync");
}

/// A proxier of `family` in the node namespace, as the daemon starts one per family.
async fn start(ns: &str, variant: IptablesVariant, family: Family) -> IpvsProxier {
    let args = parse_render_args(&["--proxy-mode=ipvs".to_string()], "node1").unwrap();
    let opts = args.options;
    let kernel_family = match family {
        Family::V4 => IpFamily::V4,
        Family::V6 => IpFamily::V6,
    };
    let kernel = IpvsKernel {
        iptables: Iptables::new(variant, kernel_family).with_netns(ns),
        ipset: Ipset::new().with_netns(ns),
        link: DummyLink::default().with_netns(ns),
        conntrack: Conntrack::new().with_netns(ns),
        addrs: Addresses::new().with_netns(ns),
        sysctl: Sysctl::new(),
    };
    // Not the config's family decides, but the iptables handle's.
    let mut config = ipvs_config_for(&opts, &facts(), &[], Family::V4);
    config.random_fully = true;
    let client = IpvsClient::connect().await.expect("IPVS in the guest");
    let p = IpvsProxier::start(client, kernel, config, ipvs_settings(&opts))
        .await
        .unwrap_or_else(|e| panic!("the {family:?} IPVS proxier starts: {e}"));
    assert_eq!(p.family(), family, "the family of its iptables handle");
    p
}

// ------------------------------------------------------------------ reading the kernel

/// `ipvsadm -Sn` lines, sorted.
fn ipvsadm_sn(ns: &Netns) -> BTreeSet<String> {
    ns.run_ok("ipvsadm", ["-Sn"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// `ipset list NAME`: (header line, members).
fn ipset_list(ns: &Netns, set: &str) -> (String, BTreeSet<String>) {
    let text = ns.run_ok("ipset", ["list", set]);
    let header = text
        .lines()
        .find(|l| l.starts_with("Header:"))
        .unwrap_or("")
        .to_string();
    let members = text
        .split("Members:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    (header, members)
}

/// `ip -o addr show dev kube-ipvs0` of one family: address/prefix → the rest of the line
/// (flags such as `tentative` or `dadfailed` show there).
fn dummy_addrs(ns: &Netns, family: &str) -> BTreeMap<String, String> {
    ns.run_ok("ip", ["-o", family, "addr", "show", "dev", "kube-ipvs0"])
        .lines()
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            let i = t.iter().position(|w| *w == "inet" || *w == "inet6")?;
            Some((t[i + 1].to_string(), t[i + 2..].join(" ")))
        })
        .collect()
}

fn strs(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ------------------------------------------------------------------ the scenario

async fn scenario(net: &Net) {
    let node = &net.node;
    let ns = node.name();

    // ---- start-up: each family's probe leaves nothing behind
    let variant = detect_variant(Some(ns)).await.unwrap();
    let mut p = start(ns, variant, Family::V6).await;
    let mut p4 = start(ns, variant, Family::V4).await;
    assert!(
        ipvsadm_sn(node).is_empty(),
        "the start-up probes must leave no virtual server"
    );

    // ---- the IPv4 proxier syncs first: its state must survive every IPv6 sync
    let m4 = model4();
    sync(&mut p4, &m4).await;
    let v4_state = strs(&[
        &format!("-A -t {WEB4}:80 -s rr"),
        &format!("-a -t {WEB4}:80 -r {}:8080 -m -w 1", PODS4[0]),
        &format!("-a -t {WEB4}:80 -r {}:8080 -m -w 1", PODS4[1]),
    ]);
    assert_eq!(ipvsadm_sn(node), v4_state);

    // ---- first sync: kernel state
    let m = model(true);
    sync(&mut p, &m).await;
    let pods =
        |port: u16| -> Vec<String> { PODS.iter().map(|p| format!("[{p}]:{port}")).collect() };
    let mut want = v4_state.clone();
    let mut add_vs = |vs: &str, extra: &str, dests: &[String]| {
        want.insert(format!("-A -t {vs} -s rr{extra}"));
        for d in dests {
            want.insert(format!("-a -t {vs} -r {d} -m -w 1"));
        }
    };
    add_vs(&format!("[{WEB}]:80"), "", &pods(8080));
    add_vs(&format!("[{NODEPORT_SVC}]:80"), "", &pods(8080));
    add_vs(&format!("[{STICKY}]:80"), " -p 10800", &pods(8080));
    add_vs(&format!("[{EMPTY}]:80"), "", &[]);
    // NodePort virtual servers on every usable IPv6 node address: not the link-local ones,
    // not ::1, not the IPv4 ones.
    add_vs(&format!("[{NODE_IP}]:30080"), "", &pods(8080));
    add_vs(&format!("[{POD_GATEWAY}]:30080"), "", &pods(8080));
    let got = ipvsadm_sn(node);
    assert_eq!(
        got,
        want,
        "ipvsadm -Sn\nmissing: {:?}\nextra: {:?}",
        want.difference(&got).collect::<Vec<_>>(),
        got.difference(&want).collect::<Vec<_>>()
    );
    // The renderer's own ipvsadm-save agrees with the kernel's (the IPv4 half aside).
    let rendered: BTreeSet<String> = ipvsadm_save(&render(&m, p.config()))
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let kernel_v6: BTreeSet<String> = got.into_iter().filter(|l| l.contains('[')).collect();
    assert_eq!(rendered, kernel_v6, "render's ipvsadm -Sn vs the kernel's");

    let (header, members) = ipset_list(node, "KUBE-6-CLUSTER-IP");
    assert!(header.contains("family inet6"), "{header}");
    assert_eq!(
        members,
        strs(&[
            "fd00:96::10,tcp:80",
            "fd00:96::20,tcp:80",
            "fd00:96::30,tcp:80",
            "fd00:96::40,tcp:80"
        ])
    );
    assert_eq!(ipset_list(node, "KUBE-6-NODE-PORT-TCP").1, strs(&["30080"]));
    assert_eq!(
        ipset_list(node, "KUBE-6-IPVS-IPS").1,
        strs(&[WEB, NODEPORT_SVC, STICKY, EMPTY])
    );
    let sets = node.run_ok("ipset", ["list", "-n"]);
    assert_eq!(
        ipset_list(node, "KUBE-CLUSTER-IP").1,
        strs(&["10.96.0.10,tcp:80"]),
        "the IPv4 proxier's set keeps its own entries: {sets}"
    );

    let ip6 = node.run_ok(
        &format!("ip6tables-{}-save", variant.as_str()),
        ["-t", "nat"],
    );
    assert!(
        ip6.contains("-A KUBE-SERVICES -s ::1/128 -j RETURN"),
        "{ip6}"
    );
    // (iptables-save prints the source match first.)
    assert!(
        ip6.lines()
            .any(|l| l.starts_with("-A KUBE-SERVICES ! -s fd00:244::/48 ")
                && l.contains("--match-set KUBE-6-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ")),
        "{ip6}"
    );
    let ip4 = node.run_ok(
        &format!("iptables-{}-save", variant.as_str()),
        ["-t", "nat"],
    );
    assert!(
        ip4.contains("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN"),
        "{ip4}"
    );
    assert!(
        !ip4.contains("KUBE-6-") && !ip6.contains("KUBE-CLUSTER-IP "),
        "each family's rules only in its own table: {ip4}"
    );

    let v6_addrs = dummy_addrs(node, "-6");
    assert_eq!(
        v6_addrs.keys().cloned().collect::<BTreeSet<_>>(),
        strs(&[
            &format!("{WEB}/128"),
            &format!("{NODEPORT_SVC}/128"),
            &format!("{STICKY}/128"),
            &format!("{EMPTY}/128")
        ])
    );
    for (a, flags) in &v6_addrs {
        assert!(
            !flags.contains("tentative") && !flags.contains("dadfailed"),
            "{a} must be usable at once: {flags}"
        );
    }
    assert_eq!(
        dummy_addrs(node, "-4")
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        strs(&[&format!("{WEB4}/32")]),
        "the IPv4 address on kube-ipvs0 belongs to the IPv4 proxier"
    );

    // ---- an IPv4 sync now leaves the IPv6 half as it is
    let before = ipvsadm_sn(node);
    sync(&mut p4, &m4).await;
    assert_eq!(ipvsadm_sn(node), before, "an IPv4 sync must not touch IPv6");
    assert_eq!(dummy_addrs(node, "-6"), v6_addrs);

    // ---- packets: ClusterIP, NodePort, no endpoints, affinity
    let client = &net.client;
    let pod_names = strs(&["pod0", "pod1"]);
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let (name, peer) =
            tcp_request_peer(client, sa(WEB, 80), T).expect("client → IPv6 ClusterIP");
        // An off-cluster source is masqueraded (KUBE-6-CLUSTER-IP ! -s podCIDR).
        assert_ne!(
            peer,
            ip(CLIENT_IP),
            "ClusterIP traffic from outside is masqueraded"
        );
        seen.insert(name);
    }
    assert_eq!(seen, pod_names, "rr over both IPv6 real servers");

    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let (name, peer) =
            tcp_request_peer(client, sa(NODE_IP, 30080), T).expect("client → IPv6 NodePort");
        assert_eq!(
            peer,
            ip(POD_GATEWAY),
            "NodePort traffic is masqueraded to the node"
        );
        seen.insert(name);
    }
    assert_eq!(seen, pod_names);

    // The dual-stack service answers on both cluster IPs.
    let web4: BTreeSet<String> = (0..4)
        .map(|_| tcp_request(client, sa(WEB4, 80), T).expect("client → IPv4 ClusterIP"))
        .collect();
    assert_eq!(web4, pod_names, "rr over both IPv4 real servers");

    let e = tcp_request(client, sa(EMPTY, 80), T).expect_err("no endpoints must not answer");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");

    let sticky: BTreeSet<String> = (0..8)
        .map(|_| tcp_request(client, sa(STICKY, 80), T).expect("client → sticky"))
        .collect();
    assert_eq!(
        sticky.len(),
        1,
        "ClientIP affinity keeps one pod: {sticky:?}"
    );

    // ---- a second identical sync changes nothing
    let before = p.changes();
    sync(&mut p, &m).await;
    assert_eq!(
        p.changes(),
        before,
        "an identical sync must not touch the kernel"
    );

    // ---- removing a service removes its virtual server and its address only
    sync(&mut p, &model(false)).await;
    let got = ipvsadm_sn(node);
    assert!(
        !got.iter().any(|l| l.contains(EMPTY)),
        "removed service still in IPVS: {got:?}"
    );
    assert!(got.is_superset(&v4_state), "{got:?}");
    assert!(!dummy_addrs(node, "-6").contains_key(&format!("{EMPTY}/128")));
    assert!(dummy_addrs(node, "-4").contains_key(&format!("{WEB4}/32")));
    assert_eq!(
        tcp_request(client, sa(WEB, 80), T)
            .map(|n| pod_names.contains(&n))
            .ok(),
        Some(true),
        "the other services still answer"
    );
}
