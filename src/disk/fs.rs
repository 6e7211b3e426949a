//! The root filesystem stage: how big the ext4 root must be, and `mke2fs -d -` making it inside
//! the disk file at the root partition's offset from the fixed-up rootfs tar stream (e2fsprogs
//! 1.47.1 reads a tarball; as any user it keeps owners, modes, device nodes, hard links and the
//! `security.capability` attribute). No loop device, no mount, no root.

use std::path::Path;
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
/// Room for what abox adds to the root (fstab, the VM set-up's files).
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
    // K, M, G, T are powers of 1024 whether written K, KB or KiB, as qemu-img takes them.
    parse_size::Config::new()
        .with_binary()
        .parse_size(t)
        .ok()
        .filter(|n| *n > 0)
        .map(Some)
        .with_context(|| format!("--size {s:?}: expected `auto` or a size like 2G, 1536M"))
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
pub(crate) fn dead(pid: u32) -> bool {
    match rustix::process::Pid::from_raw(pid as i32) {
        Some(p) => rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH),
        None => false,
    }
}

/// The PID in an abox temporary name — `.NAME.abox-tmp-PID` (an output being written) — when it is one a process can have (≤ the kernel's pid_max).
fn pid_of(name: &str) -> Option<u32> {
    let pid: u32 = if name.starts_with('.') {
        name.rsplit_once(".abox-tmp-")?.1.parse().ok()?
    } else if let Some(rest) = name.strip_prefix(TOOL_DIR_PREFIX) {
        rest.split('-').next()?.parse().ok()?
    } else {
        return None;
    };
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(4_194_304);
    (pid > 0 && pid <= max).then_some(pid)
}

/// The temporary folder of links a disk's tools are given: `abox-disk-PID-…` in TMPDIR.
pub const TOOL_DIR_PREFIX: &str = "abox-disk-";

/// Remove what an abox that died without cleaning up (SIGKILL, a crash, a power cut) left in
/// `out_dir`: its temporary files (`.NAME.abox-tmp-PID` of a process that no longer exists and
/// that nobody holds locked — a live abox locks its files, so one in another PID namespace is
/// left alone). Returns one line per file removed; one that cannot be removed is an error
/// saying which.
pub fn reap_stale(out_dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if let Ok(rd) = std::fs::read_dir(out_dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let file = e.file_type().is_ok_and(|t| t.is_file());
            if file
                && name.starts_with('.')
                && pid_of(&name).is_some_and(dead)
                && !locked(&e.path())
            {
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
    // Its folder of links for the tools (links only: nothing of the user's inside).
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = e.file_type().is_ok_and(|t| t.is_dir());
            if dir && name.starts_with(TOOL_DIR_PREFIX) && pid_of(&name).is_some_and(dead) {
                let only_links = std::fs::read_dir(e.path()).is_ok_and(|d| {
                    d.flatten()
                        .all(|f| f.file_type().is_ok_and(|t| t.is_symlink()))
                });
                if only_links && std::fs::remove_dir_all(e.path()).is_ok() {
                    done.push(format!(
                        "removed {} (left by an abox that died)",
                        e.path().display()
                    ));
                }
            }
        }
    }
    Ok(done)
}

/// Whether some process holds a lock on the file (it is being written), or it cannot be told.
fn locked(p: &Path) -> bool {
    let Ok(f) = std::fs::File::open(p) else {
        return true;
    };
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
}

