//! `IpvsClient` against a real kernel's IPVS.
//!
//! The host kernel of these machines has no IPVS, so outside a VM this test re-runs itself
//! inside one through `tests/vm/vmrun` (a Debian kernel under qemu, the host's file system
//! shared): `vmrun -- <this test binary> ipvs_client_against_real_kernel --exact
//! --nocapture`. Inside (`KPRS_IN_VM=1`) it drives the client and checks the result with
//! `ipvsadm -Ln`. It never skips: a missing harness or a non-root guest is a failure.
//! `KPRS_VMRUN` overrides the harness path.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use kube_proxy_rs::kernel::ipvs::codec::{
    IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED_SH_FALLBACK, IP_VS_SVC_F_SCHED_SH_PORT,
};
use kube_proxy_rs::kernel::ipvs::{
    AddressFamily, Errno, ForwardMethod, IpvsClient, IpvsError, IpvsOp, Protocol, RealServer,
    ServiceFlags, Timeouts, VirtualService,
};

const TEST_NAME: &str = "ipvs_client_against_real_kernel";

#[test]
fn ipvs_client_against_real_kernel() {
    if std::env::var("KPRS_IN_VM").as_deref() == Ok("1") {
        in_vm();
    } else {
        rerun_in_vm();
    }
}

fn rerun_in_vm() {
    let vmrun = std::env::var_os("KPRS_VMRUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vm/vmrun"));
    assert!(
        vmrun.is_file(),
        "FAIL: the VM harness {} is missing; this test needs it to reach a kernel with IPVS",
        vmrun.display()
    );
    let exe = std::env::current_exe().expect("current_exe");
    let status = Command::new(&vmrun)
        .arg("--timeout")
        .arg("900")
        .arg("--")
        .arg(&exe)
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .status()
        .unwrap_or_else(|e| panic!("FAIL: cannot run {}: {e}", vmrun.display()));
    assert!(
        status.success(),
        "FAIL: {TEST_NAME} failed inside the VM ({status}; 124 = timeout, 125 = harness failure)"
    );
}

fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .expect("Uid line")
}

