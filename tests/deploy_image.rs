//! The runtime image as operators run it. `deploy/build-image.sh` builds it (the Dockerfile's
//! suite, package list and entry point, without a container engine) as an OCI layout; here it
//! is unpacked with `umoci` and started the way the DaemonSet starts it: privileged, host
//! network, the ConfigMap's `config.conf` and `kubeconfig.conf` at /var/lib/kube-proxy, the
//! service account's token and CA at their projected path, /run/xtables.lock and /lib/modules
//! from the host, the DaemonSet's command line with `$(NODE_NAME)` expanded, and the image's
//! environment. The "host" is a network namespace the test creates, the API server the fake.
//!
//! No OCI runtime can start a container on these machines (crun is refused
//! `setrlimit(RLIMIT_NOFILE)`, the hybrid cgroup layout is unsupported), so the image's root
//! file system runs under `unshare` (mount and PID namespaces, the proxy is PID 1) and
//! `chroot`. One difference from a privileged container: /sys is mounted read-only, so the
//! test cannot change host-wide module parameters (conntrack hashsize).
//!
//! In CI (`CI` set) the image must already exist: `.ci/run` builds it before `cargo test`, and
//! a missing image fails here. Elsewhere the test runs `deploy/build-image.sh` first, which
//! rebuilds only what changed (the release binary; the Debian layer when its inputs change).

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::fakeapi::FakeApiServer;
use support::manifests;
use support::netns::{Netns, NsChild, veth};

const NODE_NAME: &str = "worker-1";
const NODE_IP: &str = "192.168.50.1";
/// A foreign rule (TEST-NET-3 source, never sent) that `--cleanup` must keep.
const FOREIGN_RULE: &str = "-A INPUT -s 203.0.113.7/32 -j DROP";

fn target_dir() -> PathBuf {
    // CARGO_BIN_EXE is TARGET/PROFILE/kube-proxy-rs.
    let bin = Path::new(env!("CARGO_BIN_EXE_kube-proxy-rs"));
    bin.ancestors().nth(2).expect("target dir").to_path_buf()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// The OCI layout `deploy/build-image.sh` wrote (built first outside CI), once per process.
fn oci_layout() -> PathBuf {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let out = target_dir().join("image");
            let oci = out.join("oci");
            if in_ci() {
                assert!(
                    oci.join("index.json").exists(),
                    "no image at {}: .ci/run builds it with deploy/build-image.sh before \
                     `cargo test`; that step must have run",
                    oci.display()
                );
                return oci;
            }
            let script = manifests::deploy_dir().join("build-image.sh");
            let mut cmd = Command::new(&script);
            // Without the CARGO_* variables cargo sets for this test: build scripts that
            // watch them would make the release build recompile its dependencies.
            for (key, _) in std::env::vars_os() {
                let key = key.to_string_lossy();
                if key.starts_with("CARGO_") && key != "CARGO_HOME" {
                    cmd.env_remove(key.as_ref());
                }
            }
            let status = cmd
                .arg(&out)
                .env("CARGO_TARGET_DIR", target_dir())
                .stdin(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
            assert!(status.success(), "{} failed ({status})", script.display());
            oci
        })
        .clone()
}

/// One unpacked copy of the image: its root file system and the runtime config umoci
/// derives from the image config (entry point, environment).
struct Image {
    dir: tempfile::TempDir,
    args: Vec<String>,
    env: Vec<String>,
}

