//! The per-family plan: for each service port and IP family, every traffic-policy decision a
//! backend needs, made once here. Renderers serialise a [`Plan`]; none re-derives a policy.
//!
//! Upstream makes these decisions inside each proxier's `syncProxyRules` (iptables: the
//! `hasInternalEndpoints`/`hasExternalEndpoints` block, REJECT vs DROP, the EXT-chain
//! masquerade rules, the firewall's `allowFromNode`; IPVS: `syncEndpoint`'s Local fallback),
//! all on top of `CategorizeEndpoints` ([`categorize_endpoints`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{Cidr, Endpoint, ProxyModel, ServiceName, ServicePort, categorize_endpoints};

/// An IP family. Only IPv4 is programmed today; the plan filters by it so that a dual-stack
/// model yields one plan per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum IpFamily {
    /// IPv4.
    #[default]
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// Whether `ip` belongs to this family.
    pub fn matches(self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self
    }
}

/// Which endpoint set served traffic goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Every usable endpoint in the cluster ([`ServicePlan::cluster`]).
    Cluster,
    /// Only this node's endpoints ([`ServicePlan::local`]).
    Local,
}

/// Why traffic is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No usable endpoint anywhere in the cluster.
    NoEndpoints,
    /// A Local policy, endpoints elsewhere but none on this node.
    NoLocalEndpoints,
}

impl Reason {
    /// The words upstream puts after the service name in the rule comment.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::NoEndpoints => "has no endpoints",
            Reason::NoLocalEndpoints => "has no local endpoints",
        }
    }
}

/// What happens to one kind of traffic (internal: to the ClusterIP; external: to node ports,
/// external IPs and load-balancer IPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Sent to the endpoints of this policy.
    Serve(Policy),
    /// Refused actively (ICMP reject), so clients fail fast: nothing could ever answer.
    Reject(Reason),
    /// Dropped silently: the service works elsewhere, and a load balancer's health check
    /// (or the client's retry) should move the traffic there.
    Drop(Reason),
}

impl Disposition {
    /// Upstream's rule: no endpoints at all rejects; a Local policy with no local endpoint
    /// drops; otherwise the policy's endpoints serve.
    fn decide(policy_local: bool, has_endpoints: bool, has_local: bool) -> Self {
        if !has_endpoints {
            Disposition::Reject(Reason::NoEndpoints)
        } else if !policy_local {
            Disposition::Serve(Policy::Cluster)
        } else if has_local {
            Disposition::Serve(Policy::Local)
        } else {
            Disposition::Drop(Reason::NoLocalEndpoints)
        }
    }

    /// The policy whose endpoints serve, if traffic is served.
    pub fn served_by(self) -> Option<Policy> {
        match self {
            Disposition::Serve(p) => Some(p),
            Disposition::Reject(_) | Disposition::Drop(_) => None,
        }
    }

    /// Whether a Local policy left this traffic without local endpoints while endpoints
    /// exist elsewhere (the `sync_proxy_rules_no_local_endpoints_total` condition).
    pub fn lacks_local_endpoints(self) -> bool {
        matches!(self, Disposition::Drop(Reason::NoLocalEndpoints))
    }
}

/// How ClusterIP traffic is masqueraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterIpMasquerade {
    /// `--masquerade-all`: every packet.
    All,
    /// Packets not from local pods (needs a local-traffic detector): off-node clients must
    /// see replies come back through this node.
    NonLocalSources,
    /// Nothing (no detector, no `--masquerade-all`).
    None,
}

/// How traffic to external destinations (node ports, external IPs, LB IPs) is masqueraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalMasquerade {
    /// externalTrafficPolicy Cluster: every packet (the endpoint may be on another node).
    All,
    /// externalTrafficPolicy Local: the client source is kept. Only traffic from the host
    /// itself is masqueraded, and it short-circuits to the cluster endpoints, as does traffic
    /// from local pods when they can be recognised (`short_circuit_pods`).
    HostSourcesOnly {
        /// A local-traffic detector exists, so pod traffic can be sent to the cluster
        /// endpoints.
        short_circuit_pods: bool,
    },
}

/// The source firewall of a service's load-balancer IPs (`loadBalancerSourceRanges`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    /// Admitted sources of this family; empty admits nothing (fail closed).
    pub allowed: Vec<Cidr>,
    /// A range holds the primary node IP, so traffic sourced from the LB IPs themselves is
    /// admitted too (upstream `allowFromNode`: the node reaching its own LB).
    pub allow_from_node: bool,
}

/// An eTP=Local LoadBalancer's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// `spec.healthCheckNodePort`.
    pub node_port: u16,
    /// Upstream `LocalReadyEndpoints`: distinct local ready endpoint IPs over every port of
    /// the service.
    pub local_endpoints: usize,
}

/// Everything a backend needs to program one service port for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan<'a> {
    /// The service port (name, ports, affinity, type).
    pub service: &'a ServicePort,
    /// Every endpoint of this family, in the model's order, whatever its state (hairpin
    /// sets, large-cluster counting).
    pub endpoints: Cow<'a, [Endpoint]>,
    /// Endpoints for Cluster-policy traffic (ready ones, topology applied, else serving
    /// terminating ones); empty when the port uses none.
    pub cluster: Vec<Endpoint>,
    /// This node's endpoints for Local-policy traffic (ready, else serving terminating);
    /// empty when the port uses none.
    pub local: Vec<Endpoint>,
    /// Union of `cluster` and `local`: every endpoint this node may send to.
    pub reachable: Vec<Endpoint>,
    /// Whether any usable endpoint exists anywhere in the cluster.
    pub has_endpoints: bool,
    /// Traffic to the ClusterIP.
    pub internal: Disposition,
    /// Traffic to node ports, external IPs and load-balancer IPs.
    pub external: Disposition,
    /// `spec.externalIPs` of this family.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs of this family.
    pub load_balancer_ips: Vec<IpAddr>,
    /// ClusterIP masquerading.
    pub cluster_ip_masquerade: ClusterIpMasquerade,
    /// External-destination masquerading.
    pub external_masquerade: ExternalMasquerade,
    /// The load-balancer source firewall, when the service has LB IPs and source ranges.
    pub firewall: Option<Firewall>,
    /// The node port, if allocated.
    pub node_port: Option<u16>,
    /// The health check, for eTP=Local LoadBalancers.
    pub health_check: Option<HealthCheck>,
}

