//! Re-running a test inside the qemu guest of `tests/vm/vmrun` (Debian's kernel: IPVS, dummy
//! links), for tests the host kernel cannot serve. Outside the VM a test calls
//! [`rerun_in_vm`]; the guest runs the same test binary with `KPRS_IN_VM=1`, where
//! [`in_vm`] is true. Nothing here skips: a missing harness, a failed boot or a non-root
//! guest is a test failure. `KPRS_VMRUN` overrides the harness path.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Whether this process runs inside the VM.
pub fn in_vm() -> bool {
    std::env::var("KPRS_IN_VM").as_deref() == Ok("1")
}

/// Runs `test_name` of the current test binary in the VM (exact match, output shown), and
/// fails unless it passes there. `timeout_secs` bounds the whole guest run.
pub fn rerun_in_vm(test_name: &str, timeout_secs: u32) {
    let vmrun = std::env::var_os("KPRS_VMRUN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vm/vmrun"));
    assert!(
        vmrun.is_file(),
        "FAIL: the VM harness {} is missing; {test_name} needs it to reach a kernel with IPVS \
         and dummy links (the host kernel has neither)",
        vmrun.display()
    );
    crate::support::require_root();
    let exe = std::env::current_exe().expect("current_exe");
    let t0 = Instant::now();
    let status = Command::new(&vmrun)
        .arg("--timeout")
        .arg(timeout_secs.to_string())
        .arg("--")
        .arg(&exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .status()
        .unwrap_or_else(|e| panic!("FAIL: cannot run {}: {e}", vmrun.display()));
    eprintln!("{test_name}: guest run took {:?}", t0.elapsed());
    assert!(
        status.success(),
        "FAIL: {test_name} failed inside the VM ({status}; 124 = timeout, 125 = harness failure)"
    );
}
