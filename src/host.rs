//! Node facts: what this node is, decided in one place per sync from the options and the Node
//! object, and handed to both backends (and, at start-up, to the daemon's servers and
//! sysctls): the primary node IP, the node-port addresses, whether localhost node ports are
//! in effect and the local-traffic detector.
//!
//! Upstream decides these once at start-up (cmd/kube-proxy/app/server.go `detectNodeIPs`,
//! pkg/proxy/util/nodeport_addresses.go) and restarts when the Node's IPs or podCIDRs change
//! (pkg/proxy/node.go). kube-proxy-rs recomputes them every sync instead, and the sync loop
//! turns a change into a full sync, so unchanged services never keep stale chains.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::backend::netfilter::LocalDetector;
use crate::config::{DetectLocal, NodePortAddresses, ProxyOptions};
use crate::model::{Cidr, IpFamily, NodeInfo};
use crate::sync::shared::Shared;

/// How long start-up waits for the Node (its podCIDR, its IPs), as upstream's NodeManager.
pub const NODE_WAIT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often start-up looks at the Node while waiting (upstream polls every second).
pub const NODE_WAIT_POLL: Duration = Duration::from_secs(1);

/// The options node facts are computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSettings {
    /// `--bind-address`: overrides the Node's addresses as the primary IP unless unspecified.
    pub bind_address: IpAddr,
    /// `--nodeport-addresses`.
    pub node_port_addresses: NodePortAddresses,
    /// `--iptables-localhost-nodeports`.
    pub localhost_node_ports: bool,
    /// `--detect-local-mode` and its parameter.
    pub detect_local: DetectLocal,
}

impl Default for HostSettings {
    fn default() -> Self {
        HostSettings {
            bind_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            node_port_addresses: NodePortAddresses::All,
            localhost_node_ports: true,
            detect_local: DetectLocal::None,
        }
    }
}

/// What every backend needs to know about this node for one sync of one IP family.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// The family these facts are for (every address and prefix below is of it).
    pub family: IpFamily,
    /// The primary node IP of the family (upstream `nodeIPs[family]`), `None` while unknown.
    pub primary_ip: Option<IpAddr>,
    /// The prefixes node ports are served on; `None`: every local address (upstream
    /// `MatchAll`).
    pub node_port_cidrs: Option<Vec<Cidr>>,
    /// Localhost node ports are in effect: the flag is set, the family is IPv4 (IPv6 node
    /// ports never work on `::1`, as upstream) and the node-port addresses include an IPv4
    /// loopback address. Also decides `route_localnet`.
    pub localhost_node_ports: bool,
    /// How traffic from local pods is recognised.
    pub local_detector: LocalDetector,
}

/// Why start-up could not get the Node facts it needs.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// detect-local-mode NodeCIDR and the Node got no podCIDR in time (upstream exits too).
    #[error("node {node:?} has no podCIDR after {waited:?}; detect-local-mode NodeCIDR needs one")]
    NoPodCidr {
        /// The node name.
        node: String,
        /// How long start-up waited.
        waited: Duration,
    },
}

/// Where node ports are reachable: what a node-port address list matches on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortDestinations {
    /// Every local address (`-m addrtype --dst-type LOCAL`).
    AllLocal,
    /// Only these local addresses (sorted, de-duplicated; may be empty).
    Ips(Vec<IpAddr>),
}

impl HostSettings {
    /// The settings in `opts`.
    pub fn from_options(opts: &ProxyOptions) -> Self {
        HostSettings {
            bind_address: opts.bind_address,
            node_port_addresses: opts.node_port_addresses.clone(),
            localhost_node_ports: opts.localhost_node_ports,
            detect_local: opts.detect_local.clone(),
        }
    }

