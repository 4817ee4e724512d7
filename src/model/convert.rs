//! Converts API objects into model data, the way upstream's change trackers do.
//!
//! Bad input never aborts: each problem becomes a warning naming the object, and only the
//! offending part (a port, an endpoint, a source range, or the whole object when nothing
//! usable remains) is skipped. A name that breaks the API server's rules skips the whole
//! object with one warning: names are written into the ruleset (comments, hashed chain
//! names), so only names the API server would accept may reach it. Addresses are read
//! leniently, as upstream's `netutils.ParseIPSloppy` does (leading zeros are decimal), so
//! values stored by older releases keep working. Both IP families are converted: a Service
//! yields one [`ServicePort`] per port and per family it has a cluster IP of (upstream's
//! per-family change trackers), each carrying only that family's addresses and ranges.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::net::{Cidr, Protocol};
use super::service::{
    Endpoint, ServiceName, ServicePort, ServicePortName, ServiceType, SourceRanges, Topology,
};
use super::validate::{NameError, Shown, dns1123_label, dns1123_subdomain};
use super::{IpFamily, NodeInfo};
use crate::config::netutil::{parse_cidr_sloppy, parse_ip_sloppy};

/// Label that hands a Service to another proxy; upstream ignores such Services.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking a headless Service; upstream ignores such Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label of an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Upstream's label selector for Services.
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// The ports of one Service that this proxy programs, or nothing if it is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedService {
    /// The Service's name.
    pub name: ServiceName,
    /// Its usable ports, IPv4 ones first, then IPv6 ones (one per port and family with a
    /// cluster IP); empty when the Service produces no rules (headless, ExternalName, no
    /// cluster IP, or every port invalid).
    pub ports: Vec<ServicePort>,
}

/// One name check: what the value is, the value, and the API server's rule for it.
type NameCheck<'a> = (&'a str, &'a str, fn(&str) -> Result<(), NameError>);

/// Checks the names an object writes into the ruleset; `Err` is the one warning that skips it.
/// `names` are checked in the order the API server checks them.
fn check_names(kind: &str, namespace: &str, name: &str, names: &[NameCheck]) -> Result<(), String> {
    for (what, value, rule) in names {
        if let Err(e) = rule(value) {
            return Err(format!(
                "{kind} {}/{}: {what} {} {e}, skipped",
                Shown(namespace),
                Shown(name),
                Shown(value)
            ));
        }
    }
    Ok(())
}

/// Validates a Service's namespace, name and port names. Service names are DNS-1035 labels
/// in the API, or DNS-1123 labels with `RelaxedServiceNameValidation`; the latter is the
/// superset, so no name the API server accepts is refused.
fn check_service_names(svc: &Service, namespace: &str, name: &str) -> Result<(), String> {
    let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten());
    let port_names = ports
        .filter_map(|p| p.name.as_deref())
        .filter(|n| !n.is_empty());
    let mut checks: Vec<NameCheck> = vec![
        ("namespace", namespace, dns1123_label),
        ("name", name, dns1123_label),
    ];
    checks.extend(port_names.map(|n| ("port name", n, dns1123_label as fn(&str) -> _)));
    check_names("Service", namespace, name, &checks)
}

/// Converts a Service; `warnings` receives one line per skipped part. `None` when the
/// object itself is unusable (no name, a name the API server would refuse, or no cluster
/// IP of either family).
pub fn convert_service(svc: &Service, warnings: &mut Vec<String>) -> Option<ConvertedService> {
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name_str = svc.metadata.name.clone()?;
    if let Err(w) = check_service_names(svc, &namespace, &name_str) {
        warnings.push(w);
        return None;
    }
    let name = ServiceName::new(namespace, name_str);
    let mut out = ConvertedService {
        name: name.clone(),
        ports: Vec::new(),
    };
    if let Some(labels) = &svc.metadata.labels
        && (labels.contains_key(LABEL_SERVICE_PROXY_NAME) || labels.contains_key(LABEL_HEADLESS))
    {
        return Some(out);
    }
    let Some(spec) = &svc.spec else {
        return Some(out);
    };
    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Some(out),
        Some(other) => {
            warnings.push(format!("Service {name}: unknown type {other:?}, skipped"));
            return Some(out);
        }
    };
    let fields = ServiceFields::read(svc, spec, &name, service_type, warnings)?;
    for family in [IpFamily::V4, IpFamily::V6] {
        let Some(template) = fields.template(family) else {
            continue;
        };
        // Port problems are the same in both families: report them once.
        let mut port_warnings = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            if let Some(port) = convert_port(p, i, &template, &mut port_warnings) {
                out.ports.push(port);
            }
        }
        if !port_warnings.is_empty() && !warnings.contains(&port_warnings[0]) {
            warnings.extend(port_warnings);
        }
    }
    Some(out)
}

