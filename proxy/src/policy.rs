//! The access decision, pure and synchronous: may this target be reached, and at which
//! addresses. No I/O happens here; [`crate::dial`] resolves names and dials only what
//! [`Policy::filter`] returned, so the address checked is the address dialled. The schema of
//! the rules (`allow` in the config file) is defined here, beside the code that reads it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;

use crate::identity::{SlimPod, WorkloadSelector};

/// HTTPS only: the proxy tunnels TLS, so 443 is the only port allowed unless a rule says more.
pub const DEFAULT_PORT: u16 = 443;

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

/// One allow rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowRule {
    /// Exact host name or `*.suffix`; case-insensitive, a trailing dot is ignored. Absent:
    /// the rule allows IP-literal targets inside `cidrs`.
    #[serde(default)]
    pub host: Option<String>,
    /// Destination ports.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// Private ranges this rule's names may resolve to (Azure private endpoints live in the
    /// VNet's 10.x space); without a host, the IP literals this rule allows.
    #[serde(default, rename = "cidrs")]
    pub cidrs: Vec<IpNet>,
    /// Every address this rule's names resolve to must lie inside `cidrs`, public addresses
    /// included: pins a storage account to its private endpoint, so a missing private DNS
    /// zone is a refusal naming the public address instead of a backup over the internet.
    /// Off: `cidrs` only opens private ranges and public addresses stay allowed.
    #[serde(default, rename = "onlyCIDRs")]
    pub only_cidrs: bool,
    /// Which workloads the rule is for (any entry may match; the fields of one entry all
    /// must). Empty: every client the pod -> proxy policy admits, as before identity existed.
    #[serde(default)]
    pub from: Vec<WorkloadSelector>,
}

fn default_ports() -> Vec<u16> {
    vec![DEFAULT_PORT]
}

/// Why a target was refused; each has a stable short name used in the reason header, the
/// access log and the `denials_total` metric.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// No rule names this host.
    #[error("host not allowed")]
    HostNotAllowed,
    /// Rules name this host, but each has a `from:` that does not select the caller.
    #[error(
        "host not allowed for this workload (the rules naming it have from: lists that do not select it)"
    )]
    WorkloadNotAllowed,
    /// A rule names the host, but not this port.
    #[error("port not allowed")]
    PortNotAllowed,
    /// An IP-literal target outside every host-less rule's CIDRs.
    #[error("IP-literal target not allowed")]
    IpLiteralNotAllowed,
    /// An IPv6 literal that carries an IPv4 address, and no host-less rule has an IPv6 range
    /// containing it: an IPv4 range never allows an IPv6 address, whatever it embeds.
    #[error(
        "IPv6 literal {addr} embeds the IPv4 address {embedded} ({form}); an IPv4 range in cidrs does not allow IPv6 addresses"
    )]
    LiteralEmbedsIpv4 {
        /// The literal as the client sent it.
        addr: Ipv6Addr,
        /// The IPv4 address a translator would deliver it to.
        embedded: Ipv4Addr,
        /// Which translation form carries it.
        form: Translation,
    },
    /// Every address the name resolved to is in a denied range.
    #[error("destination address {0} is in a denied range")]
    AddressDenied(IpAddr),
    /// An IPv6 address whose embedded IPv4 address is in a denied range: a translator on that
    /// prefix would deliver it there.
    #[error(
        "destination address {addr} embeds the IPv4 address {embedded} ({form}), which is in a denied range"
    )]
    EmbeddedAddressDenied {
        /// The IPv6 address the name resolved to (or the literal).
        addr: Ipv6Addr,
        /// The IPv4 address it embeds.
        embedded: Ipv4Addr,
        /// Which translation form carries it.
        form: Translation,
    },
    /// A rule with `onlyCIDRs: true` matched, and the address lies outside its `cidrs`.
    #[error(
        "destination address {0} is outside the cidrs of the matching rule (onlyCIDRs: true); for a private endpoint this usually means its private DNS zone is missing"
    )]
    OutsideRuleCidrs(IpAddr),
}

