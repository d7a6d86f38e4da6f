//! One invocation of the echo plugin in a fresh sandbox (new Store + instance, WASI context,
//! limits, epoch deadline), with 100 bytes of JSON args. Target: a median of 10 µs or less.
//!
//! Run with `make bench` (or `cargo bench -p warren --bench invoke`); it builds the example
//! plugins first if they are missing.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use warren::runtime::{EngineSettings, Limits, Runtime, parse_args};

#[path = "../../tests/common/example_plugins.rs"]
mod example_plugins;

/// The example echo plugin, or the module `ECHO_MODULE` names, so that two builds of it (another
/// stack size, another toolchain) can be set against each other.
fn echo_module() -> PathBuf {
    if let Some(path) = std::env::var_os("ECHO_MODULE") {
        return path.into();
    }
    example_plugins::example_plugin("echo")
}

const MINIMAL_ECHO: &str = r#"(module
  (import "warren_v1" "input_len" (func $input_len (result i32)))
  (import "warren_v1" "input_read" (func $input_read (param i32)))
  (import "warren_v1" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "echo_args") (result i32)
    (call $input_read (i32.const 0))
    (call $output_write (i32.const 0) (call $input_len))
    i32.const 0))"#;

fn bench(c: &mut Criterion) {
    let runtime = Runtime::new(&EngineSettings::small()).expect("runtime");
    let bytes = std::fs::read(echo_module()).expect("echo.wasm");
    let module = runtime
        .load("echo", &bytes, &Limits::DEFAULT)
        .expect("loads");
    // 100 bytes exactly: {"value":"xxxx…"}
    let args_text = format!("{{\"value\":\"{}\"}}", "x".repeat(100 - 12));
    assert_eq!(args_text.len(), 100);
    let args = parse_args(&args_text).expect("args");
    let context: Arc<[u8]> = Arc::from(&b"{}"[..]);
    let limits = Limits::DEFAULT;
    let out = runtime
        .invoke(&module, "echo", &args, context.clone(), &limits)
        .expect("echo works");
    assert_eq!(out.len(), 1);

    c.bench_function("invoke echo 100B, fresh sandbox", |b| {
        b.iter(|| {
            runtime
                .invoke(&module, "echo", &args, context.clone(), &limits)
                .expect("echo works")
        })
    });

    // The same call on a minimal hand-written module (one page of memory, no WASI imports):
    // the difference to the figure above is what the Rust guest itself costs.
    let minimal = runtime
        .load("minimal", MINIMAL_ECHO.as_bytes(), &limits)
        .expect("minimal module loads");
    c.bench_function("invoke minimal WAT echo 100B (host overhead)", |b| {
        b.iter(|| {
            runtime
                .invoke(&minimal, "echo_args", &args, context.clone(), &limits)
                .expect("works")
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(200).measurement_time(std::time::Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