/// What a Service's ports share, read once for both families (so each unreadable value
/// is warned about once).
struct ServiceFields {
    name: ServiceName,
    service_type: ServiceType,
    cluster_ips: Vec<IpAddr>,
    external_ips: Vec<IpAddr>,
    load_balancer_ips: Vec<IpAddr>,
    source_ranges: ParsedRanges,
    session_affinity_timeout: Option<u32>,
    external_policy_local: bool,
    internal_policy_local: bool,
    health_check_node_port: u16,
}

impl ServiceFields {
    /// `None` without a cluster IP.
    fn read(
        svc: &Service,
        spec: &ServiceSpec,
        name: &ServiceName,
        service_type: ServiceType,
        warnings: &mut Vec<String>,
    ) -> Option<Self> {
        let cluster_ips = cluster_ips(spec, name, warnings)?;
        let external_ips = ip_list(
            spec.external_ips.iter().flatten().map(|s| s.trim()),
            name,
            "externalIP",
            warnings,
        );
        let load_balancer_ips = if service_type == ServiceType::LoadBalancer {
            load_balancer_ips(svc, name, warnings)
        } else {
            Vec::new()
        };
        let source_ranges = ParsedRanges::read(
            spec.load_balancer_source_ranges
                .as_deref()
                .unwrap_or_default(),
            name,
            warnings,
        );
        let externally_accessible =
            matches!(
                service_type,
                ServiceType::NodePort | ServiceType::LoadBalancer
            ) || !spec.external_ips.as_deref().unwrap_or_default().is_empty();
        let external_policy_local =
            externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
        let health_check_node_port =
            if service_type == ServiceType::LoadBalancer && external_policy_local {
                health_check_node_port(spec, name, warnings)
            } else {
                0
            };
        Some(ServiceFields {
            name: name.clone(),
            service_type,
            cluster_ips,
            external_ips,
            load_balancer_ips,
            source_ranges,
            session_affinity_timeout: session_affinity_timeout(spec),
            external_policy_local,
            internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port,
        })
    }

    /// The fields every port shares in `family` (the port's own fields are placeholders);
    /// `None` without a cluster IP of that family (upstream `GetClusterIPByFamily`: the first
    /// of the family, `clusterIPs` authoritative when set).
    fn template(&self, family: IpFamily) -> Option<ServicePort> {
        let cluster_ip = self
            .cluster_ips
            .iter()
            .copied()
            .find(|ip| family.matches(ip))?;
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| family.matches(ip))
                .collect()
        };
        Some(ServicePort {
            service_type: self.service_type,
            external_ips: of_family(&self.external_ips),
            load_balancer_ips: of_family(&self.load_balancer_ips),
            source_ranges: self.source_ranges.for_family(family),
            session_affinity_timeout: self.session_affinity_timeout,
            external_policy_local: self.external_policy_local,
            internal_policy_local: self.internal_policy_local,
            health_check_node_port: self.health_check_node_port,
            ..ServicePort::basic(
                ServicePortName {
                    service: self.name.clone(),
                    port: String::new(),
                    protocol: Protocol::Tcp,
                },
                cluster_ip,
                0,
            )
        })
    }
}

/// `status.loadBalancer.ingress[].ip`, except ingresses with ipMode Proxy (the load
/// balancer does not deliver to the VIP itself).
fn load_balancer_ips(svc: &Service, name: &ServiceName, warnings: &mut Vec<String>) -> Vec<IpAddr> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let ips = ingress
        .into_iter()
        .flatten()
        .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ing| ing.ip.as_deref())
        .filter(|ip| !ip.is_empty());
    ip_list(ips, name, "load balancer ingress IP", warnings)
}

/// Every readable entry of `clusterIPs` (authoritative when set) or `clusterIP`; `None` for
/// a headless or unset cluster IP, or when none is readable.
fn cluster_ips(
    spec: &ServiceSpec,
    name: &ServiceName,
    warnings: &mut Vec<String>,
) -> Option<Vec<IpAddr>> {
    let mut ip_strings: Vec<&str> = Vec::new();
    if let Some(ips) = &spec.cluster_ips {
        ip_strings.extend(ips.iter().map(String::as_str));
    }
    if ip_strings.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        ip_strings.push(ip.as_str());
    }
    if ip_strings.iter().all(|s| s.is_empty() || *s == "None") {
        return None;
    }
    let ips = ip_list(ip_strings.into_iter(), name, "clusterIP", warnings);
    (!ips.is_empty()).then_some(ips)
}

