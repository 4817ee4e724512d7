//! Proves the end-to-end harness itself works: namespaces and routing, echo
//! pods and clients, and the fake API server against kube-rs's real watcher.

mod support;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use serde_json::json;
use support::fakeapi::{FakeApiServer, endpoint_slice, node, service, with_label};
use support::netns::{Netns, Topology};
use support::pods::{
    EchoServer, eventually, tcp_request, tcp_request_peer, udp_request, udp_request_peer,
};

const T: Duration = Duration::from_secs(3);
const SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

#[test]
fn topology_routes_pods_node_and_outside() {
    support::require_root();
    let topo = Topology::new(2);
    let names = topo.netns_names();
    assert!(names.iter().all(|n| netns_exists(n)));
    assert_eq!(topo.node.read_sysctl("net.ipv4.ip_forward"), "1");

    let servers: Vec<EchoServer> = topo
        .pods
        .iter()
        .map(|p| EchoServer::start(&p.ns, &p.name, "0.0.0.0:8080".parse().unwrap()))
        .collect();
    for p in &topo.pods {
        let a = sa(p.ip, 8080);
        for from in [&topo.node, &topo.outside] {
            assert_eq!(
                tcp_request(from, a, T).unwrap(),
                p.name,
                "tcp {a} from {}",
                from.name()
            );
            assert_eq!(
                udp_request(from, a, T, None).unwrap(),
                p.name,
                "udp {a} from {}",
                from.name()
            );
        }
        // Plain routing, no NAT: the pod sees the real source addresses.
        assert_eq!(
            tcp_request_peer(&topo.outside, a, T).unwrap(),
            (p.name.clone(), IpAddr::from(Topology::OUTSIDE_IP))
        );
        assert_eq!(
            udp_request_peer(&topo.outside, a, T, Some(40001)).unwrap(),
            (p.name.clone(), IpAddr::from(Topology::OUTSIDE_IP))
        );
        assert_eq!(
            tcp_request_peer(&topo.node, a, T).unwrap(),
            (p.name.clone(), IpAddr::from(Topology::POD_GATEWAY))
        );
    }
    // Pod to pod goes through the node.
    let (p0, p1) = (&topo.pods[0], &topo.pods[1]);
    assert_eq!(
        tcp_request_peer(&p0.ns, sa(p1.ip, 8080), T).unwrap(),
        (p1.name.clone(), IpAddr::from(p0.ip))
    );
    // Pods reach the node's outside address.
    let node_srv = EchoServer::start(&topo.node, "node", "0.0.0.0:8081".parse().unwrap());
    assert_eq!(
        tcp_request(&p1.ns, sa(Topology::NODE_IP, 8081), T).unwrap(),
        "node"
    );
    drop(node_srv);

    // No listener: refused (TCP RST / ICMP port unreachable), not a timeout.
    let e = tcp_request(&topo.outside, sa(p0.ip, 9999), T).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let e = udp_request(&topo.outside, sa(p0.ip, 9999), T, None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    // Nobody at that address: a timeout, reported as TimedOut.
    let short = Duration::from_millis(400);
    let e = tcp_request(&topo.outside, "10.244.0.250:80".parse().unwrap(), short).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    let e = udp_request(
        &topo.outside,
        "10.244.0.250:80".parse().unwrap(),
        short,
        None,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(servers.iter().all(|s| s.served() >= 7));

    // The topology is fit for kube-proxy-style NAT: DNAT a "service" to pod0,
    // from outside, the node itself, another pod, and pod0 itself (hairpin,
    // which needs masquerading).
    let ipt = |args: &str| {
        let args: Vec<&str> = args.split_whitespace().collect();
        topo.node.run_ok("iptables", &args);
    };
    for chain in ["PREROUTING", "OUTPUT"] {
        for proto in ["tcp", "udp"] {
            ipt(&format!(
                "-t nat -A {chain} -d 10.96.0.10 -p {proto} --dport 80 -j DNAT --to-destination {}:8080",
                p0.ip
            ));
        }
    }
    let svc = sa([10, 96, 0, 10], 80);
    let hairpin = tcp_request(&p0.ns, svc, Duration::from_millis(400));
    assert!(
        hairpin.is_err(),
        "hairpin without masquerade should fail: {hairpin:?}"
    );
    ipt(&format!(
        "-t nat -A POSTROUTING -s {0} -d {0} -j MASQUERADE",
        p0.ip
    ));
    let via_svc = |from: &Netns| tcp_request_peer(from, svc, T).unwrap();
    assert_eq!(
        via_svc(&topo.outside),
        (p0.name.clone(), IpAddr::from(Topology::OUTSIDE_IP))
    );
    assert_eq!(via_svc(&p1.ns), (p0.name.clone(), IpAddr::from(p1.ip)));
    assert_eq!(
        via_svc(&p0.ns),
        (p0.name.clone(), IpAddr::from(Topology::POD_GATEWAY))
    );
    assert_eq!(tcp_request(&topo.node, svc, T).unwrap(), p0.name);
    assert_eq!(udp_request(&p0.ns, svc, T, None).unwrap(), p0.name);
    assert_eq!(udp_request(&topo.outside, svc, T, None).unwrap(), p0.name);

    // Processes spawned in a namespace live there and die with their handle.
    let child = topo.node.spawn("sleep", ["60"]);
    let pid = child.id();
    // (`ip netns exec` joins the namespace just after the fork.)
    let inside = eventually(T, Duration::from_millis(20), || {
        topo.node.pids().contains(&pid).then_some(()).ok_or(())
    });
    assert!(inside.is_ok(), "spawned process not in the namespace");
    drop(child);
    assert!(!topo.node.pids().contains(&pid));

    drop(servers);
    drop(topo);
    assert!(
        names.iter().all(|n| !netns_exists(n)),
        "namespaces left behind"
    );
}

#[test]
fn netns_is_deleted_on_panic() {
    support::require_root();
    let name = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let ns = Netns::new("panic");
        *name.lock().unwrap() = ns.name().to_string();
        panic!("boom");
    });
    assert!(r.is_err());
    let name = name.into_inner().unwrap();
    assert!(!name.is_empty() && !netns_exists(&name));
}

