//! The jump rules kube-proxy keeps in builtin chains (ensured with `-C`/`-I` on full
//! syncs), and `--cleanup`: upstream `iptablesJumpChains` and `CleanupLeftovers`.

use super::names::*;
use super::parse::{Dump, ParseError};
use super::restore::flush_and_delete;

/// A rule in a builtin chain jumping to one of our chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpRule {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// The builtin chain holding the rule (`INPUT`, `PREROUTING`, …).
    pub chain: &'static str,
    /// Our chain it jumps to (must exist: create it with `-N` first).
    pub target: &'static str,
    /// The rule's comment; empty for kubelet's KUBE-FIREWALL jumps, which have none.
    pub comment: &'static str,
    /// Matches placed before the comment (`-m conntrack --ctstate NEW`).
    pub extra_args: &'static [&'static str],
}

const CT_NEW: &[&str] = &["-m", "conntrack", "--ctstate", "NEW"];

/// Upstream `iptablesJumpChains`, in order.
pub const KUBE_PROXY_JUMPS: &[JumpRule] = &[
    JumpRule {
        table: "filter",
        target: KUBE_EXTERNAL_SERVICES,
        chain: "INPUT",
        comment: "kubernetes externally-visible service portals",
        extra_args: CT_NEW,
    },
    JumpRule {
        table: "filter",
        target: KUBE_EXTERNAL_SERVICES,
        chain: "FORWARD",
        comment: "kubernetes externally-visible service portals",
        extra_args: CT_NEW,
    },
    JumpRule {
        table: "filter",
        target: KUBE_NODEPORTS,
        chain: "INPUT",
        comment: "kubernetes health check service ports",
        extra_args: &[],
    },
    JumpRule {
        table: "filter",
        target: KUBE_SERVICES,
        chain: "FORWARD",
        comment: "kubernetes service portals",
        extra_args: CT_NEW,
    },
    JumpRule {
        table: "filter",
        target: KUBE_SERVICES,
        chain: "OUTPUT",
        comment: "kubernetes service portals",
        extra_args: CT_NEW,
    },
    JumpRule {
        table: "filter",
        target: KUBE_FORWARD,
        chain: "FORWARD",
        comment: "kubernetes forwarding rules",
        extra_args: &[],
    },
    JumpRule {
        table: "filter",
        target: KUBE_PROXY_FIREWALL,
        chain: "INPUT",
        comment: "kubernetes load balancer firewall",
        extra_args: CT_NEW,
    },
    JumpRule {
        table: "filter",
        target: KUBE_PROXY_FIREWALL,
        chain: "OUTPUT",
        comment: "kubernetes load balancer firewall",
        extra_args: CT_NEW,
    },
    JumpRule {
        table: "filter",
        target: KUBE_PROXY_FIREWALL,
        chain: "FORWARD",
        comment: "kubernetes load balancer firewall",
        extra_args: CT_NEW,
    },
    JumpRule {
        table: "nat",
        target: KUBE_SERVICES,
        chain: "OUTPUT",
        comment: "kubernetes service portals",
        extra_args: &[],
    },
    JumpRule {
        table: "nat",
        target: KUBE_SERVICES,
        chain: "PREROUTING",
        comment: "kubernetes service portals",
        extra_args: &[],
    },
    JumpRule {
        table: "nat",
        target: KUBE_POSTROUTING,
        chain: "POSTROUTING",
        comment: "kubernetes postrouting rules",
        extra_args: &[],
    },
];

/// Upstream `iptablesKubeletJumpChains`: ensured on sync, never removed by cleanup.
pub const KUBELET_JUMPS: &[JumpRule] = &[
    JumpRule {
        table: "filter",
        target: KUBE_FIREWALL,
        chain: "INPUT",
        comment: "",
        extra_args: &[],
    },
    JumpRule {
        table: "filter",
        target: KUBE_FIREWALL,
        chain: "OUTPUT",
        comment: "",
        extra_args: &[],
    },
];

impl JumpRule {
    /// The rule's arguments after `-t TABLE -I CHAIN` (or `-C`/`-D`), one word each, as
    /// passed to the iptables binary: extra args, the comment (if any), `-j TARGET`.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = self.extra_args.iter().map(|s| s.to_string()).collect();
        if !self.comment.is_empty() {
            args.extend(["-m", "comment", "--comment", self.comment].map(String::from));
        }
        args.extend(["-j", self.target].map(String::from));
        args
    }
}

/// The jump rules a full sync ensures (chain exists, then `-C` or else `-I` at the top), in
/// upstream order: kube-proxy's own, then kubelet's KUBE-FIREWALL copies.
pub fn jump_rules() -> Vec<JumpRule> {
    KUBE_PROXY_JUMPS
        .iter()
        .chain(KUBELET_JUMPS)
        .copied()
        .collect()
}

/// What `--cleanup` does in iptables mode, as data. Run in this order:
/// 1. `iptables -t TABLE -D CHAIN ARGS…` for each of `delete_jumps` (not-found is fine);
/// 2. `iptables-restore --noflush --counters` with `nat_restore`, then with `filter_restore`;
/// 3. `iptables -t mangle -X KUBE-PROXY-CANARY` (errors ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupPlan {
    /// Jump rules to delete from builtin chains.
    pub delete_jumps: Vec<JumpRule>,
    /// Restore input flushing and deleting our nat chains.
    pub nat_restore: String,
    /// Restore input flushing and deleting our filter chains.
    pub filter_restore: String,
    /// `(table, chain)` to delete last, ignoring errors.
    pub delete_chain: (&'static str, &'static str),
}

/// Builds the cleanup from `iptables-save -t nat` and `iptables-save -t filter` output.
/// Only chains kube-proxy creates are touched; foreign chains and rules stay.
pub fn cleanup_plan(save_nat: &str, save_filter: &str) -> Result<CleanupPlan, ParseError> {
    let nat = Dump::parse(save_nat)?.chain_names("nat");
    let filter = Dump::parse(save_filter)?.chain_names("filter");

    let mut nat_chains = Vec::new();
    for c in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
        KUBE_PROXY_CANARY,
    ] {
        if nat.contains(c) {
            nat_chains.push(c.to_string());
        }
    }
    nat_chains.extend(nat.iter().filter(|c| is_service_chain(c)).cloned());

    let filter_chains: Vec<String> = [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
        KUBE_PROXY_CANARY,
    ]
    .into_iter()
    .filter(|c| filter.contains(*c))
    .map(String::from)
    .collect();

    Ok(CleanupPlan {
        delete_jumps: KUBE_PROXY_JUMPS.to_vec(),
        nat_restore: flush_and_delete("nat", &nat_chains),
        filter_restore: flush_and_delete("filter", &filter_chains),
        delete_chain: ("mangle", KUBE_PROXY_CANARY),
    })
}
