//! `[grants]`: what the config file lets anything below it grant. The
//! management API, the agent and cloud deployments register modules; the
//! config file is the device owner's. A module those register is refused,
//! naming the ceiling, when it asks for more than this:
//!
//! ```toml
//! [grants]
//! outbound = ["10.0.5.0/24:502", "169.254.169.254"]  # non-public addresses
//!                                     # modules may be granted (CIDR or IP,
//!                                     # optional :PORT); default none
//! server_names = ["*.gw-17.example.com", "10.0.5.0/24"]  # default: any DNS
//!                                     # name, single IP addresses, no blocks.
//!                                     # A `*.` entry here is a subtree: it
//!                                     # covers every name and wildcard under
//!                                     # it; a plain name covers only itself
//! max_memory = "512MiB"               # default 1GiB
//! max_disk = "1GiB"                   # default 1GiB
//! components_quota = "2GiB"           # the component store; default 4GiB
//! ```
//!
//! Public internet destinations (names, public addresses) need no say-so:
//! a listed name never resolves into a non-public address anyway. An
//! `allow_outbound` address or block that reaches the LAN, loopback,
//! link-local (the metadata service) or any other non-public class must lie
//! within an `outbound` entry. `0.0.0.0/0:443` holds all of them, so it is
//! refused unless `outbound` holds `0.0.0.0/0` too. Config-file modules are
//! the owner's word and are not held to this.

use std::net::IpAddr;

use crate::addrclass::{block_class, canonical, in_block, parse_cidr};
use crate::identity::names::ServerName;
use crate::runtime::network::{Outbound, OutboundHost};
use crate::spec::ModuleSpec;
use crate::units::{format_size, parse_size};

/// Default `max_memory` ceiling.
pub const DEFAULT_MAX_MEMORY: u64 = 1 << 30;
/// Default `max_disk` ceiling.
pub const DEFAULT_MAX_DISK: u64 = 1 << 30;
/// Default component store quota.
pub const DEFAULT_COMPONENTS_QUOTA: u64 = 4 << 30;

/// A non-public block modules may be granted: network, prefix, port (any
/// when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    net: IpAddr,
    len: u8,
    port: Option<u16>,
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}/{}:{p}", self.net, self.len),
            None => write!(f, "{}/{}", self.net, self.len),
        }
    }
}

fn parse_block(s: &str) -> Result<Block, String> {
    let bad = |why: String| {
        format!(
            "grants.outbound {s:?}: {why} (CIDR or IP, optional :PORT; IPv6 in brackets with a port)"
        )
    };
    // IP or CIDR alone.
    if let Ok(ip) = s.parse::<IpAddr>() {
        let ip = canonical(ip);
        return Ok(Block {
            net: ip,
            len: if ip.is_ipv4() { 32 } else { 128 },
            port: None,
        });
    }
    if let Ok((net, len)) = parse_cidr(s) {
        return Ok(Block {
            net,
            len,
            port: None,
        });
    }
    let o: Outbound = s.parse().map_err(bad)?;
    match o.host {
        OutboundHost::Ip(ip) => Ok(Block {
            net: ip,
            len: if ip.is_ipv4() { 32 } else { 128 },
            port: Some(o.port),
        }),
        OutboundHost::Cidr(net, len) => Ok(Block {
            net,
            len,
            port: Some(o.port),
        }),
        OutboundHost::Name(_) => Err(bad(
            "a name needs no grant (names never resolve into non-public addresses)".into(),
        )),
    }
}

/// The ceilings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    outbound: Vec<Block>,
    /// `None`: the default (any DNS name, single addresses).
    server_names: Option<Vec<ServerName>>,
    /// Largest `max_memory`.
    pub max_memory: u64,
    /// Largest `max_disk`.
    pub max_disk: u64,
    /// Most bytes the component store may hold.
    pub components_quota: u64,
    device_id: String,
}

impl Default for Grants {
    fn default() -> Self {
        Self {
            outbound: Vec::new(),
            server_names: None,
            max_memory: DEFAULT_MAX_MEMORY,
            max_disk: DEFAULT_MAX_DISK,
            components_quota: DEFAULT_COMPONENTS_QUOTA,
            device_id: String::new(),
        }
    }
}

/// `[grants]` as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrants {
    #[serde(default)]
    outbound: Vec<String>,
    server_names: Option<Vec<String>>,
    max_memory: Option<String>,
    max_disk: Option<String>,
    components_quota: Option<String>,
}

