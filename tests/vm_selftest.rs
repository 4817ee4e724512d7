//! Self-test of the VM harness `tests/vm/vmrun`: boots Debian's kernel under
//! qemu (TCG) and checks that IPVS, dummy links and ipset work in the guest,
//! that exit statuses, stdout/stderr, arguments and environment come back
//! intact, and that a Rust test binary built on the host runs in the guest.
//!
//! Needs root (vmrun installs packages with apt-get and shares the host root
//! with the guest).  Each boot costs seconds, so the checks are batched into
//! three boots, serialized by a lock.  The first run also prepares the kernel
//! cache (`.vm-cache`, or `$KPRS_VM_CACHE`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// One VM at a time: the machine has few cores and TCG is CPU bound.
static VM_LOCK: Mutex<()> = Mutex::new(());

/// Arguments that a shell would mangle; they must reach the guest unchanged.
const TRICKY_ARGS: [&str; 5] = [
    "two words",
    "it's \"quoted\" $HOME `id` $(id) ;|&",
    "line one\nline two",
    "*",
    "",
];
const TOKEN: &str = "value with spaces, 'quotes' and $dollar";

fn vmrun_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm/vmrun")
}

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("Uid line in /proc/self/status");
    assert_eq!(
        euid, "0",
        "vm_selftest must run as root: tests/vm/vmrun installs its packages with apt-get, \
         and boots qemu with the host's root file system shared into the guest. \
         Run `cargo test --test vm_selftest` as root."
    );
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("read /proc/sys/kernel/osrelease")
        .trim()
        .to_string()
}

/// Runs `vmrun --timeout 300 -- cmd...` and returns its output.
fn vmrun(cmd: &[&str], envs: &[(&str, &str)]) -> Output {
    require_root();
    let _guard = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Command::new(vmrun_path());
    c.args(["--timeout", "300", "--"]).args(cmd);
    for (k, v) in envs {
        c.env(k, v);
    }
    let started = std::time::Instant::now();
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", vmrun_path().display()));
    eprintln!(
        "vmrun {:?}: {:?} after {:.1} s\n--- stdout ---\n{}--- stderr ---\n{}---",
        cmd,
        out.status,
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The text between the line `== name` and the next `== ` line.
fn section<'a>(stdout: &'a str, name: &str) -> &'a str {
    let start = stdout
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section `{name}` in guest output:\n{stdout}"));
    let body = &stdout[start + name.len() + 4..];
    match body.find("\n== ") {
        Some(end) => &body[..end + 1],
        None => body,
    }
}

#[test]
fn guest_ipvs_dummy_ipset_and_exit_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("checks.sh");
    std::fs::write(
        &script,
        r#"set -u
echo "== uname"
uname -r
echo "== proc"
test -e /proc/net/ip_vs && echo "ip_vs present"
echo "== ipvsadm"
ipvsadm -A -t 10.0.0.1:80 -s rr || echo "ipvsadm -A failed"
ipvsadm -a -t 10.0.0.1:80 -r 10.0.1.5:8080 -m -w 1 || echo "ipvsadm -a failed"
ipvsadm -Ln
echo "== dummy"
ip link add kube-ipvs0 type dummy || echo "ip link add failed"
ip addr add 10.0.0.1/32 dev kube-ipvs0
ip addr show kube-ipvs0
echo "== ipset"
ipset create KUBE-TEST hash:ip,port || echo "ipset create failed"
ipset add KUBE-TEST 10.0.1.5,tcp:8080
ipset list KUBE-TEST
echo "== env"
echo "KPRS_IN_VM=${KPRS_IN_VM:-unset}"
echo "== end"
echo "this goes to stderr" >&2
exit 3
"#,
    )
    .expect("write script");
    let out = vmrun(&["/bin/sh", script.to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert_eq!(
        out.status.code(),
        Some(3),
        "the script's `exit 3` must come back as vmrun's status"
    );

    let guest_kernel = section(&stdout, "uname").trim().to_string();
    assert!(!guest_kernel.is_empty(), "no guest kernel version");
    assert_ne!(
        guest_kernel,
        host_kernel(),
        "the command must run in the guest kernel, not the host's"
    );

    assert!(
        section(&stdout, "proc").contains("ip_vs present"),
        "/proc/net/ip_vs missing in the guest"
    );

    let ipvs = section(&stdout, "ipvsadm");
    assert!(!ipvs.contains("failed"), "ipvsadm failed:\n{ipvs}");
    assert!(
        ipvs.contains("IP Virtual Server version"),
        "ipvsadm -Ln header missing:\n{ipvs}"
    );
    assert!(
        ipvs.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["TCP", "10.0.0.1:80", "rr"]),
        "virtual server 10.0.0.1:80 rr not listed:\n{ipvs}"
    );
    assert!(
        ipvs.contains("-> 10.0.1.5:8080"),
        "real server not listed:\n{ipvs}"
    );

    let dummy = section(&stdout, "dummy");
    assert!(!dummy.contains("failed"), "dummy link failed:\n{dummy}");
    assert!(
        dummy.contains("kube-ipvs0:"),
        "kube-ipvs0 not shown:\n{dummy}"
    );
    assert!(
        dummy.contains("inet 10.0.0.1/32"),
        "address not on kube-ipvs0:\n{dummy}"
    );

    let ipset = section(&stdout, "ipset");
    assert!(!ipset.contains("failed"), "ipset failed:\n{ipset}");
    assert!(
        ipset.contains("Name: KUBE-TEST"),
        "set not listed:\n{ipset}"
    );
    assert!(
        ipset.contains("Type: hash:ip,port"),
        "set type wrong:\n{ipset}"
    );
    assert!(
        ipset.contains("10.0.1.5,tcp:8080"),
        "member not listed:\n{ipset}"
    );

    assert_eq!(section(&stdout, "env").trim(), "KPRS_IN_VM=1");

    assert!(
        stderr.contains("this goes to stderr"),
        "guest stderr must come back on stderr"
    );
    assert!(
        !stdout.contains("this goes to stderr"),
        "guest stderr leaked into stdout"
    );
    for noise in ["SeaBIOS", "Linux version", "vmrun-init", "vmrun-guest"] {
        assert!(
            !stdout.contains(noise),
            "console noise `{noise}` in stdout:\n{stdout}"
        );
    }
}

