//! Shared test plumbing: building the example plugins from source, running the `warren` binary,
//! starting daemons against the real broker, and unique names so parallel tests never meet.

#![allow(dead_code, reason = "each test module uses a different subset")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// The `warren` binary cargo built for these tests, with none of the operator's `WARREN_*`
/// overrides: the tests read the text log format and name their own broker, exchange and
/// server, and a test that wants one of these sets it on the command.
pub fn warren() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.env("WARREN_LOG", "info");
    for inherited in [
        "WARREN_LOG_FORMAT",
        "WARREN_BROKER_URL",
        "WARREN_BROKER_PASSWORD",
        "WARREN_EXCHANGE",
        "WARREN_SERVER_NAME",
    ] {
        cmd.env_remove(inherited);
    }
    cmd
}

#[path = "../common/example_plugins.rs"]
mod example_plugins;

/// Build the example plugins from source (once per test process) and return `name`'s module.
pub fn plugin(name: &str) -> PathBuf {
    example_plugins::example_plugin(name)
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
        Self::launch(server, dir, &config, &[])
    }

    /// Run `warren serve --config <path>` (with extra environment `env`) and wait until it
    /// says it is ready, in the text or the JSON log format.
    fn launch(server: &str, dir: tempfile::TempDir, path: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = warren();
        cmd.args(["serve", "--config"])
            .arg(path)
            .env("WARREN_LOG", "info,warren=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn warren serve");
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
        // Not just "ready": "wasm runtime ready" comes first, before any queue is declared.
        // Stop waiting early if the daemon exits instead.
        let is_ready = |d: &Daemon| {
            d.count_log("warren::server: ready") > 0 || d.count_log("\"message\":\"ready\"") > 0
        };
        eventually(Duration::from_secs(60), || {
            let exited = matches!(daemon.child.try_wait(), Ok(Some(_)));
            (exited || is_ready(&daemon)).then_some(())
        });
        if !is_ready(&daemon) {
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

/// Replace `path` the way deploy tools do: write a temp file next to it, then rename it over.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let name = path.file_name().expect("file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
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

// ---------------------------------------------------------------------------------------------
// Calling the daemon: the Rust client library, the `warren` CLI, and more WAT modules.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use warren::client::{CallError, Client, Target};

/// The control exchange every daemon the tests start uses (see [`Daemon::start_with`]).
pub const EXCHANGE: &str = "openstack";

/// Any server of `topic`.
pub fn any_server(topic: &str) -> Target {
    Target::topic(topic)
}

/// The one server `server` of `topic` (`<topic>.<server>`).
pub fn on_server(topic: &str, server: &str) -> Target {
    Target {
        topic: topic.to_owned(),
        server: Some(server.to_owned()),
    }
}

/// A [`warren::client::Client`] with the tokio runtime it runs on, with blocking methods that
/// take and return JSON text.
pub struct Rpc {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).unwrap_or_else(|e| panic!("not JSON: {json}: {e}"))
}

#[allow(
    clippy::result_large_err,
    reason = "CallError is the library's own error type"
)]
impl Rpc {
    /// Connect to the test broker on [`EXCHANGE`].
    pub fn connect() -> Rpc {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let client = rt
            .block_on(Client::connect(&broker_url(), EXCHANGE))
            .expect("client connects to the broker");
        Rpc {
            rt,
            client: Some(client),
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("open until dropped")
    }

    /// `call`, returning the result's JSON text.
    pub fn call(
        &self,
        target: &Target,
        method: &str,
        args: &str,
        timeout: Duration,
    ) -> Result<String, CallError> {
        self.rt
            .block_on(
                self.client()
                    .call(target, method, &raw(args), &Map::new(), timeout),
            )
            .map(|r| r.get().to_owned())
    }

    /// `call` with a request context (a JSON object).
    pub fn call_with_context(
        &self,
        target: &Target,
        method: &str,
        args: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<String, CallError> {
        let context: Map<String, Value> = serde_json::from_str(context).expect("context object");
        self.rt
            .block_on(
                self.client()
                    .call(target, method, &raw(args), &context, timeout),
            )
            .map(|r| r.get().to_owned())
    }

    /// `multicall`, collecting every item (results, then possibly one error) until it ends.
    pub fn multicall(
        &self,
        target: &Target,
        method: &str,
        args: &str,
        timeout: Duration,
    ) -> Vec<Result<String, CallError>> {
        self.rt.block_on(async {
            let mut rx = self
                .client()
                .multicall(target, method, &raw(args), &Map::new(), timeout)
                .await
                .expect("multicall request published");
            let mut items = Vec::new();
            while let Some(item) = rx.recv().await {
                items.push(item.map(|r| r.get().to_owned()));
            }
            items
        })
    }

    /// `cast`; panics if the broker did not route it.
    pub fn cast(&self, target: &Target, method: &str, args: &str) {
        self.rt
            .block_on(self.client().cast(target, method, &raw(args), &Map::new()))
            .expect("cast published");
    }

    /// `fanout_cast`; panics if the broker did not route it.
    pub fn fanout(&self, topic: &str, method: &str, args: &str) {
        self.rt
            .block_on(
                self.client()
                    .fanout_cast(topic, method, &raw(args), &Map::new()),
            )
            .expect("fanout cast published");
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.rt.block_on(client.close());
        }
    }
}

/// The remote error of a failed call, or a panic naming what came instead.
pub fn remote_error(outcome: Result<String, CallError>) -> warren::wire::RemoteError {
    match outcome {
        Err(CallError::Remote(e)) => e,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

/// A module whose `spin` logs "spinning" (so a test knows the call is in flight) and then
/// loops until the handler's `timeout_ms` stops it, and whose `echo_args` returns its args.
pub fn spin_wat() -> String {
    r#"(module
  (import "warren_v1" "input_len" (func $input_len (result i32)))
  (import "warren_v1" "input_read" (func $input_read (param i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (import "warren_v1" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "spinning")
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "spin") (result i32)
    (call $log (i32.const 2) (i32.const 0) (i32.const 8))
    (loop $l (br $l))
    i32.const 0)
  (func (export "echo_args") (result i32)
    (call $input_read (i32.const 64))
    (call $output_write (i32.const 64) (call $input_len))
    i32.const 0))"#
        .to_owned()
}

impl Daemon {
    /// Index of the first log line containing every one of `needles` (`&`-separated).
    pub fn log_index(&self, needles: &str) -> Option<usize> {
        let parts: Vec<&str> = needles.split('&').collect();
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .position(|l| parts.iter().all(|p| l.contains(p)))
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes (the `warren` CLI, the Python peers), killed when dropped.

/// A child process with stdout and stderr captured line by line. Dropping it kills the process,
/// so a failing test leaves nothing running.
pub struct Proc {
    child: Child,
    what: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// What a finished [`Proc`] printed.
#[derive(Debug)]
pub struct Output {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Stdout lines joined with `\n` (no trailing newline).
    pub stdout: String,
    /// Stderr lines joined with `\n`.
    pub stderr: String,
}

impl Output {
    /// Every stdout line parsed as JSON (panics on a line that is not).
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}\n{self:?}"))
            })
            .collect()
    }

    /// Panics (showing everything printed) unless the process exited with 0.
    pub fn assert_success(&self) {
        assert_eq!(self.code, Some(0), "{self:?}");
    }

    /// The last stdout line as JSON.
    pub fn last_json(&self) -> Value {
        self.json_lines()
            .pop()
            .unwrap_or_else(|| panic!("no output: {self:?}"))
    }
}

fn capture(
    stream: impl std::io::Read + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().expect("output lock").push(line);
        }
    })
}

