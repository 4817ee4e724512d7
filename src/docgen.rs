//! Reference documentation generated from the code: `docs/configuration.md` lists every flag
//! (from [`crate::config::flag_table`]) and every `KubeProxyConfiguration` field (from the
//! effective defaults `--write-config-to` writes), each with its default and whether this
//! implementation applies it. Printed by the hidden `kube-proxy-rs gen-docs configuration`;
//! `tests/deploy_docs.rs` fails when the checked-in file differs
//! (`UPDATE_DOCS=1 cargo test --test deploy_docs` rewrites it).
//!
//! What the flag table cannot say (a field accepted for compatibility but not acted on, a mode
//! not implemented yet) is in [`NOTES`] and [`MODES`] below: update them with the code.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::config::types::VModuleItem;
use crate::config::{FlagScope, FlagSpec, FlagStatus, KubeProxyConfiguration, flag_table};

/// Proxy modes and their state in this implementation.
pub const MODES: &[(&str, &str)] = &[
    (
        "iptables",
        "supported (the default; `mode: \"\"` is iptables, as upstream on Linux)",
    ),
    ("ipvs", "supported (deprecated upstream since 1.35)"),
    (
        "nftables",
        "supported: upstream's v1.34/1.35 ruleset, both families; `explain --mode nftables` reads it",
    ),
];

/// Implementation notes by config field (a prefix ending in `.` covers a section), for fields
/// that are accepted for compatibility but not (fully) acted on. Fields not listed are applied
/// as upstream applies them.
pub const NOTES: &[(&str, &str)] = &[
    (
        "bindAddress",
        "accepted; upstream only derives the node IP family from it and binds nothing: IPv4 is used",
    ),
    (
        "clientConnection.acceptContentTypes",
        "accepted, not applied: the API client speaks JSON",
    ),
    (
        "clientConnection.burst",
        "accepted, not applied: no client-side rate limit",
    ),
    (
        "clientConnection.contentType",
        "accepted, not applied: the API client speaks JSON",
    ),
    (
        "clientConnection.qps",
        "accepted, not applied: no client-side rate limit",
    ),
    (
        "configSyncPeriod",
        "accepted, not applied: watches re-list on errors, not on a timer",
    ),
    (
        "enableProfiling",
        "accepted, not applied: /debug/pprof is not served",
    ),
    (
        "featureGates",
        "accepted, not applied: no feature gate changes behaviour",
    ),
    ("iptables.snatNodeInternalIP", "accepted, not applied"),
    ("ipvs.", "supported; applies in ipvs mode only"),
    (
        "logging.flushFrequency",
        "accepted, not applied: logs are written unbuffered",
    ),
    ("logging.options.", "accepted, not applied"),
    ("logging.vmodule", "accepted, not applied"),
    ("nftables.", "supported; applies in nftables mode only"),
    (
        "portRange",
        "no effect: it configured the removed userspace proxy",
    ),
    (
        "showHiddenMetricsForVersion",
        "accepted, not applied: no metric is hidden",
    ),
    ("windowsRunAsService", "no effect on Linux (Windows only)"),
    ("winkernel.", "no effect on Linux (Windows only)"),
];

/// Notes for flags that set no config field.
const FLAG_NOTES: &[(&str, &str)] = &[
    (
        "init-only",
        "accepted: validates flags and exits; there is no privileged init step to split off",
    ),
    (
        "cleanup",
        "supported: removes iptables-mode chains and jump rules and IPVS-mode state (virtual \
         servers, kube-ipvs0, ipsets), ours or upstream's",
    ),
];

fn note_for(field: &str) -> Option<&'static str> {
    NOTES
        .iter()
        .find(|(k, _)| {
            if k.ends_with('.') {
                field.starts_with(k)
            } else {
                field == *k
            }
        })
        .map(|(_, v)| *v)
}

fn status_of(spec: &FlagSpec) -> String {
    match spec.status {
        FlagStatus::NoEffect(why) => format!("no effect: {why}"),
        FlagStatus::Deprecated(why) => {
            let base = spec.config_field.and_then(note_for).unwrap_or("supported");
            format!("{base}; deprecated: {why}")
        }
        FlagStatus::Supported => spec
            .config_field
            .and_then(note_for)
            .or_else(|| {
                FLAG_NOTES
                    .iter()
                    .find(|(n, _)| *n == spec.name)
                    .map(|(_, v)| *v)
            })
            .unwrap_or("supported")
            .to_string(),
    }
}

/// Escapes a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn code(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!("`{}`", s.replace('|', "\\|"))
    }
}

/// Leaf paths of a config serialised to JSON (maps and lists are leaves).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() && prefix != "featureGates" => {
            for (k, child) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, child, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// Every field path, including the ones serialised only when set.
fn all_fields() -> Vec<String> {
    let mut c = KubeProxyConfiguration::defaulted();
    c.feature_gates.insert("X".into(), true);
    c.logging.vmodule.push(VModuleItem::default());
    c.logging.options.text.split_stream = true;
    c.logging.options.json.split_stream = true;
    c.iptables.snat_node_internal_ip = Some(false);
    c.ipvs.ip_set = Some(Default::default());
    c.windows_run_as_service = true;
    let mut m = BTreeMap::new();
    flatten("", &serde_json::to_value(&c).unwrap_or_default(), &mut m);
    m.into_keys()
        .filter(|k| k != "apiVersion" && k != "kind")
        .collect()
}

