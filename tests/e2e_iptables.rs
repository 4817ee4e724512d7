//! End-to-end, iptables mode: real packets through rules the built binary programs.

mod scenarios;
mod support;

#[test]
fn iptables_mode_end_to_end() {
    scenarios::run_all(scenarios::Features {
        mode: "iptables",
        etp_local_falls_back_to_cluster: false,
    });
}
