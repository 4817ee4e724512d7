//! Watchers streaming Services, EndpointSlices, ServiceCIDRs and this Node into the model.
//!
//! kube-rs's watcher does the list/watch protocol (resourceVersion, bookmarks, relist on 410).
//! While a relist is in progress the previous state stays in force; the relisted objects are
//! swapped in only at `InitDone`, so an API-server outage never empties the rules.
//!
//! Retries back off as client-go's reflector does (800 ms doubling to 30 s, jitter 1.0, reset
//! only once two minutes pass without a failure): thousands of nodes retrying at a steady rate
//! would keep an API server that is trying to recover down.

pub mod file;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::{Api, Client};

use crate::model::convert::ConvertedService;
use crate::model::convert::SERVICE_LABEL_SELECTOR;
use crate::model::state::ConvertedSlice;
use crate::model::{ClusterState, ServiceName};
use crate::sync::shared::Shared;

/// How one kind of object updates the state.
pub(crate) trait Tracked: Sized {
    const KIND: &'static str;
    /// What a relist holds of each object until it completes: the store's compact form
    /// where the objects are many (Services, EndpointSlices), so a relist of a large cluster
    /// never holds every API object at once.
    type Listed;
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String>;
    fn delete(state: &mut ClusterState, obj: &Self);
    /// Converts a relisted object; warnings are returned at once.
    fn listed(state: &ClusterState, obj: Self, warnings: &mut Vec<String>) -> Self::Listed;
    fn replace(state: &mut ClusterState, all: Vec<Self::Listed>) -> Vec<String>;
    fn initial_list_done(shared: &Shared);
    /// The API server may not serve this kind (it is newer than the cluster: 404) or not
    /// let us read it (a `system:node-proxier` older than the kind: 403): that is logged
    /// once and the proxy goes on without it, retrying quietly.
    const OPTIONAL: bool = false;
}

impl Tracked for Service {
    const KIND: &'static str = "Service";
    type Listed = Option<ConvertedService>;
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String> {
        state.apply_service(obj)
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        let ns = obj.metadata.namespace.clone().unwrap_or_default();
        let name = obj.metadata.name.clone().unwrap_or_default();
        state.remove_service(&ServiceName::new(ns, name));
    }
    fn listed(_state: &ClusterState, obj: Self, warnings: &mut Vec<String>) -> Self::Listed {
        ClusterState::convert_service(&obj, warnings)
    }
    fn replace(state: &mut ClusterState, all: Vec<Self::Listed>) -> Vec<String> {
        state.replace_converted_services(all.into_iter().flatten().collect());
        Vec::new()
    }
    fn initial_list_done(shared: &Shared) {
        shared.set_services_synced();
    }
}

impl Tracked for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    type Listed = ConvertedSlice;
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String> {
        state.apply_slice(obj)
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        let ns = obj.metadata.namespace.as_deref().unwrap_or_default();
        let name = obj.metadata.name.as_deref().unwrap_or_default();
        state.remove_slice(ns, name);
    }
    fn listed(state: &ClusterState, obj: Self, warnings: &mut Vec<String>) -> Self::Listed {
        state.convert_slice(&obj, warnings)
    }
    fn replace(state: &mut ClusterState, all: Vec<Self::Listed>) -> Vec<String> {
        state.replace_converted_slices(all);
        Vec::new()
    }
    fn initial_list_done(shared: &Shared) {
        shared.set_slices_synced();
    }
}

impl Tracked for Node {
    const KIND: &'static str = "Node";
    type Listed = Node;
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String> {
        state.set_node(Some(obj));
        Vec::new()
    }
    fn delete(state: &mut ClusterState, _obj: &Self) {
        state.set_node(None);
    }
    fn listed(_state: &ClusterState, obj: Self, _warnings: &mut Vec<String>) -> Self::Listed {
        obj
    }
    fn replace(state: &mut ClusterState, all: Vec<Self::Listed>) -> Vec<String> {
        state.set_node(all.first());
        Vec::new()
    }
    fn initial_list_done(_shared: &Shared) {}
}

impl Tracked for ServiceCIDR {
    const KIND: &'static str = "ServiceCIDR";
    const OPTIONAL: bool = true;
    type Listed = ServiceCIDR;
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String> {
        state.apply_service_cidr(obj)
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        state.remove_service_cidr(obj.metadata.name.as_deref().unwrap_or_default());
    }
    fn listed(_state: &ClusterState, obj: Self, _warnings: &mut Vec<String>) -> Self::Listed {
        obj
    }
    fn replace(state: &mut ClusterState, all: Vec<Self::Listed>) -> Vec<String> {
        state.replace_service_cidrs(&all)
    }
    // Upstream does not wait for ServiceCIDRs before the first sync.
    fn initial_list_done(_shared: &Shared) {}
}

/// The four watchers, each to be run as its own task: `(kind, future)`. None of them returns
/// while the process is healthy, so one that does is a failure for the daemon to act on.
pub fn watchers(
    client: Client,
    node_name: &str,
    shared: Arc<Shared>,
) -> Vec<(&'static str, futures::future::BoxFuture<'static, ()>)> {
    let services = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
    );
    let slices = watcher::watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels("!service.kubernetes.io/headless"),
    );
    let cidrs = watcher::watcher(
        Api::<ServiceCIDR>::all(client.clone()),
        watcher::Config::default(),
    );
    let nodes = watcher::watcher(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    );
    vec![
        (Service::KIND, consume(services, shared.clone()).boxed()),
        (EndpointSlice::KIND, consume(slices, shared.clone()).boxed()),
        (ServiceCIDR::KIND, consume(cidrs, shared.clone()).boxed()),
        (Node::KIND, consume(nodes, shared).boxed()),
    ]
}

