//! End-to-end, dual-stack, in iptables and in nftables mode: the built binary runs one
//! proxier per IP family.
//!
//! The test topology gets IPv6 ULA addresses next to its IPv4 ones (node `fd00:50::1` on the
//! outside link, pods `fd00:244::1x`); the fake API server serves a dual-stack Service, IPv6
//! Services and both families' EndpointSlices. Packets prove each case: both cluster IPs of
//! the dual-stack Service answer, an IPv6 NodePort answers from outside, an IPv6 Service
//! without endpoints is refused, ClientIP affinity holds over IPv6, and an eTP=Local IPv6
//! LoadBalancer's health check counts its local endpoint. Metrics and `/healthz` report
//! both families.

mod scenarios;
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};

use scenarios::{http_get_in, programmed};
use support::daemon::Daemon;
use support::fakeapi::{FakeApiServer, endpoint_slice, service};
use support::netns::Topology;
use support::pods::{EchoServer, eventually, tcp_request};

const NODE: &str = "node1";
const NODE6: &str = "fd00:50::1";
const OUTSIDE6: &str = "fd00:50::2";
const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn pod6(i: usize) -> String {
    format!("fd00:244::{}", 10 + i)
}

/// IPv6 next to the topology's IPv4: the same links, routed the same way (`nodad`, so the
/// addresses are usable at once).
fn add_ipv6(topo: &Topology) {
    for ns in [&topo.node, &topo.outside] {
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
    }
    topo.node.sysctl("net.ipv6.conf.all.forwarding", "1");
    topo.node.ip(&[
        "addr",
        "add",
        &format!("{NODE6}/64"),
        "dev",
        "ext0",
        "nodad",
    ]);
    topo.outside.ip(&[
        "addr",
        "add",
        &format!("{OUTSIDE6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    topo.outside
        .ip(&["-6", "route", "add", "default", "via", NODE6]);
    topo.node
        .ip(&["-6", "route", "add", "default", "via", OUTSIDE6]);
    for (i, p) in topo.pods.iter().enumerate() {
        p.ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        p.ns.ip(&[
            "addr",
            "add",
            &format!("{}/128", pod6(i)),
            "dev",
            "eth0",
            "nodad",
        ]);
        topo.node
            .ip(&["addr", "add", "fd00:244::1/128", "dev", &p.node_if, "nodad"]);
        topo.node.ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/128", pod6(i)),
            "dev",
            &p.node_if,
        ]);
        p.ns.ip(&["-6", "route", "add", "fd00:244::1/128", "dev", "eth0"]);
        p.ns.ip(&["-6", "route", "add", "default", "via", "fd00:244::1"]);
    }
}

fn node_object() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:244::/64"]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "192.168.50.1"},
            {"type": "InternalIP", "address": NODE6}
        ]}
    })
}

/// A Service with `cluster_ips` (the first decides `clusterIP`) and its families.
fn svc(name: &str, cluster_ips: &[&str]) -> Value {
    let mut s = service("e2e", name, cluster_ips[0], &[("p", 80, "TCP", 8080)]);
    s["spec"]["clusterIPs"] = json!(cluster_ips);
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    s["spec"]["ipFamilies"] = json!(families);
    s["spec"]["ipFamilyPolicy"] = json!(if families.len() > 1 {
        "PreferDualStack"
    } else {
        "SingleStack"
    });
    s
}

fn slice6(name: &str, service: &str, addresses: &[&str], node: Option<&str>) -> Value {
    let mut s = endpoint_slice("e2e", name, service, &[("p", 8080, "TCP")], addresses, node);
    s["addressType"] = json!("IPv6");
    s
}

