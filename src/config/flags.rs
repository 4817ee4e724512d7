//! The kube-proxy flag table (as data) and a parser with spf13/pflag semantics.
//!
//! pflag rules reproduced here: `--name=value` and `--name value`; a boolean flag takes
//! `--name` or `--name=true|false` and never consumes the next argument; `-v 2`, `-v=2` and
//! `-v2` for shorthands; `--` ends flag parsing; arguments not starting with `-` (and `-`
//! itself) are positional and parsing continues after them; `_` in names is read as `-`
//! (component-base's word-separator normalisation). Repeating a list flag appends, repeating a
//! map flag merges, anything else keeps the last value.

use std::collections::BTreeMap;

use super::duration::GoDuration;
use super::netutil::{parse_ip_sloppy, split_host_port};

/// The value type of a flag; [`FlagKind::type_name`] is the name pflag prints in help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `--x`, `--x=true|false`.
    Bool,
    /// Any string.
    String,
    /// Go `int32` (decimal, `0x`, `0o`, `0b` or leading-zero octal).
    Int32,
    /// Go `float32`.
    Float32,
    /// Go duration (`30s`, `1h0m0s`).
    Duration,
    /// Comma-separated list; repeating the flag appends.
    StringSlice,
    /// `A=true,B=false`; repeating the flag merges.
    MapStringBool,
    /// An IP address (empty allowed).
    Ip,
    /// An IP or `IP:port` (empty allowed).
    IpPort,
    /// `beginPort-endPort`, `port` or `beginPort+offset`.
    PortRange,
    /// A Kubernetes quantity (`0`, `64Ki`).
    Quantity,
    /// A log verbosity level (unsigned).
    Level,
    /// `pattern=N,...` for `--vmodule`; repeating appends.
    ModuleSpec,
    /// `--version`, `--version=raw` (boolean-like).
    Version,
}

impl FlagKind {
    /// The type name shown in usage text (empty for booleans, as pflag does).
    pub fn type_name(&self) -> &'static str {
        match self {
            FlagKind::Bool | FlagKind::Version => "",
            FlagKind::String => "string",
            FlagKind::Int32 => "int32",
            FlagKind::Float32 => "float32",
            FlagKind::Duration => "duration",
            FlagKind::StringSlice => "strings",
            FlagKind::MapStringBool => "mapStringBool",
            FlagKind::Ip => "ip",
            FlagKind::IpPort => "ipport",
            FlagKind::PortRange => "port-range",
            FlagKind::Quantity => "quantity",
            FlagKind::Level => "Level",
            FlagKind::ModuleSpec => "pattern=N,...",
        }
    }

    /// Whether the flag may be given without a value (pflag's `NoOptDefVal`).
    pub fn takes_no_value(&self) -> bool {
        matches!(self, FlagKind::Bool | FlagKind::Version)
    }
}

/// How a flag behaves on Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagStatus {
    /// Supported.
    Supported,
    /// Supported but deprecated upstream; the text is upstream's deprecation message.
    Deprecated(&'static str),
    /// Accepted and ignored: Windows-only, userspace-only or removed upstream. The text says why.
    NoEffect(&'static str),
}

/// Where a flag's value goes relative to `--config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagScope {
    /// Sets a configuration field; ignored when `--config` is given.
    Config,
    /// Logging flag: applies over the config file too.
    Logging,
    /// Applies regardless of `--config` (`--config`, `--hostname-override`, `--master`,
    /// actions such as `--cleanup`).
    Always,
}

/// One command-line flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagSpec {
    /// Long name, without dashes.
    pub name: &'static str,
    /// One-letter shorthand (`v` for `-v`, `h` for `-h`).
    pub shorthand: Option<char>,
    /// Value type.
    pub kind: FlagKind,
    /// Default as shown in help (empty: none shown).
    pub default: &'static str,
    /// Help text (upstream's wording where it exists).
    pub help: &'static str,
    /// Support on Linux.
    pub status: FlagStatus,
    /// Interaction with `--config`.
    pub scope: FlagScope,
    /// The configuration field (JSON path) the flag sets, if any.
    pub config_field: Option<&'static str>,
}

impl FlagSpec {
    /// Whether the flag does something on Linux (deprecated flags still do).
    pub fn supported_on_linux(&self) -> bool {
        !matches!(self.status, FlagStatus::NoEffect(_))
    }

    /// Hidden from `--help` (deprecated or without effect), as pflag hides deprecated flags.
    pub fn hidden(&self) -> bool {
        !matches!(self.status, FlagStatus::Supported)
    }

    /// `--name` or `-v, --v`, as pflag names a flag in errors.
    pub fn display_name(&self) -> String {
        match self.shorthand {
            Some(c) => format!("-{c}, --{}", self.name),
            None => format!("--{}", self.name),
        }
    }
}

const fn flag(
    name: &'static str,
    kind: FlagKind,
    default: &'static str,
    config_field: Option<&'static str>,
    help: &'static str,
) -> FlagSpec {
    FlagSpec {
        name,
        shorthand: None,
        kind,
        default,
        help,
        status: FlagStatus::Supported,
        scope: FlagScope::Config,
        config_field,
    }
}

const fn always(mut f: FlagSpec) -> FlagSpec {
    f.scope = FlagScope::Always;
    f
}

const fn logging(mut f: FlagSpec) -> FlagSpec {
    f.scope = FlagScope::Logging;
    f
}

const fn deprecated(mut f: FlagSpec, why: &'static str) -> FlagSpec {
    f.status = FlagStatus::Deprecated(why);
    f
}

const fn no_effect(mut f: FlagSpec, why: &'static str) -> FlagSpec {
    f.status = FlagStatus::NoEffect(why);
    f
}

const fn short(mut f: FlagSpec, c: char) -> FlagSpec {
    f.shorthand = Some(c);
    f
}

use FlagKind as K;

