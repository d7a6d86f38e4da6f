//! The component loader (guest-sdk/wit): components built from source (Rust on wasm32-wasip2,
//! Python, JavaScript) through the library, `warren invoke`/`inspect` and the daemon; hostile
//! components (spinning, growing, reading what they were not granted, sleeping) stopped by the
//! same limits as modules; hot reload between a module and a component; the compiled cache.
//! The polyglot table (polyglot.rs) runs the three example components too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use warren::runtime::{
    CacheOutcome, EngineSettings, Failure, Grants, Limits, LoadError, Module, ModuleCache, Preopen,
    Runtime, parse_args,
};

use crate::polyglot::polyglot_plugin;
use crate::support::{
    Daemon, DeleteQueues, Rpc, any_server, eventually, handler, repo, unique, warren, whoami_wat,
};

const CALL: Duration = Duration::from_secs(20);
const RELOAD: Duration = Duration::from_secs(60);

/// `hello-rust-component` built with its `hostile` feature (extra methods that spin, grow,
/// read files and env, sleep, count their instance's calls), into a target directory of its own.
fn hostile_component() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let project = repo().join("plugins/hello-rust-component");
            let target = project.join("target/hostile");
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release", "--target", "wasm32-wasip2"])
                .args(["--features", "hostile", "--manifest-path"])
                .arg(project.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .status()
                .expect("cargo runs");
            assert!(
                status.success(),
                "building the hostile component failed (needs `rustup target add wasm32-wasip2`)"
            );
            target.join("wasm32-wasip2/release/hello_rust_component.wasm")
        })
        .clone()
}

fn runtime() -> Runtime {
    Runtime::new(&EngineSettings::small()).expect("runtime")
}

fn load(rt: &Runtime, path: &Path, limits: &Limits) -> Module {
    let bytes = std::fs::read(path).expect("read component");
    rt.load("component", &bytes, limits)
        .unwrap_or_else(|e| panic!("{} loads: {e}", path.display()))
}

fn call(
    rt: &Runtime,
    m: &Module,
    method: &str,
    args: &str,
    limits: &Limits,
) -> Result<Vec<String>, Failure> {
    let args = parse_args(args)?;
    rt.invoke(m, method, &args, Arc::from(&b"{}"[..]), limits)
        .map(|rs| rs.iter().map(|r| r.get().to_owned()).collect())
}

