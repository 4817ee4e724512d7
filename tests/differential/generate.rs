//! Seeded random clusters: Services, EndpointSlices and Nodes, plus `render` flags.

use serde_json::{Value, json};

/// splitmix64: small, seedable, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

/// The behaviours of issue 7 being fixed elsewhere; each can be switched off in the generator
/// (`DIFFCHECK_OFF=6,1,...` or `all`) to check everything else on a tree without the fix.
#[derive(Debug, Clone, Copy)]
pub struct Features {
    /// (6) primary node IP: InternalIP before ExternalIP, `--bind-address`, `render --node-ip`.
    pub primary_ip: bool,
    /// (1) `--nodeport-addresses primary`.
    pub nodeport_primary: bool,
    /// (7) legacy leading-zero IPs and CIDRs.
    pub leading_zeros: bool,
    /// (8) loadBalancerSourceRanges: annotation, padding, 0.0.0.0/0, IPv6, unparsable.
    pub source_ranges: bool,
    /// (9) `serving` unset.
    pub serving_unset: bool,
    /// (10) hints without the topology annotation, node hints.
    pub hints_anyway: bool,
    /// (2) invalid Service names and port names.
    pub invalid_names: bool,
    /// Finding F1: one IP in two Endpoints, one of them terminating (upstream keeps the
    /// non-terminating one, kubernetes#135593).
    pub duplicate_ips: bool,
}

impl Features {
    pub const ALL: Features = Features {
        primary_ip: true,
        nodeport_primary: true,
        leading_zeros: true,
        source_ranges: true,
        serving_unset: true,
        hints_anyway: true,
        invalid_names: true,
        duplicate_ips: true,
    };

    /// `spec`: comma-separated issue item numbers (`6`, `1`, `7`, `8`, `9`, `10`, `2`) or
    /// findings (`F1`) to switch off; `all` switches off every issue item, `findings`
    /// every finding.
    pub fn without(spec: &str) -> Features {
        let mut f = Features::ALL;
        for item in spec.split(',').map(str::trim) {
            match item {
                "all" => {
                    f = Features {
                        primary_ip: false,
                        nodeport_primary: false,
                        leading_zeros: false,
                        source_ranges: false,
                        serving_unset: false,
                        hints_anyway: false,
                        invalid_names: false,
                        ..f
                    }
                }
                "findings" => {
                    f.duplicate_ips = false;
                }
                "F1" => f.duplicate_ips = false,
                "6" => f.primary_ip = false,
                "1" => f.nodeport_primary = false,
                "7" => f.leading_zeros = false,
                "8" => f.source_ranges = false,
                "9" => f.serving_unset = false,
                "10" => f.hints_anyway = false,
                "2" => f.invalid_names = false,
                _ => {}
            }
        }
        f
    }
}

/// One generated cluster and the flags to render it with.
pub struct Case {
    pub services: Vec<Value>,
    pub slices: Vec<Value>,
    pub nodes: Vec<Value>,
    /// `render` flags (without `--objects`).
    pub args: Vec<String>,
}

const NODE: &str = "node-a";
const INTERNAL_IP: &str = "192.168.0.10";
const EXTERNAL_IP: &str = "198.18.0.7";

fn zeros(ip: &str) -> String {
    ip.split('.')
        .map(|o| format!("{:03}", o.parse::<u16>().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(".")
}

fn maybe_zeros(rng: &mut Rng, f: Features, ip: String) -> String {
    if f.leading_zeros && rng.chance(20) {
        zeros(&ip)
    } else {
        ip
    }
}

fn gen_nodes(rng: &mut Rng, f: Features) -> (Vec<Value>, bool) {
    let mut labels = json!({"kubernetes.io/hostname": NODE});
    if rng.chance(80) {
        labels["topology.kubernetes.io/zone"] = json!("zone-a");
    }
    let internal = json!({"type": "InternalIP", "address": INTERNAL_IP});
    let external = json!({"type": "ExternalIP", "address": EXTERNAL_IP});
    let hostname = json!({"type": "Hostname", "address": NODE});
    let (addresses, has_external) = if f.primary_ip {
        match rng.below(3) {
            0 => (vec![internal, hostname], false),
            1 => (vec![external, internal, hostname], true),
            _ => (vec![internal, external], true),
        }
    } else {
        (vec![internal, hostname], false)
    };
    let a = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": labels},
        "status": {"addresses": addresses}});
    let b = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-b", "labels": {"topology.kubernetes.io/zone": "zone-b"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.11"}]}});
    let nodes = if rng.chance(50) { vec![a, b] } else { vec![a] };
    (nodes, has_external)
}

