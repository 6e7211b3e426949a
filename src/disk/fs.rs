//! The filesystem step: how big the root filesystem must be, `mke2fs` with options syslinux can
//! read, and the loop device and mount the copy goes through — each a guard that is released on
//! success, on error and after Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::flatten::tree::{Node, Tree};
use crate::tarfmt::Kind;

const MIB: u64 = 1 << 20;
/// Filesystem block size.
pub const BLOCK: u64 = 4096;
/// Bytes per inode in an ext4 inode table.
const INODE_SIZE: u64 = 256;
/// One inode per this many bytes of filesystem at least (mke2fs's default ratio), so a disk
/// grown later keeps a sensible number of inodes.
const INODE_RATIO: u64 = 16384;
/// A symlink target this long or longer needs a data block (shorter ones live in the inode).
const FAST_SYMLINK_MAX: usize = 59;
/// Bytes a folder entry takes, on average (8 bytes of header + the name, rounded).
const DIRENT: u64 = 32;
/// Room for what the tool adds: extlinux's `ldlinux.sys` and `ldlinux.c32`, its config, fstab.
const BOOT_FILES: u64 = MIB;

/// What the rootfs needs from a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of data blocks: file content, folder blocks, long symlink targets.
    pub bytes: u64,
    /// Inodes: one per file, folder, symlink, device (hard links share one).
    pub inodes: u64,
}

/// Count the blocks and inodes of the flattened tree.
pub fn usage(tree: &Tree) -> Usage {
    let blocks = |n: u64| n.div_ceil(BLOCK) * BLOCK;
    let mut bytes = BOOT_FILES;
    let mut inodes = 0u64;
    let mut children: std::collections::HashMap<&str, u64> = Default::default();
    let mut seen = vec![false; tree.inodes.len()];
    for (p, e) in &tree.entries {
        *children.entry(crate::flatten::path::parent(p)).or_default() += 1;
        match &e.node {
            Node::Dir(_) => inodes += 1,
            Node::Inode(n) => {
                let n = *n as usize;
                if std::mem::replace(&mut seen[n], true) {
                    continue;
                }
                inodes += 1;
                let m = &tree.inodes[n].meta;
                match &m.kind {
                    Kind::File => bytes += blocks(m.size),
                    Kind::Symlink(t) if t.len() >= FAST_SYMLINK_MAX => bytes += BLOCK,
                    _ => {}
                }
            }
        }
    }
    // Folders: at least one block each, more for large ones. The root is not in the tree.
    let dirs = tree
        .entries
        .iter()
        .filter(|(_, e)| matches!(e.node, Node::Dir(_)))
        .map(|(p, _)| p.as_str())
        .chain(std::iter::once(""));
    for d in dirs {
        let n = children.get(d).copied().unwrap_or(0);
        bytes += blocks((n * DIRENT).max(1));
    }
    Usage {
        bytes,
        inodes: inodes + 16,
    }
}

/// The journal for a filesystem holding `used` bytes (passed to mke2fs, so the size below does
/// not depend on mke2fs's own choice).
pub fn journal_bytes(used: u64) -> u64 {
    match used {
        u if u < 512 * MIB => 16 * MIB,
        u if u < 4096 * MIB => 64 * MIB,
        _ => 128 * MIB,
    }
}

/// Inodes to create on a filesystem of `fs_bytes`: the rootfs's plus a quarter and 1024 more,
/// and never fewer than mke2fs's default of one per 16 KiB.
pub fn inode_count(u: Usage, fs_bytes: u64) -> u64 {
    (u.inodes + u.inodes / 4 + 1024).max(fs_bytes / INODE_RATIO)
}

/// Smallest filesystem that holds the rootfs:
/// `data + journal + inodes × 256 + 1/64 of the filesystem (bitmaps, group descriptors and the
/// blocks reserved to grow them, extent trees) + 4 MiB`, rounded up to a MiB.
pub fn min_fs_bytes(u: Usage) -> u64 {
    let fixed = u.bytes + journal_bytes(u.bytes) + 4 * MIB;
    let mut fs = fixed;
    // The inode count depends on the size; a few rounds reach the fixed point.
    for _ in 0..8 {
        fs = fixed + inode_count(u, fs) * INODE_SIZE + fs / 64;
    }
    fs.div_ceil(MIB) * MIB
}

/// `--size auto`: the smallest filesystem plus headroom of a fifth of the data, at least
/// 64 MiB, rounded up to a MiB.
pub fn auto_fs_bytes(u: Usage) -> u64 {
    let headroom = (u.bytes / 5).max(64 * MIB);
    (min_fs_bytes(u) + headroom).div_ceil(MIB) * MIB
}

