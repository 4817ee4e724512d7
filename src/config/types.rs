//! `KubeProxyConfiguration` (kubeproxy.config.k8s.io/v1alpha1) with every field of upstream's
//! `staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go` under its JSON name, plus the
//! defaulting of `pkg/proxy/apis/config/v1alpha1/defaults.go`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::duration::GoDuration;
use super::netutil::{append_port_if_needed, parse_ip_sloppy};

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The only accepted `kind`.
pub const KIND: &str = "KubeProxyConfiguration";

/// Default healthz port (`ports.ProxyHealthzPort`).
pub const HEALTHZ_PORT: u16 = 10256;
/// Default metrics port (`ports.ProxyStatusPort`).
pub const METRICS_PORT: u16 = 10249;

fn is_false(b: &bool) -> bool {
    !*b
}

/// Writes an f32 through its shortest decimal form, so `0.1` stays `0.1` rather than the
/// f64 widening `0.10000000149011612`.
fn serialize_f32_shortest<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(v.to_string().parse::<f64>().unwrap_or(f64::from(*v)))
}

/// The kube-proxy configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyConfiguration {
    /// `kubeproxy.config.k8s.io/v1alpha1`.
    pub api_version: String,
    /// `KubeProxyConfiguration`.
    pub kind: String,
    /// Feature gates (omitted from output when empty, like upstream's `omitempty`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub feature_gates: BTreeMap<String, bool>,
    /// API client settings.
    pub client_connection: ClientConnectionConfiguration,
    /// Logging (component-base `LoggingConfiguration`).
    pub logging: LoggingConfiguration,
    /// Node name override.
    pub hostname_override: String,
    /// Node primary IP override (binds nothing).
    pub bind_address: String,
    /// Health check server `ip:port`.
    pub healthz_bind_address: String,
    /// Metrics server `ip:port`.
    pub metrics_bind_address: String,
    /// Whether a bind failure of the servers is fatal.
    pub bind_address_hard_fail: bool,
    /// Serve /debug/pprof on the metrics server.
    pub enable_profiling: bool,
    /// Show metrics hidden since this version (`1.16`).
    pub show_hidden_metrics_for_version: String,
    /// Proxy mode: `""`, `iptables`, `ipvs`, `nftables` (`kernelspace` on Windows).
    pub mode: String,
    /// iptables settings.
    pub iptables: KubeProxyIPTablesConfiguration,
    /// IPVS settings.
    pub ipvs: KubeProxyIPVSConfiguration,
    /// nftables settings.
    pub nftables: KubeProxyNFTablesConfiguration,
    /// Windows settings (no effect on Linux).
    pub winkernel: KubeProxyWinkernelConfiguration,
    /// `""`, `ClusterCIDR`, `NodeCIDR`, `BridgeInterface`, `InterfaceNamePrefix`.
    pub detect_local_mode: String,
    /// Settings for the interface-based detect-local modes.
    pub detect_local: DetectLocalConfiguration,
    /// Pod CIDR(s), comma separated dual-stack pair allowed.
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: String,
    /// CIDRs and/or keywords (`primary`, `localhost`, `all`); `null` means all local IPs.
    pub node_port_addresses: Option<Vec<String>>,
    /// OOM score adjustment of the process.
    pub oom_score_adj: Option<i32>,
    /// conntrack sysctls.
    pub conntrack: KubeProxyConntrackConfiguration,
    /// Informer resync period.
    pub config_sync_period: GoDuration,
    /// Unused (userspace proxy only).
    pub port_range: String,
    /// Windows service integration (no effect on Linux).
    #[serde(skip_serializing_if = "is_false")]
    pub windows_run_as_service: bool,
}

