//! End-to-end scenarios shared by every proxy mode: the built `kube-proxy-rs` binary runs in a
//! "node" namespace against the fake API server; pods and an outside host are namespaces with
//! echo servers; every check is a real connection.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::daemon::Daemon;
use crate::support::fakeapi::{FakeApiServer, endpoint_slice, node, service};
use crate::support::netns::Topology;
use crate::support::pods::{EchoServer, eventually, tcp_request, tcp_request_peer, udp_request};

/// Wait for a rule change: min-sync-period (1s) plus a second, plus slack for slow CI.
pub const PROGRAMMED: Duration = Duration::from_secs(6);

/// [`PROGRAMMED`], five times over inside the emulated (TCG) VM of tests/vm, where every
/// fork/exec of a kernel tool costs ~0.1 s (more on a loaded host), a sync takes seconds, and
/// a dual-stack node syncs both families' proxiers in turn.
pub fn programmed() -> Duration {
    if std::env::var("KPRS_IN_VM").as_deref() == Ok("1") {
        PROGRAMMED * 5
    } else {
        PROGRAMMED
    }
}
const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);
const NODE: &str = "node1";
/// The proxy's flags besides its mode (and the common ones of [`Daemon`]).
const FLAGS: [&str; 4] = [
    "--cluster-cidr=10.244.0.0/16",
    "--iptables-min-sync-period=1s",
    "--ipvs-min-sync-period=1s",
    "-v=2",
];
const PORT: u16 = 8080;

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The running system under test.
pub struct Cluster {
    pub topo: Topology,
    pub api: FakeApiServer,
    pub proxy: std::sync::Mutex<Daemon>,
    pub log: PathBuf,
    dir: tempfile::TempDir,
    _pods: Vec<EchoServer>,
}

impl Cluster {
    /// Starts the topology (5 pods), the fake API with this node, echo servers on every pod,
    /// and kube-proxy-rs in `mode`.
    pub fn start(mode: &str, initial: &[Value]) -> Cluster {
        Self::start_with(mode, initial, |_| {})
    }

    /// [`Cluster::start`], with `prepare` run on the fake API before the proxy starts.
    pub fn start_with(
        mode: &str,
        initial: &[Value],
        prepare: impl FnOnce(&FakeApiServer),
    ) -> Cluster {
        crate::support::require_root();
        let topo = Topology::new(5);
        let mut pods = Vec::new();
        for p in &topo.pods {
            pods.push(EchoServer::start(&p.ns, &p.name, sa("0.0.0.0", PORT)));
        }
        let api = FakeApiServer::start_in(Some(&topo.node), IpAddr::V4(Ipv4Addr::LOCALHOST));
        api.apply(node(NODE, &["192.168.50.1"], Some("10.244.0.0/24")));
        for o in initial {
            api.apply(o.clone());
        }
        prepare(&api);
        let dir = tempfile::tempdir().unwrap();
        let proxy = Daemon::builder(&topo.node, &api, dir.path())
            .mode(mode)
            .args(FLAGS)
            .start();
        let log = proxy.log().to_path_buf();
        let proxy = std::sync::Mutex::new(proxy);
        Cluster {
            topo,
            api,
            proxy,
            log,
            dir,
            _pods: pods,
        }
    }

    pub fn pod_ip(&self, i: usize) -> String {
        self.topo.pods[i].ip.to_string()
    }

    /// Stops the proxy and starts it again in `mode`: the same flags and `extra`, the same log.
    pub fn restart(&self, mode: &str, extra: &[&str]) {
        let mut proxy = self.proxy.lock().unwrap_or_else(|p| p.into_inner());
        proxy.terminate(Duration::from_secs(3));
        *proxy = Daemon::builder(&self.topo.node, &self.api, self.dir.path())
            .mode(mode)
            .args(FLAGS)
            .args(extra.iter().copied())
            .start();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The proxy must still be running; its log is shown if not.
    pub fn assert_alive(&self) {
        let st = self
            .proxy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_wait();
        if let Some(st) = st {
            panic!("kube-proxy-rs exited ({st}):\n{}", self.logs());
        }
    }

    fn pod_ns(&self, i: usize) -> &crate::support::netns::Netns {
        &self.topo.pods[i].ns
    }

    /// An HTTP GET from the node namespace: (status, headers+body text).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        http_get_in(&self.topo.node, addr, path)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .proxy
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .terminate(Duration::from_secs(3));
        if std::thread::panicking() {
            eprintln!("---- kube-proxy-rs log ----\n{}", self.logs());
        }
    }
}

