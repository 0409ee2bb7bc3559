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
        "disk-fill" => disk_fill(arg(2).parse().unwrap_or(64 << 20)),
        "disk-tricks" => disk_tricks(arg(2).parse().unwrap_or(1 << 20)),
        "open-loop" => {
            // Opens files and keeps them open, until refused.
            let mut held = Vec::new();
            for i in 0.. {
                match std::fs::File::create(format!("/data/f{i}")) {
                    Ok(f) => held.push(f),
                    Err(e) => {
                        // Refused again and again while full: each refusal
                        // must leave no file behind.
                        let n = held.len();
                        let again = (0..100)
                            .filter(|j| std::fs::File::create(format!("/data/g{i}-{j}")).is_err())
                            .count();
                        // Handled: close a few (printing needs a stream and a pollable).
                        held.truncate(n.saturating_sub(4));
                        println!("denied: open-loop after {n}: {e}; {again} more refused");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        "socket-loop" => {
            // Creates sockets (wasi:sockets directly: std has no unbound
            // socket) and keeps them, until refused.
            use wasi::sockets::{network::IpAddressFamily, tcp_create_socket};
            let mut held = Vec::new();
            loop {
                match tcp_create_socket::create_tcp_socket(IpAddressFamily::Ipv4) {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        let n = held.len();
                        held.truncate(n.saturating_sub(4));
                        println!("denied: socket-loop after {n}: {e:?}");
                        return ExitCode::FAILURE;
                    }
                }
            }
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

/// Whether an error is the disk budget's refusal: EDQUOT, or EIO for a
/// write through a stream (wasi-libc reports every failed stream write as
/// EIO; the host's `filesystem-error-code` says `quota`).
fn is_quota(e: &std::io::Error) -> bool {
    const EIO: i32 = 29;
    e.kind() == std::io::ErrorKind::QuotaExceeded || e.raw_os_error() == Some(EIO)
}

/// Fills `/data` through a write stream until refused (or `stop` bytes
/// are written: exits 1); then shows that freeing space gives it back.
/// Exits 0 when the refusal was the budget's.
fn disk_fill(stop: u64) -> ExitCode {
    use std::io::Write as _;
    let chunk = vec![7u8; 64 << 10];
    let mut written = 0u64;
    let refusal = {
        let Ok(mut f) = std::fs::File::create("/data/fill") else {
            println!("denied: disk-fill: cannot create /data/fill");
            return ExitCode::FAILURE;
        };
        loop {
            match f.write_all(&chunk) {
                Ok(()) => written += chunk.len() as u64,
                Err(e) => break e,
            }
            if written >= stop {
                println!("disk-fill: wrote {written} bytes, never refused");
                return ExitCode::FAILURE;
            }
        }
    };
    println!("disk-fill: refused after {written} bytes: {refusal}");
    // A module retrying its refused write cannot flood the daemon's log.
    let retried = (0..100)
        .filter(|_| std::fs::write("/data/retry", &chunk).is_err())
        .count();
    let _ = std::fs::remove_file("/data/retry");
    println!("disk-fill: {retried} retries refused");
    let freed = std::fs::remove_file("/data/fill")
        .and_then(|()| std::fs::write("/data/after", b"space is back"));
    println!("disk-fill: after freeing: {freed:?}");
    if is_quota(&refusal) && retried == 100 && freed.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Tries what a module could do to get past its budget (`max` bytes in
/// `/data`; `/other` is another budgeted directory), one line each:
/// `trick NAME: refused (...)` or `trick NAME: ok ...`.
fn disk_tricks(max: u64) -> ExitCode {
    use std::io::Write as _;
    let line = |name: &str, r: std::io::Result<String>| match r {
        Ok(v) => println!("trick {name}: ok {v}"),
        Err(e) if e.kind() == std::io::ErrorKind::QuotaExceeded => {
            println!("trick {name}: refused (quota): {e}")
        }
        Err(e) if is_quota(&e) => println!("trick {name}: refused (stream): {e}"),
        Err(e) => println!("trick {name}: refused ({:?}): {e}", e.kind()),
    };
    // A sparse terabyte: set-size.
    line(
        "sparse-set-size",
        std::fs::File::create("/data/sparse")
            .and_then(|f| f.set_len(1 << 40))
            .map(|()| "1TiB".into()),
    );
    let _ = std::fs::remove_file("/data/sparse");
    // A byte at a terabyte: descriptor write at an offset.
    line(
        "pwrite-far",
        std::fs::File::create("/data/far").and_then(|f| pwrite(&f, b"x", 1 << 40)),
    );
    let _ = std::fs::remove_file("/data/far");
    // Unlink a file it holds open, then write another as big.
    let big = vec![1u8; usize::try_from(max * 3 / 4).unwrap_or(0)];
    let held = std::fs::File::create("/data/held").and_then(|mut f| {
        f.write_all(&big)?;
        Ok(f)
    });
    match held {
        Ok(held) => {
            let _ = std::fs::remove_file("/data/held");
            line(
                "write-while-unlinked-held",
                std::fs::write("/data/next", &big).map(|()| "written".into()),
            );
            let _ = std::fs::remove_file("/data/next");
            drop(held);
            line(
                "write-after-close",
                std::fs::write("/data/next", &big).map(|()| "written".into()),
            );
            let _ = std::fs::remove_file("/data/next");
        }
        Err(e) => line("write-while-unlinked-held", Err(e)),
    }
    // Appending.
    line(
        "append",
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open("/data/log")
            .and_then(|mut f| {
                // At most 64 MiB if never refused.
                for _ in 0..(16 << 10) {
                    f.write_all(&[b'a'; 4096])?;
                }
                Ok("never refused".into())
            }),
    );
    let _ = std::fs::remove_file("/data/log");
    // Entries: directories, empty files, links.
    let mut n = 0;
    line(
        "mkdir-loop",
        loop {
            if n == 10_000 {
                break Ok(());
            }
            if let Err(e) = std::fs::create_dir(format!("/data/d{n}")) {
                break Err(e);
            }
            n += 1;
        }
        .map(|()| String::new()),
    );
    let mut k = 0;
    line(
        "symlink-loop",
        loop {
            if k == 10_000 {
                break Ok(());
            }
            if let Err(e) = symlink("x", &format!("/data/d0/s{k}")) {
                break Err(e);
            }
            k += 1;
        }
        .map(|()| String::new()),
    );
    for i in 0..n {
        let _ = std::fs::remove_dir_all(format!("/data/d{i}"));
    }
    println!("trick entries: {n} directories, then {k} links");
    // Across the boundary.
    let _ = std::fs::write("/data/x", b"x");
    line(
        "rename-across",
        std::fs::rename("/data/x", "/other/x").map(|()| "renamed".into()),
    );
    line(
        "hard-link-across",
        std::fs::hard_link("/data/x", "/other/y").map(|()| "linked".into()),
    );
    line(
        "hard-link-within",
        std::fs::hard_link("/data/x", "/data/y").map(|()| "linked".into()),
    );
    line(
        "rename-within",
        std::fs::rename("/data/y", "/data/z").map(|()| "renamed".into()),
    );
    ExitCode::SUCCESS
}

/// `pwrite(2)` through wasi-libc (a descriptor write at an offset).
fn pwrite(f: &std::fs::File, buf: &[u8], offset: i64) -> std::io::Result<String> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: `buf` is valid for `buf.len()` bytes and the descriptor is
    // open for the duration of the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::pwrite(f.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(format!("{rc} bytes"))
    }
}
