//! The offline commands of `egress-proxy`: `check-config` (is the file usable, and what
//! does it allow) and `check HOST:PORT` (would this target pass, and why). Both run the
//! proxy's own policy code and resolver, so the verdict is the one the running proxy gives.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;

use egress_proxy::Config;
use egress_proxy::dial::resolve;
use egress_proxy::identity::index::{Phase, SlimPod};
use egress_proxy::policy::{AllowRule, Denial, Host, Target};
use egress_proxy::tunnel::head::parse_authority;

/// `check`'s exit code when the target would be refused: a finding, not a failure.
pub const EXIT_DENIED: u8 = 1;
/// `check`'s exit code when the target is not `host:port` (sysexits' EX_DATAERR).
pub const EXIT_BAD_TARGET: u8 = 65;
/// `check`'s exit code when DNS cannot answer for the target (sysexits' EX_UNAVAILABLE).
pub const EXIT_NO_DNS: u8 = 69;

/// Warnings about a configuration that loads but cannot work as intended.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if config.allow.is_empty() {
        out.push("allow is empty: every CONNECT is refused, nothing can pass".to_string());
    }
    out
}

/// Prints what the configuration allows; warnings go to standard error.
pub fn check_config(config: &Config) -> ExitCode {
    let mut out = String::from("config ok\n");
    let _ = writeln!(out, "listen: {}", config.listen);
    let _ = writeln!(out, "adminListen: {}", config.admin_listen);
    if let Some(tls) = &config.tls {
        let _ = writeln!(out, "tls.listen: {}", tls.listen);
    }
    let n = config.allow.len();
    let _ = writeln!(out, "allow: {n} rule{}", if n == 1 { "" } else { "s" });
    for (i, rule) in config.allow.iter().enumerate() {
        let _ = writeln!(out, "  allow[{i}]: {}", describe(rule));
    }
    if !config.deny_cidrs.is_empty() {
        let list: Vec<String> = config.deny_cidrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "denyCIDRs: {}", list.join(", "));
    }
    for (name, addrs) in &config.hosts {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "hosts: {name} -> {}", list.join(", "));
    }
    if let Some(identity) = &config.identity {
        let scope = if identity.namespaces.is_empty() {
            "all namespaces".to_owned()
        } else {
            format!("namespaces {}", identity.namespaces.join(","))
        };
        let _ = writeln!(
            out,
            "identity: pods {} in {scope}, unknownWait {}, unidentified {}",
            identity.pod_selector, identity.unknown_wait, identity.unidentified
        );
    }
    print!("{out}");
    for w in warnings(config) {
        eprintln!("egress-proxy: warning: {w}");
    }
    ExitCode::SUCCESS
}

/// One rule in a line: what it names, on which ports, within which ranges.
fn describe(rule: &AllowRule) -> String {
    let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
    let mut text = match &rule.host {
        Some(host) => format!("host {host}, ports {}", ports.join(",")),
        None => format!("IP literals, ports {}", ports.join(",")),
    };
    if !rule.cidrs.is_empty() {
        let cidrs: Vec<String> = rule.cidrs.iter().map(ToString::to_string).collect();
        let _ = write!(text, ", cidrs {}", cidrs.join(","));
    }
    if rule.only_cidrs {
        text.push_str(", onlyCIDRs");
    }
    if !rule.from.is_empty() {
        let from: Vec<String> = rule.from.iter().map(|f| format!("({f})")).collect();
        let _ = write!(text, ", from {}", from.join(" or "));
    }
    text
}

