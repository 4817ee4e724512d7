//! Shared end-to-end test harness: network namespaces, echo pods, a fake
//! kube-apiserver, and the daemon started against it. Included from each integration
//! test with `mod support;`.
#![allow(dead_code)]

pub mod daemon;
pub mod fakeapi;
pub mod manifests;
pub mod netns;
pub mod pods;
pub mod vm;

/// Panics with a clear message unless the test runs as root (effective uid 0).
/// End-to-end tests need root for network namespaces; they must never skip silently.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "these end-to-end tests need root (network namespaces, veth, iptables); \
         effective uid is {euid}. Run them as root, e.g. `sudo -E cargo test`."
    );
}
