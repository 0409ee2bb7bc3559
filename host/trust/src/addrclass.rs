//! Addresses and names as policies write them (CIDR blocks, DNS names),
//! and which addresses are not the public internet, from IANA's IPv4 and IPv6
//! Special-Purpose Address Registries (the entries whose "Globally
//! Reachable" is not True; a more specific entry marked True, like the
//! AS112 and anycast blocks, wins over its covering block), plus the
//! multicast ranges, the deprecated IPv6 site-local block and the NAT64
//! prefixes (`64:ff9b::/96` is marked globally reachable, but it reaches
//! whatever IPv4 address it embeds through a local translator, the LAN
//! included).
//!
//! IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`)
//! addresses are classified as the IPv4 address they carry.
//!
//! On a gateway the LAN is the real target (PLCs, the router's admin page,
//! the cloud metadata service): a module reaches such an address only when
//! its allow-list names it, or a CIDR block that contains it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `(network, prefix length, registry name, globally reachable)`.
type V4Entry = (u32, u8, &'static str, bool);
type V6Entry = (u128, u8, &'static str, bool);

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

/// IANA IPv4 Special-Purpose Address Registry, and multicast.
const V4: &[V4Entry] = &[
    (v4(0, 0, 0, 0), 8, "\"this network\" (0.0.0.0/8)", false),
    (v4(10, 0, 0, 0), 8, "private-use (RFC 1918)", false),
    (
        v4(100, 64, 0, 0),
        10,
        "shared address space (RFC 6598)",
        false,
    ),
    (v4(127, 0, 0, 0), 8, "loopback", false),
    (v4(169, 254, 0, 0), 16, "link-local", false),
    (v4(172, 16, 0, 0), 12, "private-use (RFC 1918)", false),
    (v4(192, 0, 0, 0), 24, "IETF protocol assignments", false),
    (v4(192, 0, 0, 9), 32, "PCP anycast", true),
    (v4(192, 0, 0, 10), 32, "TURN anycast", true),
    (v4(192, 0, 2, 0), 24, "documentation (TEST-NET-1)", false),
    (v4(192, 31, 196, 0), 24, "AS112-v4", true),
    (v4(192, 52, 193, 0), 24, "AMT", true),
    (
        v4(192, 88, 99, 0),
        24,
        "deprecated 6to4 relay anycast",
        false,
    ),
    (v4(192, 168, 0, 0), 16, "private-use (RFC 1918)", false),
    (v4(192, 175, 48, 0), 24, "direct delegation AS112", true),
    (v4(198, 18, 0, 0), 15, "benchmarking", false),
    (v4(198, 51, 100, 0), 24, "documentation (TEST-NET-2)", false),
    (v4(203, 0, 113, 0), 24, "documentation (TEST-NET-3)", false),
    (v4(224, 0, 0, 0), 4, "multicast", false),
    (v4(240, 0, 0, 0), 4, "reserved", false),
    (v4(255, 255, 255, 255), 32, "limited broadcast", false),
];

const fn v6(s: [u16; 8]) -> u128 {
    let mut out = 0u128;
    let mut i = 0;
    while i < 8 {
        out = (out << 16) | s[i] as u128;
        i += 1;
    }
    out
}

/// IANA IPv6 Special-Purpose Address Registry, multicast, site-local, and
/// the NAT64 prefixes. (IPv4-mapped and -compatible addresses are handled
/// before this table.)
const V6: &[V6Entry] = &[
    (0, 128, "unspecified", false),
    (1, 128, "loopback", false),
    (
        v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]),
        96,
        "NAT64 (64:ff9b::/96)",
        false,
    ),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]),
        48,
        "local-use NAT64 (64:ff9b:1::/48)",
        false,
    ),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, "discard-only", false),
    (v6([0x100, 0, 0, 1, 0, 0, 0, 0]), 64, "dummy prefix", false),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0]),
        23,
        "IETF protocol assignments",
        false,
    ),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 32, "Teredo", false),
    (v6([0x2001, 1, 0, 0, 0, 0, 0, 1]), 128, "PCP anycast", true),
    (v6([0x2001, 1, 0, 0, 0, 0, 0, 2]), 128, "TURN anycast", true),
    (
        v6([0x2001, 1, 0, 0, 0, 0, 0, 3]),
        128,
        "DNS-SD SRP anycast",
        true,
    ),
    (v6([0x2001, 2, 0, 0, 0, 0, 0, 0]), 48, "benchmarking", false),
    (v6([0x2001, 3, 0, 0, 0, 0, 0, 0]), 32, "AMT", true),
    (v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0]), 48, "AS112-v6", true),
    (
        v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0]),
        28,
        "deprecated ORCHID",
        false,
    ),
    (v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0]), 28, "ORCHIDv2", true),
    (
        v6([0x2001, 0x30, 0, 0, 0, 0, 0, 0]),
        28,
        "drone remote ID",
        true,
    ),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]),
        32,
        "documentation",
        false,
    ),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16, "6to4", false),
    (
        v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0]),
        48,
        "direct delegation AS112",
        true,
    ),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]),
        20,
        "documentation",
        false,
    ),
    (
        v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]),
        16,
        "segment routing SIDs",
        false,
    ),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, "unique-local", false),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, "link-local", false),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]),
        10,
        "deprecated site-local",
        false,
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, "multicast", false),
];

