//! `kube-proxy-rs render`: the ruleset a full sync would write for a set of objects, with no
//! kernel and no root.

use crate::backend::Kind;
use crate::config::RenderArgs;
use crate::model::{ClusterState, IpFamily, ProxyModel};
use crate::watch::file::{FileError, Objects, parse_objects};

/// Usage text of `kube-proxy-rs render`.
pub const USAGE: &str = "\
Prints the rules a full sync would write for a set of Kubernetes objects, with no kernel and no
root: iptables-restore input in iptables mode; in IPVS mode the virtual servers (as ipvsadm -Sn),
the ipsets (as ipset save) and the iptables rules.

Usage:
  kube-proxy-rs render [--objects FILE...] [--node-ip IP[,IP]] [kube-proxy flags]

  --objects FILE...  YAML files of Services, EndpointSlices, Nodes and ServiceCIDRs;
                     default: the bundled example cluster (examples/demo-cluster.yaml)
  --node-ip IP[,IP]  the node's addresses; default: the InternalIPs of this node's Node object
  kube-proxy flags   as for the daemon (--proxy-mode iptables|ipvs, --config, --cluster-cidr,
                     --hostname-override, ...); --proxy-mode and --cluster-cidr override the
                     config file

The render is for --hostname-override, else for the only Node in the objects, else for this
host's name.";

/// The example cluster bundled into the binary (`examples/demo-cluster.yaml`), rendered when
/// no `--objects` is given.
pub const DEMO_CLUSTER: &str = include_str!("../examples/demo-cluster.yaml");

/// Why `render` could not produce output.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// An objects file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An objects file is not YAML.
    #[error(transparent)]
    Syntax(#[from] FileError),
    /// The mode has no renderer yet.
    #[error("render does not support --proxy-mode={0} yet")]
    Unsupported(String),
}

/// Reads the objects named in `args` (or the bundled demo cluster).
pub fn load(args: &RenderArgs, warnings: &mut Vec<String>) -> Result<Objects, RenderError> {
    let mut objects = Objects::default();
    if args.objects.is_empty() {
        parse_objects("demo-cluster.yaml", DEMO_CLUSTER, &mut objects, warnings)?;
    }
    for path in &args.objects {
        let text = std::fs::read_to_string(path).map_err(|source| RenderError::Read {
            path: path.display().to_string(),
            source,
        })?;
        parse_objects(&path.display().to_string(), &text, &mut objects, warnings)?;
    }
    Ok(objects)
}

/// The node the render is for: `--hostname-override` if given, else the only Node in the
/// objects, else the options' hostname.
pub fn node_name(args: &RenderArgs, explicit_hostname: bool, objects: &Objects) -> String {
    if !explicit_hostname
        && objects.nodes.len() == 1
        && let Some(n) = &objects.nodes[0].metadata.name
    {
        return n.clone();
    }
    args.options.hostname.clone()
}

/// Builds the cluster state the objects describe, as seen from `node`.
pub fn state_from(objects: &Objects, node: &str, warnings: &mut Vec<String>) -> ClusterState {
    let mut state = ClusterState::new(node);
    warnings.extend(state.replace_services(objects.services.iter()));
    warnings.extend(state.replace_slices(objects.slices.iter()));
    warnings.extend(state.replace_service_cidrs(&objects.service_cidrs));
    state.set_node(
        objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node)),
    );
    state
}

/// The model of `family` a render of `args` programs: the objects as seen from the render's
/// node, whose addresses are the `--node-ip` values when given (node ports are served there
/// and the first of the family is its primary node IP, whatever the Node object says).
pub fn model(
    args: &RenderArgs,
    explicit_hostname: bool,
    family: IpFamily,
    warnings: &mut Vec<String>,
) -> Result<ProxyModel, RenderError> {
    Ok(family_model(
        &state(args, explicit_hostname, warnings)?,
        args,
        family,
    ))
}

/// The cluster state the objects of `args` describe, as seen from the render's node.
fn state(
    args: &RenderArgs,
    explicit_hostname: bool,
    warnings: &mut Vec<String>,
) -> Result<ClusterState, RenderError> {
    let objects = load(args, warnings)?;
    let node = node_name(args, explicit_hostname, &objects);
    Ok(state_from(&objects, &node, warnings))
}

/// `family`'s snapshot of `state`, with the `--node-ip` addresses when given.
fn family_model(state: &ClusterState, args: &RenderArgs, family: IpFamily) -> ProxyModel {
    let mut model = state.snapshot(family);
    if !args.node_ips.is_empty() {
        model.node.ips = args.node_ips.clone();
    }
    model
}

/// Renders `args`; `explicit_hostname` tells whether `--hostname-override` was given.
/// Returns the text to print; `warnings` gets one line per skipped object or part.
///
/// Each family with services is rendered (IPv4 alone when there are none). A single IPv4
/// render prints as before, ready for `iptables-restore`; otherwise each family's text
/// follows a `# IPv4` / `# IPv6` heading line (a comment to the restore tools).
pub fn run(
    args: &RenderArgs,
    explicit_hostname: bool,
    warnings: &mut Vec<String>,
) -> Result<String, RenderError> {
    let Some(kind) = Kind::for_mode(args.options.mode) else {
        return Err(RenderError::Unsupported(args.options.mode.to_string()));
    };
    let supported = kind.candidate_families();
    let state = state(args, explicit_hostname, warnings)?;
    let mut models: Vec<(IpFamily, ProxyModel)> = supported
        .into_iter()
        .map(|f| (f, family_model(&state, args, f)))
        .filter(|(_, m)| !m.services.is_empty())
        .collect();
    if models.is_empty() {
        models = vec![(IpFamily::V4, family_model(&state, args, IpFamily::V4))];
    }
    let headed = models.len() > 1 || models[0].0 != IpFamily::V4;
    let mut out = String::new();
    for (family, model) in &models {
        if headed {
            out.push_str(&format!("# {family}\n"));
        }
        let node_ips = model.node.ips.clone();
        out.push_str(&kind.render(&args.options, model, *family, node_ips));
    }
    Ok(out)
}