/// The addresses among `ips`, both families; unreadable ones are warned about and skipped.
fn ip_list<'a>(
    ips: impl Iterator<Item = &'a str>,
    name: &ServiceName,
    what: &str,
    warnings: &mut Vec<String>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in ips {
        match parse_ip_sloppy(s) {
            // The API server refuses 0.0.0.0 and :: (ValidateNonSpecialIP), and an ipset
            // refuses them too: kept, one would fail the whole IPVS sync for every service.
            Some(ip) if ip.is_unspecified() => warnings.push(format!(
                "Service {name}: {what} {s:?} is the unspecified address, ignored"
            )),
            Some(ip) => out.push(ip),
            None => warnings.push(format!(
                "Service {name}: {what} {s:?} is not an IP address, ignored"
            )),
        }
    }
    out
}

/// `loadBalancerSourceRanges` as read, both families.
#[derive(Debug, Clone, Default)]
struct ParsedRanges {
    cidrs: Vec<Cidr>,
    /// Some entry was unreadable: a family left without ranges then admits nothing.
    unreadable: bool,
}

impl ParsedRanges {
    fn read(ranges: &[String], name: &ServiceName, warnings: &mut Vec<String>) -> Self {
        let mut out = ParsedRanges::default();
        for raw in ranges {
            match parse_cidr_sloppy(raw.trim()) {
                Some(c) => out.cidrs.push(c),
                None => {
                    out.unreadable = true;
                    warnings.push(format!(
                        "Service {name}: loadBalancerSourceRanges entry {raw:?} is not a CIDR, ignored"
                    ));
                }
            }
        }
        if out.unreadable && out.cidrs.is_empty() {
            warnings.push(format!(
                "Service {name}: no usable loadBalancerSourceRanges entry, traffic to its load balancer IPs is dropped"
            ));
        }
        out
    }

    /// Upstream `newBaseServiceInfo`: entries are split by family, and a zero-length range of
    /// this family admits everyone (no firewall). If unreadable entries leave this family
    /// without a range, nothing is admitted rather than everything (fail closed).
    fn for_family(&self, family: IpFamily) -> SourceRanges {
        let mine: Vec<Cidr> = self
            .cidrs
            .iter()
            .copied()
            .filter(|c| family.matches(&c.addr()))
            .collect();
        if mine.iter().any(|c| c.prefix() == 0) {
            return SourceRanges::Any;
        }
        if mine.is_empty() && !self.unreadable {
            return SourceRanges::Any;
        }
        SourceRanges::Only(mine)
    }
}

fn session_affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let t = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
    Some(t)
}

fn health_check_node_port(
    spec: &ServiceSpec,
    name: &ServiceName,
    warnings: &mut Vec<String>,
) -> u16 {
    match spec.health_check_node_port.map(u16::try_from) {
        Some(Ok(p)) if p != 0 => p,
        Some(_) => {
            warnings.push(format!(
                "Service {name}: healthCheckNodePort {:?} out of range, no health check served",
                spec.health_check_node_port
            ));
            0
        }
        None => 0,
    }
}

/// One port of the Service from `template`; `None` (with a warning) if it is unusable.
fn convert_port(
    p: &k8s_openapi::api::core::v1::ServicePort,
    index: usize,
    template: &ServicePort,
    warnings: &mut Vec<String>,
) -> Option<ServicePort> {
    let name = &template.name.service;
    let pname = p.name.clone().unwrap_or_default();
    let label = if pname.is_empty() {
        format!("#{index}")
    } else {
        pname.clone()
    };
    let proto_str = p.protocol.as_deref().unwrap_or("TCP");
    let Some(protocol) = Protocol::from_api(proto_str) else {
        warnings.push(format!(
            "Service {name}: port {label} has unknown protocol {proto_str:?}, port skipped"
        ));
        return None;
    };
    let Some(port) = u16::try_from(p.port).ok().filter(|v| *v != 0) else {
        warnings.push(format!(
            "Service {name}: port {label} has out-of-range port {}, port skipped",
            p.port
        ));
        return None;
    };
    let node_port = match p.node_port {
        None => 0,
        Some(np) => match u16::try_from(np) {
            Ok(v) => v,
            Err(_) => {
                warnings.push(format!(
                    "Service {name}: port {label} has out-of-range nodePort {np}, port skipped"
                ));
                return None;
            }
        },
    };
    Some(ServicePort {
        name: ServicePortName {
            service: name.clone(),
            port: pname,
            protocol,
        },
        port,
        node_port: if template.service_type == ServiceType::ClusterIp {
            0
        } else {
            node_port
        },
        ..template.clone()
    })
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Port name (matches the Service port name).
    pub name: String,
    /// Target port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// What the model keeps of one EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service it belongs to.
    pub service: ServiceName,
    /// Its `addressType`: every endpoint is of this family.
    pub family: IpFamily,
    /// Its ports.
    pub ports: Vec<SlicePort>,
    /// Its endpoints with port 0: each is instantiated once per slice port.
    pub endpoints: Vec<Endpoint>,
}