/// A minimal HTTP/1.0 GET from inside a namespace.
pub fn http_get_in(
    ns: &crate::support::netns::Netns,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    ns.in_netns(move || {
        let mut s = TcpStream::connect_timeout(&addr, T)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((status, text))
    })
}

fn names_seen(
    c: &Cluster,
    from: &crate::support::netns::Netns,
    addr: SocketAddr,
    n: usize,
) -> std::collections::BTreeSet<String> {
    let _ = c;
    (0..n)
        .filter_map(|_| tcp_request(from, addr, T).ok())
        .collect()
}

fn svc(name: &str, ip: &str, port: u16, proto: &str) -> Value {
    service("e2e", name, ip, &[("p", port, proto, PORT)])
}

fn slice(name: &str, svc: &str, proto: &str, ips: &[(&str, &str)]) -> Value {
    let mut s = endpoint_slice("e2e", name, svc, &[("p", PORT, proto)], &[], None);
    s["endpoints"] = Value::Array(
        ips.iter()
            .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true, "serving": true, "terminating": false}}))
            .collect(),
    );
    s
}

fn udp_node_port(port: u16) -> Value {
    let mut s = svc("dnsnp", "10.96.0.54", 53, "UDP");
    s["spec"]["type"] = json!("NodePort");
    s["spec"]["ports"][0]["nodePort"] = json!(port);
    s
}

/// Which scenarios a mode supports, and where a mode's upstream semantics differ.
#[derive(Debug, Clone, Copy)]
pub struct Features {
    /// `/proxyMode` body.
    pub mode: &'static str,
    /// externalTrafficPolicy=Local with no local endpoint: upstream IPVS mode keeps the
    /// cluster endpoints on the external virtual servers (kubernetes/kubernetes#97081, so
    /// local pods can still reach the service) instead of dropping external traffic as
    /// iptables mode does. In this single-node topology the reply returns through the node,
    /// so the connection succeeds (to the remote endpoint) rather than timing out. The
    /// health check still answers 503 with zero local endpoints.
    pub etp_local_falls_back_to_cluster: bool,
}

