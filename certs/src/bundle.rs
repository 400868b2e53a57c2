//! `egress-webhook certs`: a CA and serving certificate made once, by hand, for admins who
//! manage the Secret themselves (GitOps, sealed secrets) instead of `serve --self-signed`.
//!
//! Output is either three PEM files (`ca.crt`, `tls.crt`, `tls.key`) or a `kubernetes.io/tls`
//! Secret manifest; either way the base64 `caBundle` for the MutatingWebhookConfiguration is
//! printed too.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::Serialize;

use crate::CertError;
use crate::pki::ServiceIdentity;
use crate::renewal::{CA_CERT_KEY, CA_KEY_KEY, CertPolicy, StoredCerts, TLS_CERT_KEY, TLS_KEY_KEY};

/// The Secret name the manifests and `serve --secret-name` use.
pub const DEFAULT_SECRET_NAME: &str = "egress-webhook-tls";

/// Where [`write_bundle`] puts the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleOutput {
    /// PEM files in this directory (created if missing): `ca.crt`, `tls.crt`, `tls.key`
    /// (mode 0600), and `ca.key` (0600) when asked for. Existing files are overwritten.
    Dir(PathBuf),
    /// A `kubernetes.io/tls` Secret manifest in the identity's namespace, written to the
    /// output stream, followed by a comment line with the `caBundle`.
    SecretManifest {
        /// `metadata.name` of the Secret.
        secret_name: String,
    },
}

/// Everything `egress-webhook certs` takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleRequest {
    /// The Service and the names the certificate carries.
    pub identity: ServiceIdentity,
    /// Lifetime of the serving certificate (`--validity`, default 365 days). The CA lives
    /// [`CertPolicy::default`]'s CA validity or `validity`, whichever is longer.
    pub validity: Duration,
    /// Also output the CA's private key (`ca.key`), so that `serve --self-signed` can later
    /// renew under this CA. Off by default: without it the key exists nowhere after the
    /// command ends, and a leaked Secret cannot mint new certificates.
    pub include_ca_key: bool,
    /// Where to write.
    pub output: BundleOutput,
}

impl BundleRequest {
    /// A request for `service` in `namespace` with the defaults: 365 days, the Secret
    /// manifest named [`DEFAULT_SECRET_NAME`], no CA key.
    pub fn new(service: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            identity: ServiceIdentity::new(service, namespace),
            validity: CertPolicy::default().serving_validity,
            include_ca_key: false,
            output: BundleOutput::SecretManifest {
                secret_name: DEFAULT_SECRET_NAME.to_owned(),
            },
        }
    }
}

/// A generated CA and serving certificate, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The CA certificate (`ca.crt`).
    pub ca_cert_pem: String,
    /// The CA's private key (`ca.key`).
    pub ca_key_pem: String,
    /// The serving certificate (`tls.crt`).
    pub cert_pem: String,
    /// The serving certificate's private key (`tls.key`).
    pub key_pem: String,
    /// `ca.crt` base64-encoded: the value of `caBundle` in the webhook configuration.
    pub ca_bundle_base64: String,
}

/// What [`write_bundle`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleSummary {
    /// The `caBundle` value (base64 of the CA PEM).
    pub ca_bundle_base64: String,
    /// The files written ([`BundleOutput::Dir`] only).
    pub files: Vec<PathBuf>,
    /// When the serving certificate expires.
    pub not_after: SystemTime,
}

/// Generates a CA and a serving certificate for `request` at `now`, without writing anything.
pub fn generate_bundle(request: &BundleRequest, now: SystemTime) -> Result<Bundle, CertError> {
    let defaults = CertPolicy::default();
    let policy = CertPolicy {
        serving_validity: request.validity,
        ca_validity: defaults.ca_validity.max(request.validity),
        // Windows only matter to renewal; keep them valid for any requested validity.
        renew_before: (request.validity / 2).min(defaults.renew_before),
        ca_rollover_before: (request.validity / 2).min(defaults.ca_rollover_before),
        ..defaults
    };
    let certs = StoredCerts::generate(&request.identity, &policy, now)?;
    let (Some(ca), Some(serving)) = (&certs.ca, &certs.serving) else {
        return Err(CertError::Invalid(
            "generation produced no certificate".into(),
        ));
    };
    let ca_cert_pem = ca.cert_pem();
    Ok(Bundle {
        ca_bundle_base64: base64::engine::general_purpose::STANDARD.encode(&ca_cert_pem),
        ca_cert_pem,
        ca_key_pem: ca.key_pem(),
        cert_pem: serving.cert_pem().to_owned(),
        key_pem: serving.key_pem().to_owned(),
    })
}