fn gen_args(rng: &mut Rng, f: Features, has_external: bool) -> Vec<String> {
    let mut args = vec![format!("--hostname-override={NODE}")];
    if rng.chance(50) {
        let cidr = *rng.pick(&[
            "10.244.0.0/16",
            "10.244.0.0/16",
            "10.244.0.0/16,fd00:10::/48",
            "fd00:10::/48,10.244.0.0/16",
        ]);
        args.push(format!("--cluster-cidr={cidr}"));
    }
    if rng.chance(20) {
        args.push("--masquerade-all".into());
    }
    if rng.chance(20) {
        args.push(format!("--iptables-masquerade-bit={}", rng.below(32)));
    }
    if rng.chance(15) {
        args.push("--iptables-localhost-nodeports=false".into());
    }
    let mut np = vec![
        "",
        "",
        "",
        "192.168.0.0/16",
        "10.0.0.0/8",
        "127.0.0.0/8,192.168.0.0/16",
        "0.0.0.0/0",
        "198.18.0.0/16,192.168.0.10/32",
    ];
    if f.nodeport_primary {
        np.push("primary");
        np.push("primary");
    }
    let np = *rng.pick(&np);
    if !np.is_empty() {
        args.push(format!("--nodeport-addresses={np}"));
    }
    if f.primary_ip {
        match rng.below(4) {
            1 if has_external => args.push(format!("--bind-address={EXTERNAL_IP}")),
            2 => args.push(format!("--node-ip={EXTERNAL_IP}")),
            3 => args.push(format!("--node-ip={EXTERNAL_IP},{INTERNAL_IP}")),
            _ => {}
        }
    }
    args
}

/// A service port as the generator keeps it for its EndpointSlices.
struct PortSpec {
    name: String,
    protocol: &'static str,
    target: i64,
}