/// Parse `--size`: `auto`, or a number with an optional K/M/G/T suffix (powers of 1024;
/// a bare number is bytes).
pub fn parse_size(s: &str) -> Result<Option<u64>> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let lower = t.to_ascii_lowercase();
    let body = lower.trim_end_matches('b').trim_end_matches('i');
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        _ => (body, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .with_context(|| format!("--size {s:?}: expected `auto` or a size like 2G, 1536M"))?;
    Ok(Some((n * mult as f64) as u64))
}

/// Human-readable MiB/GiB.
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes.div_ceil(MIB))
    }
}

/// Whether process `pid` is gone (a leftover named after it is then nobody's).
fn dead(pid: u32) -> bool {
    match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) => rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH),
        None => false,
    }
}

/// The PID in an abox temporary name — `abox-mnt-PID-N` (a mount point) or `.NAME.abox-tmp-PID`
/// (an output being written) — when it is one a process can have (≤ the kernel's pid_max).
fn pid_of(name: &str) -> Option<u32> {
    let pid: u32 = if let Some(rest) = name.strip_prefix("abox-mnt-") {
        rest.split('-').next()?.parse().ok()?
    } else if name.starts_with('.') {
        name.rsplit_once(".abox-tmp-")?.1.parse().ok()?
    } else {
        return None;
    };
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(4_194_304);
    (pid > 0 && pid <= max).then_some(pid)
}

/// Release what an abox that died without cleaning up (SIGKILL, a crash, a power cut) left:
/// its mounts under the temporary folder, loop devices over its temporary disks, and its
/// temporary files in `out_dir`. Only abox's own names with the PID of a process that no longer
/// exists are touched. Returns one line per thing released; a thing that cannot be released is
/// an error saying exactly what it is and how to remove it.
pub fn reap_stale(out_dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let tmp = std::env::temp_dir();
    // Mounts first (a mount holds its loop device).
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let Some(target) = line.split(' ').nth(4) else {
            continue;
        };
        let target = PathBuf::from(target);
        let Some(name) = target.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if target.parent() != Some(tmp.as_path()) || !name.starts_with("abox-mnt-") {
            continue;
        }
        if !pid_of(name).is_some_and(dead) {
            continue;
        }
        if cmd::run(Command::new("umount").arg(&target)).is_err() {
            cmd::run(Command::new("umount").arg("--lazy").arg(&target)).with_context(|| {
                format!(
                    "a dead abox left {} mounted; remove it with `umount {0}`",
                    target.display()
                )
            })?;
        }
        let _ = std::fs::remove_dir(&target);
        done.push(format!(
            "unmounted {} (left by an abox that died)",
            target.display()
        ));
    }
    // Loop devices over a dead abox's temporary disk files.
    if let Ok(rd) = std::fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let Ok(back) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            let back = back.trim().trim_end_matches(" (deleted)");
            let back_path = Path::new(back);
            let file = back_path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Only over an abox temporary disk in this output folder.
            let here = back_path.parent().and_then(|p| p.canonicalize().ok())
                == out_dir.canonicalize().ok();
            if !(here && pid_of(file).is_some_and(dead)) {
                continue;
            }
            let dev = format!("/dev/{name}");
            cmd::run(Command::new("losetup").args(["--detach", &dev])).with_context(|| {
                format!("a dead abox left {dev} attached to {back}; remove it with `losetup --detach {dev}`")
            })?;
            done.push(format!(
                "detached {dev} from {back} (left by an abox that died)"
            ));
        }
    }
    // Its temporary files in the output folder.
    if let Ok(rd) = std::fs::read_dir(out_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let file = e.file_type().is_ok_and(|t| t.is_file());
            if file && name.starts_with('.') && pid_of(&name).is_some_and(dead) {
                std::fs::remove_file(e.path()).with_context(|| {
                    format!("a dead abox left {}; remove it by hand", e.path().display())
                })?;
                done.push(format!(
                    "removed {} (left by an abox that died)",
                    e.path().display()
                ));
            }
        }
    }
    Ok(done)
}

/// Loop devices and mounts need root (a later version will not).
pub fn require_root() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("writing a disk needs root for now (a loop device and a mount): run abox as root, e.g. with sudo");
    }
    Ok(())
}

/// `mke2fs` with features syslinux 6.04's ext4 reader understands: no `64bit`,
/// `metadata_csum_seed` or `orphan_file` (newer e2fsprogs turn some of them on by default).
/// Inode tables and the journal are left for the kernel to initialise lazily, so the copy only
/// writes what the rootfs needs.
pub fn mkfs(dev: &str, fs_bytes: u64, u: Usage, uuid: &str, label: &str) -> Result<()> {
    let journal_mib = journal_bytes(u.bytes) / MIB;
    cmd::run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                &BLOCK.to_string(),
                "-m",
                "1",
            ])
            .args(["-N", &inode_count(u, fs_bytes).to_string()])
            .args(["-J", &format!("size={journal_mib}")])
            .args(["-U", uuid, "-L", label])
            .args(["-O", "^64bit,^metadata_csum_seed,^orphan_file"])
            .args([
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
            ])
            .arg(dev),
    )
    .map(|_| ())
}

