//! Shared test plumbing: building the example plugins from source, running the `warren` binary,
//! starting daemons against the real broker, and unique names so parallel tests never meet.

#![allow(dead_code, reason = "each test module uses a different subset")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// The broker the tests use.
pub fn broker_url() -> String {
    std::env::var("WARREN_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The `warren` binary cargo built for these tests.
pub fn warren() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.env("WARREN_LOG", "info")
        .env_remove("WARREN_BROKER_URL");
    cmd
}

/// Build the example plugins from source (once per test process) and return `name`'s module.
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = repo();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(root.join("plugins/Cargo.toml"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the example plugins failed");
        root.join("plugins/target/wasm32-wasip1/release")
    });
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A name no other test (or earlier run) uses: `<prefix>_<8 hex>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Poll `f` until it returns `Some`, at most `limit`.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `warren serve` process with its log captured.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
    pub server: String,
}

impl Daemon {
    /// Start a daemon serving `handlers` (TOML `[[handler]]` blocks) as server `server`, and
    /// wait until it says it is ready.
    pub fn start(server: &str, handlers: &str) -> Daemon {
        Self::start_with(server, handlers, "")
    }

    /// As [`Daemon::start`], with extra `[server]` keys.
    pub fn start_with(server: &str, handlers: &str, server_extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("warren.toml");
        let text = format!(
            "[broker]\nurl = \"{}\"\nexchange = \"openstack\"\nheartbeat = 10\n\n[server]\nname = \"{server}\"\nshutdown_timeout_secs = 10\n{server_extra}\n\n{handlers}\n",
            broker_url()
        );
        std::fs::write(&config, text).expect("write config");
        let mut child = warren()
            .args(["serve", "--config"])
            .arg(&config)
            .env("WARREN_LOG", "info,warren=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warren serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("WARREN_TEST_ECHO_LOG").is_some() {
                    eprintln!("[daemon] {line}");
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let mut daemon = Daemon {
            child,
            log,
            dir,
            server: server.to_owned(),
        };
        if daemon.wait_log("ready", Duration::from_secs(60)).is_none() {
            let status = daemon.child.try_wait();
            panic!(
                "daemon did not become ready ({status:?}); log:\n{}",
                daemon.log_text()
            );
        }
        daemon
    }

    /// Wait until a log line contains every one of `needles` (`&`-separated); return it.
    pub fn wait_log(&self, needles: &str, limit: Duration) -> Option<String> {
        let parts: Vec<&str> = needles.split('&').collect();
        eventually(limit, || {
            self.log
                .lock()
                .expect("log lock")
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .cloned()
        })
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// SIGTERM, then wait (bounded) for exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let exited = eventually(Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        });
        match exited {
            Some(status) => status.success(),
            None => {
                let _ = self.child.kill();
                false
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `[[handler]]` block.
pub fn handler(topic: &str, module: &Path, extra: &str) -> String {
    format!(
        "[[handler]]\ntopic = \"{topic}\"\nmodule = \"{}\"\n{extra}\n",
        module.display()
    )
}

/// Write WAT text to a file in `dir` and return its path.
pub fn wat_file(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let path = dir.join(format!("{name}.wat"));
    std::fs::write(&path, wat).expect("write wat");
    path
}

/// A module that answers `whoami` with `who` (a JSON string) and logs "<who> got <args>" for
/// `note`; used to tell servers apart.
pub fn whoami_wat(who: &str) -> String {
    let reply = format!("\"{who}\"");
    let note = format!("{who} got ");
    format!(
        r#"(module
  (import "warren_v1" "input_len" (func $input_len (result i32)))
  (import "warren_v1" "input_read" (func $input_read (param i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (import "warren_v1" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{reply_esc}")
  (data (i32.const 64) "{note}")
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "whoami") (result i32)
    (call $output_write (i32.const 0) (i32.const {reply_len}))
    i32.const 0)
  (func (export "note") (result i32)
    (call $input_read (i32.const {args_at}))
    (call $log (i32.const 2) (i32.const 64) (i32.add (i32.const {note_len}) (call $input_len)))
    i32.const 0))"#,
        reply_esc = reply.replace('"', "\\22"),
        reply_len = reply.len(),
        note_len = note.len(),
        args_at = 64 + note.len(),
    )
}