impl Proc {
    /// Start `cmd` (stdin closed, output captured); `what` names it in panics.
    pub fn spawn(what: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            capture(child.stdout.take().expect("piped"), Arc::clone(&stdout)),
            capture(child.stderr.take().expect("piped"), Arc::clone(&stderr)),
        ];
        Proc {
            child,
            what: what.to_owned(),
            stdout,
            stderr,
            readers,
        }
    }

    /// Wait (at most `limit`) for a stdout line containing `needle`; return it.
    pub fn wait_stdout(&self, needle: &str, limit: Duration) -> Option<String> {
        eventually(limit, || {
            self.stdout
                .lock()
                .expect("output lock")
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
    }

    /// Everything printed so far, for failure messages.
    pub fn printed(&self) -> String {
        format!(
            "{} stdout:\n{}\n{} stderr:\n{}",
            self.what,
            self.stdout.lock().expect("output lock").join("\n"),
            self.what,
            self.stderr.lock().expect("output lock").join("\n"),
        )
    }

    /// Wait (at most `limit`) for the process to exit and return what it printed. Past the
    /// limit it is killed and the test fails.
    pub fn finish(mut self, limit: Duration) -> Output {
        let Some(status) = eventually(limit, || self.child.try_wait().ok().flatten()) else {
            let _ = self.child.kill();
            panic!(
                "{} did not exit within {limit:?}\n{}",
                self.what,
                self.printed()
            );
        };
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.join();
        }
        Output {
            code: status.code(),
            stdout: self.stdout.lock().expect("output lock").join("\n"),
            stderr: self.stderr.lock().expect("output lock").join("\n"),
        }
    }

    /// SIGTERM, then wait (bounded) for a clean exit: a server's own shutdown path.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        eventually(limit, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `warren <args> --broker <test broker>` to completion (a client command: call, cast, ...).
pub fn warren_remote(args: &[&str]) -> Output {
    let mut cmd = warren();
    cmd.args(args).args(["--broker", &broker_url()]);
    Proc::spawn(&format!("warren {}", args.join(" ")), cmd).finish(Duration::from_secs(60))
}

/// The interop venv's Python. Missing is a failure, not a skip: the interop tests are required.
pub fn python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/python-venv.sh (it creates the venv with oslo.messaging \
         that the interop tests need)",
        python.display()
    );
    python
}

