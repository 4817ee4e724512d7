//! PLACEHOLDER for branch `ipvs-render` (the pure IPVS renderer). Only the agreed interface,
//! so the kernel side (`proxier`) compiles before the merge; replaced by the real module then.
#![allow(missing_docs)]

pub mod proxier;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::backend::iptables::JumpRule;
pub use crate::backend::iptables::LocalDetector;
use crate::kernel::ipvs::{RealServer, VirtualService};
use crate::model::{Cidr, ProxyModel, ServiceName};

#[derive(Debug, Clone, Default)]
pub struct IpvsConfig {
    pub scheduler: String,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub local_detector: LocalDetector,
    pub node_ips: Vec<IpAddr>,
    pub exclude_cidrs: Vec<Cidr>,
    pub strict_arp: bool,
    pub random_fully: bool,
}

#[derive(Debug, Clone)]
pub struct DesiredService {
    pub vs: VirtualService,
    pub dests: Vec<RealServer>,
    pub local_only: bool,
}

#[derive(Debug, Clone)]
pub struct IpSetSpec {
    pub name: String,
    pub set_type: String,
    pub comment: String,
    pub entries: BTreeSet<String>,
}

impl IpSetSpec {
    pub fn create_options(&self) -> String {
        if self.set_type == "bitmap:port" {
            "range 0-65535".into()
        } else {
            "family inet hashsize 1024 maxelem 65536".into()
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct IpvsDesired {
    pub services: Vec<DesiredService>,
    pub bound_addrs: BTreeSet<IpAddr>,
    pub ipsets: Vec<IpSetSpec>,
    pub iptables_restore: String,
    pub filter_rules: usize,
    pub nat_rules: usize,
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
    pub health_checks: BTreeMap<ServiceName, (u16, usize)>,
}

pub fn render(_model: &ProxyModel, _cfg: &IpvsConfig) -> IpvsDesired {
    IpvsDesired::default()
}

pub fn ipvs_jump_rules() -> Vec<JumpRule> {
    Vec::new()
}
