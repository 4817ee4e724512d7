//! Kubernetes Events on the Node, checked against the fake API server: `Starting` when the
//! proxy runs; `FailedToStartProxierHealthcheck` / `FailedToStartMetricServer` when a server
//! cannot listen (as upstream); `FailedToStartProxier` when the configuration is refused or
//! the backend cannot start.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use support::daemon::{BIN, Daemon};
use support::fakeapi::{FakeApiServer, node};
use support::netns::Netns;

/// events.k8s.io/v1 Events stored by the fake API server, read through a kube client when the
/// server is in this namespace, else with a raw GET from inside `ns`.
async fn events(api: &FakeApiServer, ns: Option<&Netns>) -> Vec<Event> {
    let Some(ns) = ns else {
        let all: Api<Event> = Api::all(api.client());
        return all
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
    };
    let addr = api.addr();
    let body = ns
        .in_netns(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            write!(
                s,
                "GET /apis/events.k8s.io/v1/events HTTP/1.0\r\nHost: x\r\n\r\n"
            )?;
            let mut t = String::new();
            s.read_to_string(&mut t)?;
            Ok(t.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default())
        })
        .unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::from_value(v["items"].clone()).ok())
        .unwrap_or_default()
}

async fn wait_for_event(api: &FakeApiServer, ns: Option<&Netns>, reason: &str) -> Event {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = events(api, ns)
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason))
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event; have {:#?}",
            events(api, ns).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn check(e: &Event, node: &str, warning: bool, note_has: &str) {
    assert_eq!(
        e.type_.as_deref(),
        Some(if warning { "Warning" } else { "Normal" })
    );
    assert_eq!(e.action.as_deref(), Some("StartKubeProxy"));
    assert_eq!(e.reporting_controller.as_deref(), Some("kube-proxy"));
    let r = e.regarding.as_ref().expect("regarding");
    assert_eq!(r.kind.as_deref(), Some("Node"));
    assert_eq!(r.name.as_deref(), Some(node));
    assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
    let note = e.note.clone().unwrap_or_default();
    assert!(note.contains(note_has), "note {note:?} lacks {note_has:?}");
}

async fn run(args: Vec<String>) -> Output {
    run_with_path(args, None).await
}

/// Runs the daemon with `dir` first on its PATH (to put a fake tool in front).
async fn run_with_path(args: Vec<String>, dir: Option<std::path::PathBuf>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(BIN);
        if let Some(dir) = dir {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", dir.display()));
        }
        cmd.args(&args).stdin(Stdio::null()).output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_cannot_start_posts_failed_to_start_proxier() {
    let api = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    // An nft older than upstream's minimum: nftables mode refuses to start.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let nft = bin.join("nft");
    std::fs::write(&nft, "#!/bin/sh\necho 'nftables v1.0.0 (Fake)'\n").unwrap();
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_with_path(
        vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            "--hostname-override=node1".into(),
            "--proxy-mode=nftables".into(),
        ],
        Some(bin),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is too old (need 1.0.1 or later)"));
    let e = wait_for_event(&api, None, "FailedToStartProxier").await;
    check(
        &e,
        "node1",
        true,
        "nft version nftables v1.0.0 (Fake) is too old (need 1.0.1 or later)",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_configuration_posts_failed_to_start_proxier() {
    let api = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let config = dir.path().join("config.conf");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             clientConnection: {{kubeconfig: {}}}\nhostnameOverride: node2\n\
             iptables: {{masqueradeBit: 40}}\n",
            kubeconfig.display()
        ),
    )
    .unwrap();
    let out = run(vec![format!("--config={}", config.display())]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = wait_for_event(&api, None, "FailedToStartProxier").await;
    check(&e, "node2", true, "masqueradeBit");

    // A typo on a workstation (no kubeconfig, not in a pod) posts nothing anywhere.
    let before = events(&api, None).await.len();
    let out = run(vec!["--bogus-flag".into()]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(events(&api, None).await.len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_proxy_posts_starting_and_server_failures() {
    support::require_root();
    let ns = Netns::new("events");
    let api = FakeApiServer::start_in(Some(&ns), IpAddr::V4(Ipv4Addr::LOCALHOST));
    api.apply(node("node1", &["192.168.50.1"], Some("10.244.0.0/24")));
    let dir = tempfile::tempdir().unwrap();
    let daemon = || Daemon::builder(&ns, &api, dir.path());

    // 192.0.2.1 is not an address of the namespace: the health server cannot listen. Without
    // bindAddressHardFail the proxy keeps running.
    let mut proxy = daemon()
        .arg("--healthz-bind-address=192.0.2.1:10256")
        .start();
    let e = wait_for_event(&api, Some(&ns), "FailedToStartProxierHealthcheck").await;
    check(&e, "node1", true, "192.0.2.1:10256");
    let e = wait_for_event(&api, Some(&ns), "Starting").await;
    check(&e, "node1", false, "");
    assert!(
        proxy.try_wait().is_none(),
        "soft failure must not stop the proxy"
    );
    proxy.terminate(Duration::from_secs(3));

    // With bindAddressHardFail the metrics server's failure is fatal, and reported first.
    let mut cmd = daemon()
        .args([
            "--metrics-bind-address=192.0.2.1:10249",
            "--bind-address-hard-fail",
        ])
        .command();
    let out = tokio::task::spawn_blocking(move || cmd.stdin(Stdio::null()).output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "hard fail must exit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = wait_for_event(&api, Some(&ns), "FailedToStartMetricServer").await;
    check(&e, "node1", true, "192.0.2.1:10249");
}