fn gen_service(rng: &mut Rng, f: Features, i: usize) -> (Value, Vec<PortSpec>, bool) {
    let ns = *rng.pick(&["default", "ns1", "team-b"]);
    let mut name = format!("svc{i}");
    if f.invalid_names && rng.chance(6) {
        name = format!("Svc_{i}");
    }
    let type_ = *rng.pick(&[
        "ClusterIP",
        "ClusterIP",
        "ClusterIP",
        "NodePort",
        "NodePort",
        "LoadBalancer",
        "LoadBalancer",
        "LoadBalancer",
    ]);
    let mut spec = json!({"type": type_});
    let host = 10 + rng.below(200);
    let cluster_ip = maybe_zeros(rng, f, format!("10.96.{i}.{host}"));
    match rng.below(40) {
        0 => {
            spec["type"] = json!("ExternalName");
            spec["externalName"] = json!("example.com");
        }
        1 => {
            spec["clusterIP"] = json!("None");
            spec["clusterIPs"] = json!(["None"]);
        }
        2 => {
            // IPv6 single-stack: not for the IPv4 proxier.
            spec["clusterIP"] = json!(format!("fd00::{i}"));
            spec["clusterIPs"] = json!([format!("fd00::{i}")]);
        }
        3 | 4 => {
            // Dual-stack, IPv6 primary: the IPv4 proxier takes the second cluster IP.
            spec["clusterIP"] = json!(format!("fd00::{i}"));
            spec["clusterIPs"] = json!([format!("fd00::{i}"), cluster_ip]);
        }
        _ => {
            spec["clusterIP"] = json!(cluster_ip);
            spec["clusterIPs"] = json!([cluster_ip]);
        }
    }
    let nports = 1 + rng.below(3) as usize;
    let names = ["http", "https", "dns", "metrics", "grpc-web"];
    let mut ports = Vec::new();
    let mut port_specs = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let no_node_ports = type_ == "LoadBalancer" && rng.chance(15);
    for (j, default_name) in names.iter().enumerate().take(nports) {
        let mut pname = if nports == 1 && rng.chance(40) {
            String::new()
        } else {
            default_name.to_string()
        };
        if f.invalid_names && rng.chance(5) {
            pname = format!("HTTP_{j}");
        }
        let protocol = *rng.pick(&["TCP", "TCP", "UDP", "SCTP"]);
        let mut port = 1 + rng.below(65000) as i64;
        while !used.insert((port, protocol)) {
            port += 1;
        }
        let target = 1000 + rng.below(60000) as i64;
        let mut p = json!({"port": port, "protocol": protocol});
        if !pname.is_empty() {
            p["name"] = json!(pname);
        }
        p["targetPort"] = if rng.chance(30) {
            json!(format!("tp-{j}"))
        } else {
            json!(target)
        };
        if (type_ == "NodePort" || type_ == "LoadBalancer") && !no_node_ports {
            p["nodePort"] = json!(30000 + i * 10 + j);
        }
        ports.push(p);
        port_specs.push(PortSpec {
            name: pname,
            protocol,
            target,
        });
    }
    spec["ports"] = json!(ports);
    if no_node_ports {
        spec["allocateLoadBalancerNodePorts"] = json!(false);
    }
    let mut external_ips: Vec<String> = Vec::new();
    if rng.chance(30) {
        for _ in 0..1 + rng.below(2) {
            let ip = format!("192.0.2.{}", 1 + rng.below(250));
            external_ips.push(maybe_zeros(rng, f, ip));
        }
        if rng.chance(10) {
            external_ips.push("2001:db8::7".into());
        }
        if rng.chance(10) {
            external_ips.push("not-an-ip".into());
        }
        spec["externalIPs"] = json!(external_ips);
    }
    let externally_accessible = type_ != "ClusterIP" || !external_ips.is_empty();
    if externally_accessible && rng.chance(80) {
        let local = rng.chance(45);
        spec["externalTrafficPolicy"] = json!(if local { "Local" } else { "Cluster" });
        if local && type_ == "LoadBalancer" {
            spec["healthCheckNodePort"] = json!(32000 + i);
        }
    }
    match rng.below(10) {
        0..=2 => spec["internalTrafficPolicy"] = json!("Local"),
        3..=4 => spec["internalTrafficPolicy"] = json!("Cluster"),
        _ => {}
    }
    if rng.chance(30) {
        spec["sessionAffinity"] = json!("ClientIP");
        let t = *rng.pick(&[10800, 60, 3600, 86400]);
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
    }
    let mut annotations = json!({});
    let mut status = json!({});
    // Status on another type: what a file may hold, though the API server would clear it.
    if type_ == "LoadBalancer" || rng.chance(3) {
        let mut ingress = Vec::new();
        if type_ != "LoadBalancer" || rng.chance(85) {
            for _ in 0..1 + rng.below(2) {
                let host = 1 + rng.below(250);
                let ip = maybe_zeros(rng, f, format!("203.0.113.{host}"));
                let mut ing = json!({"ip": ip});
                match rng.below(8) {
                    0 => ing["ipMode"] = json!("Proxy"),
                    1 => ing["ipMode"] = json!("VIP"),
                    _ => {}
                }
                ingress.push(ing);
            }
            if rng.chance(10) {
                ingress.push(json!({"hostname": "lb.example.com"}));
            }
        }
        status = json!({"loadBalancer": {"ingress": ingress}});
    }
    if type_ == "LoadBalancer" && rng.chance(60) {
        let ranges = gen_source_ranges(rng, f);
        if f.source_ranges && rng.chance(10) {
            // Upstream reads only the spec field; the annotation is ignored.
            annotations["service.beta.kubernetes.io/load-balancer-source-ranges"] =
                json!(ranges.join(","));
        } else {
            spec["loadBalancerSourceRanges"] = json!(ranges);
        }
    }
    let mut labels = json!({"app": "demo"});
    if rng.chance(4) {
        // Served by another proxy: kube-proxy's informers filter it out.
        labels["service.kubernetes.io/service-proxy-name"] = json!("other-proxy");
    }
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations, "labels": labels},
        "spec": spec, "status": status});
    let hinted = rng.chance(30);
    (svc, port_specs, hinted)
}

