//! deploy/: the manifests are valid Kubernetes objects (checked offline against the schemas
//! bundled in PyPI's `kubernetes-validate`, which `.ci/run` installs), they replace kubeadm's
//! kube-proxy objects one for one, the DaemonSet's command line parses with our own flag
//! parser against the ConfigMap's config.conf, and the Dockerfile has the layout the DaemonSet
//! relies on. No Docker engine runs here: tests/deploy_image.rs starts the same image built by
//! deploy/build-image.sh.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use kube_proxy_rs::config::{Action, ProxyMode, parse_command_line};
use support::manifests::{self, deploy_dir, documents, object};

fn manifest_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no manifests in deploy/");
    v
}

fn validator() -> String {
    std::env::var("KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".to_string())
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    // The bundled default (newest) schemas, and an older release still in support.
    for version in [None, Some("1.30.0")] {
        let mut cmd = Command::new(validator());
        cmd.args(["--strict", "--quiet"]);
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        cmd.args(manifest_files());
        let out = cmd.output().unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): install PyPI's kubernetes-validate (.ci/run does) or \
                 point KUBERNETES_VALIDATE at it",
                validator()
            )
        });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "schema validation failed (kubernetes {version:?}):\n{text}"
        );
    }
}

#[test]
fn objects_replace_kubeadms_one_for_one() {
    let docs = documents(&deploy_dir().join("kube-proxy-rs.yaml"));
    let sa = object(&docs, "ServiceAccount", "kube-proxy");
    assert_eq!(sa["metadata"]["namespace"], "kube-system");
    let crb = object(&docs, "ClusterRoleBinding", "kubeadm:node-proxier");
    assert_eq!(crb["roleRef"]["kind"], "ClusterRole");
    assert_eq!(crb["roleRef"]["name"], "system:node-proxier");
    assert_eq!(
        crb["subjects"][0],
        serde_json::json!({"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"})
    );
    let cm = object(&docs, "ConfigMap", "kube-proxy");
    assert_eq!(cm["metadata"]["namespace"], "kube-system");
    assert!(cm["data"]["config.conf"].is_string());
    assert!(cm["data"]["kubeconfig.conf"].is_string());

    let ds = object(&docs, "DaemonSet", "kube-proxy");
    assert_eq!(ds["apiVersion"], "apps/v1");
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["k8s-app"],
        "kube-proxy"
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        ds["spec"]["template"]["metadata"]["labels"]["k8s-app"],
        "kube-proxy"
    );
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "kube-proxy");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "must tolerate every taint"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["name"], "kube-proxy");
    assert_eq!(c["securityContext"]["privileged"], true);
    assert_eq!(c["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let mounts: Vec<(String, String, bool)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["mountPath"].as_str().unwrap().to_string(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [
            ("kube-proxy".into(), "/var/lib/kube-proxy".into(), false),
            ("xtables-lock".into(), "/run/xtables.lock".into(), false),
            ("lib-modules".into(), "/lib/modules".into(), true),
        ]
    );
    let vol = |name: &str| {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
            .clone()
    };
    assert_eq!(vol("kube-proxy")["configMap"]["name"], "kube-proxy");
    assert_eq!(vol("xtables-lock")["hostPath"]["path"], "/run/xtables.lock");
    assert_eq!(vol("xtables-lock")["hostPath"]["type"], "FileOrCreate");
    assert_eq!(vol("lib-modules")["hostPath"]["path"], "/lib/modules");
}

/// The container's command line with `$(NODE_NAME)` expanded as the kubelet does and the
/// ConfigMap's config.conf written to a file in place of /var/lib/kube-proxy/config.conf.
fn daemonset_command_line(dir: &Path, edit_config: impl Fn(&str) -> String) -> Vec<String> {
    let docs = manifests::kube_proxy_objects();
    let config = dir.join("config.conf");
    std::fs::write(
        &config,
        edit_config(&manifests::config_map_file(&docs, "config.conf")),
    )
    .unwrap();
    let argv = manifests::daemonset_command_line(&docs, "worker-1");
    assert_eq!(
        argv[0], "/usr/local/bin/kube-proxy",
        "upstream's binary path"
    );
    argv.into_iter()
        .map(|a| a.replace("/var/lib/kube-proxy/config.conf", config.to_str().unwrap()))
        .collect()
}

#[test]
fn daemonset_command_line_parses_with_our_flags() {
    let dir = tempfile::tempdir().unwrap();
    let argv = daemonset_command_line(dir.path(), str::to_string);
    let inv = parse_command_line(&argv[1..], "some-host").expect("DaemonSet command line");
    assert_eq!(inv.action, Action::Run);
    let o = &inv.options;
    assert_eq!(o.hostname, "worker-1", "--hostname-override=$(NODE_NAME)");
    assert_eq!(o.mode, ProxyMode::Iptables, "mode \"\" is iptables");
    assert_eq!(
        o.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(o.cluster_cidrs.len(), 1);
    assert_eq!(
        o.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(
        o.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        o.config_file.as_deref(),
        Some(dir.path().join("config.conf").as_path())
    );

    // The same ConfigMap switched to IPVS, as docs/migration.md tells.
    let argv = daemonset_command_line(dir.path(), |c| c.replace("\nmode: \"\"", "\nmode: ipvs"));
    let inv = parse_command_line(&argv[1..], "some-host").expect("ipvs config");
    assert_eq!(inv.options.mode, ProxyMode::Ipvs);
}

#[test]
fn dockerfile_layout() {
    let text = manifests::dockerfile();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        froms.len(),
        2,
        "multi-stage: builder then runtime: {froms:?}"
    );
    assert!(froms[0].contains("rust:") && froms[0].ends_with(" AS build"));
    assert!(froms[1].contains("debian:") && froms[1].contains("-slim"));
    let runtime = &text[text.find(froms[1]).unwrap()..];
    // The one package list, also read by deploy/build-image.sh.
    assert!(runtime.contains("COPY deploy/image-packages.txt /tmp/image-packages.txt"));
    assert!(runtime.contains("$(sed 's/#.*//' /tmp/image-packages.txt)"));
    let packages = manifests::image_packages();
    for pkg in [
        "iptables",
        "ipset",
        "nftables",
        "conntrack",
        "ipvsadm",
        "iproute2",
        "kmod",
    ] {
        assert!(
            packages.iter().any(|p| p == pkg),
            "runtime image lacks {pkg}"
        );
    }
    assert!(runtime.contains("COPY --from=build /kube-proxy-rs /usr/local/bin/kube-proxy-rs"));
    assert!(runtime.contains("ln -s kube-proxy-rs /usr/local/bin/kube-proxy"));
    assert_eq!(
        manifests::dockerfile_entrypoint(),
        "/usr/local/bin/kube-proxy-rs"
    );
    // Everything the build stage copies exists (include_str! needs examples/).
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
            assert!(p.exists(), "Dockerfile copies missing {src}");
        }
    }
}
