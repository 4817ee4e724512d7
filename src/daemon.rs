//! The daemon: wires configuration, kernel, servers, watchers and the sync loop together.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::config::{Config as KubeConfig, KubeConfigOptions, Kubeconfig};

use crate::backend::Backend;
use crate::backend::iptables::proxier::{IptablesProxier, render_config, setup_nfacct};
use crate::backend::ipvs::ipvs_config;
use crate::backend::ipvs::proxier::{IpvsKernel, IpvsProxier, ipvs_settings};
use crate::config::{DetectLocal, Invocation, NodePortAddresses, ProxyMode, ProxyOptions};
use crate::kernel::IpFamily;
use crate::kernel::addrs::Addresses;
use crate::kernel::conntrack::Conntrack;
use crate::kernel::ipset::Ipset;
use crate::kernel::iptables::{Iptables, detect_variant};
use crate::kernel::ipvs::IpvsClient;
use crate::kernel::link::DummyLink;
use crate::kernel::nfacct::Nfacct;
use crate::kernel::sysctl::{ConntrackSettings, SettingOutcome, Sysctl};
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
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
    /// The kernel side could not be set up.
    #[error("{0}")]
    Kernel(#[from] crate::kernel::KernelError),
    /// A server could not bind with bindAddressHardFail set.
    #[error("{0}")]
    Server(#[from] crate::server::ServerError),
    /// The mode is not available.
    #[error("--proxy-mode={0} is not supported yet")]
    UnsupportedMode(String),
    /// IPVS mode cannot run on this host (no IPVS, old ipset, unknown scheduler, ...).
    #[error("{0}")]
    Ipvs(String),
    /// `--cleanup` failed.
    #[error("cleanup failed: {0}")]
    Cleanup(String),
    /// The config file changed: upstream exits so the DaemonSet restarts it with the new one.
    #[error("the configuration file {0} changed; exiting so the new configuration is used")]
    ConfigChanged(String),
}

/// Builds the API client from `--kubeconfig`/`--master`, else in-cluster, else the default
/// kubeconfig.
pub async fn client(opts: &ProxyOptions) -> Result<Client, DaemonError> {
    let err = |e: &dyn std::fmt::Display| DaemonError::Client(e.to_string());
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            KubeConfig::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => match &opts.master {
            Some(master) => KubeConfig::new(master.parse().map_err(|e| err(&e))?),
            None => KubeConfig::infer().await.map_err(|e| err(&e))?,
        },
    };
    if let (Some(master), Some(_)) = (&opts.master, &opts.kubeconfig) {
        config.cluster_url = master.parse().map_err(|e| err(&e))?;
    }
    Client::try_from(config).map_err(|e| err(&e))
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

/// Upstream's privileged start-up steps: oom_score_adj, conntrack sysctls, route_localnet.
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
    if opts.mode == ProxyMode::Iptables
        && opts.localhost_node_ports
        && localhost_in_node_ports(opts)
    {
        // Node ports on 127.0.0.1 need route_localnet, as upstream sets it.
        if let Err(e) = sysctl.write("net/ipv4/conf/all/route_localnet", "1") {
            tracing::warn!(error = %e, "could not enable route_localnet; localhost node ports will not work");
        }
    }
}

