//! The Wasm handler runtime: one `Engine`, modules compiled once and pre-linked, and a fresh
//! `Store` + instance for every invocation.
//!
//! Invariant: a `Store` never outlives one invocation. Nothing a guest does in one call (globals,
//! memory, a trap) can be seen by the next; a trapped instance is simply dropped.
//!
//! Every invocation runs on a fiber. [`Runtime::invoke_async`] is for async callers: the guest
//! runs inside the caller's task and yields its thread at every epoch tick (the first within
//! [`engine::SLOW_TICK`] of its start, then every [`engine::EPOCH_TICK`]), so a small call
//! costs no thread hop and a long one cannot hold a worker. [`Runtime::invoke`] and
//! [`Runtime::invoke_with`] drive the same future on the calling thread, for synchronous callers
//! and for guests whose outbound RPC blocks. Wall time is bounded by epoch interruption driven
//! from a dedicated OS thread ([`engine::EpochTicker`]), so a guest spinning forever cannot
//! stall anything else.

mod abi;
mod cache;
mod component;
pub mod engine;
pub mod error;
pub mod outbound;
mod stdio;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use wasmtime::{Engine, Extern, InstancePre, Linker, ModuleExport, Store, Trap, UpdateDeadline};

pub use abi::{ABI_VERSION, IMPORT_MODULE};
use abi::{Limiter, State};
pub use cache::{CacheOutcome, ModuleCache};
pub use component::{WIT_EXPORT, WIT_IMPORT, WIT_PACKAGE};
pub use engine::{Allocator, EngineSettings};
pub use error::{Failure, LoadError, class};
pub use outbound::{Outbound, RpcGrants};

/// Context key carrying the AMQP `user_id` property, which RabbitMQ validates: the one caller
/// identity a handler can trust. Only the receiving host sets it.
pub const CONTEXT_USER_ID: &str = "amqp_user_id";

/// Per-handler sandbox limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock limit of one invocation, `_initialize` included when it runs just before the
    /// method (a sandbox made ahead ran it under a limit of its own).
    pub timeout: Duration,
    /// Cap on linear memory, in bytes.
    pub memory_bytes: usize,
    /// Cap on table elements.
    pub table_elements: usize,
    /// Cap on the total size of one invocation's results (and of its error).
    pub max_result_bytes: usize,
    /// Bytes of guest stdout and of stderr kept per invocation (a sandbox made ahead has as
    /// many again for what its `_initialize` prints, which is logged before its call).
    pub max_stdio_bytes: usize,
    /// Largest args accepted, in bytes of JSON.
    pub max_args_bytes: usize,
    /// Forward the guest's stdout and stderr to the log (stderr still reaches trap errors, but
    /// for a sandbox made ahead not what its `_initialize` wrote).
    pub log_stdio: bool,
    /// What the guest may reach through WASI; `None` grants nothing.
    pub grants: Option<Arc<Grants>>,
    /// Topics the guest may call, cast and notify; `None` grants nothing.
    pub rpc: Option<Arc<RpcGrants>>,
}

/// Capabilities granted to a handler through WASI. Nothing unless the config says so.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grants {
    /// Environment variables the guest sees, with their values.
    pub env: Vec<(String, String)>,
    /// Host directories the guest may open.
    pub dirs: Vec<Preopen>,
}

/// One host directory made visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    /// The directory on the host.
    pub host: std::path::PathBuf,
    /// Where the guest sees it (e.g. `/data`).
    pub guest: String,
    /// Whether the guest may create, change and delete files there.
    pub writable: bool,
}

impl Limits {
    /// Defaults used when a handler's config says nothing.
    pub const DEFAULT: Limits = Limits {
        timeout: Duration::from_secs(5),
        memory_bytes: 64 << 20,
        table_elements: 100_000,
        max_result_bytes: 1 << 20,
        max_stdio_bytes: 64 << 10,
        max_args_bytes: 1 << 20,
        log_stdio: true,
        grants: None,
        rpc: None,
    };
}

/// A compiled, pre-linked module (or component) version. Cheap to clone; in-flight invocations keep the version
/// they started with alive, which is what lets hot reload swap without draining.
#[derive(Clone)]
pub struct Module {
    inner: Arc<ModuleInner>,
}

struct ModuleInner {
    name: Arc<str>,
    code: Code,
    methods: BTreeMap<String, Method>,
    sha256: [u8; 32],
    /// The sandbox made ahead of this version's next call, if any. It lives here so that it
    /// goes with the version; a version that stops serving (replaced, kept only for rollback)
    /// drops it at once ([`Module::retire`]).
    ahead: Ahead,
}