fn gen_source_ranges(rng: &mut Rng, f: Features) -> Vec<String> {
    let clean = [
        "192.168.0.0/16",
        "192.168.0.10/32",
        "198.51.100.0/24",
        "10.0.0.0/8",
        "198.18.0.0/15",
        "203.0.113.0/25",
        // Host bits set: upstream masks them (net.ParseCIDR) before writing the rule.
        "10.1.2.3/8",
    ];
    let odd = [
        " 198.51.100.0/24",
        "192.168.0.0/16 ",
        "0.0.0.0/0",
        "garbage",
        "2001:db8::/32",
    ];
    if f.source_ranges && rng.chance(8) {
        return vec!["not-a-cidr".into()];
    }
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let r = if f.source_ranges && rng.chance(25) {
            rng.pick(&odd).to_string()
        } else {
            rng.pick(&clean).to_string()
        };
        let r = if f.leading_zeros && rng.chance(15) {
            let (ip, len) = r.trim().split_once('/').unwrap_or(("0.0.0.0", "0"));
            if ip.contains(':') {
                r
            } else {
                format!("{}/{len}", zeros(ip))
            }
        } else {
            r
        };
        out.push(r);
    }
    // A list with no IPv4 entry at all (only IPv6 or unparsable ones) is left out: whether
    // the IPv4 firewall should then fail closed is not settled by upstream or the issue.
    if !out.iter().any(|r| r.contains('.')) {
        out.push(rng.pick(&clean).to_string());
    }
    out
}

fn gen_endpoint(rng: &mut Rng, f: Features, ip: String, hints: Option<(bool, bool)>) -> Value {
    let serving = |rng: &mut Rng, v: bool| -> Value {
        if f.serving_unset && rng.chance(30) {
            Value::Null
        } else {
            json!(v)
        }
    };
    let (ready, srv, term) = match rng.below(10) {
        0..=4 => {
            let ready = if rng.chance(10) {
                Value::Null
            } else {
                json!(true)
            };
            let s = serving(rng, true);
            let t = if rng.chance(50) {
                Value::Null
            } else {
                json!(false)
            };
            (ready, s, t)
        }
        5..=6 => (json!(false), serving(rng, true), json!(true)),
        7 => (json!(false), json!(false), json!(true)),
        _ => (json!(false), json!(false), json!(false)),
    };
    let mut conditions = serde_json::Map::new();
    for (k, v) in [("ready", ready), ("serving", srv), ("terminating", term)] {
        if !v.is_null() {
            conditions.insert(k.into(), v);
        }
    }
    let mut ep = json!({"addresses": [ip], "conditions": conditions});
    match rng.below(10) {
        0..=4 => ep["nodeName"] = json!(NODE),
        5..=8 => ep["nodeName"] = json!("node-b"),
        _ => {}
    }
    if let Some((zone, node)) = hints {
        let mut h = json!({});
        if zone && rng.chance(92) {
            h["forZones"] = json!([{"name": rng.pick(&["zone-a", "zone-b"])}]);
        }
        if node && rng.chance(92) {
            h["forNodes"] = json!([{"name": rng.pick(&[NODE, "node-b"])}]);
        }
        ep["hints"] = h;
    }
    ep
}

