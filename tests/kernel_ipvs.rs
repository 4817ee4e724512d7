//! IPVS mode against a real kernel, checked with tools nobody here wrote: `ipvsadm -Ln`/`-Sn`,
//! `ipset list`/`save`, `iptables-save` and `ip addr`. The proxier runs as a library in the
//! "node" namespace of a test topology (pods and an outside host are namespaces too).
//!
//! One guest run covers: start-up (probe, sysctls), the first sync's kernel state, traffic
//! through it, a second identical sync making no change, stale and excluded virtual servers,
//! a removed service, UDP real servers deleted at once, TCP graceful termination (an
//! established connection to a removed endpoint keeps working at weight 0 while new ones go
//! elsewhere; the real server goes once the connection is closed, found by the periodic check
//! without a sync), and the binary's `--cleanup`.
//!
//! The host kernel has no IPVS and no dummy links: outside the VM this test re-runs itself in
//! the qemu guest of tests/vm/vmrun. It never skips.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube_proxy_rs::backend::ipvs::proxier::{IpvsKernel, IpvsProxier, ipvs_settings};
use kube_proxy_rs::backend::ipvs::{ipvs_config, ipvsadm_save, render};
use kube_proxy_rs::backend::{Backend, SyncRequest};
use kube_proxy_rs::config::parse_render_args;
use kube_proxy_rs::kernel::iptables::{Iptables, detect_variant};
use kube_proxy_rs::kernel::ipvs::IpvsClient;
use kube_proxy_rs::kernel::{Addresses, Conntrack, DummyLink, IpFamily, Ipset, Sysctl};
use kube_proxy_rs::model::{ClusterState, ProxyModel};
use kube_proxy_rs::render::state_from;
use kube_proxy_rs::watch::file::{Objects, parse_objects};
use serde_json::{Value, json};
use support::fakeapi::{node, service};
use support::netns::{Netns, Topology};
use support::pods::{EchoServer, tcp_request, udp_request};

const TEST_NAME: &str = "ipvs_kernel_state";
const T: Duration = Duration::from_millis(1500);

#[test]
fn ipvs_kernel_state() {
    if !support::vm::in_vm() {
        return support::vm::rerun_in_vm(TEST_NAME, 900);
    }
    support::require_root();
    let topo = Topology::new(3);
    let _echo: Vec<EchoServer> = topo
        .pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, &p.name, sa("0.0.0.0", 8080)))
        .collect();
    let _lines: Vec<LineServer> = topo.pods[..2]
        .iter()
        .map(|p| LineServer::start(&p.ns, &p.name, 9090))
        .collect();
    let t0 = Instant::now();
    topo.node.in_netns(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(scenario(&topo))
    });
    eprintln!("ipvs kernel scenario took {:?} in the guest", t0.elapsed());
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

// ------------------------------------------------------------------ the cluster

fn slice(svc: &str, port: u16, proto: &str, eps: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "t", "name": format!("{svc}-1"),
                     "labels": {"kubernetes.io/service-name": svc,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": proto}],
        "endpoints": endpoints
    })
}

const POD0: &str = "10.244.0.10";
const POD1: &str = "10.244.0.11";
const POD2: &str = "10.244.0.12";

