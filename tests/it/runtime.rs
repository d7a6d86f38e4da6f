//! The runtime through its library API: example plugins built from source, and hostile modules
//! written as WAT.

use std::sync::Arc;
use std::time::{Duration, Instant};

use warren::runtime::{EngineSettings, Failure, Limits, LoadError, Module, Runtime, parse_args};

use crate::support::plugin;

fn runtime() -> Runtime {
    Runtime::new(&EngineSettings::small()).expect("runtime")
}

fn load(rt: &Runtime, name: &str, bytes: &[u8]) -> Module {
    rt.load(name, bytes, &Limits::DEFAULT)
        .expect("module loads")
}

fn call(rt: &Runtime, m: &Module, method: &str, args: &str) -> Result<Vec<String>, Failure> {
    call_with(rt, m, method, args, "{}", &Limits::DEFAULT)
}

fn call_with(
    rt: &Runtime,
    m: &Module,
    method: &str,
    args: &str,
    ctx: &str,
    limits: &Limits,
) -> Result<Vec<String>, Failure> {
    let args = parse_args(args)?;
    rt.invoke(m, method, &args, Arc::from(ctx.as_bytes()), limits)
        .map(|rs| rs.iter().map(|r| r.get().to_owned()).collect())
}

/// ABI marker, memory, and the given body.
fn wat(body: &str) -> Vec<u8> {
    format!(
        r#"(module
  (import "warren_v1" "input_len" (func $input_len (result i32)))
  (import "warren_v1" "input_read" (func $input_read (param i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (import "warren_v1" "error_write" (func $error_write (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "warren_abi_version") (result i32) i32.const 1)
  {body})"#
    )
    .into_bytes()
}

const ECHO_ARGS: &str = r#"(func (export "echo_args") (result i32)
    (call $input_read (i32.const 0))
    (call $output_write (i32.const 0) (call $input_len))
    i32.const 0)"#;

#[test]
fn echo_plugin_returns_the_value() {
    let rt = runtime();
    let echo = load(&rt, "echo", &std::fs::read(plugin("echo")).expect("read"));
    assert_eq!(
        call(&rt, &echo, "echo", r#"{"value": 42}"#).expect("ok"),
        ["42"]
    );
    let nested = call(&rt, &echo, "echo", r#"{"value": {"a": [1, "x"]}}"#).expect("ok");
    let value: serde_json::Value = serde_json::from_str(&nested[0]).expect("json");
    assert_eq!(value, serde_json::json!({"a": [1, "x"]}));
    assert!(echo.methods().any(|m| m == "echo"));
}

#[test]
fn context_reaches_the_guest() {
    let rt = runtime();
    let echo = load(&rt, "echo", &std::fs::read(plugin("echo")).expect("read"));
    let out = call_with(
        &rt,
        &echo,
        "context",
        "{}",
        r#"{"user_id":"u1","roles":["admin"]}"#,
        &Limits::DEFAULT,
    )
    .expect("ok");
    let ctx: serde_json::Value = serde_json::from_str(&out[0]).expect("json");
    assert_eq!(ctx["user_id"], "u1");
    assert_eq!(ctx["roles"][0], "admin");
}

#[test]
fn calc_plugin_typed_error_stream_and_panic() {
    let rt = runtime();
    let calc = load(&rt, "calc", &std::fs::read(plugin("calc")).expect("read"));
    assert_eq!(
        call(&rt, &calc, "add", r#"{"a": 2, "b": 40}"#).expect("ok"),
        ["42"]
    );

    let err = call(&rt, &calc, "div", r#"{"a": 1, "b": 0}"#).expect_err("division by zero");
    assert_eq!(err.class, "ZeroDivisionError");
    assert_eq!(err.data, Some(serde_json::json!({"a": 1, "b": 0})));

    assert_eq!(
        call(&rt, &calc, "fib", r#"{"n": 6}"#).expect("ok"),
        ["0", "1", "1", "2", "3", "5"]
    );

    let err = call(&rt, &calc, "panic", "{}").expect_err("panics");
    assert_eq!(err.class, "GuestTrap");
    assert!(
        err.message.contains("calc panicked on purpose"),
        "panic message must reach the caller: {}",
        err.message
    );

    let err = call(&rt, &calc, "add", r#"{"a": "two"}"#).expect_err("bad args");
    assert_eq!(err.class, "InvalidArgs", "{err}");
}

#[test]
fn every_invocation_gets_a_fresh_instance() {
    // A global counter incremented per call: with a reused instance the second call sees 2.
    let rt = runtime();
    let m = load(
        &rt,
        "counter",
        &wat(r#"(global $n (mut i32) (i32.const 0))
  (func (export "bump") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $n)))
    (call $output_write (i32.const 0) (i32.const 1))
    i32.const 0)"#),
    );
    for _ in 0..3 {
        assert_eq!(call(&rt, &m, "bump", "{}").expect("ok"), ["1"]);
    }
}

#[test]
fn infinite_loop_times_out_while_another_invocation_completes() {
    let rt = Arc::new(runtime());
    let m = load(
        &rt,
        "hostile",
        &wat(&format!(
            r#"(func (export "spin") (result i32) (loop $l (br $l)) i32.const 0)
  {ECHO_ARGS}"#
        )),
    );
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::DEFAULT
    };
    let spinner = {
        let (rt, m, limits) = (rt.clone(), m.clone(), limits.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let r = call_with(&rt, &m, "spin", "{}", "{}", &limits);
            (r, start.elapsed())
        })
    };
    // While the spinner burns its core, a normal call on the same module must still finish.
    let start = Instant::now();
    assert_eq!(
        call(&rt, &m, "echo_args", r#"{"x":1}"#).expect("ok"),
        [r#"{"x":1}"#]
    );
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "the concurrent call was held up: {:?}",
        start.elapsed()
    );
    let (result, took) = spinner.join().expect("thread");
    let err = result.expect_err("spinning must be stopped");
    assert_eq!(err.class, "Timeout", "{err}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "stopped after {took:?}"
    );
}

/// `invoke_async` runs the guest in the awaiting task and yields at every epoch tick: on a
/// single-threaded executor a spinning guest lets another task run long before its time
/// limit, and still times out.
#[test]
fn async_invocation_yields_its_thread_while_the_guest_spins() {
    let rt = Arc::new(runtime());
    let m = load(
        &rt,
        "hostile",
        &wat(r#"(func (export "spin") (result i32) (loop $l (br $l)) i32.const 0)"#),
    );
    let limits = Limits {
        timeout: Duration::from_secs(3),
        ..Limits::DEFAULT
    };
    let executor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("executor");
    executor.block_on(async {
        let spinner = tokio::spawn({
            let (rt, m, limits) = (rt.clone(), m.clone(), limits.clone());
            async move {
                let args = parse_args("{}").expect("args");
                rt.invoke_async(&m, "spin", &args, Arc::from(&b"{}"[..]), &limits)
                    .await
            }
        });
        // Spawned after the spinner, so it runs only when the spinner gives the thread back.
        tokio::spawn(async {}).await.expect("the other task ran");
        assert!(
            !spinner.is_finished(),
            "the other task ran only after the spinner ended"
        );
        let err = spinner
            .await
            .expect("spinner task")
            .expect_err("spinning must be stopped");
        assert_eq!(err.class, "Timeout", "{err}");
    });
}

#[test]
fn unbounded_memory_growth_hits_the_cap() {
    let rt = runtime();
    let m = load(
        &rt,
        "grow",
        &wat(r#"(func (export "grow") (result i32)
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    i32.const 0)"#),
    );
    let limits = Limits {
        memory_bytes: 4 << 20,
        ..Limits::DEFAULT
    };
    let err = call_with(&rt, &m, "grow", "{}", "{}", &limits).expect_err("cap");
    assert_eq!(err.class, "MemoryLimitExceeded", "{err}");
}

#[test]
fn unreachable_is_a_guest_trap() {
    let rt = runtime();
    let m = load(
        &rt,
        "trap",
        &wat(r#"(func (export "boom") (result i32) unreachable)"#),
    );
    let err = call(&rt, &m, "boom", "{}").expect_err("trap");
    assert_eq!(err.class, "GuestTrap");
    assert!(err.message.contains("unreachable"), "{}", err.message);
}

#[test]
fn out_of_bounds_output_is_a_trap_not_a_host_crash() {
    let rt = runtime();
    let m = load(
        &rt,
        "oob",
        &wat(r#"(func (export "oob") (result i32)
    (call $output_write (i32.const 65530) (i32.const 100)) i32.const 0)"#),
    );
    let err = call(&rt, &m, "oob", "{}").expect_err("out of bounds");
    assert_eq!(err.class, "GuestTrap", "{err}");
}

#[test]
fn invalid_output_and_error_conventions() {
    let rt = runtime();
    let m = load(
        &rt,
        "outputs",
        &wat(
            r#"(data (i32.const 100) "not json{\"class\":\"Nope\",\"message\":\"m\"}")
  (func (export "bad_json") (result i32) (call $output_write (i32.const 100) (i32.const 8)) i32.const 0)
  (func (export "typed") (result i32) (call $error_write (i32.const 108) (i32.const 30)) i32.const 1)
  (func (export "bare_status") (result i32) i32.const 7)
  (func (export "nothing") (result i32) i32.const 0)"#,
        ),
    );
    assert_eq!(
        call(&rt, &m, "bad_json", "{}").expect_err("invalid").class,
        "InvalidResult"
    );
    let typed = call(&rt, &m, "typed", "{}").expect_err("typed");
    assert_eq!(
        (typed.class.as_str(), typed.message.as_str()),
        ("Nope", "m")
    );
    assert_eq!(
        call(&rt, &m, "bare_status", "{}")
            .expect_err("status")
            .class,
        "GuestError"
    );
    assert_eq!(call(&rt, &m, "nothing", "{}").expect("null"), ["null"]);
}

#[test]
fn reserved_and_unknown_exports_are_no_such_method() {
    let rt = runtime();
    let m = load(
        &rt,
        "reserved",
        &wat(r#"(func (export "_hidden") (result i32) i32.const 0)
  (func (export "_initialize"))
  (func (export "visible") (result i32) i32.const 0)
  (func (export "takes_params") (param i32) (result i32) i32.const 0)"#),
    );
    assert_eq!(m.methods().collect::<Vec<_>>(), ["visible"]);
    for name in [
        "_hidden",
        "_initialize",
        "warren_abi_version",
        "memory",
        "takes_params",
        "nope",
    ] {
        assert_eq!(
            call(&rt, &m, name, "{}").expect_err(name).class,
            "NoSuchMethod",
            "{name}"
        );
    }
}

#[test]
fn invalid_args_are_refused_before_the_guest_runs() {
    let rt = runtime();
    let m = load(&rt, "args", &wat(ECHO_ARGS));
    for bad in ["not json", "[1,2]", "42", "\"s\"", "{\"a\": "] {
        assert_eq!(
            call(&rt, &m, "echo_args", bad).expect_err(bad).class,
            "InvalidArgs",
            "{bad}"
        );
    }
}

#[test]
fn initialize_runs_before_every_method() {
    let rt = runtime();
    let m = load(
        &rt,
        "reactor",
        &wat(r#"(global $ready (mut i32) (i32.const 0))
  (func (export "_initialize") (global.set $ready (i32.const 1)))
  (func (export "ready") (result i32)
    (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $ready)))
    (call $output_write (i32.const 0) (i32.const 1))
    i32.const 0)"#),
    );
    assert_eq!(call(&rt, &m, "ready", "{}").expect("ok"), ["1"]);
}

#[test]
fn modules_that_break_the_abi_do_not_load() {
    let rt = runtime();
    let no_marker = rt.load(
        "x",
        b"(module (memory (export \"memory\") 1) (func (export \"m\") (result i32) i32.const 0))",
        &Limits::DEFAULT,
    );
    assert!(
        matches!(no_marker, Err(LoadError::MissingAbiMarker)),
        "{:?}",
        no_marker.err()
    );
    let msg = no_marker.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("warren_abi_version"), "{msg}");

    let v2 = rt.load("x", b"(module (memory (export \"memory\") 1) (func (export \"warren_abi_version\") (result i32) i32.const 2))", &Limits::DEFAULT);
    assert!(
        matches!(
            v2,
            Err(LoadError::AbiVersion {
                found: 2,
                expected: 1
            })
        ),
        "{:?}",
        v2.err()
    );

    let unknown_import = rt.load("x", b"(module (import \"env\" \"steal\" (func)) (memory (export \"memory\") 1) (func (export \"warren_abi_version\") (result i32) i32.const 1))", &Limits::DEFAULT);
    let msg = unknown_import
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("steal"), "the error names the import: {msg}");

    assert!(matches!(
        rt.load("x", b"garbage", &Limits::DEFAULT),
        Err(LoadError::Compile(_))
    ));
}

#[test]
fn wasi_grants_nothing() {
    // A module that tries to open "/etc/passwd" through WASI preopen fd 3 gets EBADF (8), not a file.
    let rt = runtime();
    let m = rt.load("wasi", br#"(module
  (import "wasi_snapshot_preview1" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "etc/passwd")
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "open") (result i32)
    (i32.store8 (i32.const 100)
      (i32.add (i32.const 48) (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 10) (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 200))))
    (call $output_write (i32.const 100) (i32.const 1))
    i32.const 0))"#, &Limits::DEFAULT).expect("loads");
    assert_eq!(
        call(&rt, &m, "open", "{}").expect("returns errno"),
        ["8"],
        "EBADF: no preopened directory"
    );
}

#[test]
fn a_guest_that_sleeps_is_stopped_at_once() {
    // Epoch interruption cannot stop a host call, so a WASI sleep must not be possible at all.
    let rt = runtime();
    let m = rt
        .load(
            "sleeper",
            br#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "warren_abi_version") (result i32) i32.const 1)
  ;; one clock subscription of 1e18 ns at offset 0, as std::thread::sleep writes it
  (func (export "nap") (result i32)
    (i32.store8 (i32.const 8) (i32.const 0))
    (i64.store (i32.const 24) (i64.const 1000000000000000000))
    (call $poll (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 200))))"#,
            &Limits::DEFAULT,
        )
        .expect("loads");
    let start = Instant::now();
    let err = call(&rt, &m, "nap", "{}").expect_err("refused");
    assert_eq!(err.class, "GuestTrap", "{err}");
    assert!(err.message.contains("may not block"), "{}", err.message);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn output_over_the_stdio_cap_is_truncated_not_fatal() {
    // 100 KB to stdout (over the 64 KiB cap), then a message on stderr, then a trap: the write
    // must succeed (truncated), and the later stderr must still reach the caller.
    let rt = runtime();
    let m = rt
        .load(
            "chatty",
            br#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (data (i32.const 0) "\00\04\00\00\a0\86\01\00")
  (data (i32.const 16) "\00\00\02\00\0b\00\00\00")
  (data (i32.const 131072) "still alive")
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "chat") (result i32)
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))
    (drop (call $write (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 32)))
    unreachable))"#,
            &Limits::DEFAULT,
        )
        .expect("loads");
    let err = call(&rt, &m, "chat", "{}").expect_err("traps");
    assert_eq!(err.class, "GuestTrap", "{err}");
    assert!(err.message.contains("still alive"), "{}", err.message);
}