impl Image {
    fn unpack() -> Image {
        let image = format!("{}:{}", oci_layout().display(), env!("CARGO_PKG_VERSION"));
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let config = dir.path().join("config.json");
        run_ok(
            Command::new("umoci")
                .args(["raw", "unpack", "--image", &image])
                .arg(&rootfs),
        );
        run_ok(
            Command::new("umoci")
                .args(["raw", "runtime-config", "--image", &image, "--rootfs"])
                .arg(&rootfs)
                .arg(&config),
        );
        let spec: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
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
        Image {
            args: strings(&spec["process"]["args"]),
            env: strings(&spec["process"]["env"]),
            dir,
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e} (apt-get install umoci?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Sets up the pod's mounts in a private mount namespace, then runs the image's command as
/// PID 1 of a PID namespace, chrooted into the root file system, with only the given
/// environment. Arguments: ROOTFS CONFIGMAP_DIR SERVICEACCOUNT_DIR, then `env -i`'s.
const POD_SCRIPT: &str = r#"
set -eu
root=$1 cm=$2 sa=$3
shift 3
mount --rbind /dev "$root/dev"
mount -t sysfs -o ro sysfs "$root/sys"
mkdir -p "$root/var/lib/kube-proxy" "$root/run/secrets/kubernetes.io/serviceaccount"
mount --bind -o ro "$cm" "$root/var/lib/kube-proxy"
mount --bind -o ro "$sa" "$root/run/secrets/kubernetes.io/serviceaccount"
touch /run/xtables.lock "$root/run/xtables.lock"
mount --bind /run/xtables.lock "$root/run/xtables.lock"
# A hostPath without a type: mounted when the host has it (a build host may have none).
if [ -d /lib/modules ]; then
  mkdir -p "$root/lib/modules"
  mount --bind -o ro /lib/modules "$root/lib/modules"
fi
exec "$@"
"#;

/// What the DaemonSet gives the container: the ConfigMap's files and a service account.
struct PodVolumes {
    dir: tempfile::TempDir,
}

impl PodVolumes {
    /// The ConfigMap as deploy/ has it, `server:` pointed at the fake API server.
    fn new(api: &FakeApiServer) -> PodVolumes {
        let docs = manifests::kube_proxy_objects();
        let dir = tempfile::tempdir().unwrap();
        let cm = dir.path().join("configmap");
        let sa = dir.path().join("serviceaccount");
        std::fs::create_dir_all(&cm).unwrap();
        std::fs::create_dir_all(&sa).unwrap();
        let config = manifests::config_map_file(&docs, "config.conf");
        std::fs::write(cm.join("config.conf"), config).unwrap();
        let kubeconfig = manifests::config_map_file(&docs, "kubeconfig.conf");
        let server = kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("server: in kubeconfig.conf")
            .to_string();
        std::fs::write(
            cm.join("kubeconfig.conf"),
            kubeconfig.replace(&server, &api.url()),
        )
        .unwrap();
        std::fs::write(sa.join("token"), "fake-token").unwrap();
        // kubeconfig.conf names the CA file; the fake server speaks plain HTTP, but the
        // client still loads the CA, so it has to be a certificate.
        run_ok(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
                .args([
                    "-subj",
                    "/CN=fake-cluster-ca",
                    "-keyout",
                    "/dev/null",
                    "-out",
                ])
                .arg(sa.join("ca.crt")),
        );
        PodVolumes { dir }
    }

    /// A command running `argv` in `image` as the DaemonSet's pod would, inside `ns`.
    fn command(&self, ns: &Netns, image: &Image, argv: &[String]) -> Command {
        let root = image.rootfs();
        let mut args: Vec<String> = vec![
            "--mount".into(),
            "--pid".into(),
            "--fork".into(),
            "--kill-child=SIGTERM".into(),
            format!("--mount-proc={}", root.join("proc").display()),
            "sh".into(),
            "-c".into(),
            POD_SCRIPT.into(),
            "pod".into(),
            root.display().to_string(),
            self.dir.path().join("configmap").display().to_string(),
            self.dir.path().join("serviceaccount").display().to_string(),
            "/usr/bin/env".into(),
            "-i".into(),
        ];
        args.extend(image.env.iter().cloned());
        args.push(format!("NODE_NAME={NODE_NAME}"));
        args.push("/usr/sbin/chroot".into());
        args.push(root.display().to_string());
        args.extend(argv.iter().cloned());
        ns.command("unshare", args)
    }
}

/// Starts `cmd` with stdin empty and stdout and stderr into `log`.
fn spawn_logged(mut cmd: Command, log: &Path) -> std::process::Child {
    let file = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// `iptables-VARIANT-save` in `ns` (the host's tools, reading what the image wrote).
fn save(ns: &Netns, variant: &str) -> String {
    ns.run_ok(&format!("iptables-{variant}-save"), Vec::<&str>::new())
}

/// kube-proxy's chains in a save (kubelet's hint and firewall chains are not).
fn proxy_chains(save: &str) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("KUBE-"))
        .filter(|c| {
            !matches!(
                *c,
                "KUBE-IPTABLES-HINT" | "KUBE-KUBELET-CANARY" | "KUBE-FIREWALL"
            )
        })
        .map(String::from)
        .collect()
}

/// GET http://127.0.0.1:PORT/PATH inside `ns`: (status, body), or None while nothing answers.
fn http_get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    let text = ns
        .in_netns(|| -> std::io::Result<String> {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut t = String::new();
            s.read_to_string(&mut t)?;
            Ok(t)
        })
        .ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Polls `f` every 200 ms for up to 30 s; panics with `what` and the pod's log.
fn wait_for<T>(what: &str, log: &Path, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; pod log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A "node" namespace with the node's address, what kubelet left in `kubelet_variant`'s
/// tables (its hint chain and a rule of its own), and the fake API server with one Service.
fn node_with_kubelet(kubelet_variant: &str) -> (Netns, Netns, FakeApiServer) {
    let ns = Netns::new("img");
    // The node's link (no dummy driver on these kernels: a veth to an empty namespace).
    let peer = Netns::new("imgpeer");
    veth(
        &ns,
        "eth0",
        Some(&format!("{NODE_IP}/24")),
        &peer,
        "eth0",
        None,
    );
    let iptables = format!("iptables-{kubelet_variant}");
    ns.run_ok(&iptables, ["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    ns.run_ok(&iptables, FOREIGN_RULE.split_whitespace());

    let api = FakeApiServer::start_in(Some(&ns), Ipv4Addr::LOCALHOST.into());
    api.apply_demo_web(NODE_NAME, NODE_IP);
    (ns, peer, api)
}

/// The image started as the DaemonSet's pod on a node whose kubelet uses `variant`: it picks
/// that back end, syncs the Service, answers /proxyMode and /healthz; the image's entry
/// point with `--cleanup` then removes its rules and keeps kubelet's.
fn daemonset_pod_on_node_using(variant: &str) {
    support::require_root();
    let other = if variant == "legacy" { "nft" } else { "legacy" };
    let (ns, _peer, api) = node_with_kubelet(variant);
    let image = Image::unpack();
    let volumes = PodVolumes::new(&api);
    let argv = manifests::daemonset_command_line(&manifests::kube_proxy_objects(), NODE_NAME);
    let log = volumes.dir.path().join("pod.log");
    let mut pod = NsChild(spawn_logged(volumes.command(&ns, &image, &argv), &log));

    let nat = wait_for("the Service's rules", &log, || {
        if let Some(status) = pod.try_wait() {
            panic!(
                "the pod exited ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let nat = ns.run_ok(&format!("iptables-{variant}-save"), ["-t", "nat"]);
        nat.contains("-d 10.96.0.10/32 -p tcp -m comment --comment \"demo/web:http cluster IP\"")
            .then_some(nat)
    });
    assert!(
        nat.contains("-j DNAT --to-destination 10.244.0.11:8080"),
        "no DNAT to the endpoint:\n{nat}"
    );
    assert_eq!(
        proxy_chains(&save(&ns, other)),
        Vec::<String>::new(),
        "rules written to {other} while kubelet uses {variant}"
    );
    let (status, body) = wait_for("/proxyMode", &log, || http_get(&ns, 10249, "/proxyMode"));
    assert_eq!((status, body.as_str()), (200, "iptables"));
    let (_, body) = wait_for("/healthz 200", &log, || {
        http_get(&ns, 10256, "/healthz").filter(|(s, _)| *s == 200)
    });
    assert!(body.contains("lastUpdated"), "healthz body: {body}");
    assert!(pod.try_wait().is_none(), "the pod exited");
    pod.terminate(Duration::from_secs(5));

    // `docker run IMAGE --cleanup`, as privileged on the same host network.
    let mut cleanup_argv = image.args.clone();
    cleanup_argv.push("--cleanup".into());
    let cleanup_log = volumes.dir.path().join("cleanup.log");
    let mut cleanup = NsChild(spawn_logged(
        volumes.command(&ns, &image, &cleanup_argv),
        &cleanup_log,
    ));
    let status = wait_for("--cleanup to exit", &cleanup_log, || cleanup.try_wait());
    assert!(
        status.success(),
        "--cleanup failed ({status}): {}",
        std::fs::read_to_string(&cleanup_log).unwrap_or_default()
    );
    let after = save(&ns, variant);
    assert_eq!(proxy_chains(&after), Vec::<String>::new(), "left:\n{after}");
    assert!(
        after.contains(FOREIGN_RULE),
        "kubelet's rule removed:\n{after}"
    );
    assert!(
        after.contains(":KUBE-IPTABLES-HINT"),
        "kubelet's hint removed"
    );
}

#[test]
fn daemonset_pod_uses_legacy_when_kubelet_does() {
    daemonset_pod_on_node_using("legacy");
}

#[test]
fn daemonset_pod_uses_nft_when_kubelet_does() {
    daemonset_pod_on_node_using("nft");
}

/// The image holds what the Dockerfile describes: its entry point, every package of the one
/// list, upstream's binary name linked to ours, and this tree's release build.
#[test]
fn image_has_the_dockerfiles_contents() {
    support::require_root();
    let image = Image::unpack();
    let root = image.rootfs();
    let entrypoint = manifests::dockerfile_entrypoint();
    assert_eq!(
        image.args,
        std::slice::from_ref(&entrypoint),
        "image entry point"
    );
    assert!(
        image
            .env
            .iter()
            .any(|e| e.starts_with("PATH=") && e.contains("/usr/sbin")),
        "PATH must reach iptables: {:?}",
        image.env
    );
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    for pkg in manifests::image_packages() {
        let stanza = status
            .split("\n\n")
            .find(|s| s.lines().any(|l| l == format!("Package: {pkg}")));
        assert!(
            stanza.is_some_and(|s| s.contains("Status: install ok installed")),
            "{pkg} not installed in the image"
        );
    }
    let link = std::fs::read_link(root.join("usr/local/bin/kube-proxy")).unwrap();
    assert_eq!(link, Path::new(&entrypoint).file_name().unwrap());
    let in_image = std::fs::read(root.join(entrypoint.trim_start_matches('/'))).unwrap();
    let release = std::fs::read(target_dir().join("release/kube-proxy-rs")).unwrap();
    assert!(
        in_image == release,
        "the image's binary is not target/release's"
    );
    // No documentation or man pages (debian:*-slim's exclusions).
    assert!(!root.join("usr/share/man/man8").exists());
}
