//! Watchers streaming Services, EndpointSlices and this Node into the model.
//!
//! kube-rs's watcher does the list/watch protocol (resourceVersion, bookmarks, relist on 410).
//! While a relist is in progress the previous state stays in force; the relisted objects are
//! swapped in only at `InitDone`, so an API-server outage never empties the rules.

pub mod file;

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::model::convert::SERVICE_LABEL_SELECTOR;
use crate::model::{ClusterState, ServiceName};
use crate::sync::shared::Shared;

/// How one kind of object updates the state.
trait Tracked: Sized {
    const KIND: &'static str;
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String>;
    fn delete(state: &mut ClusterState, obj: &Self);
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<String>;
    fn initial_list_done(shared: &Shared);
}

impl Tracked for Service {
    const KIND: &'static str = "Service";
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String> {
        state.apply_service(obj)
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        let ns = obj.metadata.namespace.clone().unwrap_or_default();
        let name = obj.metadata.name.clone().unwrap_or_default();
        state.remove_service(&ServiceName::new(ns, name));
    }
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<String> {
        state.replace_services(all.iter())
    }
    fn initial_list_done(shared: &Shared) {
        shared.set_services_synced();
    }
}

impl Tracked for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String> {
        state.apply_slice(obj)
    }
    fn delete(state: &mut ClusterState, obj: &Self) {
        let ns = obj.metadata.namespace.as_deref().unwrap_or_default();
        let name = obj.metadata.name.as_deref().unwrap_or_default();
        state.remove_slice(ns, name);
    }
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<String> {
        state.replace_slices(all.iter())
    }
    fn initial_list_done(shared: &Shared) {
        shared.set_slices_synced();
    }
}

impl Tracked for Node {
    const KIND: &'static str = "Node";
    fn apply(state: &mut ClusterState, obj: &Self) -> Vec<String> {
        state.set_node(Some(obj));
        Vec::new()
    }
    fn delete(state: &mut ClusterState, _obj: &Self) {
        state.set_node(None);
    }
    fn replace(state: &mut ClusterState, all: &[Self]) -> Vec<String> {
        state.set_node(all.first());
        Vec::new()
    }
    fn initial_list_done(_shared: &Shared) {}
}

/// Runs the three watchers until the process ends.
pub async fn run(client: Client, node_name: String, shared: Arc<Shared>) {
    let services = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_LABEL_SELECTOR),
    );
    let slices = watcher::watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels("!service.kubernetes.io/headless"),
    );
    let nodes = watcher::watcher(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    );
    tokio::join!(
        consume(services.default_backoff(), shared.clone()),
        consume(slices.default_backoff(), shared.clone()),
        consume(nodes.default_backoff(), shared),
    );
}

async fn consume<K, S>(stream: S, shared: Arc<Shared>)
where
    K: Tracked + kube::Resource,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    let mut relist: Option<Vec<K>> = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => handle(event, &shared, &mut relist),
            Err(e) => {
                // Keep the rules as they are; the watcher retries with backoff.
                tracing::warn!(kind = K::KIND, error = %e, "watch failed, keeping current rules and retrying");
            }
        }
    }
}

fn handle<K: Tracked + kube::Resource>(
    event: Event<K>,
    shared: &Shared,
    relist: &mut Option<Vec<K>>,
) {
    let warnings = match event {
        Event::Init => {
            *relist = Some(Vec::new());
            return;
        }
        Event::InitApply(obj) => {
            relist.get_or_insert_with(Vec::new).push(obj);
            return;
        }
        Event::InitDone => {
            let all = relist.take().unwrap_or_default();
            tracing::debug!(kind = K::KIND, count = all.len(), "initial list complete");
            let w = K::replace(&mut shared.lock(), &all);
            K::initial_list_done(shared);
            w
        }
        Event::Apply(obj) => K::apply(&mut shared.lock(), &obj),
        Event::Delete(obj) => {
            K::delete(&mut shared.lock(), &obj);
            Vec::new()
        }
    };
    for w in warnings {
        tracing::warn!(kind = K::KIND, "{w}");
    }
    shared.wake();
}
