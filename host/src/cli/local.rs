//! `warren invoke` and `warren inspect`: run a handler module locally, no broker involved.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use warren::runtime::{EngineSettings, Limits, Module, Runtime, parse_args};

use super::{EXIT_FAILED, usage_error};

/// Run one method of a handler module locally and print its results.
///
/// Each result is printed as one line of JSON (a streaming method prints several). On failure
/// the error JSON ({"class", "message", "data"}) goes to stderr and the exit code is 1.
#[derive(Args)]
#[command(
    after_help = "Examples:\n  warren invoke plugins/out/echo.wasm echo '{\"value\": 42}'\n  \
warren invoke plugins/out/calc.wasm fib '{\"n\": 5}'\n  \
warren invoke plugins/out/echo.wasm context --context '{\"user_id\": \"u1\"}'"
)]
pub struct InvokeArgs {
    /// Path to the handler module (.wasm, or .wat text).
    module: PathBuf,
    /// Method to call (an exported function of the module).
    method: String,
    /// Arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
    /// Request context as a JSON object (what `_context_*` fields carry over AMQP).
    #[arg(long, default_value = "{}")]
    context: String,
    /// Wall-clock limit for the invocation, in milliseconds.
    #[arg(long, default_value_t = Limits::DEFAULT.timeout.as_millis() as u64)]
    timeout_ms: u64,
    /// Linear-memory cap, in MiB.
    #[arg(long, default_value_t = (Limits::DEFAULT.memory_bytes >> 20) as u64)]
    memory_mib: u64,
}

/// Print a module's ABI version, its callable methods and its initial memory.
///
/// Every call gets a fresh instance whose used memory is reset afterwards; where the kernel
/// lacks PAGEMAP_SCAN (before Linux 6.7) at a cost that grows with the memory's size: a Rust
/// guest linked with the default 1 MiB stack starts at 1088 KiB, the example plugins (64 KiB
/// stack, see plugins/README.md) at 128 KiB.
#[derive(Args)]
#[command(after_help = "Example:\n  warren inspect plugins/out/calc.wasm")]
pub struct InspectArgs {
    /// Path to the handler module (.wasm, or .wat text).
    module: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn load(path: &Path, limits: &Limits) -> anyhow::Result<(Runtime, Module)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let settings = EngineSettings {
        max_memory_bytes: limits
            .memory_bytes
            .max(EngineSettings::small().max_memory_bytes),
        ..EngineSettings::small()
    };
    let runtime = Runtime::new(&settings)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The daemon's default cache directory: a component (Python's is ~18 MB) takes seconds to
    // compile, so repeated `invoke`s of the same file reuse the compiled code.
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|dir| warren::runtime::ModuleCache::new(dir.join("warren/modules")));
    let (module, _) = runtime
        .load_cached(&name, &bytes, limits, cache.as_ref())
        .with_context(|| format!("cannot load {}", path.display()))?;
    Ok((runtime, module))
}

/// `warren invoke`.
pub fn invoke(args: InvokeArgs) -> ExitCode {
    let limits = Limits {
        timeout: Duration::from_millis(args.timeout_ms),
        memory_bytes: (args.memory_mib as usize) << 20,
        ..Limits::DEFAULT
    };
    let context = match parse_context(&args.context) {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let (runtime, module) = match load(&args.module, &limits) {
        Ok(loaded) => loaded,
        Err(e) => return usage_error(e),
    };
    let outcome = parse_args(&args.args)
        .and_then(|a| runtime.invoke(&module, &args.method, &a, context, &limits));
    match outcome {
        Ok(results) => {
            for result in results {
                println!("{}", result.get());
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!(
                "{}",
                serde_json::to_string(&failure).unwrap_or_else(|_| failure.to_string())
            );
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn parse_context(text: &str) -> anyhow::Result<Arc<[u8]>> {
    let value: serde_json::Value =
        serde_json::from_str(text).context("--context is not valid JSON")?;
    anyhow::ensure!(value.is_object(), "--context must be a JSON object");
    Ok(Arc::from(serde_json::to_vec(&value)?))
}

/// `warren inspect`.
pub fn inspect(args: InspectArgs) -> ExitCode {
    let (_runtime, module) = match load(&args.module, &Limits::DEFAULT) {
        Ok(loaded) => loaded,
        Err(e) => return usage_error(e),
    };
    let methods: Vec<&str> = module.methods().collect();
    if args.json {
        let mut doc = serde_json::json!({
            "abi_version": warren::runtime::ABI_VERSION,
            "sha256": module.sha256().iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "methods": methods,
            "initial_memory_bytes": module.initial_memory_bytes(),
        });
        if module.is_component() {
            doc["world"] = warren::runtime::WIT_PACKAGE.into();
        }
        println!("{doc}");
    } else {
        println!("module:      {}", args.module.display());
        if module.is_component() {
            println!("component:   world {}", warren::runtime::WIT_PACKAGE);
        } else {
            println!("abi version: {}", warren::runtime::ABI_VERSION);
        }
        println!("sha256:      {}…", module.hash_prefix());
        // Each call resets what its instance's memory used: without PAGEMAP_SCAN a small memory
        // is a cheap call.
        println!(
            "memory:      {} KiB initial",
            module.initial_memory_bytes() / 1024
        );
        println!(
            "methods:     {}",
            if methods.is_empty() {
                "(none)".to_owned()
            } else {
                methods.join(", ")
            }
        );
    }
    ExitCode::SUCCESS
}
