//! Loading a `KubeProxyConfiguration` file (YAML or JSON).
//!
//! Upstream decodes strictly first and, when the only problem is unknown (or duplicate)
//! fields, decodes again leniently and logs a warning. Here the document is walked against
//! the field schema below: unknown field paths become one warning, a value of the wrong type
//! is an error naming its field, and the cleaned document is then deserialised.

use std::path::Path;

use serde_json::Value;

use super::duration::GoDuration;
use super::error::ConfigError;
use super::types::{API_VERSION, KIND, KubeProxyConfiguration};

/// The JSON type a field must have.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    Str,
    Bool,
    I32,
    U32,
    Float,
    /// A Go duration string.
    Duration,
    /// A Go duration string or a number of nanoseconds (`logging.flushFrequency`).
    DurationOrInt,
    /// A quantity: string or number.
    Quantity,
    /// A list of strings.
    StrList,
    /// A map of names to booleans (`featureGates`).
    BoolMap,
    /// A list of objects with the given fields.
    ObjList(&'static [(&'static str, Ty)]),
    /// An object with the given fields.
    Obj(&'static [(&'static str, Ty)]),
}

use Ty::*;

const CLIENT_CONNECTION: &[(&str, Ty)] = &[
    ("kubeconfig", Str),
    ("acceptContentTypes", Str),
    ("contentType", Str),
    ("qps", Float),
    ("burst", I32),
];
const OUTPUT_ROUTING: &[(&str, Ty)] = &[("splitStream", Bool), ("infoBufferSize", Quantity)];
const LOGGING: &[(&str, Ty)] = &[
    ("format", Str),
    ("flushFrequency", DurationOrInt),
    ("verbosity", U32),
    (
        "vmodule",
        ObjList(&[("filePattern", Str), ("verbosity", U32)]),
    ),
    (
        "options",
        Obj(&[("text", Obj(OUTPUT_ROUTING)), ("json", Obj(OUTPUT_ROUTING))]),
    ),
];
const IPTABLES: &[(&str, Ty)] = &[
    ("masqueradeBit", I32),
    ("masqueradeAll", Bool),
    ("localhostNodePorts", Bool),
    ("snatNodeInternalIP", Bool),
    ("syncPeriod", Duration),
    ("minSyncPeriod", Duration),
];
const IPVS: &[(&str, Ty)] = &[
    ("syncPeriod", Duration),
    ("minSyncPeriod", Duration),
    ("scheduler", Str),
    ("excludeCIDRs", StrList),
    ("strictARP", Bool),
    ("tcpTimeout", Duration),
    ("tcpFinTimeout", Duration),
    ("udpTimeout", Duration),
    ("ipSet", Obj(&[("hashSize", I32), ("maxElements", I32)])),
];
const NFTABLES: &[(&str, Ty)] = &[
    ("masqueradeBit", I32),
    ("masqueradeAll", Bool),
    ("syncPeriod", Duration),
    ("minSyncPeriod", Duration),
];
const WINKERNEL: &[(&str, Ty)] = &[
    ("networkName", Str),
    ("sourceVip", Str),
    ("enableDSR", Bool),
    ("rootHnsEndpointName", Str),
    ("forwardHealthCheckVip", Bool),
];
const DETECT_LOCAL: &[(&str, Ty)] = &[("bridgeInterface", Str), ("interfaceNamePrefix", Str)];
const CONNTRACK: &[(&str, Ty)] = &[
    ("maxPerCore", I32),
    ("min", I32),
    ("tcpEstablishedTimeout", Duration),
    ("tcpCloseWaitTimeout", Duration),
    ("tcpBeLiberal", Bool),
    ("udpTimeout", Duration),
    ("udpStreamTimeout", Duration),
];

/// Every field of `KubeProxyConfiguration` v1alpha1 with its JSON name and type.
pub(crate) const SCHEMA: &[(&str, Ty)] = &[
    ("apiVersion", Str),
    ("kind", Str),
    ("featureGates", BoolMap),
    ("clientConnection", Obj(CLIENT_CONNECTION)),
    ("logging", Obj(LOGGING)),
    ("hostnameOverride", Str),
    ("bindAddress", Str),
    ("healthzBindAddress", Str),
    ("metricsBindAddress", Str),
    ("bindAddressHardFail", Bool),
    ("enableProfiling", Bool),
    ("showHiddenMetricsForVersion", Str),
    ("mode", Str),
    ("iptables", Obj(IPTABLES)),
    ("ipvs", Obj(IPVS)),
    ("nftables", Obj(NFTABLES)),
    ("winkernel", Obj(WINKERNEL)),
    ("detectLocalMode", Str),
    ("detectLocal", Obj(DETECT_LOCAL)),
    ("clusterCIDR", Str),
    ("nodePortAddresses", StrList),
    ("oomScoreAdj", I32),
    ("conntrack", Obj(CONNTRACK)),
    ("configSyncPeriod", Duration),
    ("portRange", Str),
    ("windowsRunAsService", Bool),
];

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string {s:?}"),
        Value::Number(n) => format!("number {n}"),
        Value::Bool(b) => format!("bool {b}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
        Value::Null => "null".to_string(),
    }
}

