//! The second loader: handlers that are WebAssembly **components** targeting the WIT world
//! `warren:handler/handler-world@1.0.0` (`guest-sdk/wit/warren.wit`), the same contract as the
//! core-module ABI v1 in another encoding. Python (componentize-py), JavaScript
//! (componentize-js) and Rust on `wasm32-wasip2` produce these.
//!
//! The rules are the core loader's: a fresh `Store` and instance per invocation, the epoch
//! deadline, the same `Limiter` (with counts sized for components, and the memory cap over all
//! of a component's memories together), the result and args caps, captured bounded stdio, and
//! WASI preview 2 with nothing granted beyond the handler's `Grants`. Blocking is refused like
//! preview 1's `poll_oneoff`: `wasi:io/poll` `poll` and `pollable.block` fail the invocation.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::value::RawValue;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::abi::{self, Counts, State};
use super::stdio::CappedPipe;
use super::{
    CacheOutcome, Code, Failure, LoadError, Made, Method, Module, ModuleCache, ModuleInner,
    Runtime, Sandbox, class,
};

wasmtime::component::bindgen!({
    path: "../guest-sdk/wit",
    world: "handler-world",
    imports: { default: trappable },
    // Called on a fiber (`Runtime::invoke_async`); the host side stays synchronous.
    exports: { default: async },
});

use self::warren::handler::types::{Error as GuestError, Level, OutboundKind};
use super::outbound::Kind;

/// The WIT package (with version) this host implements.
pub const WIT_PACKAGE: &str = "warren:handler@1.0.0";
/// The interface a handler component must export.
pub const WIT_EXPORT: &str = "warren:handler/handler@1.0.0";
/// The interface the host offers a handler component.
pub const WIT_IMPORT: &str = "warren:handler/host@1.0.0";
/// The WASI preview 2 poll interface as this wasmtime-wasi links it (guests importing any
/// 0.2.x version are matched to it).
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// What one component invocation may create. Components built from Python or JavaScript link
/// several core instances (the language runtime, libc, adapters), each with its memory and
/// tables; the memory cap still applies to all of them together. Core modules keep
/// `abi::CORE_COUNTS`.
pub(crate) const COUNTS: Counts = Counts {
    memories: 8,
    tables: 16,
    instances: 32,
};

/// A loaded component: pre-linked and with its method list read from the guest.
pub(super) struct ComponentCode {
    pre: HandlerWorldPre<State>,
}

impl ComponentCode {
    /// What instantiating the component takes (its core modules' memories and tables).
    pub(super) fn resources_required(&self) -> Option<wasmtime::ResourcesRequired> {
        self.pre.instance_pre().component().resources_required()
    }
}

/// WASI preview 2 for one invocation: built on the component's first WASI call.
pub(crate) struct Wasi2 {
    ctx: WasiCtx,
    table: ResourceTable,
    pub(super) stdout: CappedPipe,
    pub(super) stderr: CappedPipe,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let (cap, grants) = (self.max_stdio_bytes, self.grants.as_deref());
        let wasi = self.p2.get_or_insert_with(|| {
            let stdout = CappedPipe::new(cap);
            let stderr = CappedPipe::new(cap);
            let ctx = abi::wasi_builder(&stdout, &stderr, grants).build();
            Wasi2 {
                ctx,
                table: ResourceTable::new(),
                stdout,
                stderr,
            }
        });
        WasiCtxView {
            ctx: &mut wasi.ctx,
            table: &mut wasi.table,
        }
    }
}

impl warren::handler::types::Host for State {}

impl warren::handler::host::Host for State {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        if self.log_lines >= abi::MAX_LOG_LINES {
            self.logs_dropped += 1;
            return Ok(());
        }
        self.log_lines += 1;
        let level = match level {
            Level::Trace => 0,
            Level::Debug => 1,
            Level::Info => 2,
            Level::Warn => 3,
            Level::Error => 4,
        };
        let mut end = message.len().min(abi::MAX_LOG_LINE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        abi::guest_log(level, &self.handler, &message[..end]);
        Ok(())
    }

    fn emit(&mut self, json: String) -> wasmtime::Result<()> {
        match self.push_output(json.as_bytes()) {
            Ok(()) => Ok(()),
            Err(failure) => Err(abi::fail(self, failure)),
        }
    }

