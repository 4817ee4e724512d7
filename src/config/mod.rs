//! Flags and the KubeProxyConfiguration file, parsed and validated like upstream.
//!
//! [`parse_command_line`] turns argv into an [`Invocation`]: the resolved [`ProxyOptions`],
//! the effective [`KubeProxyConfiguration`] (for `/configz` and `--write-config-to`), warnings
//! for `main` to log, and the [`Action`] to take.
//!
//! Precedence follows upstream `cmd/kube-proxy/app/options.go`: without `--config`, flags
//! apply over the defaults; with `--config`, the file wins and only the logging flags,
//! `--hostname-override` and `--master` (plus the action flags) still apply.

pub mod duration;
pub mod error;
pub mod file;
pub mod flags;
pub mod netutil;
pub mod options;
pub mod types;
pub mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use duration::{DurationError, GoDuration};
pub use error::{ConfigError, FieldError};
pub use file::{LoadedConfig, decode_config, load_config_file};
pub use flags::{FlagKind, FlagScope, FlagSpec, FlagStatus, flag_table, usage};
pub use options::{
    ConntrackOptions, DetectLocal, IpvsOptions, LogFormat, NodePortAddresses, ProxyMode,
    ProxyOptions,
};
pub use types::{API_VERSION, KIND, KubeProxyConfiguration};

use crate::model::Cidr;
use flags::{FlagValue, ParsedFlags};
use netutil::{append_port_if_needed, parse_cidr_sloppy, parse_host_port, parse_ip_sloppy};
use types::{HEALTHZ_PORT, METRICS_PORT, VModuleItem};
use validate::{mode_section, split_cluster_cidrs};

/// What the process should do after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the proxy.
    Run,
    /// `--cleanup`: remove rules of every mode and exit.
    Cleanup,
    /// `--init-only`: do the privileged setup and exit.
    InitOnly,
    /// `--write-config-to`: write [`Invocation::config`] there (see [`write_config_file`])
    /// and exit 0.
    WriteConfig(PathBuf),
    /// `--version`: print the version and exit 0.
    Version,
    /// `-h`/`--help`: print this usage text and exit 0.
    Help(String),
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// Resolved, typed, validated options.
    pub options: ProxyOptions,
    /// The effective configuration (v1alpha1 shape, as `--write-config-to` writes it).
    pub config: KubeProxyConfiguration,
    /// Warnings for `main` to log.
    pub warnings: Vec<String>,
    /// What to do.
    pub action: Action,
}

/// Arguments of the `render` subcommand.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderArgs {
    /// Resolved options.
    pub options: ProxyOptions,
    /// `--node-ip` values (repeatable, comma-separated allowed): the node's addresses, instead of
    /// the Node object's; the first IPv4 one is the primary node IP.
    pub node_ips: Vec<IpAddr>,
    /// `--objects` files (may be empty; the caller supplies a default).
    pub objects: Vec<PathBuf>,
    /// Warnings for the caller to print.
    pub warnings: Vec<String>,
}

/// Parses kube-proxy's command line (`args` without argv\[0\]). Reads the `--config` file if
/// given. `system_hostname` is used when no hostname override is configured.
pub fn parse_command_line(
    args: &[String],
    system_hostname: &str,
) -> Result<Invocation, ConfigError> {
    let parsed = flags::parse_args(args).map_err(ConfigError::Flag)?;
    if parsed.bool("help") == Some(true) {
        return Ok(defaults_invocation(system_hostname, Action::Help(usage())));
    }
    let positional: Vec<String> = parsed
        .positional
        .iter()
        .filter(|a| !a.is_empty())
        .cloned()
        .collect();
    if !positional.is_empty() {
        return Err(ConfigError::UnexpectedArguments(positional));
    }
    if parsed
        .str("version")
        .is_some_and(|v| v == "raw" || flags::parse_go_bool(v) == Ok(true))
    {
        return Ok(defaults_invocation(system_hostname, Action::Version));
    }
    let built = build(&parsed, system_hostname, &[])?;
    let action = if let Some(path) = parsed.str("write-config-to").filter(|p| !p.is_empty()) {
        Action::WriteConfig(PathBuf::from(path))
    } else if parsed.bool("cleanup") == Some(true) {
        Action::Cleanup
    } else if parsed.bool("init-only") == Some(true) {
        Action::InitOnly
    } else {
        Action::Run
    };
    Ok(Invocation {
        options: built.options,
        config: built.config,
        warnings: built.warnings,
        action,
    })
}