/// A module's next sandbox, made once a call is answered so that the next call finds its
/// instance ready (see [`Next::prepare`]).
struct Ahead {
    ready: Mutex<Option<Prepared>>,
    /// Set while one is being made, so that concurrent calls do not each make one.
    making: AtomicBool,
    /// Cleared while the version is not the one a handler serves: no sandbox is made for it.
    serving: AtomicBool,
}

impl Default for Ahead {
    fn default() -> Self {
        Self {
            ready: Mutex::new(None),
            making: AtomicBool::new(false),
            serving: AtomicBool::new(true),
        }
    }
}

/// An instance made and initialised (`_initialize` run, or a component's start) but not yet
/// called. Only the call that takes it runs it, once; it is then dropped like any other sandbox.
struct Prepared {
    store: Store<State>,
    instance: Made,
    /// The limits it was made under; a call under other limits (a config reload) drops it.
    limits: Limits,
    _held: PreparedSlot,
}

/// One of the runtime's `max_prepared` places, given back when the prepared sandbox goes
/// (taken by a call, or dropped with its module).
struct PreparedSlot(Arc<AtomicUsize>);

impl Drop for PreparedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The two loaders' compiled code.
enum Code {
    /// A core module speaking ABI v1 (`guest-sdk/ABI.md`).
    Core {
        pre: InstancePre<State>,
        initialize: Option<ModuleExport>,
        memory: ModuleExport,
    },
    /// A component targeting the `warren:handler` world (`guest-sdk/wit`).
    Component(component::ComponentCode),
}

/// An instance that came up in its sandbox's `Store`, of either kind.
enum Made {
    Core(wasmtime::Instance),
    Component(component::HandlerWorld),
}

/// How a method is reached.
enum Method {
    /// The core module's export.
    Core(ModuleExport),
    /// By name, through the component's `call`.
    Component,
}

impl Module {
    /// The sandbox made ahead for this version, if there is one made under `limits`.
    fn take_prepared(&self, limits: &Limits) -> Option<Prepared> {
        let prepared = self.inner.ahead.ready.lock().ok()?.take()?;
        // Made under other limits (a config reload changed them): dropped, not used.
        (prepared.limits == *limits).then_some(prepared)
    }

    /// This version no longer serves new calls (a reload replaced it; it is kept for a
    /// rollback, or finishes the calls it has): drop its prepared sandbox, which holds a pool
    /// slot and one of the `max_prepared` places, and make no more for it.
    pub fn retire(&self) {
        self.inner.ahead.serving.store(false, Ordering::Release);
        let dropped = self
            .inner
            .ahead
            .ready
            .lock()
            .ok()
            .and_then(|mut r| r.take());
        drop(dropped);
    }

    /// This version serves new calls again (a rollback): its sandboxes may be made ahead.
    pub fn serve(&self) {
        self.inner.ahead.serving.store(true, Ordering::Release);
    }

    /// The handler name this module was loaded under (used in logs).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Callable method names, sorted.
    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.inner.methods.keys().map(String::as_str)
    }

    /// Whether this is a WebAssembly component (rather than a core module).
    pub fn is_component(&self) -> bool {
        matches!(self.inner.code, Code::Component(_))
    }

    /// Linear memory an instance starts with, bytes (a component's largest). Every call resets
    /// the memory its instance used, which costs in proportion to this, so `warren inspect`
    /// shows it to plugin authors.
    pub fn initial_memory_bytes(&self) -> u64 {
        let required = match &self.inner.code {
            Code::Core { pre, .. } => Some(pre.module().resources_required()),
            Code::Component(code) => code.resources_required(),
        };
        required
            .and_then(|r| r.max_initial_memory_size)
            .unwrap_or(0)
            .saturating_mul(WASM_PAGE_BYTES)
    }

    /// Whether `method` is a callable method of this module.
    pub fn has_method(&self, method: &str) -> bool {
        self.inner.methods.contains_key(method)
    }

    /// SHA-256 of the bytes this module was loaded from.
    pub fn sha256(&self) -> &[u8; 32] {
        &self.inner.sha256
    }

    /// Lowercase hex of the first bytes of the hash, for logs and status.
    pub fn hash_prefix(&self) -> String {
        self.inner.sha256[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Prefix of an export that names a method explicitly (`rpc:read` is the method `read`).
pub const METHOD_PREFIX: &str = "rpc:";

/// Bytes in a WebAssembly page.
const WASM_PAGE_BYTES: u64 = 64 << 10;

/// Whether an export name may be called as an RPC method (ABI.md, "Which exports are methods").
pub fn is_reserved_name(name: &str) -> bool {
    name.starts_with('_')
        || name.starts_with("warren_")
        || name.starts_with("cabi_")
        || name == "memory"
}

/// Parse caller-supplied args text: it must be a JSON object.
pub fn parse_args(text: &str) -> Result<Box<RawValue>, Failure> {
    let value: Box<RawValue> = serde_json::from_str(text)
        .map_err(|e| Failure::new(class::INVALID_ARGS, format!("args are not valid JSON: {e}")))?;
    check_args(&value)?;
    Ok(value)
}

fn check_args_size(args: &RawValue, limits: &Limits) -> Result<(), Failure> {
    let len = args.get().len();
    if len > limits.max_args_bytes {
        return Err(Failure::new(
            class::INVALID_ARGS,
            format!(
                "args are {len} bytes, over the handler's cap of {}",
                limits.max_args_bytes
            ),
        ));
    }
    Ok(())
}

fn check_args(args: &RawValue) -> Result<(), Failure> {
    if args.get().trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(Failure::new(
            class::INVALID_ARGS,
            "args must be a JSON object",
        ))
    }
}

/// The engine, the linker with the host imports, and the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    component_linker: wasmtime::component::Linker<State>,
    allocator: Allocator,
    ticker: engine::EpochTicker,
    /// Sandboxes made ahead of their calls, across all modules, and the cap on them.
    prepared: Arc<AtomicUsize>,
    max_prepared: usize,
}