    fn send(
        &mut self,
        kind: OutboundKind,
        request: String,
    ) -> wasmtime::Result<Result<String, GuestError>> {
        let kind = match kind {
            OutboundKind::Call => Kind::Call,
            OutboundKind::Cast => Kind::Cast,
            OutboundKind::FanoutCast => Kind::FanoutCast,
            OutboundKind::Notify => Kind::Notify,
        };
        if request.len() > self.max_output_bytes {
            let msg = format!(
                "{} request exceeds the cap of {} bytes",
                kind.as_str(),
                self.max_output_bytes
            );
            return Err(abi::fail(self, Failure::new(class::RESULT_TOO_LARGE, msg)));
        }
        match self.send_outbound(kind, request.as_bytes()) {
            Ok(result) => Ok(Ok(result)),
            Err(f) => Ok(Err(GuestError {
                class: f.class,
                message: f.message,
                data: f.data.map(|d| d.to_string()),
            })),
        }
    }
}

/// The component linker: WASI preview 2 (blocking refused) and the `warren:handler/host` imports.
pub(super) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<State>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    HandlerWorld::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
    // A time limit cannot interrupt a host call, so, as with preview 1's `poll_oneoff`, a
    // handler may not wait: sleeping and waiting on a clock or stream fail the invocation.
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    for name in ["poll", "[method]pollable.block"] {
        poll.func_new(name, move |mut store, _ty, _params, _results| {
            let msg = format!(
                "handlers may not block: WASI {name} (sleeping, waiting on a clock or a stream) is not available"
            );
            Err(abi::fail(
                store.data_mut(),
                Failure::new(class::GUEST_TRAP, msg),
            ))
        })?;
    }
    linker.allow_shadowing(false);
    Ok(linker)
}

/// Whether the bytes are a component rather than a core module: same magic, layer field 1.
pub(super) fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[6..8] == [1, 0]
}

impl Runtime {
    /// The component half of [`Runtime::load_cached`].
    pub(super) fn load_component(
        &self,
        name: &str,
        bytes: &[u8],
        sha256: [u8; 32],
        limits: &super::Limits,
        cache: Option<&ModuleCache>,
    ) -> Result<(Module, CacheOutcome), LoadError> {
        if let Some(component) = cache.and_then(|c| c.get_component(&self.engine, &sha256)) {
            let module = self.prepare_component(name, &component, sha256, limits)?;
            return Ok((module, CacheOutcome::Hit));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let module = self.prepare_component(name, &component, sha256, limits)?;
        // Only components that passed the smoke test are worth caching.
        if let Some(cache) = cache {
            cache.put_component(&self.engine, &sha256, &component);
        }
        Ok((module, CacheOutcome::Miss))
    }

    fn prepare_component(
        &self,
        name: &str,
        component: &Component,
        sha256: [u8; 32],
        limits: &super::Limits,
    ) -> Result<Module, LoadError> {
        check_world(&self.engine, component)?;
        let pre = self
            .component_linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let pre = HandlerWorldPre::new(pre).map_err(|e| LoadError::World(format!("{e:#}")))?;
        let mut loaded = Module {
            inner: Arc::new(ModuleInner {
                name: name.into(),
                code: Code::Component(ComponentCode { pre }),
                methods: BTreeMap::new(),
                sha256,
                ahead: super::Ahead::default(),
            }),
        };
        // The smoke test: instantiate once and ask for the method list.
        let mut sandbox = self.sandbox(&loaded, Vec::new(), super::empty_context(), limits, false);
        let names = super::block_on(sandbox.component_methods()).map_err(LoadError::Startup)?;
        let mut methods = BTreeMap::new();
        for method in names {
            if method.is_empty() || method.len() > 255 {
                return Err(LoadError::World(format!(
                    "`methods` returned an invalid method name {:?}",
                    method.chars().take(100).collect::<String>()
                )));
            }
            methods.insert(method, Method::Component);
        }
        drop(sandbox);
        match Arc::get_mut(&mut loaded.inner) {
            Some(inner) => inner.methods = methods,
            None => {
                return Err(LoadError::Startup(Failure::new(
                    class::INTERNAL,
                    "component still in use after its smoke test",
                )));
            }
        }
        Ok(loaded)
    }
}

impl Sandbox {
    /// Run one method of a component in this fresh sandbox (see [`Runtime::invoke_async`]).
    pub(super) async fn call_component(
        &mut self,
        method: &str,
        args: &RawValue,
        context: Arc<[u8]>,
        outbound: Option<Arc<dyn super::Outbound>>,
        limits: &super::Limits,
    ) -> Result<Vec<Box<RawValue>>, Failure> {
        if !matches!(self.module.inner.code, Code::Component(_)) {
            return Err(Failure::new(class::INTERNAL, "not a component"));
        }
        let context_text = std::str::from_utf8(&context)
            .map_err(|_| Failure::new(class::INVALID_ARGS, "context is not UTF-8"))?
            .to_owned();
        let instance = match self.instance.take() {
            Some(Made::Component(instance)) => instance,
            _ => self.start_component().await?,
        };
        // Only now, as for a module: instantiation sees the same (no outbound sender) whether
        // it ran ahead of the call or just before it.
        let state = self.store.data_mut();
        state.context = context;
        state.outbound.sender = outbound;
        let called = instance
            .warren_handler_handler()
            .call_call(&mut self.store, method, args.get(), &context_text)
            .await;
        let returned = match called {
            Ok(returned) => returned,
            Err(e) => return Err(self.classify(e, "call")),
        };
        match returned {
            Ok(Some(json)) => {
                if let Err(failure) = self.store.data_mut().push_output(json.as_bytes()) {
                    self.finish(0)?;
                    return Err(failure);
                }
                self.finish(0)
            }
            Ok(None) => self.finish(0),
            Err(error) => {
                let failure = guest_failure(error, limits.max_result_bytes);
                self.finish(0)?;
                Err(failure)
            }
        }
    }