static FLAGS: &[FlagSpec] = &[
    always(flag(
        "config",
        K::String,
        "",
        None,
        "The path to the configuration file.",
    )),
    always(flag(
        "write-config-to",
        K::String,
        "",
        None,
        "If set, write the default configuration values to this file and exit.",
    )),
    always(flag(
        "cleanup",
        K::Bool,
        "",
        None,
        "If true cleanup iptables and ipvs rules and exit.",
    )),
    always(flag(
        "init-only",
        K::Bool,
        "",
        None,
        "If true, perform any initialization steps that must be done with full root privileges, and then exit. After doing this, you can run kube-proxy again with only the CAP_NET_ADMIN capability.",
    )),
    flag(
        "feature-gates",
        K::MapStringBool,
        "",
        Some("featureGates"),
        "A set of key=value pairs that describe feature gates for alpha/experimental features. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "kubeconfig",
        K::String,
        "",
        Some("clientConnection.kubeconfig"),
        "Path to kubeconfig file with authorization information (the master location can be overridden by the master flag).",
    ),
    always(flag(
        "master",
        K::String,
        "",
        None,
        "The address of the Kubernetes API server (overrides any value in kubeconfig)",
    )),
    flag(
        "kube-api-content-type",
        K::String,
        "application/vnd.kubernetes.protobuf",
        Some("clientConnection.contentType"),
        "Content type of requests sent to apiserver.",
    ),
    flag(
        "kube-api-burst",
        K::Int32,
        "10",
        Some("clientConnection.burst"),
        "Burst to use while talking with kubernetes apiserver",
    ),
    flag(
        "kube-api-qps",
        K::Float32,
        "5",
        Some("clientConnection.qps"),
        "QPS to use while talking with kubernetes apiserver",
    ),
    always(flag(
        "hostname-override",
        K::String,
        "",
        Some("hostnameOverride"),
        "If non-empty, will be used as the name of the Node that kube-proxy is running on. If unset, the node name is assumed to be the same as the node's hostname.",
    )),
    flag(
        "bind-address",
        K::Ip,
        "0.0.0.0",
        Some("bindAddress"),
        "Overrides kube-proxy's idea of what its node's primary IP is. Note that the name is a historical artifact, and kube-proxy does not actually bind any sockets to this IP. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "healthz-bind-address",
        K::IpPort,
        "0.0.0.0:10256",
        Some("healthzBindAddress"),
        "The IP address and port for the health check server to serve on, defaulting to \"0.0.0.0:10256\". This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "metrics-bind-address",
        K::IpPort,
        "127.0.0.1:10249",
        Some("metricsBindAddress"),
        "The IP address and port for the metrics server to serve on, defaulting to \"127.0.0.1:10249\". (Set to \"0.0.0.0:10249\" / \"[::]:10249\" to bind on all interfaces.) Set empty to disable. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "bind-address-hard-fail",
        K::Bool,
        "",
        Some("bindAddressHardFail"),
        "If true kube-proxy will treat failure to bind to a port as fatal and exit",
    ),
    flag(
        "profiling",
        K::Bool,
        "",
        Some("enableProfiling"),
        "If true enables profiling via web interface on /debug/pprof handler. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "show-hidden-metrics-for-version",
        K::String,
        "",
        Some("showHiddenMetricsForVersion"),
        "The previous version for which you want to show hidden metrics. Only the previous minor version is meaningful, other values will not be allowed. The format is <major>.<minor>, e.g.: '1.16'. The purpose of this format is make sure you have the opportunity to notice if the next release hides additional metrics, rather than being surprised when they are permanently removed in the release after that. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "proxy-mode",
        K::String,
        "",
        Some("mode"),
        "Which proxy mode to use: on Linux this can be 'iptables' (default), 'ipvs', or 'nftables'. On Windows the only supported value is 'kernelspace'. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "iptables-masquerade-bit",
        K::Int32,
        "14",
        Some("iptables.masqueradeBit"),
        "If using the iptables or ipvs proxy mode, the bit of the fwmark space to mark packets requiring SNAT with.  Must be within the range [0, 31].",
    ),
    flag(
        "masquerade-all",
        K::Bool,
        "",
        Some("iptables.masqueradeAll"),
        "SNAT all traffic sent via Service cluster IPs. This may be required with some CNI plugins. Only supported on Linux.",
    ),
    flag(
        "iptables-localhost-nodeports",
        K::Bool,
        "true",
        Some("iptables.localhostNodePorts"),
        "If false, kube-proxy will disable the legacy behavior of allowing NodePort services to be accessed via localhost. (Applies only to iptables mode and IPv4; localhost NodePorts are never allowed with other proxy modes or with IPv6.)",
    ),
    flag(
        "iptables-sync-period",
        K::Duration,
        "30s",
        Some("iptables.syncPeriod"),
        "An interval (e.g. '5s', '1m', '2h22m') indicating how frequently various re-synchronizing and cleanup operations are performed. Must be greater than 0.",
    ),
    flag(
        "iptables-min-sync-period",
        K::Duration,
        "1s",
        Some("iptables.minSyncPeriod"),
        "The minimum period between iptables rule resyncs (e.g. '5s', '1m', '2h22m'). A value of 0 means every Service or EndpointSlice change will result in an immediate iptables resync.",
    ),
    flag(
        "ipvs-sync-period",
        K::Duration,
        "30s",
        Some("ipvs.syncPeriod"),
        "An interval (e.g. '5s', '1m', '2h22m') indicating how frequently various re-synchronizing and cleanup operations are performed. Must be greater than 0.",
    ),
    flag(
        "ipvs-min-sync-period",
        K::Duration,
        "1s",
        Some("ipvs.minSyncPeriod"),
        "The minimum period between IPVS rule resyncs (e.g. '5s', '1m', '2h22m'). A value of 0 means every Service or EndpointSlice change will result in an immediate IPVS resync.",
    ),
    flag(
        "ipvs-scheduler",
        K::String,
        "",
        Some("ipvs.scheduler"),
        "The ipvs scheduler type when proxy mode is ipvs",
    ),
    flag(
        "ipvs-exclude-cidrs",
        K::StringSlice,
        "",
        Some("ipvs.excludeCIDRs"),
        "A comma-separated list of CIDRs which the ipvs proxier should not touch when cleaning up IPVS rules.",
    ),
    flag(
        "ipvs-strict-arp",
        K::Bool,
        "",
        Some("ipvs.strictARP"),
        "Enable strict ARP by setting arp_ignore to 1 and arp_announce to 2",
    ),
    flag(
        "ipvs-tcp-timeout",
        K::Duration,
        "0s",
        Some("ipvs.tcpTimeout"),
        "The timeout for idle IPVS TCP connections, 0 to leave as-is. (e.g. '5s', '1m', '2h22m').",
    ),
    flag(
        "ipvs-tcpfin-timeout",
        K::Duration,
        "0s",
        Some("ipvs.tcpFinTimeout"),
        "The timeout for IPVS TCP connections after receiving a FIN packet, 0 to leave as-is. (e.g. '5s', '1m', '2h22m').",
    ),
    flag(
        "ipvs-udp-timeout",
        K::Duration,
        "0s",
        Some("ipvs.udpTimeout"),
        "The timeout for IPVS UDP packets, 0 to leave as-is. (e.g. '5s', '1m', '2h22m').",
    ),
    flag(
        "detect-local-mode",
        K::String,
        "",
        Some("detectLocalMode"),
        "Mode to use to detect local traffic. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "pod-bridge-interface",
        K::String,
        "",
        Some("detectLocal.bridgeInterface"),
        "A bridge interface name. When --detect-local-mode is set to BridgeInterface, kube-proxy will consider traffic to be local if it originates from this bridge.",
    ),
    flag(
        "pod-interface-name-prefix",
        K::String,
        "",
        Some("detectLocal.interfaceNamePrefix"),
        "An interface name prefix. When --detect-local-mode is set to InterfaceNamePrefix, kube-proxy will consider traffic to be local if it originates from any interface whose name begins with this prefix.",
    ),
    flag(
        "cluster-cidr",
        K::String,
        "",
        Some("clusterCIDR"),
        "The CIDR range of the pods in the cluster. (For dual-stack clusters, this can be a comma-separated dual-stack pair of CIDR ranges.). When --detect-local-mode is set to ClusterCIDR, kube-proxy will consider traffic to be local if its source IP is in this range. (Otherwise it is not used.) This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "nodeport-addresses",
        K::StringSlice,
        "",
        Some("nodePortAddresses"),
        "A list of CIDR ranges that contain valid node IPs, or alternatively, the single string 'primary'. If set to a list of CIDRs, connections to NodePort services will only be accepted on node IPs in one of the indicated ranges. If set to 'primary', NodePort services will only be accepted on the node's primary IP(s) according to the Node object. If unset, NodePort connections will be accepted on all local IPs. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "oom-score-adj",
        K::Int32,
        "-999",
        Some("oomScoreAdj"),
        "The oom-score-adj value for kube-proxy process. Values must be within the range [-1000, 1000]. This parameter is ignored if a config file is specified by --config.",
    ),
    flag(
        "conntrack-max-per-core",
        K::Int32,
        "32768",
        Some("conntrack.maxPerCore"),
        "Maximum number of NAT connections to track per CPU core (0 to leave the limit as-is and ignore conntrack-min).",
    ),
    flag(
        "conntrack-min",
        K::Int32,
        "131072",
        Some("conntrack.min"),
        "Minimum number of conntrack entries to allocate, regardless of conntrack-max-per-core (set conntrack-max-per-core=0 to leave the limit as-is).",
    ),
    flag(
        "conntrack-tcp-timeout-established",
        K::Duration,
        "24h0m0s",
        Some("conntrack.tcpEstablishedTimeout"),
        "Idle timeout for established TCP connections (0 to leave as-is)",
    ),
    flag(
        "conntrack-tcp-timeout-close-wait",
        K::Duration,
        "1h0m0s",
        Some("conntrack.tcpCloseWaitTimeout"),
        "NAT timeout for TCP connections in the CLOSE_WAIT state",
    ),
    flag(
        "conntrack-tcp-be-liberal",
        K::Bool,
        "",
        Some("conntrack.tcpBeLiberal"),
        "Enable liberal mode for tracking TCP packets by setting nf_conntrack_tcp_be_liberal to 1",
    ),
    flag(
        "conntrack-udp-timeout",
        K::Duration,
        "0s",
        Some("conntrack.udpTimeout"),
        "Idle timeout for UNREPLIED UDP connections (0 to leave as-is)",
    ),
    flag(
        "conntrack-udp-timeout-stream",
        K::Duration,
        "0s",
        Some("conntrack.udpStreamTimeout"),
        "Idle timeout for ASSURED UDP connections (0 to leave as-is)",
    ),
    flag(
        "config-sync-period",
        K::Duration,
        "15m0s",
        Some("configSyncPeriod"),
        "How often configuration from the apiserver is refreshed.  Must be greater than 0.",
    ),
    deprecated(
        flag(
            "healthz-port",
            K::Int32,
            "10256",
            Some("healthzBindAddress"),
            "The port to bind the health check server. Use 0 to disable.",
        ),
        "This flag is deprecated and will be removed in a future release. Please use --healthz-bind-address instead.",
    ),
    deprecated(
        flag(
            "metrics-port",
            K::Int32,
            "10249",
            Some("metricsBindAddress"),
            "The port to bind the metrics server. Use 0 to disable.",
        ),
        "This flag is deprecated and will be removed in a future release. Please use --metrics-bind-address instead.",
    ),
    no_effect(
        flag(
            "proxy-port-range",
            K::PortRange,
            "",
            Some("portRange"),
            "This was previously used to configure the userspace proxy, but is now unused.",
        ),
        "it configured the removed userspace proxy",
    ),
    no_effect(
        flag(
            "udp-timeout",
            K::Duration,
            "250ms",
            None,
            "How long an idle UDP connection will be kept open (e.g. '250ms', '2s'). Only applicable for proxy-mode=userspace.",
        ),
        "it configured the removed userspace proxy",
    ),
    no_effect(
        flag(
            "resource-container",
            K::String,
            "",
            None,
            "Absolute name of the resource-only container to create and run the Kube-proxy in (removed upstream).",
        ),
        "it was removed from kube-proxy",
    ),
    no_effect(
        flag(
            "cleanup-ipvs",
            K::Bool,
            "true",
            None,
            "If true and --cleanup is specified, kube-proxy will also flush IPVS rules, in addition to normal cleanup (removed upstream).",
        ),
        "it was removed from kube-proxy; --cleanup always cleans up every mode",
    ),
    no_effect(
        flag(
            "windows-service",
            K::Bool,
            "",
            Some("windowsRunAsService"),
            "Enables Windows Service Control Manager API integration",
        ),
        "it is Windows-only",
    ),
    // component-base logging flags (logsapi.AddFlags).
    logging(flag(
        "logging-format",
        K::String,
        "text",
        Some("logging.format"),
        "Sets the log format. Permitted formats: \"json\", \"text\".",
    )),
    logging(flag(
        "log-flush-frequency",
        K::Duration,
        "5s",
        Some("logging.flushFrequency"),
        "Maximum number of seconds between log flushes",
    )),
    logging(short(
        flag(
            "v",
            K::Level,
            "0",
            Some("logging.verbosity"),
            "number for the log level verbosity",
        ),
        'v',
    )),
    logging(flag(
        "vmodule",
        K::ModuleSpec,
        "",
        Some("logging.vmodule"),
        "comma-separated list of pattern=N settings for file-filtered logging (only works for text log format)",
    )),
    logging(flag(
        "log-text-split-stream",
        K::Bool,
        "",
        Some("logging.options.text.splitStream"),
        "[Alpha] In text format, write error messages to stderr and info messages to stdout. The default is to write a single stream to stdout. Enable the LoggingAlphaOptions feature gate to use this.",
    )),
    logging(flag(
        "log-text-info-buffer-size",
        K::Quantity,
        "",
        Some("logging.options.text.infoBufferSize"),
        "[Alpha] In text format with split output streams, the info messages can be buffered for a while to increase performance. The default value of zero bytes disables buffering. The size can be specified as number of bytes (512), multiples of 1000 (1K), multiples of 1024 (2Ki), or powers of those (3M, 4G, 5Mi, 6Gi). Enable the LoggingAlphaOptions feature gate to use this.",
    )),
    logging(flag(
        "log-json-split-stream",
        K::Bool,
        "",
        Some("logging.options.json.splitStream"),
        "[Alpha] In JSON format, write error messages to stderr and info messages to stdout. The default is to write a single stream to stdout. Enable the LoggingAlphaOptions feature gate to use this.",
    )),
    logging(flag(
        "log-json-info-buffer-size",
        K::Quantity,
        "",
        Some("logging.options.json.infoBufferSize"),
        "[Alpha] In JSON format with split output streams, the info messages can be buffered for a while to increase performance. The default value of zero bytes disables buffering. The size can be specified as number of bytes (512), multiples of 1000 (1K), multiples of 1024 (2Ki), or powers of those (3M, 4G, 5Mi, 6Gi). Enable the LoggingAlphaOptions feature gate to use this.",
    )),
    // klog flags removed from Kubernetes components in 1.26 (KEP-2845); accepted and ignored
    // so that older manifests keep working.
    logging(no_effect(
        flag(
            "logtostderr",
            K::Bool,
            "true",
            None,
            "log to standard error instead of files",
        ),
        "it was removed from Kubernetes components in 1.26; logs always go to stderr",
    )),
    logging(no_effect(
        flag(
            "alsologtostderr",
            K::Bool,
            "",
            None,
            "log to standard error as well as files",
        ),
        "it was removed from Kubernetes components in 1.26; logs always go to stderr",
    )),
    logging(no_effect(
        flag(
            "log-dir",
            K::String,
            "",
            None,
            "If non-empty, write log files in this directory",
        ),
        "it was removed from Kubernetes components in 1.26; logs always go to stderr",
    )),
    logging(no_effect(
        flag(
            "log-file",
            K::String,
            "",
            None,
            "If non-empty, use this log file",
        ),
        "it was removed from Kubernetes components in 1.26; logs always go to stderr",
    )),
    logging(no_effect(
        flag(
            "log-file-max-size",
            K::Int32,
            "1800",
            None,
            "Defines the maximum size a log file can grow to (in MB).",
        ),
        "it was removed from Kubernetes components in 1.26; logs always go to stderr",
    )),
    logging(no_effect(
        flag(
            "log-backtrace-at",
            K::String,
            ":0",
            None,
            "when logging hits line file:N, emit a stack trace",
        ),
        "it was removed from Kubernetes components in 1.26",
    )),
    logging(no_effect(
        flag(
            "skip-headers",
            K::Bool,
            "",
            None,
            "If true, avoid header prefixes in the log messages",
        ),
        "it was removed from Kubernetes components in 1.26",
    )),
    logging(no_effect(
        flag(
            "skip-log-headers",
            K::Bool,
            "",
            None,
            "If true, avoid headers when opening log files",
        ),
        "it was removed from Kubernetes components in 1.26",
    )),
    logging(no_effect(
        flag(
            "add-dir-header",
            K::Bool,
            "",
            None,
            "If true, adds the file directory to the header of the log messages",
        ),
        "it was removed from Kubernetes components in 1.26",
    )),
    logging(no_effect(
        flag(
            "one-output",
            K::Bool,
            "",
            None,
            "If true, only write logs to their native severity level",
        ),
        "it was removed from Kubernetes components in 1.26",
    )),
    logging(no_effect(
        flag(
            "stderrthreshold",
            K::String,
            "2",
            None,
            "logs at or above this threshold go to stderr",
        ),
        "it was removed from Kubernetes components in 1.26",
    )),
    always(short(
        flag("help", K::Bool, "", None, "help for kube-proxy"),
        'h',
    )),
    always(flag(
        "version",
        K::Version,
        "",
        None,
        "--version, --version=raw prints version information and quits",
    )),
];

