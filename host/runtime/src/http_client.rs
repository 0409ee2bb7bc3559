//! Outgoing `wasi:http` requests, allow-listed: the destination is
//! resolved once through the module's policy ([`NetPolicy::vet_http`]),
//! every address it resolves to is checked, and the connection goes to a
//! vetted `SocketAddr`, never to a second answer of the resolver. The
//! request keeps its `Host` header (set by wasmtime-wasi-http from the
//! authority) and TLS its server name, so virtual hosting and certificate
//! checks see the name the guest asked for.
//!
//! Apart from the connect, this is wasmtime-wasi-http's
//! `default_send_request` (rustls with the webpki roots, hyper HTTP/1.1,
//! the same timeouts).

use core::future::poll_fn;
use core::pin::{Pin, pin};
use core::task::{Context, Poll, ready};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use super::network::NetPolicy;

type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), Error>> + Send>;

/// `wasi:http` hooks enforcing the module's allow-list on outgoing requests.
#[derive(Debug, Clone)]
pub struct HttpHooks {
    /// The module's policy.
    pub policy: NetPolicy,
}

impl wasmtime_wasi_http::WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let policy = self.policy.clone();
        Box::new(async move {
            let (res, io) = send_vetted(&policy, request, options).await?;
            Ok((res.map(|b| b.boxed_unsync()), Box::new(io) as IoFuture))
        })
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Stream for T {}

/// A response body, with the between-bytes timeout.
pub struct IncomingResponseBody {
    incoming: Incoming,
    timeout: tokio::time::Interval,
}

impl http_body::Body for IncomingResponseBody {
    type Data = <Incoming as http_body::Body>::Data;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.as_mut().incoming).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(if err.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                Error::from(err)
            }))),
            Poll::Ready(Some(Ok(frame))) => {
                self.timeout.reset();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                ready!(self.timeout.poll_tick(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.incoming.size_hint()
    }
}

/// Connects to the first of `addrs` that answers within `timeout`.
async fn connect(addrs: &[SocketAddr], timeout: Duration) -> Result<TcpStream, Error> {
    let mut last = Error::ConnectionTimeout;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Error::Connect(e),
            Err(_) => last = Error::ConnectionTimeout,
        }
    }
    Err(last)
}

