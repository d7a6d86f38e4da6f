//! The polyglot contract (`plugins/polyglot.md`): ONE table of requests and replies, run
//! against every language's `hello-<lang>` plugin, through `warren invoke` and through the
//! daemon on the real broker. Every language must give the same replies. Also `warren new`:
//! each skeleton builds with its stated command and answers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use warren::client::CallError;

use crate::support::{
    Daemon, DeleteQueues, Rpc, any_server, handler, repo, unique, warren, warren_remote,
};

/// Every language's example plugin (`plugins/out/<name>.wasm`, built by `make
/// polyglot-plugins`). A new language appends its plugin here.
pub const LANGUAGES: &[&str] = &[
    "hello-rust",
    "hello-c",
    "hello-as",
    "hello-py",
    "hello-js",
    "hello-rust-component",
];

/// What a request must get back.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Every result, as JSON text (compared as values): what `invoke` prints and a multicall
    /// receives; a call gets the last.
    Results(&'static [&'static str]),
    /// A failure: class, message, and `data` as JSON text (or none).
    Error(&'static str, &'static str, Option<&'static str>),
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
struct Case {
    method: &'static str,
    args: &'static str,
    context: &'static str,
    expect: Expect,
}

const COUNT_RANGE: &str = "n must be an integer from 0 to 1000";
const CODE_42: Option<&str> = Some(r#"{"code": 42}"#);

const fn case(method: &'static str, args: &'static str, expect: Expect) -> Case {
    Case {
        method,
        args,
        context: "{}",
        expect,
    }
}

/// `count` with an `n` it must refuse.
const fn bad_count(args: &'static str) -> Case {
    case(
        "count",
        args,
        Expect::Error("InvalidArgs", COUNT_RANGE, None),
    )
}

use Expect::{Error, Results};

/// The contract, row by row (plugins/polyglot.md), plus the edges every language must agree on.
const TABLE: &[Case] = &[
    case("echo", r#"{"value": 42}"#, Results(&["42"])),
    case(
        "echo",
        r#"{"value": {"nested": [1, "two", null, true, 2.5, {}]}}"#,
        Results(&[r#"{"nested": [1, "two", null, true, 2.5, {}]}"#]),
    ),
    case(
        "echo",
        r#"{"value": "h\u00e9llo \"w\" \\ \n 😀 \ud83d\ude00"}"#,
        Results(&[r#""héllo \"w\" \\ \n 😀 😀""#]),
    ),
    case("echo", r#"{"value": null}"#, Results(&["null"])),
    case(
        "echo",
        r#"{"before": {"value": 1}, "value": [], "after": "value"}"#,
        Results(&["[]"]),
    ),
    case(
        "echo",
        "{}",
        Error("InvalidArgs", "missing field: value", None),
    ),
    case(
        "echo",
        r#"{"values": 1, "nested": {"value": 2}}"#,
        Error("InvalidArgs", "missing field: value", None),
    ),
    case(
        "fail",
        r#"{"message": "boom"}"#,
        Error("PluginError", "boom", CODE_42),
    ),
    case("fail", "{}", Error("PluginError", "failed", CODE_42)),
    case(
        "fail",
        r#"{"message": "tab\t \"quoted\" \u00fc ✓"}"#,
        Error("PluginError", "tab\t \"quoted\" ü ✓", CODE_42),
    ),
    case(
        "fail",
        r#"{"message": 5}"#,
        Error("PluginError", "failed", CODE_42),
    ),
    case("count", r#"{"n": 3}"#, Results(&["1", "2", "3"])),
    case("count", r#"{"n": 0}"#, Results(&["null"])),
    case("count", r#"{"n": 1}"#, Results(&["1"])),
    bad_count(r#"{"n": -1}"#),
    bad_count(r#"{"n": 1001}"#),
    bad_count(r#"{"n": "x"}"#),
    bad_count(r#"{"n": "3"}"#),
    bad_count(r#"{"n": 2.5}"#),
    bad_count(r#"{"n": null}"#),
    bad_count("{}"),
    Case {
        method: "whoami",
        args: "{}",
        context: r#"{"user_id": "u1"}"#,
        expect: Results(&[r#""u1""#]),
    },
    Case {
        method: "whoami",
        args: "{}",
        context: r#"{"request_id": "req-1"}"#,
        expect: Results(&["null"]),
    },
    case("whoami", "{}", Results(&["null"])),
];

/// A reply normalised for comparison: every result, or the error object.
#[derive(Debug, PartialEq)]
enum Reply {
    Results(Vec<Value>),
    Error(Value),
}

fn parse(json: &str) -> Value {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"))
}

fn error_value(class: &str, message: &str, data: Option<Value>) -> Value {
    let mut v = json!({"class": class, "message": message});
    if let Some(data) = data {
        v["data"] = data;
    }
    v
}

impl Expect {
    /// What `warren invoke` (or a multicall) must see.
    fn all(&self) -> Reply {
        match *self {
            Results(results) => Reply::Results(results.iter().copied().map(parse).collect()),
            Error(class, message, data) => {
                Reply::Error(error_value(class, message, data.map(parse)))
            }
        }
    }

    /// What a `multicall` must see: every result except `null`s. On the wire a `null` result
    /// is a message without a value, like an oslo heartbeat, so clients skip it (a method with
    /// no results answers a call with `null` and a multicall with nothing).
    fn multicall(&self) -> Reply {
        match self.all() {
            Reply::Results(all) => {
                Reply::Results(all.into_iter().filter(|v| !v.is_null()).collect())
            }
            err => err,
        }
    }

    /// What a `call` must see: the last result.
    fn call(&self) -> Reply {
        match self.all() {
            Reply::Results(mut all) => Reply::Results(all.pop().into_iter().collect()),
            err => err,
        }
    }
}

/// Build every language's plugin from source, once per test process, and return the module of
/// `name`. A missing toolchain fails with what to install.
pub fn polyglot_plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new("make")
            .args(["-s", "--no-print-directory", "polyglot-plugins"])
            .current_dir(repo())
            .output()
            .expect("`make` runs (install make)");
        assert!(
            out.status.success(),
            "`make polyglot-plugins` failed. The polyglot plugins need the Rust target \
             wasm32-wasip1, clang for wasm32-wasi (Debian: apt-get install clang lld wasi-libc \
             libclang-rt-14-dev-wasm32) and Node.js with npm (apt-get install nodejs npm); \
             `.ci/run` installs them.\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let path = repo().join("plugins/out").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// `warren invoke` → (reply, stderr).
fn invoke(module: &Path, case: &Case) -> (Reply, String) {
    let out = warren()
        .arg("invoke")
        .arg(module)
        .args([case.method, case.args, "--context", case.context])
        .output()
        .expect("warren runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let reply = match out.status.code() {
        Some(0) => Reply::Results(stdout.lines().map(parse).collect()),
        Some(1) => {
            let last = stderr.lines().last().unwrap_or_default();
            let v = parse(last);
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            Reply::Error(error_value(
                &field("class"),
                &field("message"),
                v.get("data").cloned(),
            ))
        }
        other => {
            panic!("warren invoke exited with {other:?}\nstdout:\n{stdout}\nstderr:\n{stderr}")
        }
    };
    (reply, stderr)
}

/// A daemon's answer to a call or one multicall item, normalised.
fn remote(outcome: Result<String, CallError>) -> Reply {
    match outcome {
        Ok(result) => Reply::Results(vec![parse(&result)]),
        Err(CallError::Remote(e)) => Reply::Error(error_value(
            &e.class,
            &e.message,
            e.kwargs.get("data").cloned(),
        )),
        Err(other) => panic!("expected a reply or a remote error, got {other:?}"),
    }
}

#[test]
fn every_language_answers_the_table_through_invoke() {
    let mut failures = Vec::new();
    for lang in LANGUAGES {
        let module = polyglot_plugin(lang);
        for case in TABLE {
            let (reply, stderr) = invoke(&module, case);
            let want = case.expect.all();
            if reply != want {
                failures.push(format!(
                    "{lang}: {} {} (context {}):\n  got  {reply:?}\n  want {want:?}\n  stderr: {}",
                    case.method,
                    case.args,
                    case.context,
                    stderr.trim()
                ));
            }
            if case.method == "count" && case.args == r#"{"n": 3}"# {
                let logged = stderr
                    .lines()
                    .any(|l| l.contains("INFO") && l.contains("counting to 3"));
                if !logged {
                    failures.push(format!(
                        "{lang}: count did not log `counting to 3` at info:\n{stderr}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invoke_streams_the_largest_count() {
    for lang in LANGUAGES {
        let module = polyglot_plugin(lang);
        let (reply, _) = invoke(&module, &case("count", r#"{"n": 1000}"#, Results(&[])));
        let want: Vec<Value> = (1..=1000).map(Value::from).collect();
        assert_eq!(reply, Reply::Results(want), "{lang}");
    }
}

#[test]
fn every_language_answers_the_table_through_the_daemon() {
    let prefix = unique("it_poly");
    let server = unique("d");
    let topics: Vec<String> = LANGUAGES
        .iter()
        .map(|lang| format!("{prefix}_{}", lang.replace('-', "_")))
        .collect();
    let _cleanup: Vec<DeleteQueues> = topics
        .iter()
        .map(|t| DeleteQueues::rpc(t, &[&server]))
        .collect();
    // Private copies: the daemon watches its modules, and other tests rebuild plugins/out.
    let modules = tempfile::tempdir().expect("tempdir");
    let handlers: String = LANGUAGES
        .iter()
        .zip(&topics)
        .map(|(lang, topic)| {
            let module = modules.path().join(format!("{lang}.wasm"));
            std::fs::copy(polyglot_plugin(lang), &module).expect("copy the module");
            handler(topic, &module, "")
        })
        .collect();
    let daemon = Daemon::start(&server, &handlers);
    let rpc = Rpc::connect();
    let timeout = Duration::from_secs(10);

    let mut failures = Vec::new();
    for (lang, topic) in LANGUAGES.iter().zip(&topics) {
        let target = any_server(topic);
        for case in TABLE {
            let reply = remote(rpc.call_with_context(
                &target,
                case.method,
                case.args,
                case.context,
                timeout,
            ));
            let want = case.expect.call();
            if reply != want {
                failures.push(format!(
                    "{lang} call: {} {} (context {}):\n  got  {reply:?}\n  want {want:?}",
                    case.method, case.args, case.context
                ));
            }
            if case.method != "count" {
                continue;
            }
            // A multicall gets every result in order (or the error).
            let items: Vec<Reply> = rpc
                .multicall(&target, case.method, case.args, timeout)
                .into_iter()
                .map(remote)
                .collect();
            let only_error = match items.as_slice() {
                [Reply::Error(e)] => Some(e.clone()),
                _ => None,
            };
            let got = match only_error {
                Some(e) => Reply::Error(e),
                None => Reply::Results(
                    items
                        .into_iter()
                        .flat_map(|item| match item {
                            Reply::Results(r) => r,
                            Reply::Error(e) => vec![json!({"unexpected error": e})],
                        })
                        .collect(),
                ),
            };
            let want = case.expect.multicall();
            if got != want {
                failures.push(format!(
                    "{lang} multicall: {} {}:\n  got  {got:?}\n  want {want:?}",
                    case.method, case.args
                ));
            }
        }
        // The guest's log line reaches the daemon's log, at info, naming the handler.
        let logged = daemon.wait_log(&format!("INFO&counting to 3&{topic}"), timeout);
        if logged.is_none() {
            failures.push(format!(
                "{lang}: no `counting to 3` at info in the daemon log"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\ndaemon log:\n{}",
        failures.join("\n"),
        daemon.log_text()
    );

    // The CLI client sees the same as the library, for one language as a spot check.
    let out = warren_remote(&[
        "multicall",
        &topics[0],
        "count",
        r#"{"n": 3}"#,
        "--timeout",
        "10",
    ]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "1\n2\n3"),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// `warren new`: each language's skeleton builds with the command its README states, and its
// handler answers through `warren invoke`.

fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `warren new --lang <lang> demo-<lang> <dir>`; returns the project directory.
fn new_project(lang: &str, parent: &Path) -> PathBuf {
    let dir = parent.join(lang);
    let name = format!("demo-{lang}");
    run(
        &format!("warren new --lang {lang}"),
        warren()
            .args(["new", "--lang", lang, name.as_str()])
            .arg(&dir),
    );
    dir
}

fn assert_skeleton_answers(module: &Path) {
    let echo = case(
        "echo",
        r#"{"value": {"a": [1, "b"]}}"#,
        Results(&[r#"{"a": [1, "b"]}"#]),
    );
    let missing = case(
        "echo",
        "{}",
        Error("InvalidArgs", "missing field: value", None),
    );
    let hello = Case {
        method: "hello",
        args: "{}",
        context: r#"{"user_id": "u1"}"#,
        expect: Results(&[r#""hello, u1""#]),
    };
    let stranger = case("hello", "{}", Results(&[r#""hello, stranger""#]));
    for c in [echo, missing, hello, stranger] {
        let (reply, stderr) = invoke(module, &c);
        assert_eq!(
            reply,
            c.expect.all(),
            "{} {c:?}\n{stderr}",
            module.display()
        );
    }
}

#[test]
fn new_rust_skeleton_builds_offline_and_answers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = new_project("rust", tmp.path());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The README's command, offline (the SDK is a path dependency); a target directory shared
    // across runs keeps it quick.
    run(
        "cargo build (rust skeleton)",
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--offline",
            ])
            .env("CARGO_TARGET_DIR", repo().join("target/new-skeletons"))
            .current_dir(&dir),
    );
    let module = repo().join("target/new-skeletons/wasm32-wasip1/release/demo_rust.wasm");
    assert_skeleton_answers(&module);
    // The skeleton's .cargo/config.toml (a 64 KiB stack) applies outside this repository too:
    // two pages of memory, where Rust's 1 MiB default stack makes seventeen.
    let out = warren()
        .args(["inspect", "--json"])
        .arg(&module)
        .output()
        .expect("warren runs");
    let v: Value = serde_json::from_slice(&out.stdout).expect("inspect --json");
    assert_eq!(v["initial_memory_bytes"], 2 * 65536, "{v}");
}

#[test]
fn new_c_skeleton_builds_and_answers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = new_project("c", tmp.path());
    run("make (c skeleton)", Command::new("make").current_dir(&dir));
    assert_skeleton_answers(&dir.join("demo-c.wasm"));
}

#[test]
fn new_assemblyscript_skeleton_builds_and_answers() {
    // Build the polyglot plugins first: hello-as's `npm ci` fills npm's cache, so this install
    // needs nothing new from the registry.
    polyglot_plugin("hello-as");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = new_project("assemblyscript", tmp.path());
    run(
        "npm install (assemblyscript skeleton)",
        Command::new("npm")
            .args(["install", "--prefer-offline", "--no-audit", "--no-fund"])
            .current_dir(&dir),
    );
    run(
        "npm run build (assemblyscript skeleton)",
        Command::new("npm").args(["run", "build"]).current_dir(&dir),
    );
    assert_skeleton_answers(&dir.join("build/demo-assemblyscript.wasm"));
}

#[test]
fn new_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (args, needle) in [
        (vec!["--lang", "c", "Bad Name"], "invalid name"),
        (
            vec!["--lang", "c", "demo", "--sdk-path", "/nonexistent"],
            "/nonexistent",
        ),
    ] {
        let out = warren()
            .arg("new")
            .args(&args)
            .current_dir(tmp.path())
            .output()
            .expect("warren runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // Nothing was written, and an existing non-empty directory is never overwritten.
    assert!(!tmp.path().join("demo").exists());
    std::fs::write(tmp.path().join("keep.txt"), "mine").expect("write");
    let out = warren()
        .args(["new", "--lang", "c", "demo"])
        .arg(tmp.path())
        .output()
        .expect("warren runs");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("keep.txt")).expect("read"),
        "mine"
    );
}

#[test]
fn new_python_skeleton_builds_and_answers() {
    // The README's componentize-py command, run with the pinned componentize-py that building
    // hello-py installed (plugins/hello-py/.venv): the same version the template pins.
    polyglot_plugin("hello-py");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = new_project("python", tmp.path());
    let sdk = repo().join("guest-sdk/wit");
    run(
        "componentize-py (python skeleton)",
        Command::new(repo().join("plugins/hello-py/.venv/bin/componentize-py"))
            .arg("-d")
            .arg(&sdk)
            .args(["-w", "handler-world", "componentize", "app", "-o"])
            .arg("demo-python.wasm")
            .current_dir(&dir),
    );
    assert_skeleton_answers(&dir.join("demo-python.wasm"));
}

#[test]
fn new_javascript_skeleton_builds_and_answers() {
    // hello-js's `npm ci` fills npm's cache, so this install needs nothing new.
    polyglot_plugin("hello-js");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = new_project("javascript", tmp.path());
    run(
        "npm install (javascript skeleton)",
        Command::new("npm")
            .args(["install", "--prefer-offline", "--no-audit", "--no-fund"])
            .current_dir(&dir),
    );
    run(
        "npm run build (javascript skeleton)",
        Command::new("npm").args(["run", "build"]).current_dir(&dir),
    );
    assert_skeleton_answers(&dir.join("demo-javascript.wasm"));
}
