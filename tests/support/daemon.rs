//! The built `kube-proxy-rs` daemon, started inside a network namespace against the fake API
//! server, its stdout and stderr appended to a log file the test reads (for its checks and
//! for its failure messages).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use super::fakeapi::FakeApiServer;
use super::netns::{Netns, NsChild};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kube-proxy-rs");

/// The node name every end-to-end test gives the daemon (`--hostname-override`).
pub const NODE: &str = "node1";

/// The log of every daemon started into `dir` (one file across restarts).
pub fn log_in(dir: &Path) -> PathBuf {
    dir.join("proxy.log")
}

/// What to start; made by [`Daemon::builder`], run by [`DaemonBuilder::start`].
#[must_use]
pub struct DaemonBuilder<'a> {
    ns: &'a Netns,
    api: &'a FakeApiServer,
    dir: &'a Path,
    kubeconfig: Option<PathBuf>,
    mode: Option<String>,
    args: Vec<String>,
    env: Vec<(OsString, OsString)>,
}

impl DaemonBuilder<'_> {
    /// `--proxy-mode=MODE`; without it the daemon picks its default.
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = Some(mode.to_string());
        self
    }

    /// Uses this kubeconfig instead of one for the fake API server written into the dir.
    pub fn kubeconfig(mut self, path: &Path) -> Self {
        self.kubeconfig = Some(path.to_path_buf());
        self
    }

    /// More flags, after the common ones.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// One more flag.
    pub fn arg(self, arg: impl Into<String>) -> Self {
        self.args([arg])
    }

    /// An environment variable for the daemon.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The command line, in the namespace (`ip netns exec`), without its stdio set: for a
    /// test that runs the daemon to its exit instead of starting it.
    pub fn command(&self) -> Command {
        let kubeconfig = match &self.kubeconfig {
            Some(path) => path.clone(),
            None => self.api.write_kubeconfig(self.dir),
        };
        // No conntrack table sizing: the table size is host-wide, not the namespace's to set.
        let common = [
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={NODE}"),
            "--conntrack-max-per-core=0".to_string(),
        ];
        let mode = self.mode.iter().map(|m| format!("--proxy-mode={m}"));
        let mut cmd = self
            .ns
            .command(BIN, mode.chain(common).chain(self.args.iter().cloned()));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the daemon, its output appended to [`log_in`] the dir.
    pub fn start(self) -> Daemon {
        let log = log_in(self.dir);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log file"))
            .stderr(file);
        let child = NsChild(cmd.spawn().expect("start kube-proxy-rs"));
        Daemon { child, log }
    }
}

/// A running daemon; killed and reaped on Drop (its [`NsChild`]).
#[derive(Debug)]
pub struct Daemon {
    child: NsChild,
    log: PathBuf,
}

impl Daemon {
    /// A daemon in `ns` against `api`, its kubeconfig and log in `dir`, with
    /// `--hostname-override=node1` and `--conntrack-max-per-core=0`.
    pub fn builder<'a>(ns: &'a Netns, api: &'a FakeApiServer, dir: &'a Path) -> DaemonBuilder<'a> {
        DaemonBuilder {
            ns,
            api,
            dir,
            kubeconfig: None,
            mode: None,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The log file (stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The log so far (empty if it cannot be read).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait()
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; the exit status.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        self.child.terminate(grace)
    }

    /// SIGKILL now (a crash: no clean-up of its own), and reap it.
    pub fn kill(&mut self) {
        self.child.0.kill().expect("SIGKILL kube-proxy-rs");
        let _ = self.child.0.wait();
    }
}
