//! File watching for hot reload: notify on the *directories* of the watched files (editors and
//! build tools rename over files, which silences a watch on the file itself), debouncing, and a
//! periodic rescan as a backstop for lost events.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Quiet time after the last event before a file counts as written.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often every watched file's size and mtime are compared, in case events were lost.
pub const RESCAN: Duration = Duration::from_secs(2);

/// Watches a set of files; changed paths arrive on the receiver, debounced.
pub struct Watcher {
    watcher: RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    /// Watched files and how many handlers (or the config) use each: two handlers may serve
    /// the same module file, and removing one must not stop reloads for the other.
    files: std::sync::Arc<std::sync::RwLock<HashMap<PathBuf, usize>>>,
}

impl Watcher {
    /// Start a watcher whose raw events go to `raw` (bounded: when it is full events are
    /// dropped, and the rescan catches what they would have said).
    pub fn new(raw: mpsc::Sender<PathBuf>) -> notify::Result<Self> {
        let files: std::sync::Arc<std::sync::RwLock<HashMap<PathBuf, usize>>> = Default::default();
        let wanted = files.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(
                event.kind,
                EventKind::Access(
                    notify::event::AccessKind::Open(_) | notify::event::AccessKind::Read
                )
            ) {
                return;
            }
            let Ok(wanted) = wanted.read() else { return };
            for path in event.paths {
                if wanted.contains_key(&path) {
                    let _ = raw.try_send(path);
                }
            }
        })?;
        Ok(Self {
            watcher,
            dirs: HashSet::new(),
            files,
        })
    }

    /// Watch `file` (its directory must exist).
    pub fn add(&mut self, file: &Path) -> notify::Result<()> {
        let file = absolute(file);
        let dir = file
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("/"));
        if self.dirs.insert(dir.clone()) {
            self.watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        }
        if let Ok(mut files) = self.files.write() {
            *files.entry(file).or_insert(0) += 1;
        }
        Ok(())
    }

    /// One user of `file` is gone; stop reporting it when it was the last. (Its directory stays
    /// watched: cheap, and other files may share it.)
    pub fn remove(&mut self, file: &Path) {
        if let Ok(mut files) = self.files.write() {
            let file = absolute(file);
            match files.get_mut(&file) {
                Some(users) if *users > 1 => *users -= 1,
                Some(_) => {
                    files.remove(&file);
                }
                None => {}
            }
        }
    }

    /// The watched files.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files
            .read()
            .map(|f| f.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// Absolute, lexically normalised form of `path` (not canonicalised: the file may not exist yet,
/// and a symlink swap should be seen at the path the config names).
pub fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What the rescan compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

/// The stamp of `path` now (`None` when it cannot be read).
pub fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// Paths whose stamp changed since `seen`; updates `seen`.
pub fn rescan(files: &[PathBuf], seen: &mut HashMap<PathBuf, Option<Stamp>>) -> Vec<PathBuf> {
    let mut changed = Vec::new();
    for file in files {
        let now = stamp(file);
        // A file seen for the first time is checked too: it may have changed between its load
        // and its first scan, and checking an unchanged file costs one hash.
        match seen.insert(file.clone(), now.clone()) {
            Some(before) if before == now => {}
            _ => changed.push(file.clone()),
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect_event(rx: &mut mpsc::Receiver<PathBuf>, want: &Path, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match rx.try_recv() {
                Ok(p) if p == want => return,
                Ok(_) => {}
                Err(_) if std::time::Instant::now() > deadline => panic!("no event for {what}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    #[test]
    fn reports_in_place_writes_renames_over_and_recreation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m.wasm");
        std::fs::write(&file, b"one").expect("write");
        let (tx, mut rx) = mpsc::channel(64);
        let mut watcher = Watcher::new(tx).expect("watcher");
        watcher.add(&file).expect("add");
        let file = absolute(&file);

        std::fs::write(&file, b"two").expect("write");
        expect_event(&mut rx, &file, "an in-place write");

        let tmp = dir.path().join(".m.wasm.tmp");
        std::fs::write(&tmp, b"three").expect("write");
        std::fs::rename(&tmp, &file).expect("rename");
        expect_event(&mut rx, &file, "a rename over the file");

        std::fs::remove_file(&file).expect("remove");
        expect_event(&mut rx, &file, "a delete");
        std::fs::write(&file, b"four").expect("write");
        expect_event(&mut rx, &file, "a re-creation");

        let other = dir.path().join("other.wasm");
        std::fs::write(&other, b"x").expect("write");
        while let Ok(p) = rx.try_recv() {
            assert_ne!(p, absolute(&other), "unwatched files are not reported");
        }
    }

    #[test]
    fn rescan_reports_first_sight_and_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m.wasm");
        std::fs::write(&file, b"one").expect("write");
        let mut seen = HashMap::new();
        let files = vec![file.clone()];
        assert_eq!(
            rescan(&files, &mut seen),
            files,
            "a file not seen before is checked once"
        );
        assert!(rescan(&files, &mut seen).is_empty());
        std::fs::write(&file, b"longer content").expect("write");
        assert_eq!(rescan(&files, &mut seen), files);
    }
}
