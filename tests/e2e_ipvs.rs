//! End-to-end, IPVS mode: the same scenarios as iptables mode (tests/scenarios), real packets
//! through virtual servers the built binary programs with `--proxy-mode=ipvs`.
//!
//! The host kernel has no IPVS and no dummy links, so outside the VM this test re-runs itself
//! in the qemu guest of tests/vm/vmrun; it never skips.

mod scenarios;
mod support;

const TEST_NAME: &str = "ipvs_mode_end_to_end";

#[test]
fn ipvs_mode_end_to_end() {
    if !support::vm::in_vm() {
        return support::vm::rerun_in_vm(TEST_NAME, 1200);
    }
    support::require_root();
    scenarios::run_all(scenarios::Features {
        mode: "ipvs",
        etp_local_falls_back_to_cluster: true,
    });
}
