//! The drift watch's side of the benchmark: a real etcd + kube-apiserver holding many pods
//! in opted-in namespaces, a churn of pod creations, updates and deletions while admission
//! is measured, and the admission server that runs `serve --watch-pods`'s detector
//! ([`egress_webhook::drift::start`]) against that API server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use egress_gate_apiserver::ApiServer;
use egress_webhook::admission::{NoServices, ServiceDirectory};
use egress_webhook::drift::{self, DriftHandle, OPT_IN_LABEL, OPT_IN_VALUE};
use egress_webhook::engine::{Injector, Operation, PodContext};
use egress_webhook::metrics::Metrics;
use egress_webhook::server::{admission_router, serve_tls};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ThreadCpu;

/// Opted-in namespaces the pods are spread over (as in the memory measurement of the watch,
/// `pod_watch_memory_per_pod` in webhook/tests/apiserver_drift.rs).
pub const NAMESPACES: usize = 50;
/// Every this-many-th pod is created bare (no status annotation), as if admitted while the
/// webhook was down: the detector logs and counts those, and the rest take the hash check.
const BARE_EVERY: usize = 10;
/// Pod creations in flight at once while filling the API server.
const CREATE_CONCURRENCY: usize = 64;
/// Churn pods alive at once: each tick deletes the one created this many ticks before.
const CHURN_WINDOW: u64 = 20;
/// How long the detector may take to list every pod before the harness counts as broken.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// The webhook's own namespace, as `serve --namespace` gives it to the detector.
const OWN_NAMESPACE: &str = "egress-gate";

/// The API server, filled.
pub struct Cluster {
    /// The etcd + kube-apiserver pair; stops on drop.
    pub server: ApiServer,
    /// The opted-in namespaces, `pg-{i}` living in `namespaces[i % NAMESPACES]`.
    pub namespaces: Vec<String>,
    /// Pods created (`pg-0` ..).
    pub pods: usize,
    /// How long creating them took.
    pub fill_seconds: f64,
}

/// Starts an API server and creates `pods` pods in [`NAMESPACES`] opted-in namespaces: nine
/// in ten as the webhook would have admitted them (its patch applied, status annotation
/// included), one in ten bare. `None` when the kube-apiserver binary is absent and not
/// required (one line on stderr says so).
pub fn fill(injector: &Injector, pods: usize) -> Option<Cluster> {
    let server = match ApiServer::start() {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => panic!("the drift scenarios need a kube-apiserver: {e}"),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let namespaces = rt.block_on(async {
        let client = server.client();
        let api: Api<Namespace> = Api::all(client.clone());
        let mut names = Vec::new();
        for i in 0..NAMESPACES {
            let name = format!("bench-{i}");
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {OPT_IN_LABEL: OPT_IN_VALUE}}
            }))
            .unwrap();
            api.create(&PostParams::default(), &ns).await.unwrap();
            names.push(name);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..pods {
            while tasks.len() >= CREATE_CONCURRENCY {
                tasks.join_next().await.unwrap().unwrap();
            }
            let ns = &names[i % NAMESPACES];
            let pod = pod(injector, ns, &format!("pg-{i}"), i % BARE_EVERY != 0);
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            tasks.spawn(async move {
                api.create(&PostParams::default(), &pod).await.unwrap();
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        names
    });
    Some(Cluster {
        server,
        namespaces,
        pods,
        fill_seconds: started.elapsed().as_secs_f64(),
    })
}

/// A CNPG instance pod named `name` (no kubelet runs it), with the webhook's patch applied
/// when `injected`.
fn pod(injector: &Injector, namespace: &str, name: &str, injected: bool) -> Pod {
    let mut pod = json!({
        "metadata": {"name": name, "labels": {
            "cnpg.io/podRole": "instance", "cnpg.io/cluster": "pg", "cnpg.io/instanceName": name}},
        "spec": {"containers": [{"name": "postgres", "image": "pg"}]},
    });
    if injected {
        let ctx = PodContext {
            namespace,
            operation: Operation::Create,
            services: &[],
        };
        let mutation = injector.review(&pod, &ctx).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(mutation.patch.as_bytes()).unwrap();
        json_patch::patch(&mut pod, &patch).unwrap();
    }
    serde_json::from_value::<Pod>(pod).unwrap()
}

/// Pod churn on a thread of its own while it lives: every tick one pod is created
/// (injected), one existing pod's label is changed and the churn pod of [`CHURN_WINDOW`]
/// ticks ago is deleted, so the detector sees adds, updates and deletes.
pub struct Churn {
    /// Set to stop the loop.
    stop: Arc<AtomicBool>,
    /// Operations that succeeded, and that failed.
    counts: Arc<[AtomicU64; 2]>,
    /// When it started, for the achieved rate.
    started: Instant,
    /// The loop's thread.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    /// Starts `ticks_per_second` ticks of three writes each.
    pub fn start(cluster: &Cluster, injector: Arc<Injector>, ticks_per_second: f64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            let namespaces = cluster.namespaces.clone();
            let pods = cluster.pods.max(1);
            let client_source = ClientSource::of(&cluster.server);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let client = client_source.client();
                    tx.send(()).unwrap();
                    let mut tick =
                        tokio::time::interval(Duration::from_secs_f64(1.0 / ticks_per_second));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let count = |ok: bool| counts[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
                    let mut i: u64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let ns = &namespaces[(i as usize) % namespaces.len()];
                        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
                        let name = format!("churn-{i}");
                        let new = pod(&injector, ns, &name, true);
                        count(api.create(&PostParams::default(), &new).await.is_ok());
                        // A label change on one of the filled pods: an update event.
                        let target = (i as usize).wrapping_mul(7919) % pods;
                        let api: Api<Pod> =
                            Api::namespaced(client.clone(), &namespaces[target % namespaces.len()]);
                        let label = json!({"metadata": {"labels": {"churn": i.to_string()}}});
                        count(
                            api.patch(
                                &format!("pg-{target}"),
                                &PatchParams::default(),
                                &Patch::Merge(label),
                            )
                            .await
                            .is_ok(),
                        );
                        if let Some(old) = i.checked_sub(CHURN_WINDOW) {
                            let api: Api<Pod> = Api::namespaced(
                                client.clone(),
                                &namespaces[(old as usize) % namespaces.len()],
                            );
                            let gone = api
                                .delete(
                                    &format!("churn-{old}"),
                                    &DeleteParams::default().grace_period(0),
                                )
                                .await;
                            count(gone.is_ok());
                        }
                        i += 1;
                    }
                });
            })
        };
        rx.recv().unwrap();
        Self {
            stop,
            counts,
            started: Instant::now(),
            thread: Some(thread),
        }
    }

    /// Stops the loop; returns (writes per second that succeeded, writes that failed).
    pub fn stop(mut self) -> (f64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let ok = self.counts[0].load(Ordering::Relaxed);
        let failed = self.counts[1].load(Ordering::Relaxed);
        assert!(
            ok > 0,
            "the pod churn wrote nothing ({failed} failed writes)"
        );
        (ok as f64 / self.started.elapsed().as_secs_f64(), failed)
    }
}

