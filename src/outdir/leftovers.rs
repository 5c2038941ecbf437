//! Temporary folders left beside an output by a run that was killed: `.NAME.tmp-PID` (a
//! half-written output) and `.NAME.tmp-PID.old` (the previous output, moved aside for the
//! instant of the swap). Called while holding the output's lock, so no live octet is
//! writing them; a folder whose PID still runs is left alone all the same, and so is one that
//! only looks like a leftover (see [`made_by_octet`]).
use crate::error::{OctetError, Result};
use std::path::Path;

/// Whether `dir` is a folder octet made: it holds the output marker (written right after the
/// temporary folder is created) or an octet manifest, or it is still empty (a run killed in
/// between). Anything else named like a leftover is the user's and is never removed.
pub fn made_by_octet(dir: &Path) -> bool {
    let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    dir.is_dir()
        && (empty
            || dir.join(super::MARKER).is_file()
            || dir.join(crate::manifest::MANIFEST_FILE).is_file())
}

/// The temporary sibling a process `pid` writes output `out` into.
pub fn tmp_path(out: &Path, pid: u32) -> std::path::PathBuf {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!(".{name}.tmp-{pid}"))
}

/// Whether process `pid` is running. Without `/proc`, every process counts as running, so
/// nothing is removed on a guess.
pub fn pid_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// A leftover of a process that no longer runs, found beside an output.
pub struct Leftover {
    /// Its path.
    pub path: std::path::PathBuf,
    /// The process that left it.
    pub pid: u32,
    /// A previous output moved aside (`.old`) rather than a half-written one.
    pub old: bool,
}

/// The `.NAME.tmp-PID[.old]` entries beside `out` whose PID is neither this process nor a
/// running one. What they hold is not checked: the caller decides what is its own.
pub fn dead_leftovers(out: &Path) -> Vec<Leftover> {
    let Some(parent) = out.parent() else {
        return Vec::new();
    };
    let prefix = format!(
        ".{}.tmp-",
        out.file_name().unwrap_or_default().to_string_lossy()
    );
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            let (pid, old) = match rest.strip_suffix(".old") {
                Some(p) => (p, true),
                None => (rest, false),
            };
            Some(Leftover {
                path: e.path(),
                pid: pid.parse().ok()?,
                old,
            })
        })
        .filter(|l| l.pid != std::process::id() && !pid_alive(l.pid))
        .collect()
}

/// Removes the leftovers of dead processes beside `out`, saying so on stderr. A previous
/// output moved aside by a swap that never finished is put back when `out` is missing.
pub fn clean(out: &Path) -> Result<()> {
    let mut found = dead_leftovers(out);
    // Restore a moved-aside output before deleting anything.
    found.sort_by_key(|f| !f.old);
    for Leftover { path, pid, old } in found {
        if old && !out.exists() {
            std::fs::rename(&path, out).map_err(|e| OctetError::io(&path, e))?;
            eprintln!(
                "note: put back {} from {} (a replacement by PID {pid} was interrupted)",
                out.display(),
                path.display()
            );
            continue;
        }
        if !made_by_octet(&path) {
            eprintln!(
                "note: left {} alone: it is named like an octet leftover but octet did not \
                 write it",
                path.display()
            );
            continue;
        }
        std::fs::remove_dir_all(&path).map_err(|e| OctetError::io(&path, e))?;
        eprintln!(
            "note: removed {}, left by an octet run (PID {pid}) that did not finish",
            path.display()
        );
    }
    Ok(())
}