/// A loop device over a byte range of a file (one per partition: `losetup -P` creates no
/// partition nodes on some machines). Detached when dropped.
pub struct Loop {
    dev: String,
    attached: bool,
    /// Dropped after the detach: a second Ctrl-C waits for it.
    _held: crate::signals::Held,
}

impl Loop {
    pub fn attach(file: &Path, offset: u64, size: u64) -> Result<Self> {
        let held = crate::signals::hold();
        let out = cmd::run(
            Command::new("losetup")
                .args(["--find", "--show"])
                .args(["--offset", &offset.to_string()])
                .args(["--sizelimit", &size.to_string()])
                .arg(file),
        )
        .context("attaching a loop device (is the `loop` module loaded?)")?;
        let dev = String::from_utf8_lossy(&out).trim().to_string();
        if !dev.starts_with("/dev/") {
            bail!("losetup printed {dev:?} instead of a device");
        }
        log::debug!("attached {dev} to {}", file.display());
        Ok(Self {
            dev,
            attached: true,
            _held: held,
        })
    }

    pub fn dev(&self) -> &str {
        &self.dev
    }

    pub fn detach(mut self) -> Result<()> {
        self.attached = false;
        cmd::run(Command::new("losetup").args(["--detach", &self.dev])).map(|_| ())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = cmd::run(Command::new("losetup").args(["--detach", &self.dev])) {
                log::warn!("could not detach {}: {e:#}", self.dev);
            }
        }
    }
}

/// A mount on a private temporary folder. Unmounted (lazily if busy) and the folder removed
/// when dropped.
pub struct Mount {
    dir: PathBuf,
    mounted: bool,
    /// Dropped after the unmount: a second Ctrl-C waits for it.
    _held: crate::signals::Held,
}

impl Mount {
    pub fn new(dev: &str) -> Result<Self> {
        let base = std::env::temp_dir();
        let mut n = 0;
        let dir = loop {
            let d = base.join(format!("abox-mnt-{}-{n}", std::process::id()));
            match std::fs::create_dir(&d) {
                Ok(()) => break d,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating a mount point in {}", base.display()))
                }
            }
        };
        let mut m = Self {
            dir,
            mounted: false,
            _held: crate::signals::hold(),
        };
        // noinit_itable: no background zeroing of inode tables while we copy. nodev, nosuid,
        // noexec: a device node, set-id file or program of the image is inert on this host
        // while abox works in it (opening an image's /dev/sda node would reach the host's).
        cmd::run(
            Command::new("mount")
                .args([
                    "-t",
                    "ext4",
                    "-o",
                    "noatime,noinit_itable,nodev,nosuid,noexec",
                    dev,
                ])
                .arg(&m.dir),
        )?;
        m.mounted = true;
        Ok(m)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Unmount (flushing everything to the device) and report any error.
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        cmd::run(Command::new("umount").arg(&self.dir))?;
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted && cmd::run(Command::new("umount").arg(&self.dir)).is_err() {
            if let Err(e) = cmd::run(Command::new("umount").arg("--lazy").arg(&self.dir)) {
                log::warn!("could not unmount {}: {e:#}", self.dir.display());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_carry_their_pid() {
        assert_eq!(pid_of("abox-mnt-4242-0"), Some(4242));
        assert_eq!(pid_of(".base.qcow2.raw.abox-tmp-77"), Some(77));
        assert_eq!(pid_of(".x.abox-tmp-notapid"), None);
        assert_eq!(
            pid_of(".notes.txt.tmp-77"),
            None,
            "another program's temporary file"
        );
        assert_eq!(pid_of(".x.abox-tmp-4294967295"), None, "beyond pid_max");
        assert_eq!(pid_of("base.qcow2"), None);
        assert!(!dead(std::process::id()));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("auto").unwrap(), None);
        assert_eq!(parse_size("2G").unwrap(), Some(2 << 30));
        assert_eq!(parse_size("1536MiB").unwrap(), Some(1536 << 20));
        assert_eq!(parse_size("1.5g").unwrap(), Some(3 << 29));
        assert_eq!(parse_size("4096").unwrap(), Some(4096));
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn size_formula() {
        let u = Usage {
            bytes: 300 * MIB,
            inodes: 20_000,
        };
        let min = min_fs_bytes(u);
        // data + 16 MiB journal + 4 MiB, plus inode tables and 1/64.
        let inodes = inode_count(u, min);
        assert!(inodes >= 25_000 + 1024, "{inodes}");
        assert!(min >= 300 * MIB + 20 * MIB + inodes * 256 + min / 64 - MIB);
        assert!(min < 360 * MIB, "{}", human(min));
        assert!(min.is_multiple_of(MIB));
        let auto = auto_fs_bytes(u);
        assert!(auto >= min + 60 * MIB && auto.is_multiple_of(MIB));
    }
}
