//! The cluster state store: converted Services, EndpointSlices and this Node, with change
//! tracking so a sync can rewrite only what changed (KEP-3453).
//!
//! Only real changes are recorded: an update whose converted form equals the stored one (a
//! status heartbeat, an annotation we do not read) marks nothing, as kpng's diffstore does.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use super::convert::{self, SliceInfo};
use super::{
    Cidr, Endpoint, IpFamily, NodeInfo, ProxyModel, ServiceName, ServicePort, ServicePortName,
};

/// What changed since the last [`ClusterState::take_changes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose ports or endpoints changed.
    pub services: BTreeSet<ServiceName>,
    /// Services with a Service change (upstream's service change tracker items).
    pub service_changed: BTreeSet<ServiceName>,
    /// Services with an EndpointSlice change (upstream's endpoints change tracker items).
    pub endpoints_changed: BTreeSet<ServiceName>,
    /// The Node's labels (topology) or eligibility changed: needs a full sync.
    pub node: bool,
    /// The IP families whose proxier has something to sync: those of the changed service
    /// ports and EndpointSlices (upstream's per-family change trackers ignore the other
    /// family's), or both after a Node, ServiceCIDR or host address change.
    pub families: BTreeSet<IpFamily>,
    /// Number of Service events that changed something.
    pub service_events: u64,
    /// Number of EndpointSlice events that changed something.
    pub endpoint_events: u64,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of changed slices, for the network
    /// programming latency metric; only those after the state was created, as upstream's
    /// tracker ignores changes made before the process started (else every restart would
    /// observe each slice's last, possibly days-old, change). Each with its slice's family.
    pub trigger_times: Vec<(IpFamily, std::time::SystemTime)>,
}

/// An EndpointSlice converted for the store (see [`ClusterState::convert_slice`]).
#[derive(Debug, Clone)]
pub struct ConvertedSlice {
    /// Namespace and name.
    key: (String, String),
    /// What the store keeps of it; `None` if it carries nothing for us.
    info: Option<SliceInfo>,
    /// Its `last-change-trigger-time` annotation.
    trigger_time: Option<std::time::SystemTime>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.node
    }
}

/// Converted cluster objects, keyed for incremental updates.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    node_name: String,
    services: BTreeMap<ServiceName, Vec<ServicePort>>,
    slices: BTreeMap<(String, String), SliceInfo>,
    /// Each Service's slice keys, sorted: a Vec, as most Services have one slice (a set
    /// would allocate a node of eleven keys for it).
    slices_by_service: BTreeMap<ServiceName, Vec<(String, String)>>,
    node: NodeInfo,
    /// `spec.cidrs` of each ServiceCIDR object, by object name.
    service_cidrs: BTreeMap<String, Vec<Cidr>>,
    /// The Node has been seen at least once (it is eligible until then, as upstream).
    node_seen: bool,
    changes: Changes,
    /// A change the sync loop acts on was recorded since [`ClusterState::take_wake`].
    wake: bool,
    started: Option<std::time::SystemTime>,
}

impl ClusterState {
    /// An empty state for the node called `node_name`.
    pub fn new(node_name: &str) -> Self {
        ClusterState {
            node_name: node_name.to_string(),
            node: NodeInfo {
                name: node_name.to_string(),
                ..Default::default()
            },
            started: Some(std::time::SystemTime::now()),
            ..Default::default()
        }
    }

    /// The same state, ignoring trigger times before `started` instead of before creation.
    pub fn started_at(mut self, started: std::time::SystemTime) -> Self {
        self.started = Some(started);
        self
    }

    /// `(services, endpoints)`: services with a pending Service change and services with a
    /// pending EndpointSlice change (`sync_proxy_rules_{service,endpoint}_changes_pending`).
    pub fn pending_changes(&self) -> (usize, usize) {
        (
            self.changes.service_changed.len(),
            self.changes.endpoints_changed.len(),
        )
    }