impl Runtime {
    /// Whether the epoch ticker sleeps because no instance has been alive for a while (see
    /// [`engine::EpochTicker`]); the next invocation wakes it.
    pub fn epoch_ticker_idle(&self) -> bool {
        self.ticker.is_idle()
    }

    /// How many times the epoch ticker has ticked; see [`engine::SLOW_TICK`].
    pub fn epoch_ticks(&self) -> u64 {
        self.ticker.ticks()
    }

    /// How many sandboxes are made ahead of their calls right now (at most the settings'
    /// `max_prepared`).
    pub fn prepared_sandboxes(&self) -> usize {
        self.prepared.load(Ordering::Acquire)
    }

    /// Build the runtime. Fails only if no engine can be built or the ticker thread cannot start.
    pub fn new(settings: &EngineSettings) -> anyhow::Result<Self> {
        let (engine, allocator) = engine::build_engine(settings)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, State::wasi)
            .map_err(|e| anyhow::anyhow!("cannot link WASI: {e}"))?;
        abi::forbid_blocking(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link the ABI: {e}"))?;
        abi::add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("cannot link the ABI: {e}"))?;
        let component_linker = component::linker(&engine)
            .map_err(|e| anyhow::anyhow!("cannot link the component world: {e}"))?;
        let ticker = engine::EpochTicker::start(engine.clone())?;
        Ok(Self {
            engine,
            linker,
            component_linker,
            allocator,
            ticker,
            prepared: Arc::new(AtomicUsize::new(0)),
            max_prepared: usize::try_from(settings.max_prepared).unwrap_or(usize::MAX),
        })
    }

    /// Which instance allocator is in use.
    pub fn allocator(&self) -> Allocator {
        self.allocator
    }

    /// The wasmtime engine (for the compiled-module cache, which must key on its compatibility).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compile, pre-link and smoke-test a module: instantiate it once, run `_initialize`, and
    /// check the ABI marker. Only a module that passes all of it is returned.
    pub fn load(&self, name: &str, bytes: &[u8], limits: &Limits) -> Result<Module, LoadError> {
        self.load_cached(name, bytes, limits, None).map(|(m, _)| m)
    }

    /// [`Runtime::load`], taking the compiled code from `cache` when it has it and adding it
    /// when it does not. The smoke test runs either way.
    pub fn load_cached(
        &self,
        name: &str,
        bytes: &[u8],
        limits: &Limits,
        cache: Option<&ModuleCache>,
    ) -> Result<(Module, CacheOutcome), LoadError> {
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        if component::is_component(bytes) {
            return self.load_component(name, bytes, sha256, limits, cache);
        }
        if let Some(module) = cache.and_then(|c| c.get(&self.engine, &sha256)) {
            return Ok((
                self.prepare(name, module, sha256, limits)?,
                CacheOutcome::Hit,
            ));
        }
        let module = wasmtime::Module::new(&self.engine, bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let prepared = self.prepare(name, module, sha256, limits)?;
        // Only modules that passed the smoke test are worth caching.
        if let (Some(cache), Code::Core { pre, .. }) = (cache, &prepared.inner.code) {
            cache.put(&self.engine, &sha256, pre.module());
        }
        Ok((prepared, CacheOutcome::Miss))
    }

    fn prepare(
        &self,
        name: &str,
        module: wasmtime::Module,
        sha256: [u8; 32],
        limits: &Limits,
    ) -> Result<Module, LoadError> {
        let marker = match module.get_export(abi::ABI_MARKER) {
            Some(wasmtime::ExternType::Func(ty))
                if ty.params().len() == 0 && ty.results().len() == 1 =>
            {
                module.get_export_index(abi::ABI_MARKER)
            }
            _ => None,
        }
        .ok_or(LoadError::MissingAbiMarker)?;
        let memory = match module.get_export("memory") {
            Some(wasmtime::ExternType::Memory(_)) => module.get_export_index("memory"),
            _ => None,
        }
        .ok_or(LoadError::MissingMemory)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let mut methods = BTreeMap::new();
        for export in module.exports() {
            let wasmtime::ExternType::Func(ty) = export.ty() else {
                continue;
            };
            let is_method_type = ty.params().len() == 0
                && ty.results().len() == 1
                && matches!(ty.results().next(), Some(wasmtime::ValType::I32));
            // `rpc:<name>` is the method `<name>` and wins over a plain export of that name
            // (ABI.md): it lets toolchains whose export name is the linker symbol avoid
            // clashing with libc (`read`, `write`, `div`, ...).
            let (name, prefixed) = match export.name().strip_prefix(METHOD_PREFIX) {
                Some(name) => (name, true),
                None => (export.name(), false),
            };
            if !is_method_type || name.is_empty() || is_reserved_name(name) {
                continue;
            }
            if !prefixed && methods.contains_key(name) {
                continue;
            }
            if let Some(index) = module.get_export_index(export.name()) {
                methods.insert(name.to_owned(), Method::Core(index));
            }
        }
        let initialize = module.get_export_index("_initialize");
        let loaded = Module {
            inner: Arc::new(ModuleInner {
                name: name.into(),
                code: Code::Core {
                    pre,
                    initialize,
                    memory,
                },
                methods,
                sha256,
                ahead: Ahead::default(),
            }),
        };
        let mut sandbox = self.sandbox(&loaded, Vec::new(), empty_context(), limits, false);
        let version = block_on(async {
            let instance = sandbox.start().await?;
            sandbox.call_i32(&instance, &marker).await
        })
        .map_err(LoadError::Startup)?;
        if version != abi::ABI_VERSION {
            return Err(LoadError::AbiVersion {
                found: version,
                expected: abi::ABI_VERSION,
            });
        }
        Ok(loaded)
    }

    /// Run `method` of `module` with `args` (a JSON object) and `context` (JSON object text) in a
    /// fresh sandbox. Returns the results in order (a single `null` when the guest emitted none).
    pub fn invoke(
        &self,
        module: &Module,
        method: &str,
        args: &RawValue,
        context: Arc<[u8]>,
        limits: &Limits,
    ) -> Result<Vec<Box<RawValue>>, Failure> {
        self.invoke_with(module, method, args, context, limits, None)
    }

    /// [`Runtime::invoke`], with `outbound` sending the guest's outbound RPC (which
    /// `limits.rpc` grants); without it, outbound requests fail with `Unavailable`. Blocks the
    /// calling thread for the whole invocation, outbound requests included.
    pub fn invoke_with(
        &self,
        module: &Module,
        method: &str,
        args: &RawValue,
        context: Arc<[u8]>,
        limits: &Limits,
        outbound: Option<Arc<dyn Outbound>>,
    ) -> Result<Vec<Box<RawValue>>, Failure> {
        block_on(self.run(module, method, args, context, limits, outbound, false)).0
    }

    /// [`Runtime::invoke`] for async callers: the guest runs in the awaiting task and yields
    /// the thread at every epoch tick (see [`engine::SLOW_TICK`]), so it may run on an executor's
    /// worker however long it takes. Outbound RPC is not available here (it blocks; use
    /// [`Runtime::invoke_with`] on a blocking thread): such requests fail with `Unavailable`.
    pub async fn invoke_async(
        &self,
        module: &Module,
        method: &str,
        args: &RawValue,
        context: Arc<[u8]>,
        limits: &Limits,
    ) -> Result<Vec<Box<RawValue>>, Failure> {
        self.run(module, method, args, context, limits, None, true)
            .await
            .0
    }

    /// [`Runtime::invoke_async`], handing back the spent sandbox with the results. Dropping a
    /// sandbox resets its memory, the larger part of a small invocation's cost; a caller that
    /// drops it once the results are on their way (a reply published) takes that off the
    /// caller's wait. It is never run again.
    pub async fn invoke_keeping(
        &self,
        module: &Module,
        method: &str,
        args: &RawValue,
        context: Arc<[u8]>,
        limits: &Limits,
    ) -> (Result<Vec<Box<RawValue>>, Failure>, Spent) {
        self.run(module, method, args, context, limits, None, true)
            .await
    }

    /// One invocation; `yields` says whether the guest gives its thread back at each epoch
    /// tick (an async caller) or keeps it (a caller blocking on the future).
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        module: &Module,
        method: &str,
        args: &RawValue,
        context: Arc<[u8]>,
        limits: &Limits,
        outbound: Option<Arc<dyn Outbound>>,
        yields: bool,
    ) -> (Result<Vec<Box<RawValue>>, Failure>, Spent) {
        let export = match module.inner.methods.get(method) {
            Some(Method::Core(export)) => Some(export),
            Some(Method::Component) => None,
            None => return (Err(no_such_method(module, method)), Spent::none()),
        };
        if let Err(f) = check_args(args).and_then(|()| check_args_size(args, limits)) {
            return (Err(f), Spent::none());
        }
        let outcome;
        let mut sandbox;
        match export {
            Some(export) => {
                let input = args.get().as_bytes().to_vec();
                sandbox = match module.take_prepared(limits) {
                    Some(prepared) => self.resume(module, prepared, limits, yields),
                    None => self.sandbox(module, Vec::new(), empty_context(), limits, yields),
                };
                outcome = sandbox.call_core(export, input, context, outbound).await;
            }
            None => {
                sandbox = match module.take_prepared(limits) {
                    Some(prepared) => self.resume(module, prepared, limits, yields),
                    None => self.sandbox(module, Vec::new(), empty_context(), limits, yields),
                };
                outcome = sandbox
                    .call_component(method, args, context, outbound, limits)
                    .await;
            }
        }
        // A module whose instance came up (so its next one very likely will) gets its next
        // sandbox made once this call is answered.
        let next = sandbox.started.then(|| limits.clone());
        (
            outcome,
            Spent {
                sandbox: Some(sandbox),
                next,
            },
        )
    }

    /// Make `module`'s next sandbox now, so that its next call finds the instance made and
    /// initialised: at one caller that takes the instantiation off the request's path. At
    /// most one per module version and `max_prepared` in all; nothing happens when the cap is
    /// reached or one is already there or being made. A failure (a `_initialize` that traps
    /// this time) is dropped here: the next call makes its own instance and reports it.
    async fn prepare_next(&self, module: &Module, limits: &Limits) {
        let ahead = &module.inner.ahead;
        if ahead.making.swap(true, Ordering::AcqRel) {
            return;
        }
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&ahead.making);
        if !ahead.serving.load(Ordering::Acquire)
            || ahead.ready.lock().map_or(true, |slot| slot.is_some())
        {
            return;
        }
        let max = self.max_prepared;
        if self
            .prepared
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return;
        }
        let held = PreparedSlot(self.prepared.clone());
        let mut sandbox = self.sandbox(module, Vec::new(), empty_context(), limits, true);
        let made = match module.inner.code {
            Code::Core { .. } => sandbox.start().await.map(Made::Core),
            Code::Component(_) => sandbox.start_component().await.map(Made::Component),
        };
        match made {
            Ok(instance) => {
                // What `_initialize` printed, and its log lines over the cap, are reported
                // now, outside any delivery: left in the sandbox, they would be reported with
                // (and count against) whichever call later takes it.
                sandbox.flush_stdio(None);
                sandbox.flush_log_count();
                let prepared = Prepared {
                    store: sandbox.store,
                    instance,
                    limits: limits.clone(),
                    _held: held,
                };
                if let Ok(mut slot) = ahead.ready.lock() {
                    // Retired while it was being made: dropped (after the lock) with `prepared`.
                    if ahead.serving.load(Ordering::Acquire) {
                        *slot = Some(prepared);
                    }
                }
            }
            Err(failure) => {
                crate::in_span!(tracing::Level::DEBUG, handler = %module.name(), class = %failure.class, error = %failure.message, "next sandbox not made ahead; its call will make its own");
            }
        }
    }

    fn sandbox(
        &self,
        module: &Module,
        input: Vec<u8>,
        context: Arc<[u8]>,
        limits: &Limits,
        yields: bool,
    ) -> Sandbox {
        let running = self.ticker.enter();
        // One deadline for the guest's code and its outbound requests' waits.
        let deadline = Instant::now() + limits.timeout;
        let state = State {
            wasi: None,
            max_stdio_bytes: limits.max_stdio_bytes,
            grants: limits.grants.clone(),
            p2: None,
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                hit: None,
                memory_used: 0,
                counts: match module.inner.code {
                    Code::Core { .. } => abi::CORE_COUNTS,
                    Code::Component(_) => component::COUNTS,
                },
            },
            input,
            context,
            outputs: Vec::new(),
            output_bytes: 0,
            max_output_bytes: limits.max_result_bytes,
            error: None,
            host_failure: None,
            handler: module.inner.name.clone(),
            log_lines: 0,
            logs_dropped: 0,
            outbound: outbound::Session {
                grants: limits.rpc.clone(),
                sender: None,
                deadline,
                sent: 0,
                max_reply_bytes: limits.max_args_bytes,
            },
            reply: Vec::new(),
            memory: None,
            deadline,
            yields,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Called at every epoch tick: past the deadline the guest traps (`Trap::Interrupt`,
        // reported as `Timeout`); before it, an async caller's guest yields its thread. Both
        // are read from the store, as a prepared sandbox gets them when its call starts. Either
        // way the guest ran through a tick, so the ticker is told to tick fast.
        store.set_epoch_deadline(1);
        let ticks = running.ticks();
        store.epoch_deadline_callback(move |store| {
            ticks.ran_through();
            let state = store.data();
            Ok(if Instant::now() >= state.deadline {
                UpdateDeadline::Interrupt
            } else if state.yields {
                UpdateDeadline::Yield(1)
            } else {
                UpdateDeadline::Continue(1)
            })
        });
        Sandbox {
            store,
            module: module.clone(),
            timeout: limits.timeout,
            log_stdio: limits.log_stdio,
            instance: None,
            started: false,
            _running: running,
        }
    }

    /// A prepared sandbox, given the deadline of the call that starts now.
    fn resume(
        &self,
        module: &Module,
        prepared: Prepared,
        limits: &Limits,
        yields: bool,
    ) -> Sandbox {
        let running = self.ticker.enter();
        let Prepared {
            mut store,
            instance,
            ..
        } = prepared;
        let deadline = Instant::now() + limits.timeout;
        let state = store.data_mut();
        state.deadline = deadline;
        state.outbound.deadline = deadline;
        state.yields = yields;
        // Relative to the epoch now: the ticker may have slept while the sandbox waited.
        store.set_epoch_deadline(1);
        Sandbox {
            store,
            module: module.clone(),
            timeout: limits.timeout,
            log_stdio: limits.log_stdio,
            instance: Some(instance),
            started: true,
            _running: running,
        }
    }
}