/// component-base `ClientConnectionConfiguration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientConnectionConfiguration {
    /// Path to a kubeconfig file; empty means in-cluster.
    pub kubeconfig: String,
    /// The Accept header sent to the API server.
    pub accept_content_types: String,
    /// Content type of requests.
    pub content_type: String,
    /// Client-side QPS limit.
    #[serde(serialize_with = "serialize_f32_shortest")]
    pub qps: f32,
    /// Client-side burst.
    pub burst: i32,
}

/// component-base `LoggingConfiguration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct LoggingConfiguration {
    /// `text` or `json`.
    pub format: String,
    /// Maximum time between log flushes.
    pub flush_frequency: GoDuration,
    /// Verbosity level (`-v`).
    pub verbosity: u32,
    /// Per-file verbosity overrides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vmodule: Vec<VModuleItem>,
    /// Format-specific options.
    pub options: FormatOptions,
}

/// One `vmodule` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct VModuleItem {
    /// File name pattern.
    pub file_pattern: String,
    /// Verbosity for matching files.
    pub verbosity: u32,
}

/// Format-specific logging options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FormatOptions {
    /// Text format options.
    pub text: OutputRoutingOptions,
    /// JSON format options.
    pub json: OutputRoutingOptions,
}

/// Split-stream options of a log format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct OutputRoutingOptions {
    /// Errors to stderr, info to stdout.
    #[serde(skip_serializing_if = "is_false")]
    pub split_stream: bool,
    /// Info buffer size as a Kubernetes quantity (`"0"`, `"64Ki"`).
    pub info_buffer_size: Quantity,
}

/// A Kubernetes resource quantity kept as text (`"0"`, `"1Ki"`); numbers are accepted too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::String(s) => Ok(Quantity(s)),
            serde_json::Value::Number(n) => Ok(Quantity(n.to_string())),
            serde_json::Value::Null => Ok(Quantity::default()),
            other => Err(serde::de::Error::custom(format!(
                "expected a quantity, got {other}"
            ))),
        }
    }
}

/// iptables section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyIPTablesConfiguration {
    /// fwmark bit for SNAT, 0..=31.
    pub masquerade_bit: Option<i32>,
    /// SNAT everything sent to cluster IPs.
    pub masquerade_all: bool,
    /// Allow NodePorts on 127.0.0.0/8.
    pub localhost_node_ports: Option<bool>,
    /// SNAT with the node InternalIP (newest upstream; omitted when unset).
    #[serde(rename = "snatNodeInternalIP", skip_serializing_if = "Option::is_none")]
    pub snat_node_internal_ip: Option<bool>,
    /// Full resync interval.
    pub sync_period: GoDuration,
    /// Minimum interval between syncs.
    pub min_sync_period: GoDuration,
}

/// IPVS section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyIPVSConfiguration {
    /// Full resync interval.
    pub sync_period: GoDuration,
    /// Minimum interval between syncs.
    pub min_sync_period: GoDuration,
    /// Scheduler (`""` means `rr`).
    pub scheduler: String,
    /// CIDRs never cleaned up.
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    /// Set arp_ignore=1 / arp_announce=2.
    #[serde(rename = "strictARP")]
    pub strict_arp: bool,
    /// IPVS TCP idle timeout (0 keeps the kernel value).
    pub tcp_timeout: GoDuration,
    /// IPVS TCP FIN timeout.
    pub tcp_fin_timeout: GoDuration,
    /// IPVS UDP timeout.
    pub udp_timeout: GoDuration,
    /// ipset sizing found in some upstream fixtures; accepted, output only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_set: Option<KubeProxyIPVSIPSetConfiguration>,
}

/// `ipvs.ipSet` (present in some upstream fixture versions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyIPVSIPSetConfiguration {
    /// ipset hashsize.
    pub hash_size: i32,
    /// ipset maxelem.
    pub max_elements: i32,
}

/// nftables section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyNFTablesConfiguration {
    /// Mark bit for SNAT, 0..=31.
    pub masquerade_bit: Option<i32>,
    /// SNAT everything sent to cluster IPs.
    pub masquerade_all: bool,
    /// Full resync interval.
    pub sync_period: GoDuration,
    /// Minimum interval between syncs.
    pub min_sync_period: GoDuration,
}

