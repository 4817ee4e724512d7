//! Helpers for tests that run against the real kernel inside throwaway network namespaces.
//!
//! Such tests need root. Without it they FAIL with a clear message; they never skip.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Panics unless the effective uid is 0 (read from /proc, no unsafe code needed).
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .map(str::to_string);
    assert_eq!(
        euid.as_deref(),
        Some("0"),
        "kernel tests must run as root (they create network namespaces and program \
         netfilter); run `cargo test` as root, e.g. in the CI container"
    );
}

/// Runs a setup command synchronously; panics with its stderr on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace `kprs-kt-<pid>-<n>`, deleted on drop (also while unwinding
/// from a panic).
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a fresh namespace with loopback up. Fails the test if not root.
    pub fn new() -> Self {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("kprs-kt-{}-{n}", std::process::id());
        // A leftover from an earlier run with the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args...` inside the namespace, panicking on failure.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut v = vec!["netns", "exec", &self.name, program];
        v.extend_from_slice(args);
        sh("ip", &v)
    }

    /// Connects this namespace to `peer` with a veth pair (`local_if` here, `peer_if`
    /// there), both up, with the given `addr/len` on each end.
    pub fn veth_to(
        &self,
        peer: &NetNs,
        local_if: &str,
        peer_if: &str,
        local_addr: &str,
        peer_addr: &str,
    ) {
        sh(
            "ip",
            &[
                "link", "add", local_if, "netns", &self.name, "type", "veth", "peer", "name",
                peer_if, "netns", &peer.name,
            ],
        );
        for (ns, ifname, addr) in [(self, local_if, local_addr), (peer, peer_if, peer_addr)] {
            let mut args = vec!["-n", &ns.name, "addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            sh("ip", &args);
            sh("ip", &["-n", &ns.name, "link", "set", ifname, "up"]);
        }
    }

    /// Runs `f` on a fresh thread that has entered this namespace (the calling thread is
    /// not affected). Sockets and /proc/sys/net opened by `f` belong to the namespace.
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
