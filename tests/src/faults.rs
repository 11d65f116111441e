//! A small TCP proxy on loopback that injects faults between two of our processes (a
//! client and the server, or the server and Garage): delays, dropped connections and
//! resets, switched on and off while a test runs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the proxy does to the connections it forwards.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every n-th connection (1 = every one, 0 = none) is cut once it has forwarded
    /// `cut_after` bytes towards the upstream.
    pub cut_every: u64,
    pub cut_after: u64,
    /// Cut with a TCP reset (instead of a clean close).
    pub reset: bool,
    /// Delay before forwarding each read, in either direction.
    pub delay: Duration,
}

pub struct FaultProxy {
    pub port: u16,
    faults: Arc<Mutex<Faults>>,
    stop: Arc<AtomicBool>,
    /// Connections accepted, and connections cut, so far.
    pub accepted: Arc<AtomicU64>,
    pub cut: Arc<AtomicU64>,
    /// Connections currently open (to cut them all at once).
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Bytes forwarded towards the downstream (what the server sent a client) so far.
    pub down_bytes: Arc<AtomicU64>,
    /// The next this many connections are cut once they forwarded `down_cut.1` bytes
    /// towards the downstream ([`FaultProxy::cut_downstream`]).
    down_cut: Arc<(AtomicU64, AtomicU64)>,
    upstream: Arc<Mutex<String>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let proxy = FaultProxy {
            port,
            faults: Arc::new(Mutex::new(Faults::default())),
            stop: Arc::new(AtomicBool::new(false)),
            accepted: Arc::new(AtomicU64::new(0)),
            cut: Arc::new(AtomicU64::new(0)),
            open: Arc::new(Mutex::new(Vec::new())),
            down_bytes: Arc::new(AtomicU64::new(0)),
            down_cut: Arc::new((AtomicU64::new(0), AtomicU64::new(0))),
            upstream: Arc::new(Mutex::new(upstream.to_string())),
        };
        let (faults, stop, accepted, cut, open) = (
            Arc::clone(&proxy.faults),
            Arc::clone(&proxy.stop),
            Arc::clone(&proxy.accepted),
            Arc::clone(&proxy.cut),
            Arc::clone(&proxy.open),
        );
        let (down_bytes, down_cut, upstream) = (
            Arc::clone(&proxy.down_bytes),
            Arc::clone(&proxy.down_cut),
            Arc::clone(&proxy.upstream),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (down, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let n = accepted.fetch_add(1, Ordering::Relaxed) + 1;
                let to = upstream.lock().map(|u| u.clone()).unwrap_or_default();
                let Ok(up) = TcpStream::connect(&to) else {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let f = faults.lock().map(|f| f.clone()).unwrap_or_default();
                let cut_here = f.cut_every > 0 && n % f.cut_every == 0;
                if let (Ok(d), Ok(u)) = (down.try_clone(), up.try_clone())
                    && let Ok(mut o) = open.lock()
                {
                    if o.len() > 512 {
                        o.drain(..256); // closed long ago, most likely; only our copies go
                    }
                    o.push(d);
                    o.push(u);
                }
                let limit = if cut_here { Some(f.cut_after) } else { None };
                let down_limit = down_cut
                    .0
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .ok()
                    .map(|_| down_cut.1.load(Ordering::Relaxed));
                pump(&down, &up, limit, f.clone(), Arc::clone(&cut), None);
                let counted = Some(Arc::clone(&down_bytes));
                pump(&up, &down, down_limit, f, Arc::clone(&cut), counted);
            }
        });
        proxy
    }

    pub fn set(&self, faults: Faults) {
        if let Ok(mut f) = self.faults.lock() {
            *f = faults;
        }
    }

    /// Cuts every connection open now (new ones are forwarded as configured); counts
    /// the connections it reset in [`FaultProxy::cut`].
    pub fn cut_all(&self) {
        if let Ok(mut o) = self.open.lock() {
            let live = o.iter().filter(|s| s.peer_addr().is_ok()).count() as u64;
            for s in o.drain(..) {
                reset(&s);
            }
            self.cut.fetch_add(live / 2, Ordering::Relaxed);
        }
    }

    /// Cuts each of the next `connections` connections once it has forwarded `after`
    /// bytes towards the downstream (the server's answers to a client).
    pub fn cut_downstream(&self, connections: u64, after: u64) {
        self.down_cut.1.store(after, Ordering::Relaxed);
        self.down_cut.0.store(connections, Ordering::Relaxed);
    }

    /// Forwards new connections to `upstream` (`host:port`) from now on, e.g. to a
    /// server restarted on another port.
    pub fn set_upstream(&self, upstream: &str) {
        if let Ok(mut u) = self.upstream.lock() {
            *u = upstream.to_string();
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut_all();
    }
}

fn reset(s: &TcpStream) {
    // SO_LINGER 0 turns the close into a reset.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &linger);
    let _ = s.shutdown(Shutdown::Both);
}

/// Copies `from` to `to` on a thread; with `limit`, cuts both after that many bytes;
/// adds what it forwards to `counted`.
fn pump(
    from: &TcpStream,
    to: &TcpStream,
    limit: Option<u64>,
    f: Faults,
    cut: Arc<AtomicU64>,
    counted: Option<Arc<AtomicU64>>,
) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !f.delay.is_zero() {
                thread::sleep(f.delay);
            }
            if let Some(l) = limit
                && sent + n as u64 > l
            {
                cut.fetch_add(1, Ordering::Relaxed);
                if f.reset {
                    reset(&from);
                    reset(&to);
                } else {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                }
                return;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
            if let Some(c) = &counted {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
