//! ds4's single-instance lock (ds4-features.md §0.2): every process that loads a model for
//! inference (`run`, `chat`, `serve`, `bench`) holds an exclusive, non-blocking `flock` on
//! `/tmp/ds4.lock` (`DS4_LOCK_FILE` overrides the path) with its pid written in the file, for
//! its whole life; the kernel releases it when the process ends, however it ends. A second
//! such process exits with status 2 and ds4's line
//! `ds4: another ds4 process is already running (pid N); refusing to start`.
//! A lock file that cannot be opened or locked (permissions, a filesystem without `flock`)
//! is a warning, not an error: the process runs without the lock.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// ds4's lock path.
pub const DEFAULT_LOCK_FILE: &str = "/tmp/ds4.lock";

/// The lock path: `DS4_LOCK_FILE` if set and not empty, else [`DEFAULT_LOCK_FILE`].
pub fn lock_path() -> PathBuf {
    match std::env::var_os("DS4_LOCK_FILE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_LOCK_FILE),
    }
}

/// Held for the life of the process (dropping it closes the file, which releases the lock).
#[derive(Debug)]
pub struct InstanceLock {
    _file: Option<File>,
}

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it; its pid as written in the file, if readable.
    Held(Option<u32>),
}

impl LockError {
    /// ds4's line.
    pub fn message(&self) -> String {
        match self {
            LockError::Held(Some(pid)) => format!(
                "ds4: another ds4 process is already running (pid {pid}); refusing to start"
            ),
            LockError::Held(None) => {
                "ds4: another ds4 process is already running (pid unknown); refusing to start"
                    .to_string()
            }
        }
    }
}

/// Take the lock at `path`: `Err(Held)` if another process holds it; `Ok` with no file (after
/// one warning on stderr) if the file cannot be opened or locked at all.
pub fn acquire_at(path: &Path) -> Result<InstanceLock, LockError> {
    let warn = |what: &str, e: &std::io::Error| {
        eprintln!(
            "ds4: warning: cannot {what} the lock file {}: {e}; running without the single-instance lock",
            path.display()
        );
        Ok(InstanceLock { _file: None })
    };
    // No truncation at open: the holder's pid must survive a failed attempt. A symlink is not
    // followed (a link planted in /tmp must not make us truncate the file it points to). A
    // lock file another user created (not writable for us) is still locked, read-only: the
    // lock then holds across users, only the pid is not written.
    let open = |write: bool| {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(write)
            .create(write)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW);
        o.open(path)
    };
    let (mut file, writable) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => match open(false) {
            Ok(f) => (f, false),
            Err(e) => return warn("open", &e),
        },
        Err(e) => return warn("open", &e),
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return warn("use", &std::io::Error::other("not a regular file"));
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            return Err(LockError::Held(s.trim().parse().ok()));
        }
        Err(TryLockError::Error(e)) => return warn("lock", &e),
    }
    // Ours: replace whatever pid is there with ours. A failed write only loses the pid.
    if !writable {
        return Ok(InstanceLock { _file: Some(file) });
    }
    let _ = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.flush());
    Ok(InstanceLock { _file: Some(file) })
}

/// Take the lock at [`lock_path`]; when another process holds it, print ds4's line and exit
/// with status 2.
pub fn acquire_or_exit() -> InstanceLock {
    match acquire_at(&lock_path()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{}", e.message());
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_file_is_refused_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ds4.lock");
        let held = acquire_at(&p).unwrap();
        assert!(held._file.is_some());
        let pid = std::process::id();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{pid}\n"));
        // flock locks belong to the open file description: a second open in the same process
        // conflicts like another process would.
        let e = acquire_at(&p).unwrap_err();
        assert_eq!(
            e.message(),
            format!("ds4: another ds4 process is already running (pid {pid}); refusing to start")
        );
        // The failed attempt left the holder's pid in place.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{pid}\n"));
        // Another path does not collide.
        let other = acquire_at(&dir.path().join("other.lock")).unwrap();
        drop(other);
        drop(held);
        let again = acquire_at(&p).unwrap();
        assert!(again._file.is_some());
    }

    #[test]
    fn unopenable_lock_file_is_only_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let l = acquire_at(&dir.path().join("no/such/dir/ds4.lock")).unwrap();
        assert!(l._file.is_none());
    }

    #[test]
    fn garbage_pid_reads_as_unknown() {
        assert!(LockError::Held(None).message().contains("(pid unknown)"));
        // A held lock whose file holds no pid: the refusal says so instead of a wrong pid.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ds4.lock");
        let held = acquire_at(&path).unwrap();
        std::fs::write(&path, "junk\n").unwrap();
        assert!(matches!(acquire_at(&path), Err(LockError::Held(None))));
        drop(held);
    }

    #[test]
    fn a_symlinked_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let link = dir.path().join("ds4.lock");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        // Refused with a warning (no lock), and the file the link points to is untouched.
        let l = acquire_at(&link).unwrap();
        assert!(l._file.is_none());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    }
}
