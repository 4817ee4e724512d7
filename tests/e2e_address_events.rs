//! End-to-end, iptables mode: node ports follow the host's addresses without a Service
//! change. With `--nodeport-addresses` naming a CIDR, the node ports are served on the node's
//! addresses in it, re-read every sync (as upstream); an address added later must be served
//! as soon as the daemon hears of it (an rtnetlink address event wakes a sync), not at the
//! next Service change or the hourly sync.

mod scenarios;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::json;

use support::daemon::Daemon;
use support::fakeapi::{FakeApiServer, endpoint_slice, node, service};
use support::netns::Topology;
use support::pods::{EchoServer, eventually, tcp_request};

const NODE: &str = "node1";
const ADDED: &str = "192.168.60.5";
const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
fn a_node_address_added_later_serves_node_ports_without_a_service_change() {
    support::require_root();
    let topo = Topology::new(1);
    let _pod = EchoServer::start(&topo.pods[0].ns, "pod0", sa("0.0.0.0", 8080));
    let api = FakeApiServer::start_in(Some(&topo.node), IpAddr::V4(Ipv4Addr::LOCALHOST));
    api.apply(node(NODE, &["192.168.50.1"], Some("10.244.0.0/24")));
    let mut svc = service("e2e", "web", "10.96.0.61", &[("p", 80, "TCP", 8080)]);
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(30061);
    api.apply(svc);
    let pod_ip = topo.pods[0].ip.to_string();
    api.apply(endpoint_slice(
        "e2e",
        "web-1",
        "web",
        &[("p", 8080, "TCP")],
        &[pod_ip.as_str()],
        Some(NODE),
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Daemon::builder(&topo.node, &api, dir.path())
        .mode("iptables")
        .args([
            "--cluster-cidr=10.244.0.0/16",
            "--nodeport-addresses=192.168.60.0/24",
            "--iptables-min-sync-period=1s",
            "-v=2",
        ])
        .start();
    let outside = &topo.outside;

    // Synced: the ClusterIP answers; no address of the node is in the CIDR yet, so the node
    // port is served nowhere.
    let r = eventually(Duration::from_secs(30), POLL, || {
        tcp_request(&topo.node, sa("10.96.0.61", 80), T)
    });
    assert_eq!(r.ok().as_deref(), Some("pod0"), "{}", proxy.logs());
    let e = tcp_request(outside, sa("192.168.50.1", 30061), T).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // An address in the CIDR appears: the node port answers there within seconds (the next
    // sync would otherwise wait for a change, up to an hour).
    topo.node
        .ip(&["addr", "add", &format!("{ADDED}/24"), "dev", "ext0"]);
    let r = eventually(Duration::from_secs(10), POLL, || {
        tcp_request(outside, sa(ADDED, 30061), T)
    });
    assert_eq!(r.ok().as_deref(), Some("pod0"), "{}", proxy.logs());
    // Still not on the address outside the CIDR.
    let e = tcp_request(outside, sa("192.168.50.1", 30061), T).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // And its rule goes when the address goes (the packets would now just be routed).
    let nat_rules = || {
        ["iptables-nft-save", "iptables-legacy-save"]
            .map(|tool| topo.node.run_ok(tool, ["-t", "nat"]))
            .join("")
    };
    assert!(
        nat_rules().contains(&format!("-d {ADDED}/32")),
        "{}",
        nat_rules()
    );
    topo.node
        .ip(&["addr", "del", &format!("{ADDED}/24"), "dev", "ext0"]);
    let gone = eventually(Duration::from_secs(10), POLL, || {
        let rules = nat_rules();
        if rules.contains(ADDED) {
            Err(rules)
        } else {
            Ok(())
        }
    });
    assert!(gone.is_ok(), "{gone:?}\n{}", proxy.logs());
    proxy.kill();
}
