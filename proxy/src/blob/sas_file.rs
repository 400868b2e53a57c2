//! The upstream SAS mode: a container-scoped SAS kept in a file (a Secret, rotated by
//! whoever issues it). The file is checked on every request (one `stat`) and read again
//! when its size, modification time or inode changes, so a rotated SAS is used from the
//! next request on. A read that fails after the first keeps the SAS already read.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// What identifies one version of the file.
type Stamp = (Option<SystemTime>, u64, u64);

/// The SAS file and its last content.
#[derive(Debug)]
pub struct SasFile {
    /// The file.
    path: PathBuf,
    /// The stamp and SAS last read.
    last: Mutex<(Stamp, Arc<str>)>,
}

/// Why a SAS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SasFileError {
    /// Not readable.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// Not a SAS query string.
    #[error("{0} does not hold a SAS query string (sv=...&sig=...): {1}")]
    NotASas(String, &'static str),
}

impl SasFile {
    /// Reads the file once (at start or reload: an unusable file fails it).
    pub fn open(path: &Path) -> Result<Self, SasFileError> {
        let (stamp, sas) = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            last: Mutex::new((stamp, sas)),
        })
    }

    /// The SAS as the file holds it now.
    pub fn current(&self) -> Arc<str> {
        let stamp = std::fs::metadata(&self.path).map(|m| stamp(&m));
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if stamp.as_ref().is_ok_and(|s| *s == last.0) {
            return last.1.clone();
        }
        match read(&self.path) {
            Ok(next) => {
                tracing::info!(file = %self.path.display(), "upstream SAS file changed; using the new SAS");
                *last = next;
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream SAS file unusable; keeping the SAS read before");
            }
        }
        last.1.clone()
    }
}

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.modified().ok(), m.len(), m.ino())
}

/// Reads and checks the file: one line, an optional leading `?`, query characters only,
/// with `sig=` (a SAS without a signature is no credential).
fn read(path: &Path) -> Result<(Stamp, Arc<str>), SasFileError> {
    let name = || path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| SasFileError::Read(name(), e))?;
    let meta = file.metadata().map_err(|e| SasFileError::Read(name(), e))?;
    if meta.len() > 8192 {
        return Err(SasFileError::NotASas(name(), "longer than 8 KiB"));
    }
    let text = std::io::read_to_string(file).map_err(|e| SasFileError::Read(name(), e))?;
    let sas = text.trim().trim_start_matches('?');
    if sas.is_empty() {
        return Err(SasFileError::NotASas(name(), "the file is empty"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"%&=-._~:+/".contains(&b);
    if !sas.bytes().all(allowed) {
        return Err(SasFileError::NotASas(
            name(),
            "only query-string characters are allowed",
        ));
    }
    if !sas.split('&').any(|p| p.starts_with("sig=")) {
        return Err(SasFileError::NotASas(name(), "no sig= parameter"));
    }
    Ok((stamp(&meta), sas.into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_checks_and_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sas");
        std::fs::write(&path, "?sv=2022-11-02&sr=c&sp=rl&sig=AAA%3D\n").unwrap();
        let f = SasFile::open(&path).unwrap();
        assert_eq!(&*f.current(), "sv=2022-11-02&sr=c&sp=rl&sig=AAA%3D");
        std::fs::write(&path, "sv=2022-11-02&sr=c&sp=rwl&sig=BBBB%3D").unwrap();
        assert_eq!(&*f.current(), "sv=2022-11-02&sr=c&sp=rwl&sig=BBBB%3D");
        std::fs::write(&path, "not a sas").unwrap();
        assert_eq!(&*f.current(), "sv=2022-11-02&sr=c&sp=rwl&sig=BBBB%3D");
        for (text, why) in [
            ("", "empty"),
            ("sv=1&sp=r", "sig="),
            ("sv=1&sig=a b", "query-string"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = SasFile::open(&path).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        assert!(SasFile::open(&dir.path().join("absent")).is_err());
    }
}
