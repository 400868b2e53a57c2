//! The service SAS path: every request target a client sends without an `Authorization`
//! header goes through the SAS parser, the string-to-sign, the signature and window checks,
//! and, when those pass, the operation and permission checks. None may panic; a SAS that
//! parses gives the same string-to-sign twice, and its string-to-sign has the sixteen lines
//! of the 2020-12-06 layout.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use egress_proxy::blob::operation::classify;
use egress_proxy::blob::sas::{self, Context, Transport};
use egress_proxy::blob::shared_key::AccountKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = sas::parse_time(text);
    let Ok(request) = http::Request::builder().uri(text).body(()) else {
        return;
    };
    let (mut parts, ()) = request.into_parts();
    let _ = sas::carries_sas(&parts);
    let query = parts.uri.query().unwrap_or("");
    if let Ok(parsed) = sas::parse(query) {
        let path = parts.uri.path();
        let once = parsed.string_to_sign("devstoreaccount1", path);
        assert_eq!(once, parsed.string_to_sign("devstoreaccount1", path));
        if let Ok(sts) = once {
            // Names may hold newlines once decoded; the fixed fields cannot.
            assert!(sts.split('\n').count() >= 16, "{sts:?}");
        }
    }
    let Ok(key) = AccountKey::from_base64(
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==",
    ) else {
        return;
    };
    for transport in [Transport::Plain, Transport::Tls] {
        let context = Context {
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_587_200),
            transport,
            client: IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        if let Ok(grant) = sas::verify(&parts, "devstoreaccount1", &key, &context) {
            if let Ok(request) = classify(&parts, "devstoreaccount1") {
                let _ = grant.permits(&request);
            }
            grant.prepare_upstream(&mut parts, context.now);
        }
    }
});