fn v4_mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn v6_mask(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

fn classify_v4(a: Ipv4Addr) -> Option<&'static str> {
    let a = u32::from(a);
    V4.iter()
        .filter(|(net, len, _, _)| a & v4_mask(*len) == *net)
        .max_by_key(|(_, len, _, _)| *len)
        .and_then(|(_, _, name, global)| (!global).then_some(*name))
}

/// The IPv4 address an IPv4-mapped or IPv4-compatible IPv6 address carries
/// (not `::` and `::1`, which are IPv6's own).
pub fn embedded_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = a.to_ipv4_mapped() {
        return Some(v4);
    }
    let bits = u128::from(a);
    (bits >> 32 == 0 && bits > 1).then(|| Ipv4Addr::from(bits as u32))
}

/// The address with IPv4-mapped and -compatible forms turned into IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => embedded_v4(a).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The special-purpose class of `ip` if it is not a globally reachable
/// unicast address (`None`: the public internet).
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(a) => classify_v4(a),
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            V6.iter()
                .filter(|(net, len, _, _)| bits & v6_mask(*len) == *net)
                .max_by_key(|(_, len, _, _)| *len)
                .and_then(|(_, _, name, global)| (!global).then_some(*name))
        }
    }
}

/// A special-purpose class some address of `net/len` belongs to (`None`:
/// every address in the block is public). Two CIDR blocks overlap exactly
/// when they agree on the shorter prefix. In IPv6 the IPv4-mapped and
/// IPv4-compatible ranges count as non-public: they carry IPv4 addresses,
/// the LAN's included. (A block inside a globally reachable exception,
/// such as an anycast /32, is still reported: erring toward a refusal.)
pub fn block_class(net: IpAddr, len: u8) -> Option<&'static str> {
    match canonical(net) {
        IpAddr::V4(a) => {
            let n = u32::from(a);
            V4.iter()
                .find(|(e, l, _, global)| !global && (n ^ e) & v4_mask(len.min(*l).min(32)) == 0)
                .map(|(_, _, name, _)| *name)
        }
        IpAddr::V6(a) => {
            let n = u128::from(a);
            let overlaps = |e: u128, l: u8| (n ^ e) & v6_mask(len.min(l).min(128)) == 0;
            if overlaps(0xffff_u128 << 32, 96) {
                return Some("IPv4-mapped");
            }
            if overlaps(0, 96) {
                return Some("IPv4-compatible");
            }
            V6.iter()
                .find(|(e, l, _, global)| !global && overlaps(*e, *l))
                .map(|(_, _, name, _)| *name)
        }
    }
}

/// Whether `ip` lies in `net/len` (both compared in canonical form).
pub fn in_block(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (canonical(net), canonical(ip)) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            u32::from(n) & v4_mask(len) == u32::from(a) & v4_mask(len)
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            u128::from(n) & v6_mask(len) == u128::from(a) & v6_mask(len)
        }
        _ => false,
    }
}