/// The `egress-webhook certs` command: generates at the current time and writes what
/// `request.output` asks for. [`BundleOutput::SecretManifest`] writes the manifest to `out`;
/// [`BundleOutput::Dir`] writes files and one line per file to `out`. Either way `out` ends
/// with the `caBundle` (a YAML comment after the manifest), and the summary carries it too.
pub fn write_bundle(
    request: &BundleRequest,
    out: &mut dyn Write,
) -> Result<BundleSummary, CertError> {
    let bundle = generate_bundle(request, SystemTime::now())?;
    let not_after = crate::pki::CertInfo::from_der(
        crate::pki::parse_certificates(&bundle.cert_pem, TLS_CERT_KEY)?
            .first()
            .ok_or_else(|| CertError::parse(TLS_CERT_KEY, "empty"))?,
    )?
    .not_after;
    let stdout_err = |source| CertError::Write {
        path: PathBuf::from("<output>"),
        source,
    };
    let mut files = Vec::new();
    match &request.output {
        BundleOutput::Dir(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
                path: dir.clone(),
                source,
            })?;
            let mut wanted = vec![
                (CA_CERT_KEY, &bundle.ca_cert_pem, false),
                (TLS_CERT_KEY, &bundle.cert_pem, false),
                (TLS_KEY_KEY, &bundle.key_pem, true),
            ];
            if request.include_ca_key {
                wanted.push((CA_KEY_KEY, &bundle.ca_key_pem, true));
            }
            for (name, pem, secret) in wanted {
                let path = dir.join(name);
                write_file(&path, pem, secret)?;
                writeln!(out, "wrote {}", path.display()).map_err(stdout_err)?;
                files.push(path);
            }
            writeln!(out, "caBundle: {}", bundle.ca_bundle_base64).map_err(stdout_err)?;
        }
        BundleOutput::SecretManifest { secret_name } => {
            let manifest = secret_manifest(request, secret_name, &bundle)?;
            out.write_all(manifest.as_bytes()).map_err(stdout_err)?;
            writeln!(
                out,
                "# caBundle for MutatingWebhookConfiguration webhooks[].clientConfig.caBundle:\n# {}",
                bundle.ca_bundle_base64
            )
            .map_err(stdout_err)?;
        }
    }
    Ok(BundleSummary {
        ca_bundle_base64: bundle.ca_bundle_base64,
        files,
        not_after,
    })
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SecretManifest<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata<'a>,
    #[serde(rename = "type")]
    type_: &'static str,
    data: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'a str,
    namespace: &'a str,
    labels: BTreeMap<&'static str, &'static str>,
}

/// The Secret as YAML: `tls.crt`, `tls.key`, `ca.crt` (and `ca.key` when asked), base64.
fn secret_manifest(
    request: &BundleRequest,
    secret_name: &str,
    bundle: &Bundle,
) -> Result<String, CertError> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut data = BTreeMap::new();
    data.insert(TLS_CERT_KEY, b64(&bundle.cert_pem));
    data.insert(TLS_KEY_KEY, b64(&bundle.key_pem));
    data.insert(CA_CERT_KEY, b64(&bundle.ca_cert_pem));
    if request.include_ca_key {
        data.insert(CA_KEY_KEY, b64(&bundle.ca_key_pem));
    }
    let manifest = SecretManifest {
        api_version: "v1",
        kind: "Secret",
        metadata: Metadata {
            name: secret_name,
            namespace: &request.identity.namespace,
            labels: BTreeMap::from([("app.kubernetes.io/part-of", "egress-gate")]),
        },
        type_: crate::bootstrap::SECRET_TYPE,
        data,
    };
    serde_yaml_ng::to_string(&manifest).map_err(|e| CertError::Render(e.to_string()))
}
