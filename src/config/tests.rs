//! End-to-end tests of the command line, the config file and their precedence.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

/// Upstream's defaulting fixture
/// (`pkg/proxy/apis/config/scheme/testdata/KubeProxyConfiguration/after/v1alpha1.yaml`).
const DEFAULTS_FIXTURE: &str = include_str!("testdata/v1alpha1-defaults.yaml");
/// A newer revision of the same fixture, produced through the internal type (only the mode's
/// section keeps its sync periods) and carrying `ipvs.ipSet`.
const ROUNDTRIP_FIXTURE: &str = include_str!("testdata/v1alpha1-defaults-roundtrip.yaml");

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn run(a: &[&str]) -> Result<Invocation, ConfigError> {
    parse_command_line(&args(a), "Node-1.Example")
}

fn config_file(body: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f
}

fn with_config(body: &str, extra: &[&str]) -> Result<Invocation, ConfigError> {
    let f = config_file(body);
    let mut a = vec!["--config".to_string(), f.path().display().to_string()];
    a.extend(args(extra));
    parse_command_line(&a, "node-1")
}

const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

fn yaml_value(text: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(text).unwrap()
}

#[test]
fn defaults_fixture_decodes_without_unknown_fields_and_equals_our_defaults() {
    let loaded = decode_config(DEFAULTS_FIXTURE).unwrap();
    assert!(
        loaded.unknown_fields.is_empty(),
        "{:?}",
        loaded.unknown_fields
    );
    let mut c = loaded.config.clone();
    c.set_defaults();
    assert_eq!(c, loaded.config, "the fixture is already fully defaulted");
    assert_eq!(c, KubeProxyConfiguration::defaulted());
    // Serialising our defaults yields exactly the fixture: same field names, same values,
    // same Go duration spellings.
    let ours = yaml_value(&KubeProxyConfiguration::defaulted().to_yaml());
    assert_eq!(ours, yaml_value(DEFAULTS_FIXTURE));
}

#[test]
fn roundtrip_fixture_matches_effective_default_config() {
    let loaded = decode_config(ROUNDTRIP_FIXTURE).unwrap();
    assert!(
        loaded.unknown_fields.is_empty(),
        "{:?}",
        loaded.unknown_fields
    );
    assert_eq!(
        loaded.config.ipvs.ip_set.as_ref().map(|s| s.hash_size),
        Some(1024)
    );
    // Our effective default config, minus the platform defaults upstream applies after
    // conversion, is the fixture (which also has ipvs.ipSet).
    let inv = run(&[]).unwrap();
    assert_eq!(inv.config.mode, "iptables");
    assert_eq!(inv.config.detect_local_mode, "ClusterCIDR");
    let mut c = inv.config.clone();
    c.mode.clear();
    c.detect_local_mode.clear();
    c.ipvs.ip_set = loaded.config.ipvs.ip_set.clone();
    assert_eq!(yaml_value(&c.to_yaml()), yaml_value(ROUNDTRIP_FIXTURE));
    // And loading it gives the same options as no flags at all.
    let from_file = with_config(ROUNDTRIP_FIXTURE, &[]).unwrap();
    let mut o = from_file.options.clone();
    o.config_file = None;
    let mut d = parse_command_line(&[], "node-1").unwrap().options;
    d.config_file = None;
    assert_eq!(o, d);
    assert!(from_file.warnings.is_empty(), "{:?}", from_file.warnings);
}