/// Parses `render [--proxy-mode M] [--config F] [--hostname-override N] [--cluster-cidr C]
/// [--node-ip IP] [--objects FILE...]` (a leading `render` is skipped). Every kube-proxy flag
/// is accepted too; unlike the daemon, `--proxy-mode` and `--cluster-cidr` override the
/// config file, since render is a what-if tool.
pub fn parse_render_args(
    args: &[String],
    system_hostname: &str,
) -> Result<RenderArgs, ConfigError> {
    let args = match args.first() {
        Some(first) if first == "render" => &args[1..],
        _ => args,
    };
    let mut rest = Vec::new();
    let mut node_ips = Vec::new();
    let mut objects = Vec::new();
    let mut i = 0;
    let add_ips = |value: &str, out: &mut Vec<IpAddr>| -> Result<(), ConfigError> {
        for part in value.split(',').filter(|p| !p.is_empty()) {
            let ip = parse_ip_sloppy(part).ok_or_else(|| {
                ConfigError::Flag(format!(
                    "invalid argument {value:?} for \"--node-ip\" flag: {part:?} is not a valid IP address"
                ))
            })?;
            out.push(ip);
        }
        Ok(())
    };
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            rest.extend(args[i - 1..].iter().cloned());
            break;
        }
        if let Some(v) = arg.strip_prefix("--node-ip=") {
            add_ips(v, &mut node_ips)?;
        } else if arg == "--node-ip" {
            let v = args
                .get(i)
                .ok_or_else(|| ConfigError::Flag("flag needs an argument: --node-ip".into()))?;
            i += 1;
            add_ips(v, &mut node_ips)?;
        } else if let Some(v) = arg.strip_prefix("--objects=") {
            objects.push(PathBuf::from(v));
        } else if arg == "--objects" {
            let start = objects.len();
            while let Some(next) = args.get(i) {
                if next.starts_with('-') && next.len() > 1 {
                    break;
                }
                objects.push(PathBuf::from(next));
                i += 1;
            }
            if objects.len() == start {
                return Err(ConfigError::Flag(
                    "flag needs an argument: --objects".to_string(),
                ));
            }
        } else {
            rest.push(arg.clone());
        }
    }
    let parsed = flags::parse_args(&rest).map_err(ConfigError::Flag)?;
    let positional: Vec<String> = parsed
        .positional
        .iter()
        .filter(|a| !a.is_empty())
        .cloned()
        .collect();
    if !positional.is_empty() {
        return Err(ConfigError::Flag(format!(
            "render does not take positional arguments, got {positional:?}"
        )));
    }
    let built = build(&parsed, system_hostname, &["proxy-mode", "cluster-cidr"])?;
    Ok(RenderArgs {
        options: built.options,
        node_ips,
        objects,
        warnings: built.warnings,
    })
}