/// Checks `v` against `ty`; removes nulls (Go leaves such fields at their zero value) and
/// unknown keys from objects, recording the unknown paths.
fn walk(v: &mut Value, ty: Ty, path: &str, unknown: &mut Vec<String>) -> Result<(), String> {
    let wrong =
        |want: &str, v: &Value| Err(format!("{path}: expected {want}, got {}", describe(v)));
    match ty {
        Str => match v {
            Value::String(_) => Ok(()),
            other => wrong("a string", other),
        },
        Bool => match v {
            Value::Bool(_) => Ok(()),
            other => wrong("a boolean", other),
        },
        I32 => match v.as_i64() {
            Some(n) if i32::try_from(n).is_ok() => Ok(()),
            _ => wrong("a 32-bit integer", v),
        },
        U32 => match v.as_u64() {
            Some(n) if u32::try_from(n).is_ok() => Ok(()),
            _ => wrong("a non-negative 32-bit integer", v),
        },
        Float => match v {
            Value::Number(_) => Ok(()),
            other => wrong("a number", other),
        },
        Duration | DurationOrInt => match v {
            Value::String(s) => GoDuration::parse(s)
                .map(|_| ())
                .map_err(|e| format!("{path}: invalid duration: {e}")),
            Value::Number(n) if matches!(ty, DurationOrInt) && n.as_i64().is_some() => Ok(()),
            other => wrong("a duration string such as \"30s\"", other),
        },
        Quantity => match v {
            Value::String(_) | Value::Number(_) => Ok(()),
            other => wrong("a quantity", other),
        },
        StrList => match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if !item.is_string() {
                        return Err(format!(
                            "{path}[{i}]: expected a string, got {}",
                            describe(item)
                        ));
                    }
                }
                Ok(())
            }
            other => wrong("a list of strings", other),
        },
        BoolMap => match v {
            Value::Object(m) => {
                m.retain(|_, val| !val.is_null());
                for (k, val) in m.iter() {
                    if !val.is_boolean() {
                        return Err(format!(
                            "{}: expected a boolean, got {}",
                            join(path, k),
                            describe(val)
                        ));
                    }
                }
                Ok(())
            }
            other => wrong("a map of names to booleans", other),
        },
        ObjList(fields) => match v {
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item, Obj(fields), &format!("{path}[{i}]"), unknown)?;
                }
                Ok(())
            }
            other => wrong("a list", other),
        },
        Obj(fields) => match v {
            Value::Object(m) => {
                let keys: Vec<String> = m.keys().cloned().collect();
                for key in keys {
                    let child_path = join(path, &key);
                    let Some(&(_, child_ty)) = fields.iter().find(|(name, _)| *name == key) else {
                        unknown.push(child_path);
                        m.remove(&key);
                        continue;
                    };
                    let child = m.get_mut(&key).expect("key listed above");
                    if child.is_null() {
                        m.remove(&key);
                        continue;
                    }
                    walk(child, child_ty, &child_path, unknown)?;
                }
                Ok(())
            }
            other => wrong("an object", other),
        },
    }
}

/// Converts a YAML value to JSON; mapping keys must be strings (numbers and booleans are
/// stringified as YAML-to-JSON conversion does).
fn yaml_to_json(v: serde_yaml_ng::Value) -> Result<Value, String> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                Value::Number(
                    serde_json::Number::from_f64(f)
                        .ok_or_else(|| format!("unsupported number {f}"))?,
                )
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .map(yaml_to_json)
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = serde_json::Map::new();
            for (k, val) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                out.insert(key, yaml_to_json(val)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

/// A decoded config file: the configuration (not yet defaulted) and the unknown field paths.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    /// The decoded configuration, before defaulting.
    pub config: KubeProxyConfiguration,
    /// Paths of fields the schema does not know (`iptables.foo`), in document order.
    pub unknown_fields: Vec<String>,
}

/// Decodes configuration text (YAML or JSON); `Err` carries a one-line reason.
pub fn decode_config(text: &str) -> Result<LoadedConfig, String> {
    crate::yamlguard::check(text, crate::yamlguard::Limits::CONFIG).map_err(|e| e.to_string())?;
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| format!("invalid YAML/JSON: {e}"))?;
    let mut doc = yaml_to_json(yaml)?;
    let Value::Object(top) = &doc else {
        return Err(format!("expected a {KIND} object, got {}", describe(&doc)));
    };
    let api_version = top.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = top.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version.is_empty() || kind.is_empty() {
        return Err(format!(
            "apiVersion and kind must be set (apiVersion: {API_VERSION}, kind: {KIND})"
        ));
    }
    if api_version != API_VERSION {
        return Err(format!(
            "unsupported apiVersion {api_version:?}: must be {API_VERSION:?}"
        ));
    }
    if kind != KIND {
        return Err(format!("unsupported kind {kind:?}: must be {KIND:?}"));
    }
    let mut unknown = Vec::new();
    walk(&mut doc, Obj(SCHEMA), "", &mut unknown)?;
    let config: KubeProxyConfiguration =
        serde_json::from_value(doc).map_err(|e| format!("invalid configuration: {e}"))?;
    Ok(LoadedConfig {
        config,
        unknown_fields: unknown,
    })
}

/// Reads and decodes a config file. Unknown fields become one warning, as upstream's lenient
/// fallback does.
pub fn load_config_file(path: &Path) -> Result<(KubeProxyConfiguration, Vec<String>), ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::ReadFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::File {
        path: path.to_path_buf(),
        message: "not valid UTF-8".to_string(),
    })?;
    let loaded = decode_config(&text).map_err(|message| ConfigError::File {
        path: path.to_path_buf(),
        message,
    })?;
    let mut warnings = Vec::new();
    if !loaded.unknown_fields.is_empty() {
        let list: Vec<String> = loaded
            .unknown_fields
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        warnings.push(format!(
            "config file {}: strict decoding failed, using lenient decoding: {}",
            path.display(),
            list.join(", ")
        ));
    }
    Ok((loaded.config, warnings))
}