/// The context a guest's `_initialize` sees: none yet, as it may run before its call arrives.
fn empty_context() -> Arc<[u8]> {
    static EMPTY: OnceLock<Arc<[u8]>> = OnceLock::new();
    EMPTY.get_or_init(|| Arc::from(&b"{}"[..])).clone()
}

/// A finished invocation's sandbox, held only to be dropped (see [`Runtime::invoke_keeping`]).
/// Dropping it resets the guest's memory and returns its slot to the pool.
#[must_use = "dropping a spent sandbox is what frees its pool slot; drop it once the results are sent"]
pub struct Spent {
    sandbox: Option<Sandbox>,
    /// Set when the module's next sandbox is worth making ahead: the limits to make it under.
    next: Option<Limits>,
}

impl Spent {
    /// Nothing to drop (an invocation that never got a sandbox).
    pub fn none() -> Self {
        Self {
            sandbox: None,
            next: None,
        }
    }

    /// Drop the spent sandbox (resetting its memory, freeing its pool slot), keeping what is
    /// needed to make its module's next one later with [`Next::prepare`].
    pub fn release(self) -> Next {
        let Spent { sandbox, next } = self;
        let module = sandbox.as_ref().map(|s| s.module.clone());
        drop(sandbox);
        Next(module.zip(next))
    }
}