/// What [`run`] prints for one family, without a heading (what `explain` traces).
pub fn run_family(
    args: &RenderArgs,
    explicit_hostname: bool,
    family: IpFamily,
    warnings: &mut Vec<String>,
) -> Result<String, RenderError> {
    let Some(kind) = Kind::for_mode(args.options.mode) else {
        return Err(RenderError::Unsupported(args.options.mode.to_string()));
    };
    let model = model(args, explicit_hostname, family, warnings)?;
    let node_ips = model.node.ips.clone();
    Ok(kind.render(&args.options, &model, family, node_ips))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  loadBalancerSourceRanges: ["192.168.50.0/24"]
  ports: [{name: p, port: 80, protocol: TCP, nodePort: 30050, targetPort: 8080}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.10}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: ns
  name: lb-1
  labels: {kubernetes.io/service-name: lb}
addressType: IPv4
ports: [{name: p, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.10], conditions: {ready: true}}]
"#;

    const NODE: &str = r#"
---
apiVersion: v1
kind: Node
metadata: {name: node1}
status:
  addresses:
  - {type: ExternalIP, address: 203.0.113.99}
  - {type: InternalIP, address: 192.168.50.1}
"#;

    fn render_with(objects: &str, flags: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("objects.yaml");
        std::fs::write(&file, objects).unwrap();
        let mut args: Vec<String> = vec![
            "--hostname-override=node1".into(),
            format!("--objects={}", file.display()),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        let parsed = crate::config::parse_render_args(&args, "node1").unwrap();
        run(&parsed, true, &mut Vec::new()).unwrap()
    }

    const DUAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: dual}
spec:
  clusterIP: 10.96.0.7
  clusterIPs: [10.96.0.7, "fd00:96::7"]
  ports: [{name: p, port: 80, protocol: TCP, targetPort: 8080}]
"#;

    #[test]
    fn each_family_renders_under_its_heading() {
        for mode in ["iptables", "ipvs"] {
            let text = render_with(DUAL, &[&format!("--proxy-mode={mode}")]);
            let (v4, v6) = text
                .strip_prefix("# IPv4\n")
                .and_then(|t| t.split_once("# IPv6\n"))
                .unwrap_or_else(|| panic!("{mode}: no family headings:\n{text}"));
            assert!(
                v4.contains("10.96.0.7") && !v4.contains("fd00:96::7"),
                "{mode}: {v4}"
            );
            assert!(
                v6.contains("fd00:96::7") && !v6.contains("10.96.0.7"),
                "{mode}: {v6}"
            );
        }
        // One IPv4 family prints as before: restore input with no heading.
        let text = render_with(LB, &[]);
        assert!(text.starts_with("*filter"), "{text}");
    }

    const ALLOW_FROM_NODE: &str = "-s 203.0.113.10 -j KUBE-EXT-";

    #[test]
    fn service_cidrs_in_the_objects_become_each_familys_drop_rule() {
        let cidrs = "\n---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/16, \"fd00:96::/112\"]}\n";
        let text = render_with(&format!("{DUAL}{cidrs}"), &["--proxy-mode=nftables"]);
        let drops: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Drop traffic to unallocated ClusterIPs"))
            .collect();
        assert_eq!(
            drops,
            [
                "add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
                "add rule ip6 kube-proxy cluster-ips-check ip6 daddr { fd00:96::/112 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
            ],
            "{text}"
        );
    }

    #[test]
    fn node_ip_flag_sets_the_primary_node_ip() {
        let text = render_with(LB, &["--node-ip=192.168.50.1"]);
        assert!(text.contains(ALLOW_FROM_NODE), "{text}");
        let text = render_with(LB, &["--node-ip=10.1.0.1"]);
        assert!(
            !text.contains(ALLOW_FROM_NODE),
            "10.1.0.1 is outside the range"
        );
    }

    #[test]
    fn primary_is_the_first_internal_ip_or_the_bind_address() {
        let objects = format!("{LB}{NODE}");
        let text = render_with(&objects, &["--nodeport-addresses=primary"]);
        assert!(
            text.contains("-d 192.168.50.1 -j KUBE-NODEPORTS"),
            "InternalIP before ExternalIP: {text}"
        );
        assert!(!text.contains("-d 203.0.113.99 -j KUBE-NODEPORTS"));
        assert!(!text.contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        assert!(text.contains(ALLOW_FROM_NODE));

        let text = render_with(
            &objects,
            &[
                "--nodeport-addresses=primary",
                "--bind-address=203.0.113.99",
            ],
        );
        assert!(text.contains("-d 203.0.113.99 -j KUBE-NODEPORTS"), "{text}");
        assert!(!text.contains("-d 192.168.50.1 -j KUBE-NODEPORTS"));
        assert!(
            !text.contains(ALLOW_FROM_NODE),
            "the bind address is the node IP, outside the range"
        );
    }
}
