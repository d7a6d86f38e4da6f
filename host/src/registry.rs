//! Topic → handler, each handler's module versions, and validate-then-swap reloading.
//!
//! A handler's current version sits behind an `ArcSwap`: an invocation takes an `Arc` of the
//! version when it starts and keeps it to the end, so swapping in a new version never disturbs
//! requests already running, and the old code is freed when the last of them finishes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::runtime::{Limits, Module, ModuleCache, Runtime};

/// One version of a handler's module.
pub struct Version {
    /// Increases by one with every successful load of this handler.
    pub id: u64,
    /// The compiled module.
    pub module: Module,
    /// When it was swapped in.
    pub loaded_at: SystemTime,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The file has the bytes already serving (or the bytes that failed last time).
    Unchanged,
    /// A new version serves from now on.
    Swapped {
        /// Its version id.
        id: u64,
    },
    /// The file could not be used; the previous version keeps serving.
    Failed(String),
}

/// A configured handler: a topic served by a module file.
pub struct Handler {
    /// The topic.
    pub topic: String,
    /// The module file.
    pub path: PathBuf,
    /// Sandbox limits for every invocation.
    pub limits: Limits,
    current: ArcSwap<Version>,
    previous: Mutex<Option<Arc<Version>>>,
    next_id: Mutex<u64>,
    last_error: Mutex<Option<(SystemTime, String)>>,
    /// Hash of the file bytes a reload last acted on (swapped in, served first, or failed). A
    /// reload acts only when the file changed since: an unchanged bad file is not retried and
    /// re-logged on every event, and after a rollback, where the file still holds the version
    /// rolled back from, a late watcher event or a `warren reload` does not bring it back.
    last_read: Mutex<[u8; 32]>,
    /// Requests served, for `warren status`.
    pub stats: Stats,
}

/// Per-handler request counters (the Prometheus metrics have the details).
#[derive(Debug, Default)]
pub struct Stats {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

impl Stats {
    /// Count one invocation.
    pub fn record(&self, ok: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if ok {
            self.ok.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }
}

/// A handler's state as `warren status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HandlerStatus {
    /// The topic.
    pub topic: String,
    /// The module file.
    pub module: String,
    /// Current version id.
    pub version: u64,
    /// First bytes of the current module's SHA-256, hex.
    pub hash: String,
    /// Callable methods.
    pub methods: Vec<String>,
    /// When the current version was loaded (seconds since the Unix epoch).
    pub loaded_at: u64,
    /// Whether a previous version is kept for rollback.
    pub can_roll_back: bool,
    /// The last reload failure, if the latest attempt failed.
    pub last_error: Option<String>,
    /// Invocations that returned results since the daemon started.
    #[serde(default)]
    pub requests_ok: u64,
    /// Invocations that failed (guest errors, traps, timeouts, unknown methods).
    #[serde(default)]
    pub requests_failed: u64,
}

impl Handler {
    /// A handler serving `module` as version 1.
    pub fn new(topic: String, path: PathBuf, limits: Limits, module: Module) -> Self {
        let loaded = *module.sha256();
        let version = Version {
            id: 1,
            module,
            loaded_at: SystemTime::now(),
        };
        Self {
            topic,
            path,
            limits,
            current: ArcSwap::from_pointee(version),
            previous: Mutex::new(None),
            next_id: Mutex::new(2),
            last_error: Mutex::new(None),
            last_read: Mutex::new(loaded),
            stats: Stats::default(),
        }
    }

    /// The version new requests get.
    pub fn current(&self) -> Arc<Version> {
        self.current.load_full()
    }

    /// Serve `module` from now on; the version it replaces is kept for rollback.
    pub fn swap(&self, module: Module) -> u64 {
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
            let id = *next;
            *next += 1;
            id
        };
        let old = self.current.swap(Arc::new(Version {
            id,
            module,
            loaded_at: SystemTime::now(),
        }));
        // Its calls still running finish on it, but it makes no sandboxes ahead any more.
        old.module.retire();
        *self.previous.lock().unwrap_or_else(|p| p.into_inner()) = Some(old);
        id
    }

    /// Go back to the previous version; the current one becomes the previous.
    pub fn rollback(&self) -> Result<u64, String> {
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let Some(back) = previous.take() else {
            return Err(format!("handler '{}' has no previous version", self.topic));
        };
        let id = back.id;
        back.module.serve();
        let replaced = self.current.swap(back);
        replaced.module.retire();
        *previous = Some(replaced);
        Ok(id)
    }

    /// Re-read the module file and, if its bytes changed, validate and swap them in: compile
    /// (or take from `cache`), pre-link, instantiate once as a smoke test. Blocking; call it
    /// off the async runtime. A file that fails any step never serves.
    pub fn reload(&self, runtime: &Runtime, cache: Option<&ModuleCache>) -> Reloaded {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                return self.failed(None, format!("cannot read {}: {e}", self.path.display()));
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if &hash == self.current().module.sha256() {
            // Back to the bytes that serve (a revert, or delete and re-create): nothing failed.
            *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = hash;
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Reloaded::Unchanged;
        }
        if *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) == hash {
            return Reloaded::Unchanged;
        }
        if bytes.is_empty() {
            return self.failed(
                Some(hash),
                format!("{} is empty (a write in progress?)", self.path.display()),
            );
        }
        match runtime.load_cached(&self.topic, &bytes, &self.limits, cache) {
            Ok((module, _)) => {
                *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = hash;
                let id = self.swap(module);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Reloaded::Swapped { id }
            }
            Err(e) => self.failed(Some(hash), format!("{}: {e}", self.path.display())),
        }
    }

    fn failed(&self, hash: Option<[u8; 32]>, message: String) -> Reloaded {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((SystemTime::now(), message.clone()));
        if let Some(hash) = hash {
            *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = hash;
        }
        Reloaded::Failed(message)
    }

    /// What `warren status` shows.
    pub fn status(&self) -> HandlerStatus {
        let v = self.current();
        HandlerStatus {
            topic: self.topic.clone(),
            module: self.path.display().to_string(),
            version: v.id,
            hash: v.module.hash_prefix(),
            methods: v.module.methods().map(str::to_owned).collect(),
            loaded_at: v
                .loaded_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            can_roll_back: self.previous.lock().map(|p| p.is_some()).unwrap_or(false),
            last_error: self
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.as_ref().map(|(_, m)| m.clone())),
            requests_ok: self.stats.ok.load(std::sync::atomic::Ordering::Relaxed),
            requests_failed: self.stats.failed.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// All handlers, by topic. Shared between the consumers, the reloader and the admin topic.
#[derive(Default)]
pub struct Registry {
    handlers: RwLock<BTreeMap<String, Arc<Handler>>>,
}

impl Registry {
    /// Add (or replace) a handler.
    pub fn insert(&self, handler: Arc<Handler>) {
        self.write().insert(handler.topic.clone(), handler);
    }

    /// Remove a handler.
    pub fn remove(&self, topic: &str) -> Option<Arc<Handler>> {
        self.write().remove(topic)
    }

    /// The handler for `topic`.
    pub fn get(&self, topic: &str) -> Option<Arc<Handler>> {
        self.read().get(topic).cloned()
    }

    /// Every handler, by topic.
    pub fn all(&self) -> Vec<Arc<Handler>> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Handler>>> {
        self.handlers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Handler>>> {
        self.handlers.write().unwrap_or_else(|p| p.into_inner())
    }
}
