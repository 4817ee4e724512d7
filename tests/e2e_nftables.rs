//! End-to-end, nftables mode: the same scenarios as iptables mode (tests/scenarios), real
//! packets through the `kube-proxy` table the built binary programs with
//! `--proxy-mode=nftables`.

mod scenarios;
mod support;

#[test]
fn nftables_mode_end_to_end() {
    scenarios::run_all(scenarios::Features {
        mode: "nftables",
        etp_local_falls_back_to_cluster: false,
    });
}

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use scenarios::Cluster;
use support::fakeapi::{endpoint_slice, service};
use support::pods::{eventually, tcp_request};

const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A line echo server on pod0 keeping its one connection open (bounded: 60 s idle).
fn start_line_echo(c: &Cluster) {
    let listener = c.topo.pods[0]
        .ns
        .in_netns(|| TcpListener::bind("0.0.0.0:9090").unwrap());
    std::thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut out = conn.try_clone().unwrap();
        for line in BufReader::new(conn).lines().take(10) {
            let Ok(line) = line else { return };
            if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                return;
            }
        }
    });
}

fn echo(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, msg: &str) -> String {
    stream.write_all(format!("{msg}\n").as_bytes()).unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line.trim().to_string()
}

fn kube_services_in_iptables(c: &Cluster) -> bool {
    c.topo
        .node
        .run_ok("iptables-save", ["-t", "nat"])
        .contains(":KUBE-SERVICES")
}

fn nft_table_exists(c: &Cluster) -> bool {
    c.topo
        .node
        .run("nft", ["list", "table", "ip", "kube-proxy"])
        .status
        .success()
}

/// iptables mode → nftables mode → iptables mode on a running node: each mode removes the
/// other's rules at start, new connections to a ClusterIP work after each switch, and a
/// connection established before the switches keeps working.
#[test]
fn switching_modes_is_clean_and_keeps_established_connections() {
    let objects = [
        service("e2e", "web", "10.96.0.10", &[("http", 80, "TCP", 8080)]),
        endpoint_slice(
            "e2e",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &["10.244.0.10"],
            Some("node1"),
        ),
        service("e2e", "long", "10.96.0.11", &[("p", 9090, "TCP", 9090)]),
        endpoint_slice(
            "e2e",
            "long-1",
            "long",
            &[("p", 9090, "TCP")],
            &["10.244.0.10"],
            Some("node1"),
        ),
    ];
    let c = Cluster::start("iptables", &objects);
    let works = |what: &str| {
        let r = eventually(Duration::from_secs(30), POLL, || {
            tcp_request(&c.topo.node, sa("10.96.0.10:80"), T)
        });
        assert_eq!(
            r.as_deref().ok(),
            Some("pod0"),
            "{what}: {r:?}\n{}",
            c.logs()
        );
    };
    works("iptables mode");
    assert!(kube_services_in_iptables(&c));

    start_line_echo(&c);
    let mut stream = c
        .topo
        .node
        .in_netns(|| TcpStream::connect_timeout(&sa("10.96.0.11:9090"), T).unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    assert_eq!(echo(&mut stream, &mut reader, "one"), "one");

    c.restart("nftables", &[]);
    let switched = eventually(Duration::from_secs(30), POLL, || {
        match (nft_table_exists(&c), kube_services_in_iptables(&c)) {
            (true, false) => Ok(()),
            other => Err(other),
        }
    });
    assert!(
        switched.is_ok(),
        "(nft table, iptables chains) = {switched:?}\n{}",
        c.logs()
    );
    works("after switching to nftables mode");
    assert_eq!(
        echo(&mut stream, &mut reader, "two"),
        "two",
        "established connection lost"
    );

    c.restart("iptables", &[]);
    let switched = eventually(Duration::from_secs(30), POLL, || {
        match (nft_table_exists(&c), kube_services_in_iptables(&c)) {
            (false, true) => Ok(()),
            other => Err(other),
        }
    });
    assert!(
        switched.is_ok(),
        "(nft table, iptables chains) = {switched:?}\n{}",
        c.logs()
    );
    works("after switching back to iptables mode");
    assert_eq!(
        echo(&mut stream, &mut reader, "three"),
        "three",
        "established connection lost"
    );
    c.assert_alive();
}

fn service_cidr(name: &str, cidrs: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": cidrs}
    })
}

fn web_objects() -> [serde_json::Value; 2] {
    [
        service("e2e", "web", "10.96.0.10", &[("http", 80, "TCP", 8080)]),
        endpoint_slice(
            "e2e",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &["10.244.0.10"],
            Some("node1"),
        ),
    ]
}

/// The `cluster-ips-check` drop rule of the table's listing, if any.
fn drop_rule(c: &Cluster) -> Option<String> {
    c.topo
        .node
        .run_ok(
            "nft",
            ["list", "chain", "ip", "kube-proxy", "cluster-ips-check"],
        )
        .lines()
        .find(|l| l.contains("Drop traffic to unallocated ClusterIPs"))
        .map(|l| l.trim().to_string())
}

fn web_works(c: &Cluster, what: &str) {
    let r = eventually(Duration::from_secs(30), POLL, || {
        tcp_request(&c.topo.node, sa("10.96.0.10:80"), T)
    });
    assert_eq!(
        r.as_deref().ok(),
        Some("pod0"),
        "{what}: {r:?}\n{}",
        c.logs()
    );
}

