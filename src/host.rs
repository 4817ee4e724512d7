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
use crate::model::{Cidr, NodeInfo};
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

/// What both backends need to know about this node for one sync (IPv4).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// The primary node IP (upstream `nodeIP`), `None` while unknown.
    pub primary_ip: Option<IpAddr>,
    /// The IPv4 prefixes node ports are served on; `None`: every local address (upstream
    /// `MatchAll`).
    pub node_port_cidrs: Option<Vec<Cidr>>,
    /// Localhost node ports are in effect: the flag is set and the node-port addresses
    /// include an IPv4 loopback address. Also decides `route_localnet`.
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

    /// The facts for `node` (as last seen; a default `NodeInfo` while it is unknown).
    pub fn facts(&self, node: &NodeInfo) -> NodeFacts {
        let primary_ip = primary_node_ip(self.bind_address, node);
        let node_port_cidrs = node_port_cidrs(&self.node_port_addresses, primary_ip);
        NodeFacts {
            primary_ip,
            localhost_node_ports: self.localhost_node_ports
                && contains_ipv4_loopback(node_port_cidrs.as_deref()),
            node_port_cidrs,
            local_detector: self.local_detector(node),
        }
    }

    fn local_detector(&self, node: &NodeInfo) -> LocalDetector {
        match &self.detect_local {
            DetectLocal::None => LocalDetector::None,
            DetectLocal::ClusterCidr(cidrs) => first_ipv4(cidrs),
            DetectLocal::NodeCidr => first_ipv4(&node.pod_cidrs),
            DetectLocal::BridgeInterface(i) => LocalDetector::BridgeInterface(i.clone()),
            DetectLocal::InterfaceNamePrefix(p) => LocalDetector::InterfaceNamePrefix(p.clone()),
        }
    }

    /// Whether start-up must wait for `node` before the first sync: NodeCIDR mode needs its
    /// podCIDR; `--nodeport-addresses primary` needs its IP unless `--bind-address` gives it.
    fn node_ready(&self, node: &NodeInfo) -> bool {
        let cidr_ok = self.detect_local != DetectLocal::NodeCidr || !node.pod_cidrs.is_empty();
        let ip_ok = self.node_port_addresses != NodePortAddresses::Primary
            || primary_node_ip(self.bind_address, node).is_some();
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
                tracing::warn!(node = %node.name, "the Node has no IPv4 address after {waited:?}; --nodeport-addresses primary falls back to every local address, as upstream");
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

/// The IPv4 primary node IP: a specified `bind_address` (upstream's override), else the
/// Node's first IPv4 address, InternalIPs before ExternalIPs (upstream `GetNodeHostIPs`; the
/// model keeps `NodeInfo::ips` in that order).
pub fn primary_node_ip(bind_address: IpAddr, node: &NodeInfo) -> Option<IpAddr> {
    if bind_address.is_ipv4() && !bind_address.is_unspecified() {
        return Some(bind_address);
    }
    node.ips.iter().copied().find(IpAddr::is_ipv4)
}

/// `--nodeport-addresses` as IPv4 prefixes (upstream `NewNodePortAddresses` for IPv4, after
/// server.go turned `primary` into the node IP's /32): `None` when it matches every address
/// (unset, `0.0.0.0/0`, no IPv4 prefix, or `primary` without a known non-loopback node IP).
pub fn node_port_cidrs(npa: &NodePortAddresses, primary: Option<IpAddr>) -> Option<Vec<Cidr>> {
    let cidrs: Vec<Cidr> = match npa {
        NodePortAddresses::All => return None,
        NodePortAddresses::Primary => primary
            .filter(|ip| !ip.is_loopback())
            .map(Cidr::host)
            .into_iter()
            .collect(),
        NodePortAddresses::Cidrs(c) => c.iter().copied().filter(Cidr::is_ipv4).collect(),
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
    /// The local addresses node ports (and health-check node ports) are served on, from the
    /// host's `local` addresses (upstream `MatchAll` / `GetNodeIPs`, IPv4).
    pub fn node_port_ips(&self, local: &[IpAddr]) -> NodePortDestinations {
        node_port_destinations(self.node_port_cidrs.as_deref(), local)
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

fn first_ipv4(cidrs: &[Cidr]) -> LocalDetector {
    cidrs
        .iter()
        .find(|c| c.is_ipv4())
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
        let f = primary().facts(&node(&["192.168.50.1", "10.0.0.7"], &[]));
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
        let f = s.facts(&node(&["192.168.50.1"], &[]));
        assert_eq!(f.primary_ip, Some(ip("10.0.0.7")));
        assert_eq!(f.node_port_cidrs, Some(vec![cidr("10.0.0.7/32")]));
        s.bind_address = ip("0.0.0.0");
        assert_eq!(
            s.facts(&node(&["192.168.50.1"], &[])).primary_ip,
            Some(ip("192.168.50.1"))
        );
    }

    #[test]
    fn primary_without_a_node_ip_matches_every_address_as_upstream() {
        let f = primary().facts(&NodeInfo::default());
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
            .facts(&NodeInfo::default())
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
        let f = s.facts(&node(&[], &["fd00::/64", "10.244.1.0/24"]));
        assert_eq!(f.local_detector, LocalDetector::Cidr(cidr("10.244.1.0/24")));
        assert_eq!(s.facts(&node(&[], &[])).local_detector, LocalDetector::None);
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