fn localhost_in_node_ports(opts: &ProxyOptions) -> bool {
    match &opts.node_port_addresses {
        NodePortAddresses::All => true,
        NodePortAddresses::Primary => false,
        NodePortAddresses::Cidrs(c) => c.iter().any(|c| c.contains(&IpAddr::from([127, 0, 0, 1]))),
    }
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

/// `--cleanup`: removes what iptables mode and IPVS mode (ours or upstream's) created, as
/// upstream's `--cleanup` tears down every mode. Every step runs; failures are reported
/// together.
pub async fn cleanup() -> Result<(), DaemonError> {
    let variant = detect_variant(None).await?;
    let ipt = Iptables::new(variant, IpFamily::V4);
    let mut errors = Vec::new();
    let first = IptablesProxier::cleanup(&ipt).await;
    if let Err(e) = IpvsProxier::cleanup(&ipt, &Ipset::new(), &DummyLink::default()).await {
        errors.push(format!("ipvs mode: {e}"));
    }
    // Both modes share chain names (KUBE-MARK-MASQ, jumped to from IPVS-mode chains): when
    // IPVS-mode rules were present the iptables-mode pass fails on them; once they are gone
    // a second pass completes it.
    if first.is_err()
        && let Err(e) = IptablesProxier::cleanup(&ipt).await
    {
        errors.push(format!("iptables mode: {e}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(DaemonError::Cleanup(errors.join("; ")))
    }
}

/// The IPVS backend: probes IPVS, sets its sysctls, starts the graceful-termination checker.
async fn ipvs_backend(
    opts: &ProxyOptions,
    ipt: Iptables,
    random_fully: bool,
) -> Result<IpvsProxier, DaemonError> {
    let client = IpvsClient::connect()
        .await
        .map_err(|e| DaemonError::Ipvs(format!("IPVS proxy mode cannot be used: {e}")))?;
    let mut config = ipvs_config(opts, &crate::model::NodeInfo::default(), Vec::new());
    config.random_fully = random_fully;
    let kernel = IpvsKernel {
        iptables: ipt,
        ipset: Ipset::new(),
        link: DummyLink::default(),
        conntrack: Conntrack::new(),
        addrs: Addresses::new(),
        sysctl: Sysctl::new(),
    };
    IpvsProxier::start(client, kernel, config, ipvs_settings(opts))
        .await
        .map_err(|e| DaemonError::Ipvs(e.to_string()))
}

/// Runs the proxy until a signal or a fatal error.
pub async fn run(inv: Invocation) -> Result<(), DaemonError> {
    let opts = inv.options.clone();
    if !matches!(opts.mode, ProxyMode::Iptables | ProxyMode::Ipvs) {
        return Err(DaemonError::UnsupportedMode(opts.mode.to_string()));
    }
    let client = client(&opts).await?;
    host_setup(&opts);

    let variant = detect_variant(None).await?;
    let ipt = Iptables::new(variant, IpFamily::V4);
    tracing::info!(variant = %variant, "using iptables");
    let random_fully = ipt.supports_random_fully().await;
    if opts.mode == ProxyMode::Ipvs {
        let backend = ipvs_backend(&opts, ipt, random_fully).await?;
        tracing::info!(scheduler = backend.config().scheduler(), "using IPVS");
        return serve(inv, client, backend, Metrics::new()).await;
    }
    let mut config = render_config(&opts, &crate::model::NodeInfo::default(), Vec::new());
    config.random_fully = random_fully;
    let nfacct = Nfacct::new();
    let metrics = if setup_nfacct(&nfacct, &mut config) {
        Metrics::with_nfacct(crate::server::IpFamily::V4, nfacct)
    } else {
        Metrics::new()
    };
    let backend = IptablesProxier::new(
        ipt,
        Conntrack::new(),
        Addresses::new(),
        config,
        opts.detect_local == DetectLocal::NodeCidr,
    );
    serve(inv, client, backend, metrics).await
}

/// Servers, watchers and the sync loop around `backend`, until a signal or a fatal error.
async fn serve<B: Backend + 'static>(
    inv: Invocation,
    client: Client,
    backend: B,
    metrics: Metrics,
) -> Result<(), DaemonError> {
    let opts = inv.options.clone();
    let events = NodeEvents::new(client.clone(), &opts.hostname, &opts.hostname);
    let health = ProxyHealth::new(opts.sync_period).with_metrics(metrics.clone());
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
    let hc_ips: Vec<IpAddr> = match &opts.node_port_addresses {
        NodePortAddresses::Cidrs(cidrs) => match Addresses::new().list().await {
            Ok(list) => list
                .into_iter()
                .map(|a| a.addr)
                .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
                .collect(),
            Err(_) => Vec::new(),
        },
        _ => Vec::new(),
    };
    let service_health = ServiceHealthServers::new(hc_ips, health.clone());
    let reporter = DaemonReporter::new(metrics, health, service_health);

    let shared = Arc::new(Shared::new(ClusterState::new(&opts.hostname)));
    let watchers = tokio::spawn(crate::watch::run(
        client,
        opts.hostname.clone(),
        shared.clone(),
    ));
    let settings = SyncSettings {
        min_sync_period: opts.min_sync_period,
        sync_period: opts.sync_period,
        full_sync_period: FULL_SYNC_PERIOD,
    };
    let sync = tokio::spawn(SyncLoop::new(shared, backend, reporter, settings).run(None));
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
        _ = sync => Ok(()),
    };
    watchers.abort();
    result
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