#[test]
fn a_rust_component_answers_through_the_library_like_a_module() {
    let rt = runtime();
    let m = load(
        &rt,
        &polyglot_plugin("hello-rust-component"),
        &Limits::DEFAULT,
    );
    assert!(m.is_component());
    assert_eq!(
        m.methods().collect::<Vec<_>>(),
        ["count", "echo", "fail", "whoami"]
    );
    let limits = Limits::DEFAULT;
    assert_eq!(
        call(&rt, &m, "count", r#"{"n": 3}"#, &limits).expect("count"),
        ["1", "2", "3"]
    );
    assert_eq!(
        call(&rt, &m, "count", r#"{"n": 0}"#, &limits).expect("count"),
        ["null"]
    );
    let err = call(&rt, &m, "fail", r#"{"message": "boom"}"#, &limits).expect_err("fails");
    assert_eq!(
        (err.class.as_str(), err.message.as_str()),
        ("PluginError", "boom")
    );
    assert_eq!(err.data, Some(serde_json::json!({"code": 42})));
    // Not in the method list: the host answers before instantiating anything.
    let err = call(&rt, &m, "nope", "{}", &limits).expect_err("no such method");
    assert_eq!(err.class, "NoSuchMethod", "{err}");
    // The host's own checks still come first.
    let err = call(&rt, &m, "echo", "[1]", &limits).expect_err("not an object");
    assert_eq!(err.class, "InvalidArgs", "{err}");
    let small = Limits {
        max_result_bytes: 8,
        ..Limits::DEFAULT
    };
    let err = call(&rt, &m, "echo", r#"{"value": "0123456789"}"#, &small).expect_err("cap");
    assert_eq!(err.class, "ResultTooLarge", "{err}");
    let err = call(&rt, &m, "count", r#"{"n": 100}"#, &small).expect_err("cap");
    assert_eq!(err.class, "ResultTooLarge", "{err}");
}

/// A component's next sandbox is made once a call is answered, as a module's is, and it still
/// serves exactly one call (`calls` counts the calls its instance served) with that call's
/// context. The pool has room for one instance, so a call that made its own beside the one
/// made ahead would fail as `Overloaded`.
#[test]
fn a_components_next_sandbox_is_made_ahead_and_serves_one_call() {
    let rt = Runtime::new(&EngineSettings {
        max_instances: 1,
        max_prepared: 1,
        ..EngineSettings::small()
    })
    .expect("runtime");
    let m = load(&rt, &hostile_component(), &Limits::DEFAULT);
    let run = |method: &'static str, context: &'static [u8]| {
        let rt = &rt;
        let m = &m;
        async move {
            let args = parse_args("{}").expect("args");
            let (answer, spent) = rt
                .invoke_keeping(m, method, &args, Arc::from(context), &Limits::DEFAULT)
                .await;
            // Taken by this call, if there was one; the next is made only below.
            let left = rt.prepared_sandboxes();
            spent.release().prepare(rt).await;
            let results = answer.unwrap_or_else(|e| panic!("{method}: {e}"));
            (results[0].get().to_owned(), left)
        }
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("executor")
        .block_on(async {
            assert_eq!(rt.prepared_sandboxes(), 0);
            assert_eq!(run("calls", b"{}").await, ("1".to_owned(), 0));
            assert_eq!(
                rt.prepared_sandboxes(),
                1,
                "made once the first call was answered"
            );
            for i in 0..3 {
                assert_eq!(
                    run("calls", b"{}").await,
                    ("1".to_owned(), 0),
                    "call {i}: a fresh instance, the one made ahead"
                );
                assert_eq!(rt.prepared_sandboxes(), 1, "after call {i}");
            }
            // Made before its call, it still gets the call's context.
            assert_eq!(
                run("whoami", br#"{"user_id": "u1"}"#).await,
                (r#""u1""#.to_owned(), 0)
            );
        });
}

#[test]
fn inspect_and_invoke_show_components_for_every_language() {
    for lang in ["hello-rust-component", "hello-py", "hello-js"] {
        let path = polyglot_plugin(lang);
        let out = warren()
            .args(["inspect", "--json"])
            .arg(&path)
            .output()
            .expect("warren inspect");
        assert!(out.status.success(), "{lang}: {out:?}");
        let doc: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(doc["world"], "warren:handler@1.0.0", "{lang}: {doc}");
        assert_eq!(
            doc["methods"],
            serde_json::json!(["count", "echo", "fail", "whoami"]),
            "{lang}: {doc}"
        );
        let out = warren()
            .args(["invoke", "--context", r#"{"user_id": "u7"}"#])
            .arg(&path)
            .args(["whoami", "{}"])
            .output()
            .expect("warren invoke");
        assert!(out.status.success(), "{lang}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            r#""u7""#,
            "{lang}"
        );
    }
}

#[test]
fn a_spinning_component_is_stopped_by_the_timeout() {
    let rt = runtime();
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..Limits::DEFAULT
    };
    let m = load(&rt, &hostile_component(), &limits);
    let start = Instant::now();
    let err = call(&rt, &m, "spin", "{}", &limits).expect_err("stopped");
    assert_eq!(err.class, "Timeout", "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // The next call gets a fresh instance and works.
    assert_eq!(
        call(&rt, &m, "echo", r#"{"value": 1}"#, &limits).expect("echo"),
        ["1"]
    );
}

#[test]
fn a_component_growing_past_its_cap_fails_with_memory_limit_exceeded() {
    let rt = runtime();
    let limits = Limits {
        memory_bytes: 16 << 20,
        ..Limits::DEFAULT
    };
    let m = load(&rt, &hostile_component(), &limits);
    // Within the cap it works...
    assert_eq!(
        call(&rt, &m, "grow", r#"{"mib": 2}"#, &limits).expect("2 MiB fits"),
        [(2u64 << 20).to_string()]
    );
    // ...past it the guest is stopped with the host's class.
    let err = call(&rt, &m, "grow", r#"{"mib": 64}"#, &limits).expect_err("capped");
    assert_eq!(err.class, "MemoryLimitExceeded", "{err}");
}

#[test]
fn a_component_reaches_only_the_files_and_env_it_was_granted() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("note.txt"), "granted text").expect("write");
    // The test process's own environment has PATH; the guest must not see it.
    let host_path = std::env::var("PATH").unwrap_or_default();
    assert!(!host_path.is_empty());

    let none = Limits::DEFAULT;
    let m = load(&rt, &hostile_component(), &none);
    let err = call(&rt, &m, "read_file", r#"{"path": "/data/note.txt"}"#, &none)
        .expect_err("nothing is granted");
    assert_eq!(err.class, "IoError", "{err}");
    let host_file = dir.path().join("note.txt");
    let args = serde_json::json!({"path": host_file}).to_string();
    let err = call(&rt, &m, "read_file", &args, &none).expect_err("no host path either");
    assert_eq!(err.class, "IoError", "{err}");
    assert_eq!(
        call(&rt, &m, "env", r#"{"name": "PATH"}"#, &none).expect("env"),
        ["null"],
        "the host's environment must not leak"
    );

    let granted = Limits {
        grants: Some(Arc::new(Grants {
            env: vec![("GREETING".into(), "hi".into())],
            dirs: vec![Preopen {
                host: dir.path().to_owned(),
                guest: "/data".into(),
                writable: false,
            }],
        })),
        ..Limits::DEFAULT
    };
    assert_eq!(
        call(
            &rt,
            &m,
            "read_file",
            r#"{"path": "/data/note.txt"}"#,
            &granted
        )
        .expect("read"),
        [r#""granted text""#]
    );
    assert_eq!(
        call(&rt, &m, "env", r#"{"name": "GREETING"}"#, &granted).expect("env"),
        [r#""hi""#]
    );
    assert_eq!(
        call(&rt, &m, "env", r#"{"name": "PATH"}"#, &granted).expect("env"),
        ["null"]
    );
    // Read-only unless `writable`.
    let err = call(
        &rt,
        &m,
        "write_file",
        r#"{"path": "/data/new.txt"}"#,
        &granted,
    )
    .expect_err("read-only");
    assert_eq!(err.class, "IoError", "{err}");
    assert!(!dir.path().join("new.txt").exists());
}

#[test]
fn a_sleeping_component_fails_at_once_instead_of_blocking() {
    let rt = runtime();
    let m = load(&rt, &hostile_component(), &Limits::DEFAULT);
    let start = Instant::now();
    let err = call(&rt, &m, "sleep", "{}", &Limits::DEFAULT).expect_err("refused");
    assert_eq!(err.class, "GuestTrap", "{err}");
    assert!(err.message.contains("may not block"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_component_outside_the_world_fails_to_load_naming_what_is_missing() {
    let rt = runtime();
    // The smallest valid component: magic, version 0x0d, layer 1, no sections.
    let empty = b"\0asm\x0d\x00\x01\x00";
    let err = rt
        .load("empty", empty, &Limits::DEFAULT)
        .err()
        .expect("refused");
    assert!(matches!(err, LoadError::World(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("warren:handler/handler@1.0.0"),
        "names the missing export: {text}"
    );
    // A core module is still told apart and loaded by the other loader.
    let wat = br#"(module (memory (export "memory") 1)
  (func (export "warren_abi_version") (result i32) i32.const 1))"#;
    let m = rt.load("core", wat, &Limits::DEFAULT).expect("core module");
    assert!(!m.is_component());
}

#[test]
fn the_compiled_cache_serves_a_component_on_the_second_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ModuleCache::new(dir.path().join("cache"));
    let bytes = std::fs::read(polyglot_plugin("hello-py")).expect("read");
    let first = Instant::now();
    let (m, outcome) = runtime()
        .load_cached("py", &bytes, &Limits::DEFAULT, Some(&cache))
        .expect("load");
    let compiled = first.elapsed();
    assert_eq!(outcome, CacheOutcome::Miss);
    assert!(m.is_component());
    let entries: Vec<String> = std::fs::read_dir(cache.dir())
        .expect("cache dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries.len() == 1 && entries[0].ends_with(".component.cwasm"),
        "one component entry: {entries:?}"
    );

    // A fresh runtime (as after a restart) takes it from the cache, and it works.
    let rt = runtime();
    let second = Instant::now();
    let (m, outcome) = rt
        .load_cached("py", &bytes, &Limits::DEFAULT, Some(&cache))
        .expect("load");
    let cached = second.elapsed();
    assert_eq!(outcome, CacheOutcome::Hit);
    assert_eq!(
        call(&rt, &m, "echo", r#"{"value": [1]}"#, &Limits::DEFAULT).expect("echo"),
        ["[1]"]
    );
    eprintln!("hello-py: compiled in {compiled:?}, from the cache in {cached:?}");
    assert!(cached < compiled, "{cached:?} vs {compiled:?}");
}

#[test]
fn hot_reload_swaps_a_module_for_a_component_and_back() {
    let topic = unique("it_comp_reload");
    let server = unique("d");
    let _queues = DeleteQueues::rpc(&topic, &[&server]);
    let dir = tempfile::tempdir().expect("tempdir");
    let module = dir.path().join("handler.wasm");
    let core = whoami_wat("core").into_bytes();
    std::fs::write(&module, &core).expect("write");
    let daemon = Daemon::start_with(
        &server,
        &handler(&topic, &module, ""),
        "cache_dir = \"cache\"",
    );
    let rpc = Rpc::connect();
    let target = any_server(&topic);
    let whoami = || {
        rpc.call_with_context(&target, "whoami", "{}", r#"{"user_id": "u9"}"#, CALL)
            .ok()
    };
    assert_eq!(
        whoami().as_deref(),
        Some(r#""core""#),
        "{}",
        daemon.log_text()
    );

    // The component answers `whoami` with the context's user_id.
    let component = std::fs::read(polyglot_plugin("hello-rust-component")).expect("read");
    replace(&module, &component);
    let served = eventually(RELOAD, || (whoami()? == r#""u9""#).then_some(()));
    assert!(
        served.is_some(),
        "component never served; log:\n{}",
        daemon.log_text()
    );
    let count: Vec<String> = rpc
        .multicall(&target, "count", r#"{"n": 2}"#, CALL)
        .into_iter()
        .map(|r| r.expect("result"))
        .collect();
    assert_eq!(count, ["1", "2"]);

    replace(&module, whoami_wat("core2").as_bytes());
    let served = eventually(RELOAD, || (whoami()? == r#""core2""#).then_some(()));
    assert!(
        served.is_some(),
        "module never served again; log:\n{}",
        daemon.log_text()
    );
}

/// Replace `path` atomically (write a temp file next to it, rename over).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Answers every outbound call with `"answered"` and records what it was sent.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, String, String)>>);

impl warren::runtime::Outbound for Recorder {
    fn send(
        &self,
        m: warren::runtime::outbound::Message,
    ) -> Result<Option<Box<serde_json::value::RawValue>>, Failure> {
        let is_call = m.kind == warren::runtime::outbound::Kind::Call;
        if let Ok(mut sent) = self.0.lock() {
            sent.push((m.kind.as_str().to_owned(), m.topic, m.method));
        }
        // As the daemon's sender: a result for a call, nothing for the others.
        Ok(is_call
            .then(|| serde_json::value::RawValue::from_string(r#""answered""#.to_owned()).ok())
            .flatten())
    }
}

#[test]
fn components_and_modules_send_outbound_rpc_within_their_grants() {
    let rt = runtime();
    let recorder = Arc::new(Recorder::default());
    let granted = Limits {
        rpc: Some(Arc::new(warren::runtime::RpcGrants {
            call: vec!["calc".into()],
            notify: vec!["notifications".into()],
            ..Default::default()
        })),
        ..Limits::DEFAULT
    };
    let relay = |m: &Module, limits: &Limits, args: &str| {
        let args = parse_args(args).expect("args");
        let sender = recorder.clone() as Arc<dyn warren::runtime::Outbound>;
        rt.invoke_with(
            m,
            "relay",
            &args,
            Arc::from(&b"{}"[..]),
            limits,
            Some(sender),
        )
        .map(|rs| rs.iter().map(|r| r.get().to_owned()).collect::<Vec<_>>())
    };

    // The component's `relay` passes its request through the WIT `send`.
    let component = load(&rt, &hostile_component(), &granted);
    let call =
        r#"{"kind": "call", "request": {"topic": "calc", "method": "add", "args": {"a": 1}}}"#;
    assert_eq!(
        relay(&component, &granted, call).expect("granted"),
        [r#""answered""#]
    );
    let err = relay(&component, &Limits::DEFAULT, call).expect_err("not granted");
    assert_eq!(err.class, "Forbidden", "{err:?}");
    let cast = r#"{"kind": "cast", "request": {"topic": "calc", "method": "add"}}"#;
    let err = relay(&component, &granted, cast).expect_err("call grant only");
    assert_eq!(err.class, "Forbidden", "{err:?}");
    let note = r#"{"kind": "notify", "request": {"event_type": "e", "payload": {}}}"#;
    assert_eq!(relay(&component, &granted, note).expect("notify"), ["null"]);

    // The same through the core-module imports (the example api plugin).
    let api = rt
        .load(
            "api",
            &std::fs::read(crate::support::plugin("api")).expect("read"),
            &granted,
        )
        .expect("api loads");
    let args = r#"{"topic": "calc", "method": "add", "args": {"a": 1}}"#;
    assert_eq!(
        relay(&api, &granted, args).expect("granted"),
        [r#""answered""#]
    );
    let err = relay(&api, &Limits::DEFAULT, args).expect_err("not granted");
    assert_eq!(err.class, "Forbidden", "{err:?}");

    let sent = recorder.0.lock().expect("lock").clone();
    let expected = [
        ("call", "calc", "add"),
        ("notify", "notifications", "e"),
        ("call", "calc", "add"),
    ];
    let sent: Vec<(&str, &str, &str)> = sent
        .iter()
        .map(|(k, t, m)| (k.as_str(), t.as_str(), m.as_str()))
        .collect();
    assert_eq!(sent, expected, "refused requests are never sent");
}