    /// Inserts or updates a Service; returns warnings about skipped parts.
    pub fn apply_service(&mut self, svc: &Service) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(converted) = Self::convert_service(svc, &mut warnings) {
            self.set_service(converted.name, converted.ports);
        }
        warnings
    }

    /// A Service in the form the store keeps: `None` without a name; no ports when it is
    /// unusable (then it is treated as absent, so stale rules go away).
    pub fn convert_service(
        svc: &Service,
        warnings: &mut Vec<String>,
    ) -> Option<convert::ConvertedService> {
        match convert::convert_service(svc, warnings) {
            Some(mut converted) => {
                converted.ports.shrink_to_fit();
                Some(converted)
            }
            None => Some(convert::ConvertedService {
                name: ServiceName::new(svc.metadata.namespace.clone()?, svc.metadata.name.clone()?),
                ports: Vec::new(),
            }),
        }
    }

    fn set_service(&mut self, name: ServiceName, ports: Vec<ServicePort>) {
        let old = self.services.get(&name);
        let old = old.map(Vec::as_slice).unwrap_or(&[]);
        if old == ports.as_slice() {
            return;
        }
        let of = |ports: &[ServicePort], f: IpFamily| -> Vec<ServicePort> {
            ports
                .iter()
                .filter(|p| f.matches(&p.cluster_ip))
                .cloned()
                .collect()
        };
        let touched: Vec<IpFamily> = IpFamily::ALL
            .into_iter()
            .filter(|f| of(old, *f) != of(&ports, *f))
            .collect();
        self.touch(touched);
        self.changes.services.insert(name.clone());
        self.changes.service_changed.insert(name.clone());
        self.changes.service_events += 1;
        if ports.is_empty() {
            self.services.remove(&name);
        } else {
            self.services.insert(name, ports);
        }
    }

    /// Removes a Service.
    pub fn remove_service(&mut self, name: &ServiceName) {
        self.set_service(name.clone(), Vec::new());
    }

    /// Replaces every Service at once (after a relist), recording only real differences.
    pub fn replace_services<'a>(
        &mut self,
        svcs: impl IntoIterator<Item = &'a Service>,
    ) -> Vec<String> {
        let mut warnings = Vec::new();
        let all = svcs
            .into_iter()
            .filter_map(|s| Self::convert_service(s, &mut warnings))
            .collect();
        self.replace_converted_services(all);
        warnings
    }

    /// [`ClusterState::replace_services`] with Services already converted (a relist converts
    /// each object as it arrives rather than holding the API objects until it completes).
    pub fn replace_converted_services(&mut self, all: Vec<convert::ConvertedService>) {
        let seen: BTreeSet<ServiceName> = all.iter().map(|c| c.name.clone()).collect();
        for c in all {
            self.set_service(c.name, c.ports);
        }
        let gone: Vec<ServiceName> = self
            .services
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name);
        }
    }

    /// Inserts or updates an EndpointSlice; returns warnings about skipped parts.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Vec<String> {
        let mut warnings = Vec::new();
        let converted = self.convert_slice(slice, &mut warnings);
        self.apply_converted_slice(converted);
        warnings
    }

    /// An EndpointSlice in the form the store keeps.
    pub fn convert_slice(
        &self,
        slice: &EndpointSlice,
        warnings: &mut Vec<String>,
    ) -> ConvertedSlice {
        let info =
            convert::convert_endpoint_slice(slice, &self.node_name, warnings).map(|mut info| {
                info.ports.shrink_to_fit();
                info.endpoints.shrink_to_fit();
                info
            });
        ConvertedSlice {
            key: slice_key(slice),
            info,
            trigger_time: trigger_time(slice),
        }
    }

    /// Stores a converted slice (see [`ClusterState::convert_slice`]).
    pub fn apply_converted_slice(&mut self, slice: ConvertedSlice) {
        let family = slice
            .info
            .as_ref()
            .or_else(|| self.slices.get(&slice.key))
            .map(|i| i.family);
        if self.set_slice(slice.key, slice.info)
            && let Some(t) = slice.trigger_time
            && let Some(family) = family
            && self.started.is_none_or(|start| t >= start)
        {
            self.changes.trigger_times.push((family, t));
        }
    }

    /// Removes an EndpointSlice.
    pub fn remove_slice(&mut self, namespace: &str, name: &str) {
        self.set_slice((namespace.to_string(), name.to_string()), None);
    }

    /// Replaces every EndpointSlice at once (after a relist).
    pub fn replace_slices<'a>(
        &mut self,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Vec<String> {
        let mut warnings = Vec::new();
        let all = slices
            .into_iter()
            .map(|s| self.convert_slice(s, &mut warnings))
            .collect();
        self.replace_converted_slices(all);
        warnings
    }

    /// [`ClusterState::replace_slices`] with slices already converted.
    pub fn replace_converted_slices(&mut self, all: Vec<ConvertedSlice>) {
        let seen: BTreeSet<(String, String)> = all.iter().map(|s| s.key.clone()).collect();
        for s in all {
            self.apply_converted_slice(s);
        }
        let gone: Vec<(String, String)> = self
            .slices
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.remove_slice(&ns, &name);
        }
    }

    /// Stores a slice; returns whether anything changed.
    fn set_slice(&mut self, key: (String, String), info: Option<SliceInfo>) -> bool {
        let old = self.slices.get(&key);
        if old == info.as_ref() {
            return false;
        }
        let families = [old, info.as_ref()].map(|s| s.map(|s| s.family));
        self.touch(families.into_iter().flatten());
        let old = self.slices.get(&key);
        if let Some(old) = old {
            self.changes.services.insert(old.service.clone());
            self.changes.endpoints_changed.insert(old.service.clone());
            if let Some(keys) = self.slices_by_service.get_mut(&old.service) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    self.slices_by_service.remove(&old.service);
                }
            }
        }
        self.changes.endpoint_events += 1;
        match info {
            Some(info) => {
                self.changes.services.insert(info.service.clone());
                self.changes.endpoints_changed.insert(info.service.clone());
                let keys = self
                    .slices_by_service
                    .entry(info.service.clone())
                    .or_default();
                if let Err(at) = keys.binary_search(&key) {
                    keys.insert(at, key.clone());
                }
                self.slices.insert(key, info);
            }
            None => {
                self.slices.remove(&key);
            }
        }
        true
    }

    /// Sets this Node (or clears it when `None`: deleted).
    pub fn set_node(&mut self, node: Option<&Node>) {
        let info = match node {
            Some(n) => convert::convert_node(n, &self.node_name),
            None => NodeInfo {
                name: self.node_name.clone(),
                ..Default::default()
            },
        };
        self.node_seen |= node.is_some();
        // Only the zone label drives the rules (topology hints; upstream's NodeTopologyConfig
        // watches nothing else): a change rewrites every chain.
        if info.zone() != self.node.zone() {
            self.changes.node = true;
            self.touch(IpFamily::ALL);
        }
        // The IPs and podCIDRs feed the node facts, which the sync loop compares itself.
        // Eligibility only drives /healthz, which reads it from here: no sync for it.
        if info.ips != self.node.ips || info.pod_cidrs != self.node.pod_cidrs {
            self.touch(IpFamily::ALL);
        }
        self.node = info;
    }

    /// Inserts or updates a ServiceCIDR; returns warnings about CIDRs that do not parse.
    pub fn apply_service_cidr(&mut self, obj: &ServiceCIDR) -> Vec<String> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let mut warnings = Vec::new();
        let cidrs = obj
            .spec
            .as_ref()
            .and_then(|s| s.cidrs.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| match c.parse::<Cidr>() {
                Ok(c) => Some(c),
                Err(e) => {
                    warnings.push(format!("ServiceCIDR {name}: {e}, skipped"));
                    None
                }
            })
            .collect();
        self.set_service_cidrs(name, cidrs);
        warnings
    }

    /// Removes a ServiceCIDR.
    pub fn remove_service_cidr(&mut self, name: &str) {
        self.set_service_cidrs(name.to_string(), Vec::new());
    }

    /// Replaces every ServiceCIDR at once (after a relist).
    pub fn replace_service_cidrs(&mut self, all: &[ServiceCIDR]) -> Vec<String> {
        let seen: BTreeSet<&str> = all
            .iter()
            .filter_map(|o| o.metadata.name.as_deref())
            .collect();
        let gone: Vec<String> = self
            .service_cidrs
            .keys()
            .filter(|k| !seen.contains(k.as_str()))
            .cloned()
            .collect();
        gone.iter().for_each(|name| self.remove_service_cidr(name));
        all.iter()
            .flat_map(|o| self.apply_service_cidr(o))
            .collect()
    }

    /// Stores one object's CIDRs; only a change to the union wakes the sync loop (upstream
    /// hands the proxier the union of every object's CIDRs).
    fn set_service_cidrs(&mut self, name: String, cidrs: Vec<Cidr>) {
        let before = self.all_service_cidrs();
        if cidrs.is_empty() {
            self.service_cidrs.remove(&name);
        } else {
            self.service_cidrs.insert(name, cidrs);
        }
        if self.all_service_cidrs() != before {
            self.touch(IpFamily::ALL);
        }
    }

    /// This host's addresses changed: rules on `--nodeport-addresses` CIDRs may follow, so
    /// every family syncs although no object changed.
    pub fn host_addresses_changed(&mut self) {
        self.touch(IpFamily::ALL);
    }

    /// Records that `families`' proxiers have something to sync and wakes the sync loop.
    fn touch(&mut self, families: impl IntoIterator<Item = IpFamily>) {
        self.wake = true;
        self.changes.families.extend(families);
    }

    /// The families with changes not yet taken (see [`Changes::families`]).
    pub fn pending_families(&self) -> &BTreeSet<IpFamily> {
        &self.changes.families
    }

    /// The union of every ServiceCIDR's CIDRs, sorted and de-duplicated.
    fn all_service_cidrs(&self) -> BTreeSet<Cidr> {
        self.service_cidrs.values().flatten().copied().collect()
    }

    /// Whether a change the sync loop acts on was recorded since the last call; clears it.
    /// No-op updates and Node heartbeats record none.
    pub fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake)
    }

    /// This node as last seen.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Whether this Node may get traffic (`/healthz`): as upstream, eligible until a Node
    /// event says otherwise, then only while it exists, is not being deleted and has no
    /// `ToBeDeletedByClusterAutoscaler` taint.
    pub fn node_eligible(&self) -> bool {
        !self.node_seen || (self.node.present && !self.node.deleting && !self.node.to_be_deleted)
    }

    /// Returns and clears the changes recorded so far.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Builds the desired-state snapshot `family`'s proxier renders: the service ports with a
    /// cluster IP of that family, and the endpoints of that family's slices (upstream's
    /// per-family change trackers).
    pub fn snapshot(&self, family: IpFamily) -> ProxyModel {
        let mut model = ProxyModel::default();
        self.refresh_globals(&mut model, family);
        for name in self.services.keys() {
            self.insert_service(&mut model, family, name);
        }
        model
    }

    /// Brings `model`, a snapshot of `family` taken before the changes named in `changed`
    /// (the `services` of every [`Changes`] taken since), up to date: afterwards it equals
    /// [`ClusterState::snapshot`]. The cost is that of the changed services, not the cluster's,
    /// so a sync keeps its family's model instead of rebuilding it.
    pub fn refresh(
        &self,
        model: &mut ProxyModel,
        family: IpFamily,
        changed: &BTreeSet<ServiceName>,
    ) {
        self.refresh_globals(model, family);
        for name in changed {
            remove_service_ports(model, name);
            self.insert_service(model, family, name);
        }
    }

    /// The node and the service CIDRs: a few objects, copied whole.
    fn refresh_globals(&self, model: &mut ProxyModel, family: IpFamily) {
        if model.node != self.node {
            model.node.clone_from(&self.node);
        }
        model.service_cidrs = self
            .all_service_cidrs()
            .into_iter()
            .filter(|c| family.matches(&c.addr()))
            .collect();
    }

    /// Adds one Service's ports of `family` and their endpoints to `model`.
    fn insert_service(&self, model: &mut ProxyModel, family: IpFamily, name: &ServiceName) {
        let Some(ports) = self.services.get(name) else {
            return;
        };
        let ports = ports.iter().filter(|p| family.matches(&p.cluster_ip));
        for p in ports.clone() {
            model.services.insert(p.name.clone(), p.clone());
        }
        let Some(keys) = self.slices_by_service.get(name) else {
            return;
        };
        let slices = || {
            keys.iter()
                .filter_map(|k| self.slices.get(k))
                .filter(|s| s.family == family)
        };
        for p in ports {
            let eps = endpoints_for(p, slices());
            if !eps.is_empty() {
                model.endpoints.insert(p.name.clone(), eps);
            }
        }
    }

    /// Number of service ports known (over both families).
    pub fn service_port_count(&self) -> usize {
        self.services.values().map(Vec::len).sum()
    }
}

