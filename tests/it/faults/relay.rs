//! An in-process TCP relay in front of a broker port, for injecting network faults between a
//! daemon and RabbitMQ (as lapin's own recovery tests and Toxiproxy do):
//!
//! * [`Relay::cut`] closes every relayed connection in both directions (each peer sees EOF), and
//!   keeps listening, so the next connect works;
//! * [`Relay::stall`] stops forwarding bytes, on open connections and on new ones, but keeps
//!   every socket open: to each end the other is a silent, half-open peer. Only heartbeats can
//!   tell;
//! * [`Relay::restore`] forwards again. Whatever either end closed meanwhile is closed on the
//!   other side as soon as the relay reads the EOF.
//!
//! Plain std threads: one accepting, two per connection (one per direction).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a stalled forwarder looks at the relay state again, and the read timeout that lets
/// a forwarder notice a stall or shutdown while its peer is quiet.
const TICK: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Shared {
    stalled: AtomicBool,
    shutdown: AtomicBool,
    /// Both sockets of every live connection, so that `cut` can close them.
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    accepted: AtomicU64,
    cuts: AtomicU64,
}

impl Shared {
    fn forget(&self, id: u64) {
        self.conns
            .lock()
            .expect("relay lock")
            .retain(|(i, _, _)| *i != id);
    }
}

/// A relay listening on `127.0.0.1:<port>` that forwards to `upstream`.
pub struct Relay {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listen on a free loopback port and relay every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay binds a loopback port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("relay address").port();
        let shared = Arc::new(Shared::default());
        let state = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("relay-{port}"))
            .spawn(move || accept_loop(&listener, upstream, &state))
            .expect("spawn relay acceptor");
        Relay {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port to connect to instead of the broker's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `url` (an `amqp://` URL of the upstream broker) with its port replaced by the relay's.
    pub fn url(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).expect("a valid AMQP URL");
        parsed.set_port(Some(self.port)).expect("URL takes a port");
        parsed.to_string()
    }

    /// Close every relayed connection in both directions; keep accepting new ones. Returns how
    /// many connections were cut.
    pub fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.shared.conns.lock().expect("relay lock"));
        for (_, down, up) in &conns {
            let _ = down.shutdown(Shutdown::Both);
            let _ = up.shutdown(Shutdown::Both);
        }
        self.shared.cuts.fetch_add(1, Ordering::SeqCst);
        conns.len()
    }

    /// Stop forwarding bytes on every connection, open or new, keeping the sockets open.
    pub fn stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }

    /// Forward again after [`Relay::stall`].
    pub fn restore(&self) {
        self.shared.stalled.store(false, Ordering::SeqCst);
    }

    /// Connections currently relayed.
    pub fn open_connections(&self) -> usize {
        self.shared.conns.lock().expect("relay lock").len()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.cut();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    while !shared.shutdown.load(Ordering::SeqCst) {
        let down = match listener.accept() {
            Ok((down, _)) => down,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => continue,
        };
        // The upstream connect happens even while stalled: the black hole is in the data path.
        let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
            let _ = down.shutdown(Shutdown::Both);
            continue;
        };
        next_id += 1;
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let id = next_id;
        let _ = down.set_nonblocking(false);
        for s in [&down, &up] {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(TICK));
        }
        let clones = (down.try_clone(), up.try_clone());
        let (Ok(down2), Ok(up2)) = clones else {
            continue;
        };
        let (Ok(down3), Ok(up3)) = (down.try_clone(), up.try_clone()) else {
            continue;
        };
        shared
            .conns
            .lock()
            .expect("relay lock")
            .push((id, down3, up3));
        for (from, to) in [(down, up), (up2, down2)] {
            let state = Arc::clone(shared);
            std::thread::spawn(move || {
                pump(from, to, &state);
                state.forget(id);
            });
        }
    }
}