/// A module whose next sandbox is worth making ahead of its call, from a released [`Spent`].
#[must_use = "a Next does nothing unless prepared"]
pub struct Next(Option<(Module, Limits)>);

impl Next {
    /// Nothing to make.
    pub fn none() -> Self {
        Self(None)
    }

    /// Make the module's next sandbox (a fresh `Store` and instance, `_initialize` run), which
    /// the module's next call takes instead of making its own: for a caller that sends its
    /// next request once it has its reply, that is instantiation taken off the request's path.
    /// Each sandbox still serves exactly one call. Call it once the call it came from is
    /// answered and settled; at worst it runs the guest's `_initialize` for the handler's
    /// timeout, yielding its thread at every epoch tick.
    pub async fn prepare(self, runtime: &Runtime) {
        if let Some((module, limits)) = self.0 {
            runtime.prepare_next(&module, &limits).await;
        }
    }
}

/// One invocation's store and captured output. It serves that invocation only and is dropped
/// after it (by the runtime, or by whoever holds the [`Spent`] it became).
struct Sandbox {
    store: Store<State>,
    module: Module,
    timeout: Duration,
    log_stdio: bool,
    /// The instance, when it was made ahead (prepared) and is still to be called.
    instance: Option<Made>,
    /// Whether the instance came up (instantiated, `_initialize` or a component's start run).
    started: bool,
    /// Keeps the epoch ticker ticking while this sandbox may run guest code.
    _running: engine::Running,
}

