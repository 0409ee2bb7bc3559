//! Outbound network by allow-list only.
//!
//! A module reaches exactly the destinations its registration lists, and
//! nothing else: TCP connects, UDP datagrams (both ways), name lookups and
//! `wasi:http` requests are checked; listening and accepting are always
//! refused. An entry is `HOST:PORT`, `IP:PORT` or `CIDR:PORT` (IPv6 in
//! brackets: `[fd00::/8]:502`).
//!
//! Addresses that are not the public internet ([`addrclass`]: the LAN,
//! loopback, link-local and the metadata service, NAT64, multicast, …) are
//! reached only when an entry names the address or a CIDR block containing
//! it: a listed name never resolves its way into one.
//!
//! Names are resolved through a per-module cache whose entries live
//! [`DNS_TTL`] at most (failures [`DNS_NEGATIVE_TTL`]), seeded from the
//! answers the filtered `ip-name-lookup` returned to the guest, so the
//! address the guest connects to is the one it was given, and neither
//! connects, sends nor *received* datagrams cost a lookup each. `wasi:http`
//! resolves once, checks every address and connects to a vetted one
//! ([`super::http_client`]). Every refusal is logged and reaches the guest
//! as an error (`access-denied`, `HTTP-request-denied`).
//!
//! [`addrclass`]: edgeward_trust::addrclass

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::Resource;
use wasmtime_wasi::p2::SocketError;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{
    Host as LookupHost, HostResolveAddressStream, ResolveAddressStream,
};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddress, Network};
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsCtxView};

use super::loglimit::LogLimiter;
use edgeward_trust::addrclass::{canonical, check_dns_name, classify, in_block, parse_cidr};

/// How long a resolved name is trusted before it is resolved again.
pub const DNS_TTL: Duration = Duration::from_secs(30);
/// How long a failed or empty resolution is remembered.
pub const DNS_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Most addresses kept per name.
pub const DNS_MAX_ADDRESSES: usize = 32;
/// Most `wasi:http` requests a module may have in flight at once; more are
/// refused (`HTTP-request-denied`).
pub const MAX_HTTP_IN_FLIGHT: usize = 32;

/// The host part of an allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundHost {
    /// An IP literal: exactly this address.
    Ip(IpAddr),
    /// A CIDR block: network address (host bits zero) and prefix length.
    Cidr(IpAddr, u8),
    /// A DNS name (lowercase, no trailing dot).
    Name(String),
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Where.
    pub host: OutboundHost,
    /// Which port (1-65535).
    pub port: u16,
}