/// The cluster: `gt` has the endpoints `gt_eps`, `dns` has `dns_eps`; `with_dns` drops the
/// whole `dns` service when false.
fn objects(gt_eps: &[&str], dns_eps: &[&str], with_dns: bool) -> Vec<Value> {
    let mut np = service("t", "np", "10.96.0.40", &[("p", 80, "TCP", 8080)]);
    np["spec"]["type"] = json!("NodePort");
    np["spec"]["ports"][0]["nodePort"] = json!(30080);
    np["spec"]["externalIPs"] = json!(["203.0.113.5"]);
    let mut sticky = service("t", "sticky", "10.96.0.30", &[("p", 80, "TCP", 8080)]);
    sticky["spec"]["sessionAffinity"] = json!("ClientIP");
    let mut lb = service("t", "lb", "10.96.0.50", &[("p", 80, "TCP", 8080)]);
    lb["spec"]["type"] = json!("LoadBalancer");
    lb["spec"]["ports"][0]["nodePort"] = json!(30050);
    lb["spec"]["loadBalancerSourceRanges"] = json!(["192.168.50.2/32"]);
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}});
    let on = |ip: &'static str| {
        if ip == POD0 {
            (ip, "node1")
        } else {
            (ip, "node2")
        }
    };
    let gt: Vec<(&str, &str)> = gt_eps
        .iter()
        .map(|e| {
            if *e == POD0 {
                (*e, "node1")
            } else {
                (*e, "node2")
            }
        })
        .collect();
    let dns: Vec<(&str, &str)> = dns_eps.iter().map(|e| (*e, "node2")).collect();
    let mut v = vec![
        node("node1", &["192.168.50.1"], Some("10.244.0.0/24")),
        service("t", "web", "10.96.0.10", &[("p", 80, "TCP", 8080)]),
        slice("web", 8080, "TCP", &[on(POD0), on(POD1)]),
        sticky,
        slice("sticky", 8080, "TCP", &[on(POD0), on(POD1)]),
        np,
        slice("np", 8080, "TCP", &[on(POD0), on(POD1)]),
        lb,
        slice("lb", 8080, "TCP", &[on(POD1)]),
        service("t", "gt", "10.96.0.99", &[("p", 80, "TCP", 9090)]),
        slice("gt", 9090, "TCP", &gt),
    ];
    if with_dns {
        v.push(service("t", "dns", "10.96.0.53", &[("p", 53, "UDP", 8080)]));
        v.push(slice("dns", 8080, "UDP", &dns));
    }
    v
}

fn model(objs: &[Value]) -> ProxyModel {
    let text: Vec<String> = objs.iter().map(Value::to_string).collect();
    let mut o = Objects::default();
    let mut warnings = Vec::new();
    parse_objects("kernel_ipvs", &text.join("\n---\n"), &mut o, &mut warnings).unwrap();
    let m = state_from(&o, "node1", &mut warnings).snapshot(kube_proxy_rs::model::IpFamily::V4);
    assert!(warnings.is_empty(), "{warnings:?}");
    m
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

/// One real server as `ipvsadm -Ln` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dest {
    addr: String,
    forward: String,
    weight: u32,
    active: u32,
    inactive: u32,
}

/// `ipvsadm -Ln`: service line (`TCP 10.96.0.10:80 rr`) → its real servers.
fn ipvsadm_ln(ns: &Netns) -> BTreeMap<String, Vec<Dest>> {
    let text = ns.run_ok("ipvsadm", ["-Ln"]);
    let mut out: BTreeMap<String, Vec<Dest>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().skip(3) {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.first() == Some(&"->") {
            out.entry(current.clone()).or_default().push(Dest {
                addr: t[1].to_string(),
                forward: t[2].to_string(),
                weight: t[3].parse().unwrap(),
                active: t[4].parse().unwrap(),
                inactive: t[5].parse().unwrap(),
            });
        } else if !t.is_empty() {
            current = t.join(" ");
            out.entry(current.clone()).or_default();
        }
    }
    out
}

fn service_line<'a>(
    ln: &'a BTreeMap<String, Vec<Dest>>,
    prefix: &str,
) -> Option<(&'a String, &'a Vec<Dest>)> {
    ln.iter()
        .find(|(k, _)| k.starts_with(&format!("{prefix} ")))
}

