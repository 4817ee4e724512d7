//! `kube-proxy-rs`: the daemon, `render`, and the one-shot actions (`--cleanup`, ...).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use kube_proxy_rs::config::{self, Action, LogFormat};

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// klog-like verbosity: `-v=0/1` info, `-v=2/3` adds per-sync lines (debug), `-v>=4` traces our
/// code and shows the API client's debug logs from `-v>=6`. `RUST_LOG` overrides.
fn init_logging(verbosity: u8, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let ours = match verbosity {
        0..=1 => "info",
        2..=3 => "debug",
        _ => "trace",
    };
    let others = if verbosity >= 6 { "debug" } else { "warn" };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{others},kube_proxy_rs={ours}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: container logs and files get plain klog-like text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// mimalloc rather than glibc's malloc: a full sync at 10k Services allocates a few hundred MiB
/// of short-lived text (restore input, `iptables-save` output and their parses); glibc keeps
/// most of it resident after it is freed (its mmap threshold rises to 32 MiB after the first
/// large free, so later buffers come from arena heaps whose holes are not returned), while
/// mimalloc returns freed pages to the kernel.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            // Logging may not be set up yet (bad flags): print plainly too.
            eprintln!("kube-proxy-rs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hostname = system_hostname();
    if args.first().map(String::as_str) == Some("help") {
        return help(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("render") {
        return render(&args[1..], &hostname);
    }
    // Hidden: regenerates docs/configuration.md (see src/docgen.rs).
    if args.first().map(String::as_str) == Some("gen-docs") {
        return match args.get(1).map(String::as_str) {
            Some("configuration") => {
                print!("{}", kube_proxy_rs::docgen::configuration_md());
                Ok(ExitCode::SUCCESS)
            }
            _ => anyhow::bail!("usage: kube-proxy-rs gen-docs configuration"),
        };
    }
    if args.first().map(String::as_str) == Some("explain") {
        return explain(&args[1..], &hostname);
    }
    let inv = match config::parse_command_line(&args, &hostname) {
        Ok(inv) => inv,
        Err(e) => {
            report_refused(&args, &hostname, &e.to_string());
            return Err(e.into());
        }
    };
    match &inv.action {
        Action::Help(text) => {
            println!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
        Action::Version => {
            println!("kube-proxy-rs {}", env!("CARGO_PKG_VERSION"));
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    init_logging(inv.options.verbosity, inv.options.log_format);
    for w in &inv.warnings {
        tracing::warn!("{w}");
    }
    // One worker: glibc gives each thread that allocates its own arena and keeps what is
    // freed there, so with the sync task moving between two workers both arenas kept a full
    // sync's transient peak (iptables mode at 10k Services: 315 MiB RSS after the first sync
    // and 661 MiB after a minute of churn with two workers; 226 and 226 with one). The
    // daemon is I/O bound between syncs, and a sync is one task either way.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match inv.action.clone() {
        Action::WriteConfig(path) => {
            config::write_config_file(&inv.config, &path)?;
            tracing::info!(path = %path.display(), "configuration written");
        }
        Action::Cleanup => runtime.block_on(kube_proxy_rs::daemon::cleanup())?,
        Action::InitOnly => {
            tracing::info!(
                "--init-only: nothing to initialise beyond flag validation in this mode"
            );
        }
        Action::Run => {
            let opts = inv.options.clone();
            if let Err(e) = runtime.block_on(kube_proxy_rs::daemon::run(inv)) {
                runtime.block_on(report_start_failure(&opts, &e));
                return Err(e.into());
            }
        }
        Action::Help(_) | Action::Version => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `help [render|explain]`: the usage of the daemon or of a subcommand.
fn help(args: &[String]) -> anyhow::Result<ExitCode> {
    let text = match args.first().map(String::as_str) {
        None => config::usage(),
        Some("render") => kube_proxy_rs::render::USAGE.to_string(),
        Some("explain") => kube_proxy_rs::explain::USAGE.to_string(),
        Some(other) => {
            anyhow::bail!("no help for {other:?}: try help, help render or help explain")
        }
    };
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Whether a subcommand's arguments ask for its usage (before any `--`).
fn asks_for_help(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "-h" || a == "--help")
}

fn render(args: &[String], hostname: &str) -> anyhow::Result<ExitCode> {
    if asks_for_help(args) {
        println!("{}", kube_proxy_rs::render::USAGE);
        return Ok(ExitCode::SUCCESS);
    }
    let parsed = config::parse_render_args(args, hostname)?;
    init_logging(parsed.options.verbosity, parsed.options.log_format);
    for w in &parsed.warnings {
        tracing::warn!("{w}");
    }
    let explicit_hostname = parsed.options.hostname != hostname.to_lowercase();
    let mut warnings = Vec::new();
    let text = kube_proxy_rs::render::run(&parsed, explicit_hostname, &mut warnings);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    print!("{}", text?);
    Ok(ExitCode::SUCCESS)
}

fn explain(args: &[String], hostname: &str) -> anyhow::Result<ExitCode> {
    use kube_proxy_rs::explain::{ExplainError, USAGE, parse_explain_args, run_parsed};
    if asks_for_help(args) {
        println!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    let parsed = match parse_explain_args(args, hostname) {
        Ok(p) => p,
        Err(ExplainError::Usage(m)) => {
            eprintln!("kube-proxy-rs explain: {m}\n\n{USAGE}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    init_logging(
        parsed.render.options.verbosity,
        parsed.render.options.log_format,
    );
    for w in &parsed.render.warnings {
        tracing::warn!("{w}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut warnings = Vec::new();
    let text = runtime.block_on(run_parsed(&parsed, &mut warnings));
    for w in &warnings {
        tracing::warn!("{w}");
    }
    print!("{}", text?);
    Ok(ExitCode::SUCCESS)
}

/// A refused command line or configuration becomes a `FailedToStartProxier` Event on the Node
/// when the API server can be found (best effort, bounded in time).
fn report_refused(args: &[String], hostname: &str, error: &str) {
    use kube_proxy_rs::server::events::report_refused_configuration;
    if args
        .iter()
        .any(|a| a == "--write-config-to" || a.starts_with("--write-config-to="))
    {
        return;
    }
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        let report = report_refused_configuration(args, hostname, error);
        let _ = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), report).await
        });
    }
}

/// A backend that cannot start (unsupported mode, kernel tools missing, IPVS unavailable) becomes a
/// `FailedToStartProxier` Event. Server bind failures post their own Events in the daemon.
async fn report_start_failure(
    opts: &kube_proxy_rs::config::ProxyOptions,
    e: &kube_proxy_rs::daemon::DaemonError,
) {
    use kube_proxy_rs::daemon::DaemonError;
    use kube_proxy_rs::server::events::{NodeEvents, REASON_PROXIER_FAILED};
    if !matches!(
        e,
        DaemonError::UnsupportedMode(_) | DaemonError::Kernel(_) | DaemonError::Backend(_)
    ) {
        return;
    }
    let Ok(Ok(client)) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        kube_proxy_rs::daemon::client(opts),
    )
    .await
    else {
        return;
    };
    let _ = NodeEvents::new(client, &opts.hostname, &opts.hostname)
        .post(true, REASON_PROXIER_FAILED, &e.to_string())
        .await;
}
