//! The access decision, pure and synchronous: may this target be reached, and at which
//! addresses. No I/O happens here; `connect.rs` resolves names and dials only what
//! [`Policy::filter`] returned, so the address checked is the address dialled.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::config::Config;

/// Longest DNS name (RFC 1035 section 2.3.4, without the trailing dot).
const MAX_NAME_LEN: usize = 253;

/// Ranges denied unless a rule names a range inside them: loopback, link-local (cloud
/// metadata at 169.254.169.254), unspecified, multicast, broadcast and reserved, the private
/// and shared ranges. A table of (address, prefix) so it is readable and checked by a test.
const DEFAULT_DENY: &[(IpAddr, u8)] = &[
    (IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)), 8), // "this network", incl. unspecified
    (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8), // private
    (IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10), // shared (carrier-grade NAT)
    (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8), // loopback
    (IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16), // link-local, cloud metadata
    (IpAddr::V4(Ipv4Addr::new(172, 16, 0, 0)), 12), // private
    (IpAddr::V4(Ipv4Addr::new(192, 0, 0, 0)), 24), // IETF protocol assignments
    (IpAddr::V4(Ipv4Addr::new(192, 168, 0, 0)), 16), // private
    (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0)), 15), // benchmarking
    (IpAddr::V4(Ipv4Addr::new(224, 0, 0, 0)), 4), // multicast
    (IpAddr::V4(Ipv4Addr::new(240, 0, 0, 0)), 4), // reserved, incl. broadcast
    (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),   // unspecified
    (IpAddr::V6(Ipv6Addr::LOCALHOST), 128),     // loopback
    (IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)), 7), // unique local
    (IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10), // link-local
    (IpAddr::V6(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0)), 10), // old site-local
    (IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)), 8), // multicast
];

/// Why a target was refused; each has a stable short name used in the reason header, the
/// access log and the `denials_total` metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// No rule names this host.
    #[error("host not allowed")]
    HostNotAllowed,
    /// A rule names the host, but not this port.
    #[error("port not allowed")]
    PortNotAllowed,
    /// An IP-literal target outside every host-less rule's CIDRs.
    #[error("IP-literal target not allowed")]
    IpLiteralNotAllowed,
    /// Every address the name resolved to is in a denied range.
    #[error("destination address {0} is in a denied range")]
    AddressDenied(IpAddr),
}

impl Denial {
    /// Stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::HostNotAllowed => "host-not-allowed",
            Self::PortNotAllowed => "port-not-allowed",
            Self::IpLiteralNotAllowed => "ip-literal-not-allowed",
            Self::AddressDenied(_) => "address-denied",
        }
    }
}

/// The host part of a CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lower-cased, without a trailing dot.
    Name(String),
    /// An IP literal (IPv6 came in brackets).
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Name or address.
    pub host: Host,
    /// Destination port.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Lower-cases a DNS name, drops one trailing dot and checks it is a plausible host name
/// (letters, digits, `-`, `_` and dots; no empty labels). A last label of digits, or of
/// `0x` and hex digits, is refused: no top-level domain looks like that, and resolvers read
/// such names (`127.1`, `0x7f.1`, `2130706433`) as IPv4 addresses, which must go through
/// the IP-literal rules instead.
pub fn normalize_name(name: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("{name:?} is not a host name (length)"));
    }
    if name
        .split('.')
        .any(|label| label.is_empty() || label.len() > 63)
    {
        return Err(format!("{name:?} is not a host name (empty or long label)"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!("{name:?} is not a host name (characters)"));
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if hex || last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{name:?} is not a host name (numeric last label: an IPv4 address, which goes in cidrs)"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// A rule's host: an exact name, or `*.suffix` (any name ending in `.suffix`, not the suffix
/// itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches this name only.
    Exact(String),
    /// Matches names ending in this string, which starts with a dot.
    Suffix(String),
}

impl HostPattern {
    /// Parses `name` or `*.suffix`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.strip_prefix("*.") {
            Some(rest) => Ok(Self::Suffix(format!(".{}", normalize_name(rest)?))),
            None => Ok(Self::Exact(normalize_name(s)?)),
        }
    }

    /// `name` must already be normalized.
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(e) => e == name,
            Self::Suffix(s) => name.len() > s.len() && name.ends_with(s.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    /// Names this rule allows; `None`: IP literals inside `cidrs`.
    host: Option<HostPattern>,
    /// Destination ports.
    ports: Vec<u16>,
    /// Ranges that lift the default deny for this rule (normalised to network addresses).
    cidrs: Vec<IpNet>,
}