impl Sandbox {
    /// Instantiate (unless prepared), hand the guest its call's args, context and outbound
    /// sender, run `export`, and collect what the guest emitted. They are set only now so that
    /// `_initialize` sees the same (none of them) whether it ran ahead of the call or just
    /// before it.
    async fn call_core(
        &mut self,
        export: &ModuleExport,
        input: Vec<u8>,
        context: Arc<[u8]>,
        outbound: Option<Arc<dyn Outbound>>,
    ) -> Result<Vec<Box<RawValue>>, Failure> {
        let instance = match self.instance.take() {
            Some(Made::Core(instance)) => instance,
            _ => self.start().await?,
        };
        let state = self.store.data_mut();
        state.input = input;
        state.context = context;
        state.outbound.sender = outbound;
        let status = self.call_i32(&instance, export).await?;
        self.finish(status)
    }

    async fn start(&mut self) -> Result<wasmtime::Instance, Failure> {
        let Code::Core {
            pre,
            initialize,
            memory,
        } = &self.module.inner.code
        else {
            return Err(Failure::new(class::INTERNAL, "not a core module"));
        };
        let (initialize, memory) = (*initialize, *memory);
        let instance = match pre.instantiate_async(&mut self.store).await {
            Ok(instance) => instance,
            Err(e) => return Err(self.classify(e, "instantiation")),
        };
        if let Some(Extern::Memory(memory)) = instance.get_module_export(&mut self.store, &memory) {
            self.store.data_mut().memory = Some(memory);
        }
        if let Some(init) = initialize {
            let func = self.func(&instance, &init)?;
            match func.typed::<(), ()>(&self.store) {
                Ok(f) => {
                    if let Err(e) = f.call_async(&mut self.store, ()).await {
                        return Err(self.classify(e, "_initialize"));
                    }
                }
                Err(_) => {
                    return Err(Failure::new(
                        class::GUEST_ERROR,
                        "`_initialize` must have type () -> ()",
                    ));
                }
            }
        }
        self.started = true;
        Ok(instance)
    }