/// What a thread needs to build its own admin client for the API server (a kube client
/// belongs to the runtime it was built in).
#[derive(Clone)]
struct ClientSource {
    /// `https://127.0.0.1:PORT`.
    url: String,
    /// The API server's CA, PEM.
    ca_pem: String,
    /// The admin token.
    token: String,
}

impl ClientSource {
    fn of(server: &ApiServer) -> Self {
        Self {
            url: server.url().to_string(),
            ca_pem: server.ca_pem().to_string(),
            token: server.token().to_string(),
        }
    }

    /// The client configuration, for `drift::start`, which builds its client on its own thread.
    fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().unwrap());
        let der = pem_to_der(&self.ca_pem);
        config.root_cert = Some(vec![der]);
        config.auth_info.token = Some(self.token.clone().into());
        config
    }

    /// A client; call inside the runtime that will use it.
    fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).unwrap()
    }
}

/// The DER bytes of the one certificate in `pem`.
fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The admission server with the drift detector running beside it, as `serve --watch-pods`
/// runs them: one process, one metrics registry, the detector on its own thread and runtime.
pub struct WatchingServer {
    /// Where it serves admission reviews.
    pub addr: std::net::SocketAddr,
    /// The detector's tracker, to wait for its first listing.
    pub handle: DriftHandle,
    /// CPU of the server thread.
    pub cpu: ThreadCpu,
    /// CPU of the detector's thread (`drift::THREAD_NAME`).
    pub detector_cpu: ThreadCpu,
    /// Seconds from the detector's start to its first complete listing.
    pub sync_seconds: f64,
}

/// Starts the server on a thread of its own (a current-thread runtime, as the watch-off
/// server) and waits until the detector has listed every filled pod.
pub fn start_watching_server(
    cluster: &Cluster,
    injector: Arc<Injector>,
    tls: tokio_rustls::TlsAcceptor,
) -> WatchingServer {
    let (tx, rx) = std::sync::mpsc::channel();
    let source = ClientSource::of(&cluster.server);
    std::thread::spawn(move || {
        let cpu = ThreadCpu::current();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let metrics = Arc::new(Metrics::default());
            let (_injector_tx, injector_rx) = watch::channel(injector);
            let services: Arc<dyn ServiceDirectory> = Arc::new(NoServices);
            let started = Instant::now();
            let handle = drift::start(
                source.config(),
                OWN_NAMESPACE,
                injector_rx.clone(),
                Arc::clone(&services),
                Arc::clone(&metrics),
            )
            .unwrap();
            let router = admission_router(injector_rx, services, metrics);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send((listener.local_addr().unwrap(), handle, cpu, started))
                .unwrap();
            let (_stop_tx, stop) = watch::channel(false);
            serve_tls(listener, tls, router, stop, Duration::from_secs(1)).await;
        });
    });
    let (addr, handle, cpu, started) = rx.recv().unwrap();
    let expected = cluster.pods as u64;
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let selected: u64 = {
            let tracker = drift::lock(&handle.tracker);
            if tracker.synced() {
                tracker.counts().values().map(|c| c.selected).sum()
            } else {
                0
            }
        };
        // Churn pods are not running yet: exactly the filled ones.
        if selected == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the drift watch listed {selected} of {expected} pods in {SYNC_TIMEOUT:?}"
        );
        #[allow(clippy::disallowed_methods)] // the bench's main thread: no runtime to block
        std::thread::sleep(Duration::from_millis(100));
    }
    WatchingServer {
        addr,
        handle,
        cpu,
        detector_cpu: ThreadCpu::named(drift::THREAD_NAME).expect("the drift detector's thread"),
        sync_seconds: started.elapsed().as_secs_f64(),
    }
}

/// The pods the detector counts now, for the report: (selected, uninjected).
pub fn counted(handle: &DriftHandle) -> (u64, u64) {
    let counts = drift::lock(&handle.tracker).counts();
    counts
        .values()
        .fold((0, 0), |(s, u), c| (s + c.selected, u + c.uninjected))
}
