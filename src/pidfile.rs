//! The pid file.
//!
//! Owns checking, writing and removing it. A pid file that names a live raasd means
//! another server owns it: refuse to start rather than steal it. One that names a
//! dead process (or something that is not raasd) is stale and replaced. The file is
//! written whole through a rename, so a reader never sees it half-written, and it is
//! removed only while it still holds our pid.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::errors::plain;

/// A pid file this process wrote.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
    /// Set while renamed to .oldbin: the name to go back to.
    original: Option<PathBuf>,
}

/// Fails when `path` names a running raasd other than this process.
pub fn check_not_running(path: &Path) -> Result<(), String> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return Ok(());
    };
    if pid != std::process::id() && is_raasd(pid) {
        return Err(format!(
            "pid file {} names a running raasd (pid {pid}); stop it first",
            path.display()
        ));
    }
    Ok(())
}

/// Removes FILE.oldbin when it names no running raasd: left by an old master that
/// died during an upgrade, it would make the upgrade look unfinished for ever.
pub fn remove_stale_oldbin(path: &Path) -> Option<PathBuf> {
    let mut oldbin = path.as_os_str().to_owned();
    oldbin.push(".oldbin");
    let oldbin = PathBuf::from(oldbin);
    let pid = fs::read_to_string(&oldbin).ok()?.trim().parse::<u32>().ok();
    if pid.is_some_and(is_raasd) {
        return None;
    }
    fs::remove_file(&oldbin).ok()?;
    Some(oldbin)
}

fn is_raasd(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.starts_with("raasd"))
}

impl PidFile {
    /// Writes `pid` to `path`.
    pub fn write(path: &Path, pid: u32) -> Result<PidFile, String> {
        let fail =
            |e: io::Error| format!("cannot write pid file {}: {}", path.display(), plain(&e));
        let mut temp = path.as_os_str().to_owned();
        temp.push(format!(".{pid}.tmp"));
        let temp = PathBuf::from(temp);
        let written = fs::File::create(&temp)
            .and_then(|mut f| writeln!(f, "{pid}"))
            .and_then(|()| fs::rename(&temp, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(fail(e));
        }
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
            original: None,
        })
    }

    /// Fails as [`PidFile::write`] would, without taking the name: a master started
    /// by an upgrade checks at its start that it will be able to write FILE once it
    /// serves (until then FILE must stay free for a rollback).
    pub fn check_writable(path: &Path) -> Result<(), String> {
        let pid = std::process::id();
        let mut temp = path.as_os_str().to_owned();
        temp.push(format!(".{pid}.tmp"));
        let temp = PathBuf::from(temp);
        fs::File::create(&temp)
            .and_then(|_| fs::remove_file(&temp))
            .map_err(|e| format!("cannot write pid file {}: {}", path.display(), plain(&e)))
    }

    /// During an upgrade: FILE becomes FILE.oldbin, leaving FILE to the new master.
    pub fn rename_to_oldbin(&mut self) -> Result<(), String> {
        let mut oldbin = self.path.as_os_str().to_owned();
        oldbin.push(".oldbin");
        let oldbin = PathBuf::from(oldbin);
        fs::rename(&self.path, &oldbin).map_err(|e| {
            format!(
                "cannot rename pid file {} to {}: {}",
                self.path.display(),
                oldbin.display(),
                plain(&e)
            )
        })?;
        self.original = Some(std::mem::replace(&mut self.path, oldbin));
        Ok(())
    }

    /// After a failed upgrade: FILE.oldbin goes back to FILE.
    pub fn rename_back(&mut self) -> Result<(), String> {
        let Some(original) = self.original.take() else {
            return Ok(());
        };
        fs::rename(&self.path, &original).map_err(|e| {
            format!(
                "cannot rename pid file {} back to {}: {}",
                self.path.display(),
                original.display(),
                plain(&e)
            )
        })?;
        self.path = original;
        Ok(())
    }

    /// Removes the file if it still holds our pid (a successor may have replaced it).
    pub fn remove(&self) {
        let ours = fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim().parse::<u32>() == Ok(self.pid));
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_checked_and_removed() {
        let dir = std::env::temp_dir().join(format!("raasd-pidfile-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("raasd.pid");
        let file = PidFile::write(&path, 4_000_000).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "4000000\n");
        // No process has that pid, so the file is stale, not a running server.
        assert!(check_not_running(&path).is_ok());
        file.remove();
        assert!(!path.exists());
        let err = PidFile::write(&dir.join("no/such/dir/raasd.pid"), 1).unwrap_err();
        assert!(err.contains("cannot write pid file"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
