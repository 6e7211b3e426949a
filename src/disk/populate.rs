//! Writing the flattened rootfs into a folder (the mounted root filesystem of a disk).
//!
//! Every path is opened relative to the root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` for its parent folder and a final `O_NOFOLLOW` / `*at(…,
//! AT_SYMLINK_NOFOLLOW)` call, so no symlink of the image — absolute or relative, planted in
//! any layer — can make a write land outside the root. File content is written with `write`,
//! never seeked over, so every block is allocated: syslinux's ext4 reader cannot read files
//! with holes. Folder times are set last, deepest first, once their children exist.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};

use crate::flatten::path::parent;
use crate::tarfmt::{Kind, Meta};
use crate::target::EntryOut;

fn failed(e: impl Into<std::io::Error>, what: &str, path: &str) -> anyhow::Error {
    let e: std::io::Error = e.into();
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return anyhow!(
            "the disk's filesystem is full while writing /{path}: pass a larger --size (or --size auto)"
        );
    }
    anyhow!(e).context(format!("{what} /{path}"))
}

fn last_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn mode(m: &Meta) -> Mode {
    Mode::from_raw_mode(m.mode & 0o7777)
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn owner(m: &Meta) -> (Option<Uid>, Option<Gid>) {
    (
        Some(Uid::from_raw(m.uid as u32)),
        Some(Gid::from_raw(m.gid as u32)),
    )
}

/// Writes entries below a root folder.
pub struct DirOut {
    root: OwnedFd,
    /// The parent folder opened last (files of one folder usually come together).
    parent: Option<(String, OwnedFd)>,
    file: Option<(String, File, Meta)>,
    /// Folders whose times are set at the end.
    dirs: Vec<(String, u64)>,
    written: u64,
}

impl DirOut {
    pub fn new(root: &Path) -> Result<Self> {
        let root = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", root.display()))?;
        Ok(Self {
            root,
            parent: None,
            file: None,
            dirs: Vec::new(),
            written: 0,
        })
    }

    /// Bytes of file content written.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Open the folder `dir` (relative to the root) without following any symlink and without
    /// leaving the root.
    fn open_beneath(&self, dir: &str, flags: OFlags) -> Result<OwnedFd> {
        let path = if dir.is_empty() { "." } else { dir };
        rustix::fs::openat2(
            &self.root,
            path,
            flags | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| {
            if [
                rustix::io::Errno::LOOP,
                rustix::io::Errno::XDEV,
                rustix::io::Errno::NOTDIR,
            ]
            .contains(&e)
            {
                anyhow!("refusing to write below /{dir}: a symlink or a file is in the way")
            } else {
                failed(e, "opening", dir)
            }
        })
    }

    /// The parent folder of `path`, opened as an `O_PATH` descriptor.
    fn parent_fd(&mut self, path: &str) -> Result<BorrowedFd<'_>> {
        let dir = parent(path);
        if self.parent.as_ref().is_none_or(|(d, _)| d != dir) {
            let fd = self.open_beneath(dir, OFlags::PATH)?;
            self.parent = Some((dir.to_string(), fd));
        }
        Ok(self.parent.as_ref().expect("set above").1.as_fd())
    }

    /// Create the regular file `path` afresh: never open what is there. Whatever the image (or
    /// an earlier entry) left at the name — a device node, a FIFO, a symlink, another file —
    /// is unlinked first, so a write can never reach a host device, block on a FIFO or follow
    /// a link; a folder in the way is an error.
    fn create_file(&mut self, path: &str) -> Result<OwnedFd> {
        let flags = OFlags::WRONLY
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::NONBLOCK
            | OFlags::CLOEXEC;
        let name = last_name(path);
        let pfd = self.parent_fd(path)?;
        match rustix::fs::openat(pfd, name, flags, Mode::from_raw_mode(0o600)) {
            Err(rustix::io::Errno::EXIST) => {
                rustix::fs::unlinkat(pfd, name, AtFlags::empty()).map_err(|e| {
                    if e == rustix::io::Errno::ISDIR {
                        anyhow!("refusing to write the file /{path}: a folder is in the way")
                    } else {
                        failed(e, "replacing", path)
                    }
                })?;
                rustix::fs::openat(pfd, name, flags, Mode::from_raw_mode(0o600))
            }
            r => r,
        }
        .map_err(|e| failed(e, "creating", path))
    }

    /// Owner, then mode (chown clears set-id bits), then xattrs (chown clears
    /// `security.capability`), on an open file or folder.
    fn fd_meta(fd: BorrowedFd<'_>, meta: &Meta, path: &str) -> Result<()> {
        let (u, g) = owner(meta);
        rustix::fs::fchown(fd, u, g).map_err(|e| failed(e, "setting the owner of", path))?;
        rustix::fs::fchmod(fd, mode(meta)).map_err(|e| failed(e, "setting the mode of", path))?;
        for (k, v) in &meta.xattrs {
            rustix::fs::fsetxattr(fd, k.as_str(), v, XattrFlags::empty())
                .map_err(|e| failed(e, &format!("setting the {k} attribute of"), path))?;
        }
        Ok(())
    }

    fn mkdir(&mut self, path: &str, meta: &Meta) -> Result<()> {
        if !path.is_empty() {
            let pfd = self.parent_fd(path)?;
            match rustix::fs::mkdirat(pfd, last_name(path), Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(failed(e, "creating the folder", path)),
            }
        }
        let fd = self.open_beneath(path, OFlags::RDONLY)?;
        Self::fd_meta(fd.as_fd(), meta, path)?;
        self.dirs.push((path.to_string(), meta.mtime));
        Ok(())
    }

    fn special(&mut self, path: &str, meta: &Meta) -> Result<()> {
        if let Kind::Hardlink(target) = &meta.kind {
            // A hard link shares its target's metadata.
            let tfd = self.open_beneath(parent(target), OFlags::PATH)?;
            let pfd = self.parent_fd(path)?;
            return rustix::fs::linkat(
                &tfd,
                last_name(target),
                pfd,
                last_name(path),
                AtFlags::empty(),
            )
            .map_err(|e| failed(e, "creating the hard link", path));
        }
        let pfd = self.parent_fd(path)?;
        let name = last_name(path);
        let made = match &meta.kind {
            Kind::Symlink(target) => rustix::fs::symlinkat(target.as_str(), pfd, name),
            Kind::Char(ma, mi) => rustix::fs::mknodat(
                pfd,
                name,
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(*ma, *mi),
            ),
            Kind::Block(ma, mi) => rustix::fs::mknodat(
                pfd,
                name,
                FileType::BlockDevice,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(*ma, *mi),
            ),
            Kind::Fifo => {
                rustix::fs::mknodat(pfd, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
            }
            Kind::Dir | Kind::File | Kind::Hardlink(_) => unreachable!("handled elsewhere"),
        };
        made.map_err(|e| failed(e, "creating", path))?;
        let (u, g) = owner(meta);
        rustix::fs::chownat(pfd, name, u, g, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| failed(e, "setting the owner of", path))?;
        if !matches!(meta.kind, Kind::Symlink(_)) {
            rustix::fs::chmodat(pfd, name, mode(meta), AtFlags::empty())
                .map_err(|e| failed(e, "setting the mode of", path))?;
        }
        if !meta.xattrs.is_empty() {
            // The l* call does not follow the entry itself; the folder is reached through its
            // descriptor, so nothing outside the root can be named.
            use std::os::fd::AsRawFd;
            let proc = format!("/proc/self/fd/{}/{name}", pfd.as_raw_fd());
            for (k, v) in &meta.xattrs {
                rustix::fs::lsetxattr(proc.as_str(), k.as_str(), v, XattrFlags::empty())
                    .map_err(|e| failed(e, &format!("setting the {k} attribute of"), path))?;
            }
        }
        rustix::fs::utimensat(pfd, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| failed(e, "setting the time of", path))
    }

    /// Set the folders' times, deepest first (creating children changed them).
    pub fn finish(mut self) -> Result<()> {
        self.dirs.sort_by(|a, b| b.0.cmp(&a.0));
        for (path, mtime) in std::mem::take(&mut self.dirs) {
            let fd = self.open_beneath(&path, OFlags::RDONLY)?;
            rustix::fs::futimens(&fd, &times(mtime))
                .map_err(|e| failed(e, "setting the time of", &path))?;
        }
        Ok(())
    }
}

impl EntryOut for DirOut {
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        match meta.kind {
            Kind::Dir => self.mkdir(path, meta),
            Kind::File => {
                let fd = self.create_file(path)?;
                self.file = Some((path.to_string(), File::from(fd), meta.clone()));
                Ok(())
            }
            _ => self.special(path, meta),
        }
    }

    fn data(&mut self, buf: &[u8]) -> Result<()> {
        let (path, f, _) = self.file.as_mut().context("data outside a file entry")?;
        f.write_all(buf).map_err(|e| failed(e, "writing", path))?;
        self.written += buf.len() as u64;
        Ok(())
    }

    fn end(&mut self, _size: u64) -> Result<()> {
        if let Some((path, f, meta)) = self.file.take() {
            Self::fd_meta(f.as_fd(), &meta, &path)?;
            rustix::fs::futimens(&f, &times(meta.mtime))
                .map_err(|e| failed(e, "setting the time of", &path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(kind: Kind, mode: u32) -> Meta {
        let mut m = Meta::new(kind, mode, 0, 1_000_000);
        m.uid = rustix::process::geteuid().as_raw() as u64;
        m.gid = rustix::process::getegid().as_raw() as u64;
        m
    }

    #[test]
    fn writes_never_follow_a_symlink_out_of_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut w = DirOut::new(root.path()).unwrap();
        let target = outside.path().display().to_string();
        w.entry("a", &meta(Kind::Symlink(target.clone()), 0o777), &[])
            .unwrap();
        w.entry("rel", &meta(Kind::Symlink("../..".into()), 0o777), &[])
            .unwrap();
        for p in ["a/b", "rel/b", "a/x/y"] {
            let e = w.entry(p, &meta(Kind::File, 0o644), b"x").unwrap_err();
            assert!(format!("{e:#}").contains("is in the way"), "{p}: {e:#}");
        }
        // A file entry over an existing symlink replaces the link, nothing behind it.
        w.entry("a", &meta(Kind::File, 0o644), b"x").unwrap();
        assert!(std::fs::symlink_metadata(root.path().join("a"))
            .unwrap()
            .is_file());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_file_over_a_fifo_or_a_folder_never_opens_it() {
        let root = tempfile::tempdir().unwrap();
        let mut w = DirOut::new(root.path()).unwrap();
        // Opening a FIFO for writing would block for ever: it is replaced instead.
        w.entry("p", &meta(Kind::Fifo, 0o600), &[]).unwrap();
        w.entry("p", &meta(Kind::File, 0o600), b"data").unwrap();
        assert_eq!(std::fs::read(root.path().join("p")).unwrap(), b"data");
        w.entry("d", &meta(Kind::Dir, 0o755), &[]).unwrap();
        let e = w.entry("d", &meta(Kind::File, 0o644), b"x").unwrap_err();
        assert!(format!("{e:#}").contains("a folder is in the way"), "{e:#}");
    }

    #[test]
    fn files_folders_links_and_times() {
        let root = tempfile::tempdir().unwrap();
        let mut w = DirOut::new(root.path()).unwrap();
        w.entry("d", &meta(Kind::Dir, 0o750), &[]).unwrap();
        w.entry("d/f", &meta(Kind::File, 0o640), b"hello").unwrap();
        w.entry("d/h", &meta(Kind::Hardlink("d/f".into()), 0), &[])
            .unwrap();
        w.entry("d/p", &meta(Kind::Fifo, 0o600), &[]).unwrap();
        assert_eq!(w.written(), 5);
        w.finish().unwrap();
        use std::os::unix::fs::MetadataExt;
        let d = std::fs::metadata(root.path().join("d")).unwrap();
        assert_eq!(d.mode() & 0o7777, 0o750);
        assert_eq!(d.mtime(), 1_000_000, "folder time set after its children");
        let f = std::fs::metadata(root.path().join("d/f")).unwrap();
        assert_eq!(
            (f.mode() & 0o7777, f.nlink(), f.mtime()),
            (0o640, 2, 1_000_000)
        );
        assert_eq!(std::fs::read(root.path().join("d/h")).unwrap(), b"hello");
    }
}