/// Writes `config` as YAML (what `--write-config-to` does).
pub fn write_config_file(config: &KubeProxyConfiguration, path: &Path) -> Result<(), ConfigError> {
    std::fs::write(path, config.to_yaml()).map_err(|e| ConfigError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The values upstream keeps in its internal config rather than per mode section.
#[derive(Debug, Clone, Copy)]
struct Internal {
    sync_period: GoDuration,
    min_sync_period: GoDuration,
    masquerade_all: bool,
}

impl Internal {
    /// What upstream's v1alpha1→internal conversion picks for the config's mode.
    fn from_config(c: &KubeProxyConfiguration) -> Self {
        let (sync_period, min_sync_period) = match c.mode.as_str() {
            "ipvs" => (c.ipvs.sync_period, c.ipvs.min_sync_period),
            "nftables" => (c.nftables.sync_period, c.nftables.min_sync_period),
            _ => (c.iptables.sync_period, c.iptables.min_sync_period),
        };
        let masquerade_all = if c.mode == "nftables" {
            c.nftables.masquerade_all
        } else {
            c.iptables.masquerade_all
        };
        Internal {
            sync_period,
            min_sync_period,
            masquerade_all,
        }
    }

    /// Writes the values back like the internal→v1alpha1 conversion: only the mode's section
    /// carries them, the other sections are zero.
    fn store(self, c: &mut KubeProxyConfiguration) {
        let zero = GoDuration::ZERO;
        for (sync, min) in [
            (&mut c.iptables.sync_period, &mut c.iptables.min_sync_period),
            (&mut c.ipvs.sync_period, &mut c.ipvs.min_sync_period),
            (&mut c.nftables.sync_period, &mut c.nftables.min_sync_period),
        ] {
            *sync = zero;
            *min = zero;
        }
        let nft = c.mode == "nftables";
        c.iptables.masquerade_all = !nft && self.masquerade_all;
        c.nftables.masquerade_all = nft && self.masquerade_all;
        let (sync, min) = match c.mode.as_str() {
            "ipvs" => (&mut c.ipvs.sync_period, &mut c.ipvs.min_sync_period),
            "nftables" => (&mut c.nftables.sync_period, &mut c.nftables.min_sync_period),
            _ => (&mut c.iptables.sync_period, &mut c.iptables.min_sync_period),
        };
        *sync = self.sync_period;
        *min = self.min_sync_period;
    }
}

struct Built {
    options: ProxyOptions,
    config: KubeProxyConfiguration,
    warnings: Vec<String>,
}

/// The invocation for `--help`/`--version`, which upstream answers before loading anything.
fn defaults_invocation(system_hostname: &str, action: Action) -> Invocation {
    let host = if system_hostname.trim().is_empty() {
        "localhost"
    } else {
        system_hostname
    };
    let built = build(&ParsedFlags::default(), host, &[])
        .unwrap_or_else(|e| unreachable!("the default configuration is valid: {e}"));
    Invocation {
        options: built.options,
        config: built.config,
        warnings: Vec::new(),
        action,
    }
}

fn status_warnings(parsed: &ParsedFlags, warnings: &mut Vec<String>) {
    for spec in flag_table() {
        if !parsed.changed(spec.name) {
            continue;
        }
        match spec.status {
            FlagStatus::Supported => {}
            FlagStatus::Deprecated(why) => {
                warnings.push(format!("flag --{} has been deprecated, {why}", spec.name));
            }
            FlagStatus::NoEffect(why) => {
                warnings.push(format!(
                    "flag --{} has no effect on Linux ({why}); ignoring it",
                    spec.name
                ));
            }
        }
    }
}

fn build(
    parsed: &ParsedFlags,
    system_hostname: &str,
    forced: &[&str],
) -> Result<Built, ConfigError> {
    let mut warnings = Vec::new();
    status_warnings(parsed, &mut warnings);
    let config_file = parsed
        .str("config")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);

    let mut cfg;
    let mut internal;
    if let Some(path) = &config_file {
        let (loaded, w) = load_config_file(path)?;
        warnings.extend(w);
        cfg = loaded;
        cfg.set_defaults();
        let file_vmodule = std::mem::take(&mut cfg.logging.vmodule);
        for name in &parsed.order {
            let spec = flag_table()
                .iter()
                .find(|f| f.name == *name)
                .expect("parsed flags come from the table");
            let value = &parsed.values[name];
            if forced.contains(name) {
                apply_config_flag(&mut cfg, &mut None, name, value);
                if *name == "masquerade-all" {
                    cfg.iptables.masquerade_all = value == &FlagValue::Bool(true);
                    cfg.nftables.masquerade_all = cfg.iptables.masquerade_all;
                }
                continue;
            }
            match spec.scope {
                FlagScope::Logging => apply_logging_flag(&mut cfg, name, value),
                FlagScope::Config if spec.supported_on_linux() => warnings.push(format!(
                    "flag --{name} is ignored because --config is set (the config file wins)"
                )),
                _ => {}
            }
        }
        // Command-line vmodule entries take precedence, then the file's.
        cfg.logging.vmodule.extend(file_vmodule);
        internal = Internal::from_config(&cfg);
        non_linux_warnings(&cfg, &mut warnings);
    } else {
        cfg = KubeProxyConfiguration::defaulted();
        // Upstream's internal default comes from converting the defaulted v1alpha1 object
        // with mode "", i.e. from the iptables section (30s / 1s), whatever mode is chosen.
        internal = Internal::from_config(&cfg);
        let mut masq = None;
        for name in &parsed.order {
            let value = &parsed.values[name];
            apply_config_flag(&mut cfg, &mut masq, name, value);
            apply_logging_flag(&mut cfg, name, value);
        }
        if let Some(m) = masq {
            internal.masquerade_all = m;
        }
        // processV1Alpha1Flags: the iptables-* periods apply unless mode is ipvs, the ipvs-*
        // ones only when it is.
        let ipvs = cfg.mode == "ipvs";
        for (flag, is_min, applies) in [
            ("iptables-sync-period", false, !ipvs),
            ("iptables-min-sync-period", true, !ipvs),
            ("ipvs-sync-period", false, ipvs),
            ("ipvs-min-sync-period", true, ipvs),
        ] {
            let Some(d) = parsed.duration(flag) else {
                continue;
            };
            if !applies {
                warnings.push(format!(
                    "flag --{flag} has no effect in {} mode",
                    if cfg.mode.is_empty() {
                        "iptables"
                    } else {
                        &cfg.mode
                    }
                ));
                continue;
            }
            if is_min {
                internal.min_sync_period = d;
            } else {
                internal.sync_period = d;
            }
        }
        // Deprecated --healthz-port / --metrics-port: 0 disables, otherwise a bare IP gets
        // the port (addressFromDeprecatedFlags).
        let healthz_port = parsed
            .int("healthz-port")
            .unwrap_or(i32::from(HEALTHZ_PORT));
        let metrics_port = parsed
            .int("metrics-port")
            .unwrap_or(i32::from(METRICS_PORT));
        cfg.healthz_bind_address =
            address_from_deprecated_flags(&cfg.healthz_bind_address, healthz_port);
        cfg.metrics_bind_address =
            address_from_deprecated_flags(&cfg.metrics_bind_address, metrics_port);
        if cfg.mode == "nftables" && parsed.changed("iptables-masquerade-bit") {
            warnings.push(
                "flag --iptables-masquerade-bit has no effect in nftables mode (nftables.masqueradeBit applies)"
                    .to_string(),
            );
        }
    }

    // --hostname-override always applies: trimmed, lowercased, and empty after trimming is
    // an error.
    if let Some(h) = parsed.str("hostname-override").filter(|h| !h.is_empty()) {
        let trimmed = h.trim();
        if trimmed.is_empty() {
            return Err(ConfigError::Hostname(
                "empty hostname-override is invalid".to_string(),
            ));
        }
        cfg.hostname_override = trimmed.to_lowercase();
    }

    // platformApplyDefaults (Linux).
    let explicit_detect_local_mode = cfg.detect_local_mode.clone();
    if cfg.mode.is_empty() {
        cfg.mode = "iptables".to_string();
    }
    if cfg.mode == "nftables" && cfg.node_port_addresses.as_ref().is_none_or(Vec::is_empty) {
        cfg.node_port_addresses = Some(vec!["primary".to_string()]);
    }
    if cfg.detect_local_mode.is_empty() {
        cfg.detect_local_mode = "ClusterCIDR".to_string();
    }
    internal.store(&mut cfg);

    let errors = validate::validate(&cfg);
    if !errors.is_empty() {
        return Err(ConfigError::Invalid(errors));
    }
    let options = resolve(
        &cfg,
        &internal,
        &explicit_detect_local_mode,
        parsed.str("master"),
        system_hostname,
        config_file,
        &mut warnings,
    )?;
    Ok(Built {
        options,
        config: cfg,
        warnings,
    })
}

fn address_from_deprecated_flags(addr: &str, port: i32) -> String {
    if port == 0 {
        return String::new();
    }
    match u16::try_from(port) {
        Ok(p) => append_port_if_needed(addr, p),
        Err(_) => addr.to_string(),
    }
}

/// Sets the config field behind a configuration flag. `masquerade_all` receives
/// `--masquerade-all` (an internal value upstream); `None` means "write it to the section".
fn apply_config_flag(
    cfg: &mut KubeProxyConfiguration,
    masquerade_all: &mut Option<bool>,
    name: &str,
    value: &FlagValue,
) {
    let s = || match value {
        FlagValue::Str(s) => s.clone(),
        _ => String::new(),
    };
    let b = || matches!(value, FlagValue::Bool(true));
    let i = || match value {
        FlagValue::Int(n) => *n,
        _ => 0,
    };
    let d = || match value {
        FlagValue::Duration(d) => *d,
        _ => GoDuration::ZERO,
    };
    let list = || match value {
        FlagValue::List(l) => l.clone(),
        _ => Vec::new(),
    };
    match name {
        "feature-gates" => {
            if let FlagValue::Map(m) = value {
                cfg.feature_gates
                    .extend(m.iter().map(|(k, v)| (k.clone(), *v)));
            }
        }
        "kubeconfig" => cfg.client_connection.kubeconfig = s(),
        "kube-api-content-type" => cfg.client_connection.content_type = s(),
        "kube-api-burst" => cfg.client_connection.burst = i(),
        "kube-api-qps" => {
            if let FlagValue::Float(f) = value {
                cfg.client_connection.qps = *f;
            }
        }
        "bind-address" => cfg.bind_address = s(),
        "healthz-bind-address" => cfg.healthz_bind_address = s(),
        "metrics-bind-address" => cfg.metrics_bind_address = s(),
        "bind-address-hard-fail" => cfg.bind_address_hard_fail = b(),
        "profiling" => cfg.enable_profiling = b(),
        "show-hidden-metrics-for-version" => cfg.show_hidden_metrics_for_version = s(),
        "proxy-mode" => cfg.mode = s(),
        "iptables-masquerade-bit" => cfg.iptables.masquerade_bit = Some(i()),
        "masquerade-all" => *masquerade_all = Some(b()),
        "iptables-localhost-nodeports" => cfg.iptables.localhost_node_ports = Some(b()),
        "ipvs-scheduler" => cfg.ipvs.scheduler = s(),
        "ipvs-exclude-cidrs" => cfg.ipvs.exclude_cidrs = Some(list()),
        "ipvs-strict-arp" => cfg.ipvs.strict_arp = b(),
        "ipvs-tcp-timeout" => cfg.ipvs.tcp_timeout = d(),
        "ipvs-tcpfin-timeout" => cfg.ipvs.tcp_fin_timeout = d(),
        "ipvs-udp-timeout" => cfg.ipvs.udp_timeout = d(),
        "detect-local-mode" => cfg.detect_local_mode = s(),
        "pod-bridge-interface" => cfg.detect_local.bridge_interface = s(),
        "pod-interface-name-prefix" => cfg.detect_local.interface_name_prefix = s(),
        "cluster-cidr" => cfg.cluster_cidr = s(),
        "nodeport-addresses" => cfg.node_port_addresses = Some(list()),
        "oom-score-adj" => cfg.oom_score_adj = Some(i()),
        "conntrack-max-per-core" => cfg.conntrack.max_per_core = Some(i()),
        "conntrack-min" => cfg.conntrack.min = Some(i()),
        "conntrack-tcp-timeout-established" => cfg.conntrack.tcp_established_timeout = Some(d()),
        "conntrack-tcp-timeout-close-wait" => cfg.conntrack.tcp_close_wait_timeout = Some(d()),
        "conntrack-tcp-be-liberal" => cfg.conntrack.tcp_be_liberal = b(),
        "conntrack-udp-timeout" => cfg.conntrack.udp_timeout = d(),
        "conntrack-udp-timeout-stream" => cfg.conntrack.udp_stream_timeout = d(),
        "config-sync-period" => cfg.config_sync_period = d(),
        "proxy-port-range" => cfg.port_range = s(),
        "windows-service" => cfg.windows_run_as_service = b(),
        _ => {}
    }
}

/// Sets the logging field behind a logging flag (upstream's copyLogsFromFlags).
fn apply_logging_flag(cfg: &mut KubeProxyConfiguration, name: &str, value: &FlagValue) {
    let log = &mut cfg.logging;
    match (name, value) {
        ("logging-format", FlagValue::Str(s)) => log.format = s.clone(),
        ("log-flush-frequency", FlagValue::Duration(d)) => log.flush_frequency = *d,
        ("v", FlagValue::Level(n)) => log.verbosity = *n,
        ("vmodule", FlagValue::List(items)) => {
            log.vmodule = items
                .iter()
                .filter_map(|item| {
                    let (pattern, level) = item.split_once('=')?;
                    Some(VModuleItem {
                        file_pattern: pattern.to_string(),
                        verbosity: level.parse().ok()?,
                    })
                })
                .collect();
        }
        ("log-text-split-stream", FlagValue::Bool(b)) => log.options.text.split_stream = *b,
        ("log-json-split-stream", FlagValue::Bool(b)) => log.options.json.split_stream = *b,
        ("log-text-info-buffer-size", FlagValue::Str(s)) => {
            log.options.text.info_buffer_size = types::Quantity(s.clone());
        }
        ("log-json-info-buffer-size", FlagValue::Str(s)) => {
            log.options.json.info_buffer_size = types::Quantity(s.clone());
        }
        _ => {}
    }
}

fn non_linux_warnings(cfg: &KubeProxyConfiguration, warnings: &mut Vec<String>) {
    if !cfg.port_range.is_empty() {
        warnings.push("portRange has no effect (it configured the removed userspace proxy)".into());
    }
    if cfg.windows_run_as_service {
        warnings.push("windowsRunAsService has no effect on Linux".into());
    }
    if cfg.winkernel != types::KubeProxyWinkernelConfiguration::default() {
        warnings.push("winkernel settings have no effect on Linux".into());
    }
}

fn std_dur(d: GoDuration) -> std::time::Duration {
    d.to_std().unwrap_or_default()
}

fn parse_cidrs(items: &[String], what: &str, warnings: &mut Vec<String>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for item in items {
        match parse_cidr_sloppy(item.trim()) {
            Some(c) => out.push(c),
            None => warnings.push(format!("ignoring invalid CIDR {item:?} in {what}")),
        }
    }
    out
}

fn resolve(
    cfg: &KubeProxyConfiguration,
    internal: &Internal,
    explicit_detect_local_mode: &str,
    master: Option<&str>,
    system_hostname: &str,
    config_file: Option<PathBuf>,
    warnings: &mut Vec<String>,
) -> Result<ProxyOptions, ConfigError> {
    let mode = ProxyMode::from_config(&cfg.mode).unwrap_or(ProxyMode::Iptables);

    // nodeutil.GetHostname: the override, else the hostname; trimmed and lowercased.
    let raw_host = if cfg.hostname_override.is_empty() {
        system_hostname
    } else {
        cfg.hostname_override.as_str()
    };
    let hostname = raw_host.trim().to_lowercase();
    if hostname.is_empty() {
        return Err(ConfigError::Hostname(
            "empty hostname is invalid".to_string(),
        ));
    }

    let cluster_items: Vec<String> = split_cluster_cidrs(&cfg.cluster_cidr)
        .into_iter()
        .map(str::to_string)
        .collect();
    let cluster_cidrs = parse_cidrs(&cluster_items, "clusterCIDR", warnings);
    let detect_local = match cfg.detect_local_mode.as_str() {
        "NodeCIDR" => DetectLocal::NodeCidr,
        "BridgeInterface" => {
            DetectLocal::BridgeInterface(cfg.detect_local.bridge_interface.clone())
        }
        "InterfaceNamePrefix" => {
            DetectLocal::InterfaceNamePrefix(cfg.detect_local.interface_name_prefix.clone())
        }
        _ if cluster_cidrs.is_empty() => {
            if explicit_detect_local_mode == "ClusterCIDR" {
                warnings.push(
                    "detectLocalMode is ClusterCIDR but no clusterCIDR is set; no traffic will be treated as local"
                        .to_string(),
                );
            }
            DetectLocal::None
        }
        _ => DetectLocal::ClusterCidr(cluster_cidrs.clone()),
    };

    let addrs = cfg.node_port_addresses.as_deref().unwrap_or(&[]);
    let node_port_addresses = if addrs.is_empty() || addrs.iter().any(|a| a == "all") {
        NodePortAddresses::All
    } else if addrs.iter().any(|a| a == "primary") {
        NodePortAddresses::Primary
    } else {
        let mut cidrs = Vec::new();
        for a in addrs {
            if a == "localhost" {
                cidrs.extend(
                    ["127.0.0.0/8", "::1/128"]
                        .iter()
                        .filter_map(|c| c.parse::<Cidr>().ok()),
                );
            } else if let Some(c) = parse_cidr_sloppy(a) {
                cidrs.push(c);
            }
        }
        NodePortAddresses::Cidrs(cidrs)
    };

    let exclude = cfg.ipvs.exclude_cidrs.as_deref().unwrap_or(&[]);
    let ipvs = IpvsOptions {
        scheduler: if cfg.ipvs.scheduler.is_empty() {
            "rr".to_string()
        } else {
            cfg.ipvs.scheduler.clone()
        },
        exclude_cidrs: if mode == ProxyMode::Ipvs {
            parse_cidrs(exclude, "ipvs.excludeCIDRs", warnings)
        } else {
            exclude
                .iter()
                .filter_map(|c| parse_cidr_sloppy(c))
                .collect()
        },
        strict_arp: cfg.ipvs.strict_arp,
        tcp_timeout: std_dur(cfg.ipvs.tcp_timeout),
        tcp_fin_timeout: std_dur(cfg.ipvs.tcp_fin_timeout),
        udp_timeout: std_dur(cfg.ipvs.udp_timeout),
    };
    let ct = &cfg.conntrack;
    let conntrack = ConntrackOptions {
        max_per_core: ct.max_per_core.unwrap_or(0),
        min: ct.min.unwrap_or(0),
        tcp_established_timeout: std_dur(ct.tcp_established_timeout.unwrap_or_default()),
        tcp_close_wait_timeout: std_dur(ct.tcp_close_wait_timeout.unwrap_or_default()),
        tcp_be_liberal: ct.tcp_be_liberal,
        udp_timeout: std_dur(ct.udp_timeout),
        udp_stream_timeout: std_dur(ct.udp_stream_timeout),
    };

    let bit = match mode_section(&cfg.mode) {
        "nftables" => cfg.nftables.masquerade_bit,
        _ => cfg.iptables.masquerade_bit,
    };
    let socket = |s: &str| {
        if s.is_empty() {
            None
        } else {
            parse_host_port(s)
        }
    };
    let bind_address = parse_ip_sloppy(&cfg.bind_address).unwrap_or(IpAddr::from([0, 0, 0, 0]));

    Ok(ProxyOptions {
        mode,
        hostname,
        kubeconfig: Some(&cfg.client_connection.kubeconfig)
            .filter(|k| !k.is_empty())
            .map(PathBuf::from),
        master: master.filter(|m| !m.is_empty()).map(str::to_string),
        content_type: cfg.client_connection.content_type.clone(),
        qps: cfg.client_connection.qps,
        burst: cfg.client_connection.burst,
        bind_address,
        bind_address_hard_fail: cfg.bind_address_hard_fail,
        healthz_bind_address: socket(&cfg.healthz_bind_address),
        metrics_bind_address: socket(&cfg.metrics_bind_address),
        sync_period: std_dur(internal.sync_period),
        min_sync_period: std_dur(internal.min_sync_period),
        masquerade_bit: bit.and_then(|b| u8::try_from(b).ok()).unwrap_or(14),
        masquerade_all: internal.masquerade_all,
        localhost_node_ports: cfg.iptables.localhost_node_ports.unwrap_or(true),
        cluster_cidrs,
        detect_local,
        node_port_addresses,
        ipvs,
        conntrack,
        oom_score_adj: cfg.oom_score_adj.unwrap_or(-999),
        config_sync_period: std_dur(cfg.config_sync_period),
        verbosity: u8::try_from(cfg.logging.verbosity).unwrap_or(u8::MAX),
        log_format: if cfg.logging.format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        },
        vmodule: cfg
            .logging
            .vmodule
            .iter()
            .map(|v| (v.file_pattern.clone(), v.verbosity))
            .collect(),
        log_flush_frequency: std_dur(cfg.logging.flush_frequency),
        enable_profiling: cfg.enable_profiling,
        feature_gates: cfg
            .feature_gates
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect::<BTreeMap<_, _>>(),
        config_file,
    })
}
