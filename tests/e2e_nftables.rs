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
