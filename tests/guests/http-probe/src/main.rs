//! Test guest: `http-probe AUTHORITY PATH` sends one `wasi:http` GET over
//! plain HTTP and prints `ok: <status> <body>` (exit 0) or
//! `denied: <error>` (exit 1).

use std::process::ExitCode;

use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, Method, OutgoingRequest, Scheme};

fn get(authority: &str, path: &str) -> Result<(u16, String), String> {
    let req = OutgoingRequest::new(Fields::new());
    req.set_method(&Method::Get).map_err(|()| "method")?;
    req.set_scheme(Some(&Scheme::Http)).map_err(|()| "scheme")?;
    req.set_authority(Some(authority))
        .map_err(|()| "authority")?;
    req.set_path_with_query(Some(path)).map_err(|()| "path")?;
    let fut = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    fut.subscribe().block();
    let resp = match fut.get() {
        Some(Ok(Ok(resp))) => resp,
        Some(Ok(Err(e))) => return Err(format!("{e:?}")),
        Some(Err(())) => return Err("response taken twice".into()),
        None => return Err("response not ready".into()),
    };
    let status = resp.status();
    let body = resp.consume().map_err(|()| "body")?;
    let stream = body.stream().map_err(|()| "stream")?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(4096) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(wasi::io::streams::StreamError::Closed) => break,
            Err(e) => return Err(format!("read: {e:?}")),
        }
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let authority = args.get(1).cloned().unwrap_or_default();
    let path = args.get(2).cloned().unwrap_or_else(|| "/".into());
    match get(&authority, &path) {
        Ok((status, body)) => {
            println!("ok: {status} {body}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("denied: {e}");
            ExitCode::FAILURE
        }
    }
}
