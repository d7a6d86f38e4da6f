//! Hot reload against the real broker: swaps under load, files that must never serve (broken,
//! half-written, deleted), the ways editors and deploy tools replace files, config edits, the
//! admin commands (`warren status` / `rollback`), and the compiled-module cache across restarts.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use warren::client::{CallError, Client};

use crate::support::{
    Daemon, DeleteQueues, EXCHANGE, Rpc, any_server, broker_url, eventually, handler, plugin,
    remote_error, unique, warren_remote, whoami_wat, write_atomic,
};

const CALL: Duration = Duration::from_secs(10);
/// Bound on how long a change on disk may take to be served (debounce, compile, swap; the
/// rescan backstop is 2 s, so even a lost event fits).
const RELOAD: Duration = Duration::from_secs(10);
/// Every daemon here caches compiled modules inside its own temp dir.
const CACHE_IN_TEMP: &str = "cache_dir = \"cache\"";

const RELOADED: &str = "handler reloaded";
const RELOAD_FAILED: &str = "reload failed; the previous version keeps serving";

/// A daemon serving one topic from a module file the test rewrites.
struct Fixture {
    topic: String,
    module: PathBuf,
    daemon: Daemon,
    rpc: Rpc,
    // Dropped last: the daemon and the client are gone by then.
    _modules: tempfile::TempDir,
    _queues: DeleteQueues,
}

impl Fixture {
    /// Serve `initial` (module text or bytes) from `<tmp>/<file>` on a fresh topic.
    fn start(file: &str, initial: &[u8]) -> Fixture {
        let topic = unique("it_reload");
        let server = unique("d");
        let queues = DeleteQueues::rpc(&topic, &[&server]);
        let modules = tempfile::tempdir().expect("tempdir");
        let module = modules.path().join(file);
        std::fs::write(&module, initial).expect("write module");
        let daemon = Daemon::start_with(&server, &handler(&topic, &module, ""), CACHE_IN_TEMP);
        Fixture {
            topic,
            module,
            daemon,
            rpc: Rpc::connect(),
            _modules: modules,
            _queues: queues,
        }
    }

    /// Serve `whoami_wat(who)` from `<tmp>/m.wat`.
    fn whoami(who: &str) -> Fixture {
        Self::start("m.wat", whoami_wat(who).as_bytes())
    }

    #[allow(
        clippy::result_large_err,
        reason = "CallError is the library's own error type"
    )]
    fn call(&self, method: &str, args: &str) -> Result<String, CallError> {
        self.rpc.call(&any_server(&self.topic), method, args, CALL)
    }

    /// Which version answers `whoami` (the reply's JSON text, e.g. `"v1"` with the quotes).
    fn who(&self) -> String {
        self.call("whoami", "{}")
            .unwrap_or_else(|e| panic!("whoami failed: {e}; log:\n{}", self.daemon.log_text()))
    }

    /// Wait (bounded) until `whoami` answers `who`.
    fn wait_serving(&self, who: &str) {
        let want = format!("\"{who}\"");
        let seen = eventually(RELOAD, || {
            (self.call("whoami", "{}").ok()? == want).then_some(())
        });
        assert!(
            seen.is_some(),
            "{who} was never served (now: {:?}); log:\n{}",
            self.call("whoami", "{}"),
            self.daemon.log_text()
        );
    }

    /// Wait (bounded) until at least `n` log lines contain `needle`.
    fn wait_count(&self, needle: &str, n: usize) {
        let reached = eventually(RELOAD, || {
            (self.daemon.count_log(needle) >= n).then_some(())
        });
        assert!(
            reached.is_some(),
            "expected {n} log lines with '{needle}', got {}; log:\n{}",
            self.daemon.count_log(needle),
            self.daemon.log_text()
        );
    }

    /// This handler's entry in `warren status --json`.
    fn status(&self) -> Value {
        let out = warren_remote(&["status", "--server", &self.daemon.server, "--json"]);
        out.assert_success();
        let status = out.last_json();
        assert_eq!(status["server"], self.daemon.server.as_str(), "{status}");
        status["handlers"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["topic"] == self.topic.as_str()))
            .unwrap_or_else(|| panic!("status does not list {}: {status}", self.topic))
            .clone()
    }
}