impl fmt::Display for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            OutboundHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            OutboundHost::Ip(ip) => write!(f, "{ip}:{}", self.port),
            OutboundHost::Cidr(IpAddr::V6(ip), len) => write!(f, "[{ip}/{len}]:{}", self.port),
            OutboundHost::Cidr(ip, len) => write!(f, "{ip}/{len}:{}", self.port),
            OutboundHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl FromStr for Outbound {
    type Err = String;

    /// `HOST:PORT`, `IPv4:PORT`, `[IPv6]:PORT`, `CIDR:PORT` or
    /// `[IPv6-CIDR]:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "invalid outbound destination {s:?}: {why} (expected HOST:PORT, IP:PORT or CIDR:PORT)"
            )
        };
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(bad("port 0"));
            }
            return Ok(Self {
                host: OutboundHost::Ip(canonical(addr.ip())),
                port: addr.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        if port == 0 {
            return Err(bad("port 0"));
        }
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if host.contains('/') {
            let (ip, len) = parse_cidr(bracketed.unwrap_or(host)).map_err(|e| bad(&e))?;
            if ip.is_ipv6() && bracketed.is_none() {
                return Err(bad("write an IPv6 block in brackets: [fd00::/8]:502"));
            }
            return Ok(Self {
                host: OutboundHost::Cidr(ip, len),
                port,
            });
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if check_dns_name(&host).is_err() {
            return Err(bad("bad host name"));
        }
        Ok(Self {
            host: OutboundHost::Name(host),
            port,
        })
    }
}

/// Whether `ip` is not the public internet (see [`addrclass`]): a listed
/// name may never resolve its way into one.
pub fn is_local_or_special(ip: IpAddr) -> bool {
    classify(ip).is_some()
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    canonical(a) == canonical(b)
}

/// Resolves names for the network policy. The default asks the system
/// (getaddrinfo, on tokio's blocking pool); a test harness can install its
/// own with [`set_default_resolver`].
pub trait Resolver: Send + Sync + fmt::Debug {
    /// The addresses of `name`.
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + Sync + 'a>>;
}

/// The system resolver.
#[derive(Debug)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + Sync + 'a>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((name, 0))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

static DEFAULT_RESOLVER: OnceLock<Arc<dyn Resolver>> = OnceLock::new();

/// Replaces the resolver every policy made afterwards uses. For test
/// harnesses (the `edgeward` binary never calls it); returns `false` if a
/// resolver was already in use.
pub fn set_default_resolver(r: Arc<dyn Resolver>) -> bool {
    DEFAULT_RESOLVER.set(r).is_ok()
}

fn default_resolver() -> Arc<dyn Resolver> {
    DEFAULT_RESOLVER
        .get_or_init(|| Arc::new(SystemResolver))
        .clone()
}

#[derive(Debug)]
struct Cached {
    addrs: Vec<IpAddr>,
    until: Instant,
}

/// A module's name cache (names of its allow-list only).
#[derive(Debug)]
pub struct DnsCache {
    resolver: Arc<dyn Resolver>,
    entries: Mutex<HashMap<String, Cached>>,
    /// Lookup streams the guest is reading: resource id -> (name, whether
    /// it has yielded an address yet).
    streams: Mutex<HashMap<u32, (String, bool)>>,
}

impl DnsCache {
    fn new(resolver: Arc<dyn Resolver>) -> Self {
        Self {
            resolver,
            entries: Mutex::default(),
            streams: Mutex::default(),
        }
    }

    fn fresh(&self, name: &str) -> Option<Vec<IpAddr>> {
        let e = self.entries.lock().ok()?;
        e.get(name)
            .filter(|c| Instant::now() < c.until)
            .map(|c| c.addrs.clone())
    }

    /// The addresses of `name`: from the cache while fresh, else resolved
    /// (once) and cached.
    pub async fn lookup(&self, name: &str) -> Vec<IpAddr> {
        if let Some(a) = self.fresh(name) {
            return a;
        }
        let mut addrs: Vec<IpAddr> = self
            .resolver
            .resolve(name)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(canonical)
            .collect();
        addrs.dedup();
        addrs.truncate(DNS_MAX_ADDRESSES);
        let ttl = if addrs.is_empty() {
            DNS_NEGATIVE_TTL
        } else {
            DNS_TTL
        };
        if let Ok(mut e) = self.entries.lock() {
            e.insert(
                name.to_owned(),
                Cached {
                    addrs: addrs.clone(),
                    until: Instant::now() + ttl,
                },
            );
        }
        addrs
    }

    /// Records an address the guest's lookup of `name` returned: the first
    /// of a lookup replaces what was cached, the rest join it.
    fn seed(&self, name: &str, ip: IpAddr, first: bool) {
        let Ok(mut e) = self.entries.lock() else {
            return;
        };
        let c = e.entry(name.to_owned()).or_insert_with(|| Cached {
            addrs: Vec::new(),
            until: Instant::now(),
        });
        if first {
            c.addrs.clear();
        }
        let ip = canonical(ip);
        if !c.addrs.contains(&ip) && c.addrs.len() < DNS_MAX_ADDRESSES {
            c.addrs.push(ip);
        }
        c.until = Instant::now() + DNS_TTL;
    }
}

/// A module's network policy.
#[derive(Debug, Clone)]
pub struct NetPolicy {
    module: Arc<str>,
    allowed: Arc<[Outbound]>,
    dns: Arc<DnsCache>,
    http_in_flight: Arc<tokio::sync::Semaphore>,
    /// Refusals the module triggers are logged within this budget.
    log: Arc<LogLimiter>,
}

impl Default for NetPolicy {
    fn default() -> Self {
        Self::new("", &[])
    }
}

impl NetPolicy {
    /// The policy of `module`: exactly `allowed`.
    pub fn new(module: &str, allowed: &[Outbound]) -> Self {
        Self::with_resolver(module, allowed, default_resolver())
    }

    /// The same with `resolver` for names.
    pub fn with_resolver(module: &str, allowed: &[Outbound], resolver: Arc<dyn Resolver>) -> Self {
        Self {
            module: Arc::from(module),
            allowed: Arc::from(allowed),
            dns: Arc::new(DnsCache::new(resolver)),
            http_in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_IN_FLIGHT)),
            log: Arc::new(LogLimiter::new(module, "network refusals")),
        }
    }

    /// Whether a refusal may be logged now (see [`LogLimiter`]).
    pub fn log_refusal(&self) -> bool {
        self.log.allow()
    }

    /// A slot for one more `wasi:http` request, if the module has fewer
    /// than [`MAX_HTTP_IN_FLIGHT`] in flight.
    pub fn http_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.http_in_flight.clone().try_acquire_owned().ok()
    }

    /// The module's name, for logs.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    /// Whether any entry is a name (so name lookup is needed at all).
    pub fn has_names(&self) -> bool {
        self.allowed
            .iter()
            .any(|o| matches!(o.host, OutboundHost::Name(_)))
    }

    /// Whether `name` may be looked up.
    pub fn name_allowed(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.allowed
            .iter()
            .any(|o| matches!(&o.host, OutboundHost::Name(n) if *n == name))
    }

    /// Whether an entry names `addr` by address or block (which lets it
    /// reach a local or special address).
    fn listed_by_address(&self, addr: SocketAddr) -> bool {
        self.allowed
            .iter()
            .filter(|o| o.port == addr.port())
            .any(|o| match o.host {
                OutboundHost::Ip(ip) => same_ip(ip, addr.ip()),
                OutboundHost::Cidr(net, len) => in_block(net, len, addr.ip()),
                OutboundHost::Name(_) => false,
            })
    }

    /// Whether the module may send to / connect to `addr`.
    pub async fn allows(&self, addr: SocketAddr) -> bool {
        if self.listed_by_address(addr) {
            return true;
        }
        if is_local_or_special(addr.ip()) {
            return false;
        }
        let ip = canonical(addr.ip());
        for o in self.allowed.iter().filter(|o| o.port == addr.port()) {
            if let OutboundHost::Name(name) = &o.host
                && self.dns.lookup(name).await.contains(&ip)
            {
                return true;
            }
        }
        false
    }

    /// The addresses an HTTP request to `host:port` may connect to, in the
    /// resolver's order, resolved once: an IP literal is checked like a
    /// connect; a name must be listed with that port and every address it
    /// resolves to must be allowed (one local address refuses them all:
    /// a name that mixes them is not trusted). `Err` says why not.
    pub async fn vet_http(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            let addr = SocketAddr::new(ip, port);
            return if self.allows(addr).await {
                Ok(vec![addr])
            } else {
                Err(format!("{addr} is not in the allow-list"))
            };
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let listed = self
            .allowed
            .iter()
            .any(|o| o.port == port && matches!(&o.host, OutboundHost::Name(n) if *n == name));
        if !listed {
            return Err(format!("{name}:{port} is not in the allow-list"));
        }
        let addrs: Vec<SocketAddr> = self
            .dns
            .lookup(&name)
            .await
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect();
        if addrs.is_empty() {
            return Err(format!("{name} did not resolve"));
        }
        for a in &addrs {
            if !self.listed_by_address(*a)
                && let Some(class) = classify(a.ip())
            {
                return Err(format!("{name} resolves to {} ({class})", a.ip()));
            }
        }
        Ok(addrs)
    }

    /// The `socket_addr_check` of this policy.
    pub async fn check(&self, addr: SocketAddr, use_: SocketAddrUse) -> bool {
        let allowed = match use_ {
            // Implicit binds before a connect or send use the wildcard
            // address with port 0; anything else would be a listener.
            SocketAddrUse::TcpBind | SocketAddrUse::UdpBind => {
                !self.is_empty() && addr.ip().is_unspecified() && addr.port() == 0
            }
            SocketAddrUse::TcpListen | SocketAddrUse::TcpAccept => false,
            // Replies from an allowed peer come in; anything else is dropped
            // silently (a datagram flood must not become a log flood).
            SocketAddrUse::UdpReceive => return self.allows(addr).await,
            SocketAddrUse::TcpConnect | SocketAddrUse::UdpSend => self.allows(addr).await,
        };
        if !allowed && self.log.allow() {
            match classify(addr.ip()) {
                Some(class) => {
                    tracing::warn!(module = %self.module, %addr, use_ = ?use_, class, "network access refused")
                }
                None => {
                    tracing::warn!(module = %self.module, %addr, use_ = ?use_, "network access refused")
                }
            }
        }
        allowed
    }
}

