//! Objects from YAML files instead of the API server: the source `render` and `explain
//! --objects` use. Accepts multi-document YAML and `v1 List` objects.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::Deserialize;

use crate::yamlguard::YamlGuardError;

/// The objects found, in file order.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// v1 Services.
    pub services: Vec<Service>,
    /// discovery.k8s.io/v1 EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// v1 Nodes.
    pub nodes: Vec<Node>,
    /// networking.k8s.io/v1 ServiceCIDRs.
    pub service_cidrs: Vec<ServiceCIDR>,
}

/// A document that could not be read at all (bad YAML syntax).
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: document {index}: {message}")]
pub struct FileError {
    /// File name (or another label).
    pub source_name: String,
    /// 1-based document number.
    pub index: usize,
    /// What went wrong.
    pub message: String,
}

/// Parses `text`; objects that are not usable become warnings and are skipped.
pub fn parse_objects(
    source_name: &str,
    text: &str,
    out: &mut Objects,
    warnings: &mut Vec<String>,
) -> Result<(), FileError> {
    crate::yamlguard::check(text, crate::yamlguard::Limits::OBJECTS).map_err(|e| {
        let index = match &e {
            YamlGuardError::Syntax { line, .. } => crate::yamlguard::document_at(text, *line),
            _ => 1,
        };
        FileError {
            source_name: source_name.to_string(),
            index,
            message: e.to_string(),
        }
    })?;
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(|e| FileError {
            source_name: source_name.to_string(),
            index: i + 1,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        add_value(source_name, value, out, warnings);
    }
    Ok(())
}

/// A namespaced object written without a namespace lands in `default`, as `kubectl apply`
/// puts it (the model refuses an empty namespace like the API server).
fn default_namespace(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    if meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some("default".to_string());
    }
}

fn add_value(
    source_name: &str,
    value: serde_json::Value,
    out: &mut Objects,
    warnings: &mut Vec<String>,
) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let who = || {
        let meta = value.get("metadata");
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("<unnamed>");
        if ns.is_empty() {
            format!("{source_name}: {kind} {name}")
        } else {
            format!("{source_name}: {kind} {ns}/{name}")
        }
    };
    match (api_version.as_str(), kind.as_str()) {
        (_, k) if k == "List" || k.ends_with("List") => {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            for item in items {
                add_value(source_name, item, out, warnings);
            }
        }
        ("v1", "Service") => match serde_json::from_value::<Service>(value.clone()) {
            Ok(mut s) => {
                default_namespace(&mut s.metadata);
                out.services.push(s)
            }
            Err(e) => warnings.push(format!("{}: invalid object skipped: {e}", who())),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_json::from_value::<EndpointSlice>(value.clone()) {
                Ok(mut s) => {
                    default_namespace(&mut s.metadata);
                    out.slices.push(s)
                }
                Err(e) => warnings.push(format!("{}: invalid object skipped: {e}", who())),
            }
        }
        ("v1", "Node") => match serde_json::from_value::<Node>(value.clone()) {
            Ok(n) => out.nodes.push(n),
            Err(e) => warnings.push(format!("{}: invalid object skipped: {e}", who())),
        },
        ("networking.k8s.io/v1", "ServiceCIDR") => {
            match serde_json::from_value::<ServiceCIDR>(value.clone()) {
                Ok(c) => out.service_cidrs.push(c),
                Err(e) => warnings.push(format!("{}: invalid object skipped: {e}", who())),
            }
        }
        _ => warnings.push(format!(
            "{}: kind {api_version}/{kind} is not used, skipped",
            who()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_and_list_inputs_are_both_read() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: a-1, namespace: ns, labels: {kubernetes.io/service-name: a}}
  addressType: IPv4
  endpoints: [{addresses: [10.1.0.1]}]
- apiVersion: v1
  kind: Node
  metadata: {name: node1}
- apiVersion: networking.k8s.io/v1
  kind: ServiceCIDR
  metadata: {name: kubernetes}
  spec: {cidrs: [10.96.0.0/16, "fd00:10:96::/112"]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c, namespace: ns}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: ns}
spec: {ports: "not a list"}
"#;
        let mut out = Objects::default();
        let mut w = Vec::new();
        parse_objects("t.yaml", text, &mut out, &mut w).unwrap();
        assert_eq!(
            (out.services.len(), out.slices.len(), out.nodes.len()),
            (1, 1, 1)
        );
        let cidrs = out.service_cidrs[0]
            .spec
            .as_ref()
            .and_then(|s| s.cidrs.clone());
        assert_eq!(cidrs.unwrap(), ["10.96.0.0/16", "fd00:10:96::/112"]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("ConfigMap ns/c"), "{w:?}");
        assert!(w[1].contains("Service ns/broken"), "{w:?}");
    }

    #[test]
    fn objects_without_a_namespace_land_in_default() {
        let text =
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1}\n";
        let mut out = Objects::default();
        parse_objects("t.yaml", text, &mut out, &mut Vec::new()).unwrap();
        assert_eq!(
            out.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn syntax_errors_name_the_document() {
        let mut out = Objects::default();
        let mut w = Vec::new();
        let e = parse_objects("x.yaml", "a: 1\n---\n: : [\n", &mut out, &mut w).unwrap_err();
        assert_eq!(e.index, 2);
        assert!(e.to_string().starts_with("x.yaml: document 2"));
    }
}