/// What `warren status` shows as `hash`: the first 6 bytes of the file's SHA-256, hex.
fn hash_prefix(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `version=` a "handler reloaded" line carries for `topic`.
fn reloaded_to(topic: &str, version: u64) -> String {
    format!("{RELOADED}&topic={topic} &version={version} ")
}

/// A second version with a different method set: `whoami` answers "v2", `greet` is new, and
/// `note` (which `whoami_wat` has) is gone.
fn v2_with_greet() -> String {
    r#"(module
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\22v2\22")
  (data (i32.const 16) "\22hello\22")
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "whoami") (result i32)
    (call $output_write (i32.const 0) (i32.const 4))
    i32.const 0)
  (func (export "greet") (result i32)
    (call $output_write (i32.const 16) (i32.const 7))
    i32.const 0))"#
        .to_owned()
}

#[derive(Default)]
struct Tally {
    calls: usize,
    v1: usize,
    v2: usize,
    unexpected: Vec<String>,
    errors: Vec<String>,
}

#[test]
fn twenty_swaps_under_16_callers_fail_no_call_and_every_reply_is_old_or_new() {
    const CALLERS: usize = 16;
    const SWAPS: usize = 20;
    let f = Fixture::whoami("v1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Two clients, eight callers each: replies are routed through two reply queues.
    let clients: Vec<Arc<Client>> = (0..2)
        .map(|_| {
            Arc::new(
                rt.block_on(Client::connect(&broker_url(), EXCHANGE))
                    .expect("client connects"),
            )
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let target = any_server(&f.topic);
    let args = serde_json::value::RawValue::from_string("{}".into()).expect("json");
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (client, stop, done) = (clients[i % 2].clone(), stop.clone(), done.clone());
            let (target, args) = (target.clone(), args.clone());
            rt.spawn(async move {
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = client
                        .call(&target, "whoami", &args, &Map::new(), CALL)
                        .await;
                    tally.calls += 1;
                    match outcome.as_ref().map(|r| r.get()) {
                        Ok(r#""v1""#) => tally.v1 += 1,
                        Ok(r#""v2""#) => tally.v2 += 1,
                        Ok(other) => tally.unexpected.push(other.to_owned()),
                        Err(e) => tally.errors.push(e.to_string()),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                tally
            })
        })
        .collect();

    // Every caller is under way before the first swap.
    let warmed = eventually(RELOAD, || {
        (done.load(Ordering::Relaxed) >= 4 * CALLERS).then_some(())
    });
    assert!(warmed.is_some(), "the callers made no progress");

    let mut per_swap = Vec::new();
    let started = Instant::now();
    for i in 1..=SWAPS {
        let who = if i % 2 == 1 { "v2" } else { "v1" };
        let before = done.load(Ordering::Relaxed);
        write_atomic(&f.module, whoami_wat(who).as_bytes());
        f.wait_count(RELOADED, i);
        f.wait_serving(who);
        per_swap.push(done.load(Ordering::Relaxed) - before);
    }
    let swapping = started.elapsed();
    stop.store(true, Ordering::Relaxed);

    let tallies: Vec<Tally> = callers
        .into_iter()
        .map(|c| rt.block_on(c).expect("caller task"))
        .collect();
    for client in clients {
        let client = Arc::into_inner(client).expect("callers are done with the client");
        rt.block_on(client.close());
    }

    let total: usize = tallies.iter().map(|t| t.calls).sum();
    let errors: Vec<&String> = tallies.iter().flat_map(|t| &t.errors).collect();
    let unexpected: Vec<&String> = tallies.iter().flat_map(|t| &t.unexpected).collect();
    assert!(
        errors.is_empty(),
        "{} of {total} calls failed, e.g. {:?}; log:\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        f.daemon.log_text()
    );
    assert!(
        unexpected.is_empty(),
        "replies from neither v1 nor v2: {unexpected:?}"
    );
    let (v1, v2): (usize, usize) = tallies
        .iter()
        .fold((0, 0), |(a, b), t| (a + t.v1, b + t.v2));
    assert_eq!(v1 + v2, total);
    assert!(v1 > 0 && v2 > 0, "both versions answered: v1 {v1}, v2 {v2}");
    assert!(
        tallies.iter().all(|t| t.calls > SWAPS),
        "every caller kept calling: {:?}",
        tallies.iter().map(|t| t.calls).collect::<Vec<_>>()
    );
    assert!(
        per_swap.iter().all(|&n| n > 0),
        "calls completed during every swap: {per_swap:?}"
    );
    assert_eq!(
        f.daemon.count_log(RELOADED),
        SWAPS,
        "exactly one swap per write; log:\n{}",
        f.daemon.log_text()
    );
    assert_eq!(f.daemon.count_log(RELOAD_FAILED), 0);
    assert_eq!(f.status()["version"], SWAPS as u64 + 1);
    eprintln!("{SWAPS} swaps in {swapping:?} under {total} calls (v1 {v1}, v2 {v2})");
}

#[test]
fn broken_module_over_a_good_one_keeps_the_old_serving_and_logs_the_error() {
    let f = Fixture::whoami("v1");
    let file = f.module.display().to_string();
    let broken = [
        // Not a module at all (neither Wasm nor WAT).
        "this is not a module".to_owned(),
        // Compiles, but has no ABI marker.
        r#"(module (memory (export "memory") 1)
  (func (export "whoami") (result i32) i32.const 0))"#
            .to_owned(),
        // Compiles and links, but traps when instantiated (the smoke test).
        r#"(module (memory (export "memory") 1)
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "whoami") (result i32) i32.const 0)
  (func $boom unreachable)
  (start $boom))"#
            .to_owned(),
    ];
    for (i, text) in broken.iter().enumerate() {
        // An in-place write, as `cp` does.
        std::fs::write(&f.module, text).expect("write broken module");
        f.wait_count(RELOAD_FAILED, i + 1);
        let line = f
            .daemon
            .wait_log(&format!("{RELOAD_FAILED}&topic={}&{file}", f.topic), RELOAD)
            .expect("the failure names the topic and the file");
        assert!(line.contains("ERROR"), "logged as an error: {line}");
        assert_eq!(f.who(), r#""v1""#, "broken module #{i} must not serve");
    }
    assert_eq!(f.daemon.count_log(RELOADED), 0, "{}", f.daemon.log_text());
    let status = f.status();
    assert_eq!(status["version"], 1, "{status}");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(&file), "last error names the file: {status}");

    // A good module after the broken ones is swapped in and clears the error.
    std::fs::write(&f.module, whoami_wat("v2")).expect("write v2");
    f.wait_serving("v2");
    let status = f.status();
    assert_eq!(status["version"], 2, "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");
}

