//! The `faults` scenario's TCP proxy on loopback: each connection it accepts gets a fate
//! drawn at random: cut after some bytes (a clean close or a TCP reset), forwarded with a
//! delay before every read, or forwarded as it is. The tests crate's proxy
//! (`datamover_tests::faults`) cuts every n-th connection and delays all of them at
//! once, switched by the test; a long run needs independent random fates per
//! connection, so this one draws them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// How often each fault is drawn.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Percent of connections cut (after 0..=`max_cut_bytes` bytes, in either direction).
    pub drop_percent: u32,
    /// Percent of the cut connections cut with a reset rather than a clean close.
    pub reset_percent: u32,
    /// Percent of the other connections delayed (1..=`max_delay_ms` before each read).
    pub delay_percent: u32,
    pub max_delay_ms: u64,
    pub max_cut_bytes: u64,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            drop_percent: 10,
            reset_percent: 50,
            delay_percent: 20,
            max_delay_ms: 25,
            max_cut_bytes: 1024 * 1024,
        }
    }
}

/// What happens to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Clean,
    Delay(Duration),
    /// Cut once `after` bytes went through in the direction `upstream` (towards the
    /// server if true), with a reset if `reset`.
    Cut {
        after: u64,
        reset: bool,
        upstream: bool,
    },
}

/// Draws one connection's fate.
pub fn decide(plan: &Plan, rng: &mut impl Rng) -> Fate {
    if rng.gen_range(0..100) < plan.drop_percent {
        return Fate::Cut {
            after: rng.gen_range(0..=plan.max_cut_bytes),
            reset: rng.gen_range(0..100) < plan.reset_percent,
            upstream: rng.gen_bool(0.5),
        };
    }
    if rng.gen_range(0..100) < plan.delay_percent {
        return Fate::Delay(Duration::from_millis(
            rng.gen_range(1..=plan.max_delay_ms.max(1)),
        ));
    }
    Fate::Clean
}

/// What the proxy did so far.
#[derive(Debug, Default)]
pub struct Counts {
    pub accepted: AtomicU64,
    /// Connections drawn to be cut, and those actually cut (the others ended before
    /// their byte count was reached).
    pub doomed: AtomicU64,
    pub cut: AtomicU64,
    pub reset: AtomicU64,
    pub delayed: AtomicU64,
    /// Connections refused because [`MAX_OPEN`] were open, or the upstream refused.
    pub refused: AtomicU64,
}

