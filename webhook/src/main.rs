//! `egress-webhook`: the command line. Parsing and exit codes only; the work is in the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use egress_webhook::config::Config;
use egress_webhook::engine::{ClusterFacts, Injector};
use egress_webhook::manifest::{PreviewOptions, parse_source, preview, shipped_exclusion};
use egress_webhook::preview::{OutputFormat, read_inputs, render, report_lines};
use egress_webhook::server::{self, ServeOptions, StartError, TlsSource};

// Exit codes, the same for egress-webhook and egress-proxy (docs/webhook.md, "Exit codes").
// 0 is success; 1 a failure at run time; 2 a command-line usage error (clap's own code).
/// The configuration file is unusable: sysexits' EX_USAGE, as the proxy and linkerd use.
const EXIT_BAD_CONFIG: u8 = 64;
/// The input is not what the command reads (not YAML, a malformed pod, no Kubernetes
/// object at all): sysexits' EX_DATAERR.
const EXIT_BAD_INPUT: u8 = 65;
/// An input file is missing or unreadable: sysexits' EX_NOINPUT.
const EXIT_NO_INPUT: u8 = 66;
/// A command-line value clap could not check itself (a certificate setting): clap's code.
const EXIT_USAGE: u8 = 2;
/// The cluster cannot be reached or read: sysexits' EX_UNAVAILABLE.
const EXIT_UNAVAILABLE: u8 = 69;
/// How long the preview waits for discovery's first complete listing: the serving webhook
/// reports ready after the same listing, which takes well under a second on a live cluster.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// ReplicationControllers, Jobs and CronJobs are injected; other kinds pass through
    /// unchanged, with the reason on standard error. `kind: List` and typed lists
    /// (`PodList`) are unwrapped. Services in the input count as peer services. Pods in
    /// kube-system and in the webhook's own namespace are left alone, as the webhook
    /// configuration excludes them. The namespace opt-in label is not checked: the preview
    /// shows what happens once the namespace is opted in.
    ///
    /// Against a cluster (the default; kubeconfig as kubectl finds it): the webhook's live
    /// configuration from its ConfigMap (unless --config), discovery run once as the serving
    /// webhook runs it (with `discovery: true`), the namespaces' Services, and the webhook
    /// configuration's namespaceSelector. With --offline: no cluster; NO_PROXY uses the
    /// configuration's serviceCIDRs, podCIDRs and apiServer (or their defaults).
    Inject(InjectArgs),
    /// Show whether every pod that should go through egress-gate does: per opted-in
    /// namespace the pods selected, injected and missing injection; the webhook Service's
    /// ready endpoints; the serving certificate's expiry; and whether the webhook
    /// configuration's caBundle verifies it. Exits 1 when something needs an operator.
    ///
    /// Reads the cluster as `inject` does (kubeconfig as kubectl finds it; the webhook's
    /// live configuration from its ConfigMap unless --config).
    Status(StatusArgs),
    /// Create a CA and a serving certificate for the webhook Service: PEM files, or a
    /// `kubernetes.io/tls` Secret manifest plus the caBundle for the webhook configuration.
    Certs(CertsArgs),
    /// Validate a configuration file and print the NO_PROXY it produces for a pod with no
    /// peer services.
    CheckConfig {
        /// Webhook configuration; the built-in defaults when omitted.
        #[arg(long, value_name = "CFG")]
        config: Option<PathBuf>,
        /// The webhook's own namespace, where a default proxyURL finds the bundled proxy.
        #[arg(
            short = 'n',
            long,
            env = "POD_NAMESPACE",
            default_value = "egress-gate"
        )]
        namespace: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// bash: `source <(egress-webhook completion bash)`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct InjectArgs {
    /// Manifest file or directory, or `-` for standard input (repeatable).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        required = true
    )]
    files: Vec<PathBuf>,
    /// Read directories given with -f recursively.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Webhook configuration file; without it the live one from the cluster's ConfigMap,
    /// or with --offline the built-in defaults.
    #[arg(long, value_name = "CFG")]
    config: Option<PathBuf>,
    /// Namespace for objects that name none; otherwise the kubeconfig context's, as
    /// kubectl (offline: `default`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// The webhook's own namespace: where its ConfigMap is, where a default proxyURL finds
    /// the bundled proxy, and a namespace whose pods the webhook leaves alone.
    #[arg(long, env = "POD_NAMESPACE", default_value = "egress-gate")]
    webhook_namespace: String,
    /// Preview without a cluster: configuration from --config or the defaults, cluster
    /// facts from the configuration, Services only from the input.
    #[arg(long)]
    offline: bool,
    /// Kubeconfig file (otherwise KUBECONFIG, then ~/.kube/config, as kubectl).
    #[arg(long, value_name = "FILE", conflicts_with = "offline")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long, value_name = "NAME", conflicts_with = "offline")]
    context: Option<String>,
    /// The ConfigMap holding the webhook's configuration (key `webhook.yaml`).
    #[arg(long, value_name = "NAME", default_value = egress_webhook::cluster::DEFAULT_CONFIG_MAP, conflicts_with = "offline")]
    config_map: String,
    /// The MutatingWebhookConfiguration whose namespaceSelector decides which namespaces
    /// the webhook sees.
    #[arg(long, value_name = "NAME", default_value = egress_webhook::cluster::DEFAULT_WEBHOOK_CONFIGURATION, conflicts_with = "offline")]
    webhook_config_name: String,
    /// Output format: the patched objects as YAML or JSON, a unified diff of each changed
    /// object, or each changed object's JSON patch (what the webhook returns).
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    output: Output,
    /// Same as `-o diff`.
    #[arg(long, conflicts_with = "output")]
    diff: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Only this namespace (default: every opted-in namespace).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Webhook configuration file; without it the live one from the cluster's ConfigMap.
    #[arg(long, value_name = "CFG")]
    config: Option<PathBuf>,
    /// The webhook's own namespace: its ConfigMap and Secret are there, its pods not counted.
    #[arg(long, env = "POD_NAMESPACE", default_value = "egress-gate")]
    webhook_namespace: String,
    /// Kubeconfig file (otherwise KUBECONFIG, then ~/.kube/config, as kubectl).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long, value_name = "NAME")]
    context: Option<String>,
    /// The ConfigMap holding the webhook's configuration (key `webhook.yaml`).
    #[arg(long, value_name = "NAME", default_value = egress_webhook::cluster::DEFAULT_CONFIG_MAP)]
    config_map: String,
    /// The MutatingWebhookConfiguration to check.
    #[arg(long, value_name = "NAME", default_value = egress_webhook::cluster::DEFAULT_WEBHOOK_CONFIGURATION)]
    webhook_config_name: String,
    /// The Secret holding the serving certificate (`tls.crt`).
    #[arg(long, value_name = "NAME", default_value = egress_gate_certs::bundle::DEFAULT_SECRET_NAME)]
    secret_name: String,
}