/// The `wasi:sockets/ip-name-lookup` a module sees: names outside its
/// allow-list are refused before any query leaves the host.
#[allow(missing_debug_implementations)]
pub struct FilteredLookup<'a> {
    /// wasmtime-wasi's own implementation, for allowed names.
    pub sockets: WasiSocketsCtxView<'a>,
    /// The module's policy.
    pub policy: &'a NetPolicy,
}

/// [`wasmtime::component::HasData`] marker for [`FilteredLookup`].
#[derive(Debug)]
pub struct HasFilteredLookup;

impl wasmtime::component::HasData for HasFilteredLookup {
    type Data<'a> = FilteredLookup<'a>;
}

impl wasmtime_wasi::p2::bindings::sockets::network::Host for FilteredLookup<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        wasmtime_wasi::p2::bindings::sockets::network::Host::convert_error_code(
            &mut self.sockets,
            error,
        )
    }

    fn network_error_code(
        &mut self,
        err: Resource<wasmtime_wasi::p2::bindings::sockets::network::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        wasmtime_wasi::p2::bindings::sockets::network::Host::network_error_code(
            &mut self.sockets,
            err,
        )
    }
}

impl wasmtime_wasi::p2::bindings::sockets::network::HostNetwork for FilteredLookup<'_> {
    fn drop(&mut self, this: Resource<Network>) -> wasmtime::Result<()> {
        wasmtime_wasi::p2::bindings::sockets::network::HostNetwork::drop(&mut self.sockets, this)
    }
}