#[test]
fn fake_api_serves_a_client_inside_a_netns() {
    support::require_root();
    let ns = Netns::new("api");
    let api = FakeApiServer::start_in(Some(&ns), "127.0.0.1".parse().unwrap());
    api.apply(service(
        "default",
        "web",
        "10.96.0.10",
        &[("http", 80, "TCP", 8080)],
    ));
    let addr = api.addr();
    // Raw HTTP from inside the namespace.
    let body = ns.in_netns(|| {
        let mut s = std::net::TcpStream::connect_timeout(&addr, T).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(
        body.starts_with("HTTP/1.1 200") && body.contains("gitVersion"),
        "{body}"
    );
    // A kube-rs client built from the written kubeconfig, running in the namespace.
    let dir = tempfile::tempdir().unwrap();
    let kc = api.write_kubeconfig(dir.path());
    let names = ns.in_netns(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kc).unwrap();
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(cfg).unwrap();
            let list = Api::<Service>::all(client)
                .list(&ListParams::default())
                .await
                .unwrap();
            list.items
                .into_iter()
                .map(|s| s.metadata.name.unwrap())
                .collect::<Vec<_>>()
        })
    });
    assert_eq!(names, vec!["web".to_string()]);
    assert!(
        api.requests().iter().any(|r| r == "GET /api/v1/services"),
        "{:?}",
        api.requests()
    );
}

/// Events of a watcher driven continuously by a background task (as a real
/// consumer would), so reconnects happen while the test waits.
type WStream = tokio::sync::mpsc::UnboundedReceiver<Result<Event<Service>, watcher::Error>>;

fn drive(mut w: BoxStream<'static, Result<Event<Service>, watcher::Error>>) -> WStream {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = w.next().await {
            if tx.send(e).is_err() {
                return;
            }
        }
    });
    rx
}

