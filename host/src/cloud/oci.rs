//! Components from an OCI registry, in the Wasm OCI artifact layout (an
//! image manifest whose one layer is `application/wasm`), over the OCI
//! distribution API: pull by tag or manifest digest, push. A small client
//! on the hyper and rustls the daemon already links, rather than a
//! general registry client and its HTTP stack.
//!
//! Trust is in the pinned digest, not the transport: the layer's digest in
//! the manifest must be the pin before anything is downloaded, and the bytes
//! must hash to it before they are stored. Plain HTTP is used only for
//! loopback registries; anything else is HTTPS against the web PKI roots (or
//! the roots given). Basic and bearer-token auth (the registry's
//! `WWW-Authenticate` challenge) with configured credentials.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;

use crate::measure::Digest;

/// The media type of a Wasm component layer.
pub const WASM_LAYER: &str = "application/wasm";
/// Older tools' layer type, also accepted.
pub const WASM_LAYER_OLD: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// The config of a Wasm artifact.
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// An OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The largest manifest read.
pub const MAX_MANIFEST: u64 = 1 << 20;

/// `oci://registry[:port]/repository(:tag|@sha256:…)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Host and optional port, as written.
    pub registry: String,
    /// The repository path.
    pub repository: String,
    /// A tag or `sha256:…` manifest digest.
    pub reference: String,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        write!(
            f,
            "oci://{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

impl std::str::FromStr for Reference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("oci://")
            .ok_or_else(|| format!("{s:?}: an OCI reference starts with oci://"))?;
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: oci://REGISTRY/REPOSITORY:TAG"))?;
        let (repository, reference) = if let Some((r, d)) = path.split_once('@') {
            d.parse::<Digest>()
                .map_err(|e| format!("{s:?}: the manifest digest: {e}"))?;
            (r, d.to_owned())
        } else {
            match path.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t.to_owned()),
                _ => (path, "latest".to_owned()),
            }
        };
        let ok_registry = !registry.is_empty()
            && registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !ok_registry {
            return Err(format!("{s:?}: {registry:?} is not a registry host"));
        }
        // The distribution spec's repository grammar, in short.
        let ok_repo = !repository.is_empty()
            && repository.len() <= 255
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| {
                        ch.is_ascii_lowercase()
                            || ch.is_ascii_digit()
                            || matches!(ch, '.' | '_' | '-')
                    })
                    && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            });
        if !ok_repo {
            return Err(format!(
                "{s:?}: repository {repository:?}: lowercase path components of a-z 0-9 . _ -"
            ));
        }
        let ok_tag = reference.starts_with("sha256:")
            || (!reference.is_empty()
                && reference.len() <= 128
                && reference
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        if !ok_tag {
            return Err(format!(
                "{s:?}: tag {reference:?}: 1-128 of A-Z a-z 0-9 . _ -"
            ));
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            reference,
        })
    }
}

/// Credentials for one registry.
#[derive(Clone, Default)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: zeroize::Zeroizing<String>,
    /// Other hosts whose token service (a bearer challenge's realm) may be
    /// sent these credentials (`[[cloud.registry]] token_hosts`); by
    /// default only the registry's own host.
    pub token_hosts: Vec<String>,
}

impl Credentials {
    /// `username` with the password (or token) held in `file`, its line
    /// ending dropped; the file's text is wiped from memory.
    ///
    /// # Errors
    ///
    /// The file cannot be read; named.
    pub fn from_file(username: &str, file: &std::path::Path) -> Result<Self, String> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?,
        );
        Ok(Self {
            username: username.to_owned(),
            password: zeroize::Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned()),
            token_hosts: Vec::new(),
        })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A registry client.
#[derive(Debug, Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
    credentials: Option<Credentials>,
    /// Per request (connect to last byte).
    pub timeout: Duration,
    /// Attempts for a transient failure (connection, 5xx, timeout).
    pub attempts: u32,
}

/// A response, its body read whole (bounded).
#[derive(Debug)]
struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Whether an error is worth another attempt.
#[derive(Debug)]
enum Failure {
    Transient(String),
    Final(String),
}

impl Failure {
    fn message(self) -> String {
        match self {
            Self::Transient(m) | Self::Final(m) => m,
        }
    }
}