/// Start `tests/interop/<script>` with `args` in the venv's Python.
pub fn interop_script(script: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/interop").join(script))
        .args(args)
        .env("PYTHONUNBUFFERED", "1");
    Proc::spawn(&format!("{script} {}", args.join(" ")), cmd)
}

// ---------------------------------------------------------------------------------------------
// Broker plumbing the daemon's API does not offer on purpose (any content type, deleting
// queues, queue depths), so it goes to lapin and rabbitmqctl directly.

fn with_channel<T>(f: impl AsyncFnOnce(&lapin::Channel) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let conn =
            lapin::Connection::connect(&broker_url(), lapin::ConnectionProperties::default())
                .await
                .expect("connect to the test broker");
        let channel = conn.create_channel().await.expect("channel");
        let out = f(&channel).await;
        let _ = conn.close(200, "bye".into()).await;
        out
    })
}

/// Publish each `(body, content_type)` exactly as given to `exchange` with `key` (mandatory,
/// confirmed), and assert the broker routed it to a queue.
pub fn publish_raw(exchange: &str, key: &str, messages: &[(&[u8], &str)]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    with_channel(async |channel| {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        for (body, content_type) in messages {
            let props = lapin::BasicProperties::default()
                .with_content_type((*content_type).into())
                .with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await
                .expect("publish");
            let confirmation = confirm.await.expect("publisher confirm");
            assert!(
                matches!(confirmation, lapin::Confirmation::Ack(None)),
                "the broker did not route the message to '{key}': {confirmation:?}"
            );
        }
    })
}

/// Deletes the named queues when dropped. Declare it before the daemons and Python peers that
/// use them, so it runs after they are gone. (Per-process fanout queues are left to their
/// `x-expires`: their names are random.)
pub struct DeleteQueues(Vec<String>);

