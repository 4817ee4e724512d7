//! End-to-end, iptables mode: the node facts the built binary derives from its Node.
//!
//! A node with two addresses on its outside link and `--nodeport-addresses primary`: node
//! ports and health-check node ports answer on the primary node IP only (the Node's
//! InternalIP, though its ExternalIP comes first in the object), never on the other address.

mod scenarios;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};

use scenarios::{http_get_in, programmed};
use support::daemon::Daemon;
use support::fakeapi::{FakeApiServer, endpoint_slice, service};
use support::netns::Topology;
use support::pods::{EchoServer, eventually, tcp_request};

const NODE: &str = "node1";
const PRIMARY: &str = "192.168.50.1";
const OTHER: &str = "192.168.50.3";
const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The Node lists its ExternalIP before its InternalIP (the primary node IP).
fn node_object(internal: &str, external: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [
            {"type": "ExternalIP", "address": external},
            {"type": "InternalIP", "address": internal},
            {"type": "Hostname", "address": NODE}
        ]}
    })
}

fn local_lb() -> (Value, Value) {
    let mut svc = service("e2e", "web", "10.96.0.60", &[("p", 80, "TCP", 8080)]);
    svc["spec"]["type"] = json!("LoadBalancer");
    svc["spec"]["ports"][0]["nodePort"] = json!(30060);
    svc["spec"]["externalTrafficPolicy"] = json!("Local");
    svc["spec"]["healthCheckNodePort"] = json!(32000);
    let mut slice = endpoint_slice("e2e", "web-1", "web", &[("p", 8080, "TCP")], &[], None);
    slice["endpoints"] = json!([{"addresses": ["10.244.0.10"], "nodeName": NODE,
        "conditions": {"ready": true, "serving": true, "terminating": false}}]);
    (svc, slice)
}

#[test]
fn nodeport_addresses_primary_serves_only_the_primary_node_ip() {
    support::require_root();
    let topo = Topology::new(1);
    let _pod = EchoServer::start(&topo.pods[0].ns, "pod0", sa("0.0.0.0", 8080));
    topo.node
        .ip(&["addr", "add", &format!("{OTHER}/24"), "dev", "ext0"]);
    // A new namespace inherits the host's value; start from off to see that nothing sets it.
    topo.node.sysctl("net.ipv4.conf.all.route_localnet", "0");
    let api = FakeApiServer::start_in(Some(&topo.node), IpAddr::V4(Ipv4Addr::LOCALHOST));
    api.apply(node_object(PRIMARY, OTHER));
    let (svc, slice) = local_lb();
    api.apply(svc);
    api.apply(slice);
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Daemon::builder(&topo.node, &api, dir.path())
        .mode("iptables")
        .args([
            "--cluster-cidr=10.244.0.0/16",
            "--nodeport-addresses=primary",
            "--iptables-min-sync-period=1s",
            "-v=2",
        ])
        .start();
    let outside = &topo.outside;

    // The node port answers on the primary node IP ...
    let r = eventually(Duration::from_secs(30), POLL, || {
        tcp_request(outside, sa(PRIMARY, 30060), T)
    });
    assert_eq!(r.ok().as_deref(), Some("pod0"), "{}", proxy.logs());
    // ... and on no other local address: nothing listens there, so the node refuses.
    for addr in [sa(OTHER, 30060), sa("10.244.0.1", 30060)] {
        let e = tcp_request(outside, addr, T).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{addr}: {e}"
        );
    }
    let e = tcp_request(&topo.node, sa("127.0.0.1", 30060), T).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "localhost: {e}"
    );
    // No localhost node ports, so no route_localnet (issue 11).
    assert_eq!(
        topo.node.read_sysctl("net.ipv4.conf.all.route_localnet"),
        "0",
        "route_localnet without localhost node ports"
    );

    // The health check node port listens on the primary node IP only.
    let (code, body) = eventually(programmed(), POLL, || {
        http_get_in(outside, sa(PRIMARY, 32000), "/")
    })
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    let e = http_get_in(outside, sa(OTHER, 32000), "/").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let listening = topo.node.run_ok("ss", ["-Hltn", "sport = :32000"]);
    let locals: Vec<&str> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    // The node has no IPv6 address, so `primary` leaves the IPv6 proxier no prefix of its
    // family: it matches every IPv6 address, as upstream's NewNodePortAddresses does, and
    // listens on an IPv6-only `[::]` that takes no IPv4 connection.
    assert_eq!(
        locals,
        [format!("{PRIMARY}:32000"), "[::]:32000".to_string()],
        "{listening}"
    );

    // The rules say the same: one jump for the node IP, none for every local address.
    // Whichever back end the daemon detected holds the rules; the other is empty.
    let nat: String = ["iptables-legacy-save", "iptables-nft-save"]
        .iter()
        .map(|tool| topo.node.run_ok(tool, ["-t", "nat"]))
        .collect();
    let jumps: Vec<&str> = nat
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.ends_with("-j KUBE-NODEPORTS"))
        .collect();
    assert_eq!(jumps.len(), 1, "{jumps:#?}");
    assert!(
        jumps[0].contains(&format!("-d {PRIMARY}/32 ")),
        "{jumps:#?}"
    );

    // The Node's InternalIP changes: node ports and the health check server move with it
    // (a full sync; upstream restarts).
    api.apply(node_object(OTHER, PRIMARY));
    let r = eventually(programmed(), POLL, || {
        tcp_request(outside, sa(OTHER, 30060), T)
    });
    assert_eq!(r.ok().as_deref(), Some("pod0"), "{}", proxy.logs());
    let e = tcp_request(outside, sa(PRIMARY, 30060), T).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let (code, body) = eventually(programmed(), POLL, || {
        http_get_in(outside, sa(OTHER, 32000), "/")
    })
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let e = http_get_in(outside, sa(PRIMARY, 32000), "/").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(
        proxy.try_wait().is_none(),
        "kube-proxy-rs exited:\n{}",
        proxy.logs()
    );
    proxy.terminate(Duration::from_secs(3));
}