/// What [`Policy::authorize`] grants: which private ranges the target's addresses may fall in
/// and, for IP literals and overridden names, the addresses themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Ranges named by every rule that matched; they lift the default deny inside them.
    pub cidrs: Vec<IpNet>,
    /// Addresses known without DNS (an IP literal, or a `hosts` override).
    pub known_addrs: Option<Vec<IpAddr>>,
}

/// The compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The allow rules, in config order.
    rules: Vec<Rule>,
    /// [`DEFAULT_DENY`] as networks.
    default_deny: Vec<IpNet>,
    /// `denyCIDRs`: absolute, no rule lifts them.
    deny: Vec<IpNet>,
    /// `hosts` overrides, keys normalised.
    hosts: HashMap<String, Vec<IpAddr>>,
}

impl Policy {
    /// Compiles a validated config (invalid host patterns were rejected by validation and are
    /// skipped here rather than panicking).
    pub fn from_config(config: &Config) -> Self {
        let rules = config
            .allow
            .iter()
            .filter_map(|r| {
                let host = match &r.host {
                    Some(h) => Some(HostPattern::parse(h).ok()?),
                    None => None,
                };
                Some(Rule {
                    host,
                    ports: r.ports.clone(),
                    cidrs: r.cidrs.iter().map(IpNet::trunc).collect(),
                })
            })
            .collect();
        let hosts = config
            .hosts
            .iter()
            .filter_map(|(k, v)| Some((normalize_name(k).ok()?, v.clone())))
            .collect();
        Self {
            rules,
            default_deny: default_deny(),
            deny: config.deny_cidrs.iter().map(IpNet::trunc).collect(),
            hosts,
        }
    }

    /// First decision, before any I/O: does a rule allow this host and port?
    pub fn authorize(&self, target: &Target) -> Result<Grant, Denial> {
        match &target.host {
            Host::Name(name) => {
                let by_host: Vec<&Rule> = self
                    .rules
                    .iter()
                    .filter(|r| r.host.as_ref().is_some_and(|p| p.matches(name)))
                    .collect();
                if by_host.is_empty() {
                    return Err(Denial::HostNotAllowed);
                }
                let by_port: Vec<&Rule> = by_host
                    .into_iter()
                    .filter(|r| r.ports.contains(&target.port))
                    .collect();
                if by_port.is_empty() {
                    return Err(Denial::PortNotAllowed);
                }
                Ok(Grant {
                    cidrs: by_port.iter().flat_map(|r| r.cidrs.clone()).collect(),
                    known_addrs: self.hosts.get(name).cloned(),
                })
            }
            Host::Ip(ip) => {
                let views = views(*ip);
                let cidrs: Vec<IpNet> = self
                    .rules
                    .iter()
                    .filter(|r| r.host.is_none() && r.ports.contains(&target.port))
                    .flat_map(|r| r.cidrs.iter().copied())
                    .filter(|c| views.iter().any(|v| c.contains(v)))
                    .collect();
                if cidrs.is_empty() {
                    return Err(Denial::IpLiteralNotAllowed);
                }
                Ok(Grant {
                    cidrs,
                    known_addrs: Some(vec![*ip]),
                })
            }
        }
    }