/// Validates a slice's namespace, name, Service label and port names as the API server does
/// (the Service label must also be a valid Service name, or it could never match one).
fn check_slice_names(
    slice: &EndpointSlice,
    namespace: &str,
    name: &str,
    svc: &str,
) -> Result<(), String> {
    let port_names = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.as_deref());
    let mut checks: Vec<NameCheck> = vec![
        ("namespace", namespace, dns1123_label),
        ("name", name, dns1123_subdomain),
        (LABEL_SERVICE_NAME, svc, dns1123_label),
    ];
    checks.extend(
        port_names
            .filter(|n| !n.is_empty())
            .map(|n| ("port name", n, dns1123_label as fn(&str) -> _)),
    );
    check_names("EndpointSlice", namespace, name, &checks)
}

/// Converts an EndpointSlice of either IP family; `None` if it carries nothing for us (an
/// FQDN slice, a bad name).
pub fn convert_endpoint_slice(
    slice: &EndpointSlice,
    node_name: &str,
    warnings: &mut Vec<String>,
) -> Option<SliceInfo> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let slice_name = slice.metadata.name.clone().unwrap_or_default();
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        other => {
            warnings.push(format!(
                "EndpointSlice {}/{}: addressType {other:?} is not supported, skipped",
                Shown(&namespace),
                Shown(&slice_name)
            ));
            return None;
        }
    };
    let svc_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .map(String::as_str)
        .unwrap_or_default();
    if let Err(w) = check_slice_names(slice, &namespace, &slice_name, svc_name) {
        warnings.push(w);
        return None;
    }
    let who = format!("EndpointSlice {namespace}/{slice_name}");
    Some(SliceInfo {
        service: ServiceName::new(namespace, svc_name),
        family,
        ports: slice_ports(slice, &who, warnings),
        endpoints: slice_endpoints(slice, family, node_name, &who, warnings),
    })
}

fn slice_ports(slice: &EndpointSlice, who: &str, warnings: &mut Vec<String>) -> Vec<SlicePort> {
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let proto_str = p.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = Protocol::from_api(proto_str) else {
            warnings.push(format!(
                "{who}: port has unknown protocol {proto_str:?}, port skipped"
            ));
            continue;
        };
        let Some(num) = p.port else { continue };
        let Ok(port) = u16::try_from(num) else {
            warnings.push(format!("{who}: port {num} out of range, port skipped"));
            continue;
        };
        if port == 0 {
            warnings.push(format!("{who}: port 0 is invalid, port skipped"));
            continue;
        }
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            port,
            protocol,
        });
    }
    ports
}

/// Upstream `newEndpointSliceInfo`: an unset `ready` or `serving` counts as true, an unset
/// `terminating` as false.
fn slice_endpoints(
    slice: &EndpointSlice,
    family: IpFamily,
    node_name: &str,
    who: &str,
    warnings: &mut Vec<String>,
) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let Some(ip) = parse_ip_sloppy(addr).filter(|ip| family.matches(ip)) else {
            warnings.push(format!(
                "{who}: endpoint address {addr:?} is not an {family} address, endpoint skipped"
            ));
            continue;
        };
        let cond = ep.conditions.as_ref();
        let hints = ep.hints.as_ref();
        let zone_hints = hints
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| z.name.clone()).collect::<BTreeSet<_>>());
        let node_hints = hints
            .and_then(|h| h.for_nodes.as_ref())
            .map(|n| n.iter().map(|n| n.name.clone()).collect::<BTreeSet<_>>());
        endpoints.push(Endpoint {
            ip,
            port: 0,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            is_local: ep.node_name.as_deref() == Some(node_name),
            topology: (ep.zone.is_some() || zone_hints.is_some() || node_hints.is_some()).then(
                || {
                    Box::new(Topology {
                        zone: ep.zone.clone(),
                        zone_hints,
                        node_hints,
                    })
                },
            ),
        });
    }
    endpoints
}

