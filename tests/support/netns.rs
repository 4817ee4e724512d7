//! Network namespaces for end-to-end tests: creation/teardown, veth links,
//! routes, sysctls, commands and threads inside a namespace, and a `Topology`
//! (node router + pods + an outside host).

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace `kprs-<pid>-<n>-<role>`, deleted on Drop (also
/// when the test panics). Interface names inside it are local to it, so they
/// need not be unique across tests.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with `lo` up. `role` is a short tag (e.g. "node").
    pub fn new(role: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("kprs-{}-{}-{}", std::process::id(), n, role);
        // A namespace with our pid and counter can only be a leftover of a
        // dead process that had the same pid: remove it.
        if PathBuf::from("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run `ip netns add` (is iproute2 installed?)");
        assert!(
            out.status.success(),
            "ip netns add {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (as used by `ip netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A `Command` running `cmd args` inside the namespace (`ip netns exec`, no shell).
    pub fn command<I, S>(&self, cmd: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]).args(args);
        c
    }

    /// Runs `cmd args` inside the namespace and returns its output (never panics
    /// on a non-zero exit; panics only if `ip` cannot be started).
    pub fn run<I, S>(&self, cmd: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(cmd, args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {cmd} in {}: {e}", self.name))
    }

    /// Like `run`, but panics with stderr unless the command succeeds; returns stdout.
    pub fn run_ok<I, S>(&self, cmd: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run(cmd, &args);
        assert!(
            out.status.success(),
            "in netns {}: {cmd} {:?} failed ({}): {}{}",
            self.name,
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -n NAME ARGS...`, panicking on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {:?} failed: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Spawns `cmd args` inside the namespace (stdin null, stdout/stderr
    /// inherited). The process is killed when the returned `NsChild` drops.
    pub fn spawn<I, S>(&self, cmd: &str, args: I) -> NsChild
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let child = self
            .command(cmd, args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd} in {}: {e}", self.name));
        NsChild(child)
    }

    /// `ip route add DEST SPEC...` in the namespace, e.g.
    /// `add_route("10.96.0.0/16", &["via", "192.168.50.1"])`.
    pub fn add_route(&self, dest: &str, spec: &[&str]) {
        let mut args = vec!["route", "add", dest];
        args.extend_from_slice(spec);
        self.ip(&args);
    }

    /// Replaces the default route with `default via VIA`.
    pub fn set_default_route(&self, via: &str) {
        self.ip(&["route", "replace", "default", "via", via]);
    }

    /// Writes a sysctl inside the namespace: `sysctl("net.ipv4.ip_forward", "1")`.
    /// (Per-netns sysctls under /proc/sys/net follow the writer's namespace.)
    pub fn sysctl(&self, name: &str, value: &str) {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        self.in_netns(|| std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("sysctl {name}={value} in {}: {e}", self.name));
    }

    /// Reads a sysctl inside the namespace (trimmed).
    pub fn read_sysctl(&self, name: &str) -> String {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        self.in_netns(|| std::fs::read_to_string(&path))
            .unwrap_or_else(|e| panic!("read sysctl {name} in {}: {e}", self.name))
            .trim()
            .to_string()
    }

    /// Runs `f` on a fresh thread that first joined this network namespace, and
    /// returns its result (a panic in `f` is propagated). Sockets created in `f`
    /// stay in this namespace for their whole life and can be used from any
    /// thread afterwards (e.g. converted to tokio sockets).
    pub fn in_netns<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&path);
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Starts a long-lived thread inside this namespace.
    pub fn spawn_thread<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    /// PIDs of processes living in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .expect("run ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

fn enter(path: &std::path::Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Anything still running inside is ours (the name is unique): kill it.
        for pid in self.pids().into_iter().filter(|p| *p != std::process::id()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A child process started in a namespace; killed (SIGKILL) and reaped on Drop.
#[derive(Debug)]
pub struct NsChild(pub Child);

impl NsChild {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .output();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.0.try_wait() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        self.0.wait().expect("wait child")
    }

    /// `Some(status)` if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Creates a veth pair: `a_if` in `a` and `b_if` in `b`, optionally addressed
/// (`Some("10.0.0.1/24")`), both up. The pair is created inside `a`, so the
/// root namespace never sees the names.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_cidr: Option<&str>,
    b: &Netns,
    b_if: &str,
    b_cidr: Option<&str>,
) {
    assert!(
        a_if.len() <= 15 && b_if.len() <= 15,
        "interface names must be ≤ 15 chars"
    );
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    if let Some(c) = a_cidr {
        a.ip(&["addr", "add", c, "dev", a_if]);
    }
    if let Some(c) = b_cidr {
        b.ip(&["addr", "add", c, "dev", b_if]);
    }
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// One pod of a `Topology`.
#[derive(Debug)]
pub struct PodNet {
    /// Pod name (also what its echo server answers).
    pub name: String,
    pub ns: Netns,
    /// The pod's IP (10.244.0.X), on `eth0` inside the pod as a /32.
    pub ip: Ipv4Addr,
    /// The node-side veth of this pod (`vpodN`).
    pub node_if: String,
}

/// Test network:
///
/// ```text
///  pod ns "eth0" 10.244.0.(10+i)/32 ──veth── node "vpod<i>" 10.244.0.1/32 (+ route 10.244.0.(10+i)/32)
///  outside "eth0" 192.168.50.2/24  ──veth── node "ext0" 192.168.50.1/24
/// ```
///
/// Every pod link is routed (no bridge), so all pod traffic, including pod to
/// pod and a pod to itself through a service, passes the node's IP stack and
/// iptables (hairpin works once kube-proxy masquerades it). Pods default-route
/// via 10.244.0.1; the outside host default-routes via the node (192.168.50.1);
/// the node default-routes via the outside host (so it has a route to any
/// service IP). Node: ip_forward=1, rp_filter=0, send_redirects=0.
#[derive(Debug)]
pub struct Topology {
    pub node: Netns,
    pub pods: Vec<PodNet>,
    pub outside: Netns,
}

/// Builder for `Topology`.
#[derive(Debug, Default)]
pub struct TopologyBuilder {
    pods: Vec<String>,
}

impl TopologyBuilder {
    /// Adds a pod with this name (≤ 8 chars recommended; used in the netns name).
    pub fn pod(mut self, name: &str) -> Self {
        self.pods.push(name.to_string());
        self
    }

    /// Adds `n` pods named `pod<i>` (continuing the index).
    pub fn pods(mut self, n: usize) -> Self {
        for _ in 0..n {
            let i = self.pods.len();
            self.pods.push(format!("pod{i}"));
        }
        self
    }

    pub fn build(self) -> Topology {
        Topology::with_pods(&self.pods.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

impl Topology {
    /// The node's address on the outside link: NodePort tests target this.
    pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
    /// The outside host's address.
    pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
    /// The node's address toward pods (the pods' gateway).
    pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
    /// This node's pod CIDR.
    pub const POD_CIDR: &'static str = "10.244.0.0/24";
    /// The cluster CIDR (for `--cluster-cidr`).
    pub const CLUSTER_CIDR: &'static str = "10.244.0.0/16";
    /// Suggested service CIDR (ClusterIPs like 10.96.0.10).
    pub const SERVICE_CIDR: &'static str = "10.96.0.0/16";

    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// Topology with `n` pods named pod0..pod(n-1).
    pub fn new(n: usize) -> Topology {
        Topology::builder().pods(n).build()
    }

    /// Topology with pods of these names, pod i at 10.244.0.(10+i).
    pub fn with_pods(names: &[&str]) -> Topology {
        assert!(names.len() <= 200, "at most 200 pods");
        let node = Netns::new("node");
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            node.sysctl(k, v);
        }
        let outside = Netns::new("out");
        veth(
            &node,
            "ext0",
            Some("192.168.50.1/24"),
            &outside,
            "eth0",
            Some("192.168.50.2/24"),
        );
        outside.set_default_route("192.168.50.1");
        node.set_default_route("192.168.50.2");

        let mut pods = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let ns = Netns::new(name);
            let ip = Ipv4Addr::new(10, 244, 0, 10 + i as u8);
            let node_if = format!("vpod{i}");
            veth(
                &node,
                &node_if,
                Some("10.244.0.1/32"),
                &ns,
                "eth0",
                Some(&format!("{ip}/32")),
            );
            node.add_route(&format!("{ip}/32"), &["dev", &node_if, "src", "10.244.0.1"]);
            ns.add_route("10.244.0.1/32", &["dev", "eth0"]);
            ns.set_default_route("10.244.0.1");
            pods.push(PodNet {
                name: name.to_string(),
                ns,
                ip,
                node_if,
            });
        }
        Topology {
            node,
            pods,
            outside,
        }
    }

    /// The pod with this name (panics if absent).
    pub fn pod(&self, name: &str) -> &PodNet {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Names of all namespaces of this topology.
    pub fn netns_names(&self) -> Vec<String> {
        let mut v = vec![
            self.node.name().to_string(),
            self.outside.name().to_string(),
        ];
        v.extend(self.pods.iter().map(|p| p.ns.name().to_string()));
        v
    }
}
