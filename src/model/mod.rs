//! The desired state: what this node should program, as pure data.
//!
//! The watch layer feeds API objects through [`convert`] into a [`ClusterState`]; backends
//! read a [`ProxyModel`] snapshot and never see API objects.

pub mod categorize;
pub mod convert;
pub mod net;
pub mod plan;
pub mod service;
pub mod state;
pub mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

pub use categorize::{Categorized, categorize_endpoints};
pub use net::{Cidr, IpFamily, Protocol};
pub use plan::{Plan, PlanOptions, ServicePlan, plan};
pub use service::{
    Endpoint, ServiceName, ServicePort, ServicePortName, ServiceType, SourceRanges, Topology,
};
pub use state::ClusterState;

/// The label carrying a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the proxy knows of its own Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node name this proxy runs as (`--hostname-override` or the hostname).
    pub name: String,
    /// The Node's labels (topology zone in particular).
    pub labels: BTreeMap<String, String>,
    /// `status.addresses` of type InternalIP, then those of type ExternalIP (each in document
    /// order), as upstream's `GetNodeHostIPs` orders them.
    pub ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (for detect-local-mode NodeCIDR).
    pub pod_cidrs: Vec<Cidr>,
    /// Whether the Node object was seen at all.
    pub present: bool,
    /// The Node has a deletionTimestamp.
    pub deleting: bool,
    /// The Node carries the `ToBeDeletedByClusterAutoscaler` taint.
    pub to_be_deleted: bool,
}

impl NodeInfo {
    /// The node's zone label, if any.
    pub fn zone(&self) -> Option<&str> {
        self.labels.get(ZONE_LABEL).map(String::as_str)
    }
}

/// A snapshot of everything a backend programs for one IP family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyModel {
    /// Service ports by name.
    pub services: BTreeMap<ServicePortName, ServicePort>,
    /// Endpoints by service port, sorted by `ip:port` string and de-duplicated, as upstream's
    /// EndpointSliceCache does. A port with no entry has no endpoints.
    pub endpoints: BTreeMap<ServicePortName, Vec<Endpoint>>,
    /// This node.
    pub node: NodeInfo,
    /// The CIDRs of every ServiceCIDR object that are of this family, sorted (addresses in
    /// them that are no ClusterIP are dropped in nftables mode).
    pub service_cidrs: Vec<Cidr>,
}

impl ProxyModel {
    /// Endpoints of one service port (empty if none).
    pub fn endpoints_of(&self, name: &ServicePortName) -> &[Endpoint] {
        self.endpoints.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Health-check node ports of eTP=Local LoadBalancer services, with upstream's
    /// `LocalReadyEndpoints` count: distinct local, ready endpoint IPs over all the service's
    /// ports. One pass over the endpoints, whatever the number of services.
    pub fn health_checks(&self) -> BTreeMap<ServiceName, (u16, usize)> {
        let ports: BTreeMap<&ServiceName, u16> = self
            .services
            .values()
            .filter_map(|svc| svc.health_check_port().map(|p| (&svc.name.service, p)))
            .collect();
        if ports.is_empty() {
            return BTreeMap::new();
        }
        let mut ips: BTreeMap<&ServiceName, BTreeSet<IpAddr>> = BTreeMap::new();
        for (name, eps) in &self.endpoints {
            if ports.contains_key(&name.service) {
                ips.entry(&name.service)
                    .or_default()
                    .extend(eps.iter().filter(|e| e.is_local && e.ready).map(|e| e.ip));
            }
        }
        ports
            .into_iter()
            .map(|(svc, port)| (svc.clone(), (port, ips.get(svc).map_or(0, BTreeSet::len))))
            .collect()
    }

    /// Total number of endpoints over all service ports (drives large-cluster mode).
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
impl ProxyModel {
    /// A model as the watch layer builds it (endpoints sorted by `ip:port` and de-duplicated)
    /// for the present node `node`: the fixture of the backends' golden tests.
    pub(crate) fn for_tests(
        node: &str,
        services: Vec<ServicePort>,
        endpoints: Vec<(ServicePortName, Vec<Endpoint>)>,
    ) -> Self {
        let mut m = ProxyModel {
            node: NodeInfo {
                name: node.into(),
                present: true,
                ..NodeInfo::default()
            },
            ..ProxyModel::default()
        };
        for s in services {
            m.services.insert(s.name.clone(), s);
        }
        for (name, mut eps) in endpoints {
            eps.sort_by_key(Endpoint::addr_string);
            eps.dedup_by_key(|e| e.addr_string());
            m.endpoints.insert(name, eps);
        }
        m
    }
}
