//! The request-head path: every byte a client sends before the tunnel opens goes through
//! `parse_head`, then the policy. Neither may panic, and a parsed target must print back to
//! an authority that parses to the same target.
#![no_main]

use egress_proxy::config::Config;
use egress_proxy::connect::{parse_authority, parse_head};
use egress_proxy::policy::Policy;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let config = Config::parse(
            "allow:\n- host: '*.blob.core.windows.net'\n  cidrs: [10.20.0.0/16]\n- cidrs: [127.0.0.0/8]\n  ports: [443, 8443]\nhosts:\n  acct.blob.core.windows.net: [127.0.0.1, '::ffff:10.20.0.1']\n",
            "fuzz",
        )
        .unwrap_or_default();
        Policy::from_config(&config)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, len))) = parse_head(data) {
        assert!(len <= data.len());
        let printed = req.target.to_string();
        assert_eq!(parse_authority(&printed).ok(), Some(req.target.clone()));
        if let Ok(grant) = policy().authorize(&req.target) {
            if let Some(addrs) = &grant.known_addrs {
                let _ = policy().filter(&grant, addrs);
            }
        }
    }
});