/// Parses `ADDR/LEN` into a CIDR block (IPv4-mapped addresses as IPv4);
/// the host bits must be zero.
///
/// # Errors
///
/// What is wrong with it.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s.split_once('/').ok_or("no '/'")?;
    let ip = canonical(
        addr.parse::<IpAddr>()
            .map_err(|_| format!("{addr:?} is not an IP address"))?,
    );
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("prefix length must be 0..={max}"))?;
    let net = network_of(ip, len);
    if net != ip {
        return Err(format!("host bits are set; the block is {net}/{len}"));
    }
    Ok((ip, len))
}

/// Whether `label` is an LDH label of 1-63 bytes.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// Checks a DNS name: 1-253 bytes of LDH labels (one trailing dot allowed).
///
/// # Errors
///
/// What is wrong with it.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1-253 bytes".into());
    }
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.split('.').all(is_dns_label) {
        Ok(())
    } else {
        Err("is not a DNS name (labels of a-z 0-9 -, 1-63 bytes each)".into())
    }
}

/// The network address of `ip/len` (host bits cleared).
pub fn network_of(ip: IpAddr, len: u8) -> IpAddr {
    match canonical(ip) {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) & v4_mask(len)).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) & v6_mask(len)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_holding_any_non_public_address_are_named() {
        let b = |s: &str| {
            let (n, l) = parse_cidr(s).unwrap();
            block_class(n, l)
        };
        assert_eq!(b("8.8.8.0/24"), None);
        assert_eq!(b("1.0.0.0/8"), None);
        assert_eq!(b("0.0.0.0/0"), Some("\"this network\" (0.0.0.0/8)"));
        assert_eq!(b("198.0.0.0/7"), Some("benchmarking"));
        assert_eq!(b("100.0.0.0/8"), Some("shared address space (RFC 6598)"));
        assert_eq!(b("224.0.0.0/3"), Some("multicast"));
        assert_eq!(b("2600::/16"), None);
        assert_eq!(b("fe00::/7"), Some("link-local"));
        assert_eq!(b("::/0"), Some("IPv4-mapped"));
        assert_eq!(b("64:ff9b::/96"), Some("NAT64 (64:ff9b::/96)"));
    }

    fn class(s: &str) -> Option<&'static str> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn registry_classes() {
        for (ip, want) in [
            ("10.1.2.3", "private-use"),
            ("172.16.0.1", "private-use"),
            ("172.31.255.255", "private-use"),
            ("192.168.1.1", "private-use"),
            ("100.64.0.1", "shared address space"),
            ("100.127.255.254", "shared address space"),
            ("0.1.2.3", "this network"),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("192.0.0.170", "IETF"),
            ("198.18.0.1", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.251", "multicast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique-local"),
            ("fc00::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("64:ff9b::a00:1", "NAT64"),
            ("64:ff9b::808:808", "NAT64"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("2001:db8::1", "documentation"),
            ("2002:a00:1::1", "6to4"),
            // IPv4-mapped and IPv4-compatible forms are their IPv4 class.
            ("::ffff:10.0.0.1", "private-use"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::10.0.0.1", "private-use"),
            ("::169.254.169.254", "link-local"),
        ] {
            let got = class(ip);
            assert!(
                got.is_some_and(|c| c.contains(want)),
                "{ip}: {got:?}, expected {want}"
            );
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.0.9",
            "192.31.196.1",
            "2606:4700::1111",
            "2001:4:112::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }

    #[test]
    fn blocks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_block(ip("10.0.5.0"), 24, ip("10.0.5.77")));
        assert!(in_block(ip("10.0.5.0"), 24, ip("::ffff:10.0.5.77")));
        assert!(!in_block(ip("10.0.5.0"), 24, ip("10.0.6.1")));
        assert!(in_block(ip("fd00::"), 8, ip("fd12::1")));
        assert!(!in_block(ip("fd00::"), 8, ip("10.0.0.1")));
        assert_eq!(network_of(ip("10.0.5.9"), 24), ip("10.0.5.0"));
    }
}
