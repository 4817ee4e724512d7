//! Which UDP/SCTP conntrack flows are stale after a sync (upstream's conntrack reconciler,
//! pkg/proxy/conntrack/cleanup.go): a flow addressed to a service VIP:port or a node port whose
//! reply does not come from a serving endpoint of that service would keep black-holing the
//! client (DNS being the classic case), so it is deleted. So is every flow to a frontend
//! (VIP:port) that no service owns any more, e.g. of a deleted UDP service (upstream #141371):
//! one-way senders would otherwise keep its flow, DNATed to an old pod IP, alive forever.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::model::{Protocol, ProxyModel};

/// A conntrack flow reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
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

/// A service frontend: protocol, VIP (ClusterIP, externalIP or load-balancer IP), port.
pub type Frontend = (Protocol, IpAddr, u16);

/// The UDP/SCTP frontends and node ports a sync served, to tell the next sync which ones
/// went away.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Served {
    /// VIP:port frontends.
    pub frontends: BTreeSet<Frontend>,
    /// Node ports.
    pub node_ports: BTreeSet<(Protocol, u16)>,
}

impl Served {
    /// Everything in `self` or `other`.
    pub fn union(mut self, other: Served) -> Served {
        self.frontends.extend(other.frontends);
        self.node_ports.extend(other.node_ports);
        self
    }
}

/// Serving endpoint IPs per destination that services own.
#[derive(Debug, Default, Clone)]
pub struct StaleFlowFilter {
    by_vip: BTreeMap<Frontend, BTreeSet<IpAddr>>,
    by_node_port: BTreeMap<(Protocol, u16), BTreeSet<IpAddr>>,
    retired_frontends: BTreeSet<Frontend>,
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

    /// What this filter's services serve, to pass as `previous` next time.
    pub fn served(&self) -> Served {
        Served {
            frontends: self.by_vip.keys().copied().collect(),
            node_ports: self.by_node_port.keys().copied().collect(),
        }
    }

    /// Also treats as stale the flows to what was served before (`previous`) but is not any
    /// more: every flow to a VIP:port no service owns now (a deleted service, as upstream
    /// #141371 does with an empty endpoint set), and DNATed flows to a node port no longer
    /// served (a changed nodePort must not leave clients on the old port's flow).
    pub fn with_retired(mut self, previous: &Served) -> Self {
        self.retired_frontends = previous
            .frontends
            .iter()
            .filter(|k| !self.by_vip.contains_key(*k))
            .copied()
            .collect();
        self.retired_node_ports = previous
            .node_ports
            .iter()
            .filter(|k| !self.by_node_port.contains_key(*k))
            .copied()
            .collect();
        self
    }

    /// Whether no service flow can be affected (skip listing conntrack at all).
    pub fn is_empty(&self) -> bool {
        self.by_vip.is_empty()
            && self.by_node_port.is_empty()
            && self.retired_frontends.is_empty()
            && self.retired_node_ports.is_empty()
    }

