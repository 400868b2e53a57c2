//! `egress-proxy`: command line only. Reads the config (exit 64 when it is unusable), starts
//! the server, and turns signals and file changes into shutdown and reload.
#![forbid(unsafe_code)]

mod cli_blob;
mod cli_check;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use egress_proxy::config::{HumanDuration, LogFormat};
use egress_proxy::{Config, Handle, Server, StartError};
use tokio::signal::unix::{SignalKind, signal};

/// `EX_USAGE` from sysexits.h: the configuration is unusable. The exit codes of both
/// binaries are one table (docs/webhook.md, "Exit codes").
const EX_USAGE: u8 = 64;

/// The egress-gate CONNECT proxy: tunnels TLS to allowlisted destinations only.
///
/// Without a command it serves; `check-config` and `check` work offline.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Offline checks instead of serving.
    #[command(subcommand)]
    command: Option<Offline>,
    /// YAML config file; without it the built-in defaults apply (see docs/proxy.md).
    #[arg(long, env = "EGRESS_PROXY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Overrides `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `adminListen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Overrides `logFormat` (text or json).
    #[arg(long)]
    log_format: Option<LogFormat>,
    /// How often the config file (and TLS files) are checked for changes; SIGHUP reloads at
    /// once. Polling, because a ConfigMap update swaps a symlink that inotify watches miss.
    #[arg(long, default_value = "2s")]
    watch_interval: HumanDuration,
}

/// The commands that do not serve.
#[derive(Debug, Subcommand)]
enum Offline {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Validate the configuration and print what it allows; warns when nothing can pass.
    CheckConfig,
    /// Would this CONNECT target pass? Prints the matching rules, the addresses the proxy
    /// would resolve and check, and the verdict with its reason. Exit 0 allowed, 1 refused.
    Check {
        /// The CONNECT target: `host:port`, `a.b.c.d:port` or `[v6]:port`.
        #[arg(value_name = "HOST:PORT")]
        target: String,
        /// With `identity:`, ask as a pod of this namespace (the rules whose `from:` select
        /// it apply, as for a connection the proxy identified). Without it, the caller is
        /// unidentified.
        #[arg(long = "as-namespace", value_name = "NAMESPACE")]
        as_namespace: Option<String>,
        /// The asking pod's labels (`key=value`, repeatable); needs --as-namespace.
        #[arg(long = "as-label", value_name = "KEY=VALUE", requires = "as_namespace")]
        as_labels: Vec<String>,
        /// The asking pod's service account; needs --as-namespace.
        #[arg(
            long = "as-service-account",
            value_name = "NAME",
            default_value = "default",
            requires = "as_namespace"
        )]
        as_service_account: String,
    },
    /// Blob gateway helpers.
    #[command(subcommand)]
    Blob(BlobCommand),
}

/// `egress-proxy blob ...`.
#[derive(Debug, Subcommand)]
enum BlobCommand {
    /// Print a fresh client key for a virtual account and, ready to apply, the CNPG Secret
    /// and ObjectStore and the Velero Secret and BackupStorageLocation that use it.
    ClientConfig(cli_blob::ClientConfigArgs),
}

