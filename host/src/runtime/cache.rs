//! On-disk cache of compiled modules (and components), so a restart with many handlers does not recompile them.
//!
//! An entry is keyed by the module's SHA-256 and the engine's compatibility hash (wasmtime
//! version and every setting that affects code), and carries a SHA-256 trailer of its own bytes.
//! Deserialising compiled code is only sound for bytes wasmtime itself produced, so an entry is
//! used only when the trailer matches; anything stale, truncated or corrupt is a miss, deleted,
//! and rebuilt.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;

/// A directory of compiled modules.
#[derive(Debug, Clone)]
pub struct ModuleCache {
    dir: PathBuf,
}

/// Whether a load came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Deserialised from the cache.
    Hit,
    /// Compiled (and written to the cache if one is configured).
    Miss,
}

impl ModuleCache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry for `sha256`. Components get their own suffix: an artifact is only ever read
    /// back as the kind it was written as (wasmtime would refuse the other kind anyway).
    fn path(&self, engine: &Engine, sha256: &[u8; 32], kind: Kind) -> PathBuf {
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let module: String = sha256.iter().map(|b| format!("{b:02x}")).collect();
        let suffix = match kind {
            Kind::Module => "cwasm",
            Kind::Component => "component.cwasm",
        };
        self.dir
            .join(format!("{module}-{:016x}.{suffix}", hasher.finish()))
    }

    /// Whether the directory is private to this user. Entries are native code the daemon maps
    /// and runs, so a directory others can write to is never read (or written).
    fn trusted(&self) -> bool {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir);
        let (Ok(dir), Ok(me)) = (
            std::fs::metadata(&self.dir),
            std::fs::metadata("/proc/self"),
        ) else {
            return false;
        };
        let private =
            dir.is_dir() && dir.uid() == me.uid() && dir.permissions().mode() & 0o022 == 0;
        if !private {
            tracing::warn!(dir = %self.dir.display(), "compiled-module cache ignored: the directory must belong to this user and not be writable by others");
        }
        private
    }

    /// The cached module for `sha256`, if a sound entry exists.
    pub(crate) fn get(&self, engine: &Engine, sha256: &[u8; 32]) -> Option<wasmtime::Module> {
        self.read(engine, sha256, Kind::Module, |artifact| {
            // SAFETY: the directory is private to this user (`trusted`), so the entry was written
            // by `put` from `Module::serialize`; the trailer catches truncation and corruption,
            // and wasmtime checks the engine compatibility itself.
            unsafe { wasmtime::Module::deserialize(engine, artifact) }.ok()
        })
    }

    /// The cached component for `sha256`, if a sound entry exists.
    pub(crate) fn get_component(
        &self,
        engine: &Engine,
        sha256: &[u8; 32],
    ) -> Option<wasmtime::component::Component> {
        self.read(engine, sha256, Kind::Component, |artifact| {
            // SAFETY: as in `get`: written by `put_component` from `Component::serialize` into a
            // private directory, and checked against its trailer.
            unsafe { wasmtime::component::Component::deserialize(engine, artifact) }.ok()
        })
    }

    fn read<T>(
        &self,
        engine: &Engine,
        sha256: &[u8; 32],
        kind: Kind,
        deserialize: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<T> {
        if !self.trusted() {
            return None;
        }
        let path = self.path(engine, sha256, kind);
        let bytes = std::fs::read(&path).ok()?;
        let valid = bytes.len() > 32 && {
            let (artifact, trailer) = bytes.split_at(bytes.len() - 32);
            Sha256::digest(artifact).as_slice() == trailer
        };
        if valid && let Some(code) = deserialize(&bytes[..bytes.len() - 32]) {
            return Some(code);
        }
        tracing::warn!(path = %path.display(), "compiled-module cache entry is stale or corrupt; recompiling");
        let _ = std::fs::remove_file(&path);
        None
    }

    /// Store `module` for `sha256`. Failures only cost a recompile later, so they are logged.
    pub(crate) fn put(&self, engine: &Engine, sha256: &[u8; 32], module: &wasmtime::Module) {
        self.write(engine, sha256, Kind::Module, || module.serialize());
    }

    /// Store `component` for `sha256`, like [`ModuleCache::put`].
    pub(crate) fn put_component(
        &self,
        engine: &Engine,
        sha256: &[u8; 32],
        component: &wasmtime::component::Component,
    ) {
        self.write(engine, sha256, Kind::Component, || component.serialize());
    }

    fn write(
        &self,
        engine: &Engine,
        sha256: &[u8; 32],
        kind: Kind,
        serialize: impl FnOnce() -> wasmtime::Result<Vec<u8>>,
    ) {
        if !self.trusted() {
            return;
        }
        let path = self.path(engine, sha256, kind);
        let write = || -> std::io::Result<()> {
            let mut artifact = serialize().map_err(|e| std::io::Error::other(e.to_string()))?;
            let trailer = Sha256::digest(&artifact);
            artifact.extend_from_slice(&trailer);
            // Write then rename, so a reader never sees half an entry.
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &artifact)?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot write compiled-module cache entry");
        }
    }
}

/// What a cache entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Module,
    Component,
}