/// Would `target` pass? Prints the matching rules, the addresses and the verdict; exits 0
/// when it would be tunnelled, [`EXIT_DENIED`] when refused.
pub fn check(config: &Config, target: &str, caller: Option<&SlimPod>) -> ExitCode {
    let target = match parse_authority(target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "egress-proxy: {target:?} is not a CONNECT target (host:port, a.b.c.d:port or [v6]:port): {e}"
            );
            return ExitCode::from(EXIT_BAD_TARGET);
        }
    };
    for w in warnings(config) {
        eprintln!("egress-proxy: warning: {w}");
    }
    println!("target: {target}");
    if config.identity.is_some() {
        match caller {
            Some(pod) => println!(
                "caller: a pod in namespace {} with service account {} and {} label{}",
                pod.namespace,
                pod.service_account,
                pod.labels.len(),
                if pod.labels.len() == 1 { "" } else { "s" }
            ),
            None => println!("caller: unidentified (--as-namespace asks as a pod)"),
        }
    }
    let policy = config.policy();
    let grant = match policy.authorize_for(&target, caller) {
        Ok(g) => g,
        Err(denial) => {
            match denial {
                Denial::PortNotAllowed => {
                    for i in matching_rules(config, &target, caller, true) {
                        println!("rule: allow[{i}] names the host, not port {}", target.port);
                    }
                }
                // Say which workloads the host is for, so the fix is visible.
                Denial::WorkloadNotAllowed => {
                    for (i, rule) in config.allow.iter().enumerate() {
                        if !rule.from.is_empty() && rule_names_host(rule, &target) {
                            println!("rule: allow[{i}] is only for: {}", describe(rule));
                        }
                    }
                }
                _ => {}
            }
            return verdict_denied(&denial);
        }
    };
    for i in matching_rules(config, &target, caller, false) {
        println!("rule: allow[{i}]: {}", describe(&config.allow[i]));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("egress-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = match (&target.host, &grant.known_addrs) {
        (Host::Ip(_), _) => "the target itself",
        (_, Some(_)) => "the hosts override",
        _ => "DNS",
    };
    let addrs = match runtime.block_on(resolve(&target, &grant)) {
        Ok(a) => a,
        Err(e) => {
            println!("verdict: refused");
            println!("reason: dns-failure ({e})");
            return ExitCode::from(EXIT_NO_DNS);
        }
    };
    println!("addresses ({source}):");
    for addr in &addrs {
        let result = policy
            .filter(&grant, std::slice::from_ref(addr))
            .map(|_| ());
        match result {
            Ok(()) => println!("  {addr}: allowed"),
            Err(d) => println!("  {addr}: refused, {} ({d})", d.reason()),
        }
    }
    match policy.filter(&grant, &addrs) {
        Ok(allowed) => {
            let list: Vec<String> = allowed.iter().map(IpAddr::to_string).collect();
            println!("verdict: allowed");
            println!("dials: {}", list.join(", "));
            ExitCode::SUCCESS
        }
        Err(denial) => verdict_denied(&denial),
    }
}

fn verdict_denied(denial: &Denial) -> ExitCode {
    println!("verdict: refused");
    println!("reason: {} ({denial})", denial.reason());
    ExitCode::from(EXIT_DENIED)
}

/// The indexes of the rules that allow the target by themselves: each rule is compiled
/// alone and asked, so the answer comes from the proxy's own matching. With `host_only`,
/// the rules that name the host whatever the port.
fn matching_rules(
    config: &Config,
    target: &Target,
    caller: Option<&SlimPod>,
    host_only: bool,
) -> Vec<usize> {
    (0..config.allow.len())
        .filter(|&i| {
            let mut alone = config.clone();
            alone.allow = vec![config.allow[i].clone()];
            match alone.policy().authorize_for(target, caller) {
                Ok(_) => true,
                Err(Denial::PortNotAllowed) => host_only,
                Err(_) => false,
            }
        })
        .collect()
}

/// Whether `rule` names the target's host on its port, whoever asks: the rule compiled alone,
/// with its `from:` dropped, allows the target.
fn rule_names_host(rule: &AllowRule, target: &Target) -> bool {
    let mut open = rule.clone();
    open.from.clear();
    egress_proxy::policy::Policy::new(&[open], &[], &Default::default())
        .authorize(target)
        .is_ok()
}

/// The pod `check --as-namespace` asks as: only what `from:` matches on (namespace, labels,
/// service account) is filled in.
pub fn caller(
    namespace: &str,
    labels: &[String],
    service_account: &str,
) -> Result<SlimPod, String> {
    let mut map = std::collections::BTreeMap::new();
    for label in labels {
        let (k, v) = label
            .split_once('=')
            .ok_or_else(|| format!("--as-label {label:?}: expected KEY=VALUE"))?;
        map.insert(k.to_owned(), v.to_owned());
    }
    Ok(SlimPod {
        uid: "egress-proxy-check".into(),
        namespace: namespace.into(),
        name: "egress-proxy-check".into(),
        labels: map.into(),
        service_account: service_account.into(),
        ips: Vec::new(),
        host_ips: Vec::new(),
        phase: Phase::Running,
        terminating: false,
    })
}
