//! API-server faults, iptables mode (issue 11): a watch cut in the middle of an event, a server
//! that refuses to answer for a while, `410 Gone` forcing a relist, lists that take seconds.
//! Throughout, the rules in the kernel stay exactly as they were (no flush, nothing of a
//! half-finished relist), a service keeps answering real connections and `/healthz` stays
//! 200 as upstream's (no update is pending while the server is away); afterwards the daemon
//! converges to what the server holds.

mod scenarios;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use scenarios::{Cluster, programmed};
use support::fakeapi::{endpoint_slice, service};
use support::pods::{eventually, tcp_request};

const NODE: &str = "node1";
const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);
/// Recovery: the watchers' backoff step after repeated outages (client-go's reflector:
/// 30 s cap, jitter 1.0, so up to 60 s), a 4 s list and a sync.
const CONVERGE: Duration = Duration::from_secs(80);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn svc_and_slice(name: &str, ip: &str, pod: &str) -> [Value; 2] {
    [
        service("faults", name, ip, &[("p", 80, "TCP", 8080)]),
        endpoint_slice(
            "faults",
            &format!("{name}-1"),
            name,
            &[("p", 8080, "TCP")],
            &[pod],
            Some(NODE),
        ),
    ]
}

/// kube-proxy's rules, counters left out.
fn kube_rules(c: &Cluster) -> String {
    c.topo
        .node
        .run_ok("iptables-save", Vec::<&str>::new())
        .lines()
        .filter(|l| l.contains("KUBE-"))
        .map(|l| match l.split_once(" [") {
            Some((chain, _)) if l.starts_with(':') => chain.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn healthz(c: &Cluster) -> u16 {
    c.http_get(sa("127.0.0.1", 10256), "/healthz")
        .map(|(code, _)| code)
        .unwrap_or(0)
}

/// For `d`: the rules stay `rules`, service A answers, `/healthz` is 200.
fn hold_steady(c: &Cluster, rules: &str, d: Duration, what: &str) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        c.assert_alive();
        assert_eq!(kube_rules(c), rules, "{what}: the rules changed");
        assert!(
            tcp_request(&c.topo.outside, sa("10.96.7.1", 80), T).is_ok(),
            "{what}: service a stopped answering"
        );
        assert_eq!(healthz(c), 200, "{what}: /healthz");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn answers(c: &Cluster, ip: &str, within: Duration) -> bool {
    eventually(within, POLL, || tcp_request(&c.topo.outside, sa(ip, 80), T)).is_ok()
}

fn gone(c: &Cluster, ip: &str, within: Duration) -> bool {
    let ip = ip.to_string();
    eventually(within, POLL, || {
        if kube_rules(c).contains(&format!("-d {ip}/32")) {
            Err(())
        } else {
            Ok(())
        }
    })
    .is_ok()
}

#[test]
fn api_server_faults_leave_the_kernel_alone_then_converge() {
    let c = Cluster::start("iptables", &[]);
    let (p0, p1, p2) = (c.pod_ip(0), c.pod_ip(1), c.pod_ip(2));
    for o in svc_and_slice("a", "10.96.7.1", &p0) {
        c.api.apply(o);
    }
    assert!(answers(&c, "10.96.7.1", programmed()), "a never answered");

    // 1. A watch cut in the middle of an event: the half line is not applied; the change
    //    arrives after the watcher reconnects.
    c.api.cut_next_event_mid_line();
    for o in svc_and_slice("b", "10.96.7.2", &p1) {
        c.api.apply(o);
    }
    assert!(answers(&c, "10.96.7.2", CONVERGE), "b after a cut watch");
    assert!(answers(&c, "10.96.7.1", T * 3));

    // 2. The server answers nothing for 8 s; meanwhile b is deleted and c added there.
    std::thread::sleep(programmed());
    let steady = kube_rules(&c);
    c.api.set_down(true);
    c.api.delete("Service", "faults", "b");
    c.api.delete("EndpointSlice", "faults", "b-1");
    for o in svc_and_slice("c", "10.96.7.3", &p2) {
        c.api.apply(o);
    }
    hold_steady(&c, &steady, Duration::from_secs(8), "API server down");
    c.api.set_down(false);
    assert!(answers(&c, "10.96.7.3", CONVERGE), "c after the outage");
    assert!(
        gone(&c, "10.96.7.2", programmed()),
        "b's rules after the outage"
    );

    // 2b. Connection refused (a TCP reset for every packet to the server) for 8 s, with
    //     changes made there meanwhile. The reject rule is not kube-proxy's: it stays.
    std::thread::sleep(programmed());
    let steady = kube_rules(&c);
    let port = c.api.addr().port().to_string();
    let reject = |op: &str| {
        let args = [
            "-t",
            "filter",
            op,
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "127.0.0.1",
            "--dport",
            &port,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ];
        c.topo.node.run_ok("iptables", args);
    };
    reject("-I");
    c.api.drop_watches();
    c.api.delete("Service", "faults", "a");
    for o in svc_and_slice("a", "10.96.7.1", &p1) {
        c.api.apply(o);
    }
    hold_steady(
        &c,
        &steady,
        Duration::from_secs(8),
        "API server refusing connections",
    );
    reject("-D");
    assert!(
        eventually(CONVERGE, POLL, || {
            let peer = tcp_request(&c.topo.outside, sa("10.96.7.1", 80), T)?;
            if peer == c.topo.pods[1].name {
                Ok(())
            } else {
                Err(std::io::Error::other(peer))
            }
        })
        .is_ok(),
        "a did not move to pod 1 after the refusal"
    );

    // 3. 410 Gone on re-watch with lists taking 4 s: no rule changes during the slow relist.
    std::thread::sleep(programmed());
    let steady = kube_rules(&c);
    c.api.set_list_delay(Duration::from_secs(4));
    c.api.compact();
    c.api.drop_watches();
    hold_steady(&c, &steady, Duration::from_secs(6), "slow relist after 410");
    for o in svc_and_slice("d", "10.96.7.4", &p1) {
        c.api.apply(o);
    }
    c.api.delete("Service", "faults", "c");
    assert!(answers(&c, "10.96.7.4", CONVERGE), "d after the relist");
    assert!(
        gone(&c, "10.96.7.3", programmed()),
        "c's rules after the relist"
    );
    assert!(answers(&c, "10.96.7.1", T * 3));
    assert_eq!(healthz(&c), 200);
    let relists = c
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services") && !r.contains("watch=true"))
        .count();
    assert!(relists >= 2, "no relist after 410: {relists} lists");
    c.assert_alive();
}