/// conntrack section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyConntrackConfiguration {
    /// nf_conntrack_max per CPU (0 leaves it alone).
    pub max_per_core: Option<i32>,
    /// Floor for nf_conntrack_max.
    pub min: Option<i32>,
    /// nf_conntrack_tcp_timeout_established.
    pub tcp_established_timeout: Option<GoDuration>,
    /// nf_conntrack_tcp_timeout_close_wait.
    pub tcp_close_wait_timeout: Option<GoDuration>,
    /// nf_conntrack_tcp_be_liberal.
    pub tcp_be_liberal: bool,
    /// nf_conntrack_udp_timeout.
    pub udp_timeout: GoDuration,
    /// nf_conntrack_udp_timeout_stream.
    pub udp_stream_timeout: GoDuration,
}

/// winkernel section (Windows only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct KubeProxyWinkernelConfiguration {
    /// HNS network name.
    pub network_name: String,
    /// Source VIP.
    pub source_vip: String,
    /// Direct server return.
    #[serde(rename = "enableDSR")]
    pub enable_dsr: bool,
    /// Root HNS endpoint.
    pub root_hns_endpoint_name: String,
    /// Forward the health check VIP.
    pub forward_health_check_vip: bool,
}

/// detectLocal section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct DetectLocalConfiguration {
    /// Bridge for `BridgeInterface` mode.
    pub bridge_interface: String,
    /// Interface prefix for `InterfaceNamePrefix` mode.
    pub interface_name_prefix: String,
}

impl Default for KubeProxyConfiguration {
    /// The empty (undefaulted) object, with apiVersion and kind set.
    fn default() -> Self {
        KubeProxyConfiguration {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            feature_gates: BTreeMap::new(),
            client_connection: ClientConnectionConfiguration::default(),
            logging: LoggingConfiguration::default(),
            hostname_override: String::new(),
            bind_address: String::new(),
            healthz_bind_address: String::new(),
            metrics_bind_address: String::new(),
            bind_address_hard_fail: false,
            enable_profiling: false,
            show_hidden_metrics_for_version: String::new(),
            mode: String::new(),
            iptables: KubeProxyIPTablesConfiguration::default(),
            ipvs: KubeProxyIPVSConfiguration::default(),
            nftables: KubeProxyNFTablesConfiguration::default(),
            winkernel: KubeProxyWinkernelConfiguration::default(),
            detect_local_mode: String::new(),
            detect_local: DetectLocalConfiguration::default(),
            cluster_cidr: String::new(),
            node_port_addresses: None,
            oom_score_adj: None,
            conntrack: KubeProxyConntrackConfiguration::default(),
            config_sync_period: GoDuration::ZERO,
            port_range: String::new(),
            windows_run_as_service: false,
        }
    }
}

impl KubeProxyConfiguration {
    /// The fully defaulted configuration (what an empty config file yields).
    pub fn defaulted() -> Self {
        let mut c = KubeProxyConfiguration::default();
        c.set_defaults();
        c
    }