/// Every flag kube-proxy accepts, as data (for help text and generated references).
pub fn flag_table() -> &'static [FlagSpec] {
    FLAGS
}

fn lookup(name: &str) -> Option<&'static FlagSpec> {
    FLAGS.iter().find(|f| f.name == name)
}

fn lookup_short(c: char) -> Option<&'static FlagSpec> {
    FLAGS.iter().find(|f| f.shorthand == Some(c))
}

/// A parsed flag value.
#[derive(Debug, Clone, PartialEq)]
pub enum FlagValue {
    /// Bool flags.
    Bool(bool),
    /// String-like flags (string, ip, ipport, port-range, quantity, version).
    Str(String),
    /// int32 flags.
    Int(i32),
    /// float32 flags.
    Float(f32),
    /// Duration flags.
    Duration(GoDuration),
    /// Verbosity level.
    Level(u32),
    /// List flags (strings, vmodule entries).
    List(Vec<String>),
    /// `--feature-gates`.
    Map(BTreeMap<String, bool>),
}

/// The result of parsing a command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedFlags {
    /// Flags given, by name, with their merged values.
    pub values: BTreeMap<&'static str, FlagValue>,
    /// Flag names in order of first appearance.
    pub order: Vec<&'static str>,
    /// Positional arguments.
    pub positional: Vec<String>,
}