const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_time(slice: &EndpointSlice) -> Option<std::time::SystemTime> {
    let raw = slice
        .metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_TRIGGER_TIME)?;
    let ts: jiff::Timestamp = raw.parse().ok()?;
    Some(ts.into())
}

/// Removes every port of Service `name`, and its endpoints, from `model`.
fn remove_service_ports(model: &mut ProxyModel, name: &ServiceName) {
    let ports: Vec<ServicePortName> = model
        .services
        .range(first_port_of(name)..)
        .map(|(k, _)| k)
        .take_while(|k| k.service == *name)
        .cloned()
        .collect();
    for port in &ports {
        model.services.remove(port);
    }
    // Endpoints are only ever kept for a port of the model, but a stray entry must not
    // outlive its service either: removed by the same range.
    let eps: Vec<ServicePortName> = model
        .endpoints
        .range(first_port_of(name)..)
        .map(|(k, _)| k)
        .take_while(|k| k.service == *name)
        .cloned()
        .collect();
    for port in &eps {
        model.endpoints.remove(port);
    }
}

/// The smallest port name of Service `name` in `ServicePortName` order (service, port name,
/// protocol): the start of its range in the model's maps.
fn first_port_of(name: &ServiceName) -> ServicePortName {
    ServicePortName {
        service: name.clone(),
        port: String::new(),
        protocol: super::Protocol::Tcp,
    }
}

