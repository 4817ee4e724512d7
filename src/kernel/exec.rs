//! Running a tool with an argument vector, optionally inside a named network namespace.

use std::process::Stdio;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::KernelError;

/// Runs tools, optionally through `ip netns exec NAME`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Exec {
    netns: Option<Arc<str>>,
}

/// What a finished tool left behind.
#[derive(Debug)]
pub(crate) struct Output {
    /// The full command line, for messages.
    pub command: String,
    /// Exit status (`None` if killed by a signal).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// This run as a [`KernelError::Command`].
    pub fn into_error(self) -> KernelError {
        KernelError::Command {
            command: self.command,
            status: self.status,
            stderr: self.stderr,
        }
    }

    /// `Ok(stdout)` on exit status 0, otherwise the error.
    pub fn into_stdout(self) -> Result<String, KernelError> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(self.into_error())
        }
    }
}

impl Exec {
    pub fn new(netns: Option<&str>) -> Self {
        Exec {
            netns: netns.map(Arc::from),
        }
    }

    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The program and arguments actually executed.
    fn argv(&self, program: &str, args: &[String]) -> (String, Vec<String>) {
        match &self.netns {
            None => (program.to_string(), args.to_vec()),
            Some(ns) => {
                let mut v = vec![
                    "netns".to_string(),
                    "exec".to_string(),
                    ns.to_string(),
                    program.to_string(),
                ];
                v.extend_from_slice(args);
                ("ip".to_string(), v)
            }
        }
    }

    /// Runs `program args...`, feeding `stdin` if given, and collects its output. A non-zero
    /// exit is not an error here: callers interpret exit codes.
    pub async fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&[u8]>,
    ) -> Result<Output, KernelError> {
        let (prog, argv) = self.argv(program, args);
        let command = display_command(&prog, &argv);
        tracing::debug!(%command, "running");
        let mut cmd = Command::new(&prog);
        cmd.args(&argv)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| KernelError::Spawn {
            command: command.clone(),
            source,
        })?;
        let pipe = child.stdin.take();
        // Feed stdin while the output is being drained, so neither side can block on a
        // full pipe with large inputs.
        let feed = async move {
            if let (Some(mut pipe), Some(data)) = (pipe, stdin) {
                // A write error (the tool exited early) shows up in its exit status.
                let _ = pipe.write_all(data).await;
                let _ = pipe.shutdown().await;
            }
        };
        let (_, out) = tokio::join!(feed, child.wait_with_output());
        let out = out.map_err(|source| KernelError::Spawn {
            command: command.clone(),
            source,
        })?;
        Ok(Output {
            command,
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// A command line for messages: arguments with spaces or quotes are shown quoted.
pub(crate) fn display_command(program: &str, args: &[String]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(a);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_wraps_the_command_with_ip_netns_exec() {
        let e = Exec::new(Some("ns1"));
        let (p, a) = e.argv("iptables-nft", &["-S".to_string()]);
        assert_eq!(p, "ip");
        assert_eq!(a, ["netns", "exec", "ns1", "iptables-nft", "-S"]);
        let (p, a) = Exec::default().argv("iptables-nft", &["-S".to_string()]);
        assert_eq!(p, "iptables-nft");
        assert_eq!(a, ["-S"]);
    }

    #[test]
    fn display_quotes_arguments_with_spaces() {
        let s = display_command("iptables", &["-m".into(), "a b".into(), "".into()]);
        assert_eq!(s, r#"iptables -m "a b" """#);
    }

    #[tokio::test]
    async fn large_stdin_does_not_deadlock_and_output_is_collected() {
        // `cat` echoes everything back: stdin must be fed while stdout is drained.
        let data = "x".repeat(4 << 20);
        let out = Exec::default()
            .run("cat", &[], Some(data.as_bytes()))
            .await
            .unwrap();
        assert!(out.success());
        assert_eq!(out.stdout.len(), data.len());
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error_naming_it() {
        let err = Exec::default()
            .run("kprs-no-such-tool", &["--x".into()], None)
            .await
            .unwrap_err();
        assert!(matches!(err, KernelError::Spawn { .. }));
        assert!(err.to_string().contains("kprs-no-such-tool --x"), "{err}");
    }

    #[tokio::test]
    async fn failing_program_keeps_status_and_stderr() {
        let out = Exec::default()
            .run("ls", &["/kprs-no-such-path".into()], None)
            .await
            .unwrap();
        assert_eq!(out.status, Some(2));
        let err = out.into_error();
        let msg = err.to_string();
        assert!(
            msg.contains("exit status 2") && msg.contains("kprs-no-such-path"),
            "{msg}"
        );
    }
}
