//! The NO_PROXY value: what a pod reaches directly, written so every common client reads it.
//!
//! Clients disagree on the format (Go matches CIDRs, Python requests only IPv4 CIDRs, urllib
//! none; nobody agrees on `*.` prefixes), so the list carries hostnames and `.suffix` entries
//! for the weakest readers, CIDRs for the rest, and literal IPs for everyone.

use std::net::IpAddr;

use ipnet::IpNet;

/// An ordered NO_PROXY list without duplicates: entries keep the order they were first
/// pushed in, so the value (and its hash in the status annotation) is stable. Lists hold
/// tens of entries and are cloned per review, so duplicates are found by a scan rather than
/// a hash set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoProxyList {
    /// Entries in push order, unique ignoring ASCII case (hostnames are case-insensitive).
    entries: Vec<String>,
}

/// Loopback in every spelling a client might use: the name, and both IP families.
pub const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

impl NoProxyList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `entry` unless an equal entry (ignoring case) is already there.
    pub fn push(&mut self, entry: impl Into<String>) {
        let entry = entry.into();
        if entry.is_empty() {
            return;
        }
        if !self.entries.iter().any(|e| e.eq_ignore_ascii_case(&entry)) {
            self.entries.push(entry);
        }
    }

    /// Appends each of `entries` in order.
    pub fn extend<I, S>(&mut self, entries: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for entry in entries {
            self.push(entry);
        }
    }

    /// Appends a CIDR in canonical form (`10.96.0.0/12`).
    pub fn push_cidr(&mut self, net: &IpNet) {
        self.push(net.trunc().to_string());
    }

    /// Appends the cluster-domain suffixes that cover every Service and Pod DNS name:
    /// `.svc`, `.svc.<domain>` and `.<domain>`.
    pub fn push_cluster_domain(&mut self, domain: &str) {
        self.push(".svc");
        self.push(format!(".svc.{domain}"));
        self.push(format!(".{domain}"));
    }

    /// The entries in order.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// The value for the environment variable: entries joined by `,` with no spaces, since
    /// some clients do not trim.
    pub fn to_env_value(&self) -> String {
        self.entries.join(",")
    }

    /// The value of this list followed by `more`, as if `more`'s entries had been pushed
    /// onto a copy of it, without copying it (the per-review path: a fixed cluster part and
    /// a few entries per pod).
    pub fn to_env_value_with(&self, more: &NoProxyList) -> String {
        let mut value = self.to_env_value();
        let new = more
            .entries
            .iter()
            .filter(|m| !self.entries.iter().any(|e| e.eq_ignore_ascii_case(m)));
        for entry in new {
            if !value.is_empty() {
                value.push(',');
            }
            value.push_str(entry);
        }
        value
    }
}

/// The ClusterIP of the `kubernetes` Service: the first address of the primary service CIDR.
/// Listed as a literal IP because clients without CIDR support would miss it otherwise, and
/// client-go calls the API server there.
pub fn kubernetes_service_ip(service_cidr: &IpNet) -> Option<IpAddr> {
    match service_cidr.trunc() {
        IpNet::V4(net) => {
            let first = u32::from(net.network()).checked_add(1)?;
            let ip = std::net::Ipv4Addr::from(first);
            net.contains(&ip).then_some(IpAddr::V4(ip))
        }
        IpNet::V6(net) => {
            let first = u128::from(net.network()).checked_add(1)?;
            let ip = std::net::Ipv6Addr::from(first);
            net.contains(&ip).then_some(IpAddr::V6(ip))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_first_order_and_drops_duplicates_ignoring_case() {
        let mut list = NoProxyList::new();
        list.extend(LOOPBACK);
        list.extend(["pg-rw", "PG-RW", "localhost", "", "pg-ro"]);
        assert_eq!(list.to_env_value(), "localhost,127.0.0.1,::1,pg-rw,pg-ro");
    }

    #[test]
    fn value_with_more_equals_the_value_of_the_extended_list() {
        let mut cluster = NoProxyList::new();
        cluster.extend(["localhost", "10.0.0.0/8", ".svc"]);
        let mut pod = NoProxyList::new();
        pod.extend(["pg-rw.db", "LOCALHOST", "pg-rw", ".svc", "minio"]);
        let mut extended = cluster.clone();
        extended.extend(pod.entries().iter().cloned());
        assert_eq!(cluster.to_env_value_with(&pod), extended.to_env_value());
        assert_eq!(
            cluster.to_env_value_with(&pod),
            "localhost,10.0.0.0/8,.svc,pg-rw.db,pg-rw,minio"
        );
        assert_eq!(
            NoProxyList::new().to_env_value_with(&pod),
            pod.to_env_value()
        );
        assert_eq!(
            cluster.to_env_value_with(&NoProxyList::new()),
            cluster.to_env_value()
        );
    }

    #[test]
    fn cidrs_are_canonical_and_domains_cover_services() {
        let mut list = NoProxyList::new();
        list.push_cidr(&"10.96.0.1/12".parse().unwrap());
        list.push_cluster_domain("cluster.local");
        assert_eq!(
            list.entries(),
            [
                "10.96.0.0/12",
                ".svc",
                ".svc.cluster.local",
                ".cluster.local"
            ]
        );
    }

    #[test]
    fn kubernetes_service_ip_is_first_address() {
        assert_eq!(
            kubernetes_service_ip(&"10.96.0.0/12".parse().unwrap()),
            Some("10.96.0.1".parse().unwrap())
        );
        assert_eq!(
            kubernetes_service_ip(&"fd00:10:96::/108".parse().unwrap()),
            Some("fd00:10:96::1".parse().unwrap())
        );
        assert_eq!(kubernetes_service_ip(&"10.0.0.7/32".parse().unwrap()), None);
    }
}