/// Socket creation: a full handle table (`max_handles`) is
/// `new-socket-limit` (the interface's EMFILE), not a trap.
impl wasmtime_wasi::p2::bindings::sockets::tcp_create_socket::Host for FilteredLookup<'_> {
    fn create_tcp_socket(
        &mut self,
        family: wasmtime_wasi::p2::bindings::sockets::network::IpAddressFamily,
    ) -> Result<Resource<wasmtime_wasi::p2::TcpSocket>, SocketError> {
        wasmtime_wasi::p2::bindings::sockets::tcp_create_socket::Host::create_tcp_socket(
            &mut self.sockets,
            family,
        )
        .map_err(|e| super::handles_full_as(e, ErrorCode::NewSocketLimit))
    }
}

impl wasmtime_wasi::p2::bindings::sockets::udp_create_socket::Host for FilteredLookup<'_> {
    async fn create_udp_socket(
        &mut self,
        family: wasmtime_wasi::p2::bindings::sockets::network::IpAddressFamily,
    ) -> Result<Resource<wasmtime_wasi::p2::UdpSocket>, SocketError> {
        wasmtime_wasi::p2::bindings::sockets::udp_create_socket::Host::create_udp_socket(
            &mut self.sockets,
            family,
        )
        .await
        .map_err(|e| super::handles_full_as(e, ErrorCode::NewSocketLimit))
    }
}

impl LookupHost for FilteredLookup<'_> {
    fn resolve_addresses(
        &mut self,
        network: Resource<Network>,
        name: String,
    ) -> Result<Resource<ResolveAddressStream>, SocketError> {
        if !self.policy.name_allowed(&name) {
            if self.policy.log.allow() {
                tracing::warn!(module = %self.policy.module, name = %crate::escape::escape_str(&name.chars().take(253).collect::<String>()), "name lookup refused");
            }
            return Err(ErrorCode::AccessDenied.into());
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let stream = LookupHost::resolve_addresses(&mut self.sockets, network, name.clone())?;
        if let Ok(mut s) = self.policy.dns.streams.lock() {
            s.insert(stream.rep(), (name, false));
        }
        Ok(stream)
    }
}