impl ServicePlan<'_> {
    /// Upstream `ExternallyAccessible`, for this family: a node port, external IPs or LB IPs.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// Settings the plan's decisions depend on (flags and this sync's node facts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// A local-traffic detector is configured (upstream `LocalTrafficDetector.IsImplemented`).
    pub detects_local_pods: bool,
    /// The primary node IP of this family (upstream `nodeIP`).
    pub primary_node_ip: Option<IpAddr>,
}

/// The plan of one sync for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    /// The family planned.
    pub family: IpFamily,
    /// One entry per service port of this family, in service-port-name order.
    pub services: Vec<ServicePlan<'a>>,
    /// Health-check node port and local endpoint count per eTP=Local LoadBalancer service
    /// (what the health-check servers serve).
    pub health_checks: BTreeMap<ServiceName, (u16, usize)>,
}

impl Plan<'_> {
    /// Endpoints of this family over all service ports (drives large-cluster mode).
    pub fn endpoint_count(&self) -> usize {
        self.services.iter().map(|s| s.endpoints.len()).sum()
    }
}

/// Plans `model` for `family`: pure, one pass over the service ports.
pub fn plan<'a>(model: &'a ProxyModel, family: IpFamily, opts: &PlanOptions) -> Plan<'a> {
    let health_checks = model.health_checks();
    let services = model
        .services
        .values()
        .filter(|svc| family.matches(&svc.cluster_ip))
        .map(|svc| plan_port(model, svc, family, opts, &health_checks))
        .collect();
    Plan {
        family,
        services,
        health_checks,
    }
}

fn plan_port<'a>(
    model: &'a ProxyModel,
    svc: &'a ServicePort,
    family: IpFamily,
    opts: &PlanOptions,
    health_checks: &BTreeMap<ServiceName, (u16, usize)>,
) -> ServicePlan<'a> {
    let endpoints = of_family(model.endpoints_of(&svc.name), family);
    let cat = categorize_endpoints(svc, &endpoints, &model.node);
    let has_local = !cat.local.is_empty();
    let load_balancer_ips = ips_of(&svc.load_balancer_ips, family);
    let firewall = (!load_balancer_ips.is_empty() && svc.source_ranges.restricts())
        .then(|| firewall(svc, family, opts.primary_node_ip));
    ServicePlan {
        service: svc,
        internal: Disposition::decide(svc.internal_policy_local, cat.has_any, has_local),
        external: Disposition::decide(svc.external_policy_local, cat.has_any, has_local),
        has_endpoints: cat.has_any,
        cluster: cat.cluster,
        local: cat.local,
        reachable: cat.all_reachable,
        endpoints,
        external_ips: ips_of(&svc.external_ips, family),
        load_balancer_ips,
        cluster_ip_masquerade: cluster_ip_masquerade(opts),
        external_masquerade: if svc.external_policy_local {
            ExternalMasquerade::HostSourcesOnly {
                short_circuit_pods: opts.detects_local_pods,
            }
        } else {
            ExternalMasquerade::All
        },
        firewall,
        node_port: (svc.node_port != 0).then_some(svc.node_port),
        health_check: svc.health_check_port().map(|node_port| HealthCheck {
            node_port,
            local_endpoints: health_checks.get(&svc.name.service).map_or(0, |(_, n)| *n),
        }),
    }
}

/// Borrows the endpoints when they are all of `family` (the usual, single-stack case).
fn of_family(endpoints: &[Endpoint], family: IpFamily) -> Cow<'_, [Endpoint]> {
    if endpoints.iter().all(|e| family.matches(&e.ip)) {
        Cow::Borrowed(endpoints)
    } else {
        Cow::Owned(
            endpoints
                .iter()
                .filter(|e| family.matches(&e.ip))
                .cloned()
                .collect(),
        )
    }
}

fn ips_of(ips: &[IpAddr], family: IpFamily) -> Vec<IpAddr> {
    ips.iter()
        .copied()
        .filter(|ip| family.matches(ip))
        .collect()
}

fn cluster_ip_masquerade(opts: &PlanOptions) -> ClusterIpMasquerade {
    if opts.masquerade_all {
        ClusterIpMasquerade::All
    } else if opts.detects_local_pods {
        ClusterIpMasquerade::NonLocalSources
    } else {
        ClusterIpMasquerade::None
    }
}

fn firewall(svc: &ServicePort, family: IpFamily, node_ip: Option<IpAddr>) -> Firewall {
    let allowed: Vec<Cidr> = svc
        .source_ranges
        .allowed()
        .iter()
        .filter(|c| family.matches(&c.addr()))
        .copied()
        .collect();
    let allow_from_node = node_ip.is_some_and(|ip| allowed.iter().any(|c| c.contains(&ip)));
    Firewall {
        allowed,
        allow_from_node,
    }
}