fn show_default(v: Option<&Value>) -> String {
    match v {
        None => "(unset)".to_string(),
        Some(Value::String(s)) if s.is_empty() => "`\"\"`".to_string(),
        Some(Value::String(s)) => code(s),
        Some(other) => code(&other.to_string()),
    }
}

/// `docs/configuration.md`.
pub fn configuration_md() -> String {
    let mut out = String::new();
    out.push_str(
        "<!-- Generated by `kube-proxy-rs gen-docs configuration` (src/docgen.rs) from the flag \
         table and the configuration defaults. Do not edit: run \
         `UPDATE_DOCS=1 cargo test --test deploy_docs`. -->\n\
         # Configuration reference\n\n\
         kube-proxy-rs takes upstream kube-proxy's flags and `KubeProxyConfiguration` \
         (`kubeproxy.config.k8s.io/v1alpha1`) file unchanged. With `--config`, flags that set a \
         config field are ignored (with a warning) except `--hostname-override` and the logging \
         flags, as upstream. A \"supported\" entry behaves as upstream's; the others are accepted \
         so that existing DaemonSets and ConfigMaps keep working, and say what they do here.\n\n\
         ## Modes\n\n| Mode | Status |\n| --- | --- |\n",
    );
    for (mode, status) in MODES {
        let _ = writeln!(out, "| `{mode}` | {status} |");
    }

    out.push_str(
        "\n## Flags\n\n\
         Hidden from `--help` (like pflag's deprecated flags): the deprecated and no-effect \
         ones.\n\n\
         | Flag | Type | Default | Config field | Applies with `--config` | Status | Description |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut by_field: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for f in flag_table() {
        let name = match f.shorthand {
            Some(c) => format!("`-{c}`, `--{}`", f.name),
            None => format!("`--{}`", f.name),
        };
        if let Some(field) = f.config_field {
            by_field
                .entry(field)
                .or_default()
                .push(format!("`--{}`", f.name));
        }
        let scope = match f.scope {
            FlagScope::Config => "no (the file wins)",
            FlagScope::Logging | FlagScope::Always => "yes",
        };
        let ty = match f.kind.type_name() {
            "" => "bool".to_string(),
            t => t.to_string(),
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {scope} | {} | {} |",
            cell(&ty),
            code(f.default),
            f.config_field.map(code).unwrap_or_default(),
            cell(&status_of(f)),
            cell(f.help),
        );
    }

    out.push_str(
        "\n## Configuration file fields\n\n\
         Defaults are what `--write-config-to` writes (upstream's defaulting plus the Linux \
         platform defaults: `mode` iptables, `detectLocalMode` ClusterCIDR).\n\n\
         | Field | Default | Flag | Status |\n| --- | --- | --- | --- |\n",
    );
    let effective = crate::config::parse_command_line(&[], "node")
        .map(|inv| inv.config)
        .unwrap_or_else(|_| KubeProxyConfiguration::defaulted());
    let mut defaults = BTreeMap::new();
    flatten(
        "",
        &serde_json::to_value(&effective).unwrap_or_default(),
        &mut defaults,
    );
    for field in all_fields() {
        let flags = by_field
            .get(field.as_str())
            .map(|v| v.join(", "))
            .unwrap_or_default();
        let status = note_for(&field).unwrap_or("supported");
        let _ = writeln!(
            out,
            "| `{field}` | {} | {flags} | {} |",
            show_default(defaults.get(&field)),
            cell(status),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_and_field_is_listed() {
        let md = configuration_md();
        for f in flag_table() {
            assert!(md.contains(&format!("`--{}`", f.name)), "--{}", f.name);
            if let Some(field) = f.config_field {
                assert!(md.contains(&format!("| `{field}` |")), "{field}");
            }
        }
        for field in [
            "mode",
            "iptables.masqueradeBit",
            "conntrack.maxPerCore",
            "logging.options.json.splitStream",
            "featureGates",
            "winkernel.enableDSR",
            "ipvs.excludeCIDRs",
        ] {
            assert!(md.contains(&format!("| `{field}` |")), "{field}");
        }
        assert!(
            md.contains("| `iptables.syncPeriod` | `30s` | `--iptables-sync-period` | supported |")
        );
        assert!(md.contains("| `winkernel.enableDSR` | `false` |  | no effect on Linux"));
    }

    #[test]
    fn notes_name_real_fields() {
        let fields = all_fields();
        for (k, _) in NOTES {
            assert!(
                fields.iter().any(|f| if k.ends_with('.') {
                    f.starts_with(k)
                } else {
                    f == k
                }),
                "note for unknown field {k}"
            );
        }
        for (name, _) in FLAG_NOTES {
            assert!(flag_table().iter().any(|f| f.name == *name), "{name}");
        }
    }
}