async fn next_ev(s: &mut WStream) -> Result<Event<Service>, watcher::Error> {
    tokio::time::timeout(Duration::from_secs(15), s.recv())
        .await
        .expect("watcher produced nothing within 15 s")
        .expect("watcher stream ended")
}

fn svc_key(s: &Service) -> String {
    format!(
        "{}/{}",
        s.metadata.namespace.as_deref().unwrap_or(""),
        s.metadata.name.as_deref().unwrap_or("")
    )
}

/// Consumes events up to InitDone: returns (errors seen before Init, listed keys).
async fn expect_relist(s: &mut WStream) -> (Vec<watcher::Error>, BTreeSet<String>) {
    let (mut errors, mut keys, mut in_init) = (vec![], BTreeSet::new(), false);
    for _ in 0..200 {
        match next_ev(s).await {
            Err(e) => {
                assert!(!in_init, "error during init: {e}");
                errors.push(e);
            }
            Ok(Event::Init) => in_init = true,
            Ok(Event::InitApply(o)) => {
                assert!(in_init);
                keys.insert(svc_key(&o));
            }
            Ok(Event::InitDone) => return (errors, keys),
            Ok(other) => panic!("unexpected event before relist: {other:?}"),
        }
    }
    panic!("no InitDone within 200 events");
}

async fn expect_apply(s: &mut WStream) -> Service {
    match next_ev(s).await {
        Ok(Event::Apply(o)) => o,
        other => panic!("expected Apply, got {other:?}"),
    }
}

async fn expect_apply_skipping_errors(s: &mut WStream) -> Service {
    for _ in 0..50 {
        match next_ev(s).await {
            Ok(Event::Apply(o)) => return o,
            Err(_) => {}
            other => panic!("expected Apply, got {other:?}"),
        }
    }
    panic!("no Apply within 50 events");
}

async fn expect_delete(s: &mut WStream) -> Service {
    match next_ev(s).await {
        Ok(Event::Delete(o)) => o,
        other => panic!("expected Delete, got {other:?}"),
    }
}

fn is_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410 && s.reason == "Expired")
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|s| s.to_string()).collect()
}

