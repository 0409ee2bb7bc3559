//! What the allow-list costs on the network paths, against the same
//! operation without it, alternating in one run (medians of 15 rounds):
//!
//! - **connect**: `NetPolicy::check(TcpConnect)` for a listed loopback
//!   literal, then a TCP connect to a loopback listener (accepted and
//!   closed by a thread; the client closes with a reset, so no TIME_WAIT
//!   sockets pile up), against the connect alone;
//! - **udp receive**: a datagram from a loopback peer received, then
//!   `check(UdpReceive)` of its source (what wasmtime-wasi asks per
//!   received datagram), against the receive alone; and for a module whose
//!   entry is a *name*, where a sender outside the list (here loopback) is
//!   refused by its address class before any lookup.
//!
//! Target: connect ≤ 1.2x. Run with `scripts/bench` (or
//! `cargo bench -p edgeward-tests --bench network`).

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Instant;

use edgeward::runtime::network::{NetPolicy, Outbound, Resolver};
use wasmtime_wasi::sockets::SocketAddrUse;

const ROUNDS: usize = 15;
const CONNECTS: u32 = 500;
const DATAGRAMS: u32 = 20_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Resolves every name to 127.0.0.1 (the bench's peer), without DNS.
#[derive(Debug)]
struct Loopback;

impl Resolver for Loopback {
    fn resolve<'a>(
        &'a self,
        _name: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::io::Result<Vec<std::net::IpAddr>>>
                + Send
                + Sync
                + 'a,
        >,
    > {
        Box::pin(async { Ok(vec!["127.0.0.1".parse().expect("ip")]) })
    }
}

/// Polls `f` to completion on this thread: the checks finish without
/// waiting (literals, cached names), so this measures them and not a
/// runtime's wake-up.
fn now<T>(rt: &tokio::runtime::Runtime, f: impl std::future::Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => rt.block_on(f),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for c in listener.incoming() {
            drop(c);
        }
    });
    let entry: Outbound = addr.to_string().parse().expect("entry");
    let policy = NetPolicy::new("bench", &[entry]);

    let connect = |checked: bool| {
        let t = Instant::now();
        for _ in 0..CONNECTS {
            if checked {
                assert!(now(&rt, policy.check(addr, SocketAddrUse::TcpConnect)));
            }
            let s = TcpStream::connect(addr).expect("connect");
            // Close with a reset: thousands of TIME_WAIT sockets would make
            // the kernel's port search, not the connect, the measurement.
            rustix::net::sockopt::set_socket_linger(&s, Some(std::time::Duration::ZERO))
                .expect("linger");
            drop(s);
        }
        t.elapsed().as_nanos() as f64 / f64::from(CONNECTS)
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        with.push(connect(true));
        without.push(connect(false));
    }
    let (c1, c0) = (median(with), median(without));
    println!(
        "connect ns: through the allow-list {c1:.0}, direct {c0:.0} (median of {ROUNDS} rounds of {CONNECTS})"
    );
    println!(
        "network_connect_allowlist_vs_direct ratio={:.2} (target <= 1.2)",
        c1 / c0
    );

    // UDP: a peer sends, the "module" socket receives.
    let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let peer: SocketAddr = tx.local_addr().expect("addr");
    tx.connect(rx.local_addr().expect("addr")).expect("connect");
    let by_literal = NetPolicy::new("bench", &[peer.to_string().parse().expect("entry")]);
    let by_name = NetPolicy::with_resolver(
        "bench",
        &[format!("peer.test:{}", peer.port()).parse().expect("entry")],
        Arc::new(Loopback),
    );
    let recv = |policy: Option<&NetPolicy>| {
        let mut buf = [0u8; 64];
        let t = Instant::now();
        for _ in 0..DATAGRAMS {
            tx.send(b"reading").expect("send");
            let (_, from) = rx.recv_from(&mut buf).expect("recv");
            if let Some(p) = policy {
                std::hint::black_box(now(&rt, p.check(from, SocketAddrUse::UdpReceive)));
            }
        }
        t.elapsed().as_nanos() as f64 / f64::from(DATAGRAMS)
    };
    let (mut lit, mut name, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        lit.push(recv(Some(&by_literal)));
        name.push(recv(Some(&by_name)));
        direct.push(recv(None));
    }
    let (l, n, d) = (median(lit), median(name), median(direct));
    println!(
        "udp receive ns: allowed sender (literal entry) {l:.0}, sender refused (name entry) {n:.0}, direct {d:.0} (median of {ROUNDS} rounds of {DATAGRAMS})"
    );
    println!("network_udp_receive_allowed_vs_direct ratio={:.2}", l / d);
    println!("network_udp_receive_refused_vs_direct ratio={:.2}", n / d);
}
