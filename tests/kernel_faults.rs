//! Kernel-write faults, drift and process faults, iptables and nftables modes (issue 11). The
//! built daemon runs in a "node" namespace against the fake API server. iptables mode:
//! - the xtables lock held by someone else longer than `-w 5` (legacy back end, private lock
//!   file through `XTABLES_LOCKFILE`) and an injected `iptables-restore` failure (a wrapper
//!   earlier on `PATH`): the previous rules stay, the restore-failure metric counts, `/healthz`
//!   turns 503 after two sync periods of failing as upstream's, the next successful sync is
//!   full;
//! - a flushed KUBE-SVC chain and a deleted canary are repaired within one sync period;
//! - foreign chains and rules in the same tables are the same byte for byte at the end;
//! - SIGTERM exits 0 and leaves the rules; `kill -9` with a sync pending, then a restart:
//!   an established connection through a ClusterIP survives, new connections work.
//!
//! nftables mode: an injected `nft -f` failure keeps the `kube-proxy` table byte for byte and
//! counts in `..._nftables_sync_failures_total`, the next successful sync is full; foreign
//! nftables tables and iptables rules are the same byte for byte at the end; SIGTERM leaves the
//! table; the same `kill -9` and restart as in iptables mode.
//!
//! IPVS mode (one run in the qemu guest of tests/vm/vmrun: the host kernel has no IPVS): a
//! deleted virtual server, kube-ipvs0 address and ipset member are repaired by the next
//! periodic sync; foreign iptables rules, ipsets and an excluded virtual server are the same
//! byte for byte at the end (a foreign virtual server outside `--ipvs-exclude-cidrs` is
//! deleted, as upstream); SIGTERM leaves the state; the same `kill -9` and restart.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::daemon::{self, Daemon};
use support::fakeapi::{FakeApiServer, endpoint_slice, node, service};
use support::netns::Topology;
use support::pods::{EchoServer, eventually, tcp_request};

const NODE: &str = "node1";
const T: Duration = Duration::from_millis(800);
const POLL: Duration = Duration::from_millis(200);
/// `--iptables-sync-period` of these tests: drift must be repaired within it.
const SYNC_PERIOD: Duration = Duration::from_secs(4);
const SETTLE: Duration = Duration::from_secs(8);
/// Someone else's IPVS virtual server address, excluded with `--ipvs-exclude-cidrs`.
const FOREIGN_VS: &str = "198.51.100.40";

/// How long a started daemon may take to program its first rules: `SETTLE`, or a minute in
/// the VM (software emulation; the debug binary is read over 9p).
fn startup() -> Duration {
    if support::vm::in_vm() {
        Duration::from_secs(60)
    } else {
        SETTLE
    }
}

