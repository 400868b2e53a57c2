//! A child process that cannot outlive the test process that started it.
//!
//! Each server runs under a small `sh` watchdog that holds the read end of a pipe from
//! the test process. When the write end closes (the [`Supervised`] value is dropped, the
//! test binary exits with it in a `static`, or the test binary is killed outright), the
//! watchdog kills the server and removes its directory. Nothing depends on destructors
//! running, so no `unsafe` signal handling is needed.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::Error;

/// The watchdog: starts `"$@"` in the background with its output in `$2`, prints its pid,
/// waits for end-of-file on stdin, then kills it and removes `$1` (when not empty).
/// Interrupts are ignored so that Ctrl-C on `cargo test` (which signals the whole process
/// group) still ends in the cleanup: the test process dies, the pipe closes.
const WATCHDOG: &str = r#"
trap '' INT TERM HUP
dir=$1 log=$2
shift 2
"$@" </dev/null >"$log" 2>&1 &
child=$!
echo "$child"
cat >/dev/null
kill -KILL "$child" 2>/dev/null
wait "$child" 2>/dev/null
if [ -n "$dir" ]; then rm -rf "$dir"; fi
"#;

/// One server process under its watchdog.
#[derive(Debug)]
pub(crate) struct Supervised {
    /// The program's name, for messages.
    name: String,
    /// The `sh` watchdog; waited for on drop so the server is gone when drop returns.
    watchdog: Child,
    /// Write end of the watchdog's stdin: closing it is the signal to stop.
    stdin: Option<ChildStdin>,
    /// Kept open so the watchdog never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
    /// The server's own pid, to tell whether it is still running.
    pid: u32,
    /// The server's combined stdout and stderr.
    log: PathBuf,
}

impl Supervised {
    /// Starts `program args` under a watchdog that removes `cleanup_dir` (if any) after it.
    pub(crate) fn spawn(
        program: &Path,
        args: &[String],
        log: PathBuf,
        cleanup_dir: Option<&Path>,
    ) -> Result<Self, Error> {
        let name = program.file_name().map_or_else(
            || program.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(cleanup_dir.map(Path::as_os_str).unwrap_or_default())
            .arg(&log)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: "sh".into(),
                source,
            })?;
        let stdin = watchdog.stdin.take();
        let stdout = watchdog.stdout.take().ok_or_else(|| Error::Start {
            what: name.clone(),
            detail: "the watchdog has no stdout pipe".into(),
        })?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|source| Error::Spawn {
            program: name.clone(),
            source,
        })?;
        let pid = line.trim().parse().map_err(|_| Error::Start {
            what: name.clone(),
            detail: format!("the watchdog printed {line:?} instead of a pid"),
        })?;
        Ok(Self {
            name,
            watchdog,
            stdin,
            _stdout: stdout,
            pid,
            log,
        })
    }

    /// Whether the server process is still running (not exited, not a zombie).
    pub(crate) fn is_running(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // The state follows the parenthesised command name: `pid (comm) S ...`.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
            Err(_) => false,
        }
    }

    /// The last `max` bytes of the server's log, for error messages.
    pub(crate) fn log_tail(&self, max: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let mut bytes = Vec::new();
            if file.read_to_end(&mut bytes).is_ok() {
                let start = bytes.len().saturating_sub(max);
                text = String::from_utf8_lossy(&bytes[start..]).into_owned();
            }
        }
        format!("{} log {}:\n{text}", self.name, self.log.display())
    }

    /// Where the server's output goes.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// Stops the server: closing the pipe tells the watchdog to kill it and clean up;
    /// waiting for the watchdog means the port (and the directory) are free on return.
    pub(crate) fn stop(&mut self) {
        drop(self.stdin.take());
        let _ = self.watchdog.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}