    /// Protocols worth listing.
    pub fn protocols(&self) -> BTreeSet<Protocol> {
        self.by_vip
            .keys()
            .map(|k| k.0)
            .chain(self.by_node_port.keys().map(|k| k.0))
            .chain(self.retired_frontends.iter().map(|k| k.0))
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
        if self
            .retired_frontends
            .contains(&(flow.protocol, flow.orig_dst, flow.orig_dport))
        {
            return true;
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

/// What one reconcile deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Deleted {
    /// Flows deleted.
    pub flows: u64,
    /// Delete requests: one batch over ctnetlink for all stale flows (the `conntrack` tool,
    /// where ctnetlink is unavailable, runs once per flow within it).
    pub runs: usize,
}

/// Lists UDP/SCTP flows and deletes the stale ones, all in one batch: the flows just listed
/// whose [`FlowKey`] is stale (upstream lists, then deletes the matching entries; a flow
/// created after the listing is the next sync's).
pub async fn reconcile(
    conntrack: &crate::kernel::conntrack::Conntrack,
    filter: &StaleFlowFilter,
) -> Result<Deleted, crate::kernel::KernelError> {
    let mut stale = Vec::new();
    for proto in filter.protocols() {
        for flow in conntrack.list(proto).await? {
            let key = FlowKey {
                protocol: flow.proto,
                orig_dst: flow.orig_dst,
                orig_dport: flow.orig_dport,
                reply_src: flow.reply_src,
            };
            if filter.is_stale(&key) {
                stale.push(flow);
            }
        }
    }
    if stale.is_empty() {
        return Ok(Deleted::default());
    }
    Ok(Deleted {
        flows: conntrack.delete_flows(&stale).await?,
        runs: 1,
    })
}

/// One conntrack reconcile round, for `kubeproxy_conntrack_reconciler_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReconcileReport {
    /// How long it took (listing and deleting).
    pub duration: Duration,
    /// Flows deleted.
    pub deleted: u64,
    /// Delete requests it took (see [`Deleted::runs`]).
    pub delete_runs: usize,
}

/// Deletes stale flows after each sync, for every backend. It remembers what it served last
/// time so that the flows of a deleted service or a changed nodePort are deleted too.
#[derive(Debug, Clone)]
pub struct ConntrackCleaner {
    conntrack: crate::kernel::conntrack::Conntrack,
    served: Served,
}

impl ConntrackCleaner {
    /// A cleaner working through `conntrack`.
    pub fn new(conntrack: crate::kernel::conntrack::Conntrack) -> Self {
        ConntrackCleaner {
            conntrack,
            served: Served::default(),
        }
    }

    /// Deletes the flows `model` makes stale; failures are logged, never fatal (the rules are
    /// already in place, and the next sync tries again: what was served before is kept until
    /// a round succeeds, so a deleted service is not forgotten by a failed one). `None` when
    /// no flow could be stale, so conntrack was not even listed.
    pub async fn after_sync(
        &mut self,
        model: &ProxyModel,
        node_ips: &[IpAddr],
    ) -> Option<ReconcileReport> {
        let start = Instant::now();
        let filter = StaleFlowFilter::new(model, node_ips).with_retired(&self.served);
        let served = filter.served();
        if filter.is_empty() {
            self.served = served;
            return None;
        }
        let deleted = match reconcile(&self.conntrack, &filter).await {
            Ok(d) => {
                self.served = served;
                if d.flows > 0 {
                    tracing::debug!(
                        deleted = d.flows,
                        runs = d.runs,
                        "stale conntrack flows deleted"
                    );
                }
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, "conntrack cleanup failed");
                self.served = std::mem::take(&mut self.served).union(served);
                Deleted::default()
            }
        };
        Some(ReconcileReport {
            duration: start.elapsed(),
            deleted: deleted.flows,
            delete_runs: deleted.runs,
        })
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
    fn flows_to_a_deleted_udp_service_are_stale() {
        let before = StaleFlowFilter::new(&model(), &[ip("192.168.50.1")]).served();
        // The DNS service is deleted; another UDP service now owns 172.30.0.10:5353.
        let mut m = model();
        let dns = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
        m.services.remove(&dns);
        m.endpoints.remove(&dns);
        let other = ServicePortName::new("ns", "other", "", Protocol::Udp);
        m.services.insert(
            other.clone(),
            ServicePort::basic(other.clone(), ip("172.30.0.10"), 5353),
        );
        m.endpoints
            .insert(other, vec![Endpoint::ready(ip("10.0.0.8"), 5353)]);
        let f = StaleFlowFilter::new(&m, &[ip("192.168.50.1")]).with_retired(&before);
        assert!(!f.is_empty());
        assert_eq!(f.protocols(), BTreeSet::from([Protocol::Udp]));
        assert!(
            f.is_stale(&flow("172.30.0.10", 53, "10.0.0.5")),
            "flow DNATed to the deleted service's endpoint"
        );
        assert!(
            f.is_stale(&flow("172.30.0.10", 53, "172.30.0.10")),
            "flow to the deleted service's VIP, not DNATed"
        );
        assert!(
            !f.is_stale(&flow("172.30.0.10", 5353, "10.0.0.8")),
            "a live service on the same IP decides for its own port"
        );
        assert!(
            !f.is_stale(&flow("172.30.0.20", 80, "10.0.0.5")),
            "never a frontend of a UDP service"
        );
        // Served once more without the DNS service: it is forgotten, nothing retired.
        let after = StaleFlowFilter::new(&m, &[]).with_retired(&f.served());
        assert!(!after.is_stale(&flow("172.30.0.10", 53, "10.0.0.5")));
    }

