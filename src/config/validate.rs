//! Validation after upstream's `pkg/proxy/apis/config/validation/validation.go`, with field
//! paths spelled as the JSON names of the config file (`iptables.masqueradeBit`).
//!
//! Input is the effective configuration: defaulted, with the platform defaults applied (mode
//! never empty, detectLocalMode never empty), and the sync periods of the selected mode in
//! that mode's section.

use super::duration::GoDuration;
use super::error::{FieldError, quote};
use super::netutil::{parse_cidr_sloppy, parse_ip_sloppy, parse_port, split_host_port};
use super::types::KubeProxyConfiguration;

/// Valid `mode` values on Linux.
pub const PROXY_MODES: &[&str] = &["iptables", "ipvs", "nftables"];
/// Valid `detectLocalMode` values.
pub const LOCAL_MODES: &[&str] = &[
    "ClusterCIDR",
    "NodeCIDR",
    "BridgeInterface",
    "InterfaceNamePrefix",
    "",
];
/// IPVS schedulers accepted for `ipvs.scheduler` (`""` means `rr`).
pub const IPVS_SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh",
];
/// Log formats.
pub const LOG_FORMATS: &[&str] = &["json", "text"];

/// The config section whose sync periods and masquerade bit the mode uses.
pub fn mode_section(mode: &str) -> &'static str {
    match mode {
        "ipvs" => "ipvs",
        "nftables" => "nftables",
        _ => "iptables",
    }
}

fn dur(d: GoDuration) -> String {
    quote(&d.to_string())
}

fn non_negative(errs: &mut Vec<FieldError>, field: &str, d: GoDuration) {
    if d.is_negative() {
        errs.push(FieldError::invalid(
            field,
            dur(d),
            "must be greater than or equal to 0",
        ));
    }
}

fn masquerade_bit(errs: &mut Vec<FieldError>, field: &str, bit: Option<i32>) {
    if let Some(b) = bit
        && !(0..=31).contains(&b)
    {
        errs.push(FieldError::invalid(
            field,
            b,
            "must be within the range [0, 31]",
        ));
    }
}

fn host_port(errs: &mut Vec<FieldError>, field: &str, input: &str) {
    let Ok((host, port)) = split_host_port(input) else {
        errs.push(FieldError::invalid(field, quote(input), "must be IP:port"));
        return;
    };
    if parse_ip_sloppy(host).is_none() {
        errs.push(FieldError::invalid(
            field,
            quote(host),
            "must be a valid IP",
        ));
    }
    if parse_port(port).is_none() {
        errs.push(FieldError::invalid(
            field,
            quote(port),
            "must be a valid port",
        ));
    }
}

