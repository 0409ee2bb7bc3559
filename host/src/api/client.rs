//! The CLI's side of the management socket: one HTTP/1.1 request per
//! connection.

use std::path::Path;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;

/// A response: status and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`null` if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The error message of a failed request (`{"error": ...}`), or the
    /// status.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .map_or_else(|| format!("HTTP {}", self.status), str::to_owned)
    }
}

/// Sends one request to the daemon on `socket`.
///
/// # Errors
///
/// No daemon answers on the socket (the message names it), or the
/// exchange fails.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<(Vec<u8>, &str)>,
) -> anyhow::Result<Answer> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the daemon on {}: {e} (is it running? --socket or ${} names another socket)",
            socket.display(),
            super::SOCKET_ENV
        )
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "edgeward");
    let payload = match body {
        Some((bytes, content_type)) => {
            req = req.header("content-type", content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let resp = sender.send_request(req.body(Full::new(payload))?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer { status, body })
}

/// Sends a GET to the daemon on `socket` and hands each chunk of the
/// response body to `each` as it arrives, with the response's status;
/// returns the status.
///
/// # Errors
///
/// No daemon answers, or the exchange fails.
pub async fn stream(
    socket: &Path,
    path: &str,
    mut each: impl FnMut(u16, &[u8]),
) -> anyhow::Result<u16> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the daemon on {}: {e} (is it running?)",
            socket.display()
        )
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "edgeward")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            each(status, data);
        }
    }
    Ok(status)
}
