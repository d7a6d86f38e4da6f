//! Topic → handler, and the module version each handler serves right now.
//!
//! A handler's current version sits behind an `ArcSwap`: an invocation takes an `Arc` of the
//! version when it starts and keeps it to the end, so swapping in a new version never disturbs
//! requests already running, and the old code is freed when the last of them finishes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::runtime::{Limits, Module};

/// One version of a handler's module.
pub struct Version {
    /// Increases by one with every successful load of this handler.
    pub id: u64,
    /// The compiled module.
    pub module: Module,
    /// When it was swapped in.
    pub loaded_at: SystemTime,
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
}

impl Handler {
    /// A handler serving `module` as version 1.
    pub fn new(topic: String, path: PathBuf, limits: Limits, module: Module) -> Self {
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
        }
    }

    /// The version new requests get.
    pub fn current(&self) -> Arc<Version> {
        self.current.load_full()
    }

    /// Serve `module` from now on; returns the version it replaced.
    pub fn swap(&self, module: Module) -> Arc<Version> {
        let next = Version {
            id: self.current.load().id + 1,
            module,
            loaded_at: SystemTime::now(),
        };
        self.current.swap(Arc::new(next))
    }
}

/// All handlers, by topic.
#[derive(Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<Handler>>,
}

impl Registry {
    /// Add (or replace) a handler.
    pub fn insert(&mut self, handler: Handler) -> Arc<Handler> {
        let handler = Arc::new(handler);
        self.handlers.insert(handler.topic.clone(), handler.clone());
        handler
    }

    /// The handler for `topic`.
    pub fn get(&self, topic: &str) -> Option<&Arc<Handler>> {
        self.handlers.get(topic)
    }

    /// Every handler, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Handler>> {
        self.handlers.values()
    }
}
