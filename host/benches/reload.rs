//! Hot-reload figures, against the real broker (WARREN_BROKER_URL or the local default):
//!
//! 1. write → first reply: a new module version is written (temp file + rename, as build tools
//!    do) and callers poll until a reply comes from it; p50 / p99 / max over the swaps. Target:
//!    p99 ≤ 300 ms, the 100 ms debounce included.
//! 2. restart with 100 handlers: time until the daemon answers, with a cold and then a warm
//!    compiled-module cache. Target: under 1 s from the cache.
//!
//! Run with `cargo bench -p warren --bench reload`; `cargo test --benches` (CI) makes a short run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Map;
use tokio::sync::oneshot;
use warren::client::{Client, Target};
use warren::config::Config;

fn broker() -> String {
    std::env::var("WARREN_BROKER_URL")
        .unwrap_or_else(|_| warren::config::DEFAULT_BROKER_URL.to_owned())
}

fn whoami(tag: &str) -> String {
    let reply = format!("\\22{tag}\\22");
    format!(
        r#"(module
  (import "warren_v1" "output_write" (func $out (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{reply}")
  (func (export "warren_abi_version") (result i32) i32.const 1)
  (func (export "whoami") (result i32) (call $out (i32.const 0) (i32.const {len})) i32.const 0))"#,
        len = tag.len() + 2
    )
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start(config_path: &Path) -> Running {
    let config = Config::load(config_path).expect("config");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(warren::server::run(config, async {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

async fn stop(r: Running) {
    let _ = r.stop.send(());
    let _ = r.task.await;
}

async fn call_whoami(client: &Client, topic: &str) -> Option<String> {
    let args = serde_json::value::to_raw_value(&serde_json::json!({})).ok()?;
    let r = client
        .call(
            &Target::topic(topic),
            "whoami",
            &args,
            &Map::new(),
            Duration::from_secs(5),
        )
        .await
        .ok()?;
    serde_json::from_str(r.get()).ok()
}

async fn wait_until_answers(client: &Client, topic: &str, started: Instant) -> Duration {
    let admin_args = serde_json::value::to_raw_value(&serde_json::json!({})).expect("json");
    loop {
        let r = client
            .call(
                &Target::topic(topic),
                "status",
                &admin_args,
                &Map::new(),
                Duration::from_millis(500),
            )
            .await;
        if r.is_ok() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "daemon never answered"
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; anything else (`cargo test --benches` in CI, --quick) is a
    // short run that only proves the benchmark still works.
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--quick");
    let swaps = if quick { 5 } else { 40 };
    let handlers = if quick { 10 } else { 100 };
    let dir = tempfile::tempdir().expect("tempdir");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let server = format!("bench{}", &id[..8]);
    let client = Client::connect(&broker(), "openstack")
        .await
        .expect("broker reachable");

    // 1. write → first reply.
    let topic = format!("reload_bench_{}", &id[..8]);
    let module = dir.path().join("m.wat");
    std::fs::write(&module, whoami("v0")).expect("write");
    let config_path = dir.path().join("reload.toml");
    std::fs::write(
        &config_path,
        format!("[broker]\nurl = \"{}\"\n[server]\nname = \"{server}\"\ncache_dir = \"\"\n[[handler]]\ntopic = \"{topic}\"\nmodule = \"m.wat\"\n", broker()),
    )
    .expect("config");
    let daemon = start(&config_path);
    wait_until_answers(
        &client,
        &warren::server::admin_topic(&server),
        Instant::now(),
    )
    .await;
    let mut took = Vec::new();
    for i in 1..=swaps {
        let tag = format!("v{i}");
        let written = Instant::now();
        write_atomically(&module, &whoami(&tag));
        loop {
            if call_whoami(&client, &topic).await.as_deref() == Some(tag.as_str()) {
                took.push(written.elapsed());
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(30),
                "version {tag} never answered"
            );
        }
    }
    stop(daemon).await;
    took.sort();
    println!(
        "write → first reply from the new version ({swaps} swaps): p50 {}  p99 {}  max {}  (target p99 ≤ 300 ms)",
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99)),
        ms(took[took.len() - 1])
    );

    // 2. restart with many handlers, cold then warm cache.
    let echo = echo_module();
    let mut text = format!(
        "[broker]\nurl = \"{}\"\n[server]\nname = \"{server}m\"\ncache_dir = \"cache\"\n",
        broker()
    );
    for h in 0..handlers {
        let path = dir.path().join(format!("h{h}.wasm"));
        std::fs::copy(&echo, &path).expect("copy");
        text.push_str(&format!(
            "[[handler]]\ntopic = \"restart_bench_{}_{h}\"\nmodule = \"h{h}.wasm\"\n",
            &id[..8]
        ));
    }
    let many = dir.path().join("many.toml");
    std::fs::write(&many, text).expect("config");
    for label in ["cold cache", "warm cache"] {
        let started = Instant::now();
        let daemon = start(&many);
        let ready = wait_until_answers(
            &client,
            &warren::server::admin_topic(&format!("{server}m")),
            started,
        )
        .await;
        println!(
            "start with {handlers} handlers, {label}: {}  (target from the cache < 1 s)",
            ms(ready)
        );
        stop(daemon).await;
    }
    client.close().await;
}

#[path = "../../tests/common/example_plugins.rs"]
mod example_plugins;

fn echo_module() -> PathBuf {
    example_plugins::example_plugin("echo")
}
