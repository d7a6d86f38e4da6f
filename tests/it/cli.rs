//! The `warren` binary's local commands, run as a user would.

use crate::support::{plugin, warren, wat_file};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = warren().args(args).output().expect("warren runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invoke_echo_prints_42() {
    let echo = plugin("echo");
    let (code, out, err) = run(&[
        "invoke",
        echo.to_str().expect("utf8"),
        "echo",
        r#"{"value": 42}"#,
    ]);
    assert_eq!((code, out.as_str()), (0, "42\n"), "stderr: {err}");
}

#[test]
fn invoke_streams_one_line_per_result() {
    let calc = plugin("calc");
    let (code, out, _) = run(&["invoke", calc.to_str().expect("utf8"), "fib", r#"{"n": 4}"#]);
    assert_eq!((code, out.as_str()), (0, "0\n1\n1\n2\n"));
}

#[test]
fn invoke_failure_exits_nonzero_with_error_json() {
    let calc = plugin("calc");
    let (code, out, err) = run(&[
        "invoke",
        calc.to_str().expect("utf8"),
        "div",
        r#"{"a": 1, "b": 0}"#,
    ]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    let last = err.lines().last().expect("error line");
    let v: serde_json::Value = serde_json::from_str(last).expect("error JSON on stderr");
    assert_eq!(v["class"], "ZeroDivisionError");
}

#[test]
fn invoke_with_context() {
    let echo = plugin("echo");
    let (code, out, _) = run(&[
        "invoke",
        echo.to_str().expect("utf8"),
        "context",
        "--context",
        r#"{"user_id": "u9"}"#,
    ]);
    assert_eq!(code, 0);
    assert!(out.contains(r#""user_id":"u9""#), "{out}");
}

#[test]
fn inspect_lists_methods_and_abi() {
    let calc = plugin("calc");
    let (code, out, _) = run(&["inspect", calc.to_str().expect("utf8"), "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["abi_version"], 1);
    let methods: Vec<&str> = v["methods"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    for m in ["add", "div", "fib", "stats"] {
        assert!(methods.contains(&m), "{methods:?}");
    }
    // The repository's .cargo/config.toml gives Rust guests a 64 KiB stack instead of 1 MiB:
    // two pages, where Rust's default makes seventeen (which, on a kernel without
    // PAGEMAP_SCAN, every call resets).
    assert_eq!(v["initial_memory_bytes"], 2 * 65536, "{out}");
    let (code, text, _) = run(&["inspect", calc.to_str().expect("utf8")]);
    assert_eq!(code, 0);
    assert!(text.contains("memory:      128 KiB initial"), "{text}");
}

/// Arguments and a context nested as deep as the daemon's decoder admits (64 levels) fit in
/// the example plugins' 64 KiB guest stack: `context` parses the context into a tree and
/// serialises it back, recursing once per level.
#[test]
fn deepest_nesting_the_wire_admits_fits_the_guest_stack() {
    let echo = plugin("echo");
    let echo = echo.to_str().expect("utf8");
    let depth = 63; // inside the context object, which is the 64th level
    let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let args = format!(r#"{{"value": {nested}}}"#);
    let (code, out, err) = run(&["invoke", echo, "echo", &args]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), nested);
    let context = format!(r#"{{"deep": {nested}}}"#);
    let (code, out, err) = run(&["invoke", echo, "context", "--context", &context]);
    assert_eq!(code, 0, "{err}");
    let got: serde_json::Value = serde_json::from_str(&out).expect("json");
    let want: serde_json::Value = serde_json::from_str(&nested).expect("json");
    assert_eq!(got["deep"], want, "{out}");
}

/// 300 log lines against the cap of 256 per invocation, then an answer or a trap: 44 lines
/// are dropped either way, and the operator is told so once, also when the guest trapped
/// (the case most worth reading the log for).
const LOG_FLOOD: &str = r#"(module
  (import "warren_v1" "log" (func $log (param i32 i32 i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "flood line")
  (data (i32.const 96) "\"ok\"")
  (func $flood
    (local $left i32)
    (local.set $left (i32.const 300))
    (loop $l
      (call $log (i32.const 2) (i32.const 64) (i32.const 10))
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $l (local.get $left))))
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "answer") (result i32)
    (call $flood)
    (call $output_write (i32.const 96) (i32.const 4))
    i32.const 0)
  (func (export "trap") (result i32)
    (call $flood)
    unreachable))"#;

#[test]
fn log_lines_over_the_cap_are_reported_also_when_the_guest_traps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let module = wat_file(dir.path(), "flood", LOG_FLOOD);
    let module = module.to_str().expect("utf8");
    for (method, want_code) in [("answer", 0), ("trap", 1)] {
        let (code, out, err) = run(&["invoke", module, method, "{}"]);
        assert_eq!(code, want_code, "{method}: {out}\n{err}");
        assert_eq!(err.matches("flood line").count(), 256, "{method}: {err}");
        let warnings: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("guest log lines dropped over the per-invocation cap"))
            .collect();
        assert_eq!(warnings.len(), 1, "{method}: {err}");
        assert!(warnings[0].contains("dropped=44"), "{method}: {err}");
    }
}

#[test]
fn bad_module_path_is_a_usage_error() {
    let (code, _, err) = run(&["invoke", "/nonexistent/x.wasm", "echo"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/x.wasm"), "{err}");
}

#[test]
fn help_teaches_with_examples() {
    let (code, out, _) = run(&["invoke", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warren invoke") && out.contains("echo"),
        "{out}"
    );
}