#[test]
fn default_options_match_upstream_defaults() {
    let o = run(&[]).unwrap().options;
    assert_eq!(o.mode, ProxyMode::Iptables);
    assert_eq!(o.mode.to_string(), "iptables");
    assert_eq!(o.hostname, "node-1.example");
    assert_eq!(o.kubeconfig, None);
    assert_eq!(o.content_type, "application/vnd.kubernetes.protobuf");
    assert_eq!((o.qps, o.burst), (5.0, 10));
    assert_eq!(
        o.bind_address,
        "0.0.0.0".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(
        o.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        o.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(o.sync_period, Duration::from_secs(30));
    assert_eq!(o.min_sync_period, Duration::from_secs(1));
    assert_eq!(o.masquerade_bit, 14);
    assert!(!o.masquerade_all);
    assert!(o.localhost_node_ports);
    assert_eq!(o.detect_local, DetectLocal::None);
    assert_eq!(o.node_port_addresses, NodePortAddresses::All);
    assert_eq!(o.ipvs.scheduler, "rr");
    assert_eq!(o.conntrack.max_per_core, 32768);
    assert_eq!(o.conntrack.min, 131072);
    assert_eq!(
        o.conntrack.tcp_established_timeout,
        Duration::from_secs(86400)
    );
    assert_eq!(
        o.conntrack.tcp_close_wait_timeout,
        Duration::from_secs(3600)
    );
    assert_eq!(o.oom_score_adj, -999);
    assert_eq!(o.config_sync_period, Duration::from_secs(900));
    assert_eq!((o.verbosity, o.log_format), (0, LogFormat::Text));
    assert_eq!(o.log_flush_frequency, Duration::from_secs(5));
}

#[test]
fn flags_apply_over_defaults() {
    let inv = run(&[
        "--proxy-mode=ipvs",
        "--masquerade-all",
        "--ipvs-sync-period=10s",
        "--iptables-sync-period=5s",
        "--ipvs-scheduler",
        "wrr",
        "--ipvs-exclude-cidrs=10.0.0.0/8,fd00::/64",
        "--ipvs-strict-arp",
        "--cluster-cidr=10.244.0.0/16,fd00:10::/56",
        "--nodeport-addresses=192.168.0.0/16",
        "--feature-gates=A=true,B=false",
        "--conntrack-max-per-core=0",
        "--kubeconfig=/etc/kp.conf",
        "--master=https://api:6443",
        "--kube-api-qps=20",
        "--oom-score-adj=-500",
        "--bind-address-hard-fail",
        "-v=3",
    ])
    .unwrap();
    let o = &inv.options;
    assert_eq!(o.mode, ProxyMode::Ipvs);
    assert!(o.masquerade_all);
    assert_eq!(
        o.sync_period,
        Duration::from_secs(10),
        "ipvs flag wins in ipvs mode"
    );
    assert_eq!(
        o.min_sync_period,
        Duration::from_secs(1),
        "the internal default (from the iptables section) is kept"
    );
    assert_eq!(o.ipvs.scheduler, "wrr");
    assert_eq!(o.ipvs.exclude_cidrs.len(), 2);
    assert!(o.ipvs.strict_arp);
    assert_eq!(
        o.detect_local,
        DetectLocal::ClusterCidr(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10::/56".parse().unwrap()
        ])
    );
    assert_eq!(o.cluster_cidrs.len(), 2);
    assert_eq!(
        o.node_port_addresses,
        NodePortAddresses::Cidrs(vec!["192.168.0.0/16".parse().unwrap()])
    );
    assert_eq!(o.feature_gates.get("A"), Some(&true));
    assert_eq!(o.feature_gates.get("B"), Some(&false));
    assert_eq!(o.conntrack.max_per_core, 0);
    assert_eq!(
        o.kubeconfig.as_deref(),
        Some(std::path::Path::new("/etc/kp.conf"))
    );
    assert_eq!(o.master.as_deref(), Some("https://api:6443"));
    assert_eq!(o.qps, 20.0);
    assert_eq!(o.oom_score_adj, -500);
    assert!(o.bind_address_hard_fail);
    assert_eq!(o.verbosity, 3);
    assert!(
        inv.warnings
            .iter()
            .any(|w| w.contains("--iptables-sync-period has no effect in ipvs mode")),
        "{:?}",
        inv.warnings
    );
    // The effective config carries the values in the ipvs section only.
    assert_eq!(inv.config.ipvs.sync_period, GoDuration::from_secs(10));
    assert_eq!(inv.config.iptables.sync_period, GoDuration::ZERO);
    assert!(inv.config.iptables.masquerade_all);

    let o = run(&[
        "--iptables-sync-period=5s",
        "--ipvs-sync-period=10s",
        "--iptables-min-sync-period=0",
    ])
    .unwrap()
    .options;
    assert_eq!(o.sync_period, Duration::from_secs(5));
    assert_eq!(o.min_sync_period, Duration::ZERO);
}

#[test]
fn nftables_defaults_to_primary_node_ports_and_uses_its_own_section() {
    let inv = run(&[
        "--proxy-mode=nftables",
        "--masquerade-all",
        "--iptables-masquerade-bit=3",
    ])
    .unwrap();
    let o = &inv.options;
    assert_eq!(o.mode, ProxyMode::Nftables);
    assert_eq!(o.node_port_addresses, NodePortAddresses::Primary);
    assert!(o.masquerade_all);
    assert_eq!(
        o.masquerade_bit, 14,
        "nftables.masqueradeBit, not the iptables flag"
    );
    assert!(inv.config.nftables.masquerade_all && !inv.config.iptables.masquerade_all);
    assert_eq!(o.sync_period, Duration::from_secs(30));
    assert!(
        inv.warnings
            .iter()
            .any(|w| w.contains("--iptables-masquerade-bit has no effect"))
    );
}

#[test]
fn bool_flag_followed_by_value_is_an_unexpected_argument() {
    let err = run(&["--masquerade-all", "false"]).unwrap_err();
    assert_eq!(
        err,
        ConfigError::UnexpectedArguments(vec!["false".to_string()])
    );
    assert_eq!(
        err.to_string(),
        "\"kube-proxy\" does not take any arguments, got [\"false\"]"
    );
    assert!(
        !run(&["--masquerade-all=false"])
            .unwrap()
            .options
            .masquerade_all
    );
}

#[test]
fn unknown_and_malformed_flags_are_errors_naming_them() {
    assert_eq!(
        run(&["--no-such-flag"]).unwrap_err().to_string(),
        "unknown flag: --no-such-flag"
    );
    let err = run(&["--conntrack-min=lots"]).unwrap_err().to_string();
    assert!(err.contains("--conntrack-min"), "{err}");
    let err = run(&["--config-sync-period=5"]).unwrap_err().to_string();
    assert!(
        err.contains("--config-sync-period") && err.contains("missing unit"),
        "{err}"
    );
}

#[test]
fn actions() {
    assert_eq!(run(&[]).unwrap().action, Action::Run);
    assert_eq!(run(&["--cleanup"]).unwrap().action, Action::Cleanup);
    assert_eq!(run(&["--init-only"]).unwrap().action, Action::InitOnly);
    assert_eq!(
        run(&["--write-config-to", "/tmp/x.yaml"]).unwrap().action,
        Action::WriteConfig("/tmp/x.yaml".into())
    );
    assert_eq!(run(&["--version"]).unwrap().action, Action::Version);
    assert_eq!(run(&["--version=false"]).unwrap().action, Action::Run);
    // Version is answered before the configuration is looked at.
    assert_eq!(
        run(&["--version", "--config=/nonexistent"]).unwrap().action,
        Action::Version
    );
    for h in ["-h", "--help"] {
        match run(&[h, "--config=/nonexistent"]).unwrap().action {
            Action::Help(text) => {
                assert!(text.contains("--masquerade-all"), "{text}");
                assert!(text.contains("Usage:"));
            }
            other => panic!("{other:?}"),
        }
    }
    // A bad flag is still an error with --help present.
    assert!(run(&["--help", "--nope"]).is_err());
    // Cleanup still validates, like upstream.
    assert!(run(&["--cleanup", "--iptables-masquerade-bit=40"]).is_err());
}

#[test]
fn deprecated_and_non_linux_flags_warn() {
    let inv = run(&[
        "--healthz-port=10256",
        "--windows-service",
        "--udp-timeout=1s",
        "--proxy-port-range=1000-2000",
        "--logtostderr=false",
    ])
    .unwrap();
    let w = inv.warnings.join("\n");
    assert!(w.contains("flag --healthz-port has been deprecated"), "{w}");
    assert!(
        w.contains("flag --windows-service has no effect on Linux"),
        "{w}"
    );
    assert!(
        w.contains("flag --udp-timeout has no effect on Linux"),
        "{w}"
    );
    assert!(
        w.contains("flag --proxy-port-range has no effect on Linux"),
        "{w}"
    );
    assert!(
        w.contains("flag --logtostderr has no effect on Linux"),
        "{w}"
    );
    assert!(!w.contains("--masquerade-all"));
}

#[test]
fn bind_addresses_from_flags() {
    let o = run(&["--metrics-bind-address=", "--healthz-bind-address=1.2.3.4"])
        .unwrap()
        .options;
    assert_eq!(o.metrics_bind_address, None, "empty disables");
    assert_eq!(
        o.healthz_bind_address,
        Some("1.2.3.4:10256".parse().unwrap())
    );
    let o = run(&[
        "--healthz-port=0",
        "--metrics-port=9999",
        "--metrics-bind-address=0.0.0.0",
    ])
    .unwrap()
    .options;
    assert_eq!(o.healthz_bind_address, None);
    assert_eq!(
        o.metrics_bind_address,
        Some("0.0.0.0:9999".parse().unwrap())
    );
    // The deprecated port only completes a bare IP, as upstream's AppendPortIfNeeded does.
    let o = run(&["--metrics-port=9999"]).unwrap().options;
    assert_eq!(
        o.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    let o = run(&["--healthz-bind-address=[::1]:1234"]).unwrap().options;
    assert_eq!(
        o.healthz_bind_address,
        Some("[::1]:1234".parse::<SocketAddr>().unwrap())
    );
    // IPv6 bindAddress switches the defaults to IPv6 (through the file, where defaulting runs
    // after the value is known).
    let o = with_config(&format!("{HEADER}bindAddress: \"::\"\n"), &[])
        .unwrap()
        .options;
    assert_eq!(o.healthz_bind_address, Some("[::]:10256".parse().unwrap()));
    assert_eq!(o.metrics_bind_address, Some("[::1]:10249".parse().unwrap()));
}

#[test]
fn hostname_override_is_trimmed_lowercased_and_checked() {
    assert_eq!(
        run(&["--hostname-override=  Worker-7 "])
            .unwrap()
            .options
            .hostname,
        "worker-7"
    );
    assert_eq!(run(&[]).unwrap().options.hostname, "node-1.example");
    assert_eq!(
        run(&["--hostname-override=   "]).unwrap_err(),
        ConfigError::Hostname("empty hostname-override is invalid".to_string())
    );
    assert!(parse_command_line(&[], "  ").is_err());
    assert_eq!(
        parse_command_line(&args(&["--hostname-override=n"]), "")
            .unwrap()
            .options
            .hostname,
        "n"
    );
    // The config file value goes through the same normalisation.
    let o = with_config(&format!("{HEADER}hostnameOverride: \" MixedCase \"\n"), &[]).unwrap();
    assert_eq!(o.options.hostname, "mixedcase");
}

#[test]
fn detect_local_resolution() {
    let o = run(&["--cluster-cidr=10.0.0.0/8"]).unwrap();
    assert_eq!(
        o.options.detect_local,
        DetectLocal::ClusterCidr(vec!["10.0.0.0/8".parse().unwrap()])
    );
    let o = run(&[]).unwrap();
    assert_eq!(o.options.detect_local, DetectLocal::None);
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    let o = run(&["--detect-local-mode=ClusterCIDR"]).unwrap();
    assert_eq!(o.options.detect_local, DetectLocal::None);
    assert!(
        o.warnings.iter().any(|w| w.contains("no clusterCIDR")),
        "{:?}",
        o.warnings
    );
    let o = run(&["--detect-local-mode=NodeCIDR", "--cluster-cidr=10.0.0.0/8"])
        .unwrap()
        .options;
    assert_eq!(o.detect_local, DetectLocal::NodeCidr);
    assert_eq!(o.cluster_cidrs, vec!["10.0.0.0/8".parse().unwrap()]);
    let o = run(&[
        "--detect-local-mode=BridgeInterface",
        "--pod-bridge-interface=cbr0",
    ])
    .unwrap();
    assert_eq!(
        o.options.detect_local,
        DetectLocal::BridgeInterface("cbr0".into())
    );
    let o = run(&[
        "--detect-local-mode=InterfaceNamePrefix",
        "--pod-interface-name-prefix=veth",
    ])
    .unwrap();
    assert_eq!(
        o.options.detect_local,
        DetectLocal::InterfaceNamePrefix("veth".into())
    );
}

#[test]
fn node_port_address_resolution() {
    let np = |v: &str| {
        run(&[&format!("--nodeport-addresses={v}")])
            .unwrap()
            .options
            .node_port_addresses
    };
    assert_eq!(np("primary"), NodePortAddresses::Primary);
    assert_eq!(np("all"), NodePortAddresses::All);
    assert_eq!(
        np("localhost,10.1.0.0/16"),
        NodePortAddresses::Cidrs(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap()
        ])
    );
    assert_eq!(np(""), NodePortAddresses::All);
}

#[test]
fn mode_values() {
    assert_eq!(
        run(&["--proxy-mode="]).unwrap().options.mode,
        ProxyMode::Iptables
    );
    assert_eq!(
        run(&["--proxy-mode=iptables"]).unwrap().options.mode,
        ProxyMode::Iptables
    );
    assert_eq!(ProxyMode::Nftables.to_string(), "nftables");
    assert_eq!(ProxyMode::Ipvs.to_string(), "ipvs");
    let err = run(&["--proxy-mode=kernelspace"]).unwrap_err().to_string();
    assert!(
        err.contains("mode: Invalid value: \"kernelspace\""),
        "{err}"
    );
    assert!(err.contains("only supported on Windows"), "{err}");
    let err = run(&["--proxy-mode=userspace"]).unwrap_err().to_string();
    assert!(
        err.contains(
            "mode: Invalid value: \"userspace\": must be iptables, ipvs, nftables or blank"
        ),
        "{err}"
    );
}

/// One invalid field at a time on top of a valid file: the error names exactly that field.
#[test]
fn each_validation_error_names_its_field() {
    let cases: &[(&str, &str)] = &[
        (
            "iptables:\n  masqueradeBit: 33\n",
            "iptables.masqueradeBit: Invalid value: 33: must be within the range [0, 31]",
        ),
        (
            "iptables:\n  masqueradeBit: -1\n",
            "iptables.masqueradeBit: Invalid value: -1:",
        ),
        (
            "iptables:\n  syncPeriod: -1s\n",
            "iptables.syncPeriod: Invalid value: \"-1s\": must be greater than 0",
        ),
        (
            "iptables:\n  minSyncPeriod: -1s\n",
            "iptables.minSyncPeriod: Invalid value: \"-1s\": must be greater than or equal to 0",
        ),
        (
            "iptables:\n  syncPeriod: 5s\n  minSyncPeriod: 10s\n",
            "iptables.syncPeriod: Invalid value: \"5s\": must be greater than or equal to iptables.minSyncPeriod",
        ),
        (
            "mode: ipvs\nipvs:\n  syncPeriod: -2s\n",
            "ipvs.syncPeriod: Invalid value: \"-2s\"",
        ),
        (
            "mode: ipvs\nipvs:\n  minSyncPeriod: -2s\n",
            "ipvs.minSyncPeriod: Invalid value: \"-2s\"",
        ),
        (
            "mode: nftables\nnftables:\n  syncPeriod: -3s\n",
            "nftables.syncPeriod: Invalid value: \"-3s\"",
        ),
        (
            "mode: nftables\nnftables:\n  masqueradeBit: 32\n",
            "nftables.masqueradeBit: Invalid value: 32",
        ),
        (
            "mode: ipvs\nipvs:\n  scheduler: fastest\n",
            "ipvs.scheduler: Invalid value: \"fastest\"",
        ),
        (
            "mode: ipvs\nipvs:\n  excludeCIDRs: [10.0.0.0/8, nope]\n",
            "ipvs.excludeCIDRs[1]: Invalid value: \"nope\": must be a valid CIDR",
        ),
        (
            "mode: ipvs\nipvs:\n  tcpTimeout: -1s\n",
            "ipvs.tcpTimeout: Invalid value: \"-1s\"",
        ),
        (
            "mode: ipvs\nipvs:\n  tcpFinTimeout: -1s\n",
            "ipvs.tcpFinTimeout: Invalid value: \"-1s\"",
        ),
        (
            "mode: ipvs\nipvs:\n  udpTimeout: -1s\n",
            "ipvs.udpTimeout: Invalid value: \"-1s\"",
        ),
        (
            "conntrack:\n  maxPerCore: -1\n",
            "conntrack.maxPerCore: Invalid value: -1: must be greater than or equal to 0",
        ),
        (
            "conntrack:\n  min: -5\n",
            "conntrack.min: Invalid value: -5",
        ),
        (
            "conntrack:\n  tcpEstablishedTimeout: -1s\n",
            "conntrack.tcpEstablishedTimeout: Invalid value: \"-1s\"",
        ),
        (
            "conntrack:\n  tcpCloseWaitTimeout: -1s\n",
            "conntrack.tcpCloseWaitTimeout: Invalid value: \"-1s\"",
        ),
        (
            "conntrack:\n  udpTimeout: -1s\n",
            "conntrack.udpTimeout: Invalid value: \"-1s\"",
        ),
        (
            "conntrack:\n  udpStreamTimeout: -1s\n",
            "conntrack.udpStreamTimeout: Invalid value: \"-1s\"",
        ),
        (
            "oomScoreAdj: 1001\n",
            "oomScoreAdj: Invalid value: 1001: must be within the range [-1000, 1000]",
        ),
        ("oomScoreAdj: -1001\n", "oomScoreAdj: Invalid value: -1001"),
        (
            "mode: kernelspace\n",
            "mode: Invalid value: \"kernelspace\"",
        ),
        ("mode: turbo\n", "mode: Invalid value: \"turbo\""),
        (
            "configSyncPeriod: -1m\n",
            "configSyncPeriod: Invalid value: \"-1m0s\": must be greater than 0",
        ),
        (
            "clientConnection:\n  burst: -1\n",
            "clientConnection.burst: Invalid value: -1",
        ),
        (
            "bindAddress: not-an-ip\n",
            "bindAddress: Invalid value: \"not-an-ip\": not a valid textual representation of an IP address",
        ),
        (
            "healthzBindAddress: 1.2.3.4:0\n",
            "healthzBindAddress: Invalid value: \"0\": must be a valid port",
        ),
        (
            "healthzBindAddress: host:80\n",
            "healthzBindAddress: Invalid value: \"host\": must be a valid IP",
        ),
        (
            "metricsBindAddress: 1.2.3.4:70000\n",
            "metricsBindAddress: Invalid value: \"70000\": must be a valid port",
        ),
        (
            "metricsBindAddress: \"1::2::3\"\n",
            "metricsBindAddress: Invalid value: \"1::2::3\": must be IP:port",
        ),
        (
            "clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n",
            "clusterCIDR: Invalid value: \"10.0.0.0/8,10.1.0.0/16\"",
        ),
        (
            "clusterCIDR: 10.0.0.0/8,fd00::/48,10.1.0.0/16\n",
            "clusterCIDR: Invalid value:",
        ),
        (
            "clusterCIDR: bogus\n",
            "clusterCIDR[0]: Invalid value: \"bogus\": must be a valid CIDR block",
        ),
        (
            "nodePortAddresses: [primary, 10.0.0.0/8]\n",
            "nodePortAddresses[0]: Invalid value: \"primary\": can't use both 'primary' and CIDRs",
        ),
        (
            "nodePortAddresses: [10.0.0.0/8, 1.2.3]\n",
            "nodePortAddresses[1]: Invalid value: \"1.2.3\"",
        ),
        (
            "detectLocalMode: Magic\n",
            "detectLocalMode: Unsupported value: \"Magic\": supported values: \"ClusterCIDR\"",
        ),
        (
            "detectLocalMode: BridgeInterface\n",
            "detectLocal.bridgeInterface: Invalid value: \"\": must not be empty",
        ),
        (
            "detectLocalMode: InterfaceNamePrefix\n",
            "detectLocal.interfaceNamePrefix: Invalid value: \"\": must not be empty",
        ),
        (
            "logging:\n  format: xml\n",
            "logging.format: Unsupported value: \"xml\"",
        ),
        ("portRange: abc\n", "portRange: Invalid value: \"abc\""),
        (
            "showHiddenMetricsForVersion: latest\n",
            "showHiddenMetricsForVersion: Invalid value: \"latest\"",
        ),
    ];
    for (snippet, want) in cases {
        let err = with_config(&format!("{HEADER}{snippet}"), &[]).unwrap_err();
        let ConfigError::Invalid(errs) = &err else {
            panic!("{snippet}: expected a validation error, got {err}");
        };
        // Exactly one field is reported (a negative syncPeriod is also below minSyncPeriod,
        // which upstream reports on the same field).
        assert!(
            errs.iter().all(|e| e.field == errs[0].field),
            "{snippet}: {errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.to_string().starts_with(want)),
            "{snippet}: got {errs:#?}"
        );
        assert!(err.to_string().contains(want), "{err}");
    }
}

#[test]
fn mode_specific_sections_are_only_validated_for_their_mode() {
    // Upstream validates the ipvs section only in ipvs mode.
    let ok = with_config(
        &format!("{HEADER}ipvs:\n  scheduler: fastest\n  tcpTimeout: -1s\n"),
        &[],
    );
    assert!(ok.is_ok(), "{ok:?}");
    // clusterCIDR is validated for the ClusterCIDR mode only; elsewhere garbage is ignored.
    let inv = with_config(
        &format!("{HEADER}detectLocalMode: NodeCIDR\nclusterCIDR: bogus\n"),
        &[],
    )
    .unwrap();
    assert!(inv.options.cluster_cidrs.is_empty());
    assert!(inv.warnings.iter().any(|w| w.contains("bogus")));
}

#[test]
fn validation_of_flag_values_names_the_field() {
    let err = run(&["--iptables-masquerade-bit=33"])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "invalid configuration: iptables.masqueradeBit: Invalid value: 33: must be within the range [0, 31]"
    );
    let err = run(&["--conntrack-udp-timeout=-1s", "--oom-score-adj=2000"])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("invalid configuration: ["), "{err}");
    assert!(
        err.contains("conntrack.udpTimeout: Invalid value: \"-1s\""),
        "{err}"
    );
    assert!(err.contains("oomScoreAdj: Invalid value: 2000"), "{err}");
    let err = run(&["--iptables-sync-period=0s"]).unwrap_err().to_string();
    assert!(
        err.contains("iptables.syncPeriod: Invalid value: \"0s\": must be greater than 0"),
        "{err}"
    );
    let err = run(&["--proxy-mode=ipvs", "--ipvs-scheduler=bogus"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("ipvs.scheduler"), "{err}");
    assert_eq!(
        run(&["--proxy-mode=ipvs", "--ipvs-scheduler=mh"])
            .unwrap()
            .options
            .ipvs
            .scheduler,
        "mh"
    );
    assert!(run(&["--cluster-cidr=10.0.0.0/8,10.1.0.0/16"]).is_err());
}