impl Denial {
    /// Stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::HostNotAllowed => "host-not-allowed",
            Self::WorkloadNotAllowed => "workload-not-allowed",
            Self::PortNotAllowed => "port-not-allowed",
            Self::IpLiteralNotAllowed | Self::LiteralEmbedsIpv4 { .. } => "ip-literal-not-allowed",
            Self::AddressDenied(_) | Self::EmbeddedAddressDenied { .. } => "address-denied",
            Self::OutsideRuleCidrs(_) => "address-outside-cidrs",
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
    /// `onlyCIDRs`: every address must lie inside `cidrs`, public ones included.
    only_cidrs: bool,
    /// `from:`; empty: the rule is for every client.
    from: Vec<WorkloadSelector>,
    /// The rule's position in `allow`, for the access log (`allow[2]`).
    index: usize,
}

impl Rule {
    /// Whether the rule applies to a connection from `caller` (`None`: not identified).
    fn applies_to(&self, caller: Option<&SlimPod>) -> bool {
        self.from.is_empty()
            || caller.is_some_and(|pod| {
                self.from
                    .iter()
                    .any(|f| f.matches(&pod.namespace, &pod.labels, &pod.service_account))
            })
    }
}

/// What one matching rule lets a target's addresses be: the unit an address is checked
/// against, so that one rule's `onlyCIDRs` is not undone by another rule's ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The rule's ranges; they lift the default deny inside them.
    pub cidrs: Vec<IpNet>,
    /// The rule's `onlyCIDRs`: an address outside `cidrs` is refused, public or not.
    pub only_cidrs: bool,
}