async fn watcher_scenario(streaming: bool) {
    let api = FakeApiServer::start();
    api.set_bookmark_interval(Duration::from_millis(200));
    let port = &[("http", 80, "TCP", 8080)];
    api.apply(service("default", "a", "10.96.0.1", port));
    api.apply(with_label(
        service("default", "b", "10.96.0.2", port),
        "service.kubernetes.io/service-proxy-name",
        "other",
    ));
    api.apply(with_label(
        service("kube-system", "c", "None", port),
        "service.kubernetes.io/headless",
        "",
    ));
    let mut cfg = watcher::Config::default().labels(SELECTOR);
    if streaming {
        cfg = cfg.streaming_lists();
    }
    let mut s = drive(
        watcher(Api::<Service>::all(api.client()), cfg)
            .default_backoff()
            .boxed(),
    );

    // Initial list: only the proxyable service.
    let (errors, keys) = expect_relist(&mut s).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(keys, set(&["default/a"]));

    // Changes arrive as Apply / Delete.
    api.apply(service("default", "d", "10.96.0.4", port));
    assert_eq!(svc_key(&expect_apply(&mut s).await), "default/d");
    let two_ports = &[("http", 80, "TCP", 8080), ("dns", 53, "UDP", 53)];
    api.apply(service("default", "a", "10.96.0.1", two_ports));
    let a = expect_apply(&mut s).await;
    assert_eq!(a.spec.unwrap().ports.unwrap().len(), 2);
    api.delete("Service", "default", "a");
    assert_eq!(svc_key(&expect_delete(&mut s).await), "default/a");
    // Leaving the selector looks like a delete (as with the real server).
    api.apply(with_label(
        service("default", "d", "10.96.0.4", port),
        "service.kubernetes.io/service-proxy-name",
        "other",
    ));
    assert_eq!(svc_key(&expect_delete(&mut s).await), "default/d");
    // Objects outside the selector are never seen; bookmarks are invisible.
    api.apply(with_label(
        service("default", "x", "10.96.0.9", port),
        "service.kubernetes.io/headless",
        "",
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    api.apply(service("default", "e", "10.96.0.5", port));
    assert_eq!(svc_key(&expect_apply(&mut s).await), "default/e");
    let bookmark_rv_seen = api.requests().len();

    // Compaction + dropped watch: error (410), then a full relist.
    api.compact();
    api.drop_watches();
    let (errors, keys) = expect_relist(&mut s).await;
    assert!(
        errors.iter().any(is_gone),
        "expected a 410 before the relist: {errors:?}"
    );
    assert_eq!(keys, set(&["default/e"]));
    let reqs = api.requests();
    let relist = reqs[bookmark_rv_seen..].iter().any(|r| {
        if streaming {
            r.contains("watch=true") && r.contains("sendInitialEvents=true")
        } else {
            r.starts_with("GET /api/v1/services?") && !r.contains("watch=true")
        }
    });
    assert!(relist, "no relist request in {reqs:#?}");

    // 503 window: the cut watch resumes from its resourceVersion (kube-rs
    // retries the 503s), no relist; the change made meanwhile arrives.
    api.set_unavailable(true);
    api.apply(service("default", "h", "10.96.0.8", port));
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.set_unavailable(false);
    assert_eq!(
        svc_key(&expect_apply_skipping_errors(&mut s).await),
        "default/h"
    );

    // Outage (server down), changes made meanwhile, history compacted: the
    // watcher reports errors, gets a 410, relists, ends with the current state.
    api.set_down(true);
    api.apply(service("default", "f", "10.96.0.6", port));
    api.delete("Service", "default", "e");
    api.delete("Service", "default", "h");
    api.compact();
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.set_down(false);
    let (errors, keys) = expect_relist(&mut s).await;
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, watcher::Error::WatchStartFailed(_))),
        "expected failed watch starts while down: {errors:?}"
    );
    assert!(
        errors.iter().any(is_gone),
        "expected a 410 before the relist: {errors:?}"
    );
    assert_eq!(keys, set(&["default/f"]));
    // And it keeps watching afterwards.
    api.apply(service("default", "g", "10.96.0.7", port));
    assert_eq!(svc_key(&expect_apply(&mut s).await), "default/g");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains(&format!("labelSelector={SELECTOR}"))),
        "label selector not sent as expected"
    );
    if std::env::var_os("HARNESS_DUMP_REQUESTS").is_some() {
        eprintln!("{:#?}", api.requests());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_list_watch_against_fake_api() {
    watcher_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_streaming_lists_against_fake_api() {
    watcher_scenario(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_api_selectors_nodes_slices_events() {
    let api = FakeApiServer::start();
    let client = api.client();
    api.apply(node("node1", &["192.168.50.1"], Some("10.244.0.0/24")));
    api.apply(node("node2", &["192.168.50.3"], None));

    // Nodes: field selector list, GET by name, 404.
    let nodes: Api<Node> = Api::all(client.clone());
    let l = nodes
        .list(&ListParams::default().fields("metadata.name=node1"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(
        l.items[0].spec.as_ref().unwrap().pod_cidr.as_deref(),
        Some("10.244.0.0/24")
    );
    assert!(nodes.get("node2").await.is_ok());
    match nodes.get("nope").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    let mut w = watcher(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields("metadata.name=node2"),
    )
    .boxed();
    let mut seen = vec![];
    loop {
        match tokio::time::timeout(T, w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Event::InitApply(n) => seen.push(n.metadata.name.unwrap()),
            Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen, vec!["node2"]);

    // Label selectors on a list.
    for (i, labels) in [
        json!({"app": "web", "tier": "fe"}),
        json!({"app": "db"}),
        json!({}),
    ]
    .iter()
    .enumerate()
    {
        let mut s = service(
            "ns1",
            &format!("s{i}"),
            &format!("10.96.1.{i}"),
            &[("p", 80, "TCP", 80)],
        );
        s["metadata"]["labels"] = labels.clone();
        api.apply(s);
    }
    let svcs: Api<Service> = Api::namespaced(client.clone(), "ns1");
    for (sel, want) in [
        ("app=web", vec!["s0"]),
        ("app!=web", vec!["s1", "s2"]),
        ("tier", vec!["s0"]),
        ("!tier", vec!["s1", "s2"]),
        ("app,!tier", vec!["s1"]),
        ("app in (web,db)", vec!["s0", "s1"]),
        ("app notin (web)", vec!["s1", "s2"]),
    ] {
        let l = svcs.list(&ListParams::default().labels(sel)).await.unwrap();
        let got: Vec<String> = l
            .items
            .into_iter()
            .map(|s| s.metadata.name.unwrap())
            .collect();
        assert_eq!(got, want, "selector {sel}");
    }

    // EndpointSlices by service-name label.
    api.apply(endpoint_slice(
        "ns1",
        "s0-abc",
        "s0",
        &[("p", 80, "TCP")],
        &["10.244.0.10"],
        Some("node1"),
    ));
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = Api::all(client.clone());
    let l = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=s0"))
        .await
        .unwrap();
    assert_eq!(l.items.len(), 1);
    assert_eq!(
        l.items[0].endpoints.as_ref().unwrap()[0].addresses,
        vec!["10.244.0.10"]
    );

    // Raw watch: bookmarks every interval, timeoutSeconds ends the stream cleanly.
    api.set_bookmark_interval(Duration::from_millis(300));
    let rv = api.resource_version();
    let raw = |q: String| {
        let c = client.clone();
        async move {
            let req = hyper::Request::builder()
                .uri(format!("/api/v1/services?{q}"))
                .body(vec![])
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), c.request_text(req))
                .await
                .unwrap()
                .unwrap()
        }
    };
    let body = raw(format!(
        "watch=true&allowWatchBookmarks=true&timeoutSeconds=1&resourceVersion={rv}"
    ))
    .await;
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{body}");
    for l in &lines {
        assert_eq!(l["type"], "BOOKMARK");
        assert_eq!(l["object"]["kind"], "Service");
        assert_eq!(l["object"]["metadata"]["resourceVersion"], rv.to_string());
    }
    // Watch from a compacted resourceVersion: one ERROR event with a 410 Status.
    api.compact();
    let body = raw(format!("watch=true&resourceVersion={rv}")).await;
    let ev: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["kind"], "Status");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
    assert_eq!(
        ev["object"]["message"],
        format!("too old resource version: {rv} ({})", rv + 1)
    );
    // 503 while unavailable: kube-rs retries until the server is back.
    api.set_unavailable(true);
    let n2 = nodes.clone();
    let pending = tokio::spawn(async move { n2.get("node1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = |api: &FakeApiServer| {
        api.requests()
            .iter()
            .filter(|r| *r == "GET /api/v1/nodes/node1")
            .count()
    };
    assert!(attempts(&api) >= 2, "503 not retried: {:?}", api.requests());
    api.set_unavailable(false);
    let got = tokio::time::timeout(Duration::from_secs(10), pending).await;
    assert!(got.unwrap().unwrap().is_ok());
    // Down: transport errors, not retried.
    api.set_down(true);
    let r = tokio::time::timeout(T, nodes.get("node1")).await.unwrap();
    assert!(
        matches!(r, Err(ref e) if !matches!(e, kube::Error::Api(_))),
        "{r:?}"
    );
    api.set_down(false);
    assert!(nodes.get("node1").await.is_ok());

    // Events (events.k8s.io/v1) are stored.
    let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "kube-proxy.1", "namespace": "default"},
        "eventTime": "2026-01-01T00:00:00.000000Z", "reason": "Starting",
        "action": "StartKubeProxy", "reportingController": "kube-proxy", "reportingInstance": "kube-proxy-node1",
        "type": "Normal", "note": "Starting kube-proxy."
    }))
    .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
    events.create(&PostParams::default(), &ev).await.unwrap();
    assert_eq!(api.events().len(), 1);
    assert_eq!(api.events()[0]["reason"], "Starting");
    assert!(
        api.requests()
            .iter()
            .any(|r| r == "POST /apis/events.k8s.io/v1/namespaces/default/events")
    );
}