/// Copy `from` to `to` until either end closes (or the relay cuts them); then close both, so the
/// other direction's pump ends too.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        if shared.stalled.load(Ordering::SeqCst) {
            // Read nothing, write nothing: the bytes wait in the kernel's buffers.
            std::thread::sleep(TICK);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Bytes read just as a stall began wait for the restore too.
                while shared.stalled.load(Ordering::SeqCst)
                    && !shared.shutdown.load(Ordering::SeqCst)
                {
                    std::thread::sleep(TICK);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::eventually;
    use std::time::Instant;

    /// An echo server on a free loopback port: every connection gets its bytes back.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
        let addr = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn connect(relay: &Relay) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", relay.port())).expect("connect to relay");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    }

    fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).expect("write");
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).expect("read the echo");
        got
    }

    /// Whether `s` sees EOF (or a reset) within `limit`, rather than data or silence.
    fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        s.set_read_timeout(Some(limit)).expect("timeout");
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    #[test]
    fn relay_forwards_both_ways() {
        let relay = Relay::start(echo_server());
        let mut a = connect(&relay);
        let mut b = connect(&relay);
        assert_eq!(roundtrip(&mut a, b"hello"), b"hello");
        assert_eq!(roundtrip(&mut b, b"world"), b"world");
        // A large write crosses several buffers intact.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = a.try_clone().expect("clone");
        let payload = big.clone();
        let t = std::thread::spawn(move || writer.write_all(&payload).expect("write big"));
        let mut got = vec![0u8; big.len()];
        a.read_exact(&mut got).expect("read big");
        t.join().expect("writer");
        assert_eq!(got, big);
        assert_eq!(relay.open_connections(), 2);
        assert_eq!(relay.accepted(), 2);
    }

    #[test]
    fn cut_closes_every_connection_and_keeps_listening() {
        let relay = Relay::start(echo_server());
        let mut a = connect(&relay);
        let mut b = connect(&relay);
        assert_eq!(roundtrip(&mut a, b"1"), b"1");
        assert_eq!(roundtrip(&mut b, b"2"), b"2");
        assert_eq!(relay.cut(), 2);
        assert!(
            closed_within(&mut a, Duration::from_secs(2)),
            "a not closed"
        );
        assert!(
            closed_within(&mut b, Duration::from_secs(2)),
            "b not closed"
        );
        let mut c = connect(&relay);
        assert_eq!(roundtrip(&mut c, b"after the cut"), b"after the cut");
        assert!(
            eventually(Duration::from_secs(2), || (relay.open_connections() == 1)
                .then_some(()))
            .is_some(),
            "cut connections are forgotten"
        );
    }

    #[test]
    fn stall_holds_bytes_with_sockets_open_and_restore_delivers_them() {
        let relay = Relay::start(echo_server());
        let mut a = connect(&relay);
        assert_eq!(roundtrip(&mut a, b"before"), b"before");
        relay.stall();
        a.write_all(b"held").expect("the socket still takes bytes");
        // Neither data nor EOF: a silent peer.
        a.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let silent = matches!(a.read(&mut buf), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        assert!(silent, "a stalled relay neither forwards nor closes");
        // A connection made during the stall is accepted but silent too.
        let mut b = connect(&relay);
        b.write_all(b"new").expect("write");
        b.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let silent = matches!(b.read(&mut buf), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        assert!(silent, "new connections are stalled too");

        relay.restore();
        let start = Instant::now();
        a.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = [0u8; 4];
        a.read_exact(&mut got).expect("the held bytes arrive");
        assert_eq!(&got, b"held");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut got = [0u8; 3];
        b.read_exact(&mut got)
            .expect("the new connection's bytes arrive");
        assert_eq!(&got, b"new");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(roundtrip(&mut a, b"after"), b"after");
    }

    #[test]
    fn a_close_during_a_stall_reaches_the_other_end_after_restore() {
        let relay = Relay::start(echo_server());
        let mut a = connect(&relay);
        assert_eq!(roundtrip(&mut a, b"x"), b"x");
        relay.stall();
        a.shutdown(Shutdown::Write).expect("half-close");
        relay.restore();
        assert!(
            closed_within(&mut a, Duration::from_secs(3)),
            "the upstream saw the EOF and closed"
        );
        assert!(
            eventually(Duration::from_secs(3), || (relay.open_connections() == 0)
                .then_some(()))
            .is_some()
        );
    }

    #[test]
    fn url_points_at_the_relay() {
        let relay = Relay::start(echo_server());
        let url = relay.url("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            url,
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", relay.port())
        );
    }
}