fn in_vm() {
    assert_eq!(
        euid(),
        0,
        "FAIL: not root in the VM: IPVS needs CAP_NET_ADMIN"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(scenario());
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `ipvsadm -Ln` as a set of normalized lines: services `TCP 10.0.0.1:80 rr [flags]`,
/// destinations `TCP 10.0.0.1:80 -> 10.1.0.5:8080 Masq 1`.
fn ipvsadm_list() -> BTreeSet<String> {
    let out = Command::new("ipvsadm")
        .arg("-Ln")
        .output()
        .expect("run ipvsadm");
    assert!(out.status.success(), "ipvsadm -Ln failed: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut set = BTreeSet::new();
    let mut current = String::new();
    for line in text.lines().skip(3) {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.first() == Some(&"->") {
            set.insert(format!("{current} -> {} {} {}", t[1], t[2], t[3]));
        } else if !t.is_empty() {
            current = format!("{} {}", t[0], t[1]);
            set.insert(t.join(" "));
        }
    }
    set
}

fn svc_line(s: &VirtualService) -> String {
    let id = if s.fwmark != 0 {
        format!("FWM {}", s.fwmark)
    } else {
        let proto = match s.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Other(_) => "?",
        };
        match s.address {
            IpAddr::V4(a) => format!("{proto} {a}:{}", s.port),
            IpAddr::V6(a) => format!("{proto} [{a}]:{}", s.port),
        }
    };
    let mut line = format!("{id} {}", s.scheduler);
    let f = s.flags.effective();
    // ipvsadm names scheduler flags after sh/mh, else generically: " (mh-fallback,mh-port)".
    let named = matches!(s.scheduler.as_str(), "sh" | "mh");
    let mut names = Vec::new();
    for (bit, suffix, generic) in [
        (IP_VS_SVC_F_SCHED_SH_FALLBACK, "fallback", "flag-1"),
        (IP_VS_SVC_F_SCHED_SH_PORT, "port", "flag-2"),
    ] {
        if f & bit != 0 {
            names.push(if named {
                format!("{}-{suffix}", s.scheduler)
            } else {
                generic.to_owned()
            });
        }
    }
    if !names.is_empty() {
        line.push_str(&format!(" ({})", names.join(",")));
    }
    if f & IP_VS_SVC_F_PERSISTENT != 0 {
        line.push_str(&format!(" persistent {}", s.timeout));
    }
    line
}

fn dest_line(s: &VirtualService, d: &RealServer) -> String {
    let id = svc_line(s);
    let id: Vec<&str> = id.split_whitespace().take(2).collect();
    let fwd = match d.forward {
        ForwardMethod::Masq => "Masq",
        ForwardMethod::Local => "Local",
        ForwardMethod::Tunnel => "Tunnel",
        ForwardMethod::DirectRoute => "Route",
        ForwardMethod::Bypass => "Bypass",
    };
    format!("{} -> {} {fwd} {}", id.join(" "), d, d.weight)
}

/// What the client reads back, in `ipvsadm_list` form.
async fn client_list(c: &mut IpvsClient) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for s in c.services().await.expect("services") {
        set.insert(svc_line(&s));
        for d in c.destinations(&s).await.expect("destinations") {
            set.insert(dest_line(&s, &d));
        }
    }
    set
}

async fn assert_matches_ipvsadm(c: &mut IpvsClient, want: &BTreeSet<String>, step: &str) {
    let ours = client_list(c).await;
    let theirs = ipvsadm_list();
    assert_eq!(
        &ours, want,
        "{step}: client view differs from the expected state"
    );
    assert_eq!(
        &theirs, want,
        "{step}: ipvsadm -Ln differs from the expected state"
    );
    println!("ok: {step} ({} lines agree with ipvsadm -Ln)", want.len());
}

async fn scenario() {
    let mut c = match IpvsClient::connect().await {
        Ok(c) => c,
        Err(e) => panic!("FAIL: connect: {e}"),
    };
    println!("IPVS family id {}", c.family_id());
    c.probe().await.expect("probe");
    let info = c.info().await.expect("info");
    assert_eq!(info.version >> 16, 1, "IPVS version {:#x}", info.version);
    c.flush().await.expect("flush");

    // Timeouts.
    let orig = c.get_timeouts().await.expect("get timeouts");
    println!("default timeouts {orig:?}");
    c.set_timeouts(1000, 130, 310).await.expect("set timeouts");
    assert_eq!(
        c.get_timeouts().await.unwrap(),
        Timeouts {
            tcp: 1000,
            tcp_fin: 130,
            udp: 310
        }
    );
    c.set_timeouts(orig.tcp, orig.tcp_fin, orig.udp)
        .await
        .unwrap();

    // Services: plain, persistent, IPv6 with mh flags, fwmark.
    let web = VirtualService::new(ip("10.0.0.1"), Protocol::Tcp, 80, "rr");
    let mut sticky = VirtualService::new(ip("10.0.0.2"), Protocol::Tcp, 443, "rr");
    sticky.flags = ServiceFlags::exactly(IP_VS_SVC_F_PERSISTENT);
    sticky.timeout = 10800;
    let mut dns6 = VirtualService::new(ip("fd00::10"), Protocol::Udp, 53, "mh");
    dns6.flags = ServiceFlags::exactly(IP_VS_SVC_F_SCHED_SH_FALLBACK | IP_VS_SVC_F_SCHED_SH_PORT);
    let fw = VirtualService::with_fwmark(AddressFamily::Inet, 16, "wrr");
    for s in [&web, &sticky, &dns6, &fw] {
        c.add_service(s)
            .await
            .unwrap_or_else(|e| panic!("add {s}: {e}"));
    }
    let listed = c.services().await.unwrap();
    assert_eq!(listed.len(), 4);
    for s in [&web, &sticky, &dns6, &fw] {
        let got = listed.iter().find(|l| l.same_key(s)).expect("listed");
        assert_eq!(got.scheduler, s.scheduler);
        assert_eq!(got.flags.effective(), s.flags.effective());
        assert_eq!(got.timeout, s.timeout);
        assert_eq!(got.netmask, s.netmask);
    }

    // Destinations in one batch.
    let d1 = RealServer::new(ip("10.1.0.5"), 8080, 1);
    let d2 = RealServer::new(ip("10.1.0.6"), 8080, 1);
    let d3 = RealServer::new(ip("10.1.0.7"), 8080, 1);
    let d6 = RealServer::new(ip("fd00:1::5"), 5353, 1);
    let ops = vec![
        IpvsOp::AddDestination(web.clone(), d1.clone()),
        IpvsOp::AddDestination(web.clone(), d2.clone()),
        IpvsOp::AddDestination(web.clone(), d3.clone()),
        IpvsOp::AddDestination(sticky.clone(), d1.clone()),
        IpvsOp::AddDestination(dns6.clone(), d6.clone()),
        IpvsOp::AddDestination(fw.clone(), d2.clone()),
    ];
    for (op, r) in ops.iter().zip(c.apply(&ops).await) {
        r.unwrap_or_else(|e| panic!("{op}: {e}"));
    }
    let dests = c.destinations(&web).await.unwrap();
    assert_eq!(dests.len(), 3);
    assert!(dests.iter().all(|d| d.weight == 1
        && d.forward == ForwardMethod::Masq
        && d.address_family == Some(AddressFamily::Inet)));
    let mut want: BTreeSet<String> = [&web, &sticky, &dns6, &fw]
        .iter()
        .map(|s| svc_line(s))
        .collect();
    for (s, d) in [
        (&web, &d1),
        (&web, &d2),
        (&web, &d3),
        (&sticky, &d1),
        (&dns6, &d6),
        (&fw, &d2),
    ] {
        want.insert(dest_line(s, d));
    }
    assert_matches_ipvsadm(&mut c, &want, "after adds").await;

    // Graceful termination: weight 0, then delete; scheduler change.
    let mut d2_quiesced = d2.clone();
    d2_quiesced.weight = 0;
    c.update_destination(&web, &d2_quiesced).await.unwrap();
    want.remove(&dest_line(&web, &d2));
    want.insert(dest_line(&web, &d2_quiesced));
    let mut web_wrr = web.clone();
    web_wrr.scheduler = "wrr".into();
    c.update_service(&web_wrr).await.unwrap();
    want.remove(&svc_line(&web));
    want.insert(svc_line(&web_wrr));
    c.delete_destination(&web, &d3).await.unwrap();
    want.remove(&dest_line(&web, &d3));
    assert_matches_ipvsadm(&mut c, &want, "after edits").await;

    // Errors: per-op results in a batch, errno names.
    let extra = VirtualService::new(ip("10.0.0.3"), Protocol::Tcp, 80, "rr");
    let ops = vec![
        IpvsOp::AddService(extra.clone()),
        IpvsOp::AddService(web.clone()),
        IpvsOp::DeleteService(extra.clone()),
    ];
    let res = c.apply(&ops).await;
    assert!(res[0].is_ok(), "{:?}", res[0]);
    let err = res[1].as_ref().expect_err("duplicate add must fail");
    assert!(err.is_exists(), "{err}");
    println!("duplicate add reports: {err}");
    assert!(res[2].is_ok(), "{:?}", res[2]);
    // Only a batch's last request is acked: a failing last one, and a batch whose every
    // request fails (all answers must fit the receive buffer), still report per op.
    let ops = vec![
        IpvsOp::AddService(extra.clone()),
        IpvsOp::DeleteService(extra.clone()),
        IpvsOp::AddService(web.clone()),
    ];
    let res = c.apply(&ops).await;
    assert!(res[0].is_ok() && res[1].is_ok(), "{res:?}");
    assert!(res[2].as_ref().is_err_and(IpvsError::is_exists), "{res:?}");
    let nowhere = VirtualService::new(ip("10.0.0.5"), Protocol::Tcp, 80, "rr");
    let doomed: Vec<IpvsOp> = (0..300u32)
        .map(|i| {
            let a = IpAddr::from([10, 3, (i / 250) as u8, (i % 250 + 1) as u8]);
            IpvsOp::AddDestination(nowhere.clone(), RealServer::new(a, 80, 1))
        })
        .collect();
    let res = c.apply(&doomed).await;
    assert!(
        res.iter()
            .all(|r| r.as_ref().is_err_and(IpvsError::is_not_found)),
        "{:?}",
        res.iter()
            .find(|r| !r.as_ref().is_err_and(IpvsError::is_not_found))
    );
    let err = c.delete_service(&extra).await.expect_err("gone");
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.errno(), Some(Errno::ESRCH));
    let err = c
        .delete_destination(&web, &RealServer::new(ip("10.9.9.9"), 1, 1))
        .await
        .expect_err("no such destination");
    assert!(err.is_not_found(), "{err}");
    let bad = VirtualService::new(ip("10.0.0.4"), Protocol::Tcp, 80, "nosuchsched");
    let err = c.add_service(&bad).await.expect_err("unknown scheduler");
    println!("unknown scheduler reports: {err}");
    assert!(matches!(err, IpvsError::Kernel { .. }), "{err}");

    // A batch larger than one datagram, and a dump larger than one datagram.
    let big = VirtualService::new(ip("10.0.0.100"), Protocol::Tcp, 8443, "rr");
    c.add_service(&big).await.unwrap();
    let many: Vec<IpvsOp> = (0..300u32)
        .map(|i| {
            let a = IpAddr::from([10, 2, (i / 250) as u8, (i % 250 + 1) as u8]);
            IpvsOp::AddDestination(big.clone(), RealServer::new(a, 80, 1))
        })
        .collect();
    let res = c.apply(&many).await;
    assert!(
        res.iter().all(|r| r.is_ok()),
        "{:?}",
        res.iter().find(|r| r.is_err())
    );
    assert_eq!(c.destinations(&big).await.unwrap().len(), 300);
    println!("ok: 300 destinations in one apply, read back in one dump");
    c.delete_service(&big).await.unwrap();
    assert_matches_ipvsadm(&mut c, &want, "after the big batch").await;

    // Flush.
    c.flush().await.unwrap();
    assert!(c.services().await.unwrap().is_empty());
    assert_matches_ipvsadm(&mut c, &BTreeSet::new(), "after flush").await;

    // Without the module: the clear error (unless the kernel auto-loads it on lookup).
    drop(c);
    let rm = Command::new("sh")
        .arg("-c")
        .arg("set -e; for m in $(awk '/^ip_vs_/ {print $1}' /proc/modules); do modprobe -r $m; done; modprobe -r ip_vs")
        .status()
        .expect("modprobe");
    if rm.success() {
        match IpvsClient::connect().await {
            Err(IpvsError::NotAvailable) => {
                println!("ok: without ip_vs: {}", IpvsError::NotAvailable)
            }
            Ok(_) => println!("note: the kernel auto-loaded ip_vs on the family lookup"),
            Err(e) => panic!("without ip_vs: unexpected error {e}"),
        }
    } else {
        println!("note: could not unload ip_vs ({rm}); absence not exercised");
    }
    println!("PASS {TEST_NAME}");
}
