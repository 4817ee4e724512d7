//! What a backend needs of one service port and its endpoints: plain data, no API objects.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use super::net::{Cidr, Protocol};

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceName {
    /// Builds a name from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service: upstream's `ServicePortName` (namespace, name, port name, protocol).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// The owning Service.
    pub service: ServiceName,
    /// The port's name, empty for a single unnamed port.
    pub port: String,
    /// The port's protocol.
    pub protocol: Protocol,
}

impl ServicePortName {
    /// Builds a port name from its parts.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        port: impl Into<String>,
        protocol: Protocol,
    ) -> Self {
        ServicePortName {
            service: ServiceName::new(namespace, name),
            port: port.into(),
            protocol,
        }
    }
}

/// Upstream's `ServicePortName.String()`: `ns/name` plus `:port` when the port is named.
/// The protocol is not part of it (it is appended, lower case, only for chain-name hashing).
impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// The Service `type` values that produce rules (ExternalName services never reach the model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum ServiceType {
    /// ClusterIP.
    #[default]
    ClusterIp,
    /// NodePort.
    NodePort,
    /// LoadBalancer.
    LoadBalancer,
}

/// Who may reach a service's load-balancer IPs, decided once from
/// `spec.loadBalancerSourceRanges` (upstream `newBaseServiceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SourceRanges {
    /// Anyone: no ranges of this family, or a zero-length one (`0.0.0.0/0`), as upstream.
    #[default]
    Any,
    /// Only these sources. Empty when every range was unreadable: the firewall then admits
    /// nothing (fail closed) rather than opening the load balancer to everyone.
    Only(Vec<Cidr>),
}

impl SourceRanges {
    /// Whether traffic to the load-balancer IPs must pass a source firewall.
    pub fn restricts(&self) -> bool {
        matches!(self, SourceRanges::Only(_))
    }

    /// The admitted source ranges (none for [`SourceRanges::Any`], which needs no firewall).
    pub fn allowed(&self) -> &[Cidr] {
        match self {
            SourceRanges::Any => &[],
            SourceRanges::Only(v) => v,
        }
    }
}

/// One service port as a backend programs it, for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Identity of the port.
    pub name: ServicePortName,
    /// Service type.
    pub service_type: ServiceType,
    /// The cluster IP of this family.
    pub cluster_ip: IpAddr,
    /// The service port.
    pub port: u16,
    /// The allocated node port, 0 if none.
    pub node_port: u16,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of this family (ipMode Proxy excluded).
    pub load_balancer_ips: Vec<IpAddr>,
    /// Who may reach the load-balancer IPs (`spec.loadBalancerSourceRanges` of this family).
    pub source_ranges: SourceRanges,
    /// ClientIP affinity timeout in seconds; `None` without affinity.
    pub session_affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local` on an externally accessible service.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    /// `spec.healthCheckNodePort`, 0 if none.
    pub health_check_node_port: u16,
}

impl ServicePort {
    /// Upstream `ExternallyAccessible`: it has a node port, external IPs or LB IPs.
    pub fn externally_accessible(&self) -> bool {
        self.node_port != 0 || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }

    /// Upstream `HealthCheckNodePort()`: only LoadBalancer services with eTP=Local have one.
    pub fn health_check_port(&self) -> Option<u16> {
        (self.service_type == ServiceType::LoadBalancer
            && self.external_policy_local
            && self.health_check_node_port != 0)
            .then_some(self.health_check_node_port)
    }

    /// Upstream `UsesClusterEndpoints`: even with an external Local policy, external traffic
    /// from local sources short-circuits to the cluster-wide chain.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Upstream `UsesLocalEndpoints`.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.externally_accessible() && self.external_policy_local)
    }

    /// A ClusterIP port with no extras; tests and fixtures fill in the rest.
    pub fn basic(name: ServicePortName, cluster_ip: IpAddr, port: u16) -> Self {
        ServicePort {
            name,
            service_type: ServiceType::ClusterIp,
            cluster_ip,
            port,
            node_port: 0,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            source_ranges: SourceRanges::Any,
            session_affinity_timeout: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: 0,
        }
    }
}

/// One endpoint of a service port, with the conditions from its EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Endpoint address (the first of the slice endpoint's addresses).
    pub ip: IpAddr,
    /// Target port.
    pub port: u16,
    /// `conditions.ready` (nil counts as true).
    pub ready: bool,
    /// `conditions.serving` (nil counts as true).
    pub serving: bool,
    /// `conditions.terminating` (nil counts as false).
    pub terminating: bool,
    /// Whether `nodeName` is this node.
    pub is_local: bool,
    /// Zone and hints, when the slice sets any: boxed, as most endpoints have none and an
    /// endpoint is stored twice per service port (state store and model).
    pub topology: Option<Box<Topology>>,
}

/// An endpoint's topology data from its EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// `zone`, if set.
    pub zone: Option<String>,
    /// `hints.forZones`, if set.
    pub zone_hints: Option<BTreeSet<String>>,
    /// `hints.forNodes`, if set.
    pub node_hints: Option<BTreeSet<String>>,
}

impl Endpoint {
    /// A ready, non-terminating, remote endpoint with no topology data.
    pub fn ready(ip: IpAddr, port: u16) -> Self {
        Endpoint {
            ip,
            port,
            ready: true,
            serving: true,
            terminating: false,
            is_local: false,
            topology: None,
        }
    }

    /// `hints.forZones`, if set.
    pub fn zone_hints(&self) -> Option<&BTreeSet<String>> {
        self.topology.as_ref()?.zone_hints.as_ref()
    }

    /// `hints.forNodes`, if set.
    pub fn node_hints(&self) -> Option<&BTreeSet<String>> {
        self.topology.as_ref()?.node_hints.as_ref()
    }

    /// Upstream `Endpoint.String()`: `ip:port`, IPv6 in brackets.
    pub fn addr_string(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }
}
