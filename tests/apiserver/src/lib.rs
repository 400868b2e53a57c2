//! A real etcd and kube-apiserver for egress-gate's tests.
//!
//! [`ApiServer::shared`] starts one pair per test binary on free loopback ports, in a
//! temporary directory, and hands out clients, a kubeconfig and a namespace per test.
//! [`ApiServer::builder`] starts a separate pair with extra API server flags (a short
//! `--min-request-timeout`, say) that a test owns and stops on drop.
//!
//! The binary comes from `KUBE_APISERVER` (a path, optionally `.xz`) or from
//! `../shared/bin/kube-apiserver.xz` beside the checkout, decompressed once into the target
//! directory; etcd from `PATH` (Debian's `etcd-server`, which `scripts/test-deps.sh`
//! installs). When the binary is absent, [`ApiServer::start`] prints one skip line and
//! returns `Ok(None)`, unless `CI=true` or `REQUIRE_KUBE_APISERVER=1`: then it is an error.
//!
//! The servers stop, and the directory is removed, when the [`ApiServer`] is dropped and
//! also when the test binary exits or is killed with one still alive (see `watchdog`).

mod binary;
mod pki;
mod watchdog;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

pub use binary::{BUNDLED_SHA256, KUBE_APISERVER_ENV};

use crate::watchdog::Supervised;

/// Set to `1` to make a missing binary an error instead of a skip (`make test` sets it).
pub const REQUIRE_ENV: &str = "REQUIRE_KUBE_APISERVER";

/// How long the pair may take to answer `/readyz` (2-4 s is usual; a loaded CI machine
/// running several test binaries at once needs more).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// How often a start is retried when a server dies early: the free ports are probed and
/// released before the servers bind them, so another process may take one in between.
const START_ATTEMPTS: u32 = 3;

/// What can go wrong starting the servers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary or etcd is absent while `CI=true` or `REQUIRE_KUBE_APISERVER=1` demands
    /// them.
    #[error("the real-API-server tests are required here ({why}) but cannot run: {detail}")]
    Required {
        /// Which variable made it required.
        why: String,
        /// What is missing, and how to provide it.
        detail: String,
    },
    /// The binary exists but cannot be used (bad path, failed decompression, bad hash).
    #[error("kube-apiserver binary: {0}")]
    Binary(String),
    /// A program could not be run at all.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program, with a hint where that helps.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file in the temporary directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Generating the certificates or keys failed.
    #[error("certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// A server exited or never became ready.
    #[error("{what} did not start: {detail}")]
    Start {
        /// Which server.
        what: String,
        /// Why, usually with the tail of its log.
        detail: String,
    },
    /// A client could not be built or a request failed.
    #[error("kube: {0}")]
    Kube(#[from] kube::Error),
}

/// Extra flags for a dedicated API server; see [`ApiServer::builder`].
#[derive(Debug, Default, Clone)]
#[must_use]
pub struct Builder {
    /// Appended after the default flags; for single-valued flags the last one wins.
    args: Vec<String>,
}

