//! Converts API objects into model data, the way upstream's change trackers do.
//!
//! Bad input never aborts: each problem becomes a warning naming the object, and only the
//! offending part (a port, an endpoint, a source range, or the whole object when nothing
//! usable remains) is skipped. A name that breaks the API server's rules skips the whole
//! object with one warning: names are written into the ruleset (comments, hashed chain
//! names), so only names the API server would accept may reach it. Addresses are read
//! leniently, as upstream's `netutils.ParseIPSloppy` does (leading zeros are decimal), so
//! values stored by older releases keep working. Only IPv4 is programmed for now, so IPv6
//! data is dropped silently.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::NodeInfo;
use super::net::Protocol;
use super::service::{
    Endpoint, ServiceName, ServicePort, ServicePortName, ServiceType, SourceRanges,
};
use super::validate::{NameError, Shown, dns1123_label, dns1123_subdomain};
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
    /// Its usable ports; empty when the Service produces no rules (headless, ExternalName,
    /// no IPv4 cluster IP, or every port invalid).
    pub ports: Vec<ServicePort>,
}

/// An IPv4 address read as upstream reads object addresses; `Err` if unreadable, `Ok(None)`
/// for another family.
fn ipv4_sloppy(s: &str) -> Result<Option<IpAddr>, ()> {
    match parse_ip_sloppy(s) {
        Some(ip) if ip.is_ipv4() => Ok(Some(ip)),
        Some(_) => Ok(None),
        None => Err(()),
    }
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
/// object itself is unusable (no name, a name the API server would refuse, or no IPv4
/// cluster IP).
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
    let template = service_template(svc, spec, &name, service_type, warnings)?;
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if let Some(port) = convert_port(p, i, &template, warnings) {
            out.ports.push(port);
        }
    }
    Some(out)
}

/// The fields every port of the Service shares (the port's own fields are placeholders);
/// `None` without an IPv4 cluster IP.
fn service_template(
    svc: &Service,
    spec: &ServiceSpec,
    name: &ServiceName,
    service_type: ServiceType,
    warnings: &mut Vec<String>,
) -> Option<ServicePort> {
    let cluster_ip = cluster_ip(spec, name, warnings)?;
    let external_ips = ip_list(
        spec.external_ips.iter().flatten().map(|s| s.trim()),
        name,
        "externalIP",
        warnings,
    );
    let load_balancer_ips = if service_type == ServiceType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        // ipMode Proxy means the load balancer does not deliver to the VIP itself.
        let ips = ingress
            .into_iter()
            .flatten()
            .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ing| ing.ip.as_deref())
            .filter(|ip| !ip.is_empty());
        ip_list(ips, name, "load balancer ingress IP", warnings)
    } else {
        Vec::new()
    };
    let source_ranges = source_ranges(
        spec.load_balancer_source_ranges
            .as_deref()
            .unwrap_or_default(),
        name,
        warnings,
    );
    let externally_accessible = matches!(
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
    Some(ServicePort {
        service_type,
        external_ips,
        load_balancer_ips,
        source_ranges,
        session_affinity_timeout: session_affinity_timeout(spec),
        external_policy_local,
        internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port,
        ..ServicePort::basic(
            ServicePortName {
                service: name.clone(),
                port: String::new(),
                protocol: Protocol::Tcp,
            },
            cluster_ip,
            0,
        )
    })
}

/// The first IPv4 entry of `clusterIPs` (authoritative when set) or `clusterIP`.
fn cluster_ip(
    spec: &ServiceSpec,
    name: &ServiceName,
    warnings: &mut Vec<String>,
) -> Option<IpAddr> {
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
    ip_list(ip_strings.into_iter(), name, "clusterIP", warnings)
        .into_iter()
        .next()
}

/// The IPv4 addresses among `ips`; unreadable ones are warned about and skipped.
fn ip_list<'a>(
    ips: impl Iterator<Item = &'a str>,
    name: &ServiceName,
    what: &str,
    warnings: &mut Vec<String>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in ips {
        match ipv4_sloppy(s) {
            // The API server refuses 0.0.0.0 (ValidateNonSpecialIP), and an ipset refuses it
            // too: kept, it would fail the whole IPVS sync for every service.
            Ok(Some(ip)) if ip.is_unspecified() => warnings.push(format!(
                "Service {name}: {what} {s:?} is the unspecified address, ignored"
            )),
            Ok(Some(ip)) => out.push(ip),
            Ok(None) => {}
            Err(()) => warnings.push(format!(
                "Service {name}: {what} {s:?} is not an IP address, ignored"
            )),
        }
    }
    out
}

/// Upstream `newBaseServiceInfo`: entries are trimmed and split by family, and a zero-length
/// range of this family admits everyone (no firewall). An unreadable entry is skipped with a
/// warning; if that leaves no range at all, nothing is admitted rather than everything.
fn source_ranges(
    ranges: &[String],
    name: &ServiceName,
    warnings: &mut Vec<String>,
) -> SourceRanges {
    let mut allowed = Vec::new();
    let mut unreadable = false;
    let mut allow_all = false;
    for raw in ranges {
        match parse_cidr_sloppy(raw.trim()) {
            Some(c) if c.is_ipv4() && c.prefix() == 0 => allow_all = true,
            Some(c) if c.is_ipv4() => allowed.push(c),
            Some(_) => {}
            None => {
                unreadable = true;
                warnings.push(format!(
                    "Service {name}: loadBalancerSourceRanges entry {raw:?} is not a CIDR, ignored"
                ));
            }
        }
    }
    if allow_all || (allowed.is_empty() && !unreadable) {
        return SourceRanges::Any;
    }
    if allowed.is_empty() {
        warnings.push(format!(
            "Service {name}: no usable loadBalancerSourceRanges entry, traffic to its load balancer IPs is dropped"
        ));
    }
    SourceRanges::Only(allowed)
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

/// Converts an EndpointSlice of the IPv4 family; `None` if it carries nothing for us.
pub fn convert_endpoint_slice(
    slice: &EndpointSlice,
    node_name: &str,
    warnings: &mut Vec<String>,
) -> Option<SliceInfo> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let slice_name = slice.metadata.name.clone().unwrap_or_default();
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" => return None,
        other => {
            warnings.push(format!(
                "EndpointSlice {}/{}: addressType {other:?} is not supported, skipped",
                Shown(&namespace),
                Shown(&slice_name)
            ));
            return None;
        }
    }
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
        ports: slice_ports(slice, &who, warnings),
        endpoints: slice_endpoints(slice, node_name, &who, warnings),
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
    node_name: &str,
    who: &str,
    warnings: &mut Vec<String>,
) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let Ok(Some(ip)) = ipv4_sloppy(addr) else {
            warnings.push(format!(
                "{who}: endpoint address {addr:?} is not an IPv4 address, endpoint skipped"
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
            zone: ep.zone.clone(),
            zone_hints,
            node_hints,
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

    #[test]
    fn ignored_services_produce_no_ports_and_no_warning() {
        for spec in [
            json!({"type": "ExternalName", "externalName": "example.com"}),
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            json!({"clusterIP": "fd00::1", "clusterIPs": ["fd00::1"], "ports": [{"port": 80}]}),
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