/// `inject -o`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Output {
    /// The patched objects as a YAML stream.
    Yaml,
    /// One patched object as JSON, several as a `kind: List`.
    Json,
    /// A unified diff of each object the webhook changes.
    Diff,
    /// Each changed object's RFC 6902 JSON patch.
    JsonPatch,
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
    #[arg(long, default_value = "365d", value_parser = parse_validity)]
    validity: Duration,
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
    /// Watch pod metadata in opted-in namespaces and export how many selected pods were
    /// admitted without injection (`egress_webhook_pods_uninjected`); needs list and watch
    /// on pods and namespaces.
    #[arg(long)]
    watch_pods: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Certs(args) => certs(args),
        Command::Inject(args) => inject(args),
        Command::Status(args) => status(args),
        Command::CheckConfig { config, namespace } => check_config(config, &namespace),
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "egress-webhook",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
    }
}

/// `--validity` as clap checks it, so a bad value is a usage error like any other flag's.
fn parse_validity(text: &str) -> Result<Duration, String> {
    egress_gate_certs::parse_duration(text).map_err(|e| e.to_string())
}

fn check_config(path: Option<PathBuf>, namespace: &str) -> ExitCode {
    let config = match load_config(path.as_ref(), namespace) {
        Ok(c) => c,
        Err(code) => return code,
    };
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
    warn_offline_discovery(&config);
    ExitCode::SUCCESS
}

