//! Notices when files change on disk: the config and the serving certificate.
//!
//! Kubernetes updates ConfigMap and Secret volumes by swapping a `..data` symlink in the
//! mounted directory, so the parent directories are watched, not the files themselves.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Changes arriving within this window are handled as one: writers touch several files.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// A running watch; dropping it stops the watch.
pub struct FileWatch {
    /// Kept alive for as long as changes should be reported.
    _watcher: RecommendedWatcher,
    /// One message per burst of changes in a watched directory.
    changes: mpsc::Receiver<()>,
}

impl FileWatch {
    /// Watches the directories holding `files`.
    pub fn new(files: &[&Path]) -> notify::Result<Self> {
        let (tx, changes) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    // A full channel already holds a pending change, which is all we need.
                    let _ = tx.try_send(());
                }
            })?;
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        for dir in dirs {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        }
        Ok(Self {
            _watcher: watcher,
            changes,
        })
    }

    /// Waits for the next burst of changes; `None` when the watcher has stopped.
    pub async fn changed(&mut self) -> Option<()> {
        self.changes.recv().await?;
        tokio::time::sleep(DEBOUNCE).await;
        // Drop what arrived during the debounce window.
        while self.changes.try_recv().is_ok() {}
        Some(())
    }
}
