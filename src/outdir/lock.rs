//! One writer per output: an advisory lock (`flock`) on a file beside the output folder,
//! `.NAME.octet-lock`. Beside rather than inside, so that it stays put while a finished
//! folder is swapped in by rename, and works before the folder exists. The kernel drops the
//! lock when its holder dies, however it dies; the file also carries the holder's PID for the
//! message a second writer gets.
use crate::error::{OctetError, Result};
use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A held output lock; dropping it removes the lock file and releases the lock.
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    path: PathBuf,
}

/// The lock file guarding output folder `out` (an absolute path with a file name).
pub fn lock_path(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!(".{name}.octet-lock"))
}

impl OutputLock {
    /// Takes the lock of output folder `out` (resolved, with an existing parent), or says
    /// which process holds it. A lock file left by a process that died is taken over.
    pub fn acquire(out: &Path) -> Result<Self> {
        let path = lock_path(out);
        // Another writer may remove the file between our open and our lock: then the lock is
        // on a file nobody else will find, and we try again on the new one.
        for _ in 0..16 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| OctetError::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = read_pid(&mut file)
                        .map_or_else(|| "another process".to_string(), |p| format!("PID {p}"));
                    return Err(OctetError::InvalidArgument(format!(
                        "{}: another octet process ({holder}) is writing this output (lock \
                         file {}); wait for it to finish or stop it",
                        out.display(),
                        path.display()
                    )));
                }
                Err(TryLockError::Error(e)) => return Err(OctetError::io(&path, e)),
            }
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if !same {
                continue;
            }
            if let Some(pid) = read_pid(&mut file).filter(|&p| p != std::process::id()) {
                eprintln!(
                    "note: taking over the lock of {} left by PID {pid}, which is no longer \
                     running",
                    out.display()
                );
            }
            let io = |e| OctetError::io(&path, e);
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            writeln!(file, "{}", std::process::id()).map_err(io)?;
            file.sync_all().map_err(io)?;
            return Ok(OutputLock { file, path });
        }
        Err(OctetError::InvalidArgument(format!(
            "{}: the lock file keeps changing under us; is another octet writing it?",
            path.display()
        )))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so a waiter that opened this file retries on a new one.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid_and_the_lock_is_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().canonicalize().unwrap().join("out");
        let held = OutputLock::acquire(&out).unwrap();
        let err = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("PID {}", std::process::id())),
            "{err}"
        );
        drop(held);
        assert!(!lock_path(&out).exists());
        OutputLock::acquire(&out).unwrap();
    }

    #[test]
    fn a_lock_file_of_a_dead_process_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().canonicalize().unwrap().join("out");
        std::fs::write(lock_path(&out), "4194304\n").unwrap();
        let lock = OutputLock::acquire(&out).unwrap();
        let pid = std::fs::read_to_string(lock.path()).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
    }
}