impl Counts {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Connections forwarded at once at most (two threads each); more are closed at once.
const MAX_OPEN: usize = 1024;
const BUF: usize = 64 * 1024;

pub struct Proxy {
    pub port: u16,
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`); the fates
    /// are drawn from `seed`.
    pub fn start(upstream: &str, plan: Plan, seed: u64) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let (c, s) = (Arc::clone(&counts), Arc::clone(&stop));
        let upstream = upstream.to_string();
        thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while !s.load(Ordering::Relaxed) {
                let down = match listener.accept() {
                    Ok((d, _)) => d,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                c.accepted.fetch_add(1, Ordering::Relaxed);
                let fate = decide(&plan, &mut rng);
                if open.load(Ordering::Relaxed) >= MAX_OPEN {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Ok(up) = TcpStream::connect(&upstream) else {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                match fate {
                    Fate::Cut { .. } => c.doomed.fetch_add(1, Ordering::Relaxed),
                    Fate::Delay(_) => c.delayed.fetch_add(1, Ordering::Relaxed),
                    Fate::Clean => 0,
                };
                let conn = Arc::new(Conn {
                    down,
                    up,
                    dead: AtomicBool::new(false),
                    counts: Arc::clone(&c),
                    open: Arc::clone(&open),
                    pumps: AtomicUsize::new(2),
                });
                open.fetch_add(1, Ordering::Relaxed);
                for upstream in [true, false] {
                    let conn = Arc::clone(&conn);
                    thread::spawn(move || conn.pump(upstream, fate));
                }
            }
        });
        Ok(Proxy { port, counts, stop })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One forwarded connection: its two sockets and whether it was cut.
struct Conn {
    down: TcpStream,
    up: TcpStream,
    dead: AtomicBool,
    counts: Arc<Counts>,
    open: Arc<AtomicUsize>,
    /// Pump threads still running; the last one out counts the connection closed.
    pumps: AtomicUsize,
}

impl Conn {
    /// Copies one direction until its end, an error, or the cut.
    fn pump(&self, upstream: bool, fate: Fate) {
        let (mut from, mut to) = if upstream {
            (&self.down, &self.up)
        } else {
            (&self.up, &self.down)
        };
        let mut buf = vec![0u8; BUF];
        let mut sent = 0u64;
        loop {
            if self.dead.load(Ordering::Relaxed) {
                break;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => {
                    // Pass the half-close on; the other direction carries on.
                    let _ = to.shutdown(Shutdown::Write);
                    break;
                }
                Ok(n) => n,
                Err(_) => {
                    self.kill(false);
                    break;
                }
            };
            match fate {
                Fate::Delay(d) => thread::sleep(d),
                Fate::Cut {
                    after,
                    reset,
                    upstream: dir,
                } if dir == upstream && sent + n as u64 > after => {
                    // Forward up to the cut, then cut.
                    let keep = usize::try_from(after - sent).unwrap_or(0).min(n);
                    let _ = to.write_all(&buf[..keep]);
                    if !self.dead.swap(true, Ordering::Relaxed) {
                        self.counts.cut.fetch_add(1, Ordering::Relaxed);
                        if reset {
                            self.counts.reset.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.kill(reset);
                    break;
                }
                _ => {}
            }
            if to.write_all(&buf[..n]).is_err() {
                self.kill(false);
                break;
            }
            sent += n as u64;
        }
        if self.pumps.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Closes both sides (with a reset if `reset`), which ends the other pump too.
    fn kill(&self, reset: bool) {
        self.dead.store(true, Ordering::Relaxed);
        for s in [&self.down, &self.up] {
            if reset {
                set_linger_zero(s);
            }
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// SO_LINGER with a zero timeout: closing the socket sends a reset.
fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid open socket, and a pointer to a linger of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenth_of_the_fates_are_cuts_half_of_them_resets() {
        let plan = Plan::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut cut, mut reset, mut delay) = (0, 0, 0);
        let n = 100_000;
        for _ in 0..n {
            match decide(&plan, &mut rng) {
                Fate::Cut {
                    reset: r, after, ..
                } => {
                    assert!(after <= plan.max_cut_bytes);
                    cut += 1;
                    reset += usize::from(r);
                }
                Fate::Delay(d) => {
                    assert!(d >= Duration::from_millis(1) && d <= Duration::from_millis(25));
                    delay += 1;
                }
                Fate::Clean => {}
            }
        }
        assert!((9_500..=10_500).contains(&cut), "{cut} cut of {n}");
        assert!(
            (cut * 45 / 100..=cut * 55 / 100).contains(&reset),
            "{reset}"
        );
        // 20% of the 90% not cut.
        assert!((17_000..=19_000).contains(&delay), "{delay}");
        let none = Plan {
            drop_percent: 0,
            delay_percent: 0,
            ..plan
        };
        assert!((0..1000).all(|_| decide(&none, &mut rng) == Fate::Clean));
    }

    /// Through a real proxy to an echo server: about a tenth of the connections break
    /// before their 64 KiB come back, and the proxy counts them.
    #[test]
    fn the_proxy_cuts_about_a_tenth_of_the_connections() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap().to_string();
        thread::spawn(move || {
            for s in echo.incoming().flatten() {
                thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                    let _ = w.shutdown(Shutdown::Write);
                });
            }
        });
        let plan = Plan {
            max_cut_bytes: 16 * 1024,
            max_delay_ms: 1,
            ..Plan::default()
        };
        let proxy = Proxy::start(&upstream, plan, 42).unwrap();
        let payload = vec![7u8; 64 * 1024];
        let conns = 400;
        let mut broken = 0;
        for _ in 0..conns {
            let mut s = TcpStream::connect(proxy.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut w = s.try_clone().unwrap();
            let data = payload.clone();
            let writer = thread::spawn(move || {
                let _ = w.write_all(&data);
                let _ = w.shutdown(Shutdown::Write);
            });
            let mut back = Vec::new();
            let ok = s.read_to_end(&mut back).is_ok() && back == payload;
            let _ = writer.join();
            broken += usize::from(!ok);
        }
        let cut = Counts::get(&proxy.counts.cut);
        assert_eq!(Counts::get(&proxy.counts.accepted), conns as u64);
        assert_eq!(cut, broken as u64, "every broken connection was a cut");
        assert!((20..=60).contains(&broken), "{broken} of {conns} broken");
        assert_eq!(
            Counts::get(&proxy.counts.doomed),
            cut,
            "every doomed one is cut (64 KiB > the 16 KiB cap)"
        );
    }
}
