//! Reading what a client still sends after it has been answered.
//!
//! A request refused before its body is read (a bad query, no role, an
//! unknown route, a digest that does not match) is answered at once; the
//! body the client is still sending would then meet a closed socket, and
//! on a close with unread data the client (or a bridge such as socat in
//! between) may see the connection reset before it reads the answer.
//! Each request body is wrapped so that, dropped unfinished, the rest is
//! read and discarded by a task of its own: at most [`LINGER_BYTES`],
//! for at most [`LINGER_TIME`]. Past either, the connection closes as
//! before. A client that wants to hold the daemon busy this way can do
//! no more than it could by sending a body that is read.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;

/// The most of an unread body read after the answer.
pub const LINGER_BYTES: u64 = 1 << 20;
/// The longest it is waited for.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Middleware: wraps the request body (see the module's docs).
pub async fn linger(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let body = Body::new(Lingering {
        inner: Some(body),
        done: false,
    });
    next.run(Request::from_parts(parts, body)).await
}

struct Lingering {
    inner: Option<Body>,
    done: bool,
}

impl HttpBody for Lingering {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.done = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if self.done || body.is_end_stream() {
            return;
        }
        // A declared length over the bound: not worth reading.
        if body.size_hint().lower() > LINGER_BYTES {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _ = tokio::time::timeout(LINGER_TIME, async move {
                let mut read = 0u64;
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(data) = frame.data_ref() {
                        read += data.len() as u64;
                    }
                    if read > LINGER_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}