    /// Second decision, on the resolved addresses: keeps those the grant may reach, in order.
    /// Fails when none is left, naming the first refused address.
    pub fn filter(&self, grant: &Grant, addrs: &[IpAddr]) -> Result<Vec<IpAddr>, Denial> {
        let allowed: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.address_allowed(*a, &grant.cidrs))
            .collect();
        match (allowed.is_empty(), addrs.first()) {
            (false, _) => Ok(allowed),
            (true, Some(first)) => Err(Denial::AddressDenied(*first)),
            (true, None) => Err(Denial::AddressDenied(IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
        }
    }

    /// May `addr` be dialled under a grant naming `cidrs`? Every form of the address (an
    /// IPv4-mapped, -compatible, NAT64 or 6to4 IPv6 address is also checked as the IPv4
    /// address it embeds) must pass: not in `denyCIDRs`, and inside a default-deny range only
    /// where a granted CIDR contains the address and lies inside that range (so a rule naming
    /// `10.20.0.0/16` opens that subnet, while `0.0.0.0/0` opens no private range).
    pub fn address_allowed(&self, addr: IpAddr, cidrs: &[IpNet]) -> bool {
        views(addr).iter().all(|v| {
            !self.deny.iter().any(|d| d.contains(v))
                && self
                    .default_deny
                    .iter()
                    .filter(|d| d.contains(v))
                    .all(|d| cidrs.iter().any(|c| c.contains(v) && d.contains(c)))
        })
    }
}

/// The default-deny table as networks.
fn default_deny() -> Vec<IpNet> {
    DEFAULT_DENY
        .iter()
        .filter_map(|(a, p)| IpNet::new(*a, *p).ok())
        .collect()
}

/// The forms an address is checked in: itself, plus the IPv4 address an IPv6 address embeds
/// when it is IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`): a kernel or a translator would deliver
/// those to the IPv4 address.
pub fn views(addr: IpAddr) -> Vec<IpAddr> {
    let mut out = vec![addr];
    if let IpAddr::V6(v6) = addr {
        let s = v6.segments();
        let o = v6.octets();
        let embedded = if let Some(v4) = v6.to_ipv4_mapped() {
            Some(v4)
        } else if (s[..6] == [0; 6] && !(v6.is_unspecified() || v6.is_loopback()))
            || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        {
            Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
        } else if s[0] == 0x2002 {
            Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
        } else {
            None
        };
        out.extend(embedded.map(IpAddr::V4));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(yaml: &str) -> Policy {
        Policy::from_config(&Config::parse(yaml, "t").unwrap())
    }
    fn name(n: &str, port: u16) -> Target {
        Target {
            host: Host::Name(normalize_name(n).unwrap()),
            port,
        }
    }
    fn ip(a: &str, port: u16) -> Target {
        Target {
            host: Host::Ip(a.parse().unwrap()),
            port,
        }
    }
    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_deny_table_is_complete() {
        assert_eq!(default_deny().len(), DEFAULT_DENY.len());
    }

    #[test]
    fn default_policy_allows_blob_443_only() {
        let p = policy("");
        assert!(
            p.authorize(&name("acct.blob.core.windows.net", 443))
                .is_ok()
        );
        assert!(
            p.authorize(&name("ACCT.Blob.Core.Windows.Net.", 443))
                .is_ok()
        );
        assert_eq!(
            p.authorize(&name("acct.blob.core.windows.net", 80)),
            Err(Denial::PortNotAllowed)
        );
        assert_eq!(
            p.authorize(&name("blob.core.windows.net", 443)),
            Err(Denial::HostNotAllowed)
        );
        assert_eq!(
            p.authorize(&name("evilblob.core.windows.net", 443)),
            Err(Denial::HostNotAllowed)
        );
        assert_eq!(
            p.authorize(&name("acct.blob.core.windows.net.evil.com", 443)),
            Err(Denial::HostNotAllowed)
        );
        assert_eq!(
            p.authorize(&name("example.com", 443)),
            Err(Denial::HostNotAllowed)
        );
    }

    #[test]
    fn ip_literals_need_a_hostless_rule() {
        let p = policy("");
        for t in [
            "1.2.3.4",
            "169.254.169.254",
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(
                p.authorize(&ip(t, 443)),
                Err(Denial::IpLiteralNotAllowed),
                "{t}"
            );
        }
        let p = policy(
            "allow: [{cidrs: [10.30.0.0/24], ports: [443]}, {host: a.com, cidrs: [10.0.0.0/8]}]",
        );
        let g = p.authorize(&ip("10.30.0.7", 443)).unwrap();
        assert_eq!(g.known_addrs, Some(vec![a("10.30.0.7")]));
        assert_eq!(p.filter(&g, &[a("10.30.0.7")]), Ok(vec![a("10.30.0.7")]));
        // The mapped form of an allowed literal is the same destination.
        let g = p.authorize(&ip("::ffff:10.30.0.7", 443)).unwrap();
        assert!(p.filter(&g, &[a("::ffff:10.30.0.7")]).is_ok());
        // A host rule's cidrs do not allow literals; nor does another port.
        assert!(p.authorize(&ip("10.1.1.1", 443)).is_err());
        assert!(p.authorize(&ip("10.30.0.7", 8443)).is_err());
        assert!(p.authorize(&ip("10.30.1.7", 443)).is_err());
    }

    #[test]
    fn resolved_addresses_in_default_deny_are_refused() {
        let p = policy("");
        let g = p
            .authorize(&name("acct.blob.core.windows.net", 443))
            .unwrap();
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
        ] {
            assert!(!p.address_allowed(a(bad), &g.cidrs), "{bad} must be denied");
        }
        for good in [
            "20.60.0.1",
            "172.32.0.1",
            "2603:1000::1",
            "::ffff:20.60.0.1",
        ] {
            assert!(
                p.address_allowed(a(good), &g.cidrs),
                "{good} must be allowed"
            );
        }
    }

    #[test]
    fn rule_cidrs_open_only_inside_themselves() {
        let p = policy(
            "allow: [{host: '*.blob.core.windows.net', cidrs: [10.20.0.0/16]}]\ndenyCIDRs: [10.20.5.0/24]",
        );
        let g = p
            .authorize(&name("acct.blob.core.windows.net", 443))
            .unwrap();
        assert!(p.address_allowed(a("10.20.1.4"), &g.cidrs));
        assert!(p.address_allowed(a("::ffff:10.20.1.4"), &g.cidrs));
        assert!(!p.address_allowed(a("10.21.1.4"), &g.cidrs));
        // denyCIDRs win over rules (the cluster's own pod and service ranges).
        assert!(!p.address_allowed(a("10.20.5.9"), &g.cidrs));
        // Other rules' cidrs do not leak into this grant.
        assert!(!p.address_allowed(a("169.254.169.254"), &g.cidrs));

        // A wide CIDR does not lift the default deny of the narrower ranges inside it.
        let p = policy("allow: [{host: x.com, cidrs: [0.0.0.0/0, '::/0']}]");
        let g = p.authorize(&name("x.com", 443)).unwrap();
        assert!(!p.address_allowed(a("127.0.0.1"), &g.cidrs));
        assert!(!p.address_allowed(a("169.254.169.254"), &g.cidrs));
        assert!(!p.address_allowed(a("::1"), &g.cidrs));
        assert!(p.address_allowed(a("8.8.8.8"), &g.cidrs));
    }

    #[test]
    fn filter_keeps_allowed_in_order_and_names_the_refused() {
        let p = policy("allow: [{host: x.com, cidrs: [127.0.0.0/8]}]");
        let g = p.authorize(&name("x.com", 443)).unwrap();
        assert_eq!(
            p.filter(
                &g,
                &[a("10.0.0.1"), a("127.0.0.2"), a("::1"), a("127.0.0.3")]
            ),
            Ok(vec![a("127.0.0.2"), a("127.0.0.3")])
        );
        assert_eq!(
            p.filter(&g, &[a("10.0.0.1"), a("::1")]),
            Err(Denial::AddressDenied(a("10.0.0.1")))
        );
        assert!(p.filter(&g, &[]).is_err());
    }

    #[test]
    fn hosts_overrides_are_returned_and_still_checked() {
        let p = policy(
            "allow: [{host: '*.blob.core.windows.net'}]\nhosts: {Evil.Blob.Core.Windows.Net.: [169.254.169.254]}",
        );
        let g = p
            .authorize(&name("evil.blob.core.windows.net", 443))
            .unwrap();
        assert_eq!(g.known_addrs, Some(vec![a("169.254.169.254")]));
        assert_eq!(
            p.filter(&g, g.known_addrs.as_deref().unwrap()),
            Err(Denial::AddressDenied(a("169.254.169.254")))
        );
    }

    #[test]
    fn patterns_and_names() {
        assert_eq!(
            HostPattern::parse("*.Blob.Core.Windows.Net."),
            Ok(HostPattern::Suffix(".blob.core.windows.net".into()))
        );
        assert!(HostPattern::parse("*").is_err());
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("a..b").is_err());
        assert!(HostPattern::parse("a b").is_err());
        assert!(normalize_name(&"a".repeat(254)).is_err());
        assert!(normalize_name(&format!("{}.com", "a".repeat(64))).is_err());
        assert_eq!(normalize_name("A-b_c.D."), Ok("a-b_c.d".into()));
        // What resolvers would read as IPv4 addresses is not a name.
        for numeric in [
            "127.1",
            "10.0.0.1",
            "2130706433",
            "0x7f.1",
            "a.0X1F",
            "a.b.443.",
        ] {
            assert!(normalize_name(numeric).is_err(), "{numeric}");
        }
        // Digits elsewhere, or hex-looking letters, are fine.
        for ok in [
            "1password.com",
            "10-0-0-1.nip.io",
            "0x7f.com",
            "a.b.deadbeef",
        ] {
            assert!(normalize_name(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn views_embed_ipv4() {
        assert_eq!(
            views(a("::ffff:1.2.3.4")),
            vec![a("::ffff:1.2.3.4"), a("1.2.3.4")]
        );
        assert_eq!(views(a("::1.2.3.4")), vec![a("::1.2.3.4"), a("1.2.3.4")]);
        assert_eq!(views(a("::1")), vec![a("::1")]);
        assert_eq!(views(a("::")), vec![a("::")]);
        assert_eq!(views(a("2603::1")), vec![a("2603::1")]);
    }
}
