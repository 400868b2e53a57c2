//! `egress-webhook`: the command line. Parsing and exit codes only; the work is in the library.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use egress_webhook::config::Config;
use egress_webhook::engine::{ClusterFacts, Injector};
use egress_webhook::manifest::{InjectedObject, inject_stream};
use egress_webhook::server::{self, ServeOptions, StartError, TlsSource};

/// Exit code for bad input (unreadable or unparseable manifests), as the docs promise.
const EXIT_BAD_INPUT: u8 = 2;
/// Exit code for an invalid configuration: sysexits' EX_USAGE, as linkerd uses.
const EXIT_BAD_CONFIG: u8 = 64;

/// egress-gate's admission webhook and its offline tools.
#[derive(Parser)]
#[command(name = "egress-webhook", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve admission reviews over TLS (the in-cluster mode).
    Serve(ServeArgs),
    /// Print manifests with egress-gate's changes applied, as the webhook would make them.
    ///
    /// Pods and the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets,
    /// Jobs and CronJobs are injected; other kinds pass through unchanged. Services in the
    /// input count as peer services. The namespace opt-in label is not checked: the
    /// preview shows what happens once the namespace is opted in.
    Inject {
        /// Manifest file, or `-` for standard input.
        #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
        file: PathBuf,
        /// Webhook configuration; the built-in defaults when omitted.
        #[arg(long, value_name = "CFG")]
        config: Option<PathBuf>,
        /// Namespace for objects that name none.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Print each object's JSON patch instead of the patched objects.
        #[arg(long)]
        diff: bool,
    },
    /// Create a CA and a serving certificate for the webhook Service: PEM files, or a
    /// `kubernetes.io/tls` Secret manifest plus the caBundle for the webhook configuration.
    Certs(CertsArgs),
    /// Validate a configuration file and print the NO_PROXY it produces for a pod with no
    /// peer services.
    CheckConfig {
        /// Webhook configuration; the built-in defaults when omitted.
        #[arg(long, value_name = "CFG")]
        config: Option<PathBuf>,
    },
}

/// Log line format.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