impl Args {
    /// Reads the config file (or the defaults) and applies the command-line overrides.
    fn load(&self) -> Result<Config, egress_proxy::ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(l) = self.listen {
            config.listen = l;
        }
        if let Some(l) = self.admin_listen {
            config.admin_listen = l;
        }
        if let Some(f) = self.log_format {
            config.log_format = f;
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Offline::Completion { shell }) = &args.command {
        let mut command = <Args as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut command, "egress-proxy", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("egress-proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match &args.command {
        Some(Offline::Completion { .. }) => {}
        Some(Offline::CheckConfig) => return cli_check::check_config(&config),
        Some(Offline::Check {
            target,
            as_namespace,
            as_labels,
            as_service_account,
        }) => {
            let caller = match as_namespace {
                None => None,
                Some(ns) => match cli_check::caller(ns, as_labels, as_service_account) {
                    Ok(pod) => Some(pod),
                    Err(e) => {
                        eprintln!("egress-proxy: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            return cli_check::check(&config, target, caller.as_ref());
        }
        Some(Offline::Blob(BlobCommand::ClientConfig(a))) => {
            return cli_blob::client_config(&config, a);
        }
        None => {}
    }
    init_tracing(config.log_format);
    for warning in cli_check::warnings(&config) {
        tracing::warn!("{warning}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("egress-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            let usage = e
                .downcast_ref::<StartError>()
                .is_some_and(|s| matches!(s, StartError::Tls(_) | StartError::Blob(_)));
            ExitCode::from(if usage { EX_USAGE } else { 1 })
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No tracing target in the output: the access log has a field named `target` (the
    // CONNECT target), which the target metadata would shadow in JSON. Colour only on a
    // terminal: redirected to a file or a log collector, escape codes are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: Args, config: Config) -> anyhow::Result<()> {
    let server = Server::bind(&config).await?;
    tracing::info!(
        listen = %server.proxy_addr().context("listener address")?,
        admin = %server.admin_addr().context("admin address")?,
        tls = ?server.tls_addr().and_then(Result::ok),
        rules = config.allow.len(),
        max_tunnels = config.max_tunnels,
        "egress-proxy listening"
    );
    if config.blob.is_some() {
        let (plain, tls) = server.blob_addrs();
        tracing::info!(listen = ?plain, tls = ?tls, "blob gateway listening");
    }
    let handle = server.handle();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let watcher = tokio::spawn(async move {
        // The files to watch come from the newest file that parsed, not the one read at
        // start: an account a reload adds has its key files watched from then on, and a
        // key file a failed reload could not read is retried when it appears.
        let mut watched = config.clone();
        let mut seen = fingerprint(&args, &watched);
        let mut tick = tokio::time::interval(args.watch_interval.0.max(Duration::from_millis(100)));
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    if let Some(next) = reload(&args, &config, &handle) {
                        watched = next;
                    }
                    seen = fingerprint(&args, &watched);
                }
                _ = tick.tick() => {
                    if fingerprint(&args, &watched) != seen {
                        tracing::info!("configuration file changed: reloading");
                        if let Some(next) = reload(&args, &config, &handle) {
                            watched = next;
                        }
                        seen = fingerprint(&args, &watched);
                    }
                }
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); handle.shutdown(); return; }
                _ = int.recv() => { tracing::info!("SIGINT: draining"); handle.shutdown(); return; }
            }
        }
    });
    server.run().await;
    watcher.abort();
    Ok(())
}

/// Loads the file again and applies it; an invalid file keeps the running settings.
/// Returns the file as parsed (applied or not, when only a file it names failed), so the
/// watcher can watch the files it names; `None` when it did not parse.
fn reload(args: &Args, started: &Config, handle: &Handle) -> Option<Config> {
    let next = match args.load() {
        Ok(c) => c,
        Err(e) => {
            // Counted before the line is logged: a watcher of the log (a test, an operator's
            // tail) that then reads the metrics sees the failure counted.
            handle.reload_failed();
            tracing::error!("reload rejected, keeping the running configuration: {e}");
            return None;
        }
    };
    if next.listen != started.listen
        || next.admin_listen != started.admin_listen
        || next.max_tunnels != started.max_tunnels
        || next.log_format != started.log_format
        || next.worker_threads != started.worker_threads
        || next.tls.as_ref().map(|t| t.listen) != started.tls.as_ref().map(|t| t.listen)
        || blob_listeners(&next) != blob_listeners(started)
        || next.identity != started.identity
    {
        tracing::warn!(
            "listen, adminListen, tls.listen, blob.listen, blob.tls.listen, blob.maxConnections, maxTunnels, logFormat, workerThreads and identity changes apply at the next restart"
        );
    }
    match handle.reload(&next) {
        Ok(()) => tracing::info!(rules = next.allow.len(), "configuration reloaded"),
        Err(e) => tracing::error!("reload rejected, keeping the running configuration: {e}"),
    }
    Some(next)
}

/// The blob gateway's listener addresses and connection cap, which only a restart changes.
fn blob_listeners(c: &Config) -> Option<(Option<SocketAddr>, Option<SocketAddr>, usize)> {
    c.blob.as_ref().map(|b| {
        (
            b.listen,
            b.tls.as_ref().map(|t| t.listen),
            b.max_connections,
        )
    })
}

/// The bytes of every watched file (config, TLS certificate and key), to notice changes.
fn fingerprint(args: &Args, watched: &Config) -> Vec<Vec<u8>> {
    let mut paths: Vec<&Path> = args.config.iter().map(PathBuf::as_path).collect();
    if let Some(t) = &watched.tls {
        paths.push(&t.cert_file);
        paths.push(&t.key_file);
    }
    if let Some(b) = &watched.blob {
        paths.extend(egress_proxy::blob::accounts::watched_files(b));
    }
    paths
        .into_iter()
        .map(|p| std::fs::read(p).unwrap_or_default())
        .collect()
}
