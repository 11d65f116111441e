//! Progress on stderr: a line redrawn in place on a terminal, a plain line every few
//! seconds otherwise (for pod logs), nothing with `DATAMOVER_PROGRESS=0`.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters the workers bump and the reporter reads.
#[derive(Default)]
pub struct Counters {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_sent: AtomicU64,
}

impl Counters {
    pub fn add_file(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_sent(&self, n: u64) {
        self.bytes_sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// Stops reporting when dropped.
pub struct Reporter {
    task: Option<tokio::task::JoinHandle<()>>,
    tty: bool,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl Reporter {
    pub fn start(label: &'static str, c: Arc<Counters>) -> Reporter {
        let enabled = std::env::var("DATAMOVER_PROGRESS").map_or(true, |v| v != "0");
        let tty = std::io::stderr().is_terminal();
        if !enabled {
            return Reporter { task: None, tty };
        }
        let every = if tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let bytes = c.bytes.load(Ordering::Relaxed);
                let line = format!(
                    "{label}: {} files, {:.1} MiB ({:.1} MiB/s), {:.1} MiB sent, {:.0}s",
                    c.files.load(Ordering::Relaxed),
                    mib(bytes),
                    mib(bytes) / secs,
                    mib(c.bytes_sent.load(Ordering::Relaxed)),
                    secs
                );
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r\x1b[2K{line}")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
        });
        Reporter {
            task: Some(task),
            tty,
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            if self.tty {
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            }
        }
    }
}