/// Start `mke2fs` making an ext4 of `fs_bytes` at byte `offset` of the disk file `disk`
/// (which exists, sized), filled from the tar stream written to the child's stdin. The root
/// folder is root's; inode tables and the journal are left for the kernel to initialise
/// lazily (the file reads as zeros there), so only what the rootfs needs is written.
/// `orphan_file` and `metadata_csum_seed` stay off so kernels before 5.15 mount it.
/// Metadata checksums are off while it fills (see [`enable_checksums`]); `uninit_bg` keeps
/// the lazy initialisation meanwhile.
pub fn mkfs_from_tar(
    disk: &Path,
    offset: u64,
    fs_bytes: u64,
    u: Usage,
    uuid: &str,
    label: &str,
) -> Result<cmd::PipedChild> {
    let journal_mib = journal_bytes(u.bytes) / MIB;
    cmd::PipedChild::spawn(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4"])
            .args(["-b", &BLOCK.to_string(), "-m", "1"])
            .args(["-N", &inode_count(u, fs_bytes).to_string()])
            .args(["-J", &format!("size={journal_mib}")])
            .args(["-U", uuid, "-L", label])
            // uninit_bg stands in for metadata_csum's group checksums meanwhile, so inode tables
            // stay lazily initialised (without either, mke2fs writes them all).
            .args([
                "-O",
                "^orphan_file,^metadata_csum_seed,^metadata_csum,uninit_bg",
            ])
            .arg("-E")
            .arg(format!(
                "offset={offset},lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"
            ))
            .args(["-d", "-"])
            .arg(disk)
            .arg(format!("{}k", fs_bytes / 1024)),
    )
}

/// Refuse, before any work, a TMPDIR e2fsprogs cannot name: the disk's tools reach it through
/// a link there, and tune2fs and e2fsck take what follows a '?' as options.
pub fn check_tmpdir() -> Result<()> {
    let tmp = std::env::temp_dir();
    if tmp.to_string_lossy().contains('?') {
        bail!(
            "TMPDIR {}: e2fsprogs cannot open a path with '?' in it; set TMPDIR to a folder \
             without one",
            tmp.display()
        );
    }
    Ok(())
}

/// Turn on ext4 metadata checksums (`metadata_csum`, mke2fs's default) in the filesystem
/// [`mkfs_from_tar`] made at byte `offset` of `disk`: `tune2fs -O metadata_csum` (which also
/// drops `uninit_bg`). When a folder block has no room for its checksum, tune2fs asks for
/// `e2fsck -fD`: that runs then (it makes the room), and `e2fsck -fn` must find the result
/// clean. Made with checksums on, mke2fs rewrites and re-checksums the inode on every 4 KiB
/// block it copies in (e2fsprogs 1.47 `ext2fs_file_write`), a third of its time; this way
/// costs a few hundredths of a second.
pub fn enable_checksums(disk: &Path, offset: u64) -> Result<()> {
    // e2fsprogs opens `NAME?offset=N` at that offset (unix_io's options follow the first '?');
    // the disk's link is in TMPDIR ([`check_tmpdir`]).
    let at = format!("{}?offset={offset}", disk.display());
    let out = cmd::run(
        Command::new("tune2fs")
            .args(["-O", "metadata_csum"])
            .arg(&at),
    )
    .context("turning on the root filesystem's metadata checksums")?;
    if String::from_utf8_lossy(&out).contains("e2fsck") {
        cmd::run_with(
            Command::new("e2fsck").args(["-f", "-y", "-D"]).arg(&at),
            &[0, 1],
        )
        .context("making room for the folders' checksums")?;
        cmd::run(Command::new("e2fsck").args(["-f", "-n"]).arg(&at))
            .context("checking the root filesystem")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_leftover_is_alive_whatever_its_pid_says() {
        let d = tempfile::tempdir().unwrap();
        // A PID that has ended.
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        let p = d.path().join(format!(".x.qcow2.abox-tmp-{pid}"));
        std::fs::write(&p, b"half").unwrap();
        let holder = std::fs::File::open(&p).unwrap();
        rustix::fs::flock(&holder, rustix::fs::FlockOperation::LockExclusive).unwrap();
        assert!(reap_stale(d.path()).unwrap().is_empty());
        assert!(p.exists());
        drop(holder);
        let done = reap_stale(d.path()).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(!p.exists());
    }

    #[test]
    fn leftover_names_carry_their_pid() {
        assert_eq!(pid_of("abox-mnt-4242-0"), None);
        assert_eq!(pid_of("abox-disk-4242-x1Yz"), Some(4242));
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