#[derive(clap::Args)]
struct CertsArgs {
    /// The webhook Service's name.
    #[arg(long, default_value = "egress-webhook")]
    service: String,
    /// The webhook Service's namespace.
    #[arg(short = 'n', long, default_value = "egress-gate")]
    namespace: String,
    /// The cluster DNS domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Extra DNS name for the certificate (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// Extra IP address for the certificate (repeatable).
    #[arg(long = "ip", value_name = "IP")]
    ip: Vec<std::net::IpAddr>,
    /// Lifetime of the serving certificate, such as 365d or 12h.
    #[arg(long, default_value = "365d")]
    validity: String,
    /// Write ca.crt, tls.crt and tls.key into this directory instead of printing a Secret.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// The Secret's name when printing a manifest.
    #[arg(long, default_value = egress_gate_certs::bundle::DEFAULT_SECRET_NAME)]
    secret_name: String,
    /// Also output the CA's key (ca.key), so `serve --self-signed` can renew under this CA.
    #[arg(long)]
    include_ca_key: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Webhook configuration (reloaded when it changes); built-in defaults when omitted.
    #[arg(long, value_name = "CFG")]
    config: Option<PathBuf>,
    /// PEM certificate chain for the admission endpoint (reloaded when it changes).
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "self_signed",
        conflicts_with = "self_signed"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the admission endpoint (reloaded when it changes).
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "self_signed",
        conflicts_with = "self_signed"
    )]
    tls_key: Option<PathBuf>,
    /// Keep a CA and serving certificate in a Secret of the pod's namespace, renew them, and
    /// keep the webhook configuration's caBundle in step (instead of --tls-cert/--tls-key).
    #[arg(long)]
    self_signed: bool,
    /// `--self-signed`: the Secret holding the certificates.
    #[arg(long, default_value = egress_gate_certs::bundle::DEFAULT_SECRET_NAME)]
    secret_name: String,
    /// `--self-signed`: the MutatingWebhookConfiguration whose caBundle is kept in step.
    #[arg(long, default_value = "egress-gate")]
    webhook_config_name: String,
    /// `--self-signed`: the Service the API server calls.
    #[arg(long, default_value = "egress-webhook")]
    service_name: String,
    /// The webhook's own namespace: where a default `proxyURL` finds the bundled proxy, and
    /// with `--self-signed` the namespace of the Secret and the Service.
    #[arg(long, env = "POD_NAMESPACE", default_value = "egress-gate")]
    namespace: String,
    /// `--self-signed`: the cluster DNS domain, for the certificate's fully qualified name.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Address of the HTTPS admission endpoint (`POST /mutate`).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Address of the plain-HTTP admin endpoint (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, default_value = "0.0.0.0:9443")]
    admin_listen: SocketAddr,
    /// How long SIGTERM waits for in-flight reviews before closing connections.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    grace_period: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Certs(args) => certs(args),
        Command::Inject {
            file,
            config,
            namespace,
            diff,
        } => {
            let config = match load_config(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            inject(&config, &file, namespace.as_deref(), diff)
        }
        Command::CheckConfig { config } => match load_config(config) {
            Ok(config) => {
                let injector = Injector::new(&config, &ClusterFacts::from_config(&config));
                let profiles: Vec<_> = config.profiles.iter().map(|p| p.name.as_str()).collect();
                println!("config ok");
                println!("proxyURL: {}", config.proxy_url);
                println!("profiles: {}", profiles.join(", "));
                let labels = Default::default();
                let ctx = egress_webhook::engine::PodContext {
                    namespace: "default",
                    operation: egress_webhook::engine::Operation::Create,
                    services: &[],
                };
                println!("NO_PROXY: {}", injector.no_proxy_for(None, &labels, &ctx));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("egress-webhook: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let namespace = args.namespace.clone();
    let tls = match (args.self_signed, args.tls_cert, args.tls_key) {
        (false, Some(cert), Some(key)) => TlsSource::Files { cert, key },
        (true, _, _) => {
            let mut identity =
                egress_gate_certs::ServiceIdentity::new(args.service_name, args.namespace);
            identity.cluster_domain = args.cluster_domain;
            TlsSource::SelfSigned(egress_gate_certs::BootstrapParams {
                secret_name: args.secret_name,
                webhook_config_name: args.webhook_config_name,
                identity,
                policy: egress_gate_certs::CertPolicy::default(),
            })
        }
        _ => {
            eprintln!("egress-webhook: give --tls-cert and --tls-key, or --self-signed");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let options = ServeOptions {
        config: args.config,
        tls,
        listen: args.listen,
        admin_listen: args.admin_listen,
        grace_period: args.grace_period,
        namespace,
    };
    match runtime.block_on(server::run(options, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("egress-webhook: {e:#}");
            match e.downcast_ref::<StartError>() {
                Some(StartError::Config(_)) => ExitCode::from(EXIT_BAD_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn certs(args: CertsArgs) -> ExitCode {
    let validity = match egress_gate_certs::parse_duration(&args.validity) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("egress-webhook: --validity: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let mut request = egress_gate_certs::BundleRequest::new(args.service, args.namespace);
    request.identity.cluster_domain = args.cluster_domain;
    request.identity.extra_dns_names = args.dns;
    request.identity.extra_ips = args.ip;
    request.validity = validity;
    request.include_ca_key = args.include_ca_key;
    request.output = match args.out_dir {
        Some(dir) => egress_gate_certs::BundleOutput::Dir(dir),
        None => egress_gate_certs::BundleOutput::SecretManifest {
            secret_name: args.secret_name,
        },
    };
    match egress_gate_certs::write_bundle(&request, &mut std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ egress_gate_certs::CertError::Invalid(_)) => {
            eprintln!("egress-webhook: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(e) => {
            eprintln!("egress-webhook: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM (what the kubelet sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let result = match &path {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    result.map_err(|e| {
        eprintln!("egress-webhook: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

fn inject(config: &Config, file: &PathBuf, namespace: Option<&str>, diff: bool) -> ExitCode {
    let text = match read_input(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("egress-webhook: cannot read {}: {e}", file.display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let injector = Injector::new(config, &ClusterFacts::from_config(config));
    let objects = match inject_stream(&injector, &text, namespace) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("egress-webhook: {}: {e}", file.display());
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    match render(&objects, diff) {
        Ok(out) => {
            report(&objects);
            if let Err(e) = std::io::stdout().lock().write_all(out.as_bytes()) {
                eprintln!("egress-webhook: cannot write output: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("egress-webhook: cannot print output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_input(file: &PathBuf) -> std::io::Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        Ok(text)
    } else {
        std::fs::read_to_string(file)
    }
}

/// The patched objects as a YAML stream, or with `diff` each object's JSON patch.
fn render(objects: &[InjectedObject], diff: bool) -> anyhow::Result<String> {
    let mut out = String::new();
    for object in objects {
        if diff {
            let Some(mutation) = &object.mutation else {
                continue;
            };
            out.push_str(&format!(
                "--- # document {}: {} {} ({})\n",
                object.document,
                object.kind,
                object.display_name,
                mutation.decision.as_str()
            ));
            out.push_str(&serde_json::to_string_pretty(&object.patch)?);
            out.push('\n');
        } else {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(&object.object)?);
        }
    }
    Ok(out)
}

/// One line per pod or template on standard error: what was decided and why, plus warnings.
fn report(objects: &[InjectedObject]) {
    for object in objects {
        let Some(mutation) = &object.mutation else {
            continue;
        };
        let profile = mutation
            .decision
            .profile()
            .map(|p| format!(" (profile {p})"))
            .unwrap_or_default();
        eprintln!(
            "document {}: {} {}: {}{profile}, {} patch operations",
            object.document,
            object.kind,
            object.display_name,
            mutation.decision.as_str(),
            mutation.patch.len()
        );
        for warning in &mutation.warnings {
            eprintln!("  warning: {warning}");
        }
    }
}
