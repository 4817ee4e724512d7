//! The daemon: wires configuration, kernel, servers, watchers and the sync loop together.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use kube::Client;

use crate::backend::{Backend, Kind};
use crate::config::{Invocation, ProxyOptions};
use crate::host::{HostSettings, NODE_WAIT_POLL, NODE_WAIT_TIMEOUT, NodeFacts};
use crate::kernel::IpFamily;
use crate::kernel::addrs::{AddressCache, Addresses};
use crate::kernel::iptables::{Iptables, detect_variant};
use crate::kernel::sysctl::{ConntrackSettings, SettingOutcome, Sysctl};
use crate::kubeconfig;
use crate::model::ClusterState;
use crate::server::events::{self, NodeEvents};
use crate::server::health::ProxyHealth;
use crate::server::http::{HttpServer, MetricsEndpoint, serve_healthz, serve_metrics};
use crate::server::metrics::Metrics;
use crate::server::reporter::DaemonReporter;
use crate::server::service_health::ServiceHealthServers;
use crate::sync::shared::Shared;
use crate::sync::{FULL_SYNC_PERIOD, SyncLoop, SyncSettings};

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Building the API client failed.
    #[error(transparent)]
    Client(#[from] crate::kubeconfig::ClientError),
    /// The kernel side could not be set up.
    #[error("{0}")]
    Kernel(#[from] crate::kernel::KernelError),
    /// A server could not bind with bindAddressHardFail set.
    #[error("{0}")]
    Server(#[from] crate::server::ServerError),
    /// The mode is not available.
    #[error("--proxy-mode={0} is not supported yet")]
    UnsupportedMode(String),
    /// Neither IP family can be proxied on this host (no working iptables nat table).
    #[error("neither IPv4 nor IPv6 can be proxied on this host (no usable iptables nat table)")]
    NoFamily,
    /// The backend cannot run on this host (no IPVS, old ipset, unknown scheduler, ...).
    #[error(transparent)]
    Backend(#[from] crate::backend::StartError),
    /// Start-up could not get the Node facts it needs (no podCIDR in NodeCIDR mode).
    #[error("{0}")]
    Host(#[from] crate::host::HostError),
    /// `--cleanup` failed.
    #[error("cleanup failed: {0}")]
    Cleanup(#[from] crate::backend::BackendError),
    /// The config file changed: upstream exits so the DaemonSet restarts it with the new one.
    #[error("the configuration file {0} changed; exiting so the new configuration is used")]
    ConfigChanged(String),
    /// A task that runs for the life of the daemon ended (returned or panicked).
    #[error(
        "the {task} task ended unexpectedly ({how}); exiting so kube-proxy-rs is restarted, rules stay in place"
    )]
    TaskEnded {
        /// Which task.
        task: &'static str,
        /// "returned", or the panic message.
        how: String,
    },
}

/// Builds the API client from `--kubeconfig`/`--master`, else the default kubeconfig, else
/// in-cluster.
pub async fn client(opts: &ProxyOptions) -> Result<Client, DaemonError> {
    let config = kubeconfig::config(opts.kubeconfig.as_deref(), opts.master.as_deref()).await?;
    Ok(kubeconfig::client(config)?)
}

fn conntrack_settings(opts: &ProxyOptions) -> ConntrackSettings {
    let c = &opts.conntrack;
    ConntrackSettings {
        max_per_core: u64::try_from(c.max_per_core).unwrap_or(0),
        min: u64::try_from(c.min).unwrap_or(0),
        tcp_established_timeout: c.tcp_established_timeout,
        tcp_close_wait_timeout: c.tcp_close_wait_timeout,
        tcp_be_liberal: c.tcp_be_liberal,
        udp_timeout: c.udp_timeout,
        udp_stream_timeout: c.udp_stream_timeout,
    }
}

/// Upstream's privileged start-up steps: oom_score_adj, conntrack sysctls (route_localnet
/// waits for the node facts: [`enable_route_localnet`]).
fn host_setup(opts: &ProxyOptions) {
    let sysctl = Sysctl::new();
    if let Err(e) = sysctl.set_oom_score_adj(opts.oom_score_adj) {
        tracing::warn!(error = %e, "could not set oom_score_adj");
    }
    let cpus = sysctl.num_cpus();
    for report in sysctl.apply_conntrack_settings(&conntrack_settings(opts), cpus) {
        match &report.outcome {
            SettingOutcome::Unchanged { .. } => {}
            SettingOutcome::Changed { from, to } => {
                tracing::info!(name = %report.name, from, to, "raised sysctl")
            }
            SettingOutcome::NotWritable { wanted, error } => {
                tracing::warn!(name = %report.name, wanted, error = %error, "sysctl not writable here, left as is")
            }
            SettingOutcome::Failed(e) => {
                tracing::error!(name = %report.name, error = %e, "setting sysctl failed")
            }
        }
    }
}

/// Node ports on loopback addresses need route_localnet, as upstream's iptables proxier sets
/// it; decided by the same node facts the renderer writes the localhost rules from.
fn enable_route_localnet(opts: &ProxyOptions, facts: &NodeFacts) {
    if !wants_route_localnet(opts, facts) {
        return;
    }
    if let Err(e) = Sysctl::new().write("net/ipv4/conf/all/route_localnet", "1") {
        tracing::warn!(error = %e, "could not enable route_localnet; localhost node ports will not work");
    }
}

fn wants_route_localnet(opts: &ProxyOptions, facts: &NodeFacts) -> bool {
    Kind::for_mode(opts.mode).is_some_and(Kind::uses_route_localnet) && facts.localhost_node_ports
}

async fn bind_or_warn(
    opts: &ProxyOptions,
    events: &NodeEvents,
    what: &str,
    r: Result<HttpServer, crate::server::ServerError>,
) -> Result<Option<HttpServer>, DaemonError> {
    let reason = if what == "healthz" {
        events::REASON_HEALTHZ_FAILED
    } else {
        events::REASON_METRICS_FAILED
    };
    match r {
        Ok(s) => {
            tracing::info!(address = %s.local_addr(), "{what} server listening");
            Ok(Some(s))
        }
        Err(e) if !opts.bind_address_hard_fail => {
            tracing::error!(error = %e, "{what} server not started");
            events.spawn_post(true, reason, e.to_string());
            Ok(None)
        }
        Err(e) => {
            // Fatal: wait for the Event before the process exits.
            let _ = events.post(true, reason, &e.to_string()).await;
            Err(e.into())
        }
    }
}

/// `--cleanup`: removes what every mode (ours or upstream's) created.
pub async fn cleanup() -> Result<(), DaemonError> {
    let variant = detect_variant(None).await?;
    // Every family the host has, as upstream's cleanup runs each family's proxier's.
    let mut families = Kind::Iptables.families(variant).await;
    if families.is_empty() {
        families.push(IpFamily::V4);
    }
    let mut result = Ok(());
    for family in families {
        let ipt = Iptables::new(variant, family);
        if let Err(e) = crate::backend::cleanup(&ipt).await {
            tracing::error!(%family, error = %e, "cleanup failed");
            result = Err(e);
        }
    }
    Ok(result?)
}

/// Runs the proxy until a signal or a fatal error.
pub async fn run(inv: Invocation) -> Result<(), DaemonError> {
    let opts = inv.options.clone();
    let Some(kind) = Kind::for_mode(opts.mode) else {
        return Err(DaemonError::UnsupportedMode(opts.mode.to_string()));
    };
    let client = client(&opts).await?;
    host_setup(&opts);

    let variant = detect_variant(None).await?;
    tracing::info!(variant = %variant, "using iptables");
    let random_fully = Iptables::new(variant, IpFamily::V4)
        .supports_random_fully()
        .await;
    let families = kind.families(variant).await;
    let mut backends = Vec::new();
    let mut tasks = Vec::new();
    let (addrs, address_changes) = address_watch(kind, &mut tasks).await;
    let mut nfacct = None;
    let mut first_error = None;
    for family in families {
        let ipt = Iptables::new(variant, family);
        match kind.start(&opts, ipt, random_fully, addrs.clone()).await {
            Ok(started) => {
                tracing::info!(%family, "proxier started");
                backends.push((family, started.backend));
                tasks.extend(started.tasks);
                nfacct = nfacct.or(started.nfacct);
            }
            // As upstream, a family this host cannot proxy leaves the other single-stack.
            Err(e) => {
                tracing::error!(%family, error = %e, "cannot proxy {family} on this host; continuing without it");
                first_error.get_or_insert(e);
            }
        }
    }
    if backends.is_empty() {
        return Err(first_error.map_or(DaemonError::NoFamily, DaemonError::from));
    }
    let metrics = match nfacct {
        Some(nfacct) => Metrics::with_nfacct(IpFamily::V4, nfacct),
        None => Metrics::new(),
    };
    serve(inv, client, backends, tasks, metrics, address_changes).await
}

/// The host's addresses from a cache rtnetlink events keep current, when `kind` follows them
/// (see [`Kind::follows_address_events`]), and what the cache's changes notify (for the
/// sync loop); without a subscription, plain per-sync listings and no notifications.
async fn address_watch(kind: Kind, tasks: &mut Vec<Task>) -> (Addresses, Option<Arc<Notify>>) {
    if !kind.follows_address_events() {
        return (Addresses::new(), None);
    }
    let changes = Arc::new(Notify::new());
    let notify = changes.clone();
    match AddressCache::watch(None, move || notify.notify_one()).await {
        Ok((cache, task)) => {
            tasks.push(("address watch", task));
            (Addresses::new().with_cache(cache), Some(changes))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow address changes; listing addresses every sync");
            (Addresses::new(), None)
        }
    }
}

/// Servers, watchers and the sync loop around `backends` (one per IP family), until a signal
/// or a fatal error (a changed config file, or any of the watchers, the sync loop or the
/// backends' own `tasks` ending). Each notification on `address_changes` (the host's
/// addresses changed) wakes a sync.
pub async fn serve<B: Backend + 'static>(
    inv: Invocation,
    client: Client,
    backends: Vec<(IpFamily, B)>,
    mut tasks: Vec<Task>,
    metrics: Metrics,
    address_changes: Option<Arc<Notify>>,
) -> Result<(), DaemonError> {
    let opts = inv.options.clone();
    let events = NodeEvents::new(client.clone(), &opts.hostname, &opts.hostname);
    let shared = Arc::new(Shared::new(ClusterState::new(&opts.hostname)));
    let health = ProxyHealth::new(opts.sync_period)
        .with_metrics(metrics.clone())
        .with_node_eligibility({
            let shared = shared.clone();
            move || shared.lock().node_eligible()
        });
    let _metrics_server = match opts.metrics_bind_address {
        Some(addr) => {
            bind_or_warn(
                &opts,
                &events,
                "metrics",
                serve_metrics(
                    addr,
                    MetricsEndpoint {
                        proxy_mode: opts.mode.to_string(),
                        metrics: metrics.clone(),
                        config: serde_json::to_value(&inv.config).unwrap_or_default(),
                    },
                ),
            )
            .await?
        }
        None => None,
    };
    let _healthz_server = match opts.healthz_bind_address {
        Some(addr) => {
            bind_or_warn(
                &opts,
                &events,
                "healthz",
                serve_healthz(addr, health.clone()),
            )
            .await?
        }
        None => None,
    };
    tasks.extend(
        crate::watch::watchers(client, &opts.hostname, shared.clone())
            .into_iter()
            .map(|(kind, watch)| (kind, tokio::spawn(watch))),
    );
    if let Some(changes) = address_changes {
        // A changed address may change rules (nodePortAddresses): sync without waiting for
        // a Service change.
        let shared = shared.clone();
        tasks.push((
            "address change wake-ups",
            tokio::spawn(async move {
                loop {
                    changes.notified().await;
                    shared.update(|st| st.host_addresses_changed());
                }
            }),
        ));
    }
    let abort_all = |tasks: &[Task]| tasks.iter().for_each(|(_, t)| t.abort());
    let host = HostSettings::from_options(&opts);
    let node = tokio::select! {
        node = host.wait_for_node(&shared, NODE_WAIT_POLL, NODE_WAIT_TIMEOUT) => node,
        _ = shutdown_signal() => {
            abort_all(&tasks);
            return Ok(());
        }
    };
    let node = node.inspect_err(|_| abort_all(&tasks))?;
    let facts: Vec<_> = backends
        .iter()
        .map(|(family, _)| host.facts(&node, *family))
        .collect();
    if let Some(v4) = facts.iter().find(|f| f.family == IpFamily::V4) {
        enable_route_localnet(&opts, v4);
    }
    // Upstream lists the addresses once, at start-up; the reporter follows node IP changes.
    let local = crate::host::local_addresses().await;
    let service_health = ServiceHealthServers::for_node_facts(&facts, &local, health.clone());
    let reporter = DaemonReporter::new(metrics, health, service_health)
        .with_primary(host.primary_family(&node))
        .with_facts(&facts);

    let settings = SyncSettings {
        min_sync_period: opts.min_sync_period,
        sync_period: opts.sync_period,
        full_sync_period: FULL_SYNC_PERIOD,
        host,
    };
    let sync = SyncLoop::new(shared, backends, reporter, settings).run(None);
    tasks.push((
        "sync",
        tokio::spawn(async move {
            sync.await;
        }),
    ));
    let aborts: Vec<_> = tasks.iter().map(|(_, t)| t.abort_handle()).collect();
    tracing::info!(node = %opts.hostname, mode = %opts.mode, "kube-proxy-rs started");
    // Upstream's "birth cry".
    events.spawn_post(false, events::REASON_STARTING, String::new());

    let config_watch = watch_config_file(opts.config_file.clone());
    let result = tokio::select! {
        _ = shutdown_signal() => {
            // As upstream: rules stay in place on exit so traffic keeps flowing.
            tracing::info!("signal received, exiting and leaving rules in place");
            Ok(())
        }
        changed = config_watch => Err(changed),
        ended = first_to_end(tasks) => Err(ended),
    };
    for task in aborts {
        task.abort();
    }
    result
}

/// A task that runs for the life of the daemon, with the name its end is reported under.
pub type Task = (&'static str, tokio::task::JoinHandle<()>);

/// Resolves when the first of `tasks` ends. None of them ends while the daemon is healthy (a
/// watcher or the sync loop that stopped would leave `/healthz` answering while nothing is
/// synced), so any end, return or panic, is an error that ends the process with a non-zero
/// status: the DaemonSet restarts it and the rules stay in place meanwhile.
pub async fn first_to_end(tasks: Vec<Task>) -> DaemonError {
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    let (names, handles): (Vec<_>, Vec<_>) = tasks.into_iter().unzip();
    let (result, index, _rest) = futures::future::select_all(handles).await;
    let task = names.get(index).copied().unwrap_or("unknown");
    let how = match result {
        Ok(()) => "returned".to_string(),
        Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
        Err(e) => e.to_string(),
    };
    tracing::error!(task, how = %how, "a daemon task ended unexpectedly, exiting");
    DaemonError::TaskEnded { task, how }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves when the config file's content or inode changes (upstream watches it with fsnotify
/// and exits); never resolves without a config file.
async fn watch_config_file(path: Option<std::path::PathBuf>) -> DaemonError {
    let Some(path) = path else {
        return std::future::pending().await;
    };
    let stamp = |p: &std::path::Path| std::fs::metadata(p).ok().and_then(|m| m.modified().ok());
    let content = |p: &std::path::Path| std::fs::read(p).ok();
    let (first_stamp, first_content) = (stamp(&path), content(&path));
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if stamp(&path) != first_stamp && content(&path) != first_content {
            return DaemonError::ConfigChanged(path.display().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_localnet_goes_with_the_localhost_node_port_rules() {
        for (addresses, want) in [
            ("127.0.0.2/32", true),
            ("127.0.0.0/8,192.168.0.0/16", true),
            ("192.168.0.0/16", false),
        ] {
            let args = crate::config::parse_render_args(
                &[format!("--nodeport-addresses={addresses}")],
                "node1",
            )
            .unwrap();
            let node = crate::model::NodeInfo::default();
            let facts = HostSettings::from_options(&args.options).facts(&node, IpFamily::V4);
            let rc = crate::backend::iptables::proxier::render_config(
                &args.options,
                &node,
                IpFamily::V4,
                vec!["127.0.0.2".parse().unwrap()],
            );
            assert_eq!(rc.effective_localhost_node_ports(), want, "{addresses}");
            assert_eq!(
                wants_route_localnet(&args.options, &facts),
                want,
                "{addresses}: route_localnet must follow the localhost node port rules"
            );
        }
    }

    async fn ended(tasks: Vec<Task>) -> (&'static str, String) {
        match tokio::time::timeout(Duration::from_secs(5), first_to_end(tasks)).await {
            Ok(DaemonError::TaskEnded { task, how }) => (task, how),
            Ok(other) => panic!("unexpected error {other}"),
            Err(_) => panic!("a task ended and nothing noticed"),
        }
    }

    #[tokio::test]
    async fn a_watcher_that_returns_ends_the_daemon() {
        let tasks: Vec<Task> = vec![
            ("Service", tokio::spawn(std::future::pending())),
            ("EndpointSlice", tokio::spawn(async {})),
            ("sync", tokio::spawn(std::future::pending())),
        ];
        assert_eq!(
            ended(tasks).await,
            ("EndpointSlice", "returned".to_string())
        );
    }

    #[tokio::test]
    async fn a_panicking_task_ends_the_daemon_with_its_message() {
        let tasks: Vec<Task> = vec![
            ("Node", tokio::spawn(async { panic!("bad node object") })),
            ("sync", tokio::spawn(std::future::pending())),
        ];
        let (task, how) = ended(tasks).await;
        assert_eq!(task, "Node");
        assert_eq!(how, "panicked: bad node object");
        let e = DaemonError::TaskEnded { task, how };
        assert!(
            e.to_string().contains("the Node task ended unexpectedly"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn each_watcher_is_its_own_task() {
        // One task joining all three hid the end of one watcher until all had ended.
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client");
        let shared = Arc::new(Shared::new(ClusterState::new("node1")));
        let kinds: Vec<&str> = crate::watch::watchers(client, "node1", shared)
            .into_iter()
            .map(|(kind, _)| kind)
            .collect();
        assert_eq!(kinds, ["Service", "EndpointSlice", "ServiceCIDR", "Node"]);
    }
}