/// Converts this proxy's Node.
pub fn convert_node(node: &Node, name: &str) -> NodeInfo {
    let mut info = NodeInfo {
        name: name.to_string(),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        present: true,
        deleting: node.metadata.deletion_timestamp.is_some(),
        ..Default::default()
    };
    if let Some(spec) = &node.spec {
        info.to_be_deleted = spec
            .taints
            .iter()
            .flatten()
            .any(|t| t.key == TAINT_TO_BE_DELETED);
        let cidrs = spec
            .pod_cidrs
            .clone()
            .or_else(|| spec.pod_cidr.clone().map(|c| vec![c]))
            .unwrap_or_default();
        info.pod_cidrs = cidrs.iter().filter_map(|c| parse_cidr_sloppy(c)).collect();
    }
    if let Some(status) = &node.status {
        // Upstream GetNodeHostIPs: InternalIPs before ExternalIPs (the primary node IP is the
        // first of its family).
        let mut addresses: Vec<_> = status.addresses.iter().flatten().collect();
        addresses.sort_by_key(|a| a.type_ != "InternalIP");
        for a in addresses {
            if (a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                && let Some(ip) = parse_ip_sloppy(&a.address)
            {
                info.ips.push(ip);
            }
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn service_ports_carry_every_field() {
        let s = svc(json!({
            "metadata": {"namespace": "ns", "name": "web",
                         "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.10", "clusterIPs": ["172.30.0.10"],
                     "externalIPs": ["192.168.99.1"], "loadBalancerSourceRanges": ["203.0.113.0/24"],
                     "sessionAffinity": "ClientIP", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                     "internalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
                               {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "1.2.3.5", "ipMode": "Proxy"}]}}
        }));
        let mut w = Vec::new();
        let c = convert_service(&s, &mut w).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.ports.len(), 2);
        let p = &c.ports[0];
        assert_eq!(p.name.to_string(), "ns/web:http");
        assert_eq!(p.node_port, 30080);
        assert_eq!(
            p.external_ips,
            vec!["192.168.99.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            p.load_balancer_ips,
            vec!["1.2.3.4".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            p.source_ranges,
            SourceRanges::Only(vec!["203.0.113.0/24".parse().unwrap()])
        );
        assert_eq!(p.session_affinity_timeout, Some(10800));
        assert!(p.external_policy_local && p.internal_policy_local);
        assert_eq!(p.health_check_node_port, 32000);
        assert_eq!(c.ports[1].name.protocol, Protocol::Udp);
    }

    /// Upstream's per-family trackers: one port per family with a cluster IP, each with only
    /// its family's addresses and source ranges.
    #[test]
    fn dual_stack_services_yield_one_port_per_family() {
        let mut w = Vec::new();
        let c = convert_service(
            &svc(json!({
                "metadata": {"namespace": "a", "name": "b"},
                "spec": {
                    "type": "LoadBalancer",
                    "clusterIP": "fd00:96::10",
                    "clusterIPs": ["fd00:96::10", "10.96.0.10"],
                    "externalIPs": ["192.0.2.1", "2001:db8::1"],
                    "loadBalancerSourceRanges": ["203.0.113.0/24"],
                    "ports": [{"name": "http", "port": 80, "nodePort": 30080}]
                },
                "status": {"loadBalancer": {"ingress": [{"ip": "2001:db8::99"}, {"ip": "198.51.100.9"}]}}
            })),
            &mut w,
        )
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
        let [v4, v6] = &c.ports[..] else {
            panic!("{:?}", c.ports)
        };
        assert_eq!(v4.cluster_ip, "10.96.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(v6.cluster_ip, "fd00:96::10".parse::<IpAddr>().unwrap());
        assert_eq!(v4.external_ips, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(v6.external_ips, ["2001:db8::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            v4.load_balancer_ips,
            ["198.51.100.9".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            v6.load_balancer_ips,
            ["2001:db8::99".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            v4.source_ranges,
            SourceRanges::Only(vec!["203.0.113.0/24".parse().unwrap()])
        );
        assert_eq!(
            v6.source_ranges,
            SourceRanges::Any,
            "no IPv6 range: no firewall"
        );
        assert_eq!((v4.node_port, v6.node_port), (30080, 30080));

        // An IPv6-only Service: one IPv6 port.
        let c = convert_service(
            &svc(json!({"metadata": {"namespace": "a", "name": "b"},
                "spec": {"clusterIP": "fd00::1", "clusterIPs": ["fd00::1"], "ports": [{"port": 80}]}})),
            &mut w,
        )
        .unwrap();
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.ports[0].cluster_ip, "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn ipv6_slices_convert_and_a_foreign_family_address_is_skipped() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "a", "name": "b-6", "labels": {"kubernetes.io/service-name": "b"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["fd00:244::5"]}, {"addresses": ["10.244.0.5"]}]
        }))
        .unwrap();
        let mut w = Vec::new();
        let info = convert_endpoint_slice(&slice, "n1", &mut w).unwrap();
        assert_eq!(info.family, IpFamily::V6);
        assert_eq!(info.endpoints.len(), 1);
        assert_eq!(
            info.endpoints[0].ip,
            "fd00:244::5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("not an IPv6 address"), "{w:?}");
    }

    #[test]
    fn ignored_services_produce_no_ports_and_no_warning() {
        for spec in [
            json!({"type": "ExternalName", "externalName": "example.com"}),
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
        ] {
            let mut w = Vec::new();
            let c = convert_service(
                &svc(json!({"metadata": {"namespace": "a", "name": "b"}, "spec": spec})),
                &mut w,
            );
            assert!(c.is_none_or(|c| c.ports.is_empty()));
            assert!(w.is_empty(), "{w:?}");
        }
        let mut w = Vec::new();
        let c = convert_service(
            &svc(json!({"metadata": {"namespace": "a", "name": "b",
                 "labels": {"service.kubernetes.io/service-proxy-name": "other"}},
                 "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}})),
            &mut w,
        )
        .unwrap();
        assert!(c.ports.is_empty());
    }

    #[test]
    fn bad_service_parts_warn_and_are_skipped() {
        let mut w = Vec::new();
        let c = convert_service(
            &svc(json!({"metadata": {"namespace": "a", "name": "bad"},
                 "spec": {"clusterIP": "10.0.0.999", "ports": [{"port": 80}]}})),
            &mut w,
        );
        assert!(c.is_none());
        assert!(
            w[0].contains("a/bad") && w[0].contains("10.0.0.999"),
            "{w:?}"
        );

        let mut w = Vec::new();
        let c = convert_service(
            &svc(json!({"metadata": {"namespace": "a", "name": "ports"},
                 "spec": {"clusterIP": "10.0.0.1", "ports": [
                    {"name": "big", "port": 70000}, {"name": "icmp", "port": 1, "protocol": "ICMP"},
                    {"name": "ok", "port": 8080}]}})),
            &mut w,
        )
        .unwrap();
        assert_eq!(c.ports.len(), 1);
        assert_eq!(c.ports[0].port, 8080);
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("70000") && w[1].contains("ICMP"), "{w:?}");
    }

    #[test]
    fn slices_keep_conditions_and_locality() {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "nodeName": "node1"},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["not-an-ip"]}
            ]
        }))
        .unwrap();
        let mut w = Vec::new();
        let info = convert_endpoint_slice(&s, "node1", &mut w).unwrap();
        assert_eq!(info.service.to_string(), "ns/web");
        assert_eq!(info.ports[0].port, 8080);
        assert_eq!(info.endpoints.len(), 2);
        assert!(info.endpoints[0].is_local && info.endpoints[0].ready);
        let t = &info.endpoints[1];
        assert!(!t.is_local && !t.ready && t.serving && t.terminating);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("ns/web-abc") && w[0].contains("not-an-ip"));

        let fqdn: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "f", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "FQDN", "endpoints": [{"addresses": ["example.com"]}]
        }))
        .unwrap();
        let mut w = Vec::new();
        assert!(convert_endpoint_slice(&fqdn, "node1", &mut w).is_none());
        assert!(w[0].contains("FQDN"));
    }

    fn named(ns: &str, name: &str, port_name: &str) -> Service {
        svc(json!({"metadata": {"namespace": ns, "name": name},
                   "spec": {"clusterIP": "10.0.0.1", "ports": [{"name": port_name, "port": 80}]}}))
    }

    /// Item 2 of issue 7: a name the API server would refuse never reaches the ruleset; the
    /// object is skipped with exactly one warning that names it, on one line.
    #[test]
    fn names_the_api_server_refuses_skip_the_object_with_one_warning() {
        let long = "a".repeat(1100);
        let cases = [
            named(
                "ns\" -j ACCEPT\n-A KUBE-SERVICES -j ACCEPT\n#",
                "web",
                "http",
            ),
            named("ns", "web", "COMMIT"),
            named("ns", "web", "*filter"),
            named("ns", "my web", "http"),
            named("ns", &long, "http"),
            named("", "web", "http"),
            named("ns", "web", &"p".repeat(64)),
        ];
        for s in &cases {
            let mut w = Vec::new();
            assert_eq!(convert_service(s, &mut w), None, "{:?}", s.metadata);
            assert_eq!(w.len(), 1, "{w:?}");
            assert!(
                w[0].starts_with("Service ") && w[0].ends_with(", skipped"),
                "{w:?}"
            );
            assert!(!w[0].contains('\n') && w[0].len() < 400, "{w:?}");
        }
        // The most the API server allows still converts.
        for s in [
            named(&"n".repeat(63), &"s".repeat(63), &"p".repeat(63)),
            named("kube-system", "9dns", ""),
        ] {
            let mut w = Vec::new();
            assert_eq!(convert_service(&s, &mut w).unwrap().ports.len(), 1, "{w:?}");
            assert!(w.is_empty(), "{w:?}");
        }

        let slice = |ns: &str, name: &str, svc_name: &str, port: &str| -> EndpointSlice {
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name,
                             "labels": {"kubernetes.io/service-name": svc_name}},
                "addressType": "IPv4",
                "ports": [{"name": port, "port": 80, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.1.0.1"]}]
            }))
            .unwrap()
        };
        for s in [
            slice("ns\"\n-A X", "web-1", "web", "http"),
            slice("ns", "web 1", "web", "http"),
            slice("ns", "web-1", "web\n", "http"),
            slice("ns", "web-1", "", "http"),
            slice("ns", "web-1", "web", "COMMIT"),
        ] {
            let mut w = Vec::new();
            assert_eq!(convert_endpoint_slice(&s, "node1", &mut w), None);
            assert_eq!(w.len(), 1, "{w:?}");
            assert!(
                w[0].starts_with("EndpointSlice ") && !w[0].contains('\n'),
                "{w:?}"
            );
        }
        let mut w = Vec::new();
        let ok = slice("ns", "web-1.x", "web", "http");
        assert!(convert_endpoint_slice(&ok, "node1", &mut w).is_some() && w.is_empty());
    }

    /// Issue 11: found by tests/fuzz_proptest.rs, an externalIP of 0.0.0.0 made the IPVS
    /// render's ipset restore fail (kernel: Invalid argument), so no service synced.
    #[test]
    fn unspecified_external_and_ingress_ips_are_ignored_with_a_warning() {
        let s = svc(json!({
            "metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1",
                     "externalIPs": ["0.0.0.0", "192.168.99.1"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "0.0.0.0"}, {"ip": "1.2.3.4"}]}}
        }));
        let mut w = Vec::new();
        let p = &convert_service(&s, &mut w).unwrap().ports[0];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(p.external_ips, [ip("192.168.99.1")]);
        assert_eq!(p.load_balancer_ips, [ip("1.2.3.4")]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w.iter()
                .all(|w| w.contains("0.0.0.0") && w.contains("ns/web")),
            "{w:?}"
        );
    }

    /// Item 7: values stored by older releases (leading zeros, read as decimal) keep working,
    /// in every address and prefix of a Service, an EndpointSlice and the Node.
    #[test]
    fn legacy_ip_spellings_are_read_as_upstream_does() {
        let s = svc(json!({
            "metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.041", "clusterIPs": ["172.30.0.041"],
                     "externalIPs": ["192.168.099.011"], "loadBalancerSourceRanges": ["010.0.0.0/8"],
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "001.002.003.004"}]}}
        }));
        let mut w = Vec::new();
        let p = &convert_service(&s, &mut w).unwrap().ports[0];
        assert!(w.is_empty(), "{w:?}");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(p.cluster_ip, ip("172.30.0.41"));
        assert_eq!(p.external_ips, [ip("192.168.99.11")]);
        assert_eq!(p.load_balancer_ips, [ip("1.2.3.4")]);
        assert_eq!(
            p.source_ranges,
            SourceRanges::Only(vec!["10.0.0.0/8".parse().unwrap()])
        );

        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 80}],
            "endpoints": [{"addresses": ["10.180.00.001"]}]
        }))
        .unwrap();
        let info = convert_endpoint_slice(&slice, "node1", &mut w).unwrap();
        assert_eq!(info.endpoints[0].ip, ip("10.180.0.1"));
        assert!(w.is_empty(), "{w:?}");

        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "node1"},
            "spec": {"podCIDR": "010.244.000.0/24", "podCIDRs": ["010.244.000.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.050.001"}]}
        }))
        .unwrap();
        let n = convert_node(&node, "node1");
        assert_eq!(n.pod_cidrs, ["10.244.0.0/24".parse().unwrap()]);
        assert_eq!(n.ips, [ip("192.168.50.1")]);
    }

    fn lb_with_ranges(ranges: serde_json::Value, annotation: Option<&str>) -> Service {
        let mut v = json!({
            "metadata": {"namespace": "ns", "name": "lb"},
            "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.41",
                     "ports": [{"name": "p80", "port": 80, "nodePort": 3001}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
        });
        if !ranges.is_null() {
            v["spec"]["loadBalancerSourceRanges"] = ranges;
        }
        if let Some(a) = annotation {
            v["metadata"]["annotations"] =
                json!({"service.beta.kubernetes.io/load-balancer-source-ranges": a});
        }
        svc(v)
    }

    fn ranges_of(s: &Service) -> (SourceRanges, Vec<String>) {
        let mut w = Vec::new();
        let c = convert_service(s, &mut w).expect("service kept");
        (c.ports[0].source_ranges.clone(), w)
    }

    /// Item 8: upstream reads only `spec.loadBalancerSourceRanges`, trims and splits by
    /// family, and treats a zero-length range as "allow any"; an unreadable entry is skipped
    /// (the service stays), and with none left the load balancer admits nobody.
    #[test]
    fn load_balancer_source_ranges_follow_upstream_and_fail_closed() {
        let only = |v: &[&str]| SourceRanges::Only(v.iter().map(|s| s.parse().unwrap()).collect());
        // The annotation is not read.
        let (r, w) = ranges_of(&lb_with_ranges(json!(null), Some("203.0.113.0/25")));
        assert_eq!((r, w.len()), (SourceRanges::Any, 0));
        // Trimmed; other family ignored.
        let (r, w) = ranges_of(&lb_with_ranges(
            json!([" 203.0.113.0/25 ", "2001:db8::/64"]),
            None,
        ));
        assert_eq!((r, w.len()), (only(&["203.0.113.0/25"]), 0));
        // Zero-length range of this family: no firewall at all.
        for zero in [json!(["0.0.0.0/0"]), json!(["203.0.113.0/25", "0.0.0.0/0"])] {
            let (r, w) = ranges_of(&lb_with_ranges(zero, None));
            assert_eq!((r, w.len()), (SourceRanges::Any, 0));
        }
        // Only the other family: nothing restricts IPv4 (upstream splits by family first).
        let (r, _) = ranges_of(&lb_with_ranges(json!(["::/0", "2001:db8::/64"]), None));
        assert_eq!(r, SourceRanges::Any);
        // An unreadable entry is skipped with a warning naming it; the rest stays.
        let (r, w) = ranges_of(&lb_with_ranges(json!(["bogus", "203.0.113.0/25"]), None));
        assert_eq!(r, only(&["203.0.113.0/25"]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("ns/lb") && w[0].contains("bogus"), "{w:?}");
        // Nothing readable left: fail closed.
        let (r, w) = ranges_of(&lb_with_ranges(json!(["bogus", "10.0.0.0/99"]), None));
        assert_eq!(r, SourceRanges::Only(Vec::new()));
        assert!(r.restricts() && r.allowed().is_empty());
        assert_eq!(w.len(), 3, "{w:?}");
    }

    /// Item 9: upstream `newEndpointSliceInfo` reads an unset `serving` as true, so a
    /// terminating endpoint with no serving condition is still a fallback endpoint.
    #[test]
    fn serving_unset_means_true() {
        let s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 80}],
            "endpoints": [
                {"addresses": ["10.1.0.1"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": false, "serving": false, "terminating": true}}
            ]
        }))
        .unwrap();
        let info = convert_endpoint_slice(&s, "node1", &mut Vec::new()).unwrap();
        assert!(info.endpoints[0].serving && !info.endpoints[0].ready);
        assert!(!info.endpoints[1].serving);
    }

    #[test]
    fn node_ips_put_internal_ips_before_external_ips() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "192.168.50.1"},
                {"type": "InternalIP", "address": "fd00::1"}
            ]}
        }))
        .unwrap();
        let ips: Vec<String> = convert_node(&node, "n1")
            .ips
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["192.168.50.1", "fd00::1", "203.0.113.7"]);
    }
}
