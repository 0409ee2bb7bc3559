//! Which names a module may get a server certificate for: its
//! registration's `server_names`, deny by default.
//!
//! An entry is one of
//! - an exact DNS name: `api.gw.example`;
//! - `*.suffix`, which matches exactly one label before `suffix`
//!   (`*.svc.example` allows `a.svc.example`, not `a.b.svc.example` nor
//!   `svc.example`);
//! - an IP address: `10.0.0.7`, `fd00::7`;
//! - a CIDR block: `10.0.5.0/24`, `fd00::/64` (host bits must be zero).
//!
//! DNS names compare case-insensitively and without a trailing dot; IPv4
//! addresses written in IPv4-mapped IPv6 form (`::ffff:10.0.0.7`) are
//! treated as the IPv4 address.
//!
//! The placeholders `{module}` and `{device}` stand for the module's name and
//! the device id, so one convention serves every module:
//! `{module}.{device}.edge.example`. They expand only where the name is a
//! DNS label already (`a-z 0-9 -`, not starting or ending with `-`):
//! module names and device ids may hold `_` and `.`, which are refused
//! rather than mapped, so two modules can never expand to the same name.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::addrclass::{canonical, check_dns_name, in_block, is_dns_label, parse_cidr};

/// Most entries a registration's `server_names` may hold.
pub const MAX_SERVER_NAMES: usize = 64;

/// One allowed server name (pattern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerName {
    /// An exact DNS name, lowercase, without a trailing dot.
    Dns(String),
    /// `*.suffix`: exactly one label, then `suffix` (stored without `*.`).
    Wildcard(String),
    /// One IP address.
    Ip(IpAddr),
    /// A CIDR block: network address (host bits zero) and prefix length.
    Cidr(IpAddr, u8),
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerName::Dns(d) => f.write_str(d),
            ServerName::Wildcard(s) => write!(f, "*.{s}"),
            ServerName::Ip(ip) => write!(f, "{ip}"),
            ServerName::Cidr(ip, len) => write!(f, "{ip}/{len}"),
        }
    }
}

/// Lowercases and strips one trailing dot.
fn normalize_dns(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl FromStr for ServerName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: String| format!("server name {s:?}: {why}");
        if s.contains('/') {
            let (ip, len) = parse_cidr(s).map_err(bad)?;
            return Ok(ServerName::Cidr(ip, len));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(ServerName::Ip(canonical(ip)));
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            check_dns_name(suffix).map_err(|e| bad(format!("the suffix {e}")))?;
            if !suffix.contains('.') {
                return Err(bad(
                    "a wildcard needs a suffix of at least two labels (*.example.com)".into(),
                ));
            }
            return Ok(ServerName::Wildcard(normalize_dns(suffix)));
        }
        if s.contains('*') {
            return Err(bad(
                "'*' is allowed only as the whole first label (*.suffix)".into(),
            ));
        }
        check_dns_name(s).map_err(bad)?;
        Ok(ServerName::Dns(normalize_dns(s)))
    }
}

/// A registration's `server_names` as written (placeholders unexpanded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNamePolicy {
    entries: Vec<String>,
}

/// Expands `{module}` and `{device}` in `entry`.
fn expand(entry: &str, module: &str, device: &str) -> Result<String, String> {
    let mut out = entry.to_owned();
    for (placeholder, value, what) in [
        ("{module}", module, "module name"),
        ("{device}", device, "device id"),
    ] {
        if out.contains(placeholder) {
            if !is_dns_label(value) {
                return Err(format!(
                    "server name {entry:?}: {placeholder} needs a {what} that is a DNS label (a-z 0-9 -), and {value:?} is not; write the name out instead"
                ));
            }
            out = out.replace(placeholder, &value.to_ascii_lowercase());
        }
    }
    Ok(out)
}