/// What a sync may take on top of its period: far more in the VM, where one IPv4 plus IPv6
/// round of IPVS mode takes 6 to 25 s (every iptables and ipset command is emulated).
fn slack() -> Duration {
    Duration::from_secs(if support::vm::in_vm() { 30 } else { 3 })
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

struct Node {
    topo: Topology,
    api: FakeApiServer,
    dir: tempfile::TempDir,
    _pods: Vec<EchoServer>,
}

impl Node {
    fn new() -> Node {
        support::require_root();
        let topo = Topology::new(2);
        let pods = topo
            .pods
            .iter()
            .map(|p| EchoServer::start(&p.ns, &p.name, sa("0.0.0.0", 8080)))
            .collect();
        let api = FakeApiServer::start_in(Some(&topo.node), IpAddr::V4(Ipv4Addr::LOCALHOST));
        api.apply(node(NODE, &["192.168.50.1"], Some("10.244.0.0/24")));
        Node {
            topo,
            api,
            dir: tempfile::tempdir().unwrap(),
            _pods: pods,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(daemon::log_in(self.dir.path())).unwrap_or_default()
    }

    /// Starts the daemon in iptables mode; see `start_in`.
    fn start(&self, env: &[(&str, String)]) -> Daemon {
        self.start_in("iptables", env)
    }

    /// Starts the daemon in `mode`; its output is appended to one log across restarts.
    fn start_in(&self, mode: &str, env: &[(&str, String)]) -> Daemon {
        // The periods are the iptables flags in iptables and nftables modes (as upstream).
        let flags = if mode == "ipvs" { "ipvs" } else { "iptables" };
        let mut daemon = Daemon::builder(&self.topo.node, &self.api, self.dir.path())
            .mode(mode)
            .args([
                "--cluster-cidr=10.244.0.0/16".to_string(),
                "-v=2".into(),
                format!("--{flags}-min-sync-period=1s"),
                format!("--{flags}-sync-period={}s", SYNC_PERIOD.as_secs()),
            ]);
        if mode == "ipvs" {
            // Upstream owns every virtual server of its family except those here.
            daemon = daemon.arg(format!("--ipvs-exclude-cidrs={FOREIGN_VS}/32"));
        }
        for (k, v) in env {
            daemon = daemon.env(k, v);
        }
        daemon.start()
    }

    fn add(&self, name: &str, ip: &str, port: u16, target: u16, pod: usize) {
        let pod_ip = self.topo.pods[pod].ip.to_string();
        self.api
            .apply(service("kf", name, ip, &[("p", port, "TCP", target)]));
        self.api.apply(endpoint_slice(
            "kf",
            &format!("{name}-1"),
            name,
            &[("p", target, "TCP")],
            &[&pod_ip],
            Some(NODE),
        ));
    }

    fn answers(&self, ip: &str, within: Duration) -> bool {
        eventually(within, POLL, || {
            tcp_request(&self.topo.outside, sa(ip, 80), T)
        })
        .is_ok()
    }

    fn save(&self, tool: &str) -> String {
        self.topo.node.run_ok(tool, Vec::<&str>::new())
    }

    fn metric(&self, name: &str) -> u64 {
        let text = scrape(&self.topo.node, "/metrics");
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

fn scrape(ns: &support::netns::Netns, path: &str) -> String {
    let path = path.to_string();
    ns.in_netns(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&sa("127.0.0.1", 10249), T) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    })
}

fn healthz(ns: &support::netns::Netns) -> u16 {
    ns.in_netns(|| {
        let Ok(mut s) = TcpStream::connect_timeout(&sa("127.0.0.1", 10256), T) else {
            return 0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let _ = write!(s, "GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    })
}

/// Rules without counters and save-time comments, split into kube-proxy's lines and the
/// rest (table headers, built-in chains and COMMIT lines go to both).
fn split(save: &str) -> (String, String) {
    let (mut kube, mut foreign) = (String::new(), String::new());
    for line in save.lines().filter(|l| !l.starts_with('#')) {
        let line = match line.split_once(" [") {
            Some((chain, _)) if line.starts_with(':') => chain,
            _ => line,
        };
        let ours = line.contains("KUBE-");
        let shared = line.starts_with('*') || line == "COMMIT" || is_builtin_decl(line);
        if ours || shared {
            kube.push_str(line);
            kube.push('\n');
        }
        if !ours || shared {
            foreign.push_str(line);
            foreign.push('\n');
        }
    }
    (kube, foreign)
}

fn is_builtin_decl(line: &str) -> bool {
    [
        ":PREROUTING",
        ":INPUT",
        ":FORWARD",
        ":OUTPUT",
        ":POSTROUTING",
    ]
    .iter()
    .any(|b| line.starts_with(b))
}

/// Someone else's chains and rules in every table kube-proxy writes.
fn install_foreign_rules(run: impl Fn(&[&str])) {
    for args in [
        &["-t", "nat", "-N", "FOREIGN-NAT"][..],
        &[
            "-t",
            "nat",
            "-A",
            "FOREIGN-NAT",
            "-p",
            "tcp",
            "--dport",
            "7777",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-s",
            "198.51.100.7/32",
            "-j",
            "FOREIGN-NAT",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            "198.51.100.8/32",
            "-j",
            "ACCEPT",
        ],
        &["-t", "filter", "-N", "FOREIGN-FILTER"],
        &[
            "-t",
            "filter",
            "-A",
            "FOREIGN-FILTER",
            "-m",
            "comment",
            "--comment",
            "keep me",
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-s",
            "198.51.100.9/32",
            "-j",
            "FOREIGN-FILTER",
        ],
        &[
            "-t",
            "filter",
            "-A",
            "FORWARD",
            "-d",
            "198.51.100.10/32",
            "-j",
            "DROP",
        ],
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-s",
            "198.51.100.11/32",
            "-j",
            "MARK",
            "--set-mark",
            "0x7",
        ],
    ] {
        run(args);
    }
}

fn wait_for(what: &str, within: Duration, f: impl Fn() -> bool, log: impl Fn() -> String) {
    let end = Instant::now() + within;
    while !f() {
        assert!(
            Instant::now() < end,
            "{what}: not within {within:?}\n{}",
            log()
        );
        std::thread::sleep(POLL);
    }
}

/// Puts a wrapper for `tool` in `dir/bin` that fails (reading and dropping its input) while
/// `dir/FAIL` exists and the shell condition `when` holds, and runs the real tool otherwise.
/// Returns the FAIL path and a `PATH` with the wrapper first.
fn failing_wrapper(dir: &std::path::Path, tool: &str, when: &str) -> (PathBuf, String) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fail = dir.join("FAIL");
    let real = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap()
        .stdout;
    let real = String::from_utf8(real).unwrap();
    assert!(!real.trim().is_empty(), "{tool} not installed");
    let wrapper = bin.join(tool);
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -e {} ] && {when}; then cat >/dev/null; echo 'Error: injected failure' >&2; exit 1; fi\nexec {} \"$@\"\n",
            fail.display(),
            real.trim()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", wrapper.to_str().unwrap()])
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (fail, path)
}

#[test]
fn write_faults_and_drift_keep_previous_rules_and_repair() {
    let n = Node::new();
    let node = &n.topo.node;
    let legacy = |args: &[&str]| {
        node.run_ok("iptables-legacy", args);
    };
    install_foreign_rules(legacy);
    let (_, foreign_before) = split(&n.save("iptables-legacy-save"));

    // A wrapper in front of the real iptables-legacy-restore: fails while FAIL exists.
    let (fail, path) = failing_wrapper(n.dir.path(), "iptables-legacy-restore", "true");
    let lockfile = n.dir.path().join("xtables.lock");
    let mut proxy = n.start(&[
        ("KUBE_PROXY_RS_IPTABLES_MODE", "legacy".into()),
        ("XTABLES_LOCKFILE", lockfile.display().to_string()),
        ("PATH", path),
    ]);
    n.add("a", "10.96.9.1", 80, 8080, 0);
    assert!(
        n.answers("10.96.9.1", SETTLE),
        "a never answered\n{}",
        n.logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let (rules_a, _) = split(&n.save("iptables-legacy-save"));

    // 1. Injected restore failure: a change cannot be written; a's rules stay as they were.
    std::fs::write(&fail, "").unwrap();
    let failures = n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total");
    n.add("b", "10.96.9.2", 80, 8080, 1);
    wait_for(
        "a counted restore failure",
        SETTLE,
        || n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") > failures,
        || n.logs(),
    );
    let (rules_now, _) = split(&n.save("iptables-legacy-save"));
    assert_eq!(rules_now, rules_a, "a failed restore changed the rules");
    // Upstream's /healthz: unhealthy once a queued change waits longer than 2 sync periods.
    wait_for(
        "/healthz 503 while syncs keep failing",
        SYNC_PERIOD * 2 + Duration::from_secs(6),
        || healthz(&n.topo.node) == 503,
        || n.logs(),
    );
    assert!(n.answers("10.96.9.1", T * 3), "a stopped answering");
    let log_len = n.logs().len();
    std::fs::remove_file(&fail).unwrap();
    assert!(
        n.answers("10.96.9.2", SETTLE),
        "b after the failure\n{}",
        n.logs()
    );
    let after: Vec<String> = n.logs()[log_len..]
        .lines()
        .filter(|l| l.contains("sync done"))
        .map(str::to_string)
        .collect();
    assert!(
        after.first().is_some_and(|l| l.contains("full=true")),
        "the first sync after a failure must be full: {after:?}"
    );

    // 2. The xtables lock held for longer than the daemon's -w 5.
    let lock = std::fs::File::create(&lockfile).unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock");
    let failures = n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total");
    let (rules_ab, _) = split(&n.save("iptables-legacy-save"));
    n.add("c", "10.96.9.3", 80, 8080, 0);
    wait_for(
        "a failure while the lock is held",
        Duration::from_secs(20),
        || n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") > failures,
        || n.logs(),
    );
    assert!(n.answers("10.96.9.1", T * 3), "a stopped answering");
    drop(held);
    assert!(
        n.answers("10.96.9.3", Duration::from_secs(20)),
        "c after the lock\n{}",
        n.logs()
    );
    let (rules_abc, _) = split(&n.save("iptables-legacy-save"));
    assert_ne!(rules_abc, rules_ab);

    // 3. Drift: a KUBE-SVC chain flushed, the canary deleted: back within one sync period.
    std::thread::sleep(Duration::from_secs(2));
    let (steady, _) = split(&n.save("iptables-legacy-save"));
    let svc_chain = steady
        .lines()
        .find_map(|l| {
            l.strip_prefix("-A ")
                .filter(|r| r.starts_with("KUBE-SVC-") && r.contains("kf/a:p"))
                .and_then(|r| r.split(' ').next())
        })
        .expect("a's KUBE-SVC chain")
        .to_string();
    legacy(&["-t", "nat", "-F", &svc_chain]);
    legacy(&["-t", "mangle", "-F", "KUBE-PROXY-CANARY"]);
    legacy(&["-t", "mangle", "-X", "KUBE-PROXY-CANARY"]);
    let (drifted, _) = split(&n.save("iptables-legacy-save"));
    assert_ne!(drifted, steady);
    wait_for(
        "drift repaired",
        SYNC_PERIOD + Duration::from_secs(4),
        || split(&n.save("iptables-legacy-save")).0 == steady,
        || n.logs(),
    );
    assert!(n.answers("10.96.9.1", T * 3));

    // 4. SIGTERM: exit 0, rules left in place; foreign rules the same byte for byte.
    let status = proxy.terminate(Duration::from_secs(5));
    assert!(status.success(), "SIGTERM exit: {status}\n{}", n.logs());
    let (kube_after, foreign_after) = split(&n.save("iptables-legacy-save"));
    assert_eq!(kube_after, steady, "SIGTERM removed or changed rules");
    assert_eq!(foreign_after, foreign_before, "foreign rules changed");
    assert!(n.answers("10.96.9.1", T * 3), "a after SIGTERM");
}

/// A TCP peer in a pod that echoes every line until the client closes.
fn line_echo_server(ns: &support::netns::Netns, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn_thread(move || {
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        tx.send(()).unwrap();
        l.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end {
            match l.accept() {
                Ok((s, _)) => {
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                        let mut w = s.try_clone().unwrap();
                        for line in BufReader::new(s).lines().map_while(Result::ok) {
                            if writeln!(w, "echo {line}").is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    rx.recv().unwrap();
}

fn exchange(r: &mut BufReader<TcpStream>, w: &mut TcpStream, msg: &str) -> String {
    writeln!(w, "{msg}").unwrap();
    let mut line = String::new();
    let _ = r.read_line(&mut line);
    line.trim().to_string()
}

#[test]
fn kill_9_mid_sync_keeps_established_connections_and_restart_recovers() {
    kill_9_mid_sync("iptables");
}

#[test]
fn nftables_kill_9_mid_sync_keeps_established_connections_and_restart_recovers() {
    kill_9_mid_sync("nftables");
}

fn kill_9_mid_sync(mode: &str) {
    let n = Node::new();
    line_echo_server(&n.topo.pods[0].ns, 9090);
    let mut proxy = n.start_in(mode, &[]);
    n.add("long", "10.96.10.1", 90, 9090, 0);
    n.add("a", "10.96.10.2", 80, 8080, 1);
    assert!(
        n.answers("10.96.10.2", startup()),
        "a never answered\n{}",
        n.logs()
    );

    let dst = sa("10.96.10.1", 90);
    let stream = n
        .topo
        .outside
        .in_netns(move || TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .expect("connect to the long-lived service");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    assert_eq!(exchange(&mut r, &mut w, "one"), "echo one");

    // Fifty new services, then SIGKILL while their sync is pending or running.
    let log_len = n.logs().len();
    for i in 0..50 {
        n.add(
            &format!("s{i}"),
            &format!("10.96.11.{}", i + 1),
            80,
            8080,
            1,
        );
    }
    let end = Instant::now() + Duration::from_secs(5);
    while !n.logs()[log_len..].contains("sync") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    proxy.kill();
    assert_eq!(
        exchange(&mut r, &mut w, "two"),
        "echo two",
        "established connection"
    );
    assert!(
        n.answers("10.96.10.2", T * 3),
        "new connections with the daemon dead"
    );

    // Restart: the established connection still works; everything converges.
    let started = Instant::now();
    let _proxy = n.start_in(mode, &[]);
    assert!(
        n.answers("10.96.11.50", startup()),
        "s49 after restart\n{}",
        n.logs()
    );
    eprintln!("{mode}: converged {:?} after restart", started.elapsed());
    assert!(n.answers("10.96.10.2", T * 3));
    assert_eq!(exchange(&mut r, &mut w, "three"), "echo three");
}

/// `nft list table FAMILY NAME` in the node namespace.
fn nft_table(n: &Node, family: &str, name: &str) -> String {
    n.topo.node.run_ok("nft", ["list", "table", family, name])
}

/// Someone else's nftables tables: an `ip filter` table with a base chain jumping to a
/// regular chain, and an `inet` table with a set and a forward hook that uses it.
fn install_foreign_nft(n: &Node) {
    for cmd in [
        "add table ip filter",
        "add chain ip filter FOREIGN",
        "add rule ip filter FOREIGN ip saddr 198.51.100.9 counter drop",
        "add chain ip filter input { type filter hook input priority 0; policy accept; }",
        "add rule ip filter input ip saddr 198.51.100.9 jump FOREIGN",
        "add table inet foreign",
        "add set inet foreign blocked { type ipv4_addr; elements = { 198.51.100.20 } }",
        "add chain inet foreign forwarded { type filter hook forward priority 10; policy accept; }",
        "add rule inet foreign forwarded ip daddr @blocked drop",
        "add chain inet foreign idle",
    ] {
        n.topo.node.run_ok("nft", [cmd]);
    }
}

/// nftables mode: an `nft` transaction failing (a wrapper earlier on `PATH` rejecting every
/// `nft -f`) leaves the `kube-proxy` table as it was, byte for byte, and counts in
/// `..._nftables_sync_failures_total`; once `nft` works again the first sync is full and the
/// change is applied; foreign tables (nftables and iptables) are the same byte for byte at the
/// end; SIGTERM exits 0 and leaves the table.
#[test]
fn nftables_write_faults_keep_previous_rules_and_foreign_tables() {
    const FAILURES: &str = "kubeproxy_sync_proxy_rules_nftables_sync_failures_total";
    let n = Node::new();
    install_foreign_nft(&n);
    install_foreign_rules(|args: &[&str]| {
        n.topo.node.run_ok("iptables-legacy", args);
    });
    let foreign = || {
        (
            nft_table(&n, "ip", "filter"),
            nft_table(&n, "inet", "foreign"),
            split(&n.save("iptables-legacy-save")).1,
        )
    };
    let foreign_before = foreign();
    let (fail, path) = failing_wrapper(
        n.dir.path(),
        "nft",
        "case \" $* \" in *\" -f \"*) true;; *) false;; esac",
    );
    let mut proxy = n.start_in("nftables", &[("PATH", path)]);
    n.add("a", "10.96.9.1", 80, 8080, 0);
    assert!(
        n.answers("10.96.9.1", SETTLE),
        "a never answered\n{}",
        n.logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let table_a = nft_table(&n, "ip", "kube-proxy");
    assert!(table_a.contains("10.96.9.1"), "{table_a}");

    // nft rejects every transaction: b cannot be written, the table stays as it was.
    std::fs::write(&fail, "").unwrap();
    let failures = n.metric(FAILURES);
    n.add("b", "10.96.9.2", 80, 8080, 1);
    wait_for(
        "a counted nft failure",
        SETTLE,
        || n.metric(FAILURES) > failures,
        || n.logs(),
    );
    // One more retry (sync_period later) while it still fails: counted too, nothing written.
    let counted = n.metric(FAILURES);
    wait_for(
        "the retry's failure counted",
        SYNC_PERIOD + Duration::from_secs(4),
        || n.metric(FAILURES) > counted,
        || n.logs(),
    );
    assert_eq!(
        nft_table(&n, "ip", "kube-proxy"),
        table_a,
        "a failed transaction changed the table"
    );
    assert!(n.answers("10.96.9.1", T * 3), "a stopped answering");
    assert!(
        tcp_request(&n.topo.outside, sa("10.96.9.2", 80), T).is_err(),
        "b answers though its rules could not be written"
    );

    // nft works again: the retry (within one sync period) is full and writes b.
    let log_len = n.logs().len();
    std::fs::remove_file(&fail).unwrap();
    assert!(
        n.answers("10.96.9.2", SYNC_PERIOD + Duration::from_secs(4)),
        "b after the failure\n{}",
        n.logs()
    );
    let after: Vec<String> = n.logs()[log_len..]
        .lines()
        .filter(|l| l.contains("sync done"))
        .map(str::to_string)
        .collect();
    assert!(
        after.first().is_some_and(|l| l.contains("full=true")),
        "the first sync after a failure must be full: {after:?}"
    );

    // SIGTERM: exit 0, the table left in place; foreign tables the same byte for byte.
    std::thread::sleep(Duration::from_secs(2));
    let steady = nft_table(&n, "ip", "kube-proxy");
    let status = proxy.terminate(Duration::from_secs(5));
    assert!(status.success(), "SIGTERM exit: {status}\n{}", n.logs());
    assert_eq!(
        nft_table(&n, "ip", "kube-proxy"),
        steady,
        "SIGTERM removed or changed the table"
    );
    assert_eq!(foreign(), foreign_before, "foreign tables changed");
    assert!(n.answers("10.96.9.1", T * 3), "a after SIGTERM");
    assert!(n.answers("10.96.9.2", T * 3), "b after SIGTERM");
}

/// `ipvsadm -Sn`, one normalised line per virtual or real server.
fn ipvsadm_sn(n: &Node) -> BTreeSet<String> {
    n.topo
        .node
        .run_ok("ipvsadm", ["-Sn"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// Addresses on kube-ipvs0.
fn dummy_addrs(n: &Node) -> String {
    n.topo
        .node
        .run_ok("ip", ["-o", "-4", "addr", "show", "dev", "kube-ipvs0"])
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ipset save` of the sets kube-proxy writes (`KUBE-*`) or of everything else.
fn ipset_save(n: &Node, ours: bool) -> String {
    n.topo
        .node
        .run_ok("ipset", ["save"])
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|set| set.starts_with("KUBE-"))
                == ours
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The IPVS faults, in one guest run (the host kernel has no IPVS): drift repaired within a
/// sync period, foreign state untouched, SIGTERM keeping the state, then `kill -9` mid-sync
/// and a restart as in the other modes.
#[test]
fn ipvs_drift_foreign_state_and_kill_9() {
    const NAME: &str = "ipvs_drift_foreign_state_and_kill_9";
    if !support::vm::in_vm() {
        return support::vm::rerun_in_vm(NAME, 900);
    }
    ipvs_drift_and_foreign_state();
    kill_9_mid_sync("ipvs");
}

/// IPVS mode: a deleted virtual server, a deleted kube-ipvs0 address and a deleted ipset
/// member are back within one sync period; someone else's iptables rules, ipset and virtual
/// server (in `--ipvs-exclude-cidrs`) are the same byte for byte at the end; SIGTERM exits 0
/// leaving the state.
fn ipvs_drift_and_foreign_state() {
    let n = Node::new();
    let node = &n.topo.node;
    let legacy = |args: &[&str]| {
        node.run_ok("iptables-legacy", args);
    };
    install_foreign_rules(legacy);
    node.run_ok("ipset", ["create", "FOREIGN-SET", "hash:ip"]);
    node.run_ok("ipset", ["add", "FOREIGN-SET", "198.51.100.30"]);
    // Two foreign virtual servers: one in --ipvs-exclude-cidrs, kept; one outside, which
    // upstream deletes (it owns every other virtual server of its family).
    for (vs, rs) in [
        (FOREIGN_VS, "198.51.100.41"),
        ("198.51.100.50", "198.51.100.51"),
    ] {
        let vs = format!("{vs}:80");
        node.run_ok("ipvsadm", ["-A", "-t", &vs, "-s", "rr"]);
        node.run_ok(
            "ipvsadm",
            ["-a", "-t", &vs, "-r", &format!("{rs}:80"), "-m"],
        );
    }
    let foreign = || {
        let vs: BTreeSet<String> = ipvsadm_sn(&n)
            .into_iter()
            .filter(|l| l.contains("198.51.100."))
            .collect();
        (
            split(&n.save("iptables-legacy-save")).1,
            ipset_save(&n, false),
            vs,
        )
    };
    let mut foreign_before = foreign();
    assert_eq!(foreign_before.2.len(), 4, "{:?}", foreign_before.2);
    foreign_before.2.retain(|l| l.contains(FOREIGN_VS));

    let (fail, path) = failing_wrapper(n.dir.path(), "iptables-legacy-restore", "true");
    let mut proxy = n.start_in(
        "ipvs",
        &[
            ("KUBE_PROXY_RS_IPTABLES_MODE", "legacy".into()),
            ("PATH", path),
        ],
    );
    n.add("a", "10.96.9.1", 80, 8080, 0);
    n.add("b", "10.96.9.2", 80, 8080, 1);
    assert!(
        n.answers("10.96.9.1", startup()) && n.answers("10.96.9.2", SETTLE),
        "a or b never answered\n{}",
        n.logs()
    );
    std::thread::sleep(Duration::from_secs(2));
    let kernel = || {
        (
            ipvsadm_sn(&n)
                .into_iter()
                .filter(|l| l.contains("10.96."))
                .collect::<BTreeSet<String>>(),
            dummy_addrs(&n),
            ipset_save(&n, true),
            split(&n.save("iptables-legacy-save")).0,
        )
    };
    let steady = kernel();
    assert!(steady.1.contains("10.96.9.1/32"), "{steady:?}");
    assert!(
        steady.2.contains("KUBE-CLUSTER-IP 10.96.9.2,tcp:80"),
        "{steady:?}"
    );

    // Drift: a's virtual server, b's kube-ipvs0 address and b's KUBE-CLUSTER-IP member gone.
    node.run_ok("ipvsadm", ["-D", "-t", "10.96.9.1:80"]);
    node.run_ok("ip", ["addr", "del", "10.96.9.2/32", "dev", "kube-ipvs0"]);
    node.run_ok("ipset", ["del", "KUBE-CLUSTER-IP", "10.96.9.2,tcp:80"]);
    let drifted = Instant::now();
    assert_ne!(kernel(), steady);
    wait_for(
        "IPVS drift repaired",
        SYNC_PERIOD + slack(),
        || kernel() == steady,
        || format!("{:?}\n{}", kernel(), n.logs()),
    );
    eprintln!("ipvs: drift repaired after {:?}", drifted.elapsed());
    assert!(n.answers("10.96.9.1", T * 3), "a after the repair");
    assert!(n.answers("10.96.9.2", T * 3), "b after the repair");

    // Injected iptables-restore failure: c's rules cannot be written; the failure counts
    // (as upstream's IPVS proxier), the iptables rules stay as they were, a and b keep
    // answering, and the IPv4 proxier's first sync once the fault is gone is full (the IPv6
    // one writes through ip6tables-restore, not wrapped, and goes on as before).
    std::fs::write(&fail, "").unwrap();
    let failures = n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total");
    let rules_before = split(&n.save("iptables-legacy-save")).0;
    n.add("c", "10.96.9.3", 80, 8080, 0);
    wait_for(
        "an IPVS-mode restore failure counted",
        SYNC_PERIOD + slack(),
        || n.metric("kubeproxy_sync_proxy_rules_iptables_restore_failures_total") > failures,
        || n.logs(),
    );
    assert_eq!(
        split(&n.save("iptables-legacy-save")).0,
        rules_before,
        "a failed restore changed the rules"
    );
    assert!(n.answers("10.96.9.1", T * 3), "a during the failure");
    assert!(n.answers("10.96.9.2", T * 3), "b during the failure");
    let log_len = n.logs().len();
    std::fs::remove_file(&fail).unwrap();
    assert!(
        n.answers("10.96.9.3", SYNC_PERIOD + slack()),
        "c after the failure\n{}",
        n.logs()
    );
    // c can answer through its virtual server before the sync that wrote it logs its end.
    let ipv4_syncs = || -> Vec<String> {
        n.logs()[log_len..]
            .lines()
            .filter(|l| l.contains("sync done") && l.contains("family=IPv4"))
            .map(str::to_string)
            .collect()
    };
    wait_for(
        "an IPv4 sync after the failure",
        SYNC_PERIOD + slack(),
        || !ipv4_syncs().is_empty(),
        || n.logs(),
    );
    let after = ipv4_syncs();
    assert!(
        after.first().is_some_and(|l| l.contains("full=true")),
        "the first sync after a failure must be full: {after:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let steady = kernel();

    // SIGTERM: exit 0, the state left in place; foreign state the same byte for byte.
    let status = proxy.terminate(Duration::from_secs(5));
    assert!(status.success(), "SIGTERM exit: {status}\n{}", n.logs());
    assert_eq!(
        kernel(),
        steady,
        "SIGTERM removed or changed the IPVS state"
    );
    assert_eq!(foreign(), foreign_before, "foreign state changed");
    assert!(n.answers("10.96.9.1", T * 3), "a after SIGTERM");
}