/// Runs every scenario against one running proxy.
pub fn run_all(features: Features) {
    let p = |i: usize| format!("10.244.0.{}", 10 + i);
    let (p0, p1, p2, p3, p4) = (p(0), p(1), p(2), p(3), p(4));
    let mut web = svc("web", "10.96.0.10", 80, "TCP");
    web["spec"]["ports"][0]["targetPort"] = json!("http");
    let mut np = svc("np", "10.96.0.40", 80, "TCP");
    np["spec"]["type"] = json!("NodePort");
    np["spec"]["ports"][0]["nodePort"] = json!(30080);
    np["spec"]["externalIPs"] = json!(["203.0.113.5"]);
    let mut sticky = svc("sticky", "10.96.0.30", 80, "TCP");
    sticky["spec"]["sessionAffinity"] = json!("ClientIP");
    let mut lb = svc("lb", "10.96.0.50", 80, "TCP");
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["ports"][0]["nodePort"] = json!(30050);
    lb["spec"]["loadBalancerSourceRanges"] = json!(["192.168.50.2/32"]);
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}});
    let mut local = svc("local", "10.96.0.60", 80, "TCP");
    local["spec"]["type"] = json!("LoadBalancer");
    local["spec"]["ports"][0]["nodePort"] = json!(30060);
    local["spec"]["externalTrafficPolicy"] = json!("Local");
    local["spec"]["healthCheckNodePort"] = json!(32000);
    let mut itp = svc("itp", "10.96.0.70", 80, "TCP");
    itp["spec"]["internalTrafficPolicy"] = json!("Local");
    let mut headless = svc("headless", "None", 80, "TCP");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    let mut extname = svc("extname", "", 80, "TCP");
    extname["spec"] = json!({"type": "ExternalName", "externalName": "example.com"});
    let mut bad_ip = svc("bad-ip", "10.96.0.999", 80, "TCP");
    bad_ip["spec"]["clusterIPs"] = json!(["10.96.0.999"]);
    let mut bad_port = svc("bad-port", "10.96.0.81", 80, "TCP");
    bad_port["spec"]["ports"] = json!([{"name": "big", "port": 70000, "protocol": "TCP"}, {"name": "icmp", "port": 7, "protocol": "ICMP"}]);
    let mut fqdn = slice("fqdn-1", "web", "TCP", &[("example.com", NODE)]);
    fqdn["addressType"] = json!("FQDN");
    let mut manual = slice("manual-1", "manual", "TCP", &[(&p3, "node2")]);
    manual["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = json!("staff");

    let objects = vec![
        web,
        slice("web-1", "web", "TCP", &[(&p0, NODE), (&p1, "node2")]),
        svc("dns", "10.96.0.53", 53, "UDP"),
        slice("dns-1", "dns", "UDP", &[(&p2, "node2")]),
        svc("empty", "10.96.0.20", 80, "TCP"),
        udp_node_port(30053),
        slice("dnsnp-1", "dnsnp", "UDP", &[(&p2, "node2")]),
        sticky,
        slice(
            "sticky-1",
            "sticky",
            "TCP",
            &[(&p0, NODE), (&p1, "node2"), (&p2, "node2")],
        ),
        np,
        slice("np-1", "np", "TCP", &[(&p0, NODE), (&p1, "node2")]),
        lb,
        slice("lb-1", "lb", "TCP", &[(&p1, "node2")]),
        local,
        slice("local-1", "local", "TCP", &[(&p3, "node2")]),
        itp,
        slice("itp-1", "itp", "TCP", &[(&p0, NODE), (&p1, "node2")]),
        headless,
        slice("headless-1", "headless", "TCP", &[(&p4, NODE)]),
        extname,
        svc("manual", "10.96.0.90", 80, "TCP"),
        manual,
        bad_ip,
        bad_port,
        fqdn,
        slice("badep-1", "web", "TCP", &[("10.244.0.300", NODE)]),
    ];
    let c = Cluster::start(features.mode, &objects);
    let node = &c.topo.node;
    let outside = &c.topo.outside;

    // ClusterIP TCP reaches every endpoint (named targetPort resolved through the slice).
    // Generous: the first full sync takes ~15 s in the emulated VM (each tool exec is slow).
    let r = eventually(Duration::from_secs(60), POLL, || {
        tcp_request(node, sa("10.96.0.10", 80), T)
    });
    c.assert_alive();
    assert!(r.is_ok(), "web never answered: {r:?}\n{}", c.logs());
    let seen = names_seen(&c, node, sa("10.96.0.10", 80), 40);
    assert_eq!(
        seen,
        ["pod0", "pod1"].map(String::from).into(),
        "ClusterIP TCP endpoints"
    );

    // ClusterIP UDP.
    assert_eq!(
        udp_request(node, sa("10.96.0.53", 53), T, None).unwrap(),
        "pod2"
    );

    // No endpoints: refused at once, not a timeout.
    let t0 = Instant::now();
    let e = tcp_request(node, sa("10.96.0.20", 80), Duration::from_secs(3)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "REJECT must be immediate"
    );

    // ClientIP affinity: one backend for one client.
    let seen = names_seen(&c, node, sa("10.96.0.30", 80), 15);
    assert_eq!(seen.len(), 1, "affinity broke: {seen:?}");

    // NodePort and externalIP from outside.
    let seen = names_seen(&c, outside, sa("192.168.50.1", 30080), 30);
    assert_eq!(
        seen,
        ["pod0", "pod1"].map(String::from).into(),
        "NodePort from outside"
    );
    assert!(matches!(
        tcp_request(outside, sa("203.0.113.5", 80), T).as_deref(),
        Ok("pod0" | "pod1")
    ));

    // LB source range: the outside host (in range) gets in; a pod (out of range) is dropped.
    assert_eq!(
        tcp_request(outside, sa("203.0.113.10", 80), T).unwrap(),
        "pod1"
    );
    let e = tcp_request(c.pod_ns(4), sa("203.0.113.10", 80), T).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::TimedOut,
        "out-of-range source must be dropped: {e}"
    );

    // eTP=Local without a local endpoint: dropped (IPVS: the cluster endpoint serves, see
    // `Features`), health check 503 with localEndpoints 0.
    if features.etp_local_falls_back_to_cluster {
        assert_eq!(
            tcp_request(outside, sa("192.168.50.1", 30060), T).unwrap(),
            "pod3",
            "IPVS eTP=Local without local endpoints falls back to cluster endpoints"
        );
    } else {
        let e = tcp_request(outside, sa("192.168.50.1", 30060), T).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    }
    let (code, body) = eventually(programmed(), POLL, || {
        http_get_in(outside, sa("192.168.50.1", 32000), "/")
    })
    .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");
    // ... then a local endpoint appears: 200, traffic flows, client IP preserved.
    c.api.apply(slice(
        "local-1",
        "local",
        "TCP",
        &[(&p3, "node2"), (&p4, NODE)],
    ));
    let r = eventually(programmed(), POLL, || {
        match tcp_request_peer(outside, sa("192.168.50.1", 30060), T) {
            // With the IPVS fallback the remote endpoint answers until the change lands.
            Ok((n, _)) if features.etp_local_falls_back_to_cluster && n != "pod4" => {
                Err(std::io::Error::other(format!("still {n}")))
            }
            other => other,
        }
    });
    let (name, peer) = r.unwrap();
    assert_eq!(name, "pod4", "eTP=Local must use only the local endpoint");
    assert_eq!(
        peer,
        "192.168.50.2".parse::<IpAddr>().unwrap(),
        "client source IP must be preserved"
    );
    // The health check follows the end of the sync, which in IPVS mode comes a little after
    // the virtual servers (and so the traffic) changed.
    let (code, body) = eventually(programmed(), POLL, || {
        match http_get_in(outside, sa("192.168.50.1", 32000), "/") {
            Ok((200, b)) => Ok((200, b)),
            Ok((c, b)) => Err(format!("{c}: {b}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");

    // iTP=Local: only the local endpoint from this node.
    let seen = names_seen(&c, node, sa("10.96.0.70", 80), 20);
    assert_eq!(
        seen,
        ["pod0".to_string()].into(),
        "internalTrafficPolicy Local"
    );

    // Hairpin: pod0 reaches itself through its own service.
    let seen = names_seen(&c, c.pod_ns(0), sa("10.96.0.10", 80), 40);
    assert!(
        seen.contains("pod0") && seen.contains("pod1"),
        "hairpin: {seen:?}"
    );

    // Selector-less service with a hand-made slice.
    assert_eq!(tcp_request(node, sa("10.96.0.90", 80), T).unwrap(), "pod3");

    // Endpoint added then removed takes effect within min-sync-period plus a second.
    // As the EndpointSlice controller does, stamp the change so network programming latency
    // is measured.
    let mut added = slice(
        "web-1",
        "web",
        "TCP",
        &[(&p0, NODE), (&p1, "node2"), (&p2, "node2")],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let stamp = jiff::Timestamp::from_second(now as i64)
        .unwrap()
        .to_string();
    added["metadata"]["annotations"] =
        json!({"endpoints.kubernetes.io/last-change-trigger-time": stamp});
    c.api.apply(added);
    let t0 = Instant::now();
    let r = eventually(programmed(), POLL, || {
        if names_seen(&c, node, sa("10.96.0.10", 80), 15).contains("pod2") {
            Ok(())
        } else {
            Err(())
        }
    });
    assert!(r.is_ok(), "added endpoint never used");
    eprintln!("endpoint add programmed in {:?}", t0.elapsed());
    c.api.apply(slice(
        "web-1",
        "web",
        "TCP",
        &[(&p1, "node2"), (&p2, "node2")],
    ));
    let r = eventually(programmed(), POLL, || {
        if names_seen(&c, node, sa("10.96.0.10", 80), 15).contains("pod0") {
            Err(())
        } else {
            Ok(())
        }
    });
    assert!(r.is_ok(), "removed endpoint still used");

    // A UDP flow follows an endpoint change (stale conntrack entry removed): same client port.
    assert_eq!(
        udp_request(c.pod_ns(4), sa("10.96.0.53", 53), T, Some(40053)).unwrap(),
        "pod2"
    );
    c.api.apply(slice("dns-1", "dns", "UDP", &[(&p3, "node2")]));
    let r = eventually(programmed(), POLL, || {
        match udp_request(c.pod_ns(4), sa("10.96.0.53", 53), T, Some(40053)) {
            Ok(n) if n == "pod3" => Ok(n),
            other => Err(other),
        }
    });
    assert!(r.is_ok(), "UDP flow stuck on the old endpoint: {r:?}");

    // A changed UDP nodePort: the old port's flow is deleted, not left pointing at the pod.
    let old = sa("192.168.50.1", 30053);
    let r = eventually(programmed(), POLL, || {
        udp_request(outside, old, T, Some(40054))
    });
    assert_eq!(r.unwrap(), "pod2");
    c.api.apply(udp_node_port(30054));
    let r = eventually(programmed(), POLL, || {
        udp_request(outside, sa("192.168.50.1", 30054), T, Some(40055))
    });
    assert_eq!(r.unwrap(), "pod2", "new node port never worked");
    let e = udp_request(outside, old, T, Some(40054)).unwrap_err();
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "old node port flow still alive: {e}"
    );

    // Headless and ExternalName services program nothing; bad objects are logged and skipped.
    let logs = c.logs();
    for want in [
        "e2e/bad-ip",
        "10.96.0.999",
        "70000",
        "ICMP",
        "FQDN",
        "10.244.0.300",
    ] {
        assert!(logs.contains(want), "no warning mentioning {want}:\n{logs}");
    }
    c.assert_alive();

    // API server outage: rules stay in force while it is down; a relist after 410 Gone
    // (history compacted while down) brings in what changed meanwhile.
    c.api.set_down(true);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        tcp_request(node, sa("10.96.0.90", 80), T).unwrap(),
        "pod3",
        "rules lost during outage"
    );
    c.api
        .apply(slice("manual-1", "manual", "TCP", &[(&p4, "node2")]));
    c.api.compact();
    c.api.set_down(false);
    // The relist after the outage may bring a full sync of each family first (seconds each
    // in the emulated VM), and the change waits behind them.
    let r = eventually(
        Duration::from_secs(14) + programmed(),
        POLL,
        || match tcp_request(node, sa("10.96.0.90", 80), T) {
            Ok(n) if n == "pod4" => Ok(n),
            other => Err(other),
        },
    );
    assert!(
        r.is_ok(),
        "change made during the outage never programmed: {r:?}"
    );
    c.assert_alive();

    // For the record (not asserted): the daemon's resident memory after all of the above.
    let pid = c.proxy.lock().unwrap_or_else(|p| p.into_inner()).id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if let Some(rss) = status.lines().find(|l| l.starts_with("VmRSS")) {
        eprintln!("kube-proxy-rs {rss}");
    }

    // HTTP endpoints as upstream.
    let (code, body) = c.http_get(sa("127.0.0.1", 10249), "/proxyMode").unwrap();
    assert_eq!(code, 200);
    assert!(
        body.ends_with(&format!("\r\n\r\n{}", features.mode)),
        "{body}"
    );
    let (code, body) = c.http_get(sa("127.0.0.1", 10256), "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"lastUpdated\"") && body.contains("\"nodeEligible\":true"),
        "{body}"
    );
    let (code, _) = c.http_get(sa("127.0.0.1", 10256), "/livez").unwrap();
    assert_eq!(code, 200);
    let (code, body) = c.http_get(sa("127.0.0.1", 10249), "/metrics").unwrap();
    assert_eq!(code, 200);
    for m in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1",
    ] {
        assert!(body.contains(m), "metric {m} missing");
    }
}