    #[test]
    fn flows_to_a_retired_node_port_are_stale() {
        let previous = BTreeSet::from([(Protocol::Udp, 30053), (Protocol::Udp, 30099)]);
        let f = StaleFlowFilter::new(&model(), &[ip("192.168.50.1")]).with_retired(&Served {
            node_ports: previous,
            ..Served::default()
        });
        assert_eq!(
            f.served().node_ports,
            BTreeSet::from([(Protocol::Udp, 30053)])
        );
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

    /// `conntrack -I` a UDP flow `client:cport -> vip:vport`, DNATed to `ep:vport`.
    fn insert_udp(
        ns: &crate::kernel::testutil::NetNs,
        cport: u16,
        vip: &str,
        vport: u16,
        ep: &str,
    ) {
        let (c, v) = (cport.to_string(), vport.to_string());
        ns.exec(
            "conntrack",
            &[
                "-I",
                "-p",
                "udp",
                "-t",
                "120",
                "-s",
                "10.0.0.1",
                "-d",
                vip,
                "--sport",
                &c,
                "--dport",
                &v,
                "-r",
                ep,
                "-q",
                "10.0.0.1",
                "--reply-port-src",
                &v,
                "--reply-port-dst",
                &c,
            ],
        );
    }

    #[tokio::test]
    async fn kernel_cleaner_deletes_the_flows_of_a_deleted_udp_service() {
        let ns = crate::kernel::testutil::NetNs::new();
        let ct = crate::kernel::conntrack::Conntrack::new().with_netns(ns.name());
        let mut cleaner = ConntrackCleaner::new(ct.clone());
        let with_dns = model();
        let first = cleaner.after_sync(&with_dns, &[]).await.unwrap();
        assert_eq!(first.deleted, 0);

        insert_udp(&ns, 40001, "172.30.0.10", 53, "10.0.0.5");
        insert_udp(&ns, 40002, "172.30.0.99", 53, "10.0.0.5");
        let sports = |flows: Vec<crate::kernel::Flow>| {
            let mut v: Vec<u16> = flows.iter().map(|f| f.orig_sport).collect();
            v.sort();
            v
        };
        // Still served by a serving endpoint: kept.
        assert_eq!(cleaner.after_sync(&with_dns, &[]).await.unwrap().deleted, 0);
        assert_eq!(
            sports(ct.list(Protocol::Udp).await.unwrap()),
            [40001, 40002]
        );

        let mut without = with_dns.clone();
        let dns = ServicePortName::new("kube-system", "dns", "dns", Protocol::Udp);
        without.services.remove(&dns);
        without.endpoints.remove(&dns);
        // A busy UDP service: many flows of one (VIP:port, endpoint), one request for all.
        for cport in 41000..41030 {
            insert_udp(&ns, cport, "172.30.0.10", 53, "10.0.0.5");
        }
        let report = cleaner.after_sync(&without, &[]).await.unwrap();
        assert_eq!(report.deleted, 31);
        assert_eq!(
            report.delete_runs, 1,
            "one batched request, not one per flow"
        );
        assert_eq!(
            sports(ct.list(Protocol::Udp).await.unwrap()),
            [40002],
            "only the deleted service's flow goes"
        );
    }
}