    /// The facts of `family` for `node` (as last seen; a default `NodeInfo` while it is
    /// unknown).
    pub fn facts(&self, node: &NodeInfo, family: IpFamily) -> NodeFacts {
        let primary_ip = primary_node_ip(self.bind_address, node, family);
        let node_port_cidrs = node_port_cidrs(&self.node_port_addresses, primary_ip, family);
        NodeFacts {
            family,
            primary_ip,
            localhost_node_ports: family == IpFamily::V4
                && self.localhost_node_ports
                && contains_ipv4_loopback(node_port_cidrs.as_deref()),
            node_port_cidrs,
            local_detector: self.local_detector(node, family),
        }
    }

    /// The family of the primary node IP (upstream `detectNodeIPs`): `--bind-address` when
    /// specified, else the Node's first address, else IPv4.
    pub fn primary_family(&self, node: &NodeInfo) -> IpFamily {
        if !self.bind_address.is_unspecified() {
            return IpFamily::of(&self.bind_address);
        }
        node.ips.first().map_or(IpFamily::V4, IpFamily::of)
    }

    fn local_detector(&self, node: &NodeInfo, family: IpFamily) -> LocalDetector {
        match &self.detect_local {
            DetectLocal::None => LocalDetector::None,
            DetectLocal::ClusterCidr(cidrs) => first_of(cidrs, family),
            DetectLocal::NodeCidr => first_of(&node.pod_cidrs, family),
            DetectLocal::BridgeInterface(i) => LocalDetector::BridgeInterface(i.clone()),
            DetectLocal::InterfaceNamePrefix(p) => LocalDetector::InterfaceNamePrefix(p.clone()),
        }
    }

    /// Whether start-up must wait for `node` before the first sync: NodeCIDR mode needs its
    /// podCIDR; `--nodeport-addresses primary` needs an IP unless `--bind-address` gives it.
    fn node_ready(&self, node: &NodeInfo) -> bool {
        let cidr_ok = self.detect_local != DetectLocal::NodeCidr || !node.pod_cidrs.is_empty();
        let ip_ok = self.node_port_addresses != NodePortAddresses::Primary
            || !self.bind_address.is_unspecified()
            || !node.ips.is_empty();
        cidr_ok && ip_ok
    }

    /// Waits (polling every `poll`, at most `timeout`) until the Node in `shared` carries
    /// what the facts need, then returns it. As upstream, a missing podCIDR in NodeCIDR mode
    /// is fatal; a missing IP for `primary` is logged and the facts go on without it.
    pub async fn wait_for_node(
        &self,
        shared: &Shared,
        poll: Duration,
        timeout: Duration,
    ) -> Result<NodeInfo, HostError> {
        let start = tokio::time::Instant::now();
        let mut logged = false;
        loop {
            let node = shared.lock().node().clone();
            if self.node_ready(&node) {
                return Ok(node);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                if self.detect_local == DetectLocal::NodeCidr {
                    return Err(HostError::NoPodCidr {
                        node: node.name,
                        waited,
                    });
                }
                tracing::warn!(node = %node.name, "the Node has no address after {waited:?}; --nodeport-addresses primary falls back to every local address, as upstream");
                return Ok(node);
            }
            if !logged {
                tracing::info!(node = %node.name, "waiting for the Node's podCIDR / IP before the first sync");
                logged = true;
            }
            tokio::time::sleep(poll).await;
        }
    }
}

/// The primary node IP of `family`: a specified `bind_address` of that family (upstream's
/// override), else the Node's first address of the family, InternalIPs before ExternalIPs
/// (upstream `GetNodeHostIPs`; the model keeps `NodeInfo::ips` in that order).
pub fn primary_node_ip(bind_address: IpAddr, node: &NodeInfo, family: IpFamily) -> Option<IpAddr> {
    if family.matches(&bind_address) && !bind_address.is_unspecified() {
        return Some(bind_address);
    }
    node.ips.iter().copied().find(|ip| family.matches(ip))
}