impl DeleteQueues {
    /// The shared queues an RPC server declares for `topic`: `<topic>` and `<topic>.<server>`
    /// for each of `servers`.
    pub fn rpc(topic: &str, servers: &[&str]) -> DeleteQueues {
        let mut queues = vec![topic.to_owned()];
        queues.extend(servers.iter().map(|s| format!("{topic}.{s}")));
        DeleteQueues(queues)
    }

    /// The notification queues `<topic>.<priority>` of every priority.
    pub fn notifications(topic: &str) -> DeleteQueues {
        let priorities = [
            "audit", "debug", "info", "warn", "error", "critical", "sample",
        ];
        DeleteQueues(priorities.iter().map(|p| format!("{topic}.{p}")).collect())
    }
}

impl Drop for DeleteQueues {
    fn drop(&mut self) {
        use lapin::options::QueueDeleteOptions;
        let queues = std::mem::take(&mut self.0);
        // Best effort, and never a panic inside a drop that may run during unwinding.
        let _ = std::panic::catch_unwind(move || {
            with_channel(async |channel| {
                for q in &queues {
                    let _ = channel
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            })
        });
    }
}

/// `(messages_ready, messages_unacknowledged)` of `queue` as rabbitmqctl reports them, or
/// `None` when there is no such queue.
pub fn queue_counts(queue: &str) -> Option<(u64, u64)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .expect("rabbitmqctl runs (it must be on PATH for these tests)");
    assert!(
        out.status.success(),
        "rabbitmqctl list_queues failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut cols = line.split('\t');
            (cols.next()? == queue).then_some(())?;
            Some((
                cols.next()?.trim().parse().ok()?,
                cols.next()?.trim().parse().ok()?,
            ))
        })
}

/// One daemon named `server` serving the example plugin `name` on `topic`.
pub fn serve_plugin(server: &str, topic: &str, name: &str) -> Daemon {
    Daemon::start(server, &handler(topic, &plugin(name), ""))
}

/// One daemon named `server` serving the WAT module `wat` on `topic`, with extra handler keys
/// (e.g. `timeout_ms = 300`).
pub fn serve_wat(server: &str, topic: &str, wat: &str, extra: &str) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let module = wat_file(dir.path(), "module", wat);
    // The daemon has read the module by the time it is ready; the file may go.
    Daemon::start(server, &handler(topic, &module, extra))
}

// ---------------------------------------------------------------------------------------------
// Daemons from a whole config file, killed hard, and their memory (the fault tests).

impl Daemon {
    /// Start `warren serve` with `config` as its whole config file (every section written by
    /// the caller), as server `server`, and wait until it says it is ready.
    pub fn start_config(server: &str, config: &str) -> Daemon {
        Self::start_config_env(server, config, &[])
    }

    /// As [`Daemon::start_config`], with extra environment variables for the daemon.
    pub fn start_config_env(server: &str, config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, config).expect("write config");
        Self::launch(server, dir, &path, env)
    }

    /// `kill -9`: no shutdown path runs; whatever it had unacked goes back to the broker.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Resident memory (`VmRSS` in /proc), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(self.child.id())
    }
}

/// Resident memory of process `pid` (`VmRSS` in /proc), in KiB.
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

/// Take one message from `queue` (acked), or `None` if it is empty or missing.
pub fn get_message(queue: &str) -> Option<Vec<u8>> {
    use lapin::options::BasicGetOptions;
    with_channel(async |channel| {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
        {
            Ok(Some(message)) => Some(message.delivery.data.clone()),
            _ => None,
        }
    })
}

/// Declare `queue` and bind it to [`EXCHANGE`] under its own name: a topic whose requests are
/// routed and never answered. Delete it with [`DeleteQueues`].
pub fn declare_bound_queue(queue: &str) {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    with_channel(async |channel| {
        channel
            .exchange_declare(
                EXCHANGE.into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                Default::default(),
            )
            .await
            .expect("exchange");
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                Default::default(),
            )
            .await
            .expect("queue");
        channel
            .queue_bind(
                queue.into(),
                EXCHANGE.into(),
                queue.into(),
                QueueBindOptions::default(),
                Default::default(),
            )
            .await
            .expect("bind");
    })
}