/// Splits `clusterCIDR` on commas (surrounding spaces tolerated, empty items dropped).
pub fn split_cluster_cidrs(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// Validates the effective configuration; empty means valid.
pub fn validate(c: &KubeProxyConfiguration) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mode = c.mode.as_str();

    masquerade_bit(
        &mut errs,
        "iptables.masqueradeBit",
        c.iptables.masquerade_bit,
    );
    if mode == "nftables" {
        masquerade_bit(
            &mut errs,
            "nftables.masqueradeBit",
            c.nftables.masquerade_bit,
        );
    }
    if mode == "ipvs" {
        let ipvs = &c.ipvs;
        non_negative(&mut errs, "ipvs.tcpTimeout", ipvs.tcp_timeout);
        non_negative(&mut errs, "ipvs.tcpFinTimeout", ipvs.tcp_fin_timeout);
        non_negative(&mut errs, "ipvs.udpTimeout", ipvs.udp_timeout);
        for (i, cidr) in ipvs.exclude_cidrs.iter().flatten().enumerate() {
            if parse_cidr_sloppy(cidr).is_none() {
                errs.push(FieldError::invalid(
                    format!("ipvs.excludeCIDRs[{i}]"),
                    quote(cidr),
                    "must be a valid CIDR",
                ));
            }
        }
        if !ipvs.scheduler.is_empty() && !IPVS_SCHEDULERS.contains(&ipvs.scheduler.as_str()) {
            errs.push(FieldError::invalid(
                "ipvs.scheduler",
                quote(&ipvs.scheduler),
                &format!(
                    "must be one of {} or blank (blank means the default algorithm method, currently rr)",
                    IPVS_SCHEDULERS.join(", ")
                ),
            ));
        }
    }

    let ct = &c.conntrack;
    for (field, v) in [
        ("conntrack.maxPerCore", ct.max_per_core),
        ("conntrack.min", ct.min),
    ] {
        if let Some(n) = v
            && n < 0
        {
            errs.push(FieldError::invalid(
                field,
                n,
                "must be greater than or equal to 0",
            ));
        }
    }
    for (field, d) in [
        (
            "conntrack.tcpEstablishedTimeout",
            ct.tcp_established_timeout.unwrap_or_default(),
        ),
        (
            "conntrack.tcpCloseWaitTimeout",
            ct.tcp_close_wait_timeout.unwrap_or_default(),
        ),
        ("conntrack.udpTimeout", ct.udp_timeout),
        ("conntrack.udpStreamTimeout", ct.udp_stream_timeout),
    ] {
        non_negative(&mut errs, field, d);
    }
    if let Some(adj) = c.oom_score_adj
        && !(-1000..=1000).contains(&adj)
    {
        errs.push(FieldError::invalid(
            "oomScoreAdj",
            adj,
            "must be within the range [-1000, 1000]",
        ));
    }

    if !PROXY_MODES.contains(&mode) {
        let reason = if mode == "kernelspace" {
            "the kernelspace proxy mode is only supported on Windows; must be iptables, ipvs, nftables or blank (blank means the best-available proxy [currently iptables])".to_string()
        } else {
            format!(
                "must be {} or blank (blank means the best-available proxy [currently iptables])",
                PROXY_MODES.join(", ")
            )
        };
        errs.push(FieldError::invalid("mode", quote(mode), &reason));
    }

    if c.client_connection.burst < 0 {
        errs.push(FieldError::invalid(
            "clientConnection.burst",
            c.client_connection.burst,
            "must be greater than or equal to 0",
        ));
    }

    if c.config_sync_period <= GoDuration::ZERO {
        errs.push(FieldError::invalid(
            "configSyncPeriod",
            dur(c.config_sync_period),
            "must be greater than 0",
        ));
    }
    let section = mode_section(mode);
    let (sync, min) = match section {
        "ipvs" => (c.ipvs.sync_period, c.ipvs.min_sync_period),
        "nftables" => (c.nftables.sync_period, c.nftables.min_sync_period),
        _ => (c.iptables.sync_period, c.iptables.min_sync_period),
    };
    if sync <= GoDuration::ZERO {
        errs.push(FieldError::invalid(
            format!("{section}.syncPeriod"),
            dur(sync),
            "must be greater than 0",
        ));
    }
    if min.is_negative() {
        errs.push(FieldError::invalid(
            format!("{section}.minSyncPeriod"),
            dur(min),
            "must be greater than or equal to 0",
        ));
    }
    if min > sync {
        errs.push(FieldError::invalid(
            format!("{section}.syncPeriod"),
            dur(sync),
            &format!("must be greater than or equal to {section}.minSyncPeriod ({min})"),
        ));
    }

    if parse_ip_sloppy(&c.bind_address).is_none() {
        errs.push(FieldError::invalid(
            "bindAddress",
            quote(&c.bind_address),
            "not a valid textual representation of an IP address",
        ));
    }
    // An empty address disables the server (set through the flags; the file's empty value
    // is defaulted).
    if !c.healthz_bind_address.is_empty() {
        host_port(&mut errs, "healthzBindAddress", &c.healthz_bind_address);
    }
    if !c.metrics_bind_address.is_empty() {
        host_port(&mut errs, "metricsBindAddress", &c.metrics_bind_address);
    }

    if let Err(e) = super::flags::check_port_range(&c.port_range) {
        errs.push(FieldError::invalid(
            "portRange",
            quote(&c.port_range),
            &format!("must be a valid port range (e.g. 300-2000): {e}"),
        ));
    }

    validate_node_port_addresses(&mut errs, c.node_port_addresses.as_deref().unwrap_or(&[]));

    let hidden = &c.show_hidden_metrics_for_version;
    if !hidden.is_empty() {
        let ok = hidden.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|x| x.is_ascii_digit())
                && b.bytes().all(|x| x.is_ascii_digit())
        });
        if !ok {
            errs.push(FieldError::invalid(
                "showHiddenMetricsForVersion",
                quote(hidden),
                "must be in the format <major>.<minor> of the previous minor version (e.g. 1.16)",
            ));
        }
    }

    let local_mode = c.detect_local_mode.as_str();
    if !LOCAL_MODES.contains(&local_mode) {
        errs.push(FieldError::not_supported(
            "detectLocalMode",
            local_mode,
            LOCAL_MODES,
        ));
    }
    match local_mode {
        "BridgeInterface" if c.detect_local.bridge_interface.is_empty() => {
            errs.push(FieldError::invalid(
                "detectLocal.bridgeInterface",
                quote(""),
                "must not be empty",
            ));
        }
        "InterfaceNamePrefix" if c.detect_local.interface_name_prefix.is_empty() => {
            errs.push(FieldError::invalid(
                "detectLocal.interfaceNamePrefix",
                quote(""),
                "must not be empty",
            ));
        }
        "ClusterCIDR" | "" => validate_cluster_cidrs(&mut errs, &c.cluster_cidr),
        _ => {}
    }

    if !LOG_FORMATS.contains(&c.logging.format.as_str()) {
        errs.push(FieldError::not_supported(
            "logging.format",
            &c.logging.format,
            LOG_FORMATS,
        ));
    }
    for (i, item) in c.logging.vmodule.iter().enumerate() {
        if item.file_pattern.is_empty() {
            errs.push(FieldError::invalid(
                format!("logging.vmodule[{i}].filePattern"),
                quote(""),
                "must not be empty",
            ));
        }
    }
    errs
}