impl ServerNamePolicy {
    /// The entries as written (placeholders not expanded).
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// Checks `entries` (placeholders expanded with sample labels) and keeps
    /// them for [`ServerNamePolicy::resolve`].
    ///
    /// # Errors
    ///
    /// The first malformed entry, named.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        if entries.len() > MAX_SERVER_NAMES {
            return Err(format!(
                "{} server names; the limit is {MAX_SERVER_NAMES}",
                entries.len()
            ));
        }
        for e in entries {
            expand(e, "module", "device")?.parse::<ServerName>()?;
        }
        Ok(Self {
            entries: entries.to_vec(),
        })
    }

    /// The names a module called `module` on device `device` may use.
    ///
    /// # Errors
    ///
    /// A placeholder whose value is not a DNS label.
    pub fn resolve(&self, module: &str, device: &str) -> Result<ServerNames, String> {
        self.entries
            .iter()
            .map(|e| expand(e, module, device)?.parse())
            .collect::<Result<_, _>>()
            .map(ServerNames)
    }
}

/// The server names one registration may get certificates for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNames(Vec<ServerName>);

impl ServerNames {
    /// The entries, expanded.
    pub fn entries(&self) -> &[ServerName] {
        &self.0
    }

    /// Whether the DNS name `name` (already checked) is allowed.
    pub fn permits_dns(&self, name: &str) -> bool {
        let name = normalize_dns(name);
        self.0.iter().any(|e| match e {
            ServerName::Dns(d) => *d == name,
            ServerName::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(is_dns_label),
            _ => false,
        })
    }

    /// Whether the IP address `ip` is allowed.
    pub fn permits_ip(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|e| match e {
            ServerName::Ip(a) => *a == ip,
            ServerName::Cidr(net, len) => in_block(*net, *len, ip),
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> ServerNames {
        let v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
        ServerNamePolicy::parse(&v)
            .unwrap()
            .resolve("sensor", "gw1")
            .unwrap()
    }

    #[test]
    fn entries_parse_or_say_why() {
        for ok in [
            "api.local",
            "API.Example.com.",
            "*.svc.example",
            "10.0.0.7",
            "fd00::7",
            "10.0.5.0/24",
            "fd00::/8",
        ] {
            assert!(ok.parse::<ServerName>().is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "1-253"),
            ("a b", "not a DNS name"),
            ("*.com", "two labels"),
            ("a.*.com", "first label"),
            ("**.a.com", "suffix"),
            ("10.0.5.1/24", "host bits"),
            ("10.0.0.0/33", "0..=32"),
            ("x/8", "IP address"),
        ] {
            let e = bad.parse::<ServerName>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn matching() {
        let n = names(&[
            "api.local",
            "*.svc.example",
            "10.0.0.7",
            "10.0.5.0/24",
            "fd00::/16",
        ]);
        assert!(n.permits_dns("api.local"));
        assert!(n.permits_dns("API.local."));
        assert!(!n.permits_dns("x.api.local"));
        assert!(n.permits_dns("a.svc.example"));
        assert!(!n.permits_dns("a.b.svc.example"), "one label only");
        assert!(!n.permits_dns("svc.example"));
        assert!(!n.permits_dns("asvc.example"));
        assert!(n.permits_ip("10.0.0.7".parse().unwrap()));
        assert!(n.permits_ip("::ffff:10.0.0.7".parse().unwrap()));
        assert!(!n.permits_ip("10.0.0.8".parse().unwrap()));
        assert!(n.permits_ip("10.0.5.200".parse().unwrap()));
        assert!(!n.permits_ip("10.0.6.1".parse().unwrap()));
        assert!(n.permits_ip("fd00::1".parse().unwrap()));
        assert!(!n.permits_ip("fd01::1".parse().unwrap()));
        let none = ServerNames::default();
        assert!(!none.permits_dns("api.local"));
        assert!(!none.permits_ip("10.0.0.7".parse().unwrap()));
    }

    #[test]
    fn placeholders_expand_only_to_dns_labels() {
        let p = ServerNamePolicy::parse(&["{module}.{device}.edge.example".into()]).unwrap();
        let n = p.resolve("sensor-1", "gw1").unwrap();
        assert!(n.permits_dns("sensor-1.gw1.edge.example"));
        let e = p.resolve("sensor_1", "gw1").unwrap_err();
        assert!(e.contains("module name") && e.contains("sensor_1"), "{e}");
        let e = p.resolve("s", "gw.lan").unwrap_err();
        assert!(e.contains("device id"), "{e}");
        assert!(ServerNamePolicy::parse(&["{module}.*.x.y".into()]).is_err());
    }
}
