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

pub use super::net::IpFamily;
use super::{Cidr, Endpoint, ProxyModel, ServiceName, ServicePort, categorize_endpoints};

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
    plan_where(model, family, opts, |_| true)
}

/// Plans only the service ports of `family` that `wanted` selects (a partial sync's changed
/// services): the same decisions as [`plan`], at the cost of the ports selected (health checks
/// still cover every service).
pub fn plan_where<'a>(
    model: &'a ProxyModel,
    family: IpFamily,
    opts: &PlanOptions,
    wanted: impl Fn(&ServicePort) -> bool,
) -> Plan<'a> {
    let health_checks = model.health_checks();
    let services = model
        .services
        .values()
        .filter(|svc| family.matches(&svc.cluster_ip) && wanted(svc))
        .map(|svc| plan_port(model, svc, family, opts, &health_checks))
        .collect();
    Plan {
        family,
        services,
        health_checks,
    }
}

/// Plans one service port of `family` (the caller filters by family): what [`plan`] does
/// for each, for renderers that re-plan only the changed services.
pub fn plan_port<'a>(
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

/// How ClusterIP traffic is masqueraded under `opts`: the same for every service port, so a
/// backend that writes one node-wide rule (IPVS' cluster-IP ipset) asks here.
pub fn cluster_ip_masquerade(opts: &PlanOptions) -> ClusterIpMasquerade {
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

/// Traffic-policy tests, written once against the plan; each backend's golden tests check
/// only how it serialises these decisions.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName, ServiceType, SourceRanges};

    fn name() -> ServicePortName {
        ServicePortName::new("ns", "svc", "p80", Protocol::Tcp)
    }

    fn svc() -> ServicePort {
        ServicePort::basic(name(), "172.30.0.1".parse().unwrap(), 80)
    }

    /// A LoadBalancer with a node port and one LB IP.
    fn lb(etp_local: bool) -> ServicePort {
        let mut s = svc();
        s.service_type = ServiceType::LoadBalancer;
        s.node_port = 30080;
        s.load_balancer_ips = vec!["1.2.3.4".parse().unwrap()];
        s.external_policy_local = etp_local;
        s.health_check_node_port = if etp_local { 30000 } else { 0 };
        s
    }

    fn ep(ip: &str, local: bool) -> Endpoint {
        let mut e = Endpoint::ready(ip.parse().unwrap(), 80);
        e.is_local = local;
        e
    }

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        eps.iter().map(Endpoint::addr_string).collect()
    }

    fn plan_one(s: ServicePort, eps: Vec<Endpoint>, opts: &PlanOptions) -> ServicePlan<'static> {
        let m = ProxyModel::for_tests("node1", vec![s], vec![(name(), eps)]);
        let m: &'static ProxyModel = Box::leak(Box::new(m));
        let mut p = plan(m, IpFamily::V4, opts);
        assert_eq!(p.services.len(), 1);
        p.services.remove(0)
    }

    use Disposition::{Drop, Reject, Serve};
    use Reason::{NoEndpoints, NoLocalEndpoints};

    #[test]
    fn no_endpoints_anywhere_rejects_internal_and_external_traffic() {
        for (itp, etp) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut s = lb(etp);
            s.internal_policy_local = itp;
            // Not ready and not serving-terminating: unusable.
            let mut dead = ep("10.0.0.1", true);
            dead.ready = false;
            let p = plan_one(s, vec![dead], &PlanOptions::default());
            assert!(!p.has_endpoints);
            assert_eq!(p.internal, Reject(NoEndpoints), "itp {itp} etp {etp}");
            assert_eq!(p.external, Reject(NoEndpoints), "itp {itp} etp {etp}");
            assert_eq!(NoEndpoints.describe(), "has no endpoints");
        }
    }

    #[test]
    fn cluster_policies_serve_every_endpoint() {
        let p = plan_one(
            lb(false),
            vec![ep("10.0.0.1", false), ep("10.0.0.2", true)],
            &PlanOptions::default(),
        );
        assert_eq!(p.internal, Serve(Policy::Cluster));
        assert_eq!(p.external, Serve(Policy::Cluster));
        assert_eq!(addrs(&p.cluster), ["10.0.0.1:80", "10.0.0.2:80"]);
        assert!(p.local.is_empty());
        assert_eq!(p.external_masquerade, ExternalMasquerade::All);
        assert!(p.health_check.is_none());
    }

    /// eTP=Local without a local endpoint: external traffic is dropped (a load balancer's
    /// health check moves it elsewhere), cluster traffic still served, and the cluster
    /// endpoints stay planned for the short-circuit of host and pod traffic.
    #[test]
    fn external_local_without_local_endpoints_drops_only_external_traffic() {
        let p = plan_one(
            lb(true),
            vec![ep("10.0.0.1", false)],
            &PlanOptions::default(),
        );
        assert_eq!(p.internal, Serve(Policy::Cluster));
        assert_eq!(p.external, Drop(NoLocalEndpoints));
        assert!(p.external.lacks_local_endpoints() && !p.internal.lacks_local_endpoints());
        assert_eq!(addrs(&p.cluster), ["10.0.0.1:80"]);
        assert!(p.local.is_empty());
        assert_eq!(
            p.health_check,
            Some(HealthCheck {
                node_port: 30000,
                local_endpoints: 0
            })
        );

        let p = plan_one(
            lb(true),
            vec![ep("10.0.0.1", false), ep("10.0.0.2", true)],
            &PlanOptions::default(),
        );
        assert_eq!(p.external, Serve(Policy::Local));
        assert_eq!(addrs(&p.local), ["10.0.0.2:80"]);
        assert_eq!(p.health_check.map(|h| h.local_endpoints), Some(1));
    }

    #[test]
    fn internal_local_without_local_endpoints_drops_cluster_ip_traffic() {
        let mut s = svc();
        s.internal_policy_local = true;
        let p = plan_one(
            s.clone(),
            vec![ep("10.0.0.1", false)],
            &PlanOptions::default(),
        );
        assert_eq!(p.internal, Drop(NoLocalEndpoints));
        assert_eq!(NoLocalEndpoints.describe(), "has no local endpoints");
        // Not externally accessible: no cluster endpoints are needed at all.
        assert!(p.cluster.is_empty() && p.reachable.is_empty());

        let p = plan_one(
            s,
            vec![ep("10.0.0.1", false), ep("10.0.0.2", true)],
            &PlanOptions::default(),
        );
        assert_eq!(p.internal, Serve(Policy::Local));
        assert_eq!(addrs(&p.reachable), ["10.0.0.2:80"]);
    }

    /// Upstream `UsesClusterEndpoints`: both policies Local on an externally accessible
    /// port still plan the cluster endpoints (the EXT chain short-circuits to them).
    #[test]
    fn both_policies_local_keep_cluster_endpoints_for_short_circuiting() {
        let mut s = lb(true);
        s.internal_policy_local = true;
        let p = plan_one(
            s,
            vec![ep("10.0.0.1", false), ep("10.0.0.2", true)],
            &PlanOptions::default(),
        );
        assert_eq!(p.internal, Serve(Policy::Local));
        assert_eq!(p.external, Serve(Policy::Local));
        assert_eq!(addrs(&p.cluster), ["10.0.0.1:80", "10.0.0.2:80"]);
        assert_eq!(addrs(&p.local), ["10.0.0.2:80"]);
    }

    #[test]
    fn local_serving_terminating_endpoint_serves_local_traffic() {
        let mut term = ep("10.0.0.2", true);
        term.ready = false;
        term.terminating = true;
        let p = plan_one(
            lb(true),
            vec![ep("10.0.0.1", false), term],
            &PlanOptions::default(),
        );
        assert_eq!(p.external, Serve(Policy::Local));
        assert_eq!(addrs(&p.local), ["10.0.0.2:80"]);
        assert_eq!(addrs(&p.reachable), ["10.0.0.1:80", "10.0.0.2:80"]);
    }

    #[test]
    fn masquerade_follows_flags_detector_and_external_policy() {
        let opts = |masquerade_all, detects_local_pods| PlanOptions {
            masquerade_all,
            detects_local_pods,
            primary_node_ip: None,
        };
        let eps = || vec![ep("10.0.0.1", false)];
        let p = plan_one(lb(true), eps(), &opts(true, true));
        assert_eq!(p.cluster_ip_masquerade, ClusterIpMasquerade::All);
        assert_eq!(
            p.external_masquerade,
            ExternalMasquerade::HostSourcesOnly {
                short_circuit_pods: true
            }
        );
        let p = plan_one(lb(true), eps(), &opts(false, true));
        assert_eq!(
            p.cluster_ip_masquerade,
            ClusterIpMasquerade::NonLocalSources
        );
        let p = plan_one(lb(true), eps(), &opts(false, false));
        assert_eq!(p.cluster_ip_masquerade, ClusterIpMasquerade::None);
        assert_eq!(
            p.external_masquerade,
            ExternalMasquerade::HostSourcesOnly {
                short_circuit_pods: false
            }
        );
    }

    #[test]
    fn firewall_admits_the_node_only_when_a_range_holds_its_ip() {
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let node = |ip: &str| PlanOptions {
            primary_node_ip: Some(ip.parse().unwrap()),
            ..PlanOptions::default()
        };
        let mut s = lb(false);
        s.source_ranges = SourceRanges::Only(vec![cidr("10.9.0.0/16"), cidr("192.168.0.0/24")]);
        let eps = || vec![ep("10.0.0.1", false)];
        let p = plan_one(s.clone(), eps(), &node("192.168.0.7"));
        assert_eq!(
            p.firewall,
            Some(Firewall {
                allowed: vec![cidr("10.9.0.0/16"), cidr("192.168.0.0/24")],
                allow_from_node: true
            })
        );
        let p = plan_one(s.clone(), eps(), &node("10.1.0.7"));
        assert_eq!(p.firewall.map(|f| f.allow_from_node), Some(false));

        // Every range unreadable: a firewall admitting nothing (fail closed).
        s.source_ranges = SourceRanges::Only(Vec::new());
        let p = plan_one(s.clone(), eps(), &node("10.1.0.7"));
        assert_eq!(p.firewall.map(|f| f.allowed), Some(Vec::new()));
        // No LB IPs, or no ranges: no firewall.
        s.load_balancer_ips.clear();
        assert!(
            plan_one(s.clone(), eps(), &node("10.1.0.7"))
                .firewall
                .is_none()
        );
        let p = plan_one(lb(false), eps(), &node("10.1.0.7"));
        assert!(p.firewall.is_none());
    }

    #[test]
    fn plan_keeps_only_its_family() {
        let v6 = ServicePortName::new("ns", "v6", "p80", Protocol::Tcp);
        let mut s4 = lb(false);
        s4.external_ips = vec!["5.6.7.8".parse().unwrap(), "fd00::5".parse().unwrap()];
        let s6 = ServicePort::basic(v6.clone(), "fd00::10".parse().unwrap(), 80);
        let m = ProxyModel::for_tests(
            "node1",
            vec![s4, s6],
            vec![
                (name(), vec![ep("10.0.0.1", false), ep("fd00:1::1", false)]),
                (v6.clone(), vec![ep("fd00:1::2", true)]),
            ],
        );
        let p4 = plan(&m, IpFamily::V4, &PlanOptions::default());
        assert_eq!(p4.services.len(), 1);
        let sp = &p4.services[0];
        assert_eq!(addrs(&sp.endpoints), ["10.0.0.1:80"]);
        assert_eq!(addrs(&sp.reachable), ["10.0.0.1:80"]);
        assert_eq!(sp.external_ips, ["5.6.7.8".parse::<IpAddr>().unwrap()]);
        assert_eq!(p4.endpoint_count(), 1);

        let p6 = plan(&m, IpFamily::V6, &PlanOptions::default());
        assert_eq!(p6.services.len(), 1);
        assert_eq!(p6.services[0].service.name, v6);
        assert_eq!(addrs(&p6.services[0].reachable), ["[fd00:1::2]:80"]);
    }
}
