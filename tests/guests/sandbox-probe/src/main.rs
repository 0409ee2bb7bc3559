//! Test guest: does one thing named on its command line and reports the
//! outcome on stdout, so tests can check what the sandbox allowed.
//!
//! Every action prints `ok: ...` and exits 0 when the operation succeeded,
//! or prints `denied: <error>` and exits 1 when it failed.

use std::io::{Read, Write};
use std::process::ExitCode;

fn report<T: std::fmt::Debug, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> ExitCode {
    match r {
        Ok(v) => {
            println!("ok: {what}: {v:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("denied: {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `symlink(2)` through wasi-libc (std's WASI symlink is unstable).
fn symlink(target: &str, link: &str) -> std::io::Result<()> {
    let target = std::ffi::CString::new(target)?;
    let link = std::ffi::CString::new(link)?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive
    // the call; `symlink` only reads them.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(1).as_str() {
        "hello" => {
            println!("hello from sandbox-probe");
            eprintln!("to stderr");
            ExitCode::SUCCESS
        }
        "args" => {
            println!("args: {:?}", &args[1..]);
            ExitCode::SUCCESS
        }
        "env" => {
            for (k, v) in std::env::vars() {
                println!("{k}={v}");
            }
            ExitCode::SUCCESS
        }
        "stdin" => {
            let mut buf = String::new();
            report(
                "stdin",
                std::io::stdin().read_to_string(&mut buf).map(|_| buf),
            )
        }
        "read" => report("read", std::fs::read_to_string(arg(2))),
        "write" => report("write", std::fs::write(arg(2), arg(3))),
        "list" => report(
            "list",
            std::fs::read_dir(arg(2)).map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
            }),
        ),
        "symlink-read" => {
            // Plant a symlink in our own dir pointing at `target`, then read through it.
            let (target, link) = (arg(2), arg(3));
            if let Err(e) = symlink(&target, &link) {
                println!("denied: symlink: {e}");
                return ExitCode::FAILURE;
            }
            report("read via symlink", std::fs::read_to_string(&link))
        }
        "connect" => report(
            "connect",
            std::net::TcpStream::connect(arg(2)).and_then(|mut s| {
                s.write_all(b"escaped")?;
                Ok(())
            }),
        ),
        "bind" => report("bind", std::net::TcpListener::bind(arg(2)).map(|_| ())),
        "udp" => report(
            "udp",
            std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"escaped", arg(2))),
        ),
        "lookup" => report(
            "lookup",
            std::net::ToSocketAddrs::to_socket_addrs(&(arg(2).as_str(), 80))
                .map(|a| a.collect::<Vec<_>>()),
        ),
        "flood" => {
            // Unbounded output: 1 KiB lines, forever.
            let line = "x".repeat(1023);
            let mut out = std::io::stdout().lock();
            loop {
                if writeln!(out, "{line}").is_err() {
                    return ExitCode::FAILURE;
                }
            }
        }
        "endless-line" => {
            // Output that never ends a line.
            let chunk = "y".repeat(4096);
            let mut out = std::io::stdout().lock();
            loop {
                if write!(out, "{chunk}").is_err() {
                    return ExitCode::FAILURE;
                }
            }
        }
        "recurse" => {
            // Unbounded recursion on the wasm stack itself (no frame data in
            // linear memory), so only the engine's stack limit stops it.
            #[inline(never)]
            fn down(n: u64) -> u64 {
                if n == u64::MAX {
                    0
                } else {
                    down(n + 1).wrapping_mul(3).wrapping_add(n)
                }
            }
            let start: u64 = arg(2).parse().unwrap_or(0);
            println!("ok: recurse: {}", down(start));
            ExitCode::SUCCESS
        }
        "big-path" => {
            // One host call carrying `MiB` mebibytes.
            let mib: usize = arg(2).parse().unwrap_or(1);
            let path = "a".repeat(mib << 20);
            report("big-path", std::fs::metadata(&path).map(|_| ()))
        }
        "udp-echo" => {
            // Send a datagram and wait for the reply.
            report(
                "udp-echo",
                std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| {
                    s.send_to(b"ping", arg(2))?;
                    let mut buf = [0u8; 64];
                    let (n, _) = s.recv_from(&mut buf)?;
                    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
                }),
            )
        }
        "ansi" => {
            // Terminal escapes, a forged log line and a forged neighbour
            // line, a bidi override and bytes that are not UTF-8.
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(b"\x1b[2J\x1b]0;pwned\x07plain \x1b[31mred\x1b[0m\r2026-11-29T00:00:00.000Z INFO forged: daemon compromised\n");
            let _ = out.write_all(b"spoof \xe2\x80\xae evil \xff\xfe end\n");
            let _ = out.write_all(b"ansi-done\n");
            let _ = out.flush();
            ExitCode::SUCCESS
        }
        "open-loop" => {
            // Opens files and keeps them open, until refused.
            let mut held = Vec::new();
            for i in 0.. {
                match std::fs::File::create(format!("/data/f{i}")) {
                    Ok(f) => held.push(f),
                    Err(e) => {
                        println!("denied: open-loop after {}: {e}", held.len());
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        "connect-loop" => {
            // Refused connects as fast as possible.
            let n: u32 = arg(2).parse().unwrap_or(1);
            let refused = (0..n)
                .filter(|_| std::net::TcpStream::connect(arg(3)).is_err())
                .count();
            println!("connect-loop: {refused} refused");
            ExitCode::SUCCESS
        }
        "tick" => {
            // A long-running module that wakes once a second.
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        "exit" => {
            let code: i32 = arg(2).parse().unwrap_or(1);
            std::process::exit(code)
        }
        "panic" => panic!("sandbox-probe was asked to panic"),
        "spin" => {
            // Spin without host calls; only an epoch interrupt can stop this.
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "alloc" => {
            let mib: usize = arg(2).parse().unwrap_or(1);
            let mut v: Vec<Vec<u8>> = Vec::new();
            for _ in 0..mib {
                v.push(vec![1u8; 1 << 20]);
            }
            println!("ok: alloc: {} MiB", v.len());
            ExitCode::SUCCESS
        }
        other => {
            let mut err = std::io::stderr();
            let _ = writeln!(err, "sandbox-probe: unknown action {other:?}");
            ExitCode::from(2)
        }
    }
}