/// `--nodeport-addresses` as prefixes of `family` (upstream `NewNodePortAddresses`, after
/// server.go turned `primary` into the node IP's /32 or /128): `None` when it matches every
/// address (unset, a zero-length prefix, no prefix of the family, or `primary` without a
/// known non-loopback node IP).
pub fn node_port_cidrs(
    npa: &NodePortAddresses,
    primary: Option<IpAddr>,
    family: IpFamily,
) -> Option<Vec<Cidr>> {
    let cidrs: Vec<Cidr> = match npa {
        NodePortAddresses::All => return None,
        NodePortAddresses::Primary => primary
            .filter(|ip| !ip.is_loopback() && family.matches(ip))
            .map(Cidr::host)
            .into_iter()
            .collect(),
        NodePortAddresses::Cidrs(c) => c
            .iter()
            .copied()
            .filter(|c| family.matches(&c.addr()))
            .collect(),
    };
    if cidrs.is_empty() || cidrs.iter().any(|c| c.prefix() == 0) {
        None
    } else {
        Some(cidrs)
    }
}

/// Upstream `ContainsIPv4Loopback`: a prefix whose address is a loopback address or that
/// contains 127.0.0.0 (`None`, every address, does).
pub fn contains_ipv4_loopback(cidrs: Option<&[Cidr]>) -> bool {
    let lo = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0));
    cidrs.is_none_or(|c| {
        c.iter()
            .any(|c| c.is_ipv4() && (c.addr().is_loopback() || c.contains(&lo)))
    })
}

impl NodeFacts {
    /// The local addresses of this family node ports (and health-check node ports) are
    /// served on, from the host's `local` addresses (upstream `MatchAll` / `GetNodeIPs`).
    pub fn node_port_ips(&self, local: &[IpAddr]) -> NodePortDestinations {
        let mine: Vec<IpAddr> = local
            .iter()
            .copied()
            .filter(|ip| self.family.matches(ip))
            .collect();
        node_port_destinations(self.node_port_cidrs.as_deref(), &mine)
    }
}

/// The `local` addresses inside `cidrs` (`None`: every local address).
pub fn node_port_destinations(cidrs: Option<&[Cidr]>, local: &[IpAddr]) -> NodePortDestinations {
    let Some(cidrs) = cidrs else {
        return NodePortDestinations::AllLocal;
    };
    let mut ips: Vec<IpAddr> = local
        .iter()
        .copied()
        .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
        .collect();
    ips.sort();
    ips.dedup();
    NodePortDestinations::Ips(ips)
}

/// The host's addresses, for the health check servers (empty, logged, when listing fails).
pub async fn local_addresses() -> Vec<IpAddr> {
    match crate::kernel::addrs::Addresses::new().list().await {
        Ok(list) => list.into_iter().map(|a| a.addr).collect(),
        Err(e) => {
            tracing::error!(error = %e, "listing local addresses failed");
            Vec::new()
        }
    }
}

