//! The TPM's state directory: the permanent blob and the SaveState blob,
//! each written crash-safely (temp file, fsync, rename, fsync of the
//! directory), so a power cut leaves either the old or the new blob, never a
//! torn one. A lock file keeps two servers off the same directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The permanent state: EK, SRK, owner, NV, flags. Survives everything.
pub const PERMANENT_FILE: &str = "vtpm-permanent.bin";
/// The TPM_SaveState blob, consumed by Startup(ST_STATE).
pub const SAVESTATE_FILE: &str = "vtpm-savestate.bin";
const LOCK_FILE: &str = ".lock";

/// An opened, locked state directory.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Opens `dir` (creating it if needed) and takes its lock; fails if
    /// another server holds it.
    pub fn open(dir: &Path) -> io::Result<StateDir> {
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("state directory {} is in use by another server", dir.display()),
                ))
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        Ok(StateDir { dir: dir.to_path_buf(), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads a blob, `None` if it was never written.
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces a blob atomically and durably.
    pub fn write(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(name))?;
        self.sync_dir()
    }

    /// Removes a blob durably; absent is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.dir.join(name)) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Makes the rename or unlink itself durable.
    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let mut b = [0u8; 8];
        crate::platform::OsPlatform::fill(&mut b);
        let d = std::env::temp_dir().join(format!("vtpm-state-{tag}-{:016x}", u64::from_le_bytes(b)));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_read_replace_remove() {
        let d = tempdir("rw");
        let s = StateDir::open(&d).unwrap();
        assert_eq!(s.read(PERMANENT_FILE).unwrap(), None);
        s.write(PERMANENT_FILE, b"one").unwrap();
        s.write(PERMANENT_FILE, b"two").unwrap();
        assert_eq!(s.read(PERMANENT_FILE).unwrap().as_deref(), Some(&b"two"[..]));
        assert!(!d.join("vtpm-permanent.bin.tmp").exists());
        s.remove(PERMANENT_FILE).unwrap();
        s.remove(PERMANENT_FILE).unwrap();
        assert_eq!(s.read(PERMANENT_FILE).unwrap(), None);
        drop(s);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_second_server_cannot_open_the_same_directory() {
        let d = tempdir("lock");
        let first = StateDir::open(&d).unwrap();
        let second = StateDir::open(&d).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock);
        drop(first);
        StateDir::open(&d).unwrap();
        fs::remove_dir_all(d).unwrap();
    }
}
