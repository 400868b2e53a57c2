//! Drives the admission review handler with arbitrary bodies. Beyond "never panics", it
//! checks what the API server relies on: a 200 answer is an allowed AdmissionReview, and any
//! patch it carries applies to the object it was computed for.
#![no_main]

use std::sync::LazyLock;

use base64::Engine as _;
use egress_webhook::admission::{NoServices, review};
use egress_webhook::config::Config;
use egress_webhook::engine::{ClusterFacts, Injector};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

static INJECTOR: LazyLock<Injector> = LazyLock::new(|| {
    let config = Config::from_yaml("injectHTTPProxy: true\nprofiles: [{name: cnpg}, {name: velero}, {name: all, selector: {matchLabels: {fuzz: \"yes\"}}, peerServices: [\"{app}-db\"]}]\n")
        .expect("fuzz config is valid");
    Injector::new(&config, &ClusterFacts::from_config(&config))
});

fuzz_target!(|data: &[u8]| {
    let reply = review(&INJECTOR, &NoServices, data);
    match reply.status {
        400 => return,
        200 => {}
        other => panic!("unexpected status {other}"),
    }
    let answer: Value = serde_json::from_slice(&reply.body).expect("200 answers are JSON");
    assert_eq!(answer["response"]["allowed"], true);
    let Some(patch) = answer["response"]["patch"].as_str() else { return };
    let patch = base64::engine::general_purpose::STANDARD.decode(patch).expect("patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("patch is RFC 6902");
    // JSON's grammar allows what serde_json's Value refuses and its skipping does not check:
    // a lone surrogate escape (`\ud800`) or a number beyond f64 in a field the review skips.
    // The API server never sends either; there is no object to apply the patch to.
    let Ok(request) = serde_json::from_slice::<Value>(data) else { return };
    let mut object = request["request"]["object"].clone();
    json_patch::patch(&mut object, &patch).expect("the patch applies to the request's object");
});