impl ParsedFlags {
    /// Whether the flag was given.
    pub fn changed(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// The flag's value if given.
    pub fn get(&self, name: &str) -> Option<&FlagValue> {
        self.values.get(name)
    }

    /// A boolean flag's value if given.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.values.get(name) {
            Some(FlagValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// A string-like flag's value if given.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.values.get(name) {
            Some(FlagValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// A duration flag's value if given.
    pub fn duration(&self, name: &str) -> Option<GoDuration> {
        match self.values.get(name) {
            Some(FlagValue::Duration(d)) => Some(*d),
            _ => None,
        }
    }

    /// An int32 flag's value if given.
    pub fn int(&self, name: &str) -> Option<i32> {
        match self.values.get(name) {
            Some(FlagValue::Int(n)) => Some(*n),
            _ => None,
        }
    }

    /// A list flag's value if given.
    pub fn list(&self, name: &str) -> Option<&[String]> {
        match self.values.get(name) {
            Some(FlagValue::List(l)) => Some(l),
            _ => None,
        }
    }

    fn set(&mut self, spec: &'static FlagSpec, raw: &str) -> Result<(), String> {
        let value = parse_value(spec.kind, raw).map_err(|e| {
            format!(
                "invalid argument {raw:?} for \"{}\" flag: {e}",
                spec.display_name()
            )
        })?;
        match (self.values.get_mut(spec.name), value) {
            (Some(FlagValue::List(old)), FlagValue::List(new)) => old.extend(new),
            (Some(FlagValue::Map(old)), FlagValue::Map(new)) => old.extend(new),
            (_, value) => {
                if !self.values.contains_key(spec.name) {
                    self.order.push(spec.name);
                }
                self.values.insert(spec.name, value);
            }
        }
        Ok(())
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("strconv.ParseBool: parsing {s:?}: invalid syntax")),
    }
}

/// Go's `strconv.ParseInt(s, 0, 32)`: optional sign, then `0x`/`0o`/`0b` prefixes, a leading
/// `0` meaning octal, and `_` separators allowed only with a prefix.
pub fn parse_go_int32(s: &str) -> Result<i32, String> {
    let syntax = || format!("strconv.ParseInt: parsing {s:?}: invalid syntax");
    let range = || format!("strconv.ParseInt: parsing {s:?}: value out of range");
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits, prefixed) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d, true)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d, true)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d, true)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..], true)
    } else {
        (10, lower.as_str(), false)
    };
    if digits.contains('_') && !prefixed {
        return Err(syntax());
    }
    let cleaned: String = digits.chars().filter(|&c| c != '_').collect();
    if cleaned.is_empty()
        || digits.starts_with('_') && radix == 10
        || digits.ends_with('_')
        || digits.contains("__")
        || !cleaned.chars().all(|c| c.is_digit(radix))
    {
        return Err(syntax());
    }
    let magnitude = u64::from_str_radix(&cleaned, radix).map_err(|_| range())?;
    let value = if neg {
        -i128::from(magnitude)
    } else {
        i128::from(magnitude)
    };
    i32::try_from(value).map_err(|_| range())
}