/// Applies the watch events to the state; after a failure waits for the next backoff step
/// before polling the watcher again (which is what makes it retry).
///
/// Not kube's `StreamBackoff`: it resets the backoff on every successful item, and the watcher
/// yields `Init` before every list attempt, so a server refusing every list was retried every
/// 0.8 s forever. Here only the backoff's own timer resets it: client-go's reflector resets after
/// two minutes without a failure.
async fn consume<K, S>(stream: S, shared: Arc<Shared>)
where
    K: Tracked + kube::Resource,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    let mut backoff = DefaultBackoff::default();
    let mut relist: Option<Vec<K::Listed>> = None;
    let mut absent_logged = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => handle(event, &shared, &mut relist),
            Err(e) => {
                // The default backoff never runs out; the cap is only a fallback.
                let delay = backoff.next().unwrap_or(MAX_RETRY_DELAY);
                if let Some(code) = unavailable_kind(&e).filter(|_| K::OPTIONAL) {
                    // Still retried: the server may be upgraded under us.
                    if !std::mem::replace(&mut absent_logged, true) {
                        tracing::info!(
                            kind = K::KIND,
                            code,
                            "the API server does not serve this kind; going on without it"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    continue;
                }
                tracing::warn!(
                    kind = K::KIND,
                    error = %e,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "watch failed, keeping current rules and retrying"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The status (404 or 403) when the list or watch failed because the server has no such
/// resource or does not let us read it.
fn unavailable_kind(e: &watcher::Error) -> Option<u16> {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return None,
    };
    [403, 404].contains(&code).then_some(code)
}

/// client-go's backoff cap.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Applies one watch event (a relist is held back until `InitDone`); the sync loop is woken
/// only when the state recorded a change it acts on.
pub(crate) fn handle<K: Tracked + kube::Resource>(
    event: Event<K>,
    shared: &Shared,
    relist: &mut Option<Vec<K::Listed>>,
) {
    let warnings = match event {
        Event::Init => {
            *relist = Some(Vec::new());
            return;
        }
        Event::InitApply(obj) => {
            let mut warnings = Vec::new();
            let listed = K::listed(&shared.lock(), obj, &mut warnings);
            relist.get_or_insert_with(Vec::new).push(listed);
            warnings
        }
        Event::InitDone => {
            let all = relist.take().unwrap_or_default();
            tracing::debug!(kind = K::KIND, count = all.len(), "initial list complete");
            let w = shared.update(|st| K::replace(st, all));
            K::initial_list_done(shared);
            w
        }
        Event::Apply(obj) => shared.update(|st| K::apply(st, &obj)),
        Event::Delete(obj) => {
            shared.update(|st| K::delete(st, &obj));
            Vec::new()
        }
    };
    for w in warnings {
        tracing::warn!(kind = K::KIND, "{w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClusterState;

    /// Whether the sync loop would wake now; then it takes the changes, as a sync does.
    async fn woken(shared: &Shared) -> bool {
        let woken = tokio::time::timeout(Duration::from_millis(1), shared.woken())
            .await
            .is_ok();
        shared.taking_changes();
        woken
    }

    fn node(heartbeat: &str, zone: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": format!("2026-11-29T{heartbeat}:00Z")}]
            }
        }))
        .unwrap()
    }

    fn svc(ip: &str, rv: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "a", "resourceVersion": rv},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn only_events_that_change_what_the_proxy_uses_wake_the_sync_loop() {
        let shared = Shared::new(ClusterState::new("node1"));
        handle(Event::Apply(node("06:00", "a")), &shared, &mut None);
        assert!(woken(&shared).await, "first sight of the Node");
        handle(Event::Apply(node("06:01", "a")), &shared, &mut None);
        assert!(!woken(&shared).await, "a heartbeat");
        handle(Event::Apply(node("06:02", "b")), &shared, &mut None);
        assert!(woken(&shared).await, "a zone change");

        handle(Event::Apply(svc("10.0.0.1", "1")), &shared, &mut None);
        assert!(woken(&shared).await, "a new Service");
        handle(Event::Apply(svc("10.0.0.1", "2")), &shared, &mut None);
        assert!(!woken(&shared).await, "a no-op Service update");
        handle(Event::Delete(svc("10.0.0.1", "3")), &shared, &mut None);
        assert!(woken(&shared).await, "a deletion");
    }

    fn named_svc(name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": name},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_relist_converts_as_it_goes_but_swaps_in_only_at_init_done() {
        let shared = Shared::new(ClusterState::new("node1"));
        let mut relist = None;
        handle(
            Event::Apply(named_svc("old", "10.0.0.1")),
            &shared,
            &mut relist,
        );
        let names = |shared: &Shared| -> Vec<String> {
            let m = shared.lock().snapshot(crate::model::IpFamily::V4);
            m.services.keys().map(|k| k.service.name.clone()).collect()
        };
        handle(Event::<Service>::Init, &shared, &mut relist);
        handle(
            Event::InitApply(named_svc("new", "10.0.0.2")),
            &shared,
            &mut relist,
        );
        // Unusable: still listed, so a stored Service of that name would be removed.
        handle(
            Event::InitApply(named_svc("bad", "none")),
            &shared,
            &mut relist,
        );
        assert_eq!(
            names(&shared),
            ["old"],
            "the old state stays in force during a relist"
        );
        assert_eq!(relist.as_ref().map(Vec::len), Some(2));
        handle(Event::<Service>::InitDone, &shared, &mut relist);
        assert_eq!(
            names(&shared),
            ["new"],
            "the relist replaced everything at InitDone"
        );
        assert!(relist.is_none());
    }
}