impl HostResolveAddressStream for FilteredLookup<'_> {
    fn resolve_next_address(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> Result<Option<IpAddress>, SocketError> {
        let rep = stream.rep();
        let next = HostResolveAddressStream::resolve_next_address(&mut self.sockets, stream)?;
        // What the guest was told is what it may connect to.
        if let Some(addr) = &next
            && let Ok(mut s) = self.policy.dns.streams.lock()
            && let Some((name, started)) = s.get_mut(&rep)
        {
            let ip = match *addr {
                IpAddress::Ipv4((a, b, c, d)) => IpAddr::from([a, b, c, d]),
                IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => IpAddr::from([a, b, c, d, e, f, g, h]),
            };
            self.policy.dns.seed(name, ip, !*started);
            *started = true;
        }
        Ok(next)
    }

    fn subscribe(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<wasmtime_wasi::p2::DynPollable>> {
        HostResolveAddressStream::subscribe(&mut self.sockets, stream)
    }

    fn drop(&mut self, stream: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
        if let Ok(mut s) = self.policy.dns.streams.lock() {
            s.remove(&stream.rep());
        }
        HostResolveAddressStream::drop(&mut self.sockets, stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_destinations() {
        let o: Outbound = "api.example.com:443".parse().expect("name");
        assert_eq!(o.host, OutboundHost::Name("api.example.com".into()));
        let o: Outbound = "API.Example.com.:8883".parse().expect("name");
        assert_eq!(o.to_string(), "api.example.com:8883");
        let o: Outbound = "10.0.0.5:1883".parse().expect("v4");
        assert_eq!(o.host, OutboundHost::Ip("10.0.0.5".parse().expect("ip")));
        let o: Outbound = "[::1]:80".parse().expect("v6");
        assert_eq!(o.to_string(), "[::1]:80");
        let o: Outbound = "10.0.5.0/24:502".parse().expect("cidr");
        assert_eq!(
            o.host,
            OutboundHost::Cidr("10.0.5.0".parse().expect("ip"), 24)
        );
        assert_eq!(o.to_string(), "10.0.5.0/24:502");
        let o: Outbound = "[fd00::/8]:502".parse().expect("v6 cidr");
        assert_eq!(o.to_string(), "[fd00::/8]:502");
        for bad in [
            "example.com",
            "example.com:0",
            "example.com:99999",
            ":80",
            "exa mple.com:80",
            "-a.com:80",
            "*.example.com:443",
            "10.0.5.1/24:502",
            "10.0.0.0/33:1",
            "fd00::/8:502",
            "[fd00::/129]:502",
        ] {
            assert!(bad.parse::<Outbound>().is_err(), "{bad}");
        }
        let e = "10.0.5.1/24:502".parse::<Outbound>().unwrap_err();
        assert!(e.contains("10.0.5.0/24"), "{e}");
    }

    #[test]
    fn special_addresses() {
        for ip in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "100.64.0.1",
            "fd00::1",
            "64:ff9b::a00:1",
            "::10.0.0.1",
        ] {
            assert!(is_local_or_special(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111"] {
            assert!(!is_local_or_special(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[tokio::test]
    async fn checks() {
        let p = NetPolicy::new(
            "m",
            &[
                "127.0.0.1:8080".parse().expect("o"),
                "localhost:9090".parse().expect("o"),
            ],
        );
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(
            p.check(a("127.0.0.1:8080"), SocketAddrUse::TcpConnect)
                .await,
            "literal loopback allowed"
        );
        assert!(
            !p.check(a("127.0.0.1:8081"), SocketAddrUse::TcpConnect)
                .await,
            "other port"
        );
        assert!(
            !p.check(a("127.0.0.1:9090"), SocketAddrUse::TcpConnect)
                .await,
            "a name cannot smuggle loopback"
        );
        assert!(
            p.check(a("0.0.0.0:0"), SocketAddrUse::TcpBind).await,
            "implicit bind"
        );
        assert!(
            !p.check(a("0.0.0.0:8080"), SocketAddrUse::TcpBind).await,
            "explicit listener bind"
        );
        assert!(!p.check(a("0.0.0.0:0"), SocketAddrUse::TcpListen).await);
        assert!(p.name_allowed("LOCALHOST."));
        assert!(!p.name_allowed("example.com"));
        let empty = NetPolicy::new("m", &[]);
        assert!(!empty.check(a("0.0.0.0:0"), SocketAddrUse::TcpBind).await);
    }

    /// Answers with a fixed list and counts the lookups.
    #[derive(Debug)]
    struct Fixed(Vec<IpAddr>, std::sync::atomic::AtomicUsize);

    impl Resolver for Fixed {
        fn resolve<'a>(
            &'a self,
            _name: &'a str,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + Sync + 'a>>
        {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let v = self.0.clone();
            Box::pin(async move { Ok(v) })
        }
    }

    /// The LAN (RFC 1918, CGNAT, ULA, NAT64) only by address or block;
    /// a name never reaches it. Checked with the policy alone: no packet
    /// is sent.
    #[tokio::test]
    async fn lan_and_nat64_need_an_address_entry() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let resolver = Arc::new(Fixed(
            vec!["10.0.5.7".parse().expect("ip")],
            Default::default(),
        ));
        let allowed: Vec<Outbound> = ["plc.lan:502", "10.0.5.0/24:502", "[fd00::/8]:502"]
            .iter()
            .map(|s| s.parse().expect("entry"))
            .collect();
        let p = NetPolicy::with_resolver("m", &allowed, resolver);
        let use_ = SocketAddrUse::TcpConnect;
        assert!(p.check(a("10.0.5.9:502"), use_).await, "in the block");
        assert!(
            p.check(a("[::ffff:10.0.5.9]:502"), use_).await,
            "mapped form"
        );
        assert!(p.check(a("[fd12::1]:502"), use_).await, "ULA block");
        assert!(!p.check(a("10.0.5.9:503"), use_).await, "other port");
        assert!(!p.check(a("10.0.6.1:502"), use_).await, "outside the block");
        assert!(!p.check(a("192.168.1.1:502"), use_).await, "RFC 1918");
        assert!(!p.check(a("100.64.0.1:502"), use_).await, "CGNAT");
        assert!(
            !p.check(a("[64:ff9b::a00:507]:502"), use_).await,
            "NAT64 of 10.0.5.7"
        );
        assert!(
            !p.check(a("[::10.0.6.1]:502"), use_).await,
            "IPv4-compatible"
        );
        // The name resolves into the LAN: only its block lets it through,
        // and HTTP to it is refused by name.
        let only_name = NetPolicy::with_resolver(
            "m",
            &["plc.lan:502".parse().expect("entry")],
            Arc::new(Fixed(
                vec!["10.0.5.7".parse().expect("ip")],
                Default::default(),
            )),
        );
        assert!(!only_name.check(a("10.0.5.7:502"), use_).await);
        let why = only_name.vet_http("plc.lan", 502).await.unwrap_err();
        assert!(why.contains("private-use"), "{why}");
    }

    /// Received datagrams and repeated connects hit the cache, not the
    /// resolver; the guest's own lookup answers seed it.
    #[tokio::test]
    async fn names_are_cached_and_seeded() {
        use std::sync::atomic::Ordering;
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let resolver = Arc::new(Fixed(
            vec!["93.184.216.34".parse().expect("ip")],
            Default::default(),
        ));
        let p = NetPolicy::with_resolver(
            "m",
            &["api.example.com:443".parse().expect("entry")],
            resolver.clone(),
        );
        for _ in 0..1000 {
            assert!(
                p.check(a("93.184.216.34:443"), SocketAddrUse::UdpReceive)
                    .await
            );
            assert!(
                !p.check(a("93.184.216.35:443"), SocketAddrUse::UdpReceive)
                    .await
            );
        }
        assert_eq!(
            resolver.1.load(Ordering::SeqCst),
            1,
            "one lookup for 2,000 datagrams"
        );
        // What the guest's lookup returned replaces the entry.
        p.dns.seed(
            "api.example.com",
            "93.184.216.99".parse().expect("ip"),
            true,
        );
        assert!(
            p.check(a("93.184.216.99:443"), SocketAddrUse::TcpConnect)
                .await
        );
        assert!(
            !p.check(a("93.184.216.34:443"), SocketAddrUse::TcpConnect)
                .await
        );
        assert_eq!(resolver.1.load(Ordering::SeqCst), 1);
    }
}