fn slice_key(slice: &EndpointSlice) -> (String, String) {
    (
        slice.metadata.namespace.clone().unwrap_or_default(),
        slice.metadata.name.clone().unwrap_or_default(),
    )
}

/// Upstream EndpointSliceCache semantics: an endpoint appears once per `ip:port` (a later copy
/// wins unless it is terminating, so a terminating ghost never hides a live pod with the same
/// address: kubernetes#135266), and the list is sorted by that string.
fn endpoints_for<'a>(
    port: &ServicePort,
    slices: impl Iterator<Item = &'a SliceInfo>,
) -> Vec<Endpoint> {
    let name: &ServicePortName = &port.name;
    let mut by_addr: BTreeMap<String, Endpoint> = BTreeMap::new();
    for slice in slices {
        for sp in slice
            .ports
            .iter()
            .filter(|sp| sp.name == name.port && sp.protocol == name.protocol)
        {
            for ep in &slice.endpoints {
                let mut ep = ep.clone();
                ep.port = sp.port;
                let key = ep.addr_string();
                if !ep.terminating || !by_addr.contains_key(&key) {
                    by_addr.insert(key, ep);
                }
            }
        }
    }
    by_addr.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"name": "p80", "port": 80}]}
        }))
        .unwrap()
    }

    fn slice(name: &str, svc: &str, ips: &[&str], node: Option<&str>) -> EndpointSlice {
        let eps: Vec<_> = ips
            .iter()
            .map(|ip| json!({"addresses": [ip], "nodeName": node}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "p80", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps
        }))
        .unwrap()
    }

    #[test]
    fn each_family_snapshot_holds_its_own_ports_and_endpoints() {
        let mut st = ClusterState::new("node1");
        let dual: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "a"},
            "spec": {"clusterIPs": ["10.0.0.1", "fd00::1"], "ports": [{"name": "p80", "port": 80}]}
        }))
        .unwrap();
        st.apply_service(&dual);
        st.apply_slice(&slice("a-4", "a", &["10.1.0.1"], None));
        let mut v6 = slice("a-6", "a", &["fd00:1::1", "fd00:1::2"], None);
        v6.address_type = "IPv6".into();
        st.apply_slice(&v6);
        let m4 = st.snapshot(IpFamily::V4);
        let m6 = st.snapshot(IpFamily::V6);
        let ips = |m: &ProxyModel| -> Vec<String> {
            m.endpoints
                .values()
                .flatten()
                .map(Endpoint::addr_string)
                .collect()
        };
        assert_eq!(m4.services.len(), 1);
        assert_eq!(m6.services.len(), 1);
        assert!(m4.services.values().all(|p| p.cluster_ip.is_ipv4()));
        assert!(m6.services.values().all(|p| p.cluster_ip.is_ipv6()));
        assert_eq!(ips(&m4), ["10.1.0.1:8080"]);
        assert_eq!(ips(&m6), ["[fd00:1::1]:8080", "[fd00:1::2]:8080"]);
    }

    #[test]
    fn endpoints_merge_across_slices_sorted_and_deduplicated() {
        let mut st = ClusterState::new("node1");
        st.apply_service(&svc("a", "172.30.0.1"));
        st.apply_slice(&slice("a-1", "a", &["10.0.0.5", "10.0.0.10"], None));
        st.apply_slice(&slice("a-2", "a", &["10.0.0.5"], Some("node1")));
        let m = st.snapshot(IpFamily::V4);
        let name = ServicePortName::new("ns", "a", "p80", crate::model::Protocol::Tcp);
        let eps = m.endpoints_of(&name);
        let addrs: Vec<_> = eps.iter().map(Endpoint::addr_string).collect();
        // String order, as upstream sorts: "10.0.0.10:8080" < "10.0.0.5:8080".
        assert_eq!(addrs, ["10.0.0.10:8080", "10.0.0.5:8080"]);
    }

    #[test]
    fn a_terminating_duplicate_never_hides_a_live_endpoint() {
        let mut st = ClusterState::new("node1");
        st.apply_service(&svc("a", "172.30.0.1"));
        st.apply_slice(&slice("a-1", "a", &["10.0.0.5"], None));
        let mut ghost = slice("a-2", "a", &["10.0.0.5"], Some("node1"));
        if let Some(ep) = ghost.endpoints.iter_mut().flatten().next() {
            ep.conditions = Some(
                serde_json::from_value(
                    json!({"ready": false, "serving": true, "terminating": true}),
                )
                .unwrap(),
            );
        }
        st.apply_slice(&ghost);
        let m = st.snapshot(IpFamily::V4);
        let name = ServicePortName::new("ns", "a", "p80", crate::model::Protocol::Tcp);
        let eps = m.endpoints_of(&name);
        assert_eq!(eps.len(), 1);
        assert!(
            eps[0].ready && !eps[0].terminating && !eps[0].is_local,
            "the ready remote copy must stay: {:?}",
            eps[0]
        );
    }

    #[test]
    fn only_real_changes_are_recorded() {
        let mut st = ClusterState::new("node1");
        st.apply_service(&svc("a", "172.30.0.1"));
        st.apply_slice(&slice("a-1", "a", &["10.0.0.5"], None));
        let c = st.take_changes();
        assert_eq!(c.services.len(), 1);
        assert_eq!((c.service_events, c.endpoint_events), (1, 1));

        // Same content again: nothing to do.
        st.apply_service(&svc("a", "172.30.0.1"));
        st.apply_slice(&slice("a-1", "a", &["10.0.0.5"], None));
        assert!(st.take_changes().is_empty());

        // A slice moving from one service to another marks both.
        st.apply_service(&svc("b", "172.30.0.2"));
        st.take_changes();
        st.apply_slice(&slice("a-1", "b", &["10.0.0.5"], None));
        let c = st.take_changes();
        assert_eq!(
            c.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );

        // Relist without b: b is removed and marked.
        let only_a = [svc("a", "172.30.0.1")];
        st.replace_services(only_a.iter());
        let c = st.take_changes();
        assert_eq!(
            c.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert!(
            !st.snapshot(IpFamily::V4)
                .services
                .keys()
                .any(|k| k.service.name == "b")
        );
    }

    fn service_cidr(name: &str, cidrs: &[&str]) -> ServiceCIDR {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"cidrs": cidrs}}))
            .unwrap()
    }

    #[test]
    fn service_cidrs_are_the_union_of_every_object_split_by_family() {
        let mut st = ClusterState::new("node1");
        st.take_wake();
        st.apply_service_cidr(&service_cidr(
            "kubernetes",
            &["10.96.0.0/16", "fd00:10:96::/112"],
        ));
        assert!(st.take_wake(), "new CIDRs wake the sync loop");
        let w = st.apply_service_cidr(&service_cidr(
            "extra",
            &["10.97.0.0/16", "10.96.0.0/16", "bogus"],
        ));
        assert_eq!(w.len(), 1, "{w:?}");
        let v4 = |st: &ClusterState| -> Vec<String> {
            st.snapshot(IpFamily::V4)
                .service_cidrs
                .iter()
                .map(Cidr::to_string)
                .collect()
        };
        assert_eq!(v4(&st), ["10.96.0.0/16", "10.97.0.0/16"]);
        let v6 = st.snapshot(IpFamily::V6).service_cidrs;
        assert_eq!(v6, ["fd00:10:96::/112".parse::<Cidr>().unwrap()]);
        st.take_wake();
        // Same union under another name: nothing to do.
        st.apply_service_cidr(&service_cidr("extra", &["10.97.0.0/16"]));
        assert!(!st.take_wake());
        st.remove_service_cidr("extra");
        assert!(st.take_wake());
        assert_eq!(v4(&st), ["10.96.0.0/16"]);
        st.replace_service_cidrs(&[service_cidr("other", &["10.98.0.0/16"])]);
        assert_eq!(
            v4(&st),
            ["10.98.0.0/16"],
            "a relist drops objects no longer listed"
        );
        assert!(st.snapshot(IpFamily::V6).service_cidrs.is_empty());
    }

    #[test]
    fn node_label_change_requests_full_sync_but_heartbeat_does_not() {
        let mut st = ClusterState::new("node1");
        let node = |zone: &str, ip: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": zone}},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
            }))
            .unwrap()
        };
        st.set_node(Some(&node("a", "10.0.0.1")));
        assert!(st.take_changes().node);
        st.set_node(Some(&node("a", "10.0.0.2")));
        assert!(!st.take_changes().node);
        assert_eq!(st.node().ips[0].to_string(), "10.0.0.2");
        st.set_node(Some(&node("b", "10.0.0.2")));
        assert!(st.take_changes().node);
    }

    #[test]
    fn only_node_changes_the_proxy_uses_ask_for_a_sync() {
        let mut st = ClusterState::new("node1");
        let base = json!({
            "metadata": {"name": "node1", "resourceVersion": "1",
                         "labels": {"topology.kubernetes.io/zone": "a", "team": "x"}},
            "spec": {"podCIDRs": ["10.244.0.0/24"]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True",
                                "lastHeartbeatTime": "2026-11-29T06:00:00Z"}]
            }
        });
        let apply = |st: &mut ClusterState, v: &serde_json::Value| -> bool {
            st.set_node(Some(&serde_json::from_value(v.clone()).unwrap()));
            st.take_wake()
        };
        assert!(
            apply(&mut st, &base),
            "first sight: the IP and podCIDR are new"
        );
        st.take_changes();

        let mut n = base.clone();
        n["metadata"]["resourceVersion"] = json!("2");
        n["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2026-11-29T06:00:40Z");
        assert!(!apply(&mut st, &n), "a status heartbeat");
        n["metadata"]["labels"]["team"] = json!("y");
        assert!(!apply(&mut st, &n), "a label topology does not read");
        n["metadata"]["deletionTimestamp"] = json!("2026-11-29T06:01:00Z");
        assert!(
            !apply(&mut st, &n),
            "eligibility: /healthz reads it, no sync"
        );
        assert!(!st.node_eligible());
        assert!(st.take_changes().is_empty());

        n["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("b");
        assert!(apply(&mut st, &n), "zone");
        assert!(st.take_changes().node, "a zone change rewrites every chain");
        n["status"]["addresses"][0]["address"] = json!("10.0.0.2");
        assert!(apply(&mut st, &n), "node IP");
        n["spec"]["podCIDRs"] = json!(["10.244.9.0/24"]);
        assert!(apply(&mut st, &n), "podCIDR");
        assert!(
            !st.take_changes().node,
            "facts changes are the sync loop's to judge"
        );
    }

    #[test]
    fn no_op_service_and_slice_updates_ask_for_no_sync() {
        let mut st = ClusterState::new("node1");
        st.apply_service(&svc("a", "172.30.0.1"));
        st.apply_slice(&slice("a-1", "a", &["10.0.0.5"], None));
        assert!(st.take_wake());
        let mut s = svc("a", "172.30.0.1");
        s.metadata.resource_version = Some("7".into());
        s.metadata.annotations = Some([("unread".to_string(), "x".to_string())].into());
        st.apply_service(&s);
        st.apply_slice(&slice("a-1", "a", &["10.0.0.5"], None));
        st.remove_slice("ns", "never-seen");
        assert!(!st.take_wake(), "nothing the proxy uses changed");
        st.apply_slice(&slice("a-1", "a", &["10.0.0.6"], None));
        assert!(st.take_wake());
        st.remove_service(&ServiceName::new("ns", "a"));
        assert!(st.take_wake());
    }

    #[test]
    fn trigger_times_are_collected_only_for_real_slice_changes() {
        let start: std::time::SystemTime = "2026-11-22T03:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .into();
        let mut st = ClusterState::new("node1").started_at(start);
        let mut s = slice("a-1", "a", &["10.0.0.5"], None);
        s.metadata.annotations = Some(
            [(
                ANNOTATION_TRIGGER_TIME.to_string(),
                "2026-11-22T04:00:00Z".to_string(),
            )]
            .into(),
        );
        st.apply_slice(&s);
        let c = st.take_changes();
        let want: std::time::SystemTime = "2026-11-22T04:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .into();
        assert_eq!(c.trigger_times, vec![(IpFamily::V4, want)]);
        st.apply_slice(&s);
        assert!(st.take_changes().trigger_times.is_empty());
    }

    fn with_trigger_time(mut s: EndpointSlice, t: &str) -> EndpointSlice {
        s.metadata.annotations =
            Some([(ANNOTATION_TRIGGER_TIME.to_string(), t.to_string())].into());
        s
    }

    #[test]
    fn trigger_times_from_before_the_start_are_ignored() {
        let at =
            |t: &str| -> std::time::SystemTime { t.parse::<jiff::Timestamp>().unwrap().into() };
        // The default start is the creation time: a slice last changed long ago (the usual
        // case for every slice listed after a restart) adds no sample.
        let mut st = ClusterState::new("node1");
        st.apply_slice(&with_trigger_time(
            slice("a-1", "a", &["10.0.0.5"], None),
            "2020-01-01T00:00:00Z",
        ));
        let c = st.take_changes();
        assert_eq!(c.endpoint_events, 1, "the change itself still counts");
        assert!(c.trigger_times.is_empty(), "{:?}", c.trigger_times);

        let mut st = ClusterState::new("node1").started_at(at("2026-11-22T04:00:00Z"));
        st.apply_slice(&with_trigger_time(
            slice("a-1", "a", &["10.0.0.5"], None),
            "2026-11-22T03:59:59Z",
        ));
        st.apply_slice(&with_trigger_time(
            slice("b-1", "b", &["10.0.0.6"], None),
            "2026-11-22T04:00:01Z",
        ));
        assert_eq!(
            st.take_changes().trigger_times,
            vec![(IpFamily::V4, at("2026-11-22T04:00:01Z"))]
        );
    }

    /// Each change names the families whose proxier must sync it (upstream's per-family
    /// trackers drop a change that leaves their family's view equal).
    #[test]
    fn changes_name_the_families_they_touch() {
        use IpFamily::{V4, V6};
        let dual = |v6: &str| -> Service {
            serde_json::from_value(json!({
                "metadata": {"namespace": "ns", "name": "a"},
                "spec": {"clusterIPs": ["10.0.0.1", v6], "ports": [{"name": "p80", "port": 80}]}
            }))
            .unwrap()
        };
        let mut st = ClusterState::new("node1");
        let families = |st: &mut ClusterState| -> Vec<IpFamily> {
            let pending = st.pending_families().clone();
            let taken = st.take_changes().families;
            assert_eq!(pending, taken);
            taken.into_iter().collect()
        };
        st.apply_service(&dual("fd00::1"));
        assert_eq!(families(&mut st), [V4, V6]);
        st.apply_service(&dual("fd00::9"));
        assert_eq!(families(&mut st), [V6], "only the IPv6 address changed");
        st.apply_service(&svc("b", "10.0.0.2"));
        assert_eq!(families(&mut st), [V4]);
        st.apply_slice(&slice("a-1", "a", &["10.1.0.5"], None));
        assert_eq!(families(&mut st), [V4]);
        let mut v6 = slice("a-6", "a", &["fd00:1::5"], None);
        v6.address_type = "IPv6".to_string();
        st.apply_slice(&v6);
        assert_eq!(families(&mut st), [V6]);
        st.remove_slice("ns", "a-6");
        assert_eq!(families(&mut st), [V6]);
        st.remove_service(&ServiceName::new("ns".to_string(), "b".to_string()));
        assert_eq!(families(&mut st), [V4]);
        st.host_addresses_changed();
        assert_eq!(families(&mut st), [V4, V6]);
        st.apply_service(&dual("fd00::9"));
        assert!(families(&mut st).is_empty(), "no change, no family");
    }

    #[test]
    fn pending_changes_count_services_per_kind_until_taken() {
        let mut st = ClusterState::new("node1");
        assert_eq!(st.pending_changes(), (0, 0));
        st.apply_service(&svc("a", "172.30.0.1"));
        st.apply_service(&svc("a", "172.30.0.9"));
        st.apply_service(&svc("b", "172.30.0.2"));
        st.apply_slice(&slice("a-1", "a", &["10.0.0.5"], None));
        st.apply_slice(&slice("a-2", "a", &["10.0.0.6"], None));
        // Two services with Service changes, one with EndpointSlice changes (two slices).
        assert_eq!(st.pending_changes(), (2, 1));
        st.take_changes();
        assert_eq!(st.pending_changes(), (0, 0));
        st.remove_slice("ns", "a-2");
        assert_eq!(st.pending_changes(), (0, 1));
    }

    /// One random change to the cluster, for the refresh property below.
    #[derive(Debug, Clone)]
    enum Op {
        /// Service `svc{0}`: `Some((dual-stack, two ports, IP variant))` sets it, `None` deletes it.
        Service(u8, Option<(bool, bool, u8)>),
        /// Slice `s{0}`: `Some((service, IPv6, endpoint mask, local, terminating, port))` sets
        /// it (possibly moving it to another service), `None` deletes it.
        Slice(u8, Option<(u8, bool, u8, bool, bool, u16)>),
        /// The node's zone and IP.
        Node(u8),
        /// ServiceCIDR `c{0}` set to one of a few CIDR sets (none: deleted).
        Cidr(u8, u8),
        /// A relist of Services keeping those in the mask.
        RelistServices(u8),
        /// A relist of slices keeping those in the mask.
        RelistSlices(u8),
        /// A sync: the changes are taken and the kept models refreshed.
        Sync,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..4u8, proptest::option::of((any::<bool>(), any::<bool>(), 0..3u8)))
                .prop_map(|(i, v)| Op::Service(i, v)),
            5 => (
                0..6u8,
                proptest::option::of((0..4u8, any::<bool>(), any::<u8>(), any::<bool>(), any::<bool>(), 8080..8082u16))
            )
                .prop_map(|(i, v)| Op::Slice(i, v)),
            1 => (0..3u8).prop_map(Op::Node),
            1 => (0..2u8, 0..3u8).prop_map(|(i, v)| Op::Cidr(i, v)),
            1 => any::<u8>().prop_map(Op::RelistServices),
            1 => any::<u8>().prop_map(Op::RelistSlices),
            3 => Just(Op::Sync),
        ]
    }

    fn random_service(i: u8, (dual, two, ipv): (bool, bool, u8)) -> Service {
        let v4 = format!("172.30.{ipv}.{i}");
        let ips = if dual {
            vec![v4, format!("fd00::{ipv}:{i}")]
        } else {
            vec![v4]
        };
        let mut ports = vec![json!({"name": "p80", "port": 80})];
        if two {
            ports.push(json!({"name": "p81", "port": 81, "protocol": "UDP"}));
        }
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": format!("svc{i}")},
            "spec": {"clusterIPs": ips, "ports": ports,
                     "type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": 30000 + u16::from(i)}
        }))
        .unwrap()
    }

    fn random_slice(
        i: u8,
        (svc, v6, mask, local, term, port): (u8, bool, u8, bool, bool, u16),
    ) -> EndpointSlice {
        let eps: Vec<_> = (0..4u8)
            .filter(|b| mask & (1 << b) != 0)
            .map(|b| {
                let ip = if v6 {
                    format!("fd00:1::{b}")
                } else {
                    format!("10.0.0.{b}")
                };
                json!({"addresses": [ip], "nodeName": if local { "node1" } else { "node2" },
                       "conditions": {"ready": !term, "serving": true, "terminating": term}})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": format!("s{i}"),
                         "labels": {"kubernetes.io/service-name": format!("svc{svc}")}},
            "addressType": if v6 { "IPv6" } else { "IPv4" },
            "ports": [{"name": "p80", "port": port, "protocol": "TCP"},
                      {"name": "p81", "port": port + 1, "protocol": "UDP"}],
            "endpoints": eps
        }))
        .unwrap()
    }

    /// Applies `op`; a sync refreshes `models` (V4, V6) with the changes taken and checks each
    /// equals a fresh snapshot.
    fn apply_op(
        st: &mut ClusterState,
        op: &Op,
        services: &mut BTreeMap<u8, Service>,
        slices: &mut BTreeMap<u8, EndpointSlice>,
        models: &mut [ProxyModel; 2],
    ) {
        match op {
            Op::Service(i, Some(v)) => {
                let s = random_service(*i, *v);
                st.apply_service(&s);
                services.insert(*i, s);
            }
            Op::Service(i, None) => {
                st.remove_service(&ServiceName::new("ns", format!("svc{i}")));
                services.remove(i);
            }
            Op::Slice(i, Some(v)) => {
                let s = random_slice(*i, *v);
                st.apply_slice(&s);
                slices.insert(*i, s);
            }
            Op::Slice(i, None) => {
                st.remove_slice("ns", &format!("s{i}"));
                slices.remove(i);
            }
            Op::Node(z) => {
                let n: Node = serde_json::from_value(json!({
                    "metadata": {"name": "node1", "labels": {ZONE_LABEL_FOR_TESTS: format!("z{z}")}},
                    "status": {"addresses": [{"type": "InternalIP", "address": format!("10.9.0.{z}")}]}
                }))
                .unwrap();
                st.set_node(Some(&n));
            }
            Op::Cidr(i, v) => {
                let name = format!("c{i}");
                match v {
                    0 => st.remove_service_cidr(&name),
                    1 => {
                        st.apply_service_cidr(&service_cidr(&name, &["172.30.0.0/16"]));
                    }
                    _ => {
                        st.apply_service_cidr(&service_cidr(
                            &name,
                            &["172.31.0.0/16", "fd00::/64"],
                        ));
                    }
                }
            }
            Op::RelistServices(mask) => {
                services.retain(|i, _| mask & (1 << i) != 0);
                st.replace_services(services.values());
            }
            Op::RelistSlices(mask) => {
                slices.retain(|i, _| mask & (1 << i) != 0);
                st.replace_slices(slices.values());
            }
            Op::Sync => {
                let c = st.take_changes();
                for (model, family) in models.iter_mut().zip([IpFamily::V4, IpFamily::V6]) {
                    st.refresh(model, family, &c.services);
                    assert_eq!(
                        *model,
                        st.snapshot(family),
                        "{family:?} after {:?}",
                        c.services
                    );
                }
            }
        }
    }

    const ZONE_LABEL_FOR_TESTS: &str = crate::model::ZONE_LABEL;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(300))]

        /// A model kept by refreshing only the changed services equals a fresh snapshot after
        /// every sync, whatever the changes between syncs (moves, relists, dual stack, CIDRs).
        #[test]
        fn a_refreshed_model_equals_a_fresh_snapshot(ops in proptest::collection::vec(op(), 1..60)) {
            let mut st = ClusterState::new("node1");
            let mut models = [ProxyModel::default(), ProxyModel::default()];
            let (mut services, mut slices) = (BTreeMap::new(), BTreeMap::new());
            for op in ops.iter().chain([&Op::Sync]) {
                apply_op(&mut st, op, &mut services, &mut slices, &mut models);
            }
        }
    }
}
