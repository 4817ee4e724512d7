//! The IPVS dummy link over rtnetlink (`DummyLink`), checked with `ip -j` (a tool we did not
//! write) inside a fresh network namespace: ensure creates a down dummy link once, addresses
//! are bound as /32 and /128 (IPv6 without DAD), a batch change binds and unbinds together
//! (bound/absent addresses count as done; a refused request fails only itself), and delete
//! removes the link.
//!
//! The host kernel has no dummy links: outside the VM this test re-runs itself in the qemu
//! guest of tests/vm/vmrun. It never skips.

mod support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

use kube_proxy_rs::kernel::DummyLink;
use serde_json::Value;
use support::netns::Netns;

const TEST_NAME: &str = "dummy_link_over_rtnetlink";
const LINK: &str = "kube-ipvs0";

#[test]
fn dummy_link_over_rtnetlink() {
    if !support::vm::in_vm() {
        return support::vm::rerun_in_vm(TEST_NAME, 300);
    }
    support::require_root();
    let ns = Netns::new("link");
    // A current-thread runtime: the namespace helper thread must not need a second worker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let t0 = Instant::now();
    rt.block_on(scenario(&ns));
    eprintln!("dummy link scenario took {:?} in the guest", t0.elapsed());
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
    addrs.iter().map(|a| ip(a)).collect()
}

/// `ip -j -d link show dev kube-ipvs0`, or `None` if the link does not exist.
fn ip_link(ns: &Netns) -> Option<Value> {
    let out = ns.run("ip", ["-j", "-d", "link", "show", "dev", LINK]);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("does not exist"), "ip link show: {stderr}");
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j link JSON");
    Some(v[0].clone())
}

/// The addresses `ip -j addr show dev kube-ipvs0` lists, with their prefix lengths and
/// whether they carry `nodad`.
fn ip_addrs(ns: &Netns) -> Vec<(IpAddr, u64, bool)> {
    let out = ns.run_ok("ip", ["-j", "addr", "show", "dev", LINK]);
    let v: Value = serde_json::from_str(&out).expect("ip -j addr JSON");
    v[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .map(|a| {
            (
                ip(a["local"].as_str().expect("local")),
                a["prefixlen"].as_u64().expect("prefixlen"),
                a["nodad"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn ip_addr_set(ns: &Netns) -> BTreeSet<IpAddr> {
    ip_addrs(ns).into_iter().map(|(a, _, _)| a).collect()
}

async fn ours(link: &DummyLink) -> BTreeSet<IpAddr> {
    link.addresses().await.unwrap().into_iter().collect()
}

async fn scenario(ns: &Netns) {
    let link = DummyLink::default().with_netns(ns.name());
    assert_eq!(link.name(), LINK);

    // Absent link: nothing to list, nothing to delete, binding fails clearly.
    assert!(!link.exists().await.unwrap());
    assert!(link.addresses().await.unwrap().is_empty());
    assert!(!link.del_address(ip("10.96.0.1")).await.unwrap());
    let e = link
        .change_addresses(&[ip("10.96.0.1")], &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no link kube-ipvs0"), "{e}");
    assert!(ip_link(ns).is_none());

    // ensure: created once, type dummy, left down; only in this namespace.
    assert!(link.ensure().await.unwrap(), "first ensure creates");
    assert!(!link.ensure().await.unwrap(), "second ensure finds it");
    assert!(link.exists().await.unwrap());
    let l = ip_link(ns).expect("ip sees the link");
    assert_eq!(l["linkinfo"]["info_kind"], "dummy", "{l}");
    let flags: Vec<&str> = l["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!flags.contains(&"UP"), "left down like upstream: {l}");
    assert!(
        !DummyLink::default().exists().await.unwrap(),
        "the guest's own namespace has no {LINK}"
    );

    // Single adds: /32 and /128 (nodad); re-adding is "already done".
    assert!(link.add_address(ip("10.96.0.1")).await.unwrap());
    assert!(!link.add_address(ip("10.96.0.1")).await.unwrap());
    assert!(link.add_address(ip("fd00::1")).await.unwrap());
    let mut seen = ip_addrs(ns);
    seen.sort();
    assert_eq!(
        seen,
        vec![(ip("10.96.0.1"), 32, false), (ip("fd00::1"), 128, true)]
    );
    assert_eq!(ours(&link).await, set(&["10.96.0.1", "fd00::1"]));

    // One batch: binds and unbinds together; a bound add and an absent delete are fine.
    link.change_addresses(
        &[
            ip("10.96.0.2"),
            ip("10.96.0.3"),
            ip("10.96.0.1"),
            ip("fd00::2"),
        ],
        &[ip("fd00::1"), ip("10.96.0.99")],
    )
    .await
    .unwrap();
    let want = set(&["10.96.0.1", "10.96.0.2", "10.96.0.3", "fd00::2"]);
    assert_eq!(ip_addr_set(ns), want);
    assert_eq!(ours(&link).await, want);

    // A big batch (several datagrams of MAX_BATCH) in both directions.
    let many: Vec<IpAddr> = (0..300u32)
        .map(|i| ip(&format!("10.97.{}.{}", i / 200, i % 200 + 1)))
        .collect();
    let t = Instant::now();
    link.change_addresses(&many, &[]).await.unwrap();
    eprintln!("binding {} addresses took {:?}", many.len(), t.elapsed());
    let mut with_many = want.clone();
    with_many.extend(many.iter().copied());
    assert_eq!(ip_addr_set(ns), with_many);
    assert_eq!(ours(&link).await, with_many);
    link.change_addresses(&[], &many).await.unwrap();
    assert_eq!(ip_addr_set(ns), want);

    // A refused request fails only itself: ::1 cannot go on a non-loopback link.
    let e = link
        .change_addresses(&[ip("10.96.0.4"), ip("::1")], &[ip("10.96.0.3")])
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("1 of 3 requests failed") && text.contains("::1/128"),
        "{text}"
    );
    let want = set(&["10.96.0.1", "10.96.0.2", "10.96.0.4", "fd00::2"]);
    assert_eq!(ip_addr_set(ns), want);

    // Single deletes: absent is "already done".
    assert!(link.del_address(ip("10.96.0.2")).await.unwrap());
    assert!(!link.del_address(ip("10.96.0.2")).await.unwrap());
    assert!(link.del_address(ip("fd00::2")).await.unwrap());
    assert_eq!(ip_addr_set(ns), set(&["10.96.0.1", "10.96.0.4"]));

    // delete (cleanup): gone for ip too; a second delete finds nothing.
    assert!(link.delete().await.unwrap());
    assert!(ip_link(ns).is_none());
    assert!(!link.exists().await.unwrap());
    assert!(!link.delete().await.unwrap());
    assert!(link.addresses().await.unwrap().is_empty());
}