    /// Fills unset fields like upstream's `SetDefaults_KubeProxyConfiguration` (zero
    /// durations and nil pointers count as unset).
    pub fn set_defaults(&mut self) {
        self.api_version = API_VERSION.to_string();
        self.kind = KIND.to_string();
        if self.bind_address.is_empty() {
            self.bind_address = "0.0.0.0".to_string();
        }
        let v4 = matches!(
            parse_ip_sloppy(&self.bind_address),
            Some(std::net::IpAddr::V4(_))
        );
        let (healthz_host, metrics_host) = if v4 {
            ("0.0.0.0", "127.0.0.1")
        } else {
            ("[::]", "[::1]")
        };
        self.healthz_bind_address = if self.healthz_bind_address.is_empty() {
            format!("{healthz_host}:{HEALTHZ_PORT}")
        } else {
            append_port_if_needed(&self.healthz_bind_address, HEALTHZ_PORT)
        };
        self.metrics_bind_address = if self.metrics_bind_address.is_empty() {
            format!("{metrics_host}:{METRICS_PORT}")
        } else {
            append_port_if_needed(&self.metrics_bind_address, METRICS_PORT)
        };
        self.oom_score_adj.get_or_insert(-999);

        let ipt = &mut self.iptables;
        ipt.masquerade_bit.get_or_insert(14);
        ipt.localhost_node_ports.get_or_insert(true);
        if ipt.sync_period.is_zero() {
            ipt.sync_period = GoDuration::from_secs(30);
        }
        if ipt.min_sync_period.is_zero() {
            ipt.min_sync_period = GoDuration::from_secs(1);
        }
        if self.ipvs.sync_period.is_zero() {
            self.ipvs.sync_period = GoDuration::from_secs(30);
        }
        let nft = &mut self.nftables;
        nft.masquerade_bit.get_or_insert(14);
        if nft.sync_period.is_zero() {
            nft.sync_period = GoDuration::from_secs(30);
        }
        if nft.min_sync_period.is_zero() {
            nft.min_sync_period = GoDuration::from_secs(1);
        }

        let ct = &mut self.conntrack;
        ct.max_per_core.get_or_insert(32 * 1024);
        ct.min.get_or_insert(128 * 1024);
        ct.tcp_established_timeout
            .get_or_insert(GoDuration::from_secs(24 * 3600));
        ct.tcp_close_wait_timeout
            .get_or_insert(GoDuration::from_secs(3600));
        if self.config_sync_period.is_zero() {
            self.config_sync_period = GoDuration::from_secs(15 * 60);
        }

        let cc = &mut self.client_connection;
        if cc.content_type.is_empty() {
            cc.content_type = "application/vnd.kubernetes.protobuf".to_string();
        }
        if cc.qps == 0.0 {
            cc.qps = 5.0;
        }
        if cc.burst == 0 {
            cc.burst = 10;
        }

        let log = &mut self.logging;
        if log.format.is_empty() {
            log.format = "text".to_string();
        }
        if log.flush_frequency.is_zero() {
            log.flush_frequency = GoDuration::from_secs(5);
        }
        for o in [&mut log.options.text, &mut log.options.json] {
            if o.info_buffer_size.0.is_empty() {
                o.info_buffer_size = Quantity("0".to_string());
            }
        }
    }

    /// The configuration as a YAML document, keys sorted like upstream's encoder.
    pub fn to_yaml(&self) -> String {
        let json = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        serde_yaml_ng::to_string(&sorted_yaml(&json)).unwrap_or_default()
    }
}

/// Converts JSON into a YAML value with mapping keys in sorted order.
pub(crate) fn sorted_yaml(v: &serde_json::Value) -> serde_yaml_ng::Value {
    use serde_yaml_ng::Value as Y;
    match v {
        serde_json::Value::Null => Y::Null,
        serde_json::Value::Bool(b) => Y::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Y::Number(i.into())
            } else if let Some(u) = n.as_u64() {
                Y::Number(u.into())
            } else {
                // f32 values such as qps=5 come back as 5.0; print integral floats as ints,
                // as Go does.
                let f = n.as_f64().unwrap_or(0.0);
                #[allow(clippy::cast_possible_truncation)]
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    Y::Number((f as i64).into())
                } else {
                    Y::Number(f.into())
                }
            }
        }
        serde_json::Value::String(s) => Y::String(s.clone()),
        serde_json::Value::Array(a) => Y::Sequence(a.iter().map(sorted_yaml).collect()),
        serde_json::Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let mut m = serde_yaml_ng::Mapping::new();
            for k in keys {
                m.insert(Y::String(k.clone()), sorted_yaml(&o[k]));
            }
            Y::Mapping(m)
        }
    }
}
