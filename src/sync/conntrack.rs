//! Which UDP/SCTP conntrack flows are stale after a sync (upstream's conntrack reconciler,
//! pkg/proxy/conntrack/cleanup.go): a flow addressed to a service VIP:port or a node port whose
//! reply does not come from a serving endpoint of that service would keep black-holing the
//! client (DNS being the classic case), so it is deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::{Protocol, ProxyModel};

/// A conntrack flow reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowKey {
    /// Protocol.
    pub protocol: Protocol,
    /// Original destination address.
    pub orig_dst: IpAddr,
    /// Original destination port.
    pub orig_dport: u16,
    /// Source address of the reply direction (the DNAT target, or `orig_dst` if not DNATed).
    pub reply_src: IpAddr,
}

/// Serving endpoint IPs per destination that services own.
#[derive(Debug, Default, Clone)]
pub struct StaleFlowFilter {
    by_vip: BTreeMap<(Protocol, IpAddr, u16), BTreeSet<IpAddr>>,
    by_node_port: BTreeMap<(Protocol, u16), BTreeSet<IpAddr>>,
    retired_node_ports: BTreeSet<(Protocol, u16)>,
    node_ips: BTreeSet<IpAddr>,
}

impl StaleFlowFilter {
    /// Builds the filter from the model; `node_ips` are the addresses node ports are open on
    /// (empty: any destination with the port counts).
    pub fn new(model: &ProxyModel, node_ips: &[IpAddr]) -> Self {
        let mut f = StaleFlowFilter {
            node_ips: node_ips.iter().copied().collect(),
            ..Default::default()
        };
        for (name, svc) in &model.services {
            if name.protocol == Protocol::Tcp {
                continue;
            }
            let serving: BTreeSet<IpAddr> = model
                .endpoints_of(name)
                .iter()
                .filter(|e| e.serving)
                .map(|e| e.ip)
                .collect();
            let vips = std::iter::once(&svc.cluster_ip)
                .chain(svc.external_ips.iter())
                .chain(svc.load_balancer_ips.iter());
            for vip in vips {
                f.by_vip
                    .insert((name.protocol, *vip, svc.port), serving.clone());
            }
            if svc.node_port != 0 {
                f.by_node_port
                    .insert((name.protocol, svc.node_port), serving.clone());
            }
        }
        f
    }

    /// Node ports (UDP/SCTP) this filter's services use, to pass as `previous` next time.
    pub fn node_ports(&self) -> BTreeSet<(Protocol, u16)> {
        self.by_node_port.keys().copied().collect()
    }

    /// Also treats DNATed flows to node ports served before (`previous`) but not any more as
    /// stale: a changed nodePort must not leave clients on the old port's flow.
    pub fn with_retired_node_ports(mut self, previous: &BTreeSet<(Protocol, u16)>) -> Self {
        self.retired_node_ports = previous
            .iter()
            .filter(|k| !self.by_node_port.contains_key(*k))
            .copied()
            .collect();
        self
    }

    /// Whether no service flow can be affected (skip listing conntrack at all).
    pub fn is_empty(&self) -> bool {
        self.by_vip.is_empty() && self.by_node_port.is_empty() && self.retired_node_ports.is_empty()
    }

    /// Protocols worth listing.
    pub fn protocols(&self) -> BTreeSet<Protocol> {
        self.by_vip
            .keys()
            .map(|k| k.0)
            .chain(self.by_node_port.keys().map(|k| k.0))
            .chain(self.retired_node_ports.iter().map(|k| k.0))
            .collect()
    }

    /// Whether `flow` must be deleted.
    pub fn is_stale(&self, flow: &FlowKey) -> bool {
        if let Some(eps) = self
            .by_vip
            .get(&(flow.protocol, flow.orig_dst, flow.orig_dport))
        {
            return !eps.contains(&flow.reply_src);
        }
        if let Some(eps) = self.by_node_port.get(&(flow.protocol, flow.orig_dport)) {
            let local = self.node_ips.is_empty() || self.node_ips.contains(&flow.orig_dst);
            return local && !eps.contains(&flow.reply_src);
        }
        if self
            .retired_node_ports
            .contains(&(flow.protocol, flow.orig_dport))
        {
            let local = self.node_ips.is_empty() || self.node_ips.contains(&flow.orig_dst);
            return local && flow.reply_src != flow.orig_dst;
        }
        false
    }
}

/// Lists UDP/SCTP flows and deletes the stale ones; returns how many were deleted.
/// Failures are per flow and logged: one flow that vanished meanwhile must not stop the rest.
pub async fn reconcile(
    conntrack: &crate::kernel::conntrack::Conntrack,
    filter: &StaleFlowFilter,
) -> Result<u64, crate::kernel::KernelError> {
    let mut deleted = 0;
    for proto in filter.protocols() {
        for flow in conntrack.list(proto).await? {
            let key = FlowKey {
                protocol: flow.proto,
                orig_dst: flow.orig_dst,
                orig_dport: flow.orig_dport,
                reply_src: flow.reply_src,
            };
            if !filter.is_stale(&key) {
                continue;
            }
            match conntrack.delete(&flow).await {
                Ok(n) => deleted += n,
                Err(e) => tracing::warn!(error = %e, "deleting a stale conntrack flow failed"),
            }
        }
    }
    Ok(deleted)
}