fn objects() -> Vec<Value> {
    let mut out = vec![node_object()];
    // Dual-stack ClusterIP + NodePort, served by pod0 in both families.
    let mut web = svc("web", &["10.96.0.10", "fd00:96::10"]);
    web["spec"]["type"] = json!("NodePort");
    web["spec"]["ports"][0]["nodePort"] = json!(30080);
    out.push(web);
    out.push(endpoint_slice(
        "e2e",
        "web-4",
        "web",
        &[("p", 8080, "TCP")],
        &["10.244.0.10"],
        Some(NODE),
    ));
    out.push(slice6("web-6", "web", &[&pod6(0)], Some(NODE)));
    // IPv6-only, no endpoints: refused.
    out.push(svc("empty", &["fd00:96::20"]));
    // IPv6-only with ClientIP affinity over pod1 and pod2.
    let mut sticky = svc("sticky", &["fd00:96::30"]);
    sticky["spec"]["sessionAffinity"] = json!("ClientIP");
    out.push(sticky);
    out.push(slice6(
        "sticky-6",
        "sticky",
        &[&pod6(1), &pod6(2)],
        Some(NODE),
    ));
    // IPv6-only eTP=Local LoadBalancer with a health check node port.
    let mut lb = svc("lb", &["fd00:96::40"]);
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["ports"][0]["nodePort"] = json!(30040);
    lb["spec"]["externalTrafficPolicy"] = json!("Local");
    lb["spec"]["healthCheckNodePort"] = json!(32040);
    out.push(lb);
    out.push(slice6("lb-6", "lb", &[&pod6(3)], Some(NODE)));
    out
}

#[test]
fn dual_stack_services_answer_in_both_families() {
    dual_stack("iptables");
}

/// The same in nftables mode: the `ip6 kube-proxy` table carries a client in a pod to a pod
/// process over an IPv6 ClusterIP, node port, affinity and the eTP=Local LoadBalancer.
#[test]
fn dual_stack_services_answer_in_both_families_in_nftables_mode() {
    dual_stack("nftables");
}

