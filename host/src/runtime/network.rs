//! Outbound network by allow-list only.
//!
//! A module reaches exactly the `HOST:PORT` destinations its registration
//! lists, and nothing else: TCP connects, UDP datagrams and name lookups are
//! checked; listening and accepting are always refused. A name in the list
//! allows the addresses it resolves to *when the connection is made*, except
//! loopback, link-local, unspecified, multicast and broadcast addresses,
//! which only an IP literal in the list allows: a name cannot smuggle in a
//! local address. Every refusal is logged and reaches the guest as a
//! `wasi:sockets` error (access-denied).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use wasmtime::component::Resource;
use wasmtime_wasi::p2::SocketError;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{
    Host as LookupHost, HostResolveAddressStream, ResolveAddressStream,
};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddress, Network};
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsCtxView};

/// The host part of an allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundHost {
    /// An IP literal: exactly this address.
    Ip(IpAddr),
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
            OutboundHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl FromStr for Outbound {
    type Err = String;

    /// `HOST:PORT`, `IPv4:PORT` or `[IPv6]:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("invalid outbound destination {s:?}: {why} (expected HOST:PORT)");
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(bad("port 0"));
            }
            return Ok(Self {
                host: OutboundHost::Ip(addr.ip()),
                port: addr.port(),
            });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        if port == 0 {
            return Err(bad("port 0"));
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !valid_dns_name(&host) {
            return Err(bad("bad host name"));
        }
        Ok(Self {
            host: OutboundHost::Name(host),
            port,
        })
    }
}

/// Addresses a name may never resolve its way into.
pub fn is_local_or_special(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    canon(a) == canon(b)
}

/// A module's network policy.
#[derive(Debug, Clone, Default)]
pub struct NetPolicy {
    module: Arc<str>,
    allowed: Arc<[Outbound]>,
}

impl NetPolicy {
    /// The policy of `module`: exactly `allowed`.
    pub fn new(module: &str, allowed: &[Outbound]) -> Self {
        Self {
            module: Arc::from(module),
            allowed: Arc::from(allowed),
        }
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

    /// Whether the module may send to / connect to `addr`.
    pub async fn allows(&self, addr: SocketAddr) -> bool {
        for o in self.allowed.iter().filter(|o| o.port == addr.port()) {
            match &o.host {
                OutboundHost::Ip(ip) if same_ip(*ip, addr.ip()) => return true,
                OutboundHost::Ip(_) => {}
                OutboundHost::Name(name) => {
                    if is_local_or_special(addr.ip()) {
                        continue;
                    }
                    if let Ok(mut resolved) = tokio::net::lookup_host((name.as_str(), o.port)).await
                        && resolved.any(|r| same_ip(r.ip(), addr.ip()))
                    {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Whether an HTTP request may go to `host:port`. An IP literal is
    /// checked like a connect; a name must be listed with that port and must
    /// not resolve to a loopback, link-local or other special address.
    pub async fn allows_host(&self, host: &str, port: u16) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.allows(SocketAddr::new(ip, port)).await;
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let listed = self
            .allowed
            .iter()
            .any(|o| o.port == port && matches!(&o.host, OutboundHost::Name(n) if *n == name));
        if !listed {
            return false;
        }
        match tokio::net::lookup_host((name.as_str(), port)).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                !addrs.is_empty() && addrs.iter().all(|a| !is_local_or_special(a.ip()))
            }
            Err(_) => false,
        }
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
        if !allowed {
            tracing::warn!(module = %self.module, %addr, use_ = ?use_, "network access refused");
        }
        allowed
    }
}

/// `wasi:http` hooks enforcing the module's allow-list on outgoing
/// requests. (The check resolves a listed name before wasmtime-wasi-http
/// connects and resolves it again; a DNS answer that changes in between is
/// not caught here.)
#[derive(Debug, Clone)]
pub struct HttpHooks {
    /// The module's policy.
    pub policy: NetPolicy,
}

impl wasmtime_wasi_http::WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn std::future::Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<
                            dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                                + Send,
                        >,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        drop(fut);
        let policy = self.policy.clone();
        Box::new(async move {
            use http_body_util::BodyExt as _;
            let uri = request.uri();
            let https = uri.scheme_str() == Some("https");
            let host = uri.host().unwrap_or("").to_owned();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            if !policy.allows_host(&host, port).await {
                tracing::warn!(module = %policy.module, host = %host.chars().take(253).collect::<String>(), port, "HTTP request refused");
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            }
            let (res, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                res.map(|b| b.boxed_unsync()),
                Box::new(io)
                    as Box<
                        dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>>
                            + Send,
                    >,
            ))
        })
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

impl LookupHost for FilteredLookup<'_> {
    fn resolve_addresses(
        &mut self,
        network: Resource<Network>,
        name: String,
    ) -> Result<Resource<ResolveAddressStream>, SocketError> {
        if !self.policy.name_allowed(&name) {
            tracing::warn!(module = %self.policy.module, name = %name.chars().take(253).collect::<String>(), "name lookup refused");
            return Err(ErrorCode::AccessDenied.into());
        }
        LookupHost::resolve_addresses(&mut self.sockets, network, name)
    }
}

impl HostResolveAddressStream for FilteredLookup<'_> {
    fn resolve_next_address(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> Result<Option<IpAddress>, SocketError> {
        HostResolveAddressStream::resolve_next_address(&mut self.sockets, stream)
    }

    fn subscribe(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<wasmtime_wasi::p2::DynPollable>> {
        HostResolveAddressStream::subscribe(&mut self.sockets, stream)
    }

    fn drop(&mut self, stream: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
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
        for bad in [
            "example.com",
            "example.com:0",
            "example.com:99999",
            ":80",
            "exa mple.com:80",
            "-a.com:80",
            "*.example.com:443",
        ] {
            assert!(bad.parse::<Outbound>().is_err(), "{bad}");
        }
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
        ] {
            assert!(is_local_or_special(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "10.1.2.3", "2001:db8::1"] {
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
}