/// `ipset list NAME` members.
fn ipset_members(ns: &Netns, set: &str) -> BTreeSet<String> {
    let text = ns.run_ok("ipset", ["list", set]);
    text.split("Members:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// `iptables-save` without counters and comment lines.
fn iptables_save(ns: &Netns) -> String {
    ns.run_ok("iptables-save", Vec::<&str>::new())
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                l.split(" [").next().unwrap_or(l).to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Addresses on kube-ipvs0 per `ip -o addr`.
fn dummy_addrs(ns: &Netns) -> BTreeSet<String> {
    ns.run_ok("ip", ["-o", "-4", "addr", "show", "dev", "kube-ipvs0"])
        .lines()
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            t.iter()
                .position(|w| *w == "inet")
                .map(|i| t[i + 1].to_string())
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// ------------------------------------------------------------------ a connection that stays

/// A TCP server answering every line with its name, keeping the connection open.
struct LineServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LineServer {
    fn start(ns: &Netns, name: &str, port: u16) -> LineServer {
        let l = ns.in_netns(|| TcpListener::bind(("0.0.0.0", port)).expect("bind line server"));
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, name) = (stop.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        let name = name.clone();
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let mut w = s.try_clone().unwrap();
                            for line in BufReader::new(s).lines() {
                                if line.is_err()
                                    || w.write_all(format!("{name}\n").as_bytes()).is_err()
                                {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        LineServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends a line on `s` and returns the answer.
fn ask(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"x\n")?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok(line.trim().to_string())
}

fn connect_from(ns: &Netns, addr: SocketAddr) -> TcpStream {
    let s = ns
        .in_netns(|| TcpStream::connect_timeout(&addr, T))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// Closes with RST (SO_LINGER 0): IPVS moves the connection to CLOSE (10 s) instead of
/// TIME_WAIT (2 min).
fn reset(s: TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(
        &s,
        sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("SO_LINGER");
    drop(s);
}

// ------------------------------------------------------------------ the scenario

async fn sync(p: &mut IpvsProxier, m: &ProxyModel, full: bool) {
    // The node facts the daemon's sync loop would pass with the scenario's flags.
    let args = parse_render_args(
        &[
            "--proxy-mode=ipvs".to_string(),
            "--cluster-cidr=10.244.0.0/16".to_string(),
        ],
        "node1",
    )
    .unwrap();
    let facts = kube_proxy_rs::host::HostSettings::from_options(&args.options)
        .facts(&m.node, kube_proxy_rs::model::IpFamily::V4);
    p.sync(SyncRequest {
        model: m,
        changed: &BTreeSet::new(),
        full,
        node_facts: &facts,
    })
    .await
    .expect("sync");
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn scenario(topo: &Topology) {
    let node = &topo.node;
    let outside = &topo.outside;
    let ns = node.name();

    // ---- start-up: probe, sysctls
    let args = parse_render_args(
        &[
            "--proxy-mode=ipvs".to_string(),
            "--cluster-cidr=10.244.0.0/16".to_string(),
            "--ipvs-exclude-cidrs=10.200.0.0/16".to_string(),
            "--ipvs-tcp-timeout=900s".to_string(),
        ],
        "node1",
    )
    .unwrap();
    let opts = args.options;
    let variant = detect_variant(Some(ns)).await.unwrap();
    let ipt = Iptables::new(variant, IpFamily::V4).with_netns(ns);
    let ipset = Ipset::new().with_netns(ns);
    let link = DummyLink::default().with_netns(ns);
    let kernel = IpvsKernel {
        iptables: ipt.clone(),
        ipset: ipset.clone(),
        link: link.clone(),
        conntrack: Conntrack::new().with_netns(ns),
        addrs: Addresses::new().with_netns(ns),
        sysctl: Sysctl::new(),
    };
    let mut config = ipvs_config(&opts, &Default::default(), Vec::new());
    config.random_fully = true;
    let mut settings = ipvs_settings(&opts);
    settings.graceful_check_interval = Duration::from_secs(2);
    let client = IpvsClient::connect().await.expect("IPVS in the guest");
    let mut p = IpvsProxier::start(client, kernel, config, settings)
        .await
        .expect("IPVS mode starts");
    for (k, v) in [
        ("net.ipv4.vs.conntrack", "1"),
        ("net.ipv4.vs.expire_nodest_conn", "1"),
        ("net.ipv4.vs.expire_quiescent_template", "1"),
        ("net.ipv4.ip_forward", "1"),
    ] {
        assert_eq!(node.read_sysctl(k), v, "{k}");
    }
    let timeouts = node.run_ok("ipvsadm", ["-Ln", "--timeout"]);
    assert!(timeouts.contains("(tcp tcpfin udp): 900 "), "{timeouts}");
    assert!(
        ipvsadm_sn(node).is_empty(),
        "the start-up probe must leave no virtual server"
    );
    assert_eq!(p.changes().total(), 0);

    // ---- first sync
    let m1 = model(&objects(&[POD0, POD1], &[POD2], true));
    sync(&mut p, &m1, true).await;

    let rs = |vs: &str, proto: &str, dest: &str| format!("-a {proto} {vs} -r {dest} -m -w 1");
    let mut want = BTreeSet::new();
    let mut add_vs = |vs: &str, proto: &str, extra: &str, dests: &[&str]| {
        want.insert(format!("-A {proto} {vs} -s rr{extra}"));
        for d in dests {
            want.insert(rs(vs, proto, d));
        }
    };
    let web = ["10.244.0.10:8080", "10.244.0.11:8080"];
    add_vs("10.96.0.10:80", "-t", "", &web);
    add_vs("10.96.0.30:80", "-t", " -p 10800", &web);
    add_vs("10.96.0.40:80", "-t", "", &web);
    add_vs("203.0.113.5:80", "-t", "", &web);
    for nip in ["192.168.50.1", "10.244.0.1"] {
        add_vs(&format!("{nip}:30080"), "-t", "", &web);
        add_vs(&format!("{nip}:30050"), "-t", "", &["10.244.0.11:8080"]);
    }
    add_vs("10.96.0.50:80", "-t", "", &["10.244.0.11:8080"]);
    add_vs("203.0.113.10:80", "-t", "", &["10.244.0.11:8080"]);
    add_vs(
        "10.96.0.99:80",
        "-t",
        "",
        &["10.244.0.10:9090", "10.244.0.11:9090"],
    );
    add_vs("10.96.0.53:53", "-u", "", &["10.244.0.12:8080"]);
    let got = ipvsadm_sn(node);
    assert_eq!(
        got,
        want,
        "ipvsadm -Sn\nmissing: {:?}\nextra: {:?}",
        want.difference(&got).collect::<Vec<_>>(),
        got.difference(&want).collect::<Vec<_>>()
    );
    // The renderer's own ipvsadm-save rendering agrees with the kernel's.
    let rendered: BTreeSet<String> = ipvsadm_save(&render(&m1, p.config()))
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(rendered, got, "render's ipvsadm -Sn vs the kernel's");
    let ln = ipvsadm_ln(node);
    let (line, dests) = service_line(&ln, "TCP 10.96.0.30:80").expect("sticky in -Ln");
    assert!(line.contains("persistent 10800"), "{line}");
    assert!(
        dests.iter().all(|d| d.forward == "Masq" && d.weight == 1),
        "{dests:?}"
    );

    // ---- `explain --mode ipvs` reads this kernel's IPVS table (built binary, in the netns)
    let bin = env!("CARGO_BIN_EXE_kube-proxy-rs");
    let explain = |to: &str| {
        let out = node.run(bin, ["explain", "--mode", "ipvs", "--to", to]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "explain {to}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let text = explain("10.96.0.30:80");
    assert!(
        text.contains("Rules:      the kernel's IPVS table"),
        "{text}"
    );
    assert!(
        text.contains("scheduler rr, persistent for 10800 s"),
        "{text}"
    );
    for d in web {
        assert!(text.contains(&format!(" 50.00%  {d}  weight 1")), "{text}");
    }
    let text = explain("10.96.0.53:53/udp");
    assert!(text.contains("100.00%  10.244.0.12:8080"), "{text}");
    let text = explain("10.96.0.10:81");
    assert!(
        text.contains("no IPVS virtual server for TCP 10.96.0.10:81"),
        "{text}"
    );

    let vips = [
        "10.96.0.10",
        "10.96.0.30",
        "10.96.0.40",
        "10.96.0.50",
        "10.96.0.53",
        "10.96.0.99",
        "203.0.113.10",
        "203.0.113.5",
    ];
    assert_eq!(
        dummy_addrs(node),
        vips.iter()
            .map(|v| format!("{v}/32"))
            .collect::<BTreeSet<_>>(),
        "ip addr show kube-ipvs0"
    );
    let link_text = node.run_ok("ip", ["-o", "link", "show", "kube-ipvs0"]);
    assert!(
        link_text.contains("dummy") || link_text.contains("state DOWN"),
        "{link_text}"
    );
    assert!(
        link_text.contains("state DOWN"),
        "left down as upstream: {link_text}"
    );

    assert_eq!(
        ipset_members(node, "KUBE-CLUSTER-IP"),
        set(&[
            "10.96.0.10,tcp:80",
            "10.96.0.30,tcp:80",
            "10.96.0.40,tcp:80",
            "10.96.0.50,tcp:80",
            "10.96.0.53,udp:53",
            "10.96.0.99,tcp:80",
        ])
    );
    assert_eq!(
        ipset_members(node, "KUBE-NODE-PORT-TCP"),
        set(&["30050", "30080"])
    );
    assert_eq!(
        ipset_members(node, "KUBE-EXTERNAL-IP"),
        set(&["203.0.113.5,tcp:80"])
    );
    assert_eq!(
        ipset_members(node, "KUBE-LOAD-BALANCER"),
        set(&["203.0.113.10,tcp:80"])
    );
    assert_eq!(
        ipset_members(node, "KUBE-LOAD-BALANCER-FW"),
        set(&["203.0.113.10,tcp:80"])
    );
    assert_eq!(
        ipset_members(node, "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        set(&["203.0.113.10,tcp:80,192.168.50.2"])
    );
    assert_eq!(
        ipset_members(node, "KUBE-LOOP-BACK"),
        set(&[
            "10.244.0.10,tcp:8080,10.244.0.10",
            "10.244.0.10,tcp:9090,10.244.0.10"
        ])
    );
    assert_eq!(ipset_members(node, "KUBE-IPVS-IPS"), set(&vips));

    let rules = iptables_save(node);
    for want in [
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        "-A INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER",
        "--match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ",
        "--match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE",
        "--match-set KUBE-LOAD-BALANCER-FW dst,dst -j KUBE-SOURCE-RANGES-FIREWALL",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
    ] {
        assert!(
            rules.contains(want),
            "iptables-save lacks {want:?}:\n{rules}"
        );
    }

    // Traffic through what was programmed.
    let seen: BTreeSet<String> = (0..20)
        .filter_map(|_| tcp_request(node, sa("10.96.0.10", 80), T).ok())
        .collect();
    assert_eq!(seen, set(&["pod0", "pod1"]), "ClusterIP from the node");
    let seen: BTreeSet<String> = (0..20)
        .filter_map(|_| tcp_request(outside, sa("192.168.50.1", 30080), T).ok())
        .collect();
    assert_eq!(seen, set(&["pod0", "pod1"]), "NodePort from outside");
    assert_eq!(
        udp_request(node, sa("10.96.0.53", 53), T, None).unwrap(),
        "pod2"
    );

    // ---- a second identical sync changes nothing
    let before = (
        p.changes(),
        ipvsadm_sn(node),
        node.run_ok("ipset", ["save"]),
        iptables_save(node),
        dummy_addrs(node),
    );
    sync(&mut p, &m1, false).await;
    sync(&mut p, &m1, true).await;
    let after = (
        p.changes(),
        ipvsadm_sn(node),
        node.run_ok("ipset", ["save"]),
        iptables_save(node),
        dummy_addrs(node),
    );
    assert_eq!(before.0, after.0, "identical syncs made kernel changes");
    assert_eq!(before, after);
    eprintln!("changes after the first sync: {:?}", after.0);

    // ---- stale virtual servers go, excluded ones and their addresses stay
    for vip in ["10.200.0.1", "10.201.0.1"] {
        node.run_ok("ipvsadm", ["-A", "-t", &format!("{vip}:80"), "-s", "rr"]);
        node.run_ok(
            "ip",
            ["addr", "add", &format!("{vip}/32"), "dev", "kube-ipvs0"],
        );
    }
    sync(&mut p, &m1, false).await;
    let sn = ipvsadm_sn(node);
    assert!(
        sn.contains("-A -t 10.200.0.1:80 -s rr"),
        "excluded VS deleted: {sn:?}"
    );
    assert!(
        !sn.iter().any(|l| l.contains("10.201.0.1")),
        "stale VS kept: {sn:?}"
    );
    let addrs = dummy_addrs(node);
    assert!(
        addrs.contains("10.200.0.1/32") && !addrs.contains("10.201.0.1/32"),
        "{addrs:?}"
    );

    // ---- UDP real servers are deleted at once, even with a flow
    assert_eq!(
        udp_request(node, sa("10.96.0.53", 53), T, Some(40053)).unwrap(),
        "pod2"
    );
    let m_dns1 = model(&objects(&[POD0, POD1], &[POD1], true));
    sync(&mut p, &m_dns1, false).await;
    let ln = ipvsadm_ln(node);
    let (_, dests) = service_line(&ln, "UDP 10.96.0.53:53").expect("dns VS");
    assert_eq!(
        dests.iter().map(|d| d.addr.as_str()).collect::<Vec<_>>(),
        ["10.244.0.11:8080"],
        "UDP real server not deleted at once"
    );
    let r = support::pods::eventually(Duration::from_secs(10), Duration::from_millis(300), || {
        match udp_request(node, sa("10.96.0.53", 53), T, Some(40053)) {
            Ok(n) if n == "pod1" => Ok(n),
            other => Err(other),
        }
    });
    assert!(r.is_ok(), "UDP flow stuck on the removed endpoint: {r:?}");

    // ---- a removed service: VS, address and ipset entry go
    let m_nodns = model(&objects(&[POD0, POD1], &[], false));
    sync(&mut p, &m_nodns, false).await;
    assert!(!ipvsadm_sn(node).iter().any(|l| l.contains("10.96.0.53")));
    assert!(!dummy_addrs(node).contains("10.96.0.53/32"));
    assert!(!ipset_members(node, "KUBE-CLUSTER-IP").contains("10.96.0.53,udp:53"));

    // ---- TCP graceful termination
    let gt = sa("10.96.0.99", 80);
    let mut conn = connect_from(outside, gt);
    let first = ask(&mut conn).expect("ask on the long connection");
    let (gone_ip, stay_name) = match first.as_str() {
        "pod0" => (POD0, "pod1"),
        "pod1" => (POD1, "pod0"),
        other => panic!("unexpected answer {other}"),
    };
    let stay_ip = if gone_ip == POD0 { POD1 } else { POD0 };
    let gone = format!("{gone_ip}:9090");
    let m_gt = model(&objects(&[stay_ip], &[], false));
    sync(&mut p, &m_gt, false).await;
    let ln = ipvsadm_ln(node);
    let (_, dests) = service_line(&ln, "TCP 10.96.0.99:80").expect("gt VS");
    let d = dests
        .iter()
        .find(|d| d.addr == gone)
        .expect("removed real server kept while in use");
    assert_eq!(d.weight, 0, "quiesced: {dests:?}");
    assert_eq!(d.active, 1, "{dests:?}");
    assert_eq!(p.terminating().await.len(), 1);
    assert_eq!(
        ask(&mut conn).expect("established connection survives"),
        first
    );
    for _ in 0..10 {
        let mut c = connect_from(outside, gt);
        assert_eq!(
            ask(&mut c).unwrap(),
            stay_name,
            "new connection to a quiesced server"
        );
        reset(c);
    }
    // Another sync keeps it at weight 0 without sending anything.
    let n = p.changes().ipvs;
    sync(&mut p, &m_gt, false).await;
    assert_eq!(p.changes().ipvs, n, "resync touched the terminating server");
    assert_eq!(ask(&mut conn).unwrap(), first);
    // Close: the periodic check (no sync) deletes it once IPVS has forgotten the connection.
    reset(conn);
    let t0 = Instant::now();
    wait_for(
        "the closed real server to be deleted",
        Duration::from_secs(60),
        || {
            let ln = ipvsadm_ln(node);
            service_line(&ln, "TCP 10.96.0.99:80")
                .is_some_and(|(_, d)| !d.iter().any(|d| d.addr == gone))
        },
    )
    .await;
    eprintln!(
        "terminated real server deleted {:?} after close",
        t0.elapsed()
    );
    assert!(p.terminating().await.is_empty());
    assert_eq!(p.changes().ipvs, n + 1, "exactly one delete");
    let ln = ipvsadm_ln(node);
    let (_, dests) = service_line(&ln, "TCP 10.96.0.99:80").unwrap();
    assert_eq!(dests.len(), 1, "{dests:?}");
    assert_eq!(dests[0].weight, 1);

    // ---- the binary's --cleanup removes IPVS mode (and iptables mode) state
    drop(p);
    let bin = env!("CARGO_BIN_EXE_kube-proxy-rs");
    let out = node.run(bin, ["--cleanup", "-v=2"]);
    assert!(
        out.status.success(),
        "--cleanup failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ipvsadm_sn(node).is_empty(), "cleanup flushes IPVS");
    assert!(!link.exists().await.unwrap(), "cleanup deletes kube-ipvs0");
    let rules = iptables_save(node);
    for chain in [
        "KUBE-IPVS-FILTER",
        "KUBE-SERVICES",
        "KUBE-NODE-PORT",
        "KUBE-POSTROUTING",
    ] {
        assert!(!rules.contains(chain), "{chain} left:\n{rules}");
    }
    let sets = ipset.list_names().await.unwrap();
    assert!(!sets.iter().any(|s| s.starts_with("KUBE-")), "{sets:?}");
}

// ------------------------------------------------------------------ partial syncs

const PARTIAL_TEST: &str = "ipvs_syncs_between_reconciles_touch_only_the_change";

/// Service `svc{i}` at 10.96.1.{i}:80 → port 8080 of `eps` (pod addresses; `local` ones
/// are on this node).
fn churn_service(st: &mut ClusterState, i: usize, eps: &[(&str, bool)]) {
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"namespace": "churn", "name": format!("svc{i}")},
        "spec": {"clusterIP": format!("10.96.1.{i}"), "ports": [{"name": "p", "port": 80}]}
    }))
    .unwrap();
    st.apply_service(&svc);
    let eps: Vec<Value> = eps
        .iter()
        .map(|(ip, local)| {
            json!({"addresses": [ip], "nodeName": if *local { "node1" } else { "node2" }})
        })
        .collect();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "churn", "name": format!("svc{i}-1"),
                     "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .unwrap();
    st.apply_slice(&slice);
}

/// What a sync should leave, read back as the tools print it: `ipvsadm -Sn` lines,
/// `KUBE-CLUSTER-IP` and `KUBE-LOOP-BACK` members, kube-ipvs0 addresses.
type Seen = (
    BTreeSet<String>,
    BTreeSet<String>,
    BTreeSet<String>,
    BTreeSet<String>,
);

fn seen(ns: &Netns) -> Seen {
    (
        ipvsadm_sn(ns),
        ipset_members(ns, "KUBE-CLUSTER-IP"),
        ipset_members(ns, "KUBE-LOOP-BACK"),
        dummy_addrs(ns),
    )
}

fn wanted(m: &ProxyModel, p: &IpvsProxier) -> Seen {
    let d = render(m, p.config());
    let members = |name: &str| -> BTreeSet<String> {
        d.ipset(name)
            .unwrap()
            .entries
            .iter()
            .map(|e| kube_proxy_rs::kernel::ipset::canonical_entry(e))
            .collect()
    };
    (
        ipvsadm_save(&d)
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect(),
        members("KUBE-CLUSTER-IP"),
        members("KUBE-LOOP-BACK"),
        d.bound_addrs.iter().map(|ip| format!("{ip}/32")).collect(),
    )
}

/// Between two reconciles a sync with changed services touches only what changed: one
/// listing (the changed virtual server's real servers, for their connection counts), the
/// requests of the change and nothing else, so drift elsewhere is not even seen. A sync
/// with nothing changed (the periodic resync), and any sync once `reconcile_period` has
/// passed, compares everything with the kernel and repairs it, as upstream's every sync.
#[test]
fn ipvs_syncs_between_reconciles_touch_only_the_change() {
    if !support::vm::in_vm() {
        return support::vm::rerun_in_vm(PARTIAL_TEST, 600);
    }
    support::require_root();
    let node = Netns::new("partial");
    node.in_netns(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(partial_scenario(&node))
    });
}

async fn start_in(ns: &Netns, reconcile_period: Duration) -> IpvsProxier {
    let name = ns.name();
    let variant = detect_variant(Some(name)).await.unwrap();
    let kernel = IpvsKernel {
        iptables: Iptables::new(variant, IpFamily::V4).with_netns(name),
        ipset: Ipset::new().with_netns(name),
        link: DummyLink::default().with_netns(name),
        conntrack: Conntrack::new().with_netns(name),
        addrs: Addresses::new().with_netns(name),
        sysctl: Sysctl::new(),
    };
    let config = kube_proxy_rs::backend::ipvs::IpvsConfig {
        random_fully: true,
        ..Default::default()
    };
    let settings = kube_proxy_rs::backend::ipvs::proxier::IpvsSettings {
        reconcile_period,
        ..Default::default()
    };
    let client = IpvsClient::connect().await.expect("IPVS in the guest");
    IpvsProxier::start(client, kernel, config, settings)
        .await
        .expect("IPVS mode starts")
}

async fn sync_changes(p: &mut IpvsProxier, st: &mut ClusterState) -> ProxyModel {
    let changed = st.take_changes().services;
    let m = st.snapshot(kube_proxy_rs::model::IpFamily::V4);
    p.sync(SyncRequest {
        model: &m,
        changed: &changed,
        full: false,
        node_facts: &Default::default(),
    })
    .await
    .expect("sync");
    m
}

async fn partial_scenario(ns: &Netns) {
    let mut p = start_in(ns, Duration::from_secs(3600)).await;
    let mut st = ClusterState::new("node1");
    for i in 0..20 {
        let (a, b) = (format!("10.244.1.{i}"), format!("10.244.2.{i}"));
        churn_service(&mut st, i, &[(&a, i == 0), (&b, false)]);
    }
    st.take_changes();
    let m = st.snapshot(kube_proxy_rs::model::IpFamily::V4);
    sync(&mut p, &m, true).await;
    assert_eq!(seen(ns), wanted(&m, &p), "first sync");

    // Drift on services the next syncs do not change.
    ns.run_ok("ipvsadm", ["-D", "-t", "10.96.1.19:80"]);
    ns.run_ok("ipset", ["del", "KUBE-CLUSTER-IP", "10.96.1.18,tcp:80"]);
    ns.run_ok("ip", ["addr", "del", "10.96.1.17/32", "dev", "kube-ipvs0"]);
    let drifted = seen(ns);

    // One endpoint replaced: a delete and an add, after one listing.
    let (c, l) = (p.changes(), p.listings());
    churn_service(&mut st, 3, &[("10.244.1.3", false), ("10.244.3.3", false)]);
    sync_changes(&mut p, &mut st).await;
    let (c2, l2) = (p.changes(), p.listings());
    assert_eq!((c2.ipvs - c.ipvs, c2.ipsets - c.ipsets), (2, 0));
    assert_eq!(c2.addresses, c.addresses);
    assert_eq!(
        l2 - l,
        1,
        "one listing: the changed virtual server's real servers"
    );
    let now = seen(ns);
    assert!(
        now.0
            .contains("-a -t 10.96.1.3:80 -r 10.244.3.3:8080 -m -w 1")
    );
    assert!(
        !now.0
            .contains("-a -t 10.96.1.3:80 -r 10.244.2.3:8080 -m -w 1")
    );
    assert_eq!((&now.1, &now.3), (&drifted.1, &drifted.3), "untouched");
    assert!(
        !now.0.iter().any(|l| l.contains("10.96.1.19:80")),
        "not listed"
    );

    // A new service with a local endpoint: its virtual server and real servers, its
    // address, and its three set members (cluster IP, loop-back, kube-ipvs0 addresses).
    churn_service(
        &mut st,
        20,
        &[("10.244.1.20", true), ("10.244.2.20", false)],
    );
    sync_changes(&mut p, &mut st).await;
    let (c3, l3) = (p.changes(), p.listings());
    assert_eq!(
        (
            c3.ipvs - c2.ipvs,
            c3.ipsets - c2.ipsets,
            c3.addresses - c2.addresses
        ),
        (3, 3, 1)
    );
    assert_eq!(l3, l2, "nothing listed");

    // A service removed: its virtual server, address and set members.
    st.remove_service(&kube_proxy_rs::model::ServiceName::new("churn", "svc4"));
    let m = sync_changes(&mut p, &mut st).await;
    let (c4, l4) = (p.changes(), p.listings());
    assert_eq!(
        (
            c4.ipvs - c3.ipvs,
            c4.ipsets - c3.ipsets,
            c4.addresses - c3.addresses
        ),
        (1, 2, 1)
    );
    assert_eq!(l4, l3, "nothing listed");
    let mut expected = wanted(&m, &p);
    // Everything but the drift matches what a reconcile would leave.
    expected.0.retain(|l| !l.contains("10.96.1.19:80"));
    expected.1.remove("10.96.1.18,tcp:80");
    expected.3.remove("10.96.1.17/32");
    assert_eq!(seen(ns), expected);

    // The periodic resync (nothing changed) reconciles: the drift is repaired.
    sync(&mut p, &m, false).await;
    assert_eq!(
        seen(ns),
        wanted(&m, &p),
        "drift repaired by the periodic resync"
    );
    assert!(
        p.listings() - l4 > 20,
        "a reconcile lists every virtual server"
    );
    drop(p);

    // With the reconcile period past, a sync with changes reconciles too.
    let mut p = start_in(ns, Duration::ZERO).await;
    sync(&mut p, &m, true).await;
    ns.run_ok("ipvsadm", ["-D", "-t", "10.96.1.19:80"]);
    churn_service(&mut st, 5, &[("10.244.1.5", false)]);
    let m = sync_changes(&mut p, &mut st).await;
    assert_eq!(
        seen(ns),
        wanted(&m, &p),
        "drift repaired once the period passed"
    );
}
