//! What the identity index costs per pod: the process's resident memory with 50,000
//! CNPG-like pods indexed, against the same process before (issue 14: at most 1 KiB a pod;
//! 884 bytes measured with the slim wire type, packed labels and inline claimants).
//! A measurement, not a pass/fail on a shared machine's timing: run it alone with
//! `cargo test --release -p egress-proxy --test identity_memory -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};

use egress_proxy::identity::index::{IndexFeeder, PodEvent, SlimPod};
use egress_proxy::identity::watch::slim;
use egress_proxy::identity::wire::WatchedPod;

/// Pods indexed, as the benchmark asks.
const PODS: u32 = 50_000;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A pod as CNPG creates it (about ten labels, a generated name, one address), as the API
/// server would send it (with the fields the watch skips), read and reduced by the watch's
/// own code.
fn cnpg_pod(i: u32) -> SlimPod {
    let cluster = format!("pg-{}", i / 3);
    let role = if i.is_multiple_of(3) {
        "primary"
    } else {
        "replica"
    };
    let instance = format!("{cluster}-{}", i % 3 + 1);
    let json = serde_json::json!({
        "metadata": {
            "uid": format!("{:08x}-1c2d-4e5f-8a9b-{:012x}", i, u64::from(i) * 7919),
            "namespace": format!("db-{}", i / 300),
            "name": instance,
            "labels": {
                "cnpg.io/cluster": cluster,
                "cnpg.io/instanceName": instance,
                "cnpg.io/instanceRole": role,
                "cnpg.io/podRole": "instance",
                "role": role,
                "egress-gate.io/client": "true",
                "app.kubernetes.io/name": "postgresql",
                "app.kubernetes.io/managed-by": "cloudnative-pg",
                "cnpg.io/jobRole": "none"
            }
        },
        "spec": {"serviceAccountName": cluster, "containers": [{"name": "postgres", "image": "ghcr.io/cloudnative-pg/postgresql:17"}]},
        "status": {
            "phase": "Running",
            "podIPs": [{"ip": IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i)).to_string()}],
            "hostIPs": [{"ip": IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i / 30)).to_string()}]
        }
    })
    .to_string();
    let pod: WatchedPod = serde_json::from_str(&json).unwrap();
    slim(pod).unwrap()
}

#[test]
#[ignore = "a measurement: run alone, in release (see the file's header)"]
fn index_memory_per_pod() {
    // The pods are built in batches and fed through the watch path (a relist), so only the
    // index holds them at the end.
    let before = rss_kib();
    let mut feeder = IndexFeeder::default();
    feeder.apply(PodEvent::Init);
    for i in 0..PODS {
        feeder.apply(PodEvent::InitApply(cnpg_pod(i)));
    }
    feeder.apply(PodEvent::InitDone);
    let after = rss_kib();
    assert_eq!(feeder.index().len(), PODS as usize);
    let per_pod = (after.saturating_sub(before) * 1024) / u64::from(PODS);
    println!("identity index: {PODS} pods, RSS {before} KiB -> {after} KiB, {per_pod} bytes a pod");
    assert!(
        per_pod > 0,
        "the index must cost something; RSS did not move"
    );
    // Memory, not timing: the same on any machine with the same allocator.
    assert!(
        per_pod <= 1024,
        "the index costs {per_pod} bytes a pod; issue 14 allows 1 KiB"
    );
}