fn parse_float32(s: &str) -> Result<f32, String> {
    let syntax = || format!("strconv.ParseFloat: parsing {s:?}: invalid syntax");
    if s.trim() != s || s.is_empty() {
        return Err(syntax());
    }
    let v: f64 = s.parse().map_err(|_| syntax())?;
    if v.is_finite() && v.abs() > f64::from(f32::MAX) {
        return Err(format!(
            "strconv.ParseFloat: parsing {s:?}: value out of range"
        ));
    }
    #[allow(clippy::cast_possible_truncation)]
    Ok(v as f32)
}

/// Validates `beginPort-endPort`, `port`, or `beginPort+offset` (empty allowed), like
/// `utilnet.ParsePortRange`.
pub fn check_port_range(s: &str) -> Result<(), String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(());
    }
    let port = |p: &str| -> Result<u32, String> {
        let n: u32 = p
            .parse()
            .map_err(|_| format!("unable to parse port range: {s}"))?;
        if n > 65535 {
            return Err(format!("unable to parse port range: {s}"));
        }
        Ok(n)
    };
    if let Some((a, b)) = s.split_once('-') {
        let (lo, hi) = (port(a)?, port(b)?);
        if hi < lo {
            return Err(format!("end port is less than start port: {s}"));
        }
    } else if let Some((a, b)) = s.split_once('+') {
        let (lo, off) = (port(a)?, port(b)?);
        if lo + off > 65535 {
            return Err(format!("port range out of bounds: {s}"));
        }
    } else {
        port(s)?;
    }
    Ok(())
}

fn check_quantity(s: &str) -> Result<(), String> {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, suffix) = body.split_at(split);
    let num_ok = !num.is_empty() && num != "." && num.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || (suffix.starts_with(['e', 'E'])
        && suffix[1..]
            .trim_start_matches(['+', '-'])
            .parse::<u32>()
            .is_ok());
    if num_ok && suffix_ok {
        Ok(())
    } else {
        Err("quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'".to_string())
    }
}