#[test]
fn a_handler_reaches_only_what_its_config_grants() {
    use warren::runtime::{Grants, Preopen};
    let rt = runtime();
    let files = load(&rt, "files", &std::fs::read(plugin("files")).expect("read"));

    // Nothing granted: no host files, no host environment.
    let err = call(&rt, &files, "read", r#"{"path": "/etc/hostname"}"#).expect_err("no files");
    assert_eq!(err.class, "IOError", "{err}");
    assert!(std::env::var("PATH").is_ok());
    let err = call(&rt, &files, "env", r#"{"name": "PATH"}"#).expect_err("no env");
    assert_eq!(err.class, "KeyError", "{err}");

    let ro = tempfile::tempdir().expect("tempdir");
    std::fs::write(ro.path().join("hello.txt"), "hello from the host").expect("write");
    let rw = tempfile::tempdir().expect("tempdir");
    let grants = Grants {
        env: vec![("GREETING".into(), "hi".into())],
        dirs: vec![
            Preopen {
                host: ro.path().to_owned(),
                guest: "/data".into(),
                writable: false,
            },
            Preopen {
                host: rw.path().to_owned(),
                guest: "/scratch".into(),
                writable: true,
            },
        ],
    };
    let limits = Limits {
        grants: Some(Arc::new(grants)),
        ..Limits::DEFAULT
    };
    let run = |method: &str, args: &str| call_with(&rt, &files, method, args, "{}", &limits);

    assert_eq!(
        run("env", r#"{"name": "GREETING"}"#).expect("granted"),
        [r#""hi""#]
    );
    assert_eq!(
        run("env", r#"{"name": "PATH"}"#)
            .expect_err("not granted")
            .class,
        "KeyError"
    );
    assert_eq!(
        run("read", r#"{"path": "/data/hello.txt"}"#).expect("readable"),
        [r#""hello from the host""#]
    );
    let err = run("write", r#"{"path": "/data/new.txt", "text": "x"}"#).expect_err("read-only");
    assert_eq!(err.class, "IOError", "{err}");
    assert!(
        !ro.path().join("new.txt").exists(),
        "nothing written to a read-only grant"
    );
    assert_eq!(
        run("read", r#"{"path": "/etc/hostname"}"#)
            .expect_err("outside")
            .class,
        "IOError"
    );
    let err = run("read", r#"{"path": "/data/../../etc/hostname"}"#).expect_err("no escape");
    assert_eq!(err.class, "IOError", "{err}");

    assert_eq!(
        run("write", r#"{"path": "/scratch/out.txt", "text": "abc"}"#).expect("writable"),
        ["3"]
    );
    assert_eq!(
        std::fs::read_to_string(rw.path().join("out.txt")).expect("on the host"),
        "abc"
    );
}

#[test]
fn oversized_args_are_refused() {
    let rt = runtime();
    let echo = load(&rt, "echo", &std::fs::read(plugin("echo")).expect("read"));
    let limits = Limits {
        max_args_bytes: 64,
        ..Limits::DEFAULT
    };
    let big = format!(r#"{{"value": "{}"}}"#, "x".repeat(100));
    let err = call_with(&rt, &echo, "echo", &big, "{}", &limits).expect_err("too big");
    assert_eq!(err.class, "InvalidArgs", "{err}");
    assert!(err.message.contains("64"), "{}", err.message);
}

#[test]
fn rpc_prefixed_exports_name_methods_and_win_over_plain_ones() {
    let rt = runtime();
    let m = load(
        &rt,
        "prefixed",
        &wat(r#"(data (i32.const 0) "12")
  (func (export "rpc:read") (result i32) (call $output_write (i32.const 0) (i32.const 1)) i32.const 0)
  (func (export "read") (result i32) (call $output_write (i32.const 1) (i32.const 1)) i32.const 0)
  (func (export "rpc:_secret") (result i32) i32.const 0)
  (func (export "rpc:") (result i32) i32.const 0)"#),
    );
    assert_eq!(m.methods().collect::<Vec<_>>(), ["read"]);
    assert_eq!(
        call(&rt, &m, "read", "{}").expect("ok"),
        ["1"],
        "the rpc: export wins"
    );
    assert_eq!(
        call(&rt, &m, "_secret", "{}").expect_err("reserved").class,
        "NoSuchMethod"
    );
    assert_eq!(
        call(&rt, &m, "rpc:read", "{}")
            .expect_err("not a name")
            .class,
        "NoSuchMethod"
    );
}

/// `invoke_keeping` hands back the spent sandbox, which holds its pool slot until dropped (the
/// dispatcher drops it once the reply is queued): with one slot, a second invocation while the
/// first sandbox is kept is refused as `Overloaded`, and succeeds once it is dropped. Nothing
/// of the first call shows in the second.
#[test]
fn a_kept_sandbox_holds_its_pool_slot_until_dropped() {
    let rt = Runtime::new(&EngineSettings {
        max_instances: 1,
        ..EngineSettings::small()
    })
    .expect("runtime");
    let echo = load(&rt, "echo", &std::fs::read(plugin("echo")).expect("read"));
    let executor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("executor");
    executor.block_on(async {
        let ctx: Arc<[u8]> = Arc::from(&b"{}"[..]);
        let first = parse_args(r#"{"value": "first"}"#).expect("args");
        let (answer, spent) = rt
            .invoke_keeping(&echo, "echo", &first, ctx.clone(), &Limits::DEFAULT)
            .await;
        assert_eq!(answer.expect("first call")[0].get(), r#""first""#);

        let second = parse_args(r#"{"value": "second"}"#).expect("args");
        let (refused, _) = rt
            .invoke_keeping(&echo, "echo", &second, ctx.clone(), &Limits::DEFAULT)
            .await;
        let err = refused.expect_err("the only slot is still held");
        assert_eq!(err.class, "Overloaded", "{err}");

        drop(spent);
        let (answer, _) = rt
            .invoke_keeping(&echo, "echo", &second, ctx, &Limits::DEFAULT)
            .await;
        assert_eq!(answer.expect("slot free again")[0].get(), r#""second""#);
    });
}

/// A module that echoes its args (`echo_args`) or spins until stopped (`spin`).
fn echo_and_spin(rt: &Runtime) -> Module {
    load(
        rt,
        "hostile",
        &wat(&format!(
            r#"{ECHO_ARGS}
  (func (export "spin") (result i32) (loop $l (br $l)) i32.const 0)"#
        )),
    )
}

/// Wait, bounded, until the runtime's epoch ticker has gone idle with nothing running.
fn wait_ticker_idle(rt: &Runtime) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rt.epoch_ticker_idle() {
        assert!(
            Instant::now() < deadline,
            "the ticker never went idle with nothing running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The epoch ticker ticks every 10 ms while no guest runs through its ticks and every 2 ms
/// while one does: short calls do not pay for the wake-ups a long guest needs, and the long
/// guest still yields and meets its deadline on time. A loaded machine only ticks less often,
/// which the first bound allows and the second has room for (a 2 ms tick stretched to 6 ms;
/// ticking every 10 ms throughout would give at most 52).
#[test]
fn the_ticker_ticks_fast_only_while_a_guest_runs_through_its_ticks() {
    let rt = runtime();
    let m = echo_and_spin(&rt);
    // A call wakes the idle ticker, which then stays awake for a second with nothing running.
    wait_ticker_idle(&rt);
    assert_eq!(
        call(&rt, &m, "echo_args", r#"{"a":1}"#).expect("echo"),
        [r#"{"a":1}"#]
    );
    let (before, start) = (rt.epoch_ticks(), Instant::now());
    let quiet = Duration::from_millis(400);
    while start.elapsed() < quiet {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ticks, took) = (rt.epoch_ticks() - before, start.elapsed());
    assert!(
        !rt.epoch_ticker_idle(),
        "the ticker went idle within a second"
    );
    let slow_most = took.as_millis() / 10 + 2;
    assert!(
        u128::from(ticks) <= slow_most,
        "{ticks} ticks in {took:?} with no guest running: faster than every 10 ms"
    );

    let limits = Limits {
        timeout: Duration::from_millis(500),
        ..Limits::DEFAULT
    };
    let (before, start) = (rt.epoch_ticks(), Instant::now());
    let err = call_with(&rt, &m, "spin", "{}", "{}", &limits).expect_err("must time out");
    let (ticks, took) = (rt.epoch_ticks() - before, start.elapsed());
    assert_eq!(err.class, "Timeout", "{err}");
    assert!(
        took < limits.timeout + Duration::from_millis(250),
        "timed out only after {took:?}"
    );
    assert!(
        ticks >= 80,
        "only {ticks} ticks in {took:?} while a guest spun: not every 2 ms"
    );
}

/// An idle runtime's epoch ticker sleeps instead of waking 100 times a second, and the next
/// invocation wakes it (it does not wait for the sleeping ticker to notice): a spinning guest
/// started after the ticker fell asleep still times out on time.
#[test]
fn an_idle_ticker_sleeps_and_the_next_invocation_wakes_it() {
    let rt = runtime();
    let m = echo_and_spin(&rt);
    wait_ticker_idle(&rt);
    assert_eq!(
        call(&rt, &m, "echo_args", r#"{"a":1}"#).expect("echo"),
        [r#"{"a":1}"#]
    );
    assert!(
        !rt.epoch_ticker_idle(),
        "an invocation of a few microseconds left the ticker asleep"
    );

    wait_ticker_idle(&rt);
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::DEFAULT
    };
    let started = Instant::now();
    let err = call_with(&rt, &m, "spin", "{}", "{}", &limits).expect_err("must time out");
    let took = started.elapsed();
    assert_eq!(err.class, "Timeout", "{err}");
    assert!(
        took < Duration::from_millis(300) + Duration::from_millis(250),
        "timed out only after {took:?}"
    );
}