/// A ServiceCIDR appearing puts its CIDR (this family's only) in the `cluster-ips-check`
/// drop rule at once; its deletion removes the rule; ClusterIP traffic keeps working.
#[test]
fn service_cidr_objects_drive_the_unallocated_cluster_ip_drop_rule() {
    let c = Cluster::start("nftables", &web_objects());
    web_works(&c, "before any ServiceCIDR");
    assert_eq!(drop_rule(&c), None);
    c.api.apply(service_cidr(
        "kubernetes",
        &["10.96.0.0/16", "fd00:10:96::/112"],
    ));
    let rule = eventually(Duration::from_secs(20), POLL, || drop_rule(&c).ok_or(()));
    let rule = rule.unwrap_or_else(|()| panic!("no drop rule\n{}", c.logs()));
    assert!(rule.starts_with("ip daddr 10.96.0.0/16 drop"), "{rule}");
    web_works(&c, "with the drop rule");
    c.api.delete("ServiceCIDR", "", "kubernetes");
    let gone = eventually(Duration::from_secs(20), POLL, || match drop_rule(&c) {
        None => Ok(()),
        Some(r) => Err(r),
    });
    assert!(gone.is_ok(), "{gone:?}\n{}", c.logs());
    c.assert_alive();
}

/// A server without the ServiceCIDR resource (404): the proxy syncs without the drop rule,
/// says so once however often it retries, and picks the resource up once it is served.
#[test]
fn a_server_without_service_cidrs_is_no_obstacle() {
    let c = Cluster::start_with("nftables", &web_objects(), |api| {
        api.set_hidden("servicecidrs", true);
    });
    web_works(&c, "without ServiceCIDRs");
    let retried = eventually(Duration::from_secs(10), POLL, || {
        let n = c
            .api
            .requests()
            .iter()
            .filter(|r| r.contains("/servicecidrs"))
            .count();
        if n >= 3 { Ok(n) } else { Err(n) }
    });
    assert!(retried.is_ok(), "{retried:?}");
    let said = c.logs().matches("does not serve this kind").count();
    assert_eq!(said, 1, "{}", c.logs());
    assert_eq!(drop_rule(&c), None);
    c.api.apply(service_cidr("kubernetes", &["10.96.0.0/16"]));
    c.api.set_hidden("servicecidrs", false);
    let rule = eventually(Duration::from_secs(40), POLL, || drop_rule(&c).ok_or(()));
    assert!(rule.is_ok(), "no drop rule once served\n{}", c.logs());
    c.assert_alive();
}

/// Deleting the table, deleting a base chain, flushing the dispatch chain or one service's
/// chain: each is repaired within a sync period (2 s here; upstream would wait for its
/// hourly full sync), and the ClusterIP answers again.
#[test]
fn drift_is_repaired_within_a_sync_period() {
    let c = Cluster::start("nftables", &web_objects());
    c.restart("nftables", &["--iptables-sync-period=2s"]);
    web_works(&c, "before any drift");
    let node = &c.topo.node;
    let service_chain = node
        .run_ok("nft", ["list", "chains", "ip"])
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("chain ")
                .and_then(|n| n.strip_suffix(" {"))
                .filter(|n| n.starts_with("service-") && n.ends_with("e2e/web/tcp/http"))
                .map(str::to_string)
        })
        .expect("the web service chain");
    let rules = |chain: &str| -> Option<usize> {
        let out = node.run("nft", ["list", "chain", "ip", "kube-proxy", chain]);
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("jump") || l.contains("goto") || l.contains("vmap"))
                .count()
        })
    };
    let cases: [(&str, &[&str], &str); 4] = [
        (
            "delete the table",
            &["delete", "table", "ip", "kube-proxy"],
            "services",
        ),
        (
            "delete a base chain",
            &["delete", "chain", "ip", "kube-proxy", "nat-output"],
            "nat-output",
        ),
        (
            "flush the dispatch chain",
            &["flush", "chain", "ip", "kube-proxy", "services"],
            "services",
        ),
        (
            "flush a service chain",
            &["flush", "chain", "ip", "kube-proxy", &service_chain],
            &service_chain,
        ),
    ];
    for (what, cmd, chain) in cases {
        let before = rules(chain);
        assert!(
            before.is_some_and(|n| n > 0),
            "{what}: {chain} has rules first"
        );
        node.run_ok("nft", cmd);
        assert!(
            rules(chain).is_none_or(|n| n == 0),
            "{what}: the drift took effect"
        );
        let start = std::time::Instant::now();
        let repaired = eventually(Duration::from_secs(8), POLL, || match rules(chain) {
            n if n == before => Ok(()),
            n => Err(n),
        });
        assert!(
            repaired.is_ok(),
            "{what}: not repaired: {repaired:?}\n{}",
            c.logs()
        );
        eprintln!("{what}: repaired in {:?}", start.elapsed());
        web_works(&c, what);
    }
    // One repair per drift, none for a table as synced (a false alarm every sync period
    // would rewrite everything).
    assert_eq!(
        c.logs().matches("nftables table drifted").count(),
        4,
        "{}",
        c.logs()
    );
    c.assert_alive();
}
