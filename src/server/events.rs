//! Kubernetes Events on this proxy's Node (events.k8s.io/v1), as upstream kube-proxy records
//! them (KK: `cmd/kube-proxy/app/server.go`, `pkg/proxy/healthcheck/proxy_health.go`):
//! `Starting` once the proxy runs, `FailedToStartProxierHealthcheck` /
//! `FailedToStartMetricServer` when a server cannot listen, all with action `StartKubeProxy`,
//! regarding `Node/<name>` (upstream sets the reference's UID to the node name too), reported by
//! `kube-proxy` from instance `kube-proxy-<hostname>`.
//!
//! kube-proxy-rs adds `FailedToStartProxier` when it refuses to start: an invalid configuration
//! or a backend that cannot run. Upstream only logs those; an Event makes a crash-looping
//! DaemonSet pod explain itself in `kubectl describe node`.
//!
//! Posting is best effort: a failure is logged and never stops the proxy.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// `Starting` (Normal): the proxy is running.
pub const REASON_STARTING: &str = "Starting";
/// The health check server (`:10256`) could not listen.
pub const REASON_HEALTHZ_FAILED: &str = "FailedToStartProxierHealthcheck";
/// The metrics server (`:10249`) could not listen.
pub const REASON_METRICS_FAILED: &str = "FailedToStartMetricServer";
/// The proxy refuses to start (configuration refused, backend cannot start).
pub const REASON_PROXIER_FAILED: &str = "FailedToStartProxier";
/// Upstream's action for all of the above.
pub const ACTION: &str = "StartKubeProxy";

/// How long one post may take before it is given up (the API server may be unreachable).
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Records Events about one Node.
#[derive(Clone)]
pub struct NodeEvents {
    recorder: Recorder,
    node: ObjectReference,
}

impl std::fmt::Debug for NodeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEvents")
            .field("node", &self.node.name)
            .finish_non_exhaustive()
    }
}

/// Upstream's node reference: `Kind: Node, Name: name, UID: name`, no namespace (the Event
/// goes to `default`).
pub fn node_ref(node_name: &str) -> ObjectReference {
    ObjectReference {
        kind: Some("Node".to_string()),
        name: Some(node_name.to_string()),
        uid: Some(node_name.to_string()),
        ..ObjectReference::default()
    }
}

impl NodeEvents {
    /// Events about `node_name`, reported from `hostname` (client-go's reporting instance is
    /// `<controller>-<hostname>`).
    pub fn new(client: Client, node_name: &str, hostname: &str) -> Self {
        let reporter = Reporter {
            controller: "kube-proxy".to_string(),
            instance: Some(format!("kube-proxy-{hostname}")),
        };
        NodeEvents {
            recorder: Recorder::new(client, reporter),
            node: node_ref(node_name),
        }
    }

    /// Posts one Event and waits for the answer (at most [`POST_TIMEOUT`]). Failures are
    /// logged and returned.
    pub async fn post(&self, warning: bool, reason: &str, note: &str) -> Result<(), String> {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: (!note.is_empty()).then(|| note.to_string()),
            action: ACTION.to_string(),
            secondary: None,
        };
        let result =
            match tokio::time::timeout(POST_TIMEOUT, self.recorder.publish(&event, &self.node))
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {POST_TIMEOUT:?}")),
            };
        match &result {
            Ok(()) => tracing::debug!(reason, "event posted on the Node"),
            Err(e) => tracing::warn!(reason, error = %e, "could not post an event on the Node"),
        }
        result
    }

    /// Posts in the background (the caller does not wait).
    pub fn spawn_post(&self, warning: bool, reason: &'static str, note: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.post(warning, reason, &note).await;
        });
    }
}

/// Builds a client from a kubeconfig path (or the in-cluster config when `None`), for
/// posting an Event when the full option set is not available (the configuration was refused).
pub async fn client_for(
    kubeconfig: Option<&std::path::Path>,
    master: Option<&str>,
) -> Option<Client> {
    let config = match (kubeconfig, master) {
        // Only in a pod: a refused command line on a workstation must not post to
        // whatever ~/.kube/config points at.
        (None, None) => kube::Config::incluster().ok()?,
        _ => crate::kubeconfig::config(kubeconfig, master).await.ok()?,
    };
    crate::kubeconfig::client(config).ok()
}

/// Best effort, for `main`: when the command line or configuration is refused, find the API
/// server and node name the invocation would have used (flags `--kubeconfig`, `--master`,
/// `--hostname-override`, else the config file's `clientConnection.kubeconfig` and
/// `hostnameOverride`, decoded without validation, else the system hostname) and post
/// `FailedToStartProxier` with the error. Gives up silently when there is nothing to go on.
pub async fn report_refused_configuration(args: &[String], system_hostname: &str, error: &str) {
    let Ok(flags) = crate::config::flags::parse_args(args) else {
        return;
    };
    let file = flags
        .str("config")
        .filter(|p| !p.is_empty())
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| crate::config::decode_config(&text).ok())
        .map(|l| l.config);
    let non_empty = |s: Option<&str>| s.map(str::trim).filter(|s| !s.is_empty()).map(String::from);
    let kubeconfig = non_empty(flags.str("kubeconfig")).or_else(|| {
        file.as_ref()
            .and_then(|c| non_empty(Some(&c.client_connection.kubeconfig)))
    });
    let master = non_empty(flags.str("master"));
    let node = non_empty(flags.str("hostname-override"))
        .or_else(|| {
            file.as_ref()
                .and_then(|c| non_empty(Some(&c.hostname_override)))
        })
        .unwrap_or_else(|| system_hostname.to_string())
        .to_lowercase();
    if node.is_empty() {
        return;
    }
    let Some(client) = client_for(
        kubeconfig.as_deref().map(std::path::Path::new),
        master.as_deref(),
    )
    .await
    else {
        return;
    };
    let _ = NodeEvents::new(client, &node, system_hostname)
        .post(true, REASON_PROXIER_FAILED, error)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_reference_is_upstreams() {
        let r = node_ref("node-a");
        assert_eq!(r.kind.as_deref(), Some("Node"));
        assert_eq!(r.name.as_deref(), Some("node-a"));
        assert_eq!(r.uid.as_deref(), Some("node-a"));
        assert_eq!(r.namespace, None);
    }
}