/// The host of an authority (`host:port`, `[v6]:port`), without brackets.
fn host_of(authority: &str) -> String {
    super::split_host_port(authority, 443)
        .map(|(h, _)| h)
        .unwrap_or_else(|_| authority.to_owned())
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// Whether a registry is itself on a non-public network (loopback, the
/// LAN, ...): only then may it send the client to such addresses. Decided
/// by how it is named, never by what its name resolves to (a hostile
/// registry's DNS could answer a private address for this check and a
/// public one for the connection): an address literal in a non-public
/// class, or `localhost`.
fn on_private_network(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| crate::addrclass::classify(ip).is_some())
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    /// A client trusting the web PKI roots plus `extra_roots` (PEM).
    ///
    /// # Errors
    ///
    /// Unusable roots.
    pub fn new(
        extra_roots: Option<&[u8]>,
        credentials: Option<Credentials>,
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        if let Some(pem) = extra_roots {
            super::tls::add_pem_roots(&mut roots, pem)
                .map_err(|e| format!("registry roots: {e}"))?;
        }
        let tls = super::tls::client_builder(roots)?.with_no_client_auth();
        Ok(Self {
            tls: Arc::new(tls),
            credentials,
            timeout: Duration::from_secs(300),
            attempts: 4,
        })
    }

    /// `https://` for a registry; a loopback registry that does not speak
    /// TLS is reached over `http://` (as Docker treats localhost), but
    /// never once credentials are configured: they go over TLS or not at
    /// all.
    async fn base(&self, registry: &str) -> String {
        let https = format!("https://{registry}");
        let loopback = super::split_host_port(registry, 443).is_ok_and(|(h, _)| is_loopback(&h));
        if !loopback || self.credentials.is_some() {
            return https;
        }
        let probe = self
            .once(
                &Method::GET,
                &format!("{https}/v2/"),
                &HeaderMap::new(),
                &Bytes::new(),
                64 << 10,
                false,
            )
            .await;
        match probe {
            Ok(_) => https,
            Err(_) => format!("http://{registry}"),
        }
    }

    /// A plain HTTPS download of at most `limit` bytes.
    ///
    /// # Errors
    ///
    /// Unreachable, not 2xx, too big.
    pub async fn get(&self, url: &str, limit: u64) -> Result<Vec<u8>, String> {
        let r = self
            .request(Method::GET, url, HeaderMap::new(), Bytes::new(), limit)
            .await?;
        if !r.status.is_success() {
            return Err(format!("{url}: {}", r.status));
        }
        Ok(r.body)
    }

    /// One request: connect, send, read at most `limit` body bytes. With
    /// `public_only` (a place the registry sent the client to, while the
    /// registry itself is on the public internet), the host's addresses
    /// are resolved here and a non-public one (loopback, the LAN, the
    /// metadata service) is refused; the connection goes to the address
    /// checked, so a second lookup cannot swap it.
    async fn once(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: &Bytes,
        limit: u64,
        public_only: bool,
    ) -> Result<Response, Failure> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| Failure::Final(format!("{url}: {e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(Failure::Final(format!("{url}: http or https only"))),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| Failure::Final(format!("{url}: no host")))?
            .as_str()
            .to_owned();
        let (host, port) = super::split_host_port(&authority, if tls { 443 } else { 80 })
            .map_err(Failure::Final)?;
        if !tls && !is_loopback(&host) {
            return Err(Failure::Final(format!(
                "{url}: plain HTTP only to a loopback registry; use https"
            )));
        }
        let work = async {
            let tcp = if public_only {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((bare, port))
                    .await
                    .map_err(|e| Failure::Transient(format!("resolve {authority}: {e}")))?
                    .collect();
                if let Some((ip, class)) = addrs.iter().find_map(|a| {
                    crate::addrclass::classify(a.ip()).map(|c| (a.ip(), c))
                }) {
                    return Err(Failure::Final(format!(
                        "{url}: refused: {authority} is {ip} ({class}), and a registry not named by a private address may not send this device there"
                    )));
                }
                let first = addrs
                    .first()
                    .ok_or_else(|| Failure::Transient(format!("resolve {authority}: no address")))?;
                tokio::net::TcpStream::connect(first).await
            } else {
                tokio::net::TcpStream::connect((host.as_str(), port)).await
            }
            .map_err(|e| Failure::Transient(format!("connect {authority}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            let io: Box<dyn IoStream> = if tls {
                let name = match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => rustls::pki_types::ServerName::from(ip),
                    Err(_) => rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| Failure::Final(format!("{host}: {e}")))?,
                };
                let c = tokio_rustls::TlsConnector::from(self.tls.clone());
                Box::new(
                    c.connect(name, tcp)
                        .await
                        .map_err(|e| Failure::Final(format!("TLS to {authority}: {e}")))?,
                )
            } else {
                Box::new(tcp)
            };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(io))
                    .await
                    .map_err(|e| Failure::Transient(format!("{authority}: {e}")))?;
            let conn = tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method.clone())
                .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
                .header(header::HOST, authority.as_str())
                .header(
                    header::USER_AGENT,
                    concat!("edgeward/", env!("CARGO_PKG_VERSION")),
                );
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| Failure::Final(e.to_string()))?;
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| Failure::Transient(format!("{authority}: {e}")))?;
            let (parts, mut incoming) = res.into_parts();
            if *method == Method::HEAD {
                conn.abort();
                return Ok(Response {
                    status: parts.status,
                    headers: parts.headers,
                    body: Vec::new(),
                });
            }
            if let Some(len) = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                && len > limit
            {
                conn.abort();
                return Err(Failure::Final(format!(
                    "{url}: {len} bytes, more than the {limit} allowed"
                )));
            }
            let mut out = Vec::new();
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|e| Failure::Transient(format!("{url}: {e}")))?;
                if let Some(d) = frame.data_ref() {
                    if out.len() as u64 + d.len() as u64 > limit {
                        conn.abort();
                        return Err(Failure::Final(format!(
                            "{url}: more than the {limit} bytes allowed"
                        )));
                    }
                    out.extend_from_slice(d);
                }
            }
            conn.abort();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body: out,
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| {
                Failure::Transient(format!("{url}: no answer within {:?}", self.timeout))
            })?
    }

    /// A request with redirects followed (to 5; credentials go only to the
    /// registry itself), the registry's auth challenge answered, and
    /// transient failures retried with backoff.
    async fn request(
        &self,
        method: Method,
        url: &str,
        mut headers: HeaderMap,
        body: Bytes,
        limit: u64,
    ) -> Result<Response, String> {
        let origin = authority_of(url);
        let private_ok = on_private_network(&host_of(&origin));
        let mut auth: Option<HeaderValue> = None;
        let mut attempt = 0;
        let mut url = url.to_owned();
        let mut redirects = 0;
        loop {
            let same_origin = authority_of(&url) == origin;
            headers.remove(header::AUTHORIZATION);
            if same_origin && let Some(a) = &auth {
                headers.insert(header::AUTHORIZATION, a.clone());
            }
            let public_only = !same_origin && !private_ok;
            match self
                .once(&method, &url, &headers, &body, limit, public_only)
                .await
            {
                Ok(r) if r.status.is_redirection() => {
                    redirects += 1;
                    let to = r
                        .headers
                        .get(header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .ok_or_else(|| format!("{url}: a redirect without Location"))?;
                    if redirects > 5 {
                        return Err(format!("{url}: more than 5 redirects"));
                    }
                    let next = absolute(&url, to);
                    if url.starts_with("https://") && !next.starts_with("https://") {
                        return Err(format!("{url}: a redirect from HTTPS to {next} is refused"));
                    }
                    url = next;
                }
                Ok(r) if r.status == StatusCode::UNAUTHORIZED && auth.is_none() && same_origin => {
                    auth = Some(self.answer_challenge(&r.headers, &url, private_ok).await?);
                }
                Ok(r) if r.status.is_server_error() && attempt + 1 < self.attempts => {
                    attempt += 1;
                    tracing::debug!(%url, status = %r.status, attempt, "registry: retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Ok(r) => return Ok(r),
                Err(Failure::Transient(m)) if attempt + 1 < self.attempts => {
                    attempt += 1;
                    tracing::debug!(%url, error = %m, attempt, "registry: retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(f) => return Err(f.message()),
            }
        }
    }

    /// `Basic` with the credentials, or a `Bearer` token fetched from the
    /// challenge's realm. The realm gets the credentials only over HTTPS
    /// and only on the registry's own host or a configured `token_hosts`
    /// one; elsewhere the token is asked for anonymously. A realm a public
    /// registry names on a non-public address is refused.
    async fn answer_challenge(
        &self,
        headers: &HeaderMap,
        url: &str,
        private_ok: bool,
    ) -> Result<HeaderValue, String> {
        let challenge = headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("{url}: 401 without a WWW-Authenticate challenge"))?;
        let basic = self.credentials.as_ref().map(|c| {
            use base64ct::Encoding as _;
            let raw = format!("{}:{}", c.username, c.password.as_str());
            format!("Basic {}", base64ct::Base64::encode_string(raw.as_bytes()))
        });
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let b = basic.ok_or_else(|| {
                format!("{url}: the registry asks for credentials and none are configured")
            })?;
            return HeaderValue::from_str(&b).map_err(|e| e.to_string());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(format!("{url}: unsupported auth scheme {scheme:?}"));
        }
        let p = challenge_params(params);
        let realm = p
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("{url}: a bearer challenge without a realm"))?;
        let mut query = Vec::new();
        for key in ["service", "scope"] {
            if let Some((_, v)) = p.iter().find(|(k, _)| k == key) {
                query.push(format!("{key}={}", percent_encode(v)));
            }
        }
        let token_url = if query.is_empty() {
            realm
        } else {
            format!(
                "{realm}{}{}",
                if realm.contains('?') { '&' } else { '?' },
                query.join("&")
            )
        };
        let realm_host = host_of(&authority_of(&token_url));
        let registry_host = host_of(&authority_of(url));
        let trusted_realm = realm_host == registry_host
            || self.credentials.as_ref().is_some_and(|c| {
                c.token_hosts
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(&realm_host))
            });
        let mut h = HeaderMap::new();
        match basic {
            Some(b)
                if trusted_realm
                    && (token_url.starts_with("https://") || is_loopback(&realm_host)) =>
            {
                h.insert(
                    header::AUTHORIZATION,
                    HeaderValue::from_str(&b).map_err(|e| e.to_string())?,
                );
            }
            Some(_) => tracing::warn!(
                realm = %token_url,
                "registry: the token service is not on the registry's host (nor in token_hosts) or not HTTPS; asking it without credentials"
            ),
            None => {}
        }
        let public_only = realm_host != registry_host && !private_ok;
        let r = self
            .once(
                &Method::GET,
                &token_url,
                &h,
                &Bytes::new(),
                64 << 10,
                public_only,
            )
            .await
            .map_err(Failure::message)?;
        if !r.status.is_success() {
            return Err(format!(
                "{token_url}: the token service answered {}",
                r.status
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("{token_url}: not a token response: {e}"))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(|| format!("{token_url}: no token in the response"))?;
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())
    }

    /// The component `r` names, checked against `pin` twice: the layer's
    /// digest in the manifest before anything is downloaded, the bytes'
    /// own digest after.
    ///
    /// # Errors
    ///
    /// What was wrong (unreachable, no such manifest, not a Wasm artifact,
    /// a layer that is not the pin, too big, bytes that do not hash).
    pub async fn pull(&self, r: &Reference, pin: &Digest, limit: u64) -> Result<Vec<u8>, String> {
        let base = self.base(&r.registry).await;
        let url = format!("{base}/v2/{}/manifests/{}", r.repository, r.reference);
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static(
                "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            ),
        );
        let res = self
            .request(Method::GET, &url, h, Bytes::new(), MAX_MANIFEST)
            .await?;
        if !res.status.is_success() {
            return Err(format!(
                "{r}: the registry answered {} for the manifest{}",
                res.status,
                error_detail(&res.body)
            ));
        }
        if let Ok(want) = r.reference.parse::<Digest>()
            && Digest::of(&res.body) != want
        {
            return Err(format!("{r}: the manifest does not hash to its digest"));
        }
        let layer = wasm_layer(&res.body).map_err(|e| format!("{r}: {e}"))?;
        if layer.0 != *pin {
            return Err(format!(
                "{r}: its layer is {}, not the pinned {pin}; refused before downloading",
                layer.0
            ));
        }
        if layer.1 > limit {
            return Err(format!(
                "{r}: its layer is {} bytes, more than {limit}",
                layer.1
            ));
        }
        let url = format!("{base}/v2/{}/blobs/{pin}", r.repository);
        let res = self
            .request(Method::GET, &url, HeaderMap::new(), Bytes::new(), limit)
            .await?;
        if !res.status.is_success() {
            return Err(format!(
                "{r}: the registry answered {} for the layer{}",
                res.status,
                error_detail(&res.body)
            ));
        }
        let got = Digest::of(&res.body);
        if got != *pin {
            return Err(format!(
                "{r}: the layer's bytes hash to {got}, not the pinned {pin}; refused before compiling"
            ));
        }
        Ok(res.body)
    }

    /// Publishes `component` as a Wasm OCI artifact under `r`'s tag:
    /// returns (component digest, manifest digest).
    ///
    /// # Errors
    ///
    /// What the registry refused.
    pub async fn push(&self, r: &Reference, component: &[u8]) -> Result<(Digest, Digest), String> {
        let base = self.base(&r.registry).await;
        let layer = Digest::of(component);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "wasm",
            "os": "wasip2",
            "layerDigests": [layer.to_string()],
        }))
        .map_err(|e| e.to_string())?;
        let config_digest = Digest::of(&config);
        for (digest, bytes) in [(layer, component.to_vec()), (config_digest, config.clone())] {
            self.upload_blob(&base, &r.repository, &digest, bytes)
                .await
                .map_err(|e| format!("{r}: {e}"))?;
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": WASM_LAYER,
            "config": { "mediaType": WASM_CONFIG, "digest": config_digest.to_string(), "size": config.len() },
            "layers": [{ "mediaType": WASM_LAYER, "digest": layer.to_string(), "size": component.len() }],
        }))
        .map_err(|e| e.to_string())?;
        let url = format!("{base}/v2/{}/manifests/{}", r.repository, r.reference);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_MANIFEST));
        let res = self
            .request(
                Method::PUT,
                &url,
                h,
                Bytes::from(manifest.clone()),
                64 << 10,
            )
            .await?;
        if res.status != StatusCode::CREATED {
            return Err(format!(
                "{r}: the registry refused the manifest: {}{}",
                res.status,
                error_detail(&res.body)
            ));
        }
        Ok((layer, Digest::of(&manifest)))
    }

    async fn upload_blob(
        &self,
        base: &str,
        repo: &str,
        digest: &Digest,
        bytes: Vec<u8>,
    ) -> Result<(), String> {
        let head = format!("{base}/v2/{repo}/blobs/{digest}");
        let r = self
            .request(Method::HEAD, &head, HeaderMap::new(), Bytes::new(), 0)
            .await?;
        if r.status.is_success() {
            return Ok(());
        }
        let start = format!("{base}/v2/{repo}/blobs/uploads/");
        let r = self
            .request(
                Method::POST,
                &start,
                HeaderMap::new(),
                Bytes::new(),
                64 << 10,
            )
            .await?;
        if r.status != StatusCode::ACCEPTED {
            return Err(format!(
                "starting an upload: {}{}",
                r.status,
                error_detail(&r.body)
            ));
        }
        let location = r
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or("an upload without Location")?;
        let location = absolute(&start, location);
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!(
            "{location}{sep}digest={}",
            percent_encode(&digest.to_string())
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let r = self
            .request(Method::PUT, &put, h, Bytes::from(bytes), 64 << 10)
            .await?;
        if r.status != StatusCode::CREATED {
            return Err(format!(
                "uploading {digest}: {}{}",
                r.status,
                error_detail(&r.body)
            ));
        }
        Ok(())
    }
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> IoStream for T {}

fn backoff(attempt: u32) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let jitter = u64::from(u16::from_le_bytes(b)) % 250;
    Duration::from_millis((250u64 << attempt.min(6)) + jitter)
}