impl Builder {
    /// Adds one kube-apiserver flag, e.g. `--min-request-timeout=3`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts etcd and kube-apiserver with these flags; see [`ApiServer::start`].
    pub fn start(self) -> Result<Option<ApiServer>, Error> {
        let required = required();
        let exe = match binary::locate()? {
            binary::Source::Found { path, bundled } => binary::executable(&path, bundled)?,
            binary::Source::Absent(detail) => {
                let hint = format!(
                    "{detail}; set {KUBE_APISERVER_ENV} to a kube-apiserver binary (or .xz of one)"
                );
                return skip_or_fail(required, hint);
            }
        };
        let Some(etcd) = binary::etcd() else {
            return skip_or_fail(
                required,
                "etcd is not on PATH (scripts/test-deps.sh installs Debian's etcd-server)".into(),
            );
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match ApiServer::start_once(&exe, &etcd, &self.args) {
                Ok(server) => return Ok(Some(server)),
                Err(e @ Error::Start { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Start {
            what: "kube-apiserver".into(),
            detail: "no attempt".into(),
        }))
    }
}

/// Which variable, if any, makes the binary required.
fn required() -> Option<String> {
    required_by(
        std::env::var("CI").ok().as_deref(),
        std::env::var(REQUIRE_ENV).ok().as_deref(),
    )
}

/// [`required`] given the values of `CI` and `REQUIRE_KUBE_APISERVER`.
fn required_by(ci: Option<&str>, require: Option<&str>) -> Option<String> {
    if ci == Some("true") {
        Some("CI=true".into())
    } else if require == Some("1") {
        Some(format!("{REQUIRE_ENV}=1"))
    } else {
        None
    }
}

/// The skip line, written past the test harness's output capture so it always shows.
fn skip_or_fail(required: Option<String>, detail: String) -> Result<Option<ApiServer>, Error> {
    if let Some(why) = required {
        return Err(Error::Required { why, detail });
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED real-API-server tests: {detail} ({REQUIRE_ENV}=1 or CI=true makes this an error)"
    );
    Ok(None)
}

/// A running etcd and kube-apiserver pair, with an admin identity.
#[derive(Debug)]
pub struct ApiServer {
    /// `https://127.0.0.1:PORT`.
    url: String,
    /// The CA that signed the API server's serving certificate (PEM).
    ca_pem: String,
    /// The same CA in DER, for kube's `Config::root_cert`.
    ca_der: Vec<u8>,
    /// A static token for `admin` in `system:masters`.
    token: String,
    /// An admin kubeconfig for `kubectl --kubeconfig` and `KUBECONFIG`.
    kubeconfig: PathBuf,
    /// The temporary directory holding certificates, tokens, etcd data and logs.
    dir: PathBuf,
    /// Dropped first: the API server must stop before its etcd.
    apiserver: Supervised,
    /// The kube-apiserver binary, for [`ApiServer::restart`].
    exe: PathBuf,
    /// Its flags, for [`ApiServer::restart`].
    args: Vec<String>,
    /// Removes `dir` after it stops.
    etcd: Supervised,
}

impl ApiServer {
    /// A builder for a dedicated pair with extra flags.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Starts a fresh etcd and kube-apiserver on free loopback ports and waits for
    /// `/readyz`. `Ok(None)` means skipped (the binary is absent and not required; one line
    /// on stderr says so). It blocks for the few seconds the servers take to start, doing
    /// its waiting on a thread of its own, so it may be called from async code too.
    pub fn start() -> Result<Option<ApiServer>, Error> {
        Builder::default().start()
    }

    /// The pair shared by every test in this test binary, started on first use. `None`
    /// when skipped.
    ///
    /// # Panics
    /// When the binary is required but absent, or the servers fail to start.
    pub fn shared() -> Option<&'static ApiServer> {
        static SHARED: OnceLock<Result<Option<ApiServer>, String>> = OnceLock::new();
        match SHARED.get_or_init(|| ApiServer::start().map_err(|e| e.to_string())) {
            Ok(server) => server.as_ref(),
            Err(e) => panic!("the shared kube-apiserver: {e}"),
        }
    }

    fn start_once(exe: &Path, etcd_bin: &Path, extra: &[String]) -> Result<ApiServer, Error> {
        let dir = temp_dir()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let [etcd_port, peer_port, secure_port] = free_ports()?;
        let pki = pki::Pki::generate()?;
        let token = random_token();
        let files = [
            ("ca.crt", pki.ca_pem.as_str()),
            ("apiserver.crt", pki.serving_cert_pem.as_str()),
            ("apiserver.key", pki.serving_key_pem.as_str()),
            ("sa.key", pki.sa_key_pem.as_str()),
            ("sa.pub", pki.sa_pub_pem.as_str()),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).map_err(io(&dir.join(name)))?;
        }
        let tokens = dir.join("tokens.csv");
        std::fs::write(&tokens, format!("{token},admin,admin,\"system:masters\"\n"))
            .map_err(io(&tokens))?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = [
            "--name=default".to_string(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--log-level=warn".into(),
        ];
        let etcd = Supervised::spawn(etcd_bin, &etcd_args, dir.join("etcd.log"), Some(&dir))?;

        let path = |name: &str| dir.join(name).display().to_string();
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={secure_port}"),
            format!("--cert-dir={}", path("certs")),
            format!("--tls-cert-file={}", path("apiserver.crt")),
            format!("--tls-private-key-file={}", path("apiserver.key")),
            format!("--token-auth-file={}", path("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--anonymous-auth=false".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/12".into(),
            "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--endpoint-reconciler-type=none".into(),
        ];
        args.extend(extra.iter().cloned());
        // The directory goes with etcd: a restarted API server keeps it.
        let apiserver = Supervised::spawn(exe, &args, dir.join("kube-apiserver.log"), None)?;

        let url = format!("https://127.0.0.1:{secure_port}");
        let kubeconfig = dir.join("kubeconfig");
        let server = ApiServer {
            url,
            ca_pem: pki.ca_pem,
            ca_der: pki.ca_der,
            token,
            kubeconfig,
            dir,
            apiserver,
            exe: exe.to_path_buf(),
            args,
            etcd,
        };
        server.write_kubeconfig(&server.kubeconfig, &server.token)?;
        server.wait_ready()?;
        Ok(server)
    }

    /// Stops the API server and starts it again on the same port and etcd, as an upgrade
    /// or a crash would: every open connection and watch is cut, the stored objects stay.
    /// Returns once `/readyz` answers again.
    pub fn restart(&mut self) -> Result<(), Error> {
        let log = self.dir.join("kube-apiserver.log");
        let previous = std::fs::read(&log).unwrap_or_default();
        // Waits for it to be gone, so the port is free.
        self.apiserver.stop();
        let earlier = self.dir.join("kube-apiserver.before-restart.log");
        std::fs::write(&earlier, previous).map_err(|source| Error::Io {
            path: earlier,
            source,
        })?;
        self.apiserver = Supervised::spawn(&self.exe, &self.args, log, None)?;
        self.wait_ready()
    }

    /// Polls `/readyz` from a thread with its own runtime (the caller may be inside one).
    fn wait_ready(&self) -> Result<(), Error> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|source| Error::Spawn {
                            program: "a tokio runtime".into(),
                            source,
                        })?;
                    runtime.block_on(self.poll_ready())
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::Start {
                        what: "kube-apiserver".into(),
                        detail: "the readiness poll panicked".into(),
                    })
                })
        })
    }

    async fn poll_ready(&self) -> Result<(), Error> {
        let client = self.try_client_with_token(&self.token)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            for (name, process) in [("etcd", &self.etcd), ("kube-apiserver", &self.apiserver)] {
                if !process.is_running() {
                    return Err(Error::Start {
                        what: name.into(),
                        detail: format!("it exited; {}", process.log_tail(4000)),
                    });
                }
            }
            let request = http_get("/readyz")?;
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(Error::Start {
                    what: "kube-apiserver".into(),
                    detail: format!(
                        "/readyz not ok after {READY_TIMEOUT:?} (last: {last}); {}",
                        self.apiserver.log_tail(4000)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new admin client. Call it inside the tokio runtime that will use it (each
    /// `#[tokio::test]` has its own; a client outlives neither).
    ///
    /// # Panics
    /// When the client cannot be built (which only a broken TLS setup causes).
    pub fn client(&self) -> kube::Client {
        self.client_with_token(&self.token)
    }

    /// A new client that authenticates with `token` (a ServiceAccount's, say).
    ///
    /// # Panics
    /// As [`ApiServer::client`].
    pub fn client_with_token(&self, token: &str) -> kube::Client {
        self.try_client_with_token(token)
            .unwrap_or_else(|e| panic!("a kube client for {}: {e}", self.url))
    }

    fn try_client_with_token(&self, token: &str) -> Result<kube::Client, Error> {
        let uri = self.url.parse().map_err(|e| Error::Start {
            what: "kube-apiserver".into(),
            detail: format!("url {}: {e}", self.url),
        })?;
        let mut config = kube::Config::new(uri);
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.auth_info.token = Some(secrecy::SecretString::from(token.to_string()));
        Ok(kube::Client::try_from(config)?)
    }

    /// An admin kubeconfig file (`kubectl --kubeconfig`, or `KUBECONFIG` for a binary).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for this server that authenticates with `token`, in this
    /// server's directory, and returns its path.
    pub fn kubeconfig_with_token(&self, token: &str) -> Result<PathBuf, Error> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = self.dir.join(format!(
            "kubeconfig-{}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        self.write_kubeconfig(&path, token)?;
        Ok(path)
    }

    fn write_kubeconfig(&self, path: &Path, token: &str) -> Result<(), Error> {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        // JSON is YAML: kubectl and kube-rs both read it.
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "default"}}],
            "current-context": "test",
        });
        std::fs::write(path, doc.to_string()).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA (PEM) that signed the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The admin bearer token (`system:masters`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The API server's log (flags, errors, webhook calls it failed).
    pub fn log_path(&self) -> &Path {
        self.apiserver.log_path()
    }

    /// Creates a namespace named `<prefix>-<random>` for one test and returns its name.
    ///
    /// # Panics
    /// When the API server refuses (an invalid prefix, say).
    pub async fn namespace(&self, prefix: &str) -> String {
        let api: Api<Namespace> = Api::all(self.client());
        let ns = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = api
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating a namespace {prefix}-*: {e}"));
        created
            .metadata
            .name
            .unwrap_or_else(|| panic!("the created namespace {prefix}-* has no name"))
    }

    /// A bearer token for ServiceAccount `namespace/name` (created when absent), valid for
    /// an hour, through the TokenRequest API: a test runs code as that account, bound by
    /// exactly the RBAC it was granted.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<String, Error> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match api.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let issued = api
            .create_token_request(name, &PostParams::default(), &request)
            .await?;
        issued
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| Error::Start {
                what: "TokenRequest".into(),
                detail: format!("no token for {namespace}/{name}"),
            })
    }

    /// The API server's Prometheus metrics text (`GET /metrics` as admin).
    pub async fn metrics(&self) -> Result<String, Error> {
        Ok(self.client().request_text(http_get("/metrics")?).await?)
    }
}

