//! `egress-proxy blob client-config`: a fresh random client key for a virtual account and,
//! ready to apply, everything a workload needs to use it: the CloudNativePG connection-string
//! Secret and `ObjectStore`, and the Velero credentials Secret and `BackupStorageLocation`.
//! Nobody should have to assemble a connection string by hand.

use std::fmt::Write as _;
use std::io::Read as _;
use std::process::ExitCode;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use egress_proxy::Config;
use egress_proxy::config::BlobAccountConfig;

/// Bytes of a generated client key: Azure's own account keys are 64 bytes, so clients and
/// tools that check a key's shape accept it.
const KEY_BYTES: usize = 64;
/// sysexits' EX_USAGE: the account or the config does not allow the command.
const EX_USAGE: u8 = 64;
/// sysexits' EX_OSERR: no randomness to make a key from.
const EX_OSERR: u8 = 71;
/// The key the Velero Azure plugin reads from its credentials file
/// (`storageAccountKeyEnvVar` names it).
const VELERO_KEY_VAR: &str = "AZURE_STORAGE_ACCOUNT_ACCESS_KEY";

/// Where clients reach the gateway, and what the printed objects are called.
#[derive(Debug, clap::Args)]
pub struct ClientConfigArgs {
    /// The virtual account (`blob.accounts[].name`).
    #[arg(long)]
    account: String,
    /// The gateway's base URL as clients see it; default: the `egress-gate-blob` Service in
    /// `--namespace`, HTTPS on the `blob.tls` port if there is one, else HTTP on `blob.listen`'s.
    #[arg(long)]
    endpoint: Option<String>,
    /// Namespace of the gateway's Service, for the default endpoint.
    #[arg(long, default_value = "egress-gate")]
    namespace: String,
    /// Secret in the workload's namespace holding the gateway's CA (`ca.crt`), for HTTPS.
    #[arg(long, default_value = "egress-gate-blob-ca")]
    ca_secret: String,
}

/// Prints the key and the objects; exit 64 when the account is not configured.
pub fn client_config(config: &Config, args: &ClientConfigArgs) -> ExitCode {
    let Some(blob) = &config.blob else {
        eprintln!("egress-proxy: the config has no blob: section");
        return ExitCode::from(EX_USAGE);
    };
    let Some(account) = blob.accounts.iter().find(|a| a.name == args.account) else {
        let names: Vec<&str> = blob.accounts.iter().map(|a| a.name.as_str()).collect();
        eprintln!(
            "egress-proxy: no account {:?} in blob.accounts (configured: {})",
            args.account,
            names.join(", ")
        );
        return ExitCode::from(EX_USAGE);
    };
    let endpoint = match &args.endpoint {
        Some(e) => e.trim_end_matches('/').to_owned(),
        None => {
            let service = format!("egress-gate-blob.{}.svc", args.namespace);
            match (&blob.tls, blob.listen) {
                (Some(t), _) => format!("https://{service}:{}", t.listen.port()),
                (None, Some(l)) => format!("http://{service}:{}", l.port()),
                (None, None) => {
                    eprintln!("egress-proxy: blob has no listener");
                    return ExitCode::from(EX_USAGE);
                }
            }
        }
    };
    let key = match random_key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("egress-proxy: cannot read /dev/urandom: {e}");
            return ExitCode::from(EX_OSERR);
        }
    };
    eprintln!(
        "egress-proxy: a new client key for {}: write it to {} (the gateway re-reads it on reload), then apply the objects below in the workload's namespace",
        account.name,
        account.client_key_file.display()
    );
    print!("{}", render(account, &endpoint, &key, &args.ca_secret));
    ExitCode::SUCCESS
}

/// 64 random bytes, base64.
fn random_key() -> std::io::Result<String> {
    let mut bytes = [0u8; KEY_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(BASE64.encode(bytes))
}

/// The YAML stream: key comment, CNPG Secret and ObjectStore, Velero Secret and BSL.
fn render(account: &BlobAccountConfig, endpoint: &str, key: &str, ca_secret: &str) -> String {
    let name = &account.name;
    let container = account.containers.first().map_or("", String::as_str);
    let https = endpoint.starts_with("https://");
    let protocol = if https { "https" } else { "http" };
    let connection = format!(
        "DefaultEndpointsProtocol={protocol};AccountName={name};AccountKey={key};BlobEndpoint={endpoint}/{name};"
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Client key of virtual account {name} (gateway side: {}):",
        account.client_key_file.display()
    );
    let _ = writeln!(out, "#   {key}");
    let _ = writeln!(
        out,
        "# CloudNativePG (plugin-barman-cloud ObjectStore; for the in-tree barmanObjectStore use the same"
    );
    let _ = writeln!(
        out,
        "# destinationPath, endpointCA and azureCredentials under spec.backup.barmanObjectStore)."
    );
    let _ = writeln!(
        out,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-blob\nstringData:"
    );
    let _ = writeln!(out, "  AZURE_STORAGE_CONNECTION_STRING: \"{connection}\"");
    let _ = writeln!(
        out,
        "---\napiVersion: barmancloud.cnpg.io/v1\nkind: ObjectStore\nmetadata:\n  name: {name}\nspec:\n  configuration:"
    );
    let _ = writeln!(out, "    destinationPath: {endpoint}/{name}/{container}/");
    if https {
        let _ = writeln!(out, "    endpointCA: {{name: {ca_secret}, key: ca.crt}}");
    }
    let _ = writeln!(
        out,
        "    azureCredentials:\n      connectionString: {{name: {name}-blob, key: AZURE_STORAGE_CONNECTION_STRING}}"
    );
    let _ = writeln!(
        out,
        "---\n# Velero (namespace velero): the credentials file, then the BackupStorageLocation."
    );
    let _ = writeln!(
        out,
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}-velero\nstringData:"
    );
    let _ = writeln!(out, "  cloud: |\n    {VELERO_KEY_VAR}={key}");
    let _ = writeln!(
        out,
        "---\napiVersion: velero.io/v1\nkind: BackupStorageLocation\nmetadata:\n  name: {name}\nspec:\n  provider: velero.io/azure"
    );
    let _ = write!(out, "  objectStorage:\n    bucket: {container}\n");
    if https {
        let _ = writeln!(out, "    caCertRef: {{name: {ca_secret}, key: ca.crt}}");
    }
    let _ = writeln!(
        out,
        "  credential: {{name: {name}-velero, key: cloud}}\n  config:"
    );
    let _ = writeln!(
        out,
        "    storageAccount: {name}\n    storageAccountURI: {endpoint}/{name}\n    storageAccountKeyEnvVar: {VELERO_KEY_VAR}"
    );
    out
}