/// Deletes stale flows after each sync, for every backend. It remembers the node ports it
/// served last time so that a changed nodePort's old flows are deleted too.
#[derive(Debug, Clone)]
pub struct ConntrackCleaner {
    conntrack: crate::kernel::conntrack::Conntrack,
    served_node_ports: BTreeSet<(Protocol, u16)>,
}

impl ConntrackCleaner {
    /// A cleaner working through `conntrack`.
    pub fn new(conntrack: crate::kernel::conntrack::Conntrack) -> Self {
        ConntrackCleaner {
            conntrack,
            served_node_ports: BTreeSet::new(),
        }
    }

    /// Deletes the flows `model` makes stale; failures are logged, never fatal (the rules are
    /// already in place, and the next sync tries again).
    pub async fn after_sync(&mut self, model: &ProxyModel, node_ips: &[IpAddr]) {
        let filter =
            StaleFlowFilter::new(model, node_ips).with_retired_node_ports(&self.served_node_ports);
        self.served_node_ports = filter.node_ports();
        if filter.is_empty() {
            return;
        }
        match reconcile(&self.conntrack, &filter).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "stale conntrack flows deleted"),
            Err(e) => tracing::warn!(error = %e, "conntrack cleanup failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, ServicePort, ServicePortName};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn model() -> ProxyModel {
        let mut m = ProxyModel::default();
        let name = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
        let mut svc = ServicePort::basic(name.clone(), ip("172.30.0.10"), 53);
        svc.node_port = 30053;
        m.services.insert(name.clone(), svc);
        let mut gone = Endpoint::ready(ip("10.0.0.9"), 53);
        gone.serving = false;
        m.endpoints
            .insert(name, vec![Endpoint::ready(ip("10.0.0.5"), 53), gone]);
        let tcp = ServicePortName::new("ns", "web", "", Protocol::Tcp);
        m.services
            .insert(tcp.clone(), ServicePort::basic(tcp, ip("172.30.0.20"), 80));
        m
    }

    fn flow(dst: &str, port: u16, reply: &str) -> FlowKey {
        FlowKey {
            protocol: Protocol::Udp,
            orig_dst: ip(dst),
            orig_dport: port,
            reply_src: ip(reply),
        }
    }

    #[test]
    fn flows_to_removed_or_missing_endpoints_are_stale() {
        let f = StaleFlowFilter::new(&model(), &[ip("192.168.50.1")]);
        assert_eq!(f.protocols(), BTreeSet::from([Protocol::Udp]));
        assert!(!f.is_stale(&flow("172.30.0.10", 53, "10.0.0.5")));
        assert!(
            f.is_stale(&flow("172.30.0.10", 53, "10.0.0.7")),
            "endpoint removed"
        );
        assert!(
            f.is_stale(&flow("172.30.0.10", 53, "10.0.0.9")),
            "endpoint not serving"
        );
        assert!(
            f.is_stale(&flow("172.30.0.10", 53, "172.30.0.10")),
            "flow created before any DNAT"
        );
        assert!(
            !f.is_stale(&flow("172.30.0.10", 54, "172.30.0.10")),
            "other port is not ours"
        );
        assert!(f.is_stale(&flow("192.168.50.1", 30053, "10.0.0.7")));
        assert!(!f.is_stale(&flow("192.168.50.1", 30053, "10.0.0.5")));
        assert!(
            !f.is_stale(&flow("8.8.8.8", 30053, "8.8.8.8")),
            "forwarded flow, not a node port"
        );
    }

    #[test]
    fn flows_to_a_retired_node_port_are_stale() {
        let previous = BTreeSet::from([(Protocol::Udp, 30053), (Protocol::Udp, 30099)]);
        let f = StaleFlowFilter::new(&model(), &[ip("192.168.50.1")])
            .with_retired_node_ports(&previous);
        assert_eq!(f.node_ports(), BTreeSet::from([(Protocol::Udp, 30053)]));
        assert!(
            f.is_stale(&flow("192.168.50.1", 30099, "10.0.0.5")),
            "DNATed flow to a port no longer served"
        );
        assert!(
            !f.is_stale(&flow("192.168.50.1", 30099, "192.168.50.1")),
            "not DNATed: not ours"
        );
        assert!(
            !f.is_stale(&flow("192.168.50.1", 30053, "10.0.0.5")),
            "still served, valid endpoint"
        );
        let without = StaleFlowFilter::new(&model(), &[ip("192.168.50.1")]);
        assert!(!without.is_stale(&flow("192.168.50.1", 30099, "10.0.0.5")));
    }
}