fn gen_slices(
    rng: &mut Rng,
    f: Features,
    i: usize,
    svc: &Value,
    ports: &[PortSpec],
    hinted: bool,
    big: bool,
) -> Vec<Value> {
    let ns = svc["metadata"]["namespace"].clone();
    let name = svc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let hints = hinted.then(|| {
        let node = f.hints_anyway && rng.chance(30);
        (!node || rng.chance(50), node)
    });
    let mut next_ip = 1u64;
    let mut used_ips: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let nslices = if big { 4 } else { rng.below(4) };
    for s in 0..nslices {
        let mut sports = Vec::new();
        for p in ports {
            if rng.chance(85) {
                let protocol = if rng.chance(3) { "UDP" } else { p.protocol };
                let mut sp = json!({"port": p.target, "protocol": protocol});
                // A port without a name: the API server defaults it to "".
                if !rng.chance(3) {
                    sp["name"] = json!(p.name);
                }
                // A port without a number is ignored upstream.
                if rng.chance(2)
                    && let Some(o) = sp.as_object_mut()
                {
                    o.remove("port");
                }
                sports.push(sp);
            }
        }
        if rng.chance(5) {
            sports.push(json!({"name": "extra", "port": 9999, "protocol": "TCP"}));
        }
        let mut eps = Vec::new();
        let neps = if big { 260 } else { rng.below(5) };
        for _ in 0..neps {
            let ip = if big {
                format!("10.{}.{}.{}", 100 + i, next_ip / 250, next_ip % 250 + 1)
            } else {
                format!("10.244.{i}.{next_ip}")
            };
            next_ip += 1;
            used_ips.push(ip.clone());
            let ip = maybe_zeros(rng, f, ip);
            let mut ep = gen_endpoint(rng, f, ip, hints);
            if rng.chance(3) {
                // Only the first address counts.
                if let Some(a) = ep["addresses"].as_array_mut() {
                    a.push(json!(format!("10.250.{i}.{next_ip}")));
                }
            }
            eps.push(ep);
        }
        if f.duplicate_ips && !used_ips.is_empty() && rng.chance(10) {
            // The same IP seen again while a pod moves: upstream prefers the copy that is
            // not terminating.
            let ip = rng.pick(&used_ips).clone();
            let mut ep = gen_endpoint(rng, f, ip, hints);
            ep["conditions"] =
                json!({"ready": false, "serving": rng.chance(50), "terminating": true});
            eps.push(ep);
        }
        let mut labels = json!({"kubernetes.io/service-name": name});
        if rng.chance(3) {
            labels = json!({});
        }
        let (addr_type, eps) = if rng.chance(4) {
            (
                "IPv6",
                vec![json!({"addresses": ["fd00::5"], "conditions": {"ready": true}})],
            )
        } else {
            ("IPv4", eps)
        };
        out.push(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-{s}", name.to_lowercase().replace('_', "-")),
                "namespace": ns, "labels": labels},
            "addressType": addr_type, "ports": sports, "endpoints": eps}),
        );
    }
    out
}

/// The cluster for `seed`.
pub fn case(seed: u64, f: Features) -> Case {
    let mut rng = Rng::new(seed);
    let (nodes, has_external) = gen_nodes(&mut rng, f);
    let args = gen_args(&mut rng, f, has_external);
    let mut services = Vec::new();
    let mut slices = Vec::new();
    // Now and then one Service with over 1000 endpoints: upstream's large-cluster mode.
    let big = rng.chance(2);
    for i in 0..1 + rng.below(6) as usize {
        let (mut svc, ports, hinted) = gen_service(&mut rng, f, i);
        // Without item 10 the hinted services carry the annotation; any service may.
        if (!f.hints_anyway && hinted) || rng.chance(8) {
            svc["metadata"]["annotations"]["service.kubernetes.io/topology-mode"] = json!("Auto");
        }
        slices.extend(gen_slices(
            &mut rng,
            f,
            i,
            &svc,
            &ports,
            hinted,
            big && i == 0,
        ));
        services.push(svc);
    }
    Case {
        services,
        slices,
        nodes,
        args,
    }
}