    /// Instantiate the component (its start functions run), before its call or ahead of it
    /// ([`super::Next::prepare`]): either way the guest sees no args or context until `call`.
    pub(super) async fn start_component(&mut self) -> Result<HandlerWorld, Failure> {
        let Code::Component(code) = &self.module.inner.code else {
            return Err(Failure::new(class::INTERNAL, "not a component"));
        };
        let pre = code.pre.clone();
        match pre.instantiate_async(&mut self.store).await {
            Ok(instance) => {
                self.started = true;
                Ok(instance)
            }
            Err(e) => Err(self.classify(e, "instantiation")),
        }
    }

    async fn component_methods(&mut self) -> Result<Vec<String>, Failure> {
        let Code::Component(code) = &self.module.inner.code else {
            return Err(Failure::new(class::INTERNAL, "not a component"));
        };
        let pre = code.pre.clone();
        let instance = match pre.instantiate_async(&mut self.store).await {
            Ok(instance) => instance,
            Err(e) => return Err(self.classify(e, "instantiation")),
        };
        let methods = instance
            .warren_handler_handler()
            .call_methods(&mut self.store)
            .await;
        methods.map_err(|e| self.classify(e, "methods"))
    }
}

/// A clear error for a component that does not export the Warren world's handler interface.
fn check_world(engine: &wasmtime::Engine, component: &Component) -> Result<(), LoadError> {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    if exports.contains(&WIT_EXPORT) {
        return Ok(());
    }
    let other = exports
        .iter()
        .find(|name| name.starts_with("warren:handler/handler@"));
    Err(LoadError::World(match other {
        Some(found) => format!(
            "the component exports `{found}`, this host speaks `{WIT_PACKAGE}` (it needs `{WIT_EXPORT}`)"
        ),
        None => format!(
            "the component does not export `{WIT_EXPORT}` (it exports: {}); build it against guest-sdk/wit/warren.wit",
            if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            }
        ),
    }))
}

/// The caller's view of an `error` the guest returned, bounded like a result.
fn guest_failure(error: GuestError, max_bytes: usize) -> Failure {
    let size = error.class.len() + error.message.len() + error.data.as_ref().map_or(0, String::len);
    if size > max_bytes {
        return Failure::new(
            class::RESULT_TOO_LARGE,
            format!("error exceeds the cap of {max_bytes} bytes"),
        );
    }
    if error.class.is_empty() {
        return Failure::new(
            class::GUEST_ERROR,
            "guest reported an error with an empty class",
        );
    }
    let data = match error.data.as_deref().map(serde_json::from_str) {
        None => None,
        Some(Ok(value)) => Some(value),
        Some(Err(e)) => {
            return Failure::new(
                class::GUEST_ERROR,
                format!(
                    "guest reported an error whose data is not JSON ({e}); class {}: {}",
                    error.class.chars().take(100).collect::<String>(),
                    error.message.chars().take(200).collect::<String>()
                ),
            );
        }
    };
    Failure {
        class: error.class,
        message: error.message,
        data,
    }
}