#[test]
fn slow_partial_write_is_never_swapped_in_half_written() {
    let echo = std::fs::read(plugin("echo")).expect("read echo");
    let calc = std::fs::read(plugin("calc")).expect("read calc");
    let f = Fixture::start("m.wasm", &echo);
    assert_eq!(f.call("echo", r#"{"value": 42}"#).expect("echo"), "42");
    let file = f.module.display().to_string();

    // A slow writer: the first half, flushed to disk, then a long pause.
    let (first, rest) = calc.split_at(calc.len() / 2);
    let mut writer = std::fs::File::create(&f.module).expect("open for writing");
    writer.write_all(first).expect("write the first half");
    writer.sync_all().expect("flush");
    // The daemon looks at the half-written file (it may also have seen it empty, right after
    // the truncation): wait until it rejected the half, not just the empty file.
    let rejected = eventually(RELOAD, || {
        f.daemon
            .log_text()
            .lines()
            .find(|l| l.contains(RELOAD_FAILED) && l.contains(&file) && !l.contains("is empty"))
            .map(str::to_owned)
    });
    assert!(
        rejected.is_some(),
        "the half-written module was never looked at and rejected; log:\n{}",
        f.daemon.log_text()
    );
    assert_eq!(f.call("echo", r#"{"value": 7}"#).expect("old serves"), "7");
    let add = f.call("add", r#"{"a": 2, "b": 40}"#);
    assert_eq!(remote_error(add).class, "NoSuchMethod");
    assert_eq!(f.status()["version"], 1);
    assert_eq!(f.daemon.count_log(RELOADED), 0, "{}", f.daemon.log_text());

    // The writer finishes: now the whole module is swapped in.
    writer.write_all(rest).expect("write the rest");
    writer.sync_all().expect("flush");
    drop(writer);
    f.wait_count(RELOADED, 1);
    assert_eq!(
        f.call("add", r#"{"a": 2, "b": 40}"#).expect("calc serves"),
        "42"
    );
    let status = f.status();
    assert_eq!(status["version"], 2, "{status}");
    assert_eq!(status["hash"], hash_prefix(&calc).as_str(), "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");
}

#[test]
fn rename_over_swaps_every_time() {
    // A watch on the file itself would go quiet after the first rename; the directory's does not.
    let f = Fixture::whoami("v1");
    for (version, who) in [(2, "v2"), (3, "v1"), (4, "v2")] {
        write_atomic(&f.module, whoami_wat(who).as_bytes());
        f.wait_serving(who);
        assert!(
            f.daemon
                .wait_log(&reloaded_to(&f.topic, version), RELOAD)
                .is_some(),
            "no reload to version {version} logged; log:\n{}",
            f.daemon.log_text()
        );
    }
    assert_eq!(f.daemon.count_log(RELOAD_FAILED), 0);
}

#[test]
fn delete_then_recreate_keeps_the_old_serving_then_swaps_in_the_new() {
    let f = Fixture::whoami("v1");
    std::fs::remove_file(&f.module).expect("delete module");
    assert!(
        f.daemon
            .wait_log(&format!("{RELOAD_FAILED}&cannot read"), RELOAD)
            .is_some(),
        "the missing file was not noticed; log:\n{}",
        f.daemon.log_text()
    );
    assert_eq!(
        f.who(),
        r#""v1""#,
        "the loaded version serves without its file"
    );

    std::fs::write(&f.module, whoami_wat("v2")).expect("re-create module");
    f.wait_serving("v2");
    let status = f.status();
    assert_eq!(status["version"], 2, "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");
}

#[test]
fn recreating_the_serving_module_after_a_delete_clears_the_reload_error() {
    // Delete, then put the very same bytes back (a restore from backup, or a tool that unlinks
    // before writing): the handler is healthy again, and status must not keep the old error.
    let f = Fixture::whoami("v1");
    std::fs::remove_file(&f.module).expect("delete module");
    assert!(
        f.daemon
            .wait_log(&format!("{RELOAD_FAILED}&cannot read"), RELOAD)
            .is_some(),
        "the missing file was not noticed; log:\n{}",
        f.daemon.log_text()
    );
    assert!(f.status()["last_error"].is_string());

    std::fs::write(&f.module, whoami_wat("v1")).expect("re-create module");
    let cleared = eventually(RELOAD, || f.status()["last_error"].is_null().then_some(()));
    assert!(
        cleared.is_some(),
        "status still shows a reload error for a module that is back and serving: {}",
        f.status()
    );
    assert_eq!(f.who(), r#""v1""#);
}

#[test]
fn methods_added_by_a_new_version_are_callable_at_once_and_removed_ones_answer_no_such_method() {
    let f = Fixture::whoami("v1");
    assert_eq!(remote_error(f.call("greet", "{}")).class, "NoSuchMethod");
    assert_eq!(f.call("note", r#"{"x": 1}"#).expect("v1 has note"), "null");

    write_atomic(&f.module, v2_with_greet().as_bytes());
    assert!(
        f.daemon
            .wait_log(
                &format!("{}&methods=greet,whoami", reloaded_to(&f.topic, 2)),
                RELOAD
            )
            .is_some(),
        "v2 was not swapped in; log:\n{}",
        f.daemon.log_text()
    );
    // The very first calls after the swap: no retry, no warm-up.
    assert_eq!(f.call("greet", "{}").expect("greet is new"), r#""hello""#);
    let note = remote_error(f.call("note", r#"{"x": 1}"#));
    assert_eq!(note.class, "NoSuchMethod", "{note:?}");
    assert_eq!(f.who(), r#""v2""#);
}

#[test]
fn status_shows_version_hash_methods_and_last_error() {
    let v1 = whoami_wat("v1");
    let f = Fixture::whoami("v1");
    let status = f.status();
    assert_eq!(status["module"], f.module.display().to_string().as_str());
    assert_eq!(status["version"], 1, "{status}");
    assert_eq!(
        status["hash"],
        hash_prefix(v1.as_bytes()).as_str(),
        "{status}"
    );
    assert_eq!(status["methods"], serde_json::json!(["note", "whoami"]));
    assert_eq!(status["can_roll_back"], false, "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");

    std::fs::write(&f.module, "(module (func $x").expect("write broken module");
    f.wait_count(RELOAD_FAILED, 1);
    let status = f.status();
    assert_eq!(status["version"], 1, "{status}");
    assert_eq!(
        status["hash"],
        hash_prefix(v1.as_bytes()).as_str(),
        "{status}"
    );
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&f.module.display().to_string()),
        "the last error names the file: {status}"
    );
    let human = warren_remote(&["status", "--server", &f.daemon.server]);
    human.assert_success();
    for want in [
        format!("\n{}\n", f.topic),
        "version:   1 (sha256 ".to_owned(),
        "methods:   note, whoami".to_owned(),
        "last reload error: ".to_owned(),
    ] {
        assert!(
            human.stdout.contains(&want),
            "'{want}' missing:\n{}",
            human.stdout
        );
    }

    let v2 = v2_with_greet();
    write_atomic(&f.module, v2.as_bytes());
    f.wait_serving("v2");
    let status = f.status();
    assert_eq!(status["version"], 2, "{status}");
    assert_eq!(
        status["hash"],
        hash_prefix(v2.as_bytes()).as_str(),
        "{status}"
    );
    assert_eq!(status["methods"], serde_json::json!(["greet", "whoami"]));
    assert_eq!(status["can_roll_back"], true, "{status}");
    assert_eq!(status["last_error"], Value::Null, "{status}");
}

#[test]
fn rollback_brings_the_previous_version_back() {
    let f = Fixture::whoami("v1");
    let server = f.daemon.server.clone();
    let none = warren_remote(&["rollback", &f.topic, "--server", &server]);
    assert_eq!(none.code, Some(1), "nothing to roll back to yet: {none:?}");
    assert!(none.stderr.contains("NoPreviousVersion"), "{none:?}");
    assert_eq!(f.who(), r#""v1""#);

    write_atomic(&f.module, whoami_wat("v2").as_bytes());
    f.wait_serving("v2");

    let back = warren_remote(&["rollback", &f.topic, "--server", &server]);
    back.assert_success();
    assert_eq!(
        back.stdout,
        format!("{}: now serving version 1", f.topic),
        "{back:?}"
    );
    // Effective by the time the command returns.
    assert_eq!(f.who(), r#""v1""#);
    let status = f.status();
    assert_eq!(status["version"], 1, "{status}");
    assert_eq!(
        status["hash"],
        hash_prefix(whoami_wat("v1").as_bytes()).as_str()
    );
    assert_eq!(status["can_roll_back"], true, "v2 is kept: {status}");
    assert!(
        f.daemon
            .wait_log(
                &format!("handler rolled back&{}&version=1", f.topic),
                RELOAD
            )
            .is_some(),
        "the rollback was not logged; log:\n{}",
        f.daemon.log_text()
    );
    // The rollback holds until the file changes: the file still holds v2, and neither a reload
    // nor a late event of the watcher's brings it back.
    warren_remote(&["reload", "--server", &server]).assert_success();
    assert_eq!(f.who(), r#""v1""#, "a reload undid the rollback");
    assert_eq!(f.status()["version"], 1);

    // Rolling back again returns to v2: the two versions trade places.
    let forth = warren_remote(&["rollback", &f.topic, "--server", &server]);
    forth.assert_success();
    assert_eq!(forth.stdout, format!("{}: now serving version 2", f.topic));
    assert_eq!(f.who(), r#""v2""#);

    // Rolled back to v1 once more, the file changes (to a broken module) and then back to v2:
    // that is a change of the file, so v2 serves again, as a new version.
    warren_remote(&["rollback", &f.topic, "--server", &server]).assert_success();
    assert_eq!(f.who(), r#""v1""#);
    write_atomic(&f.module, b"(module broken");
    f.wait_count(RELOAD_FAILED, 1);
    assert_eq!(f.who(), r#""v1""#);
    write_atomic(&f.module, whoami_wat("v2").as_bytes());
    f.wait_serving("v2");
    assert_eq!(f.status()["version"], 3);
}

#[test]
fn config_edits_add_and_remove_handlers_and_an_invalid_config_changes_nothing() {
    let (a, b) = (unique("it_cfg_a"), unique("it_cfg_b"));
    let server = unique("d");
    let _queues = [
        DeleteQueues::rpc(&a, &[&server]),
        DeleteQueues::rpc(&b, &[&server]),
    ];
    let modules = tempfile::tempdir().expect("tempdir");
    let (ma, mb) = (modules.path().join("a.wat"), modules.path().join("b.wat"));
    std::fs::write(&ma, whoami_wat("A")).expect("write a");
    std::fs::write(&mb, whoami_wat("B")).expect("write b");
    let (block_a, block_b) = (handler(&a, &ma, ""), handler(&b, &mb, ""));
    let daemon = Daemon::start_with(&server, &block_a, CACHE_IN_TEMP);
    let config = daemon.dir.path().join("warren.toml");
    let original = std::fs::read_to_string(&config).expect("read config");
    let rpc = Rpc::connect();
    #[allow(
        clippy::result_large_err,
        reason = "CallError is the library's own error type"
    )]
    let who =
        |topic: &str, timeout: Duration| rpc.call(&any_server(topic), "whoami", "{}", timeout);
    let topics = || -> Vec<String> {
        let out = warren_remote(&["status", "--server", &server, "--json"]);
        out.assert_success();
        let mut topics: Vec<String> = out.last_json()["handlers"]
            .as_array()
            .expect("handlers")
            .iter()
            .map(|h| h["topic"].as_str().expect("topic").to_owned())
            .collect();
        topics.sort();
        topics
    };
    assert_eq!(who(&a, CALL).expect("a serves"), r#""A""#);

    // Add b.
    write_atomic(&config, format!("{original}\n{block_b}").as_bytes());
    assert!(
        daemon
            .wait_log(&format!("handler added&{b}"), RELOAD)
            .is_some(),
        "b was not added; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(who(&b, CALL).expect("b serves at once"), r#""B""#);
    assert_eq!(who(&a, CALL).expect("a still serves"), r#""A""#);
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(topics(), both);

    // An invalid config: logged, and nothing changes.
    write_atomic(&config, b"[server\nname = ");
    assert!(
        daemon
            .wait_log(
                "config reload failed; the running configuration stays",
                RELOAD
            )
            .is_some(),
        "the invalid config was not reported; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(who(&a, CALL).expect("a still serves"), r#""A""#);
    assert_eq!(who(&b, CALL).expect("b still serves"), r#""B""#);
    assert_eq!(topics(), both);

    // Remove a.
    write_atomic(
        &config,
        format!("{original}\n{block_b}")
            .replace(&block_a, "")
            .as_bytes(),
    );
    assert!(
        daemon
            .wait_log(&format!("handler removed&{a}"), RELOAD)
            .is_some(),
        "a was not removed; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(topics(), std::slice::from_ref(&b));
    assert_eq!(who(&b, CALL).expect("b still serves"), r#""B""#);
    // Nothing consumes a's queue any more: a call to it is never answered.
    match who(&a, Duration::from_secs(1)) {
        Err(CallError::Timeout { .. }) => {}
        other => panic!("a removed handler answered: {other:?}"),
    }
    assert_eq!(
        daemon.count_log("handler removed"),
        1,
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        daemon.count_log("handler added"),
        1,
        "{}",
        daemon.log_text()
    );
}

/// `.cwasm` entries in `dir`.
fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compiled_module_cache_is_hit_on_restart_and_a_corrupt_entry_is_a_miss() {
    let topic = unique("it_cache");
    let server = unique("d");
    let _queues = DeleteQueues::rpc(&topic, &[&server]);
    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("m.wat");
    std::fs::write(&module, whoami_wat("v1")).expect("write module");
    let cache = dir.path().join("cache");
    // Shared by every daemon of this test (so absolute), inside the test's temp dir.
    let extra = format!("cache_dir = \"{}\"", cache.display());
    let config = handler(&topic, &module, "");
    let loaded = format!("handler loaded&topic={topic}");

    // Start a daemon, check its load came from the cache (or not) and that it serves, stop it;
    // returns its log.
    let run = |expect: &str| {
        let mut daemon = Daemon::start_with(&server, &config, &extra);
        let line = daemon.wait_log(&loaded, RELOAD).expect("handler loaded");
        let rpc = Rpc::connect();
        let who = rpc.call(&any_server(&topic), "whoami", "{}", CALL);
        drop(rpc);
        assert!(
            line.contains(&format!("cache={expect}")),
            "expected cache={expect}: {line}"
        );
        assert_eq!(
            who.unwrap_or_else(|e| panic!("whoami: {e}; log:\n{}", daemon.log_text())),
            r#""v1""#
        );
        let log = daemon.log_text();
        assert!(
            daemon.terminate(),
            "clean shutdown; log:\n{}",
            daemon.log_text()
        );
        log
    };

    run("Miss");
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 1, "one entry written: {entries:?}");
    run("Hit");

    for entry in &entries {
        std::fs::write(entry, b"garbage, not a compiled module").expect("corrupt entry");
    }
    let log = run("Miss");
    assert!(
        log.contains("compiled-module cache entry is stale or corrupt"),
        "the corrupt entry was noticed: {log}"
    );
    assert!(
        !log.contains(" ERROR "),
        "a corrupt entry is not an error: {log}"
    );
    let rewritten = std::fs::read(&entries[0]).expect("entry rebuilt");
    assert_ne!(rewritten, b"garbage, not a compiled module");
}

#[test]
fn removing_a_handler_keeps_hot_reload_for_another_handler_of_the_same_module() {
    // Two topics served by one module file; the config drops one of them. The other still
    // serves that file, so a new version written to it must still be swapped in.
    let (a, b) = (unique("it_share_a"), unique("it_share_b"));
    let server = unique("d");
    let _queues = [
        DeleteQueues::rpc(&a, &[&server]),
        DeleteQueues::rpc(&b, &[&server]),
    ];
    let modules = tempfile::tempdir().expect("tempdir");
    let module = modules.path().join("m.wat");
    std::fs::write(&module, whoami_wat("v1")).expect("write module");
    let (block_a, block_b) = (handler(&a, &module, ""), handler(&b, &module, ""));
    let daemon = Daemon::start_with(&server, &format!("{block_a}\n{block_b}"), CACHE_IN_TEMP);
    let config = daemon.dir.path().join("warren.toml");
    let rpc = Rpc::connect();
    assert_eq!(
        rpc.call(&any_server(&b), "whoami", "{}", CALL)
            .expect("b serves"),
        r#""v1""#
    );

    let text = std::fs::read_to_string(&config).expect("read config");
    write_atomic(&config, text.replace(&block_a, "").as_bytes());
    assert!(
        daemon
            .wait_log(&format!("handler removed&{a}"), RELOAD)
            .is_some(),
        "a was not removed; log:\n{}",
        daemon.log_text()
    );

    write_atomic(&module, whoami_wat("v2").as_bytes());
    let swapped = eventually(RELOAD, || {
        let who = rpc.call(&any_server(&b), "whoami", "{}", CALL).ok()?;
        (who == r#""v2""#).then_some(())
    });
    assert!(
        swapped.is_some(),
        "b kept serving v1 after its module changed: removing a stopped watching the file \
         they share; log:\n{}",
        daemon.log_text()
    );
}
