//! Sandboxes made ahead of their calls (`Spent::release`, `Next::prepare`): each still serves exactly one call,
//! gets its deadline when the call starts, and goes when its module or its limits do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use warren::registry::Handler;

use crate::support::{DeleteQueues, Rpc, any_server, eventually, serve_wat, unique};
use warren::runtime::{EngineSettings, Failure, Limits, Module, Runtime, parse_args};

/// A module whose `_initialize` records the time (WASI's monotonic clock) and how many args
/// bytes it saw, and whose methods report on them.
///
/// - `state` answers `"fresh"` when this instance ran `_initialize` once, saw no args there,
///   and was not called before; `"stale"` otherwise.
/// - `age` answers `"ahead"` when `_initialize` ran over 200 ms before the call, else `"now"`.
/// - `spin` keeps its thread for 100 ms of wall time.
const CLOCKED: &str = r#"(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "warren_v1" "input_len" (func $input_len (result i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "\"fresh\"\"stale\"\"ahead\"\"now\"")
  (global $inits (mut i32) (i32.const 0))
  (global $calls (mut i32) (i32.const 0))
  (global $init_input (mut i32) (i32.const -1))
  (global $init_at (mut i64) (i64.const 0))
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 0)))
    (i64.load (i32.const 0)))
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "_initialize")
    (global.set $inits (i32.add (global.get $inits) (i32.const 1)))
    (global.set $init_input (call $input_len))
    (global.set $init_at (call $now)))
  (func (export "state") (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.and
          (i32.and (i32.eq (global.get $inits) (i32.const 1))
                   (i32.eq (global.get $calls) (i32.const 1)))
          (i32.eqz (global.get $init_input)))
      (then (call $output_write (i32.const 16) (i32.const 7)))
      (else (call $output_write (i32.const 23) (i32.const 7))))
    i32.const 0)
  (func (export "age") (result i32)
    (if (i64.gt_u (i64.sub (call $now) (global.get $init_at)) (i64.const 200000000))
      (then (call $output_write (i32.const 30) (i32.const 7)))
      (else (call $output_write (i32.const 37) (i32.const 5))))
    i32.const 0)
  (func (export "spin") (result i32)
    (local $until i64)
    (local.set $until (i64.add (call $now) (i64.const 100000000)))
    (loop $l (br_if $l (i64.lt_u (call $now) (local.get $until))))
    i32.const 0))"#;

fn runtime(max_prepared: u32) -> Runtime {
    Runtime::new(&EngineSettings {
        max_prepared,
        ..EngineSettings::small()
    })
    .expect("runtime")
}

/// The default limits with a wall-clock limit of `ms`.
fn timeout_ms(ms: u64) -> Limits {
    Limits {
        timeout: Duration::from_millis(ms),
        ..Limits::DEFAULT
    }
}

fn load(rt: &Runtime, name: &str) -> Module {
    rt.load(name, CLOCKED.as_bytes(), &Limits::DEFAULT)
        .expect("module loads")
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("executor")
        .block_on(f)
}