/// Detect-local of one family: the first prefix of it (`--cluster-cidr` and podCIDRs are
/// dual-stack pairs).
fn first_of(cidrs: &[Cidr], family: IpFamily) -> LocalDetector {
    cidrs
        .iter()
        .find(|c| family.matches(&c.addr()))
        .map(|c| LocalDetector::Cidr(*c))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClusterState;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn node(ips: &[&str], pod_cidrs: &[&str]) -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            ips: ips.iter().map(|s| ip(s)).collect(),
            pod_cidrs: pod_cidrs.iter().map(|s| cidr(s)).collect(),
            present: true,
            ..NodeInfo::default()
        }
    }

    fn primary() -> HostSettings {
        HostSettings {
            node_port_addresses: NodePortAddresses::Primary,
            ..HostSettings::default()
        }
    }

    #[test]
    fn primary_node_ports_are_the_node_ip_only() {
        let f = primary().facts(&node(&["192.168.50.1", "10.0.0.7"], &[]), IpFamily::V4);
        assert_eq!(f.primary_ip, Some(ip("192.168.50.1")));
        assert_eq!(f.node_port_cidrs, Some(vec![cidr("192.168.50.1/32")]));
        assert!(!f.localhost_node_ports, "a node IP /32 holds no loopback");
        let local = [ip("127.0.0.1"), ip("10.0.0.7"), ip("192.168.50.1")];
        assert_eq!(
            f.node_port_ips(&local),
            NodePortDestinations::Ips(vec![ip("192.168.50.1")])
        );
    }

    #[test]
    fn bind_address_overrides_the_node_addresses() {
        let mut s = primary();
        s.bind_address = ip("10.0.0.7");
        let f = s.facts(&node(&["192.168.50.1"], &[]), IpFamily::V4);
        assert_eq!(f.primary_ip, Some(ip("10.0.0.7")));
        assert_eq!(f.node_port_cidrs, Some(vec![cidr("10.0.0.7/32")]));
        s.bind_address = ip("0.0.0.0");
        assert_eq!(
            s.facts(&node(&["192.168.50.1"], &[]), IpFamily::V4)
                .primary_ip,
            Some(ip("192.168.50.1"))
        );
    }

    #[test]
    fn primary_without_a_node_ip_matches_every_address_as_upstream() {
        let f = primary().facts(&NodeInfo::default(), IpFamily::V4);
        assert_eq!(f.primary_ip, None);
        assert_eq!(f.node_port_cidrs, None);
        assert_eq!(
            f.node_port_ips(&[ip("10.0.0.7")]),
            NodePortDestinations::AllLocal
        );
    }

    #[test]
    fn localhost_node_ports_follow_upstreams_loopback_rule() {
        let with = |c: &[&str], flag: bool| {
            HostSettings {
                node_port_addresses: NodePortAddresses::Cidrs(c.iter().map(|s| cidr(s)).collect()),
                localhost_node_ports: flag,
                ..HostSettings::default()
            }
            .facts(&NodeInfo::default(), IpFamily::V4)
            .localhost_node_ports
        };
        // 127.0.0.2/32 is a loopback address though it does not hold 127.0.0.1.
        assert!(with(&["127.0.0.2/32"], true));
        assert!(with(&["127.0.0.0/8"], true));
        assert!(with(&["0.0.0.0/0"], true));
        assert!(
            with(&["fd00::/64"], true),
            "no IPv4 prefix means every address"
        );
        assert!(!with(&["192.168.0.0/16"], true));
        assert!(!with(&["127.0.0.0/8"], false));
    }

    #[test]
    fn node_cidr_detector_comes_from_the_pod_cidr() {
        let s = HostSettings {
            detect_local: DetectLocal::NodeCidr,
            ..HostSettings::default()
        };
        let f = s.facts(&node(&[], &["fd00::/64", "10.244.1.0/24"]), IpFamily::V4);
        assert_eq!(f.local_detector, LocalDetector::Cidr(cidr("10.244.1.0/24")));
        assert_eq!(
            s.facts(&node(&[], &[]), IpFamily::V4).local_detector,
            LocalDetector::None
        );
    }

    #[test]
    fn each_family_gets_its_own_facts() {
        let s = HostSettings {
            node_port_addresses: NodePortAddresses::Primary,
            detect_local: DetectLocal::ClusterCidr(vec![
                cidr("fd00:10:244::/56"),
                cidr("10.244.0.0/16"),
            ]),
            ..HostSettings::default()
        };
        let n = node(&["fd00:50::1", "192.168.50.1", "fd00:50::2"], &[]);
        let v4 = s.facts(&n, IpFamily::V4);
        let v6 = s.facts(&n, IpFamily::V6);
        assert_eq!((v4.family, v6.family), (IpFamily::V4, IpFamily::V6));
        assert_eq!(v4.primary_ip, Some(ip("192.168.50.1")));
        assert_eq!(v6.primary_ip, Some(ip("fd00:50::1")));
        assert_eq!(v4.node_port_cidrs, Some(vec![cidr("192.168.50.1/32")]));
        assert_eq!(v6.node_port_cidrs, Some(vec![cidr("fd00:50::1/128")]));
        assert_eq!(
            v4.local_detector,
            LocalDetector::Cidr(cidr("10.244.0.0/16"))
        );
        assert_eq!(
            v6.local_detector,
            LocalDetector::Cidr(cidr("fd00:10:244::/56"))
        );
        let local = [ip("192.168.50.1"), ip("fd00:50::1"), ip("fd00:50::2")];
        assert_eq!(
            v6.node_port_ips(&local),
            NodePortDestinations::Ips(vec![ip("fd00:50::1")])
        );
        assert_eq!(
            s.primary_family(&n),
            IpFamily::V6,
            "the Node's first address"
        );
    }

    #[test]
    fn ipv6_never_has_localhost_node_ports_and_bind_address_picks_its_family() {
        let mut s = HostSettings::default();
        let n = node(&["192.168.50.1", "fd00:50::1"], &[]);
        assert!(s.facts(&n, IpFamily::V4).localhost_node_ports);
        assert!(!s.facts(&n, IpFamily::V6).localhost_node_ports);
        s.bind_address = ip("fd00:50::9");
        assert_eq!(s.primary_family(&n), IpFamily::V6);
        assert_eq!(s.facts(&n, IpFamily::V6).primary_ip, Some(ip("fd00:50::9")));
        assert_eq!(
            s.facts(&n, IpFamily::V4).primary_ip,
            Some(ip("192.168.50.1")),
            "the override applies to its own family only"
        );
        s.bind_address = ip("::");
        assert_eq!(s.primary_family(&n), IpFamily::V4);
        assert_eq!(
            s.facts(&NodeInfo::default(), IpFamily::V6).node_port_cidrs,
            None
        );
    }

    fn node_object(pod_cidr: Option<&str>) -> k8s_openapi::api::core::v1::Node {
        let mut n = serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}
        });
        if let Some(c) = pod_cidr {
            n["spec"] = serde_json::json!({"podCIDR": c, "podCIDRs": [c]});
        }
        serde_json::from_value(n).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn node_cidr_mode_waits_for_the_pod_cidr_then_gives_up_after_the_timeout() {
        let s = HostSettings {
            detect_local: DetectLocal::NodeCidr,
            ..HostSettings::default()
        };
        let shared = std::sync::Arc::new(Shared::new(ClusterState::new("n1")));
        shared.lock().set_node(Some(&node_object(None)));
        let waiter = {
            let (s, shared) = (s.clone(), shared.clone());
            tokio::spawn(async move {
                s.wait_for_node(&shared, NODE_WAIT_POLL, NODE_WAIT_TIMEOUT)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!waiter.is_finished(), "no podCIDR yet: still waiting");
        shared
            .lock()
            .set_node(Some(&node_object(Some("10.244.1.0/24"))));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let node = waiter.await.unwrap().unwrap();
        assert_eq!(node.pod_cidrs, vec![cidr("10.244.1.0/24")]);

        let empty = Shared::new(ClusterState::new("n1"));
        let t0 = tokio::time::Instant::now();
        let e = s
            .wait_for_node(&empty, NODE_WAIT_POLL, NODE_WAIT_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(e, HostError::NoPodCidr { .. }), "{e}");
        let waited = t0.elapsed();
        assert!(waited >= NODE_WAIT_TIMEOUT && waited < NODE_WAIT_TIMEOUT + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn other_modes_do_not_wait() {
        let shared = Shared::new(ClusterState::new("n1"));
        let t0 = tokio::time::Instant::now();
        HostSettings::default()
            .wait_for_node(&shared, NODE_WAIT_POLL, NODE_WAIT_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}
