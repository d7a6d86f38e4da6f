//! The servers under test as child processes: spawn, wait for readiness, pause and resume
//! (SIGSTOP/SIGCONT, so a flood can queue up in front of a live server), read RSS from
//! `/proc`, and stop. A [`Peer`] kills its process when dropped, so an error, a panic or
//! Ctrl-C (the bench future is dropped) never leaves a server running.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Lines of a child's output kept to explain a failure.
const TAIL_LINES: usize = 30;

/// Which stream announces readiness, and how.
pub enum Ready {
    /// A stdout line equal to this text (the native baseline and the oslo peer print `READY`).
    StdoutLine(&'static str),
    /// A stderr line containing this text (Warren's JSON log line for `ready`).
    StderrContains(&'static str),
}

/// A running server process.
pub struct Peer {
    name: String,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Time from spawn to its readiness line.
    pub ready_after: Duration,
}

impl Peer {
    /// Spawn `command` and wait up to `timeout` for it to say it is ready.
    pub async fn start(
        name: &str,
        mut command: Command,
        ready: Ready,
        timeout: Duration,
    ) -> anyhow::Result<Peer> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (stdout_match, stderr_match) = match ready {
            Ready::StdoutLine(text) => (Some(Match::Line(text)), None),
            Ready::StderrContains(text) => (None, Some(Match::Contains(text))),
        };
        if let Some(out) = child.stdout.take() {
            drain(out, tail.clone(), stdout_match, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, tail.clone(), stderr_match, tx);
        }
        let mut peer = Peer {
            name: name.to_owned(),
            child,
            tail,
            ready_after: Duration::ZERO,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                Ok(Some(())) => break,
                // Both streams closed without the line: the process is exiting.
                Ok(None) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(_) => {}
            }
            if let Ok(Some(status)) = peer.child.try_wait() {
                bail!(
                    "{name} exited ({status}) before it was ready:\n{}",
                    peer.tail()
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{name} was not ready within {timeout:?}:\n{}", peer.tail());
            }
        }
        peer.ready_after = started.elapsed();
        Ok(peer)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the process printed.
    pub fn tail(&self) -> String {
        let lines = self.tail.lock().map(|t| t.clone()).unwrap_or_default();
        lines.into_iter().collect::<Vec<_>>().join("\n")
    }

    /// Resident set size now, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(self.pid())
    }

    /// Send a signal by name (`STOP`, `CONT`, `TERM`) with kill(1).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .context("cannot run kill(1)")?;
        anyhow::ensure!(status.success(), "kill -{signal} {} failed", self.pid());
        Ok(())
    }

    /// Stop politely (SIGTERM), then by force after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.signal("CONT");
        let _ = self.signal("TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  {} did not stop within {grace:?}; killing it", self.name);
        // Drop kills it.
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal("CONT");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

enum Match {
    Line(&'static str),
    Contains(&'static str),
}

/// Read a child's stream to its end on a thread (a full pipe would block the child), keep
/// its tail, and say once when the readiness line went by.
fn drain(
    stream: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    ready: Option<Match>,
    tx: tokio::sync::mpsc::UnboundedSender<()>,
) {
    std::thread::spawn(move || {
        let mut said = false;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if !said {
                let hit = match &ready {
                    Some(Match::Line(text)) => line.trim() == *text,
                    Some(Match::Contains(text)) => line.contains(text),
                    None => false,
                };
                if hit {
                    said = true;
                    let _ = tx.send(());
                }
            }
            if let Ok(mut t) = tail.lock() {
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
}

/// VmRSS of a process, KiB.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Samples a process's RSS every 20 ms on a thread and keeps the peak.
pub struct RssSampler {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    /// Start sampling `pid`.
    pub fn start(pid: u32) -> RssSampler {
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !done.load(Ordering::Relaxed) {
                    peak = peak.max(rss_kib_of(pid).unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak
            })
        };
        RssSampler {
            done,
            thread: Some(thread),
        }
    }

    /// Stop and return the peak, KiB.
    pub fn stop(mut self) -> u64 {
        self.done.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for RssSampler {
    /// A run that fails mid-flood still ends the thread.
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// SIGINT or SIGTERM.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A command for this same binary (`warren`), for Warren itself and the native baseline.
pub fn this_binary() -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("cannot find the warren binary")?;
    Ok(Command::new(exe))
}