fn parse_vmodule(s: &str) -> Result<Vec<String>, String> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|pat| {
            let (file, level) = pat
                .split_once('=')
                .ok_or_else(|| format!("{pat:?} does not have the pattern=N format"))?;
            if file.is_empty() {
                return Err(format!("{pat:?} does not have the pattern=N format"));
            }
            level
                .parse::<u32>()
                .map_err(|_| format!("parsing verbosity in {pat:?}: invalid syntax"))?;
            Ok(pat.to_string())
        })
        .collect()
}

/// `cliflag.MapStringBool.Set`.
fn parse_map_string_bool(s: &str) -> Result<BTreeMap<String, bool>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("missing bool value for {part}"))?;
        let b = parse_go_bool(v.trim())
            .map_err(|e| format!("invalid value of {}={}, err: {e}", k.trim(), v.trim()))?;
        out.insert(k.trim().to_string(), b);
    }
    Ok(out)
}

fn parse_value(kind: FlagKind, raw: &str) -> Result<FlagValue, String> {
    Ok(match kind {
        FlagKind::Bool => FlagValue::Bool(parse_go_bool(raw)?),
        FlagKind::String => FlagValue::Str(raw.to_string()),
        FlagKind::Int32 => FlagValue::Int(parse_go_int32(raw)?),
        FlagKind::Float32 => FlagValue::Float(parse_float32(raw)?),
        FlagKind::Duration => FlagValue::Duration(GoDuration::parse(raw).map_err(|e| e.0)?),
        FlagKind::StringSlice => FlagValue::List(if raw.is_empty() {
            Vec::new()
        } else {
            raw.split(',').map(str::to_string).collect()
        }),
        FlagKind::MapStringBool => FlagValue::Map(parse_map_string_bool(raw)?),
        FlagKind::Ip => {
            if !raw.is_empty() && parse_ip_sloppy(raw).is_none() {
                return Err(format!("{raw:?} is not a valid IP address"));
            }
            FlagValue::Str(raw.to_string())
        }
        FlagKind::IpPort => {
            if !raw.trim().is_empty() && parse_ip_sloppy(raw).is_none() {
                let (host, port) = split_host_port(raw).map_err(|e| {
                    format!("{raw:?} is not in a valid format (ip or ip:port): {e}")
                })?;
                if parse_ip_sloppy(host).is_none() {
                    return Err(format!("{host:?} is not a valid IP address"));
                }
                if port.parse::<u16>().is_err() {
                    return Err(format!("{port:?} is not a valid number"));
                }
            }
            FlagValue::Str(raw.trim().to_string())
        }
        FlagKind::PortRange => {
            check_port_range(raw).map_err(|e| format!("{raw:?} is not a valid port range: {e}"))?;
            FlagValue::Str(raw.to_string())
        }
        FlagKind::Quantity => {
            check_quantity(raw)?;
            FlagValue::Str(raw.to_string())
        }
        FlagKind::Level => FlagValue::Level(
            raw.parse::<u32>()
                .map_err(|_| format!("strconv.ParseUint: parsing {raw:?}: invalid syntax"))?,
        ),
        FlagKind::ModuleSpec => FlagValue::List(parse_vmodule(raw)?),
        FlagKind::Version => {
            if raw != "raw" && !raw.starts_with('v') {
                parse_go_bool(raw)?;
            }
            FlagValue::Str(raw.to_string())
        }
    })
}

fn normalize(name: &str) -> String {
    name.replace('_', "-")
}

/// Parses a command line (without argv\[0\]) against the flag table.
pub fn parse_args(args: &[String]) -> Result<ParsedFlags, String> {
    parse_with(args, lookup, lookup_short)
}

pub(crate) fn parse_with(
    args: &[String],
    long: impl Fn(&str) -> Option<&'static FlagSpec>,
    shorthand: impl Fn(char) -> Option<&'static FlagSpec>,
) -> Result<ParsedFlags, String> {
    let mut out = ParsedFlags::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg.len() < 2 || !arg.starts_with('-') {
            out.positional.push(arg.clone());
            continue;
        }
        if let Some(body) = arg.strip_prefix("--") {
            if body.is_empty() {
                out.positional.extend(args[i..].iter().cloned());
                break;
            }
            if body.starts_with('-') || body.starts_with('=') {
                return Err(format!("bad flag syntax: {arg}"));
            }
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (normalize(n), Some(v)),
                None => (normalize(body), None),
            };
            let spec = long(&name).ok_or_else(|| format!("unknown flag: --{name}"))?;
            let value: String = if let Some(v) = inline {
                v.to_string()
            } else if spec.kind.takes_no_value() {
                "true".to_string()
            } else if i < args.len() {
                i += 1;
                args[i - 1].clone()
            } else {
                return Err(format!("flag needs an argument: --{name}"));
            };
            out.set(spec, &value)?;
        } else {
            // Shorthand cluster: -v 2, -v=2, -v2, -h.
            let mut rest: &str = &arg[1..];
            while let Some(c) = rest.chars().next() {
                let spec = shorthand(c)
                    .ok_or_else(|| format!("unknown shorthand flag: {c:?} in {arg}"))?;
                let after = &rest[c.len_utf8()..];
                let value: String = if let Some(v) = after.strip_prefix('=') {
                    rest = "";
                    v.to_string()
                } else if spec.kind.takes_no_value() {
                    rest = after;
                    "true".to_string()
                } else if !after.is_empty() {
                    rest = "";
                    after.to_string()
                } else if i < args.len() {
                    rest = "";
                    i += 1;
                    args[i - 1].clone()
                } else {
                    return Err(format!("flag needs an argument: {c:?} in {arg}"));
                };
                out.set(spec, &value)?;
            }
        }
    }
    Ok(out)
}