#[test]
fn config_file_unknown_fields_warn_and_known_fields_apply() {
    let inv = with_config(
        &format!(
            "{HEADER}foo: 1\niptables:\n  masqueradeBit: 10\n  bar: true\nlogging:\n  options:\n    text:\n      baz: 1\nconntrack:\n  min: 5\n"
        ),
        &[],
    )
    .unwrap();
    assert_eq!(inv.options.masquerade_bit, 10);
    assert_eq!(inv.options.conntrack.min, 5);
    let unknown: Vec<&String> = inv
        .warnings
        .iter()
        .filter(|w| w.contains("unknown field"))
        .collect();
    assert_eq!(
        unknown.len(),
        1,
        "one warning listing every unknown path: {:?}",
        inv.warnings
    );
    for path in [
        "\"foo\"",
        "\"iptables.bar\"",
        "\"logging.options.text.baz\"",
    ] {
        assert!(
            unknown[0].contains(&format!("unknown field {path}")),
            "{}",
            unknown[0]
        );
    }
    // Known fields with misspelt case are unknown too (decoding is case sensitive).
    let inv = with_config(&format!("{HEADER}BindAddress: 1.2.3.4\n"), &[]).unwrap();
    assert_eq!(
        inv.options.bind_address,
        "0.0.0.0".parse::<std::net::IpAddr>().unwrap()
    );
    assert!(
        inv.warnings
            .iter()
            .any(|w| w.contains("unknown field \"BindAddress\""))
    );
}