/// What [`Policy::authorize`] grants: the scopes of the rules that matched and, for IP
/// literals and overridden names, the addresses themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// One scope per matching rule; an address may be dialled when any of them allows it.
    pub scopes: Vec<Scope>,
    /// Addresses known without DNS (an IP literal, or a `hosts` override).
    pub known_addrs: Option<Vec<IpAddr>>,
    /// Positions in `allow` of the rules that matched, for the access log.
    pub rules: Vec<usize>,
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
    /// Compiles the allow rules, `denyCIDRs` and `hosts` overrides of a validated config
    /// (invalid host patterns were rejected by validation and are skipped here rather than
    /// panicking).
    pub fn new(
        allow: &[AllowRule],
        deny_cidrs: &[IpNet],
        hosts: &BTreeMap<String, Vec<IpAddr>>,
    ) -> Self {
        let rules = allow
            .iter()
            .enumerate()
            .filter_map(|(index, r)| {
                let host = match &r.host {
                    Some(h) => Some(HostPattern::parse(h).ok()?),
                    None => None,
                };
                Some(Rule {
                    host,
                    ports: r.ports.clone(),
                    cidrs: r.cidrs.iter().map(IpNet::trunc).collect(),
                    only_cidrs: r.only_cidrs,
                    from: r.from.clone(),
                    index,
                })
            })
            .collect();
        let hosts = hosts
            .iter()
            .filter_map(|(k, v)| {
                let addrs = v.iter().map(IpAddr::to_canonical).collect();
                Some((normalize_name(k).ok()?, addrs))
            })
            .collect();
        Self {
            rules,
            default_deny: default_deny(),
            deny: deny_cidrs.iter().map(IpNet::trunc).collect(),
            hosts,
        }
    }

    /// First decision, before any I/O: does a rule allow this host and port to a client that
    /// is not identified? Only rules without `from:` can.
    pub fn authorize(&self, target: &Target) -> Result<Grant, Denial> {
        self.authorize_for(target, None)
    }

    /// [`Policy::authorize`] for a connection from `caller`: the rules without `from:`, and
    /// the rules whose `from:` selects the pod. `None`: not identified.
    pub fn authorize_for(
        &self,
        target: &Target,
        caller: Option<&SlimPod>,
    ) -> Result<Grant, Denial> {
        match &target.host {
            Host::Name(name) => {
                let named: Vec<&Rule> = self
                    .rules
                    .iter()
                    .filter(|r| r.host.as_ref().is_some_and(|p| p.matches(name)))
                    .collect();
                if named.is_empty() {
                    return Err(Denial::HostNotAllowed);
                }
                let by_host: Vec<&Rule> =
                    named.into_iter().filter(|r| r.applies_to(caller)).collect();
                if by_host.is_empty() {
                    return Err(Denial::WorkloadNotAllowed);
                }
                let (scopes, rules): (Vec<Scope>, Vec<usize>) = by_host
                    .into_iter()
                    .filter(|r| r.ports.contains(&target.port))
                    .map(|r| {
                        let scope = Scope {
                            cidrs: r.cidrs.clone(),
                            only_cidrs: r.only_cidrs,
                        };
                        (scope, r.index)
                    })
                    .unzip();
                if scopes.is_empty() {
                    return Err(Denial::PortNotAllowed);
                }
                Ok(Grant {
                    scopes,
                    known_addrs: self.hosts.get(name).cloned(),
                    rules,
                })
            }
            Host::Ip(ip) => {
                // `::ffff:a.b.c.d` is how the socket API spells the IPv4 address a.b.c.d (it
                // leaves as IPv4), so it is that address. Every other IPv6 form is IPv6: an
                // IPv4 range does not contain it, whatever it embeds.
                let ip = ip.to_canonical();
                let (scopes, rules): (Vec<Scope>, Vec<usize>) = self
                    .rules
                    .iter()
                    .filter(|r| {
                        r.host.is_none() && r.ports.contains(&target.port) && r.applies_to(caller)
                    })
                    .map(|r| {
                        let scope = Scope {
                            cidrs: r
                                .cidrs
                                .iter()
                                .copied()
                                .filter(|c| c.contains(&ip))
                                .collect(),
                            only_cidrs: r.only_cidrs,
                        };
                        (scope, r.index)
                    })
                    .filter(|(s, _)| !s.cidrs.is_empty())
                    .unzip();
                if scopes.is_empty() {
                    return Err(match ip {
                        IpAddr::V6(addr) => match embedded_ipv4(addr).first() {
                            Some(&(embedded, form)) => Denial::LiteralEmbedsIpv4 {
                                addr,
                                embedded,
                                form,
                            },
                            None => Denial::IpLiteralNotAllowed,
                        },
                        IpAddr::V4(_) => Denial::IpLiteralNotAllowed,
                    });
                }
                Ok(Grant {
                    scopes,
                    known_addrs: Some(vec![ip]),
                    rules,
                })
            }
        }
    }

    /// Second decision, on the resolved addresses: keeps those the grant may reach, in order
    /// (IPv4-mapped addresses as the IPv4 address they are). Fails when none is left, with
    /// the reason the first address was refused.
    pub fn filter(&self, grant: &Grant, addrs: &[IpAddr]) -> Result<Vec<IpAddr>, Denial> {
        let mut allowed = Vec::with_capacity(addrs.len());
        let mut first_refusal = None;
        for addr in addrs.iter().map(IpAddr::to_canonical) {
            match self.check_grant(addr, grant) {
                Ok(()) => allowed.push(addr),
                Err(d) => {
                    first_refusal.get_or_insert(d);
                }
            }
        }
        match first_refusal {
            Some(d) if allowed.is_empty() => Err(d),
            None if allowed.is_empty() => {
                Err(Denial::AddressDenied(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
            }
            _ => Ok(allowed),
        }
    }

    /// May `addr` be dialled under `grant`? Yes when one of its scopes allows it; otherwise
    /// the first scope's reason.
    fn check_grant(&self, addr: IpAddr, grant: &Grant) -> Result<(), Denial> {
        let mut first = None;
        for scope in &grant.scopes {
            match self.check_address(addr, scope) {
                Ok(()) => return Ok(()),
                Err(d) => {
                    first.get_or_insert(d);
                }
            }
        }
        Err(first.unwrap_or(Denial::AddressDenied(addr)))
    }

    /// May `addr` be dialled under one rule's scope? In order:
    /// - not in `denyCIDRs`;
    /// - with `onlyCIDRs`, inside one of the scope's CIDRs (checked before the default deny,
    ///   so the refusal names the rule's ranges, the thing to fix);
    /// - inside a default-deny range only where one of the scope's CIDRs contains the address
    ///   and lies inside that range (so `10.20.0.0/16` opens that subnet, while `0.0.0.0/0`
    ///   opens no private range);
    /// - for an IPv6 address, no IPv4 address it embeds ([`embedded_ipv4`]) lies in a denied
    ///   range; no rule lifts that, as an IPv4 range never allows an IPv6 address.
    pub fn check_address(&self, addr: IpAddr, scope: &Scope) -> Result<(), Denial> {
        let addr = addr.to_canonical();
        if self.deny.iter().any(|d| d.contains(&addr)) {
            return Err(Denial::AddressDenied(addr));
        }
        if scope.only_cidrs && !scope.cidrs.iter().any(|c| c.contains(&addr)) {
            return Err(Denial::OutsideRuleCidrs(addr));
        }
        let lifted = |d: &IpNet| {
            scope
                .cidrs
                .iter()
                .any(|c| c.contains(&addr) && d.contains(c))
        };
        if !self
            .default_deny
            .iter()
            .filter(|d| d.contains(&addr))
            .all(lifted)
        {
            return Err(Denial::AddressDenied(addr));
        }
        if let IpAddr::V6(v6) = addr
            && let Some(&(embedded, form)) = embedded_ipv4(v6)
                .iter()
                .find(|(v4, _)| self.in_denied_range(IpAddr::V4(*v4)))
        {
            return Err(Denial::EmbeddedAddressDenied {
                addr: v6,
                embedded,
                form,
            });
        }
        Ok(())
    }

    /// Whether `addr` lies in a default-deny range or in `denyCIDRs`, whatever the rules say.
    pub fn in_denied_range(&self, addr: IpAddr) -> bool {
        self.default_deny
            .iter()
            .chain(&self.deny)
            .any(|d| d.contains(&addr))
    }
}

/// The default-deny table as networks.
fn default_deny() -> Vec<IpNet> {
    DEFAULT_DENY
        .iter()
        .filter_map(|(a, p)| IpNet::new(*a, *p).ok())
        .collect()
}

/// An IPv6 address format that carries an IPv4 address: a kernel, a tunnel or a translator
/// on that prefix delivers such an IPv6 address to the IPv4 address inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// `::ffff:a.b.c.d` (RFC 4291): the socket API's spelling of an IPv4 address.
    Mapped,
    /// `::a.b.c.d` (RFC 4291, deprecated): old stacks tunnel it to the IPv4 address.
    Compatible,
    /// `::ffff:0:a.b.c.d` (RFC 2765, IPv4-translated): stateless IP/ICMP translation.
    Siit,
    /// `64:ff9b::a.b.c.d` (RFC 6052): the well-known NAT64 prefix.
    Nat64,
    /// `64:ff9b:1::/48` (RFC 8215): local-use NAT64, read in the `/96` format (the IPv4
    /// address in the last 32 bits), the one translators use by default.
    Nat64LocalUse,
    /// `2002:aabb:ccdd::/48` (RFC 3056): 6to4, the relay sends to a.b.c.d.
    SixToFour,
    /// `2001:0:aabb:ccdd::/64` (RFC 4380): the Teredo server address in bits 32-63.
    TeredoServer,
    /// `2001:0:…:wwxx:yyzz` (RFC 4380): the Teredo client's public address, bit-inverted in
    /// the last 32 bits.
    TeredoClient,
}