/// Usage text for `--help`, listing supported flags (deprecated and no-op flags hidden, as
/// pflag hides deprecated flags).
pub fn usage() -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    for f in FLAGS.iter().filter(|f| !f.hidden()) {
        let mut left = match f.shorthand {
            Some(c) => format!("  -{c}, --{}", f.name),
            None => format!("      --{}", f.name),
        };
        let ty = f.kind.type_name();
        if !ty.is_empty() {
            left.push(' ');
            left.push_str(ty);
        }
        let mut right = f.help.to_string();
        if !f.default.is_empty() {
            let shown = if f.kind == FlagKind::String {
                format!("{:?}", f.default)
            } else {
                f.default.to_string()
            };
            right.push_str(&format!(" (default {shown})"));
        }
        rows.push((left, right));
    }
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::from(
        "The Kubernetes network proxy runs on each node. This reflects services as defined in \
         the Kubernetes API on each node and can do simple TCP, UDP, and SCTP stream forwarding \
         or round robin TCP, UDP, and SCTP forwarding across a set of backends.\n\n\
         Usage:\n  kube-proxy [flags]\n  kube-proxy render [--proxy-mode M] [--config F] \
         [--hostname-override N] [--cluster-cidr C] [--node-ip IP] [--objects FILE...]\n  \
         kube-proxy explain --to IP:PORT[/PROTO] [--from IP] [--mode iptables|ipvs] \
         [--objects FILE...]\n  kube-proxy help [render|explain]\n\n\
         Flags:\n",
    );
    for (l, r) in rows {
        out.push_str(&format!("{l:width$}   {r}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn parse(a: &[&str]) -> Result<ParsedFlags, String> {
        parse_args(&args(a))
    }

    #[test]
    fn table_covers_upstream_flags_once() {
        let names: Vec<&str> = flag_table().iter().map(|f| f.name).collect();
        for upstream in [
            "config",
            "write-config-to",
            "cleanup",
            "feature-gates",
            "kubeconfig",
            "master",
            "kube-api-content-type",
            "kube-api-burst",
            "kube-api-qps",
            "hostname-override",
            "bind-address",
            "healthz-bind-address",
            "metrics-bind-address",
            "bind-address-hard-fail",
            "profiling",
            "show-hidden-metrics-for-version",
            "init-only",
            "proxy-mode",
            "iptables-masquerade-bit",
            "masquerade-all",
            "iptables-localhost-nodeports",
            "iptables-sync-period",
            "iptables-min-sync-period",
            "ipvs-sync-period",
            "ipvs-min-sync-period",
            "ipvs-scheduler",
            "ipvs-exclude-cidrs",
            "ipvs-strict-arp",
            "ipvs-tcp-timeout",
            "ipvs-tcpfin-timeout",
            "ipvs-udp-timeout",
            "detect-local-mode",
            "pod-bridge-interface",
            "pod-interface-name-prefix",
            "cluster-cidr",
            "nodeport-addresses",
            "oom-score-adj",
            "conntrack-max-per-core",
            "conntrack-min",
            "conntrack-tcp-timeout-established",
            "conntrack-tcp-timeout-close-wait",
            "conntrack-tcp-be-liberal",
            "conntrack-udp-timeout",
            "conntrack-udp-timeout-stream",
            "config-sync-period",
            "healthz-port",
            "metrics-port",
            "proxy-port-range",
            "logging-format",
            "log-flush-frequency",
            "v",
            "vmodule",
            "log-text-split-stream",
            "log-text-info-buffer-size",
            "log-json-split-stream",
            "log-json-info-buffer-size",
            "windows-service",
            "udp-timeout",
            "help",
            "version",
        ] {
            assert_eq!(
                names.iter().filter(|n| **n == upstream).count(),
                1,
                "{upstream} must appear exactly once"
            );
        }
        assert!(!lookup("windows-service").unwrap().supported_on_linux());
        assert!(lookup("masquerade-all").unwrap().supported_on_linux());
        assert!(matches!(
            lookup("healthz-port").unwrap().status,
            FlagStatus::Deprecated(_)
        ));
    }

    #[test]
    fn long_flag_forms() {
        let p = parse(&[
            "--kubeconfig=/a",
            "--master",
            "https://x",
            "--kube-api-qps=7.5",
        ])
        .unwrap();
        assert_eq!(p.str("kubeconfig"), Some("/a"));
        assert_eq!(p.str("master"), Some("https://x"));
        assert_eq!(p.get("kube-api-qps"), Some(&FlagValue::Float(7.5)));
        // `--x=` sets an empty value; `--x` followed by a dash-led value still consumes it.
        let p = parse(&["--hostname-override=", "--master", "-weird"]).unwrap();
        assert_eq!(p.str("hostname-override"), Some(""));
        assert_eq!(p.str("master"), Some("-weird"));
        // Underscores normalise to dashes.
        let p = parse(&["--hostname_override=n1"]).unwrap();
        assert_eq!(p.str("hostname-override"), Some("n1"));
    }

    #[test]
    fn shorthand_forms_for_v() {
        for form in [
            &["-v", "2"][..],
            &["-v=2"],
            &["-v2"],
            &["--v=2"],
            &["--v", "2"],
        ] {
            let p = parse(form).unwrap();
            assert_eq!(p.get("v"), Some(&FlagValue::Level(2)), "{form:?}");
        }
        assert_eq!(
            parse(&["-v"]).unwrap_err(),
            "flag needs an argument: 'v' in -v"
        );
        assert!(
            parse(&["-v", "x"])
                .unwrap_err()
                .contains("\"-v, --v\" flag")
        );
        assert_eq!(
            parse(&["-x"]).unwrap_err(),
            "unknown shorthand flag: 'x' in -x"
        );
        assert!(parse(&["-h"]).unwrap().bool("help").unwrap());
    }

    #[test]
    fn bool_flags_never_consume_the_next_argument() {
        let p = parse(&["--masquerade-all", "false"]).unwrap();
        assert_eq!(p.bool("masquerade-all"), Some(true));
        assert_eq!(p.positional, vec!["false".to_string()]);
        let p = parse(&["--masquerade-all=false", "--cleanup", "--profiling=T"]).unwrap();
        assert_eq!(p.bool("masquerade-all"), Some(false));
        assert_eq!(p.bool("cleanup"), Some(true));
        assert_eq!(p.bool("profiling"), Some(true));
        let p = parse(&["--iptables-localhost-nodeports=0"]).unwrap();
        assert_eq!(p.bool("iptables-localhost-nodeports"), Some(false));
        let err = parse(&["--masquerade-all=maybe"]).unwrap_err();
        assert_eq!(
            err,
            "invalid argument \"maybe\" for \"--masquerade-all\" flag: strconv.ParseBool: parsing \"maybe\": invalid syntax"
        );
    }

    #[test]
    fn durations_ints_floats() {
        let p = parse(&[
            "--iptables-sync-period=1m30s",
            "--config-sync-period",
            "500ms",
            "--oom-score-adj=-1000",
            "--iptables-masquerade-bit=0x0e",
            "--conntrack-min=010",
        ])
        .unwrap();
        assert_eq!(
            p.duration("iptables-sync-period"),
            Some(GoDuration::from_secs(90))
        );
        assert_eq!(
            p.duration("config-sync-period"),
            Some(GoDuration::from_millis(500))
        );
        assert_eq!(p.int("oom-score-adj"), Some(-1000));
        assert_eq!(p.int("iptables-masquerade-bit"), Some(14));
        assert_eq!(
            p.int("conntrack-min"),
            Some(8),
            "leading zero is octal in Go"
        );
        let err = parse(&["--iptables-sync-period=10"]).unwrap_err();
        assert!(
            err.contains("--iptables-sync-period") && err.contains("missing unit"),
            "{err}"
        );
        let err = parse(&["--kube-api-burst=3000000000"]).unwrap_err();
        assert!(err.contains("value out of range"), "{err}");
        assert!(
            parse(&["--kube-api-qps=fast"])
                .unwrap_err()
                .contains("ParseFloat")
        );
        assert_eq!(
            parse_go_int32("1_000"),
            Err("strconv.ParseInt: parsing \"1_000\": invalid syntax".into())
        );
        assert_eq!(parse_go_int32("0x_1F"), Ok(31));
        assert_eq!(parse_go_int32("-2147483648"), Ok(i32::MIN));
    }

    #[test]
    fn lists_and_maps_accumulate() {
        let p = parse(&[
            "--nodeport-addresses=10.0.0.0/8,192.168.0.0/16",
            "--nodeport-addresses",
            "fd00::/64",
            "--feature-gates=A=true,B=false",
            "--feature-gates=B=true, C=f",
            "--vmodule=a=1,b=2",
        ])
        .unwrap();
        assert_eq!(
            p.list("nodeport-addresses").unwrap(),
            ["10.0.0.0/8", "192.168.0.0/16", "fd00::/64"]
        );
        let gates = match p.get("feature-gates") {
            Some(FlagValue::Map(m)) => m.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            gates.into_iter().collect::<Vec<_>>(),
            vec![("A".into(), true), ("B".into(), true), ("C".into(), false)]
        );
        assert_eq!(p.list("vmodule").unwrap(), ["a=1", "b=2"]);
        assert_eq!(
            parse(&["--ipvs-exclude-cidrs="])
                .unwrap()
                .list("ipvs-exclude-cidrs"),
            Some(&[][..])
        );
        assert!(
            parse(&["--feature-gates=A"])
                .unwrap_err()
                .contains("missing bool value for A")
        );
        assert!(
            parse(&["--feature-gates=A=yes"])
                .unwrap_err()
                .contains("invalid value of A=yes")
        );
    }

    #[test]
    fn unknown_missing_and_terminator() {
        assert_eq!(parse(&["--nope=1"]).unwrap_err(), "unknown flag: --nope");
        assert_eq!(
            parse(&["--kubeconfig"]).unwrap_err(),
            "flag needs an argument: --kubeconfig"
        );
        assert_eq!(parse(&["---x"]).unwrap_err(), "bad flag syntax: ---x");
        // Single-dash long names are shorthand clusters in pflag.
        assert_eq!(
            parse(&["-config=x"]).unwrap_err(),
            "unknown shorthand flag: 'c' in -config=x"
        );
        let p = parse(&["--cleanup", "--", "--masquerade-all", "x"]).unwrap();
        assert_eq!(p.positional, ["--masquerade-all", "x"]);
        assert!(!p.changed("masquerade-all"));
        // Interspersed positionals do not stop parsing.
        let p = parse(&["pos", "--cleanup", "-"]).unwrap();
        assert_eq!(p.positional, ["pos", "-"]);
        assert_eq!(p.bool("cleanup"), Some(true));
    }

    #[test]
    fn address_and_special_kinds() {
        assert!(parse(&["--bind-address=010.0.0.1"]).is_ok());
        assert_eq!(
            parse(&["--bind-address=nope"]).unwrap_err(),
            "invalid argument \"nope\" for \"--bind-address\" flag: \"nope\" is not a valid IP address"
        );
        assert!(parse(&["--healthz-bind-address=1.2.3.4"]).is_ok());
        assert!(parse(&["--healthz-bind-address=[::1]:10256"]).is_ok());
        assert!(parse(&["--metrics-bind-address="]).is_ok());
        assert!(
            parse(&["--metrics-bind-address=host:80"])
                .unwrap_err()
                .contains("not a valid IP")
        );
        assert!(parse(&["--proxy-port-range=1000+10"]).is_ok());
        assert!(parse(&["--proxy-port-range=20-10"]).is_err());
        assert!(parse(&["--log-json-info-buffer-size=64Ki"]).is_ok());
        assert!(parse(&["--log-json-info-buffer-size=lots"]).is_err());
        assert_eq!(parse(&["--version"]).unwrap().str("version"), Some("true"));
        assert_eq!(
            parse(&["--version=raw"]).unwrap().str("version"),
            Some("raw")
        );
        assert!(parse(&["--vmodule=foo"]).is_err());
    }

    #[test]
    fn usage_lists_supported_flags_only() {
        let u = usage();
        assert!(u.contains("--masquerade-all"));
        assert!(u.contains("-v, --v Level"));
        assert!(u.contains("--iptables-sync-period duration"));
        assert!(u.contains("(default 30s)"));
        assert!(!u.contains("--healthz-port"), "deprecated flags are hidden");
        assert!(!u.contains("--windows-service"));
    }
}