#[test]
fn config_file_type_and_header_errors() {
    let err = with_config(
        &format!("{HEADER}iptables:\n  masqueradeBit: fourteen\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("iptables.masqueradeBit: expected a 32-bit integer"),
        "{err}"
    );
    let err = with_config(&format!("{HEADER}configSyncPeriod: 5 minutes\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("configSyncPeriod: invalid duration"), "{err}");
    let err = with_config(&format!("{HEADER}nodePortAddresses: [1, 2]\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nodePortAddresses[0]: expected a string"),
        "{err}"
    );
    let err = with_config(&format!("{HEADER}featureGates:\n  A: maybe\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("featureGates.A: expected a boolean"), "{err}");

    let err = with_config(
        "apiVersion: kubeproxy.config.k8s.io/v1beta9\nkind: KubeProxyConfiguration\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unsupported apiVersion \"kubeproxy.config.k8s.io/v1beta9\""),
        "{err}"
    );
    let err = with_config(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unsupported kind \"KubeletConfiguration\""),
        "{err}"
    );
    let err = with_config("bindAddress: 1.2.3.4\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("apiVersion and kind must be set"), "{err}");
    let err = with_config("{{{", &[]).unwrap_err();
    assert!(matches!(err, ConfigError::File { .. }), "{err}");
    let err = parse_command_line(&args(&["--config=/nonexistent/kp.yaml"]), "n").unwrap_err();
    assert!(matches!(err, ConfigError::ReadFile { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/kp.yaml"));
}

#[test]
fn json_config_files_are_accepted() {
    let inv = with_config(
        r#"{"apiVersion":"kubeproxy.config.k8s.io/v1alpha1","kind":"KubeProxyConfiguration","mode":"ipvs","ipvs":{"syncPeriod":"20s","minSyncPeriod":"2s","scheduler":"lc"},"featureGates":{"X":true}}"#,
        &[],
    )
    .unwrap();
    assert_eq!(inv.options.mode, ProxyMode::Ipvs);
    assert_eq!(inv.options.sync_period, Duration::from_secs(20));
    assert_eq!(inv.options.min_sync_period, Duration::from_secs(2));
    assert_eq!(inv.options.ipvs.scheduler, "lc");
    assert_eq!(inv.options.feature_gates.get("X"), Some(&true));
}

#[test]
fn ipvs_mode_from_file_keeps_its_own_min_sync_default_of_zero() {
    let o = with_config(&format!("{HEADER}mode: ipvs\n"), &[])
        .unwrap()
        .options;
    assert_eq!(o.sync_period, Duration::from_secs(30));
    assert_eq!(o.min_sync_period, Duration::ZERO);
    let o = with_config(
        &format!("{HEADER}mode: nftables\nnftables:\n  masqueradeAll: true\n  masqueradeBit: 5\n"),
        &[],
    )
    .unwrap()
    .options;
    assert_eq!(o.min_sync_period, Duration::from_secs(1));
    assert!(o.masquerade_all);
    assert_eq!(o.masquerade_bit, 5);
}

#[test]
fn with_config_file_wins_except_logging_and_hostname_override() {
    let body = format!(
        "{HEADER}mode: ipvs\niptables:\n  masqueradeAll: false\nclusterCIDR: 10.0.0.0/8\nhostnameOverride: from-file\nlogging:\n  verbosity: 1\n  vmodule:\n  - filePattern: file\n    verbosity: 2\nfeatureGates:\n  FromFile: true\n"
    );
    let inv = with_config(
        &body,
        &[
            "--masquerade-all",
            "--proxy-mode=iptables",
            "--cluster-cidr=192.168.0.0/16",
            "--feature-gates=FromFlag=true",
            "--hostname-override=  Flag-Host ",
            "-v",
            "4",
            "--vmodule=flag=5",
            "--logging-format=json",
            "--master=https://m",
        ],
    )
    .unwrap();
    let o = &inv.options;
    assert!(
        !o.masquerade_all,
        "--masquerade-all is ignored with --config"
    );
    assert_eq!(o.mode, ProxyMode::Ipvs);
    assert_eq!(o.cluster_cidrs, vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(o.feature_gates.keys().collect::<Vec<_>>(), ["FromFile"]);
    assert_eq!(o.hostname, "flag-host");
    assert_eq!(inv.config.hostname_override, "flag-host");
    assert_eq!(o.verbosity, 4);
    assert_eq!(o.log_format, LogFormat::Json);
    assert_eq!(
        o.vmodule,
        vec![("flag".to_string(), 5), ("file".to_string(), 2)]
    );
    assert_eq!(o.master.as_deref(), Some("https://m"));
    let w = inv.warnings.join("\n");
    for ignored in [
        "--masquerade-all",
        "--proxy-mode",
        "--cluster-cidr",
        "--feature-gates",
    ] {
        assert!(
            w.contains(&format!(
                "flag {ignored} is ignored because --config is set"
            )),
            "{w}"
        );
    }
    for applied in [
        "--hostname-override",
        "-v",
        "--v ",
        "--vmodule",
        "--logging-format",
        "--master",
    ] {
        assert!(!w.contains(applied), "no warning for {applied}: {w}");
    }
    assert!(o.config_file.is_some());
}

#[test]
fn write_config_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kp.yaml");
    let out_s = out.display().to_string();
    let first = parse_command_line(
        &args(&[
            "--write-config-to",
            &out_s,
            "--proxy-mode=ipvs",
            "--masquerade-all",
            "--ipvs-sync-period=45s",
            "--ipvs-min-sync-period=3s",
            "--ipvs-scheduler=sh",
            "--cluster-cidr=10.0.0.0/8",
            "--nodeport-addresses=10.1.0.0/16",
            "--healthz-bind-address=1.2.3.4",
            "--feature-gates=Foo=true",
            "--kube-api-qps=0.1",
            "--conntrack-udp-timeout=30s",
            "--hostname-override=Written",
            "-v=2",
            "--vmodule=x=3",
        ]),
        "sys-host",
    )
    .unwrap();
    let Action::WriteConfig(path) = &first.action else {
        panic!("{:?}", first.action)
    };
    write_config_file(&first.config, path).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"),
        "{text}"
    );
    assert!(text.contains("kind: KubeProxyConfiguration"), "{text}");
    assert!(text.contains("qps: 0.1\n"), "{text}");
    assert!(text.contains("syncPeriod: 45s"), "{text}");
    // Every field is present, defaults filled in.
    for key in [
        "oomScoreAdj: -999",
        "configSyncPeriod: 15m0s",
        "tcpEstablishedTimeout: 24h0m0s",
        "winkernel:",
        "portRange:",
    ] {
        assert!(text.contains(key), "{key} missing from\n{text}");
    }

    let second = parse_command_line(&args(&["--config", &out_s]), "other-host").unwrap();
    assert!(second.warnings.is_empty(), "{:?}", second.warnings);
    let mut a = first.options.clone();
    let mut b = second.options.clone();
    a.config_file = None;
    b.config_file = None;
    assert_eq!(a, b);
    assert_eq!(first.config, second.config);
    assert_eq!(b.sync_period, Duration::from_secs(45));
    assert_eq!(b.min_sync_period, Duration::from_secs(3));
    assert!(b.masquerade_all);
    assert_eq!(b.hostname, "written");
    assert_eq!(
        b.healthz_bind_address,
        Some("1.2.3.4:10256".parse().unwrap())
    );
    assert_eq!(b.qps, 0.1);
    assert_eq!(
        second.config.to_yaml(),
        text,
        "writing again is byte-identical"
    );
}

#[test]
fn render_arguments() {
    let r = parse_render_args(
        &args(&[
            "render",
            "--proxy-mode",
            "ipvs",
            "--node-ip",
            "10.0.0.1",
            "--node-ip=fd00::1,10.0.0.2",
            "--objects",
            "a.yaml",
            "b.yaml",
            "--cluster-cidr",
            "10.244.0.0/16",
            "--hostname-override",
            "N1",
            "--objects=c.yaml",
        ]),
        "sys",
    )
    .unwrap();
    assert_eq!(r.options.mode, ProxyMode::Ipvs);
    assert_eq!(r.options.hostname, "n1");
    assert_eq!(
        r.node_ips,
        vec![
            "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
            "fd00::1".parse().unwrap(),
            "10.0.0.2".parse().unwrap()
        ]
    );
    assert_eq!(
        r.objects,
        vec![
            std::path::PathBuf::from("a.yaml"),
            "b.yaml".into(),
            "c.yaml".into()
        ]
    );
    assert_eq!(
        r.options.detect_local,
        DetectLocal::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()])
    );

    let r = parse_render_args(&args(&["--masquerade-all"]), "sys").unwrap();
    assert!(r.objects.is_empty() && r.node_ips.is_empty());
    assert!(
        r.options.masquerade_all,
        "other kube-proxy flags are accepted"
    );

    // In render, --proxy-mode and --cluster-cidr override the file.
    let f = config_file(&format!(
        "{HEADER}mode: iptables\nclusterCIDR: 10.0.0.0/8\n"
    ));
    let r = parse_render_args(
        &args(&[
            "--config",
            &f.path().display().to_string(),
            "--proxy-mode=nftables",
            "--cluster-cidr=10.9.0.0/16",
        ]),
        "sys",
    )
    .unwrap();
    assert_eq!(r.options.mode, ProxyMode::Nftables);
    assert_eq!(
        r.options.cluster_cidrs,
        vec!["10.9.0.0/16".parse().unwrap()]
    );

    assert!(parse_render_args(&args(&["--objects", "--node-ip=1.2.3.4"]), "s").is_err());
    assert!(
        parse_render_args(&args(&["--node-ip=garbage"]), "s")
            .unwrap_err()
            .to_string()
            .contains("--node-ip")
    );
    assert!(parse_render_args(&args(&["--bogus"]), "s").is_err());
}

#[test]
fn every_flag_config_field_exists_in_the_schema() {
    use file::{SCHEMA, Ty};
    for spec in flag_table() {
        let Some(path) = spec.config_field else {
            continue;
        };
        let mut fields = SCHEMA;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (_, ty) = fields
                .iter()
                .find(|(name, _)| name == part)
                .unwrap_or_else(|| panic!("--{}: {path} is not a config field", spec.name));
            if i + 1 < parts.len() {
                match ty {
                    Ty::Obj(f) => fields = f,
                    other => panic!(
                        "--{}: {path}: {part} is {other:?}, not an object",
                        spec.name
                    ),
                }
            }
        }
    }
}

#[test]
fn version_values() {
    assert_eq!(run(&["--version=raw"]).unwrap().action, Action::Version);
    assert_eq!(run(&["--version=true"]).unwrap().action, Action::Version);
    // --version=vX.Y.Z only overrides the reported version upstream; it does not exit.
    assert_eq!(run(&["--version=v1.31.0"]).unwrap().action, Action::Run);
}