#[test]
fn guest_false_exits_1() {
    let out = vmrun(&["false"], &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "`false` in the guest must make vmrun exit 1"
    );
    assert!(
        out.stdout.is_empty(),
        "unexpected stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Runs this very test binary (built on the host) in the guest, selecting
/// itself (the guest half, `guest_probe`), with shell-hostile arguments and a KPRS_ variable.
#[test]
fn host_built_rust_test_binary_runs_in_guest() {
    if std::env::var("KPRS_IN_VM").as_deref() == Ok("1") {
        // The guest half: this same test, re-run inside the VM by the host half below.
        guest_probe();
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd: Vec<&str> = vec![
        exe.to_str().unwrap(),
        "host_built_rust_test_binary_runs_in_guest",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ];
    cmd.extend(TRICKY_ARGS);
    let host = host_kernel();
    let out = vmrun(
        &cmd,
        &[
            ("KPRS_HOST_KERNEL", host.as_str()),
            ("KPRS_SELFTEST_TOKEN", TOKEN),
            ("SELFTEST_NOT_PASSED", "1"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the probe failed in the guest:\n{stdout}"
    );
    assert!(
        stdout.contains("GUEST-PROBE-OK"),
        "probe marker missing:\n{stdout}"
    );
    assert!(
        stdout.contains("1 passed"),
        "the probe did not run:\n{stdout}"
    );
}

/// Not a host test: `host_built_rust_test_binary_runs_in_guest` runs it inside
/// the VM (it fails when run elsewhere).
fn guest_probe() {
    assert_eq!(
        std::env::var("KPRS_IN_VM").as_deref(),
        Ok("1"),
        "not running under tests/vm/vmrun"
    );
    let guest = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string();
    let host = std::env::var("KPRS_HOST_KERNEL").expect("KPRS_HOST_KERNEL passed through");
    assert_ne!(guest, host, "guest kernel must differ from the host kernel");
    assert_eq!(
        std::env::var("KPRS_VM_KERNEL").as_deref(),
        Ok(guest.as_str())
    );
    let ipvs = std::fs::read_to_string("/proc/net/ip_vs").expect("/proc/net/ip_vs in the guest");
    assert!(ipvs.starts_with("IP Virtual Server version"), "{ipvs}");
    assert_eq!(
        std::env::var("KPRS_SELFTEST_TOKEN").as_deref(),
        Ok(TOKEN),
        "KPRS_ variable mangled"
    );
    assert!(
        std::env::var_os("SELFTEST_NOT_PASSED").is_none(),
        "unlisted variable leaked into the guest"
    );
    let args: Vec<String> = std::env::args().collect();
    let tail = &args[args.len() - TRICKY_ARGS.len()..];
    assert_eq!(
        tail, TRICKY_ARGS,
        "arguments mangled on the way into the guest"
    );
    println!("GUEST-PROBE-OK guest={guest} host={host}");
}
