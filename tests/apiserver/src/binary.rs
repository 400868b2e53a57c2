//! Finding the kube-apiserver binary and etcd, and unpacking the compressed binary once
//! per build tree.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::Error;

/// Names the binary: a `kube-apiserver` executable, or an `.xz` of one.
pub const KUBE_APISERVER_ENV: &str = "KUBE_APISERVER";

/// The sha256 of the decompressed `../shared/bin/kube-apiserver.xz` (v1.36.2), as its
/// README publishes it: a truncated or swapped file fails loudly instead of half-starting.
pub const BUNDLED_SHA256: &str = "7b603ab70b3329fd2206e7ba0884d3fbe057791b9146f8d79948ab45ce641455";

/// The repository root: this crate lives at `tests/apiserver`.
pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The bundled binary's place beside the checkout.
pub(crate) fn bundled_path() -> PathBuf {
    repo_root().join("../shared/bin/kube-apiserver.xz")
}

/// Where cargo writes build output: `$CARGO_TARGET_DIR`, else `<repo>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => repo_root().join("target"),
    }
}

/// Where the binary comes from, before unpacking.
#[derive(Debug)]
pub(crate) enum Source {
    /// A path to use as is (or to unpack, when it ends in `.xz`), and whether it must
    /// match [`BUNDLED_SHA256`].
    Found { path: PathBuf, bundled: bool },
    /// Neither `KUBE_APISERVER` nor the bundled file exists; the text says what was tried.
    Absent(String),
}

/// Looks for the binary: `KUBE_APISERVER` first, then the bundled file.
pub(crate) fn locate() -> Result<Source, Error> {
    if let Some(value) = std::env::var_os(KUBE_APISERVER_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        // A variable that is set but wrong is a mistake to report, never a skip.
        if !path.is_file() {
            return Err(Error::Binary(format!(
                "{KUBE_APISERVER_ENV}={} is not a file",
                path.display()
            )));
        }
        return Ok(Source::Found {
            path,
            bundled: false,
        });
    }
    let bundled = bundled_path();
    if bundled.is_file() {
        return Ok(Source::Found {
            path: bundled,
            bundled: true,
        });
    }
    Ok(Source::Absent(format!(
        "{KUBE_APISERVER_ENV} is not set and {} does not exist",
        bundled.display()
    )))
}

/// An executable path for `source`: itself, or its decompressed copy in the target dir.
pub(crate) fn executable(path: &Path, bundled: bool) -> Result<PathBuf, Error> {
    if path.extension().is_none_or(|ext| ext != "xz") {
        return Ok(path.to_path_buf());
    }
    // One unpack per process at a time; other processes may race, see `unpack`.
    static UNPACKING: Mutex<()> = Mutex::new(());
    let _guard = UNPACKING.lock().unwrap_or_else(PoisonError::into_inner);
    let cached = target_dir().join(cache_name(path)?);
    if cached.is_file() {
        // Only a complete, checked file is ever renamed to this name.
        return Ok(cached);
    }
    unpack(path, &cached, bundled.then_some(BUNDLED_SHA256))?;
    Ok(cached)
}

/// A name that changes when the compressed file does (its path, size and mtime).
fn cache_name(path: &Path) -> Result<String, Error> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::Binary(format!("{}: {e}", path.display())))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut key = Sha256::new();
    key.update(path.as_os_str().as_encoded_bytes());
    key.update(meta.len().to_le_bytes());
    key.update(mtime.to_le_bytes());
    let digest = hex(&key.finalize());
    Ok(format!("kube-apiserver-{}", &digest[..16]))
}

/// Decompresses `xz` into a temporary file beside `dest`, checks its sha256, and renames
/// it into place: two test binaries racing both write whole files, and the rename of
/// either leaves a complete one.
fn unpack(xz: &Path, dest: &Path, expected_sha256: Option<&str>) -> Result<(), Error> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::Binary(format!("{}: {e}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        dest.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = unpack_to(xz, &tmp, expected_sha256).and_then(|()| {
        std::fs::rename(&tmp, dest)
            .map_err(|e| Error::Binary(format!("rename to {}: {e}", dest.display())))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Streams `xz -dc` into `tmp`, hashing as it goes.
fn unpack_to(xz: &Path, tmp: &Path, expected_sha256: Option<&str>) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;

    let mut child = Command::new("xz")
        .arg("-dc")
        .arg(xz)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: "xz (scripts/test-deps.sh installs it)".into(),
            source,
        })?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o755)
        .open(tmp)
        .map_err(|e| Error::Binary(format!("{}: {e}", tmp.display())))?;
    let mut hash = Sha256::new();
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::Binary("xz has no stdout pipe".into()))?;
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = stdout
            .read(&mut buf)
            .map_err(|e| Error::Binary(format!("reading xz output: {e}")))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::Binary(format!("{}: {e}", tmp.display())))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| Error::Binary(format!("xz: {e}")))?;
    if !output.status.success() {
        return Err(Error::Binary(format!(
            "xz -dc {} failed ({}): {}",
            xz.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    out.sync_all()
        .map_err(|e| Error::Binary(format!("{}: {e}", tmp.display())))?;
    let actual = hex(&hash.finalize());
    if let Some(expected) = expected_sha256
        && actual != expected
    {
        return Err(Error::Binary(format!(
            "{} decompresses to sha256 {actual}, expected {expected}",
            xz.display()
        )));
    }
    Ok(())
}

/// Finds `etcd` on PATH.
pub(crate) fn etcd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
