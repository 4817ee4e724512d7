//! Local-traffic matches: how traffic from this node's pods is recognised, as iptables
//! arguments both the iptables and the IPVS rulesets use.

use crate::model::Cidr;

/// How traffic from local pods is recognised (`--detect-local-mode`); upstream
/// `LocalTrafficDetector`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LocalDetector {
    /// No detection: no `! -s` masquerade rule, no pod short-circuit in KUBE-EXT chains.
    #[default]
    None,
    /// ClusterCIDR or NodeCIDR mode: the one pod CIDR of this family (`-s CIDR`).
    Cidr(Cidr),
    /// BridgeInterface mode (`-i bridge`).
    BridgeInterface(String),
    /// InterfaceNamePrefix mode (`-i prefix+`).
    InterfaceNamePrefix(String),
}

impl LocalDetector {
    /// Whether the detector emits anything (upstream `IsImplemented`).
    pub fn is_implemented(&self) -> bool {
        !matches!(self, LocalDetector::None)
    }

    /// Match arguments for traffic from local pods.
    pub fn if_local(&self) -> Vec<String> {
        match self {
            LocalDetector::None => Vec::new(),
            LocalDetector::Cidr(c) => vec!["-s".into(), c.to_string()],
            LocalDetector::BridgeInterface(i) => vec!["-i".into(), i.clone()],
            LocalDetector::InterfaceNamePrefix(p) => vec!["-i".into(), format!("{p}+")],
        }
    }

    /// Match arguments for traffic not from local pods.
    pub fn if_not_local(&self) -> Vec<String> {
        let mut args = self.if_local();
        if !args.is_empty() {
            args.insert(0, "!".into());
        }
        args
    }
}
