//! Upstream's `CategorizeEndpoints` (pkg/proxy/topology.go): which endpoints serve cluster
//! traffic, which serve local-policy traffic, with serving-terminating fallback and hints.

use std::collections::BTreeMap;

use super::{Endpoint, NodeInfo, ServicePort};

/// The result of categorising one service port's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Endpoints for traffic with a Cluster policy (empty if the port uses none).
    pub cluster: Vec<Endpoint>,
    /// Endpoints for traffic with a Local policy (empty if the port uses none).
    pub local: Vec<Endpoint>,
    /// Union of both: everything this node may send to (for chains and conntrack).
    pub all_reachable: Vec<Endpoint>,
    /// Whether any usable endpoint exists anywhere in the cluster.
    pub has_any: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    Zone,
    Node,
}

/// Splits `endpoints` the way upstream does for `svc` on `node`.
pub fn categorize_endpoints(
    svc: &ServicePort,
    endpoints: &[Endpoint],
    node: &NodeInfo,
) -> Categorized {
    let mut out = Categorized::default();
    let mut mode = TopologyMode::None;

    if svc.uses_cluster_endpoints() {
        mode = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|ep| ep.ready && available_for_topology(ep, mode, node))
            .cloned()
            .collect();
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|ep| ep.serving && ep.terminating)
                .cloned()
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }

    if !svc.uses_local_endpoints() {
        out.all_reachable = out.cluster.clone();
        return out;
    }

    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            local_ready |= ep.is_local;
        } else if ep.serving && ep.terminating {
            out.has_any = true;
            local_serving_terminating |= ep.is_local;
        }
    }
    let mut use_serving_terminating = false;
    if local_ready {
        out.local = endpoints
            .iter()
            .filter(|ep| ep.is_local && ep.ready)
            .cloned()
            .collect();
    } else if local_serving_terminating {
        use_serving_terminating = true;
        out.local = endpoints
            .iter()
            .filter(|ep| ep.is_local && ep.serving && ep.terminating)
            .cloned()
            .collect();
    }

    if !svc.uses_cluster_endpoints() {
        out.all_reachable = out.local.clone();
        return out;
    }
    if mode == TopologyMode::None && !use_serving_terminating {
        out.all_reachable = out.cluster.clone();
        return out;
    }
    // Upstream merges through a map keyed by ip:port; we keep the result sorted like the input.
    let mut merged: BTreeMap<String, Endpoint> = BTreeMap::new();
    for ep in out.cluster.iter().chain(out.local.iter()) {
        merged.insert(ep.addr_string(), ep.clone());
    }
    out.all_reachable = merged.into_values().collect();
    out
}

/// Upstream `topologyModeFromHints` (with `PreferSameTrafficDistribution`, on by default):
/// hints are followed whenever every ready endpoint carries them and at least one names this
/// node (node hints, first) or its zone. Neither the Service's topology annotations nor its
/// `trafficDistribution` are consulted: the EndpointSlice controller reads those (with its own
/// precedence) when it decides whether to write hints at all.
fn topology_mode(endpoints: &[Endpoint], node: &NodeInfo) -> TopologyMode {
    let zone = node.zone().unwrap_or_default();
    let mut has_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.iter().filter(|ep| ep.ready) {
        has_ready = true;
        match ep.node_hints().filter(|h| !h.is_empty()) {
            None => all_node_hints = false,
            Some(h) => for_node |= h.contains(&node.name),
        }
        match ep.zone_hints().filter(|h| !h.is_empty()) {
            None => all_zone_hints = false,
            Some(h) => for_zone |= h.contains(zone),
        }
    }
    if !has_ready {
        TopologyMode::None
    } else if all_node_hints && for_node {
        TopologyMode::Node
    } else if all_zone_hints && for_zone {
        TopologyMode::Zone
    } else {
        TopologyMode::None
    }
}

fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node: &NodeInfo) -> bool {
    let has = |hints: Option<&std::collections::BTreeSet<String>>, v: &str| {
        hints.is_some_and(|h| h.contains(v))
    };
    match mode {
        TopologyMode::None => true,
        TopologyMode::Zone => has(ep.zone_hints(), node.zone().unwrap_or_default()),
        TopologyMode::Node => has(ep.node_hints(), &node.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};
    use std::collections::BTreeSet;

    fn svc() -> ServicePort {
        ServicePort::basic(
            ServicePortName::new("ns", "svc", "p80", Protocol::Tcp),
            "172.30.0.1".parse().unwrap(),
            80,
        )
    }

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool, local: bool) -> Endpoint {
        let mut e = Endpoint::ready(format!("10.0.0.{last}").parse().unwrap(), 80);
        e.ready = ready;
        e.serving = serving;
        e.terminating = terminating;
        e.is_local = local;
        e
    }

    fn addrs(eps: &[Endpoint]) -> Vec<String> {
        eps.iter().map(Endpoint::addr_string).collect()
    }

    fn node() -> NodeInfo {
        let mut n = NodeInfo {
            name: "node1".into(),
            ..Default::default()
        };
        n.labels
            .insert(crate::model::ZONE_LABEL.into(), "zone-a".into());
        n
    }

    #[test]
    fn cluster_policy_uses_ready_then_falls_back_to_serving_terminating() {
        let s = svc();
        let eps = vec![
            ep(1, true, true, false, false),
            ep(2, false, true, true, false),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert_eq!(addrs(&c.cluster), ["10.0.0.1:80"]);
        assert!(c.local.is_empty());
        assert_eq!(addrs(&c.all_reachable), ["10.0.0.1:80"]);
        assert!(c.has_any);

        let eps = vec![
            ep(2, false, true, true, false),
            ep(3, false, false, true, false),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert_eq!(addrs(&c.cluster), ["10.0.0.2:80"]);

        let eps = vec![
            ep(3, false, false, true, false),
            ep(4, false, false, false, false),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert!(c.cluster.is_empty() && !c.has_any);
    }

    #[test]
    fn internal_local_uses_only_local_endpoints_but_knows_about_remote_ones() {
        let mut s = svc();
        s.internal_policy_local = true;
        let eps = vec![
            ep(1, true, true, false, false),
            ep(2, true, true, false, true),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert!(c.cluster.is_empty());
        assert_eq!(addrs(&c.local), ["10.0.0.2:80"]);
        assert_eq!(addrs(&c.all_reachable), ["10.0.0.2:80"]);
        assert!(c.has_any);

        let eps = vec![ep(1, true, true, false, false)];
        let c = categorize_endpoints(&s, &eps, &node());
        assert!(c.local.is_empty() && c.has_any);
    }

    #[test]
    fn external_local_merges_cluster_and_local_when_local_is_terminating() {
        let mut s = svc();
        s.node_port = 30080;
        s.external_policy_local = true;
        let eps = vec![
            ep(1, true, true, false, false),
            ep(2, false, true, true, true),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert_eq!(addrs(&c.cluster), ["10.0.0.1:80"]);
        assert_eq!(addrs(&c.local), ["10.0.0.2:80"]);
        assert_eq!(addrs(&c.all_reachable), ["10.0.0.1:80", "10.0.0.2:80"]);
    }

    fn hinted(last: u8, zones: &[&str], nodes: &[&str]) -> Endpoint {
        let mut e = ep(last, true, true, false, false);
        let set = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
        e.topology = Some(Box::new(crate::model::service::Topology {
            zone: None,
            zone_hints: if zones.is_empty() { None } else { set(zones) },
            node_hints: if nodes.is_empty() { None } else { set(nodes) },
        }));
        e
    }

    #[test]
    fn zone_hints_apply_only_when_complete_and_matching() {
        let s = svc();
        let a = hinted(1, &["zone-a"], &[]);
        let mut b = hinted(2, &["zone-b"], &[]);
        let c = categorize_endpoints(&s, &[a.clone(), b.clone()], &node());
        assert_eq!(addrs(&c.cluster), ["10.0.0.1:80"]);

        // One endpoint without hints: hints are ignored.
        if let Some(t) = b.topology.as_mut() {
            t.zone_hints = None;
        }
        let c = categorize_endpoints(&s, &[a.clone(), b.clone()], &node());
        assert_eq!(c.cluster.len(), 2);

        // Complete hints, none for this zone: ignored.
        let c = categorize_endpoints(
            &s,
            &[hinted(3, &["zone-c"], &[]), hinted(4, &["zone-b"], &[])],
            &node(),
        );
        assert_eq!(c.cluster.len(), 2);
        // A node without a zone label never matches zone hints.
        let c = categorize_endpoints(
            &s,
            &[a.clone(), hinted(2, &["zone-b"], &[])],
            &NodeInfo::default(),
        );
        assert_eq!(c.cluster.len(), 2);
    }

    /// Upstream's newest `topologyModeFromHints` follows hints on their own: a Service
    /// without a topology annotation or trafficDistribution still uses them.
    #[test]
    fn hints_are_followed_without_any_service_annotation() {
        let s = svc();
        let eps = [hinted(1, &["zone-a"], &[]), hinted(2, &["zone-b"], &[])];
        assert_eq!(
            addrs(&categorize_endpoints(&s, &eps, &node()).cluster),
            ["10.0.0.1:80"]
        );

        // Node hints win over zone hints when every ready endpoint has one and one is ours,
        // whatever the Service's trafficDistribution.
        let eps = [
            hinted(1, &["zone-a"], &["node2"]),
            hinted(2, &["zone-a"], &["node1"]),
            hinted(3, &["zone-b"], &["node3"]),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert_eq!(addrs(&c.cluster), ["10.0.0.2:80"]);
        // Incomplete node hints fall back to zone hints.
        let eps = [
            hinted(1, &["zone-a"], &["node1"]),
            hinted(2, &["zone-a"], &[]),
            hinted(3, &["zone-b"], &[]),
        ];
        let c = categorize_endpoints(&s, &eps, &node());
        assert_eq!(addrs(&c.cluster), ["10.0.0.1:80", "10.0.0.2:80"]);
        // Not-ready endpoints do not need hints.
        let mut unready = ep(4, false, true, false, false);
        if let Some(t) = unready.topology.as_mut() {
            t.zone_hints = None;
        }
        let eps = [
            hinted(1, &["zone-a"], &[]),
            hinted(2, &["zone-b"], &[]),
            unready,
        ];
        assert_eq!(
            addrs(&categorize_endpoints(&s, &eps, &node()).cluster),
            ["10.0.0.1:80"]
        );
    }
}