impl RawGrants {
    /// Checks each field; `device_id` expands `{device}` in module
    /// server names when they are compared.
    ///
    /// # Errors
    ///
    /// The field and what is wrong with it.
    pub fn validate(self, device_id: &str) -> Result<Grants, String> {
        let outbound = self
            .outbound
            .iter()
            .map(|s| parse_block(s))
            .collect::<Result<Vec<_>, _>>()?;
        let server_names = self
            .server_names
            .map(|v| {
                v.iter()
                    .map(|s| s.parse().map_err(|e| format!("grants.server_names: {e}")))
                    .collect::<Result<Vec<ServerName>, String>>()
            })
            .transpose()?;
        let size = |field: &str, v: &Option<String>, default: u64| -> Result<u64, String> {
            v.as_deref().map_or(Ok(default), |s| {
                parse_size(s).map_err(|e| format!("grants.{field}: {e}"))
            })
        };
        Ok(Grants {
            outbound,
            server_names,
            max_memory: size("max_memory", &self.max_memory, DEFAULT_MAX_MEMORY)?,
            max_disk: size("max_disk", &self.max_disk, DEFAULT_MAX_DISK)?,
            components_quota: size(
                "components_quota",
                &self.components_quota,
                DEFAULT_COMPONENTS_QUOTA,
            )?,
            device_id: device_id.to_owned(),
        })
    }
}

fn block_within(outer: &Block, net: IpAddr, len: u8, port: u16) -> bool {
    outer.net.is_ipv4() == net.is_ipv4()
        && outer.len <= len
        && in_block(outer.net, outer.len, net)
        && outer.port.is_none_or(|p| p == port)
}

fn name_covers(ceiling: &ServerName, entry: &ServerName) -> bool {
    let under = |suffix: &str, name: &str| name == suffix || name.ends_with(&format!(".{suffix}"));
    match (ceiling, entry) {
        (ServerName::Dns(c) | ServerName::Wildcard(c), ServerName::Dns(e)) => {
            if matches!(ceiling, ServerName::Dns(_)) {
                c == e
            } else {
                e.ends_with(&format!(".{c}"))
            }
        }
        (ServerName::Wildcard(c), ServerName::Wildcard(e)) => under(c, e),
        (ServerName::Ip(c), ServerName::Ip(e)) => c == e,
        (ServerName::Cidr(net, len), ServerName::Ip(e)) => in_block(*net, *len, *e),
        (ServerName::Cidr(net, len), ServerName::Cidr(enet, elen)) => {
            net.is_ipv4() == enet.is_ipv4() && len <= elen && in_block(*net, *len, *enet)
        }
        _ => false,
    }
}

