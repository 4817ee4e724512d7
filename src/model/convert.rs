//! Converts API objects into model data, the way upstream's change trackers do.
//!
//! Bad input never aborts: each problem becomes a warning naming the object, and only the
//! offending part (a port, an endpoint, or the whole object when nothing usable remains) is
//! skipped. Only IPv4 is programmed for now, so IPv6 data is dropped silently.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::NodeInfo;
use super::net::{Cidr, Protocol};
use super::service::{
    Endpoint, ServiceName, ServicePort, ServicePortName, ServiceType, TrafficDistribution,
};

/// Label that hands a Service to another proxy; upstream ignores such Services.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label marking a headless Service; upstream ignores such Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label of an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Upstream's label selector for Services.
pub const SERVICE_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
const ANNOTATION_TOPOLOGY_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
const ANNOTATION_LB_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
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

fn is_ipv4(ip: &IpAddr) -> bool {
    ip.is_ipv4()
}

/// Converts a Service; `warnings` receives one line per skipped part.
pub fn convert_service(svc: &Service, warnings: &mut Vec<String>) -> Option<ConvertedService> {
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let name_str = svc.metadata.name.clone()?;
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

    // clusterIPs is authoritative when set; clusterIP mirrors its first entry.
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
        return Some(out);
    }
    let mut cluster_ip = None;
    for s in &ip_strings {
        match s.parse::<IpAddr>() {
            Ok(ip) if is_ipv4(&ip) => {
                cluster_ip.get_or_insert(ip);
            }
            Ok(_) => {}
            Err(_) => warnings.push(format!(
                "Service {name}: clusterIP {s:?} is not an IP address, ignored"
            )),
        }
    }
    let cluster_ip = cluster_ip?;

    let mut external_ips = Vec::new();
    for s in spec.external_ips.iter().flatten() {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) if is_ipv4(&ip) => external_ips.push(ip),
            Ok(_) => {}
            Err(_) => warnings.push(format!(
                "Service {name}: externalIP {s:?} is not an IP address, ignored"
            )),
        }
    }
    let mut load_balancer_ips = Vec::new();
    if service_type == ServiceType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            // ipMode Proxy means the load balancer does not deliver to the VIP itself.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(s) = ing.ip.as_deref() else { continue };
            match s.parse::<IpAddr>() {
                Ok(ip) if is_ipv4(&ip) => load_balancer_ips.push(ip),
                Ok(_) => {}
                Err(_) => warnings.push(format!(
                    "Service {name}: load balancer ingress IP {s:?} is not an IP address, ignored"
                )),
            }
        }
    }
    let mut range_strings: Vec<String> =
        spec.load_balancer_source_ranges.clone().unwrap_or_default();
    if range_strings.is_empty()
        && let Some(a) = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_LB_SOURCE_RANGES))
    {
        range_strings = a
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    let mut source_ranges = Vec::new();
    for s in &range_strings {
        match s.trim().parse::<Cidr>() {
            Ok(c) if c.is_ipv4() => source_ranges.push(c),
            Ok(_) => {}
            Err(_) => {
                // Dropping one range would widen access; refuse the whole Service instead.
                warnings.push(format!(
                    "Service {name}: loadBalancerSourceRanges entry {s:?} is not a CIDR, service skipped"
                ));
                return Some(out);
            }
        }
    }
    let session_affinity_timeout = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
        Some(t)
    } else {
        None
    };
    let externally_accessible = matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    ) || !spec.external_ips.as_deref().unwrap_or_default().is_empty();
    let external_policy_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port =
        if service_type == ServiceType::LoadBalancer && external_policy_local {
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
        } else {
            0
        };
    let traffic_distribution = match spec.traffic_distribution.as_deref() {
        Some("PreferClose") | Some("PreferSameZone") => TrafficDistribution::PreferSameZone,
        Some("PreferSameNode") => TrafficDistribution::PreferSameNode,
        _ => TrafficDistribution::None,
    };
    let topology_annotation = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| {
            a.get(ANNOTATION_TOPOLOGY_MODE)
                .or_else(|| a.get(ANNOTATION_TOPOLOGY_HINTS))
        })
        .is_some_and(|v| !v.is_empty() && v != "Disabled" && v != "disabled");

    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let pname = p.name.clone().unwrap_or_default();
        let label = if pname.is_empty() {
            format!("#{i}")
        } else {
            pname.clone()
        };
        let proto_str = p.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = Protocol::from_api(proto_str) else {
            warnings.push(format!(
                "Service {name}: port {label} has unknown protocol {proto_str:?}, port skipped"
            ));
            continue;
        };
        let port = match u16::try_from(p.port) {
            Ok(v) if v != 0 => v,
            _ => {
                warnings.push(format!(
                    "Service {name}: port {label} has out-of-range port {}, port skipped",
                    p.port
                ));
                continue;
            }
        };
        let node_port = match p.node_port {
            None => 0,
            Some(np) => match u16::try_from(np) {
                Ok(v) => v,
                Err(_) => {
                    warnings.push(format!(
                        "Service {name}: port {label} has out-of-range nodePort {np}, port skipped"
                    ));
                    continue;
                }
            },
        };
        let node_port = if service_type == ServiceType::ClusterIp {
            0
        } else {
            node_port
        };
        out.ports.push(ServicePort {
            name: ServicePortName {
                service: name.clone(),
                port: pname,
                protocol,
            },
            service_type,
            cluster_ip,
            port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            source_ranges: source_ranges.clone(),
            session_affinity_timeout,
            external_policy_local,
            internal_policy_local,
            health_check_node_port,
            traffic_distribution,
            topology_annotation,
        });
    }
    Some(out)
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