    fn func(
        &mut self,
        instance: &wasmtime::Instance,
        export: &ModuleExport,
    ) -> Result<wasmtime::Func, Failure> {
        match instance.get_module_export(&mut self.store, export) {
            Some(Extern::Func(f)) => Ok(f),
            _ => Err(Failure::new(
                class::INTERNAL,
                "export vanished from its instance",
            )),
        }
    }

    async fn call_i32(
        &mut self,
        instance: &wasmtime::Instance,
        export: &ModuleExport,
    ) -> Result<i32, Failure> {
        let func = self.func(instance, export)?;
        let typed = func
            .typed::<(), i32>(&self.store)
            .map_err(|e| Failure::new(class::INTERNAL, format!("{e}")))?;
        match typed.call_async(&mut self.store, ()).await {
            Ok(status) => Ok(status),
            Err(e) => Err(self.classify(e, "call")),
        }
    }

    fn finish(&mut self, status: i32) -> Result<Vec<Box<RawValue>>, Failure> {
        self.flush_stdio(None);
        self.flush_log_count();
        let state = self.store.data_mut();
        if let Some(error) = state.error.take() {
            return Err(parse_guest_error(&error));
        }
        if status != 0 {
            return Err(Failure::new(
                class::GUEST_ERROR,
                format!("method returned status {status} without reporting an error"),
            ));
        }
        let mut outputs = std::mem::take(&mut state.outputs);
        if outputs.is_empty() {
            outputs.push(null());
        }
        Ok(outputs)
    }