fn dual_stack(mode: &str) {
    support::require_root();
    let topo = Topology::new(5);
    add_ipv6(&topo);
    let _pods: Vec<EchoServer> = topo
        .pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, &p.name, sa("::", 8080)))
        .collect();
    let api = FakeApiServer::start_in(Some(&topo.node), IpAddr::V4(Ipv4Addr::LOCALHOST));
    for o in objects() {
        api.apply(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Daemon::builder(&topo.node, &api, dir.path())
        .mode(mode)
        .args([
            "--cluster-cidr=10.244.0.0/16,fd00:244::/56",
            "--iptables-min-sync-period=1s",
            "-v=2",
        ])
        .start();
    let client = &topo.pods[4].ns;

    // Both cluster IPs of the dual-stack Service reach pod0.
    for vip in [sa("10.96.0.10", 80), sa("fd00:96::10", 80)] {
        let r = eventually(Duration::from_secs(30), POLL, || {
            tcp_request(client, vip, T)
        });
        assert_eq!(r.ok().as_deref(), Some("pod0"), "{vip}\n{}", proxy.logs());
    }
    // The IPv6 node port answers from outside, as the IPv4 one does.
    for np in [sa(NODE6, 30080), sa("192.168.50.1", 30080)] {
        let r = eventually(programmed(), POLL, || tcp_request(&topo.outside, np, T));
        assert_eq!(r.ok().as_deref(), Some("pod0"), "{np}\n{}", proxy.logs());
    }
    // No endpoints: the connection fails (rejected: see the rules below).
    assert!(tcp_request(client, sa("fd00:96::20", 80), T).is_err());
    if mode == "iptables" {
        // On the REJECT rule: its counter moves.
        let reject = |t: &str| -> u64 {
            t.lines()
                .find(|l| l.contains("e2e/empty:p has no endpoints") && l.contains("-j REJECT"))
                .and_then(|l| l.strip_prefix('[')?.split(':').next()?.parse().ok())
                .unwrap_or(0)
        };
        let before = reject(&saved_table(&topo, "ip6tables", "filter"));
        assert!(tcp_request(client, sa("fd00:96::20", 80), T).is_err());
        let after = reject(&saved_table(&topo, "ip6tables", "filter"));
        assert!(after > before, "REJECT counter {before} -> {after}");
    }
    // ClientIP affinity: every connection of one client lands on the same pod.
    let seen: BTreeSet<String> = (0..12)
        .map(|_| tcp_request(client, sa("fd00:96::30", 80), T).expect("sticky"))
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen.iter().all(|n| n == "pod1" || n == "pod2"), "{seen:?}");
    // The eTP=Local LB's node port and health check over IPv6.
    let r = tcp_request(&topo.outside, sa(NODE6, 30040), T);
    assert_eq!(r.ok().as_deref(), Some("pod3"), "{}", proxy.logs());
    let (code, body) = eventually(programmed(), POLL, || {
        http_get_in(&topo.outside, sa(NODE6, 32040), "/")
    })
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");

    // The rules of each family are in its own tables.
    if mode == "nftables" {
        let list = |family: &str| {
            topo.node
                .run_ok("nft", ["list", "table", family, "kube-proxy"])
        };
        let (v4, v6) = (list("ip"), list("ip6"));
        assert!(
            v6.contains("fd00:96::10 . tcp . 80 : goto service-"),
            "{v6}"
        );
        assert!(!v6.contains("10.96.0.10"), "{v6}");
        assert!(v4.contains("10.96.0.10 . tcp . 80 : goto service-"), "{v4}");
        assert!(!v4.contains("fd00:96::10"), "{v4}");
        assert!(
            v6.contains("fd00:96::20 . tcp . 80 comment \"e2e/empty:p\" : goto reject-chain"),
            "{v6}"
        );
        assert!(
            !saved(&topo, "ip6tables").contains("KUBE-SERVICES"),
            "no iptables rules in nftables mode"
        );
    } else {
        check_iptables_families(&topo);
    }

    // Metrics and health name both families.
    let (_, metrics) = http_get_in(&topo.node, sa("127.0.0.1", 10249), "/metrics").unwrap();
    for family in ["IPv4", "IPv6"] {
        let needle =
            format!("kubeproxy_sync_proxy_rules_last_timestamp_seconds{{ip_family=\"{family}\"}}");
        assert!(metrics.contains(&needle), "{needle}\n{metrics}");
    }
    let (code, health) = http_get_in(&topo.node, sa("127.0.0.1", 10256), "/healthz").unwrap();
    assert_eq!(code, 200, "{health}");
    assert!(
        health.contains("\"IPv4\"") && health.contains("\"IPv6\""),
        "{health}"
    );
    assert!(
        proxy.try_wait().is_none(),
        "kube-proxy-rs exited:\n{}",
        proxy.logs()
    );
    proxy.terminate(Duration::from_secs(3));
}

/// iptables mode: each family's rules in its own tool's tables, IPv6 node ports never on
/// localhost.
fn check_iptables_families(topo: &Topology) {
    let (v4, v6) = (saved(topo, "iptables"), saved(topo, "ip6tables"));
    assert!(v6.contains("-d fd00:96::10/128"), "{v6}");
    assert!(!v6.contains("10.96.0.10"), "{v6}");
    assert!(v4.contains("-d 10.96.0.10/32"), "{v4}");
    assert!(!v4.contains("fd00:96::10"), "{v4}");
    let tail: Vec<&str> = v6
        .lines()
        .filter(|l| l.contains("-A KUBE-SERVICES") && l.ends_with("-j KUBE-NODEPORTS"))
        .collect();
    assert!(
        tail.len() == 1 && tail[0].contains("! -d ::1/128") && tail[0].contains("--dst-type LOCAL"),
        "IPv6 node ports never on localhost: {tail:?}"
    );
}

/// `nat` of `tool`'s family, from whichever back end holds the rules.
fn saved(topo: &Topology, tool: &str) -> String {
    saved_table(topo, tool, "nat")
}

fn saved_table(topo: &Topology, tool: &str, table: &str) -> String {
    ["legacy", "nft"]
        .iter()
        .map(|b| {
            topo.node
                .run_ok(&format!("{tool}-{b}-save"), ["-c", "-t", table])
        })
        .collect()
}