/// Converts an EndpointSlice of the IPv4 family; `None` if it carries nothing for us.
pub fn convert_endpoint_slice(
    slice: &EndpointSlice,
    node_name: &str,
    warnings: &mut Vec<String>,
) -> Option<SliceInfo> {
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let slice_name = slice.metadata.name.clone().unwrap_or_default();
    let who = format!("EndpointSlice {namespace}/{slice_name}");
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" => return None,
        other => {
            warnings.push(format!(
                "{who}: addressType {other:?} is not supported, skipped"
            ));
            return None;
        }
    }
    let Some(svc_name) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
    else {
        warnings.push(format!("{who}: no {LABEL_SERVICE_NAME} label, skipped"));
        return None;
    };
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
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        let Some(addr) = ep.addresses.first() else {
            continue;
        };
        let ip = match addr.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv4() => ip,
            _ => {
                warnings.push(format!(
                    "{who}: endpoint address {addr:?} is not an IPv4 address, endpoint skipped"
                ));
                continue;
            }
        };
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
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
            ready,
            serving,
            terminating,
            is_local: ep.node_name.as_deref() == Some(node_name),
            zone: ep.zone.clone(),
            zone_hints,
            node_hints,
        });
    }
    Some(SliceInfo {
        service: ServiceName::new(namespace, svc_name.clone()),
        ports,
        endpoints,
    })
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
        info.pod_cidrs = cidrs.iter().filter_map(|c| c.parse().ok()).collect();
    }
    if let Some(status) = &node.status {
        // Upstream GetNodeHostIPs: InternalIPs before ExternalIPs (the primary node IP is the
        // first of its family).
        let mut addresses: Vec<_> = status.addresses.iter().flatten().collect();
        addresses.sort_by_key(|a| a.type_ != "InternalIP");
        for a in addresses {
            if (a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                && let Ok(ip) = a.address.parse()
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
        assert_eq!(p.source_ranges[0].to_string(), "203.0.113.0/24");
        assert_eq!(p.session_affinity_timeout, Some(10800));
        assert!(p.external_policy_local && p.internal_policy_local && p.topology_annotation);
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
