//! Security, iptables mode (issue 11): nothing that serves HTTP changes state, whatever the
//! method or body; the metrics server is on loopback only by default; an outside client whose
//! address is not in a LoadBalancer's `loadBalancerSourceRanges` is dropped while one inside
//! gets in.

mod scenarios;
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::TimeVal;
use serde_json::json;

use scenarios::{Cluster, programmed};
use support::fakeapi::{endpoint_slice, service};
use support::netns::Netns;
use support::pods::eventually;

/// Timeouts of a SO_SNDTIMEO-bounded connect (no RST, no ICMP: the SYN was dropped).
mod libc_errno {
    pub const EAGAIN: i32 = nix::errno::Errno::EAGAIN as i32;
    pub const EINPROGRESS: i32 = nix::errno::Errno::EINPROGRESS as i32;
    pub const ETIMEDOUT: i32 = nix::errno::Errno::ETIMEDOUT as i32;
}

const NODE: &str = "node1";
const LB_IP: &str = "203.0.113.10";
const POLL: Duration = Duration::from_millis(200);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// One raw HTTP/1.0 request from inside `ns`; the status code (0 if none came back).
fn request(ns: &Netns, addr: SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    ns.in_netns(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return 0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = s.write_all(req.as_bytes());
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    })
}

/// A TCP exchange with the echo server at `dst` from source address `src` inside `ns`.
fn tcp_from(ns: &Netns, src: &str, dst: SocketAddr) -> std::io::Result<String> {
    let src: std::net::SocketAddrV4 = format!("{src}:0").parse().unwrap();
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4 only")
    };
    ns.in_netns(move || {
        let fd: OwnedFd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // connect(2) gives up after SO_SNDTIMEO (EINPROGRESS): a dropped SYN is a timeout.
        let t = TimeVal::new(1, 500_000);
        setsockopt(&fd, sockopt::SendTimeout, &t)?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &t)?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(src))?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst))?;
        let mut s = TcpStream::from(fd);
        s.write_all(b"hello\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().to_string())
    })
}

/// The rules with counters and save-time comments left out.
fn rules(ns: &Netns) -> String {
    ns.run_ok("iptables-save", Vec::<&str>::new())
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.split_once(" [") {
            Some((chain, _)) if l.starts_with(':') => chain.to_string(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn http_changes_nothing_and_source_ranges_drop_outsiders() {
    let mut lb = service("sec", "lb", "10.96.0.50", &[("p", 80, "TCP", 8080)]);
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["externalTrafficPolicy"] = json!("Local");
    lb["spec"]["healthCheckNodePort"] = json!(30111);
    lb["spec"]["ports"][0]["nodePort"] = json!(30050);
    lb["spec"]["loadBalancerSourceRanges"] = json!(["192.168.50.2/32"]);
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": LB_IP}]}});
    let c = Cluster::start("iptables", &[lb]);
    let pod = c.pod_ip(0);
    c.api.apply(endpoint_slice(
        "sec",
        "lb-1",
        "lb",
        &[("p", 8080, "TCP")],
        &[&pod],
        Some(NODE),
    ));
    let outside = &c.topo.outside;
    assert!(
        eventually(programmed(), POLL, || tcp_from(
            outside,
            "192.168.50.2",
            sa(LB_IP, 80)
        ))
        .is_ok(),
        "the in-range outside client never got in"
    );

    // An outside client on the same link but outside the range: dropped (a timeout, no RST).
    outside.ip(&["addr", "add", "192.168.50.3/24", "dev", "eth0"]);
    for _ in 0..3 {
        let got = tcp_from(outside, "192.168.50.3", sa(LB_IP, 80));
        let errno = got.as_ref().err().and_then(std::io::Error::raw_os_error);
        assert!(
            matches!(
                errno,
                Some(libc_errno::EINPROGRESS | libc_errno::ETIMEDOUT | libc_errno::EAGAIN)
            ),
            "out-of-range client: {got:?}"
        );
        assert!(tcp_from(outside, "192.168.50.2", sa(LB_IP, 80)).is_ok());
    }

    // Every server, every path it knows and one it does not, every state-changing method.
    let node = &c.topo.node;
    let metrics = sa("127.0.0.1", 10249);
    let healthz = sa("127.0.0.1", 10256);
    let svc_health = sa("192.168.50.1", 30111);
    let before_rules = rules(node);
    let configz = || {
        let text = c.http_get(metrics, "/configz").unwrap().1;
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    let before_configz = configz();
    assert!(
        before_configz
            .as_deref()
            .is_some_and(|b| b.contains("\"mode\":\"iptables\""))
    );
    let targets = [
        (
            metrics,
            &["/metrics", "/proxyMode", "/configz", "/healthz", "/x"][..],
        ),
        (healthz, &["/healthz", "/livez", "/x"][..]),
        (svc_health, &["/", "/x"][..]),
    ];
    let body = r#"{"mode":"ipvs","kubeproxy.config.k8s.io":{"mode":"ipvs"}}"#;
    for (addr, paths) in targets {
        for path in paths {
            let get = request(node, addr, "GET", path, "");
            assert_ne!(get, 0, "no answer to GET {addr}{path}");
            for method in ["POST", "PUT", "DELETE", "PATCH"] {
                let got = request(node, addr, method, path, body);
                // Upstream's Go handlers answer every method as GET; none acts on it.
                assert!(
                    got == get || got == 405,
                    "{method} {addr}{path}: {got}, GET gives {get}"
                );
            }
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    c.assert_alive();
    assert_eq!(
        rules(node),
        before_rules,
        "an HTTP request changed the rules"
    );
    assert_eq!(configz(), before_configz);
    assert_eq!(
        c.http_get(metrics, "/proxyMode").unwrap().1.lines().last(),
        Some("iptables")
    );

    // RBAC: every request the daemon made is one kubeadm's system:node-proxier allows
    // (services, endpointslices, servicecidrs: list/watch; nodes: get/list/watch; events:
    // create/patch).
    let requests = c.api.requests();
    assert!(
        requests.iter().any(|r| r.contains("endpointslices")),
        "{requests:?}"
    );
    for r in &requests {
        let (method, rest) = r.split_once(' ').unwrap();
        let path = rest.split('?').next().unwrap();
        let allowed = match method {
            "GET" => [
                "/api/v1/services",
                "/apis/discovery.k8s.io/v1/endpointslices",
                "/api/v1/nodes",
                "/apis/networking.k8s.io/v1/servicecidrs",
            ]
            .iter()
            .any(|p| path.starts_with(p)),
            "POST" | "PATCH" | "PUT" => path.contains("/events"),
            _ => false,
        };
        assert!(allowed, "request outside system:node-proxier: {r}");
    }

    // Default flags serve node ports on localhost (route_localnet on), with upstream's rule
    // dropping martian localnet traffic from off the node.
    assert_eq!(node.read_sysctl("net.ipv4.conf.all.route_localnet"), "1");
    assert!(
        before_rules.contains(
            "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        ),
        "no martian-drop rule:\n{before_rules}"
    );

    // Metrics on loopback only by default, as upstream: not reachable on the node's address.
    let from_outside = request(outside, sa("192.168.50.1", 10249), "GET", "/metrics", "");
    assert_eq!(from_outside, 0, "the metrics server answers off-node");
}