    /// Turn a wasmtime error into the failure the caller sees. Causes the host recorded itself
    /// (limits, bad output) win over the trap they produced.
    fn classify(&mut self, err: wasmtime::Error, during: &str) -> Failure {
        let stderr = self.flush_stdio(Some(()));
        // A guest that logged past the cap and then trapped is the one an operator most needs
        // told that lines are missing.
        self.flush_log_count();
        let state = self.store.data_mut();
        if let Some(failure) = state.host_failure.take() {
            return failure;
        }
        if let Some(hit) = state.limiter.hit.take() {
            return Failure::new(class::MEMORY_LIMIT_EXCEEDED, hit);
        }
        if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
            return Failure::new(
                class::TIMEOUT,
                format!(
                    "handler exceeded its time limit of {} ms",
                    self.timeout.as_millis()
                ),
            );
        }
        if during == "instantiation" && err.downcast_ref::<Trap>().is_none() {
            // The pool is full (or the OS refused memory): a capacity problem, not the guest's.
            return Failure::new(
                class::OVERLOADED,
                format!("cannot instantiate handler: {err}"),
            );
        }
        let mut message = match err.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            None => format!("{err}"),
        };
        let stderr = stderr.trim();
        if !stderr.is_empty() {
            message.push_str("\nstderr:\n");
            message.push_str(stderr);
        }
        Failure::new(class::GUEST_TRAP, message)
    }

    /// Warn of the guest's log lines dropped over the cap, and count from zero again.
    fn flush_log_count(&mut self) {
        let state = self.store.data_mut();
        if state.logs_dropped > 0 {
            crate::in_span!(tracing::Level::WARN, handler = %state.handler, dropped = state.logs_dropped, "guest log lines dropped over the per-invocation cap");
        }
        state.log_lines = 0;
        state.logs_dropped = 0;
    }

    /// Forward captured stdio to the log; return stderr when asked (for trap messages). Called
    /// at the end of the invocation, and for a sandbox made ahead also once it is up.
    fn flush_stdio(&mut self, want_stderr: Option<()>) -> String {
        let ((out, out_dropped), (err, err_dropped)) = self.store.data_mut().take_stdio();
        let handler = self.module.name();
        if out_dropped + err_dropped > 0 {
            crate::in_span!(
                tracing::Level::WARN,
                handler,
                stdout = out_dropped,
                stderr = err_dropped,
                "guest output over the per-invocation cap dropped (bytes)"
            );
        }
        let text = String::from_utf8_lossy(&err).into_owned();
        if self.log_stdio {
            for line in String::from_utf8_lossy(&out).lines() {
                crate::in_span!(target: "warren::guest", tracing::Level::INFO, handler, stream = "stdout", "{line}");
            }
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                crate::in_span!(target: "warren::guest", tracing::Level::WARN, handler, stream = "stderr", "{line}");
            }
        }
        if want_stderr.is_some() {
            text
        } else {
            String::new()
        }
    }
}

/// Run an invocation's future to completion on this thread, for synchronous callers. WASI's file
/// operations run on tokio's blocking pool, so outside a tokio runtime one is provided.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let _entered = match tokio::runtime::Handle::try_current() {
        Ok(_) => None,
        Err(_) => fallback_runtime().map(tokio::runtime::Runtime::enter),
    };
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// The runtime [`block_on`] enters when its caller has none: only its blocking pool is used.
fn fallback_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .thread_name("warren-wasi")
                .build()
                .ok()
        })
        .as_ref()
}

fn null() -> Box<RawValue> {
    RawValue::from_string("null".to_owned())
        .unwrap_or_else(|_| unreachable!("`null` is valid JSON"))
}

fn no_such_method(module: &Module, method: &str) -> Failure {
    let shown: String = method.chars().take(100).collect();
    Failure::new(
        class::NO_SUCH_METHOD,
        format!("handler '{}' has no method '{shown}'", module.name()),
    )
}

fn parse_guest_error(bytes: &[u8]) -> Failure {
    #[derive(serde::Deserialize)]
    struct GuestError {
        class: String,
        message: String,
        #[serde(default)]
        data: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<GuestError>(bytes) {
        Ok(e) if !e.class.is_empty() => Failure {
            class: e.class,
            message: e.message,
            data: e.data,
        },
        Ok(_) => Failure::new(
            class::GUEST_ERROR,
            "guest reported an error with an empty class",
        ),
        Err(e) => Failure::new(
            class::GUEST_ERROR,
            format!(
                "guest reported a malformed error ({e}): {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        ),
    }
}
