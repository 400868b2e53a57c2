//! The request-head path: every byte a client sends before the tunnel opens goes through
//! `parse_head`, then the policy. Neither may panic, and a parsed target must print back to
//! an authority that parses to the same target. The policy's answer must never let through
//! an IPv6 literal on an IPv4 range, nor an address whose embedded IPv4 address (any
//! translation form) lies in a denied range.
#![no_main]

use egress_proxy::config::Config;
use egress_proxy::tunnel::head::{parse_authority, parse_head};
use egress_proxy::policy::{Host, Policy, embedded_ipv4};
use std::net::IpAddr;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let config = Config::parse(
            "allow:\n- host: '*.blob.core.windows.net'\n  cidrs: [10.20.0.0/16, 127.0.0.0/8, 169.254.0.0/16]\n- cidrs: [127.0.0.0/8]\n  ports: [443, 8443]\n- host: pinned.blob.core.windows.net\n  cidrs: [10.20.0.0/24]\n  onlyCIDRs: true\nhosts:\n  acct.blob.core.windows.net: [127.0.0.1, '::ffff:10.20.0.1']\n  nat64.blob.core.windows.net: ['64:ff9b::7f00:1', '64:ff9b:1::a9fe:a9fe']\n  siit.blob.core.windows.net: ['::ffff:0:7f00:1', '::127.0.0.1']\n  tunnels.blob.core.windows.net: ['2002:a9fe:a9fe::1', '2001:0:a9fe:a9fe::1']\n  pinned.blob.core.windows.net: [198.51.100.20, 10.20.0.5]\n",
            "fuzz",
        )
        .unwrap_or_default();
        config.policy()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, len))) = parse_head(data) {
        assert!(len <= data.len());
        let printed = req.target.to_string();
        assert_eq!(parse_authority(&printed).ok(), Some(req.target.clone()));
        if let Ok(grant) = policy().authorize(&req.target) {
            // The only host-less rule has IPv4 ranges: no IPv6 literal may pass it.
            if let Host::Ip(ip) = req.target.host {
                assert!(ip.to_canonical().is_ipv4(), "{ip} passed an IPv4 range");
            }
            if let Some(addrs) = &grant.known_addrs
                && let Ok(allowed) = policy().filter(&grant, addrs)
            {
                for addr in allowed {
                    if let IpAddr::V6(v6) = addr {
                        for (v4, form) in embedded_ipv4(v6) {
                            assert!(
                                !policy().in_denied_range(IpAddr::V4(v4)),
                                "{addr} allowed, embedding {v4} ({form})"
                            );
                        }
                    }
                }
            }
        }
    }
});