/// With `discovery: true` the serving webhook replaces the default CIDRs with the
/// cluster's and adds each namespace's Services; an offline run cannot, and says so.
fn warn_offline_discovery(config: &Config) {
    if config.discovery {
        eprintln!(
            "egress-webhook: note: this config has discovery: true; offline, NO_PROXY uses the \
             configured or default serviceCIDRs, podCIDRs and apiServer and only the Services in \
             the input, where the serving webhook uses what it discovers in the cluster"
        );
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
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let options = ServeOptions {
        config: args.config,
        tls,
        listen: args.listen,
        admin_listen: args.admin_listen,
        grace_period: args.grace_period,
        namespace,
        watch_pods: args.watch_pods,
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
    let validity = args.validity;
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
            // Every certificate setting comes from a flag: a usage error.
            eprintln!("egress-webhook: {e}");
            ExitCode::from(EXIT_USAGE)
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

/// The configuration file (or the defaults) for a webhook running in `namespace`.
fn load_config(path: Option<&PathBuf>, namespace: &str) -> Result<Config, ExitCode> {
    let result = match path {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    result.and_then(|c| c.in_namespace(namespace)).map_err(|e| {
        eprintln!("egress-webhook: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// What a preview runs on: the configuration, the cluster's facts and Services, and which
/// namespaces the webhook sees.
struct PreviewSetup {
    /// The webhook configuration in force.
    config: Config,
    /// Service and Pod CIDRs and API server addresses.
    facts: ClusterFacts,
    /// The cluster's Services by namespace (none offline).
    services: std::sync::Arc<dyn egress_webhook::admission::ServiceDirectory>,
    /// The webhook configuration's namespace selection (offline: deploy/base's exclusions).
    gate: Option<egress_webhook::cluster::NamespaceGate>,
    /// The kubeconfig context's namespace, for objects that name none (as kubectl).
    context_namespace: Option<String>,
}

/// The configuration and facts for an offline preview.
fn offline_setup(args: &InjectArgs) -> Result<PreviewSetup, ExitCode> {
    let config = load_config(args.config.as_ref(), &args.webhook_namespace)?;
    warn_offline_discovery(&config);
    Ok(PreviewSetup {
        facts: ClusterFacts::from_config(&config),
        config,
        services: std::sync::Arc::new(egress_webhook::admission::NoServices),
        gate: None,
        context_namespace: None,
    })
}

/// Where a cluster-aware command finds the cluster and the webhook's configuration.
struct ClusterSource<'a> {
    /// `--kubeconfig`.
    kubeconfig: Option<PathBuf>,
    /// `--context`.
    context: Option<String>,
    /// `--config`: a file instead of the live ConfigMap.
    config: Option<&'a PathBuf>,
    /// `--webhook-namespace`.
    webhook_namespace: &'a str,
    /// `--config-map`.
    config_map: &'a str,
    /// `--webhook-config-name`.
    webhook_config_name: &'a str,
}

impl<'a> From<&'a InjectArgs> for ClusterSource<'a> {
    fn from(args: &'a InjectArgs) -> Self {
        Self {
            kubeconfig: args.kubeconfig.clone(),
            context: args.context.clone(),
            config: args.config.as_ref(),
            webhook_namespace: &args.webhook_namespace,
            config_map: &args.config_map,
            webhook_config_name: &args.webhook_config_name,
        }
    }
}

impl<'a> From<&'a StatusArgs> for ClusterSource<'a> {
    fn from(args: &'a StatusArgs) -> Self {
        Self {
            kubeconfig: args.kubeconfig.clone(),
            context: args.context.clone(),
            config: args.config.as_ref(),
            webhook_namespace: &args.webhook_namespace,
            config_map: &args.config_map,
            webhook_config_name: &args.webhook_config_name,
        }
    }
}

/// The configuration and facts as the webhook serving the cluster has them, and the client.
async fn cluster_setup(args: &ClusterSource<'_>) -> Result<(PreviewSetup, kube::Client), ExitCode> {
    use egress_webhook::cluster::{self, ClusterError, ClusterTarget};
    let unavailable = |e: ClusterError| {
        eprintln!("egress-webhook: {e} (--offline previews without a cluster)");
        ExitCode::from(EXIT_UNAVAILABLE)
    };
    let target = ClusterTarget {
        kubeconfig: args.kubeconfig.clone(),
        context: args.context.clone(),
    };
    let client = cluster::client(&target).await.map_err(unavailable)?;
    let context_namespace = Some(client.default_namespace().to_string());
    let config = match args.config {
        Some(_) => load_config(args.config, args.webhook_namespace)?,
        None => {
            let ns = args.webhook_namespace;
            let text = match cluster::live_config(&client, ns, args.config_map).await {
                Ok(t) => t,
                Err(e @ ClusterError::NoConfig(_)) => {
                    eprintln!("egress-webhook: {e}");
                    return Err(ExitCode::from(EXIT_BAD_CONFIG));
                }
                Err(e) => return Err(unavailable(e)),
            };
            let origin = format!("ConfigMap {ns}/{}", args.config_map);
            Config::parse(&text, &origin)
                .and_then(|c| c.in_namespace(ns))
                .map_err(|e| {
                    eprintln!("egress-webhook: {e}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                })?
        }
    };
    let gate = cluster::NamespaceGate::read(&client, args.webhook_config_name)
        .await
        .map_err(unavailable)?;
    if !config.discovery {
        let setup = PreviewSetup {
            facts: ClusterFacts::from_config(&config),
            config,
            services: std::sync::Arc::new(egress_webhook::admission::NoServices),
            gate: Some(gate),
            context_namespace,
        };
        return Ok((setup, client));
    }
    let Some((found, services)) =
        egress_webhook::discovery::discover_once(client.clone(), DISCOVERY_TIMEOUT).await
    else {
        eprintln!(
            "egress-webhook: discovery did not finish listing the cluster within {DISCOVERY_TIMEOUT:?} (--offline previews without a cluster)"
        );
        return Err(ExitCode::from(EXIT_UNAVAILABLE));
    };
    let setup = PreviewSetup {
        facts: found.facts_for(&config),
        config,
        services,
        gate: Some(gate),
        context_namespace,
    };
    Ok((setup, client))
}

fn status(args: StatusArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("egress-webhook: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (setup, client) = match cluster_setup(&ClusterSource::from(&args)).await {
            Ok(s) => s,
            Err(code) => return code,
        };
        let injector = Injector::new(&setup.config, &setup.facts);
        let options = egress_webhook::status::StatusOptions {
            webhook_namespace: args.webhook_namespace.clone(),
            webhook_config_name: args.webhook_config_name.clone(),
            secret_name: args.secret_name.clone(),
            namespace: args.namespace.clone(),
        };
        let report = match egress_webhook::status::gather(
            &client,
            &injector,
            setup.services.as_ref(),
            &options,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("egress-webhook: {e}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        print!("{}", report.render());
        if report.problems().is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

fn inject(args: InjectArgs) -> ExitCode {
    let setup = if args.offline {
        offline_setup(&args)
    } else {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime
                .block_on(cluster_setup(&ClusterSource::from(&args)))
                .map(|(setup, _)| setup),
            Err(e) => {
                eprintln!("egress-webhook: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let PreviewSetup {
        config,
        facts,
        services,
        gate,
        context_namespace,
    } = match setup {
        Ok(s) => s,
        Err(code) => return code,
    };
    let inputs = match read_inputs(&args.files, args.recursive) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("egress-webhook: {e}");
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    let mut documents = Vec::new();
    for input in &inputs {
        match parse_source(&input.name, &input.text) {
            Ok(docs) => documents.extend(docs),
            Err(e) => {
                eprintln!("egress-webhook: {e}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    }
    let webhook_namespace = args.webhook_namespace.clone();
    let excluded = |ns: &str| match &gate {
        Some(gate) => gate.excludes(ns),
        None => shipped_exclusion(ns, &webhook_namespace),
    };
    let options = PreviewOptions {
        namespace: args.namespace.clone().or(context_namespace),
        excluded: &excluded,
        services: services.as_ref(),
    };
    let injector = Injector::new(&config, &facts);
    let result = match preview(&injector, documents, &options) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("egress-webhook: {e}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    for line in report_lines(&result, &config.inject_annotation) {
        eprintln!("{line}");
    }
    if result.objects.is_empty() {
        let names: Vec<_> = inputs.iter().map(|i| i.name.as_str()).collect();
        eprintln!(
            "egress-webhook: no Kubernetes object in {} (a manifest needs apiVersion and kind)",
            if names.is_empty() {
                "the input (no manifest files found)".to_string()
            } else {
                names.join(", ")
            }
        );
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    let format = match (args.diff, args.output) {
        (true, _) | (false, Output::Diff) => OutputFormat::Diff,
        (false, Output::Yaml) => OutputFormat::Yaml,
        (false, Output::Json) => OutputFormat::Json,
        (false, Output::JsonPatch) => OutputFormat::JsonPatch,
    };
    match render(&result, format) {
        Ok(out) => {
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