fn validate_node_port_addresses(errs: &mut Vec<FieldError>, addrs: &[String]) {
    let keywords_only_alone = addrs.len() == 1;
    for (i, a) in addrs.iter().enumerate() {
        match a.as_str() {
            "primary" => {
                if !keywords_only_alone {
                    errs.push(FieldError::invalid(
                        format!("nodePortAddresses[{i}]"),
                        quote(a),
                        "can't use both 'primary' and CIDRs",
                    ));
                }
            }
            "all" | "localhost" => {}
            other => {
                if parse_cidr_sloppy(other).is_none() {
                    errs.push(FieldError::invalid(
                        format!("nodePortAddresses[{i}]"),
                        quote(other),
                        "must be a valid CIDR or one of 'primary', 'localhost', 'all'",
                    ));
                }
            }
        }
    }
}

fn validate_cluster_cidrs(errs: &mut Vec<FieldError>, value: &str) {
    let cidrs = split_cluster_cidrs(value);
    if cidrs.len() > 2 {
        errs.push(FieldError::invalid(
            "clusterCIDR",
            quote(value),
            "must be either a single CIDR or a dual-stack pair of CIDRs (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)",
        ));
        return;
    }
    let mut parsed = Vec::new();
    for (i, s) in cidrs.iter().enumerate() {
        match parse_cidr_sloppy(s) {
            Some(c) => parsed.push(c),
            None => errs.push(FieldError::invalid(
                format!("clusterCIDR[{i}]"),
                quote(s),
                "must be a valid CIDR block (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)",
            )),
        }
    }
    if let [a, b] = parsed[..]
        && a.is_ipv4() == b.is_ipv4()
    {
        errs.push(FieldError::invalid(
            "clusterCIDR",
            quote(value),
            "must be either a single CIDR or a dual-stack pair of CIDRs (at most one per IP family)",
        ));
    }
}