/// One call the way the daemon makes it: the spent sandbox is released once the answer is in
/// hand, and the module's next sandbox made.
async fn call(
    rt: &Runtime,
    m: &Module,
    method: &str,
    limits: &Limits,
) -> Result<Vec<String>, Failure> {
    let args = parse_args(r#"{"some": "args"}"#).expect("args");
    let (answer, spent) = rt
        .invoke_keeping(m, method, &args, Arc::from(&b"{}"[..]), limits)
        .await;
    spent.release().prepare(rt).await;
    answer.map(|rs| rs.iter().map(|r| r.get().to_owned()).collect())
}

/// The time that separates a sandbox made ahead from one made for its call, in `age` (a
/// margin of 100 ms each way).
fn let_it_age() {
    std::thread::sleep(Duration::from_millis(300));
}

/// Through the daemon: once a call is answered, the handler's next sandbox is made, and the next
/// call runs in it (and only that one: the call after it finds a fresh one again).
#[test]
fn the_daemon_makes_a_handlers_next_sandbox_once_a_call_is_answered() {
    let topic = unique("it_ahead");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = serve_wat(&server, &topic, CLOCKED, "");
    let rpc = Rpc::connect();
    let call = |method: &str| {
        rpc.call(&any_server(&topic), method, "{}", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{method}: {e}; log:\n{}", daemon.log_text()))
    };
    for _ in 0..3 {
        assert_eq!(call("state"), r#""fresh""#);
        let_it_age();
        assert_eq!(call("age"), r#""ahead""#);
    }
}

/// A module whose `_initialize` prints `init line` to stdout and whose `hello` prints `call
/// line` and answers `"ok"`.
const CHATTY: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "init line\n")
  (data (i32.const 80) "call line\n")
  (data (i32.const 96) "\"ok\"")
  (func $say (param $at i32)
    (i32.store (i32.const 0) (local.get $at))
    (i32.store (i32.const 4) (i32.const 10))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "_initialize") (call $say (i32.const 64)))
  (func (export "hello") (result i32)
    (call $say (i32.const 80))
    (call $output_write (i32.const 96) (i32.const 4))
    i32.const 0))"#;

/// What `_initialize` prints belongs to the call it ran for: the first call's own sandbox logs
/// it in that call's delivery span; a sandbox made ahead logs it when it is made, outside any
/// delivery, and not with the later call that takes the sandbox.
#[test]
fn a_sandbox_made_ahead_logs_its_initialize_output_when_made_not_with_its_call() {
    let topic = unique("it_ahead_log");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = serve_wat(&server, &topic, CHATTY, "log_stdio = true");
    let rpc = Rpc::connect();
    let call = || {
        rpc.call(&any_server(&topic), "hello", "{}", Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("hello: {e}; log:\n{}", daemon.log_text()))
    };
    let lines = |needle: &str| -> Vec<String> {
        daemon
            .log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    };
    let in_delivery = |line: &str| line.contains("delivery{") && line.contains("method=");
    for round in 1..=3 {
        assert_eq!(call(), r#""ok""#);
        // This call's line, and the init line of the sandbox made ahead after it.
        eventually(Duration::from_secs(10), || {
            (lines("call line").len() == round && lines("init line").len() == round + 1)
                .then_some(())
        });
        let (inits, calls) = (lines("init line"), lines("call line"));
        assert_eq!(calls.len(), round, "log:\n{}", daemon.log_text());
        assert_eq!(inits.len(), round + 1, "log:\n{}", daemon.log_text());
        assert!(calls.iter().all(|l| in_delivery(l)), "{calls:?}");
        // Only the first call made its own sandbox, inside its delivery.
        assert!(in_delivery(&inits[0]), "{inits:?}");
        assert!(inits[1..].iter().all(|l| !in_delivery(l)), "{inits:?}");
    }
}

/// A module whose `_initialize` logs `init log` 200 times and whose `hello` logs `call log` 100
/// times and answers `"ok"`: 300 lines, over the 256 an invocation may log.
const LOGGY: &str = r#"(module
  (import "warren_v1" "log" (func $log (param i32 i32 i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "init log")
  (data (i32.const 80) "call log")
  (data (i32.const 96) "\"ok\"")
  (func $say (param $at i32) (param $times i32)
    (loop $l
      (call $log (i32.const 2) (local.get $at) (i32.const 8))
      (local.set $times (i32.sub (local.get $times) (i32.const 1)))
      (br_if $l (local.get $times))))
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "_initialize") (call $say (i32.const 64) (i32.const 200)))
  (func (export "hello") (result i32)
    (call $say (i32.const 80) (i32.const 100))
    (call $output_write (i32.const 96) (i32.const 4))
    i32.const 0))"#;

/// The cap on log lines is per invocation; a sandbox made ahead spends its `_initialize`'s
/// lines when it is made, and its call starts from none.
#[test]
fn a_sandbox_made_ahead_starts_its_call_with_the_whole_log_line_cap() {
    let topic = unique("it_ahead_loglines");
    let server = unique("d");
    let _cleanup = DeleteQueues::rpc(&topic, &[&server]);
    let daemon = serve_wat(&server, &topic, LOGGY, "");
    let rpc = Rpc::connect();
    // 200 `_initialize` lines each: the load's smoke test, the first call's own sandbox, and
    // the one made ahead once the first call is answered, which the second call must find.
    for init_lines in [600, 800] {
        let answer = rpc.call(&any_server(&topic), "hello", "{}", Duration::from_secs(10));
        assert_eq!(answer.as_deref().ok(), Some(r#""ok""#), "{answer:?}");
        let made = eventually(Duration::from_secs(10), || {
            (daemon.count_log("init log") == init_lines).then_some(())
        });
        assert!(made.is_some(), "log:\n{}", daemon.log_text());
    }
    // The first call made its own sandbox: 200 + 56 lines, 44 dropped and one warning. The
    // second took the one made ahead: all of its 100 lines, none dropped.
    let settled = eventually(Duration::from_secs(10), || {
        (daemon.count_log("replied") == 2 && daemon.count_log("call log") == 156).then_some(())
    });
    assert!(settled.is_some(), "log:\n{}", daemon.log_text());
    assert_eq!(
        daemon.count_log("guest log lines dropped"),
        1,
        "log:\n{}",
        daemon.log_text()
    );
}

#[test]
fn a_sandbox_made_ahead_serves_one_call_and_its_initialize_sees_no_args() {
    let rt = runtime(4);
    let m = load(&rt, "clocked");
    block_on(async {
        assert_eq!(rt.prepared_sandboxes(), 0);
        for i in 0..4 {
            assert_eq!(
                call(&rt, &m, "state", &Limits::DEFAULT)
                    .await
                    .expect("call"),
                [r#""fresh""#],
                "call {i}"
            );
            assert_eq!(rt.prepared_sandboxes(), 1, "after call {i}");
        }
        // The prepared one is what the next call runs: made well before it.
        let_it_age();
        assert_eq!(
            call(&rt, &m, "age", &Limits::DEFAULT).await.expect("call"),
            [r#""ahead""#]
        );
    });
}

/// The deadline counts from the call, not from when its sandbox was made: a 100 ms call under
/// a 300 ms timeout succeeds in a sandbox made 400 ms earlier.
#[test]
fn a_prepared_sandbox_gets_its_deadline_when_its_call_starts() {
    let rt = runtime(4);
    let m = load(&rt, "clocked");
    let limits = timeout_ms(300);
    block_on(async {
        call(&rt, &m, "spin", &limits).await.expect("first call");
        assert_eq!(rt.prepared_sandboxes(), 1);
        std::thread::sleep(Duration::from_millis(400));
        let started = Instant::now();
        call(&rt, &m, "spin", &limits)
            .await
            .expect("a call in a sandbox made ahead has its whole timeout");
        assert!(started.elapsed() >= Duration::from_millis(100));
        // And the deadline still holds.
        let tight = timeout_ms(40);
        call(&rt, &m, "state", &tight)
            .await
            .expect("made under tight");
        std::thread::sleep(Duration::from_millis(100));
        let err = call(&rt, &m, "spin", &tight).await.expect_err("over 40 ms");
        assert_eq!(err.class, "Timeout", "{err}");
    });
}

/// A config reload that changes a handler's limits must not leave its next call in a sandbox
/// made under the old ones.
#[test]
fn a_sandbox_made_under_other_limits_is_dropped_not_used() {
    let rt = runtime(4);
    let m = load(&rt, "clocked");
    let other = Limits {
        max_result_bytes: 4096,
        ..Limits::DEFAULT
    };
    block_on(async {
        call(&rt, &m, "state", &Limits::DEFAULT)
            .await
            .expect("call");
        assert_eq!(rt.prepared_sandboxes(), 1);
        let_it_age();
        assert_eq!(
            call(&rt, &m, "age", &other).await.expect("call"),
            [r#""now""#],
            "the call under new limits ran in the sandbox made under the old"
        );
        // Dropped, and the next one made under the new limits.
        assert_eq!(rt.prepared_sandboxes(), 1);
        // It made the next one under the new limits, which the next such call takes.
        let_it_age();
        assert_eq!(
            call(&rt, &m, "age", &other).await.expect("call"),
            [r#""ahead""#]
        );
    });
}

/// A prepared sandbox belongs to its module version: dropping the version (a reload replaced
/// it) gives back its pool slot.
#[test]
fn a_prepared_sandbox_goes_with_its_module() {
    let rt = runtime(4);
    let m = load(&rt, "clocked");
    block_on(async {
        call(&rt, &m, "state", &Limits::DEFAULT)
            .await
            .expect("call");
    });
    assert_eq!(rt.prepared_sandboxes(), 1);
    drop(m);
    assert_eq!(rt.prepared_sandboxes(), 0);
}

/// A reload keeps the replaced version for a rollback, but it serves no new calls, so it must
/// not hold a prepared sandbox (and one of the `max_prepared` places); a rollback makes the
/// version it restores serve again.
#[test]
fn a_replaced_version_keeps_no_prepared_sandbox() {
    let rt = runtime(4);
    let handler = Handler::new(
        "clocked".into(),
        "unused.wasm".into(),
        Limits::DEFAULT,
        load(&rt, "clocked"),
    );
    let first = handler.current();
    block_on(async {
        call(&rt, &first.module, "state", &Limits::DEFAULT)
            .await
            .expect("call");
        assert_eq!(rt.prepared_sandboxes(), 1);

        handler.swap(load(&rt, "clocked"));
        assert_eq!(
            rt.prepared_sandboxes(),
            0,
            "the replaced version kept its sandbox"
        );
        // A call that was still running on the old version makes none for it.
        call(&rt, &first.module, "state", &Limits::DEFAULT)
            .await
            .expect("call");
        assert_eq!(rt.prepared_sandboxes(), 0);

        let second = handler.current();
        call(&rt, &second.module, "state", &Limits::DEFAULT)
            .await
            .expect("call");
        assert_eq!(rt.prepared_sandboxes(), 1);

        handler.rollback().expect("rollback");
        assert_eq!(rt.prepared_sandboxes(), 0);
        call(&rt, &handler.current().module, "state", &Limits::DEFAULT)
            .await
            .expect("call");
        assert_eq!(rt.prepared_sandboxes(), 1);
    });
}

/// At most `max_prepared` sandboxes wait at once, however many modules are called.
#[test]
fn prepared_sandboxes_are_capped() {
    let rt = runtime(2);
    let modules: Vec<Module> = (0..4).map(|i| load(&rt, &format!("m{i}"))).collect();
    block_on(async {
        for m in &modules {
            call(&rt, m, "state", &Limits::DEFAULT).await.expect("call");
        }
    });
    assert_eq!(rt.prepared_sandboxes(), 2);
}

/// A sandbox waiting for its call runs nothing, so it must not keep the epoch ticker awake
/// (an idle daemon would wake 500 times a second).
#[test]
fn the_ticker_sleeps_while_a_prepared_sandbox_waits() {
    let rt = runtime(4);
    let m = load(&rt, "clocked");
    let tight = timeout_ms(40);
    block_on(async {
        call(&rt, &m, "state", &tight).await.expect("call");
    });
    assert_eq!(rt.prepared_sandboxes(), 1);
    assert!(
        eventually(Duration::from_secs(10), || rt
            .epoch_ticker_idle()
            .then_some(()))
        .is_some(),
        "the ticker never went idle with only a prepared sandbox alive"
    );
    // The call that takes it wakes the ticker, so its deadline is enforced.
    block_on(async {
        let err = call(&rt, &m, "spin", &tight).await.expect_err("over 40 ms");
        assert_eq!(err.class, "Timeout", "{err}");
    });
    assert!(!rt.epoch_ticker_idle());
}