impl fmt::Display for Translation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mapped => "IPv4-mapped ::ffff:0:0/96",
            Self::Compatible => "IPv4-compatible ::/96",
            Self::Siit => "SIIT ::ffff:0:0:0/96",
            Self::Nat64 => "NAT64 64:ff9b::/96",
            Self::Nat64LocalUse => "local-use NAT64 64:ff9b:1::/48",
            Self::SixToFour => "6to4 2002::/16",
            Self::TeredoServer => "Teredo server 2001::/32",
            Self::TeredoClient => "Teredo client 2001::/32",
        })
    }
}

/// Every IPv4 address `addr` carries, with the form that carries it: empty for an address
/// that is no translation form. The one place these formats are decoded; the policy checks
/// each result against the IPv4 deny ranges.
pub fn embedded_ipv4(addr: Ipv6Addr) -> Vec<(Ipv4Addr, Translation)> {
    let s = addr.segments();
    let o = addr.octets();
    let v4 = |at: usize| Ipv4Addr::new(o[at], o[at + 1], o[at + 2], o[at + 3]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, ..] => vec![(v4(12), Translation::Mapped)],
        [0, 0, 0, 0, 0xffff, 0, ..] => vec![(v4(12), Translation::Siit)],
        // `::` and `::1` are the unspecified and loopback addresses, denied as themselves.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => Vec::new(),
        [0, 0, 0, 0, 0, 0, ..] => vec![(v4(12), Translation::Compatible)],
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => vec![(v4(12), Translation::Nat64)],
        [0x64, 0xff9b, 1, ..] => vec![(v4(12), Translation::Nat64LocalUse)],
        [0x2002, ..] => vec![(v4(2), Translation::SixToFour)],
        [0x2001, 0, ..] => {
            let client = u32::from(v4(12)) ^ u32::MAX;
            vec![
                (v4(4), Translation::TeredoServer),
                (Ipv4Addr::from(client), Translation::TeredoClient),
            ]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Through the real config parser and validation, so the tests speak the YAML users write.
    fn policy(yaml: &str) -> Policy {
        crate::config::Config::parse(yaml, "t").unwrap().policy()
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
            assert!(p.filter(&g, &[a(bad)]).is_err(), "{bad} must be denied");
        }
        for good in [
            "20.60.0.1",
            "172.32.0.1",
            "2603:1000::1",
            "::ffff:20.60.0.1",
        ] {
            assert!(p.filter(&g, &[a(good)]).is_ok(), "{good} must be allowed");
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
        assert!(p.filter(&g, &[a("10.20.1.4")]).is_ok());
        assert!(p.filter(&g, &[a("::ffff:10.20.1.4")]).is_ok());
        assert!(p.filter(&g, &[a("10.21.1.4")]).is_err());
        // denyCIDRs win over rules (the cluster's own pod and service ranges).
        assert!(p.filter(&g, &[a("10.20.5.9")]).is_err());
        // Other rules' cidrs do not leak into this grant.
        assert!(p.filter(&g, &[a("169.254.169.254")]).is_err());

        // A wide CIDR does not lift the default deny of the narrower ranges inside it.
        let p = policy("allow: [{host: x.com, cidrs: [0.0.0.0/0, '::/0']}]");
        let g = p.authorize(&name("x.com", 443)).unwrap();
        assert!(p.filter(&g, &[a("127.0.0.1")]).is_err());
        assert!(p.filter(&g, &[a("169.254.169.254")]).is_err());
        assert!(p.filter(&g, &[a("::1")]).is_err());
        assert!(p.filter(&g, &[a("8.8.8.8")]).is_ok());
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
    fn embedded_ipv4_reads_every_translation_form() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        use Translation::*;
        for (addr, want) in [
            ("::ffff:1.2.3.4", vec![("1.2.3.4", Mapped)]),
            ("::1.2.3.4", vec![("1.2.3.4", Compatible)]),
            ("::ffff:0:7f00:1", vec![("127.0.0.1", Siit)]),
            ("64:ff9b::7f00:2", vec![("127.0.0.2", Nat64)]),
            (
                "64:ff9b:1::a9fe:a9fe",
                vec![("169.254.169.254", Nat64LocalUse)],
            ),
            (
                "64:ff9b:1:ab::a9fe:a9fe",
                vec![("169.254.169.254", Nat64LocalUse)],
            ),
            ("2002:7f00:2::1", vec![("127.0.0.2", SixToFour)]),
            ("2002:7f00:2:ffff:1:2:3:4", vec![("127.0.0.2", SixToFour)]),
            (
                "2001:0:a9fe:a9fe:0:ffff:80ff:fffe",
                vec![
                    ("169.254.169.254", TeredoServer),
                    ("127.0.0.1", TeredoClient),
                ],
            ),
        ] {
            let want: Vec<(Ipv4Addr, Translation)> =
                want.into_iter().map(|(a, f)| (v4(a), f)).collect();
            assert_eq!(embedded_ipv4(v6(addr)), want, "{addr}");
        }
        for none in [
            "::",
            "::1",
            "2603:1000::1",
            "64:ff9b:2::1",
            "2001:db8::1",
            "fe80::1",
        ] {
            assert_eq!(embedded_ipv4(v6(none)), vec![], "{none}");
        }
    }

    #[test]
    fn ipv4_rules_never_allow_ipv6_literals() {
        // The outside review's cases: a host-less rule for 127.0.0.2/32 let these through.
        let p = policy("allow: [{cidrs: [127.0.0.2/32], ports: [443]}]");
        for (literal, embedded) in [
            ("64:ff9b::7f00:2", "127.0.0.2"),
            ("2002:7f00:2::1", "127.0.0.2"),
            ("2002:7f00:2:abcd::99", "127.0.0.2"),
            ("::127.0.0.2", "127.0.0.2"),
            ("::ffff:0:7f00:2", "127.0.0.2"),
            ("64:ff9b:1::7f00:2", "127.0.0.2"),
        ] {
            let denial = p.authorize(&ip(literal, 443)).unwrap_err();
            assert_eq!(denial.reason(), "ip-literal-not-allowed", "{literal}");
            assert!(
                denial
                    .to_string()
                    .contains(&format!("embeds the IPv4 address {embedded} (")),
                "{literal}: {denial}"
            );
        }
        // The IPv4 literal itself, and its IPv4-mapped spelling (the same packets), pass.
        assert!(p.authorize(&ip("127.0.0.2", 443)).is_ok());
        let g = p.authorize(&ip("::ffff:127.0.0.2", 443)).unwrap();
        assert_eq!(g.known_addrs, Some(vec![a("127.0.0.2")]));
        assert_eq!(
            p.filter(&g, &[a("::ffff:127.0.0.2")]),
            Ok(vec![a("127.0.0.2")])
        );

        // An IPv6 range lets the literal past the rule, and the embedded address is still
        // checked: a denied IPv4 inside refuses it, naming that address.
        let p = policy("allow: [{cidrs: [127.0.0.2/32, '64:ff9b::/96'], ports: [443]}]");
        let g = p.authorize(&ip("64:ff9b::7f00:2", 443)).unwrap();
        let denial = p.filter(&g, &[a("64:ff9b::7f00:2")]).unwrap_err();
        assert_eq!(
            denial.to_string(),
            "destination address 64:ff9b::7f00:2 embeds the IPv4 address 127.0.0.2 (NAT64 64:ff9b::/96), which is in a denied range"
        );
        let g = p.authorize(&ip("64:ff9b::808:808", 443)).unwrap();
        assert!(p.filter(&g, &[a("64:ff9b::808:808")]).is_ok());
    }

    #[test]
    fn resolved_translation_forms_are_checked_as_their_ipv4() {
        // A rule that opens 127.0.0.0/8 and 169.254.0.0/16 for IPv4 opens neither for the
        // IPv6 forms that embed them.
        let p = policy(
            "allow: [{host: x.com, cidrs: [127.0.0.0/8, 169.254.0.0/16]}]\ndenyCIDRs: [20.0.0.0/8]",
        );
        let g = p.authorize(&name("x.com", 443)).unwrap();
        for (addr, embedded) in [
            ("64:ff9b:1::a9fe:a9fe", "169.254.169.254"),
            ("::ffff:0:7f00:1", "127.0.0.1"),
            ("64:ff9b::7f00:1", "127.0.0.1"),
            ("::127.0.0.1", "127.0.0.1"),
            ("2002:a9fe:a9fe::1", "169.254.169.254"),
            ("2001:0:a9fe:a9fe::1", "169.254.169.254"),
            ("2001:0:808:808:0:ffff:80ff:fffe", "127.0.0.1"),
            // denyCIDRs are IPv4 deny ranges too.
            ("64:ff9b::1400:1", "20.0.0.1"),
        ] {
            match p.filter(&g, &[a(addr)]) {
                Err(Denial::EmbeddedAddressDenied { embedded: e, .. }) => {
                    assert_eq!(e, embedded.parse::<Ipv4Addr>().unwrap(), "{addr}")
                }
                other => panic!("{addr}: {other:?}"),
            }
        }
        // The IPv4 addresses themselves pass this rule; so do translated public addresses.
        assert!(p.filter(&g, &[a("127.0.0.1")]).is_ok());
        assert!(p.filter(&g, &[a("::ffff:127.0.0.1")]).is_ok());
        assert!(p.filter(&g, &[a("64:ff9b::808:808")]).is_ok());
        assert!(p.filter(&g, &[a("2002:808:808::1")]).is_ok());
    }

    #[test]
    fn only_cidrs_refuses_every_address_outside_the_rule() {
        let p = policy(
            "allow:\n- {host: myaccount.blob.core.windows.net, cidrs: [10.240.0.0/24, 'fd00:1::/64'], onlyCIDRs: true}\n- {host: '*.example.com', cidrs: [10.240.0.0/24]}\ndenyCIDRs: [10.240.0.128/25]",
        );
        let g = p
            .authorize(&name("myaccount.blob.core.windows.net", 443))
            .unwrap();
        // The private endpoint is allowed; the public address (no private DNS zone) is not.
        assert_eq!(p.filter(&g, &[a("10.240.0.5")]), Ok(vec![a("10.240.0.5")]));
        assert_eq!(p.filter(&g, &[a("fd00:1::5")]), Ok(vec![a("fd00:1::5")]));
        let denial = p.filter(&g, &[a("198.51.100.20")]).unwrap_err();
        assert_eq!(denial, Denial::OutsideRuleCidrs(a("198.51.100.20")));
        assert_eq!(denial.reason(), "address-outside-cidrs");
        assert!(
            denial
                .to_string()
                .contains("198.51.100.20 is outside the cidrs")
        );
        // Other private ranges, IPv6 addresses and IPv6 forms of the subnet are outside too.
        for outside in ["10.241.0.5", "127.0.0.1", "2603:1000::1", "64:ff9b::af0:5"] {
            assert_eq!(
                p.filter(&g, &[a(outside)]),
                Err(Denial::OutsideRuleCidrs(a(outside)))
            );
        }
        // Deny ranges still win inside the rule's cidrs.
        assert_eq!(
            p.filter(&g, &[a("10.240.0.200")]),
            Err(Denial::AddressDenied(a("10.240.0.200")))
        );
        // A mixed answer keeps only the private endpoint.
        assert_eq!(
            p.filter(&g, &[a("198.51.100.20"), a("10.240.0.5")]),
            Ok(vec![a("10.240.0.5")])
        );
        // Without the switch, public addresses stay allowed (today's meaning).
        let g = p.authorize(&name("www.example.com", 443)).unwrap();
        assert!(p.filter(&g, &[a("198.51.100.20")]).is_ok());
        assert!(p.filter(&g, &[a("10.240.0.5")]).is_ok());
    }

    #[test]
    fn each_matching_rule_is_its_own_scope() {
        // A wildcard rule without onlyCIDRs also matches: either rule may allow an address.
        let p = policy(
            "allow:\n- {host: a.x.com, cidrs: [10.1.0.0/24], onlyCIDRs: true}\n- {host: '*.x.com', cidrs: [10.2.0.0/24]}",
        );
        let g = p.authorize(&name("a.x.com", 443)).unwrap();
        assert_eq!(g.scopes.len(), 2);
        assert!(p.filter(&g, &[a("10.1.0.1")]).is_ok());
        assert!(p.filter(&g, &[a("10.2.0.1")]).is_ok());
        assert!(p.filter(&g, &[a("198.51.100.20")]).is_ok());
        // The onlyCIDRs rule alone (other port) refuses what is outside its range.
        let p = policy(
            "allow:\n- {host: a.x.com, cidrs: [10.1.0.0/24], onlyCIDRs: true}\n- {host: '*.x.com', cidrs: [10.2.0.0/24], ports: [8443]}",
        );
        let g = p.authorize(&name("a.x.com", 443)).unwrap();
        assert_eq!(
            p.filter(&g, &[a("10.2.0.1")]),
            Err(Denial::OutsideRuleCidrs(a("10.2.0.1")))
        );
        assert_eq!(
            p.filter(&g, &[a("198.51.100.20")]),
            Err(Denial::OutsideRuleCidrs(a("198.51.100.20")))
        );
    }
}