fn authority_of(url: &str) -> String {
    url.split_once("://")
        .map_or(url, |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned()
}

/// `to` (a Location) made absolute against `from`.
fn absolute(from: &str, to: &str) -> String {
    if to.contains("://") {
        return to.to_owned();
    }
    let (scheme, rest) = from.split_once("://").unwrap_or(("https", from));
    let host = rest.split('/').next().unwrap_or("");
    if to.starts_with('/') {
        format!("{scheme}://{host}{to}")
    } else {
        let dir = from.rsplit_once('/').map_or(from, |(d, _)| d);
        format!("{dir}/{to}")
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `key="value", key=value` pairs of an auth challenge.
fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(i) => (&q[..i], &q[i + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        out.push((k, v.to_owned()));
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// The registry's error body, briefly.
fn error_detail(body: &[u8]) -> String {
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return String::new(),
    };
    v["errors"][0]["message"]
        .as_str()
        .map(|m| format!(" ({})", m.chars().take(200).collect::<String>()))
        .unwrap_or_default()
}

/// The one Wasm layer of an image manifest: (digest, size).
fn wasm_layer(manifest: &[u8]) -> Result<(Digest, u64), String> {
    let v: serde_json::Value =
        serde_json::from_slice(manifest).map_err(|e| format!("the manifest is not JSON: {e}"))?;
    if let Some(mt) = v["mediaType"].as_str()
        && mt.contains("index")
    {
        return Err("an image index, not a Wasm artifact's manifest".into());
    }
    let layers = v["layers"].as_array().ok_or("the manifest has no layers")?;
    let wasm: Vec<&serde_json::Value> = layers
        .iter()
        .filter(|l| matches!(l["mediaType"].as_str(), Some(WASM_LAYER | WASM_LAYER_OLD)))
        .collect();
    let [layer] = wasm.as_slice() else {
        return Err(format!(
            "a Wasm artifact has exactly one {WASM_LAYER} layer; this manifest has {}",
            wasm.len()
        ));
    };
    let digest = layer["digest"]
        .as_str()
        .ok_or("the layer has no digest")?
        .parse::<Digest>()
        .map_err(|e| format!("the layer's digest: {e}"))?;
    let size = layer["size"].as_u64().ok_or("the layer has no size")?;
    Ok((digest, size))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn references_are_parsed_and_bad_ones_named() {
        let r: Reference = "oci://127.0.0.1:5000/edge/sensor:1.2".parse().unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "edge/sensor", "1.2")
        );
        assert_eq!(r.to_string(), "oci://127.0.0.1:5000/edge/sensor:1.2");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r: Reference = format!("oci://ghcr.io/acme/s@{d}").parse().unwrap();
        assert_eq!(r.reference, d);
        assert_eq!(r.to_string(), format!("oci://ghcr.io/acme/s@{d}"));
        let r: Reference = "oci://r.example/s".parse().unwrap();
        assert_eq!(r.reference, "latest");
        for bad in [
            "https://r/s:1",
            "oci://r",
            "oci:///s:1",
            "oci://r/S:1",
            "oci://r/s:t/x",
            "oci://r/s@sha256:12",
            "oci://r/s:",
            "oci://r/../s:1",
            "oci://r?x/s:1",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_is_for_a_loopback_registry_without_tls_only() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = Client::new(None, None).unwrap();
        // Nothing listens on port 1: a loopback registry falls back to
        // plain HTTP; a remote one never does.
        assert_eq!(rt.block_on(c.base("127.0.0.1:1")), "http://127.0.0.1:1");
        assert_eq!(rt.block_on(c.base("[::1]:1")), "http://[::1]:1");
        assert_eq!(
            rt.block_on(c.base("registry.example")),
            "https://registry.example"
        );
        assert_eq!(
            rt.block_on(c.base("10.0.0.1:5000")),
            "https://10.0.0.1:5000"
        );
        let err = rt
            .block_on(c.once(
                &Method::GET,
                "http://10.0.0.1:5000/v2/",
                &HeaderMap::new(),
                &Bytes::new(),
                1,
                false,
            ))
            .unwrap_err()
            .message();
        assert!(
            err.contains("plain HTTP only to a loopback registry"),
            "{err}"
        );
        // With credentials there is no plain-HTTP fallback, loopback or not.
        let with = with_credentials(&[]);
        assert_eq!(rt.block_on(with.base("127.0.0.1:1")), "https://127.0.0.1:1");
    }

    /// A client with credentials `u`/`secret` that may also go to the token
    /// services on `token_hosts`.
    fn with_credentials(token_hosts: &[&str]) -> Client {
        Client::new(
            None,
            Some(Credentials {
                username: "u".into(),
                password: zeroize::Zeroizing::new("secret".into()),
                token_hosts: token_hosts.iter().map(|h| (*h).to_owned()).collect(),
            }),
        )
        .unwrap()
    }

    #[test]
    fn a_public_registry_cannot_send_the_device_to_private_addresses() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = Client::new(None, None).unwrap();
        for (url, class) in [
            ("http://127.0.0.1:1/v2/", "loopback"),
            ("https://169.254.169.254/latest/meta-data/", "link-local"),
            ("https://10.1.2.3/v2/", "private-use"),
            ("https://localhost:1/v2/", "loopback"),
        ] {
            let err = rt
                .block_on(c.once(&Method::GET, url, &HeaderMap::new(), &Bytes::new(), 1, true))
                .unwrap_err()
                .message();
            assert!(
                err.contains("refused") && err.contains(class),
                "{url}: {err}"
            );
        }
        assert!(!on_private_network("8.8.8.8"));
        assert!(on_private_network("10.0.0.9"));
        assert!(on_private_network("localhost"));
        // A name is never private, whatever it resolves to now.
        assert!(!on_private_network("registry.lan"));
    }

    /// A registry whose bearer challenge names a token service on another
    /// host: the token is asked for without the credentials.
    #[test]
    fn credentials_go_to_no_other_host() {
        use std::io::{BufRead as _, Write as _};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The token service, on "localhost" (another host name than the
        // registry's 127.0.0.1): records whether credentials came.
        let tokens = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let token_port = tokens.local_addr().unwrap().port();
        let saw_credentials = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let saw = saw_credentials.clone();
        std::thread::spawn(move || {
            for conn in tokens.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if line.to_ascii_lowercase().starts_with("authorization:") {
                        saw.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                let body = br#"{"token":"t"}"#;
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(body);
            }
        });
        let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let reg = registry.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in registry.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut bearer = false;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    bearer |= line
                        .to_ascii_lowercase()
                        .starts_with("authorization: bearer");
                }
                let _ = if bearer {
                    conn.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                } else {
                    write!(
                        conn,
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://localhost:{token_port}/token\",service=\"r\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                };
            }
        });
        let get = |token_hosts: &[&str]| {
            rt.block_on(with_credentials(token_hosts).request(
                Method::GET,
                &format!("http://{reg}/v2/"),
                HeaderMap::new(),
                Bytes::new(),
                1024,
            ))
            .unwrap()
        };
        let r = get(&[]);
        assert!(r.status.is_success(), "{}", r.status);
        assert!(
            !saw_credentials.load(std::sync::atomic::Ordering::SeqCst),
            "the credentials went to another host's token service"
        );
        // Named in token_hosts, the same service gets them.
        get(&["localhost"]);
        assert!(saw_credentials.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn auth_challenges_and_locations_are_read() {
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull".into()));
        assert_eq!(
            absolute(
                "http://h:1/v2/a/blobs/uploads/",
                "/v2/a/blobs/uploads/x?s=1"
            ),
            "http://h:1/v2/a/blobs/uploads/x?s=1"
        );
        assert_eq!(absolute("http://h/a", "https://o/b"), "https://o/b");
    }

    #[test]
    fn only_one_wasm_layer_is_accepted() {
        let d = format!("sha256:{}", "cd".repeat(32));
        let m = |layers: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({ "layers": layers })).unwrap()
        };
        let one = m(serde_json::json!([{ "mediaType": WASM_LAYER, "digest": d, "size": 5 }]));
        assert_eq!(wasm_layer(&one).unwrap().1, 5);
        let two = m(serde_json::json!([
            { "mediaType": WASM_LAYER, "digest": d, "size": 5 },
            { "mediaType": WASM_LAYER, "digest": d, "size": 5 }
        ]));
        assert!(wasm_layer(&two).unwrap_err().contains("exactly one"));
        let tar = m(
            serde_json::json!([{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 5 }]),
        );
        assert!(wasm_layer(&tar).unwrap_err().contains("has 0"));
        assert!(wasm_layer(b"nope").unwrap_err().contains("not JSON"));
    }
}
