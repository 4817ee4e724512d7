//! End-to-end, iptables mode: objects whose names the API server would refuse (issue 7,
//! item 2) are fed through the fake API server to the running daemon. The kernel is read back
//! with iptables-save: no foreign rule may appear, and every valid service must still answer
//! real connections.

mod scenarios;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use scenarios::{Cluster, programmed};
use support::fakeapi::{endpoint_slice, service};
use support::pods::{eventually, tcp_request};

const NODE: &str = "node1";
const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);
/// A namespace that, written raw into iptables-restore input, closes the comment, ends the
/// rule and adds `-A KUBE-SERVICES -j ACCEPT` of its own.
const INJECTED_NS: &str = "ns\" -j ACCEPT\n-A KUBE-SERVICES -j ACCEPT\n#";

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A TCP service `ns/name` on `ip:80` with port name `port_name`, and its slice to `pod_ip`.
fn service_with_slice(ns: &str, name: &str, port_name: &str, ip: &str, pod_ip: &str) -> [Value; 2] {
    let svc = service(ns, name, ip, &[(port_name, 80, "TCP", 8080)]);
    let mut slice = endpoint_slice(
        ns,
        &format!("{}-1", &name[..name.len().min(40)]),
        name,
        &[(port_name, 8080, "TCP")],
        &[pod_ip],
        Some(NODE),
    );
    slice["metadata"]["namespace"] = json!(ns);
    [svc, slice]
}

fn iptables_save(c: &Cluster) -> String {
    c.topo.node.run_ok("iptables-save", Vec::<&str>::new())
}

/// What must never be in the kernel: the injected rule, section headers or COMMIT inside a
/// rule, and anything of the hostile services (their cluster IPs).
fn assert_no_foreign_rules(save: &str, hostile_ips: &[&str]) {
    for line in save.lines() {
        assert_ne!(
            line.trim(),
            "-A KUBE-SERVICES -j ACCEPT",
            "injected rule:\n{save}"
        );
        if line.starts_with("-A ") {
            for bad in ["COMMIT", "*filter", "*nat", "ns\\\"", "bad name"] {
                assert!(!line.contains(bad), "{bad:?} in rule {line:?}");
            }
        }
    }
    for ip in hostile_ips {
        assert!(
            !save.contains(ip),
            "hostile service {ip} programmed:\n{save}"
        );
    }
    assert!(
        !save.contains(&"x".repeat(64)),
        "1,100-char name programmed"
    );
}

#[test]
fn hostile_object_names_are_skipped_and_valid_services_work() {
    let long = "x".repeat(1100);
    let mut nodeport = service("e2e", "np", "10.96.0.40", &[("p", 80, "TCP", 8080)]);
    nodeport["spec"]["type"] = json!("NodePort");
    nodeport["spec"]["ports"][0]["nodePort"] = json!(30080);
    let mut objects: Vec<Value> = Vec::new();
    objects.extend(service_with_slice(
        "e2e",
        "web",
        "http",
        "10.96.0.10",
        "10.244.0.10",
    ));
    objects.push(nodeport);
    objects.extend(service_with_slice("e2e", "np", "p", "10.96.0.40", "10.244.0.11")[1..].to_vec());
    objects.extend(service_with_slice(
        INJECTED_NS,
        "svc",
        "http",
        "10.96.0.61",
        "10.244.0.12",
    ));
    objects.extend(service_with_slice(
        "e2e",
        "commit",
        "COMMIT",
        "10.96.0.62",
        "10.244.0.12",
    ));
    objects.extend(service_with_slice(
        "e2e",
        "filter",
        "*filter",
        "10.96.0.63",
        "10.244.0.12",
    ));
    objects.extend(service_with_slice(
        "e2e",
        "bad name",
        "http",
        "10.96.0.64",
        "10.244.0.12",
    ));
    objects.extend(service_with_slice(
        "e2e",
        &long,
        "http",
        "10.96.0.65",
        "10.244.0.12",
    ));
    let hostile_ips = [
        "10.96.0.61",
        "10.96.0.62",
        "10.96.0.63",
        "10.96.0.64",
        "10.96.0.65",
    ];

    let c = Cluster::start("iptables", &objects);
    let node = &c.topo.node;
    let r = eventually(Duration::from_secs(60), POLL, || {
        tcp_request(node, sa("10.96.0.10", 80), T)
    });
    c.assert_alive();
    assert_eq!(
        r.as_deref().ok(),
        Some("pod0"),
        "web never answered: {r:?}\n{}",
        c.logs()
    );
    let r = eventually(programmed(), POLL, || {
        tcp_request(&c.topo.outside, sa("192.168.50.1", 30080), T)
    });
    assert_eq!(
        r.as_deref().ok(),
        Some("pod1"),
        "NodePort from outside: {r:?}"
    );
    assert_no_foreign_rules(&iptables_save(&c), &hostile_ips);

    // One warning naming each hostile object, on one log line (no raw newline from the name).
    let logs = c.logs();
    for fragment in [
        r##""ns\" -j ACCEPT\n-A KUBE-SERVICES -j ACCEPT\n#""##.to_string(),
        r#""COMMIT""#.to_string(),
        r#""*filter""#.to_string(),
        r#""bad name""#.to_string(),
        format!(r#""{}"..."#, &long[..80]),
    ] {
        assert!(
            logs.contains(&fragment),
            "no warning with {fragment}:\n{logs}"
        );
    }
    assert!(
        !logs
            .lines()
            .any(|l| l.trim_start().starts_with("-A KUBE-SERVICES")),
        "a name broke a log line:\n{logs}"
    );

    // Through the watch as well: a hostile update and a new valid service arrive together.
    c.api.apply(service(
        INJECTED_NS,
        "late",
        "10.96.0.66",
        &[("http", 80, "TCP", 8080)],
    ));
    for o in service_with_slice("e2e", "late", "http", "10.96.0.67", "10.244.0.13") {
        c.api.apply(o);
    }
    let r = eventually(programmed(), POLL, || {
        tcp_request(node, sa("10.96.0.67", 80), T)
    });
    assert_eq!(
        r.as_deref().ok(),
        Some("pod3"),
        "service added after the hostile ones: {r:?}"
    );
    assert_eq!(tcp_request(node, sa("10.96.0.10", 80), T).unwrap(), "pod0");
    assert_no_foreign_rules(
        &iptables_save(&c),
        &[&hostile_ips[..], &["10.96.0.66"]].concat(),
    );
    c.assert_alive();
}
