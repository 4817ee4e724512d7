//! deploy/: reading the manifests (ConfigMap, DaemonSet) and the Dockerfile the way the
//! deploy tests need them.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// `deploy/` in the repository.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every YAML document of `path` (empty ones skipped).
pub fn documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The object of `kind` named `name` among `docs`.
pub fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The objects of `deploy/kube-proxy-rs.yaml`.
pub fn kube_proxy_objects() -> Vec<Value> {
    documents(&deploy_dir().join("kube-proxy-rs.yaml"))
}

/// The ConfigMap's `data[key]` (`config.conf` or `kubeconfig.conf`).
pub fn config_map_file(docs: &[Value], key: &str) -> String {
    object(docs, "ConfigMap", "kube-proxy")["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap kube-proxy has no {key}"))
        .to_string()
}

/// The kube-proxy container's `command` + `args` with `$(NODE_NAME)` expanded as the kubelet
/// does.
pub fn daemonset_command_line(docs: &[Value], node_name: &str) -> Vec<String> {
    let ds = object(docs, "DaemonSet", "kube-proxy");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = strings(&c["command"]);
    argv.extend(strings(&c["args"]));
    argv.into_iter()
        .map(|a| a.replace("$(NODE_NAME)", node_name))
        .collect()
}

/// deploy/Dockerfile's text.
pub fn dockerfile() -> String {
    std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("read deploy/Dockerfile")
}

/// The Dockerfile's `ENTRYPOINT ["..."]` (exec form, one element).
pub fn dockerfile_entrypoint() -> String {
    dockerfile()
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT [\"")?.strip_suffix("\"]"))
        .expect("ENTRYPOINT [\"PATH\"] in deploy/Dockerfile")
        .to_string()
}

/// The packages of `deploy/image-packages.txt` (comments stripped).
pub fn image_packages() -> Vec<String> {
    let text = std::fs::read_to_string(deploy_dir().join("image-packages.txt"))
        .expect("read deploy/image-packages.txt");
    text.lines()
        .filter_map(|l| l.split('#').next())
        .flat_map(str::split_whitespace)
        .map(String::from)
        .collect()
}