/// A GET request for a path on the API server.
fn http_get(path: &str) -> Result<http::Request<Vec<u8>>, Error> {
    http::Request::get(path)
        .body(Vec::new())
        .map_err(|e| Error::Start {
            what: "a request".into(),
            detail: format!("GET {path}: {e}"),
        })
}

/// A fresh private directory, on tmpfs when there is one (etcd syncs a lot).
fn temp_dir() -> Result<PathBuf, Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "egress-gate-apiserver-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Three ports free on 127.0.0.1 now (held together so they differ).
fn free_ports() -> Result<[u16; 3], Error> {
    let bind = || {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| Ok((l.local_addr()?.port(), l)))
            .map_err(|source| Error::Io {
                path: "127.0.0.1:0".into(),
                source,
            })
    };
    let (a, _la) = bind()?;
    let (b, _lb) = bind()?;
    let (c, _lc) = bind()?;
    Ok([a, b, c])
}

/// A bearer token no other run can guess: hashed from the time, the pid and a counter.
fn random_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hash = Sha256::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hash.update(now.to_le_bytes());
    hash.update(std::process::id().to_le_bytes());
    hash.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    binary::hex(&hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_or_the_require_variable_turn_a_skip_into_an_error() {
        assert_eq!(required_by(None, None), None);
        assert_eq!(required_by(Some("false"), Some("0")), None);
        assert_eq!(required_by(Some("true"), None).as_deref(), Some("CI=true"));
        assert_eq!(
            required_by(None, Some("1")).as_deref(),
            Some("REQUIRE_KUBE_APISERVER=1")
        );

        assert!(matches!(skip_or_fail(None, "absent".into()), Ok(None)));
        let error = skip_or_fail(Some("CI=true".into()), "x is not set".into()).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("(CI=true)") && message.ends_with("x is not set"),
            "{message}"
        );
    }
}