impl Grants {
    /// Checks what `spec` asks for against the ceilings.
    ///
    /// # Errors
    ///
    /// The first grant beyond a ceiling, naming both.
    pub fn check(&self, spec: &ModuleSpec) -> Result<(), String> {
        let l = &spec.limits;
        if l.max_memory > self.max_memory {
            return Err(format!(
                "max_memory {} is above the device's ceiling [grants] max_memory = {}",
                format_size(l.max_memory),
                format_size(self.max_memory)
            ));
        }
        if l.max_disk > self.max_disk {
            return Err(format!(
                "max_disk {} is above the device's ceiling [grants] max_disk = {}",
                format_size(l.max_disk),
                format_size(self.max_disk)
            ));
        }
        for o in &spec.allow_outbound {
            let (net, len) = match o.host {
                OutboundHost::Name(_) => continue,
                OutboundHost::Ip(ip) => (ip, if ip.is_ipv4() { 32 } else { 128 }),
                OutboundHost::Cidr(net, len) => (net, len),
            };
            let Some(class) = block_class(net, len) else {
                continue;
            };
            if !self
                .outbound
                .iter()
                .any(|b| block_within(b, net, len, o.port))
            {
                return Err(format!(
                    "allow_outbound {o} reaches {class} addresses, which the device's [grants] outbound does not allow{}",
                    if self.outbound.is_empty() {
                        " (it allows none)".to_owned()
                    } else {
                        format!(
                            " (it allows {})",
                            self.outbound
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                ));
            }
        }
        let names = spec
            .server_names
            .resolve(&spec.name, &self.device_id)
            .map_err(|e| format!("server_names: {e}"))?;
        for (entry, written) in names.entries().iter().zip(spec.server_names.entries()) {
            let ok = match &self.server_names {
                None => !matches!(entry, ServerName::Cidr(..)),
                Some(ceiling) => ceiling.iter().any(|c| name_covers(c, entry)),
            };
            if !ok {
                return Err(format!(
                    "server_names {written:?} is beyond the device's ceiling [grants] server_names ({})",
                    match &self.server_names {
                        None => "by default: DNS names and single addresses, no blocks".to_owned(),
                        Some(c) => c
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                ));
            }
        }
        Ok(())
    }

    /// Whether `ip` (an address a module was granted) is one a ceiling
    /// names: for tests and `edgeward check`.
    pub fn allows_address(&self, ip: IpAddr, port: u16) -> bool {
        let ip = canonical(ip);
        let len = if ip.is_ipv4() { 32 } else { 128 };
        self.outbound.iter().any(|b| block_within(b, ip, len, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(toml_text: &str) -> Grants {
        let raw: RawGrants = toml::from_str(toml_text).unwrap();
        raw.validate("gw-17").unwrap()
    }

    fn spec(extra: &str) -> ModuleSpec {
        let raw: crate::spec::RawModuleSpec = toml::from_str(&format!(
            "name = \"m\"\ndigest = \"sha256:{}\"\n{extra}",
            "a".repeat(64)
        ))
        .unwrap();
        raw.validate(
            &|p: &std::path::Path| p.to_owned(),
            &crate::runtime::engine::ModuleCeilings::default(),
        )
        .unwrap()
    }

    #[test]
    fn non_public_destinations_need_the_config_files_say_so() {
        let g = Grants::default();
        assert!(
            g.check(&spec(
                "allow_outbound = [\"example.com:443\", \"8.8.8.8:53\"]"
            ))
            .is_ok()
        );
        for (entry, class) in [
            ("169.254.169.254:80", "link-local"),
            ("127.0.0.1:8080", "loopback"),
            ("10.0.5.7:502", "private-use"),
            ("0.0.0.0/0:443", ""),
            ("[::/0]:443", ""),
            ("8.0.0.0/6:443", "private-use"),
            ("198.0.0.0/7:443", "benchmarking"),
            ("96.0.0.0/4:443", "shared address space"),
            ("[2001::/16]:443", "IETF"),
            ("[fc00::/6]:443", "unique-local"),
            ("[::fffe:0:0/95]:443", "IPv4-mapped"),
            ("[64:ff9b::/95]:443", "NAT64"),
        ] {
            let e = g
                .check(&spec(&format!("allow_outbound = [\"{entry}\"]")))
                .unwrap_err();
            assert!(
                e.contains("[grants] outbound") && e.contains(class),
                "{entry}: {e}"
            );
        }
        let g = grants("outbound = [\"10.0.5.0/24:502\", \"169.254.169.254\"]");
        assert!(
            g.check(&spec("allow_outbound = [\"10.0.5.7:502\"]"))
                .is_ok()
        );
        assert!(
            g.check(&spec("allow_outbound = [\"10.0.5.0/28:502\"]"))
                .is_ok()
        );
        assert!(
            g.check(&spec("allow_outbound = [\"169.254.169.254:80\"]"))
                .is_ok()
        );
        assert!(
            g.check(&spec("allow_outbound = [\"10.0.5.7:22\"]"))
                .is_err()
        );
        assert!(
            g.check(&spec("allow_outbound = [\"10.0.0.0/8:502\"]"))
                .is_err()
        );
    }

    #[test]
    fn server_names_and_sizes_have_ceilings() {
        let g = Grants::default();
        assert!(
            g.check(&spec("server_names = [\"api.example.com\", \"10.0.0.7\"]"))
                .is_ok()
        );
        let e = g
            .check(&spec("server_names = [\"0.0.0.0/0\"]"))
            .unwrap_err();
        assert!(e.contains("[grants] server_names"), "{e}");
        let g = grants("server_names = [\"*.gw-17.example.com\"]");
        assert!(
            g.check(&spec("server_names = [\"{module}.{device}.example.com\"]"))
                .is_ok()
        );
        assert!(
            g.check(&spec("server_names = [\"*.gw-17.example.com\"]"))
                .is_ok()
        );
        assert!(
            g.check(&spec("server_names = [\"broker.example.com\"]"))
                .is_err()
        );
        let e = Grants::default()
            .check(&spec("max_disk = \"1024GiB\""))
            .unwrap_err();
        assert!(e.contains("[grants] max_disk"), "{e}");
        let e = Grants::default()
            .check(&spec("max_memory = \"4GiB\""))
            .unwrap_err();
        assert!(e.contains("[grants] max_memory"), "{e}");
    }

    #[test]
    fn bad_ceilings_are_named() {
        let raw: RawGrants = toml::from_str("outbound = [\"example.com:443\"]").unwrap();
        assert!(raw.validate("d").unwrap_err().contains("grants.outbound"));
        let raw: RawGrants = toml::from_str("max_disk = \"lots\"").unwrap();
        assert!(raw.validate("d").unwrap_err().contains("grants.max_disk"));
    }
}