/// Sends `req` to a vetted address of its authority.
///
/// # Errors
///
/// `HttpRequestDenied` when the policy refuses it; connection, TLS and
/// protocol errors as wasmtime-wasi-http reports them.
pub async fn send_vetted(
    policy: &NetPolicy,
    mut req: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<
    (
        http::Response<IncomingResponseBody>,
        impl Future<Output = Result<(), Error>> + Send + use<>,
    ),
    Error,
> {
    let uri = req.uri();
    let use_tls = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or(Error::HttpRequestUriInvalid)?.to_owned();
    let port = uri.port_u16().unwrap_or(if use_tls { 443 } else { 80 });
    let Some(permit) = policy.http_permit() else {
        if policy.log_refusal() {
            tracing::warn!(module = %policy.module(), limit = super::network::MAX_HTTP_IN_FLIGHT, "HTTP request refused: too many in flight");
        }
        return Err(Error::HttpRequestDenied);
    };
    let addrs = match policy.vet_http(&host, port).await {
        Ok(a) => a,
        Err(why) => {
            if policy.log_refusal() {
                let host: String = host.chars().take(253).collect();
                tracing::warn!(module = %policy.module(), host = %super::escape::escape_str(&host), port, reason = %super::escape::escape_str(&why), "HTTP request refused");
            }
            return Err(Error::HttpRequestDenied);
        }
    };
    let opt = |f: fn(&RequestOptions) -> Option<Duration>| {
        options
            .as_ref()
            .and_then(f)
            .unwrap_or(Duration::from_secs(600))
    };
    let connect_timeout = opt(|o| o.connect_timeout);
    let first_byte_timeout = opt(|o| o.first_byte_timeout);
    let between_bytes_timeout = opt(|o| o.between_bytes_timeout).max(Duration::new(0, 1));

    let tcp = connect(&addrs, connect_timeout).await?;
    let stream: Box<dyn Stream> = if use_tls {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => rustls::pki_types::ServerName::from(ip),
            Err(_) => rustls::pki_types::ServerName::try_from(bare.to_owned())
                .map_err(|_| Error::HttpRequestUriInvalid)?,
        };
        Box::new(connector.connect(name, tcp).await.map_err(Error::Tls)?)
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = tokio::time::timeout(
        connect_timeout,
        hyper::client::conn::http1::Builder::new()
            .handshake(wasmtime_wasi_http::io::TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Error::ConnectionTimeout)??;

    // The request line carries the path only (no proxy); `Host` stays.
    *req.uri_mut() = http::Uri::builder()
        .path_and_query(
            req.uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
        )
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;

    let send = async move {
        let res = tokio::time::timeout(first_byte_timeout, sender.send_request(req))
            .await
            .map_err(|_| Error::ConnectionReadTimeout)?
            .map_err(Error::from)?;
        let mut timeout = tokio::time::interval(between_bytes_timeout);
        timeout.reset();
        Ok::<_, Error>(res.map(|incoming| IncomingResponseBody { incoming, timeout }))
    };
    let mut send = pin!(send);
    let mut conn = Some(conn);
    // Wait for the response while driving the connection's I/O.
    let res = poll_fn(|cx| match send.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => {
            let Some(fut) = conn.as_mut() else {
                return Poll::Pending;
            };
            let r = ready!(Pin::new(fut).poll(cx));
            conn = None;
            match r {
                Ok(()) => send.as_mut().poll(cx),
                Err(err) => Poll::Ready(Err(Error::from(err))),
            }
        }
    })
    .await?;
    Ok((res, async move {
        // The request counts as in flight until its connection is done.
        let _permit = permit;
        let Some(conn) = conn.take() else {
            return Ok(());
        };
        conn.await.map_err(|err| {
            if err.is_timeout() {
                Error::HttpResponseTimeout
            } else {
                err.into()
            }
        })
    }))
}

impl std::fmt::Debug for IncomingResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IncomingResponseBody")
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{IpAddr, TcpListener};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::network::{Outbound, Resolver};

    /// Answers `first` to the first lookup and `then` afterwards: a name
    /// an attacker controls, rebinding with TTL 0.
    #[derive(Debug)]
    struct Rebinding {
        calls: AtomicUsize,
        first: IpAddr,
        then: IpAddr,
    }

    impl Resolver for Rebinding {
        fn resolve<'a>(
            &'a self,
            _name: &'a str,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send + Sync + 'a>>
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let ip = if n == 0 { self.first } else { self.then };
            Box::pin(async move { Ok(vec![ip]) })
        }
    }

    /// Serves one request on `listener`, answering `body`; returns the
    /// request head it read.
    fn serve_once(listener: TcpListener, body: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return String::new();
            };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
    }

    fn request(uri: &str) -> http::Request<WasiBody> {
        let body = http_body_util::Empty::<bytes::Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        http::Request::get(uri)
            .header(http::header::HOST, "rebind.test")
            .body(body)
            .unwrap()
    }

    /// The name is resolved once; the connection goes to the address that
    /// was vetted, though the resolver answers differently afterwards. All
    /// on loopback: 127.0.0.1 is listed as a literal, 127.0.0.2 is not.
    #[tokio::test]
    async fn http_connects_to_the_address_it_vetted() {
        let good = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = good.local_addr().unwrap().port();
        let evil = TcpListener::bind(("127.0.0.2", port)).unwrap();
        evil.set_nonblocking(true).unwrap();
        let served = serve_once(good, "vetted");
        let resolver = Arc::new(Rebinding {
            calls: AtomicUsize::new(0),
            first: "127.0.0.1".parse().unwrap(),
            then: "127.0.0.2".parse().unwrap(),
        });
        let allowed: Vec<Outbound> = vec![
            format!("rebind.test:{port}").parse().unwrap(),
            format!("127.0.0.1:{port}").parse().unwrap(),
        ];
        let policy = NetPolicy::with_resolver("m", &allowed, resolver.clone());
        let (res, io) = send_vetted(
            &policy,
            request(&format!("http://rebind.test:{port}/x")),
            None,
        )
        .await
        .unwrap();
        tokio::spawn(io);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"vetted");
        let head = served.join().unwrap();
        assert!(head.starts_with("GET /x HTTP/1.1"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("host: rebind.test"),
            "{head}"
        );
        assert!(
            evil.accept().is_err(),
            "nothing reached the rebound address"
        );
        assert_eq!(resolver.calls.load(Ordering::SeqCst), 1, "resolved once");
    }

    /// The https path sets up rustls (SNI, roots) and fails cleanly on a
    /// peer that does not speak TLS: an error, never a panic.
    #[tokio::test]
    async fn https_to_a_non_tls_peer_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = serve_once(listener, "not tls");
        let allowed: Vec<Outbound> = vec![format!("127.0.0.1:{port}").parse().unwrap()];
        let policy = NetPolicy::new("m", &allowed);
        let r = send_vetted(
            &policy,
            request(&format!("https://127.0.0.1:{port}/")),
            None,
        )
        .await;
        assert!(
            matches!(r, Err(Error::Tls(_) | Error::Connect(_))),
            "{:?}",
            r.map(|_| ())
        );
        drop(served);
    }

    /// A name that resolves to a local address not listed by address is
    /// refused before any connection.
    #[tokio::test]
    async fn a_name_cannot_smuggle_a_local_address() {
        let resolver = Arc::new(Rebinding {
            calls: AtomicUsize::new(0),
            first: "169.254.169.254".parse().unwrap(),
            then: "169.254.169.254".parse().unwrap(),
        });
        let allowed: Vec<Outbound> = vec!["metadata.test:80".parse().unwrap()];
        let policy = NetPolicy::with_resolver("m", &allowed, resolver);
        let e = send_vetted(&policy, request("http://metadata.test/latest"), None)
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, Error::HttpRequestDenied), "{e:?}");
        let why = policy.vet_http("metadata.test", 80).await.unwrap_err();
        assert!(why.contains("link-local"), "{why}");
    }
}
