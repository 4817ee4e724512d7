//! The daemon's tasks are supervised: when the sync loop ends (here: its backend panics), the
//! daemon returns an error naming the task, which `main` turns into a non-zero exit, instead
//! of exiting 0 or carrying on with `/healthz` answering while nothing is synced. Runs the
//! daemon's real serving code (servers, watchers against the fake API server, sync loop) in
//! process with a test backend; no root.

mod support;

use std::time::Duration;

use kube_proxy_rs::backend::{Backend, BackendError, SyncOutcome, SyncRequest};
use kube_proxy_rs::config::{Invocation, parse_command_line};
use kube_proxy_rs::daemon::{self, DaemonError};
use kube_proxy_rs::server::metrics::Metrics;
use support::fakeapi::FakeApiServer;

/// A backend with a bug: its first sync panics.
struct PanickingBackend;

impl Backend for PanickingBackend {
    fn mode(&self) -> &'static str {
        "iptables"
    }
    fn partial_syncs(&self) -> bool {
        true
    }
    async fn sync(&mut self, _req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
        panic!("backend bug in sync")
    }
    async fn needs_full_sync(&mut self) -> bool {
        false
    }
}

/// A backend that syncs fine.
struct GoodBackend;

impl Backend for GoodBackend {
    fn mode(&self) -> &'static str {
        "iptables"
    }
    fn partial_syncs(&self) -> bool {
        true
    }
    async fn sync(&mut self, _req: SyncRequest<'_>) -> Result<SyncOutcome, BackendError> {
        Ok(SyncOutcome::default())
    }
    async fn needs_full_sync(&mut self) -> bool {
        false
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The fake API server with one Service, and the daemon's invocation against it.
fn setup() -> (FakeApiServer, tempfile::TempDir, Invocation) {
    let api = FakeApiServer::start();
    api.apply_demo_web("node1", "192.168.50.1");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let args: Vec<String> = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--hostname-override=node1".into(),
        format!("--healthz-bind-address=127.0.0.1:{}", free_port()),
        format!("--metrics-bind-address=127.0.0.1:{}", free_port()),
    ];
    let inv = parse_command_line(&args, "node1").expect("flags");
    (api, dir, inv)
}

/// Runs the daemon's serving code until it returns; the (task, how) of its TaskEnded error.
async fn serve_until_task_ends<B: Backend + 'static>(
    inv: Invocation,
    backend: B,
    tasks: Vec<daemon::Task>,
) -> (&'static str, String) {
    let client = daemon::client(&inv.options).await.expect("client");
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        daemon::serve(
            inv,
            client,
            vec![(kube_proxy_rs::model::IpFamily::V4, backend)],
            tasks,
            Metrics::new(),
            None,
        ),
    )
    .await
    .expect("the daemon kept running after one of its tasks ended");
    match result {
        Err(DaemonError::TaskEnded { task, how }) => (task, how),
        other => panic!("expected TaskEnded, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_loop_that_ends_ends_the_daemon_with_an_error() {
    let (_api, _dir, inv) = setup();
    let (task, how) = serve_until_task_ends(inv, PanickingBackend, Vec::new()).await;
    assert_eq!(task, "sync");
    assert!(how.contains("backend bug in sync"), "{how}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_task_that_ends_ends_the_daemon_with_an_error() {
    let (_api, _dir, inv) = setup();
    let checker = tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        panic!("checker bug");
    });
    let (task, how) = serve_until_task_ends(
        inv,
        GoodBackend,
        vec![("IPVS graceful termination", checker)],
    )
    .await;
    assert_eq!(task, "IPVS graceful termination");
    assert!(how.contains("checker bug"), "{how}");
}
