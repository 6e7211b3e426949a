//! The EFI System Partition: a FAT32 filesystem written in-process with the `fatfs` crate into
//! its byte range of the disk file — no loop device, no mount, no root. It holds what the
//! firmware and the boot loaders read: the image's `/boot` (kernel, initramfs), SYSLINUX's
//! files and config (BIOS), `\EFI\BOOT\BOOTX64.EFI` and systemd-boot's entries (UEFI). The
//! booted system mounts it at `/boot`, so a kernel upgrade writes where the firmware reads.
//!
//! `fatfs` hands out files that borrow the filesystem; the rootfs arrives entry by entry, so
//! the filesystem lives on a thread of its own and receives the entries over a bounded channel.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};

/// Default size of the ESP: room for two kernels and their initramfs (an upgrade writes the new
/// files next to the old ones), the loaders, and FAT32's minimum cluster count at 2 KiB clusters.
pub const DEFAULT_BYTES: u64 = 256 << 20;
/// FAT32 cluster size: 2 KiB keeps a 256 MiB volume well above FAT32's 65525 clusters.
pub const CLUSTER: u32 = 2048;
/// Most entries (and folders) abox puts under `/boot` on the ESP: FAT looks names up one by one
/// and makes short names by trying `~1`, `~2`…, so a huge folder of similar names costs minutes.
/// A real `/boot` (Debian's with GRUB's modules) holds a few hundred.
pub const ENTRIES_MAX: usize = 1024;
pub const DIRS_MAX: usize = 128;
/// FAT32's largest file.
const FILE_MAX: u64 = u32::MAX as u64;
/// Entries in flight between the flattening and the FAT writer.
const QUEUE: usize = 8;

/// The size of an ESP for `boot_bytes` of `/boot` content (in whole clusters): twice that (old
/// and new kernel side by side) plus 32 MiB for loaders and slack, at least [`DEFAULT_BYTES`],
/// MiB-aligned.
pub fn size_for(boot_bytes: u64) -> u64 {
    let want = boot_bytes.saturating_mul(2).saturating_add(32 << 20);
    want.max(DEFAULT_BYTES).div_ceil(1 << 20) << 20
}

/// A byte range of a file, as a stream (positioned reads and writes; the file's own offset is
/// never used, so other writers of other ranges are not disturbed).
struct Slice {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Slice {
    fn room(&self, want: usize) -> usize {
        want.min(self.len.saturating_sub(self.pos) as usize)
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        let n = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Slice {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the ESP",
            ));
        }
        let n = self.file.write_at(&buf[..n], self.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match p {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the ESP",
            )),
        }
    }
}

/// The times of every FAT entry: the build time (`SOURCE_DATE_EPOCH`, else the image's).
#[derive(Debug)]
struct FixedTime(chrono::NaiveDateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.get_current_date_time().date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        use chrono::{Datelike, Timelike};
        let t = self.0;
        fatfs::DateTime {
            // FAT dates start in 1980.
            date: fatfs::Date {
                year: t.year().clamp(1980, 2107) as u16,
                month: t.month() as u16,
                day: t.day() as u16,
            },
            time: fatfs::Time {
                hour: t.hour() as u16,
                min: t.minute() as u16,
                sec: t.second() as u16,
                millis: 0,
            },
        }
    }
}

enum Msg {
    Begin(String),
    Data(Vec<u8>),
    End,
    /// A second name for a file already written (a hard link): FAT has none, so a copy.
    Copy {
        from: String,
        to: String,
    },
    /// A whole file abox writes itself (over an image's file of that name).
    File(String, Vec<u8>),
    /// Fail unless the file is a PE image (an EFI-stub kernel a UEFI loader can start).
    RequirePe(String),
}

/// The FAT writer thread and its queue. [`Esp::finish`] unmounts the filesystem and reports
/// the first error; dropping it unfinished stops the thread.
pub struct Esp {
    tx: Option<SyncSender<Msg>>,
    thread: Option<JoinHandle<Result<()>>>,
    /// Volume serial number, as `/etc/fstab` and `blkid` write it: `XXXX-XXXX`.
    pub volume_id: String,
}

impl Esp {
    /// Format `bytes` at `offset` of `disk` (the file at `disk_path`) as FAT32 labelled `ESP`
    /// with serial `serial`, the boot sector's hidden-sector count set to the partition's start
    /// (as `mkfs.vfat --offset` does; SYSLINUX's boot sector reads it), create the folders
    /// `dirs` (parents first; with mtools' `mmd`: fatfs 0.3 gives `.` and `..` long-name
    /// entries `fsck.fat` rejects), and start the writer. Files are written with
    /// [`Esp::begin`]/[`Esp::data`]/[`Esp::end`] into existing folders.
    pub fn create(
        disk: &File,
        disk_path: &std::path::Path,
        offset: u64,
        bytes: u64,
        serial: u32,
        mtime: u64,
        dirs: &[String],
    ) -> Result<Self> {
        let slice = || -> Result<Slice> {
            Ok(Slice {
                file: disk.try_clone().context("opening the disk for the ESP")?,
                start: offset,
                len: bytes,
                pos: 0,
            })
        };
        let sectors = u32::try_from(bytes / 512).context("the ESP is too large for FAT32")?;
        fatfs::format_volume(
            slice()?,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat32)
                .bytes_per_cluster(CLUSTER)
                .total_sectors(sectors)
                .volume_id(serial)
                .volume_label(*b"ESP        "),
        )
        .context("formatting the ESP (FAT32)")?;
        // BPB_HiddSec (offset 0x1C) of the boot sector and of its FAT32 backup (sector 6).
        let hidden = u32::try_from(offset / 512)
            .context("the ESP starts beyond 2 TiB")?
            .to_le_bytes();
        for sector in [0u64, 6] {
            disk.write_at(&hidden, offset + sector * 512 + 0x1c)
                .context("writing the ESP's boot sector")?;
        }
        if !dirs.is_empty() {
            for d in dirs {
                check_name(d)?;
            }
            let mut image = std::ffi::OsString::from(disk_path);
            image.push(format!("@@{offset}"));
            let mut cmd = std::process::Command::new("mmd");
            cmd.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(image);
            cmd.args(dirs.iter().map(|d| format!("::/{d}")));
            crate::cmd::run(&mut cmd).context("creating the ESP's folders (mtools)")?;
        }
        let slice = slice()?;
        let (tx, rx) = sync_channel(QUEUE);
        // fatfs's filesystem is not Send: it is opened on the writer thread.
        let thread = std::thread::Builder::new()
            .name("esp".into())
            .spawn(move || {
                let time: &'static FixedTime = Box::leak(Box::new(FixedTime(
                    chrono::DateTime::from_timestamp(mtime as i64, 0)
                        .unwrap_or_default()
                        .naive_utc(),
                )));
                let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new().time_provider(time))
                    .context("opening the new ESP")?;
                serve(fs, rx)
            })
            .context("starting the ESP writer")?;
        Ok(Esp {
            tx: Some(tx),
            thread: Some(thread),
            volume_id: format!("{:04X}-{:04X}", serial >> 16, serial & 0xffff),
        })
    }

    fn send(&mut self, m: Msg) -> Result<()> {
        let tx = self.tx.as_ref().context("the ESP is finished")?;
        if tx.send(m).is_err() {
            // The writer stopped: its error says why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| anyhow!("the ESP writer stopped")));
        }
        Ok(())
    }

    fn join(&mut self) -> Result<()> {
        drop(self.tx.take());
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("the ESP writer panicked"))?,
            None => Ok(()),
        }
    }

    /// Start a file of `size` bytes; its content follows with [`Esp::data`], then [`Esp::end`].
    pub fn begin(&mut self, path: &str, size: u64) -> Result<()> {
        if size > FILE_MAX {
            bail!("/boot/{path} is {size} bytes, more than FAT32 holds in one file (4 GiB)");
        }
        self.send(Msg::Begin(path.into()))
    }

    pub fn data(&mut self, buf: &[u8]) -> Result<()> {
        self.send(Msg::Data(buf.to_vec()))
    }

    pub fn end(&mut self) -> Result<()> {
        self.send(Msg::End)
    }

    /// `to` gets the content of the file `from` (already written).
    pub fn copy(&mut self, from: &str, to: &str) -> Result<()> {
        self.send(Msg::Copy {
            from: from.into(),
            to: to.into(),
        })
    }

    /// A file abox writes itself, replacing one of that name.
    pub fn file(&mut self, path: &str, data: Vec<u8>) -> Result<()> {
        self.send(Msg::File(path.into(), data))
    }

    /// Fail (at [`Esp::finish`]) unless `path` is a PE image: a kernel built with the EFI stub.
    pub fn require_pe(&mut self, path: &str) -> Result<()> {
        self.send(Msg::RequirePe(path.into()))
    }

    /// Write out and unmount the filesystem; the first error of the writer.
    pub fn finish(mut self) -> Result<()> {
        self.join()
    }
}

impl Drop for Esp {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

type Fs = fatfs::FileSystem<Slice>;

/// The writer thread: applies every message, stops at the first error.
fn serve(fs: Fs, rx: Receiver<Msg>) -> Result<()> {
    {
        let root = fs.root_dir();
        let mut file: Option<(String, fatfs::File<Slice>)> = None;
        for m in rx {
            match m {
                Msg::Begin(p) => {
                    let mut f = root
                        .create_file(&p)
                        .map_err(|e| fat_err(e, "creating", &p))?;
                    f.truncate().map_err(|e| fat_err(e, "emptying", &p))?;
                    file = Some((p, f));
                }
                Msg::Data(b) => {
                    let (p, f) = file.as_mut().context("ESP data outside a file")?;
                    f.write_all(&b).map_err(|e| fat_err(e, "writing", p))?;
                }
                Msg::End => {
                    if let Some((p, mut f)) = file.take() {
                        f.flush().map_err(|e| fat_err(e, "writing", &p))?;
                    }
                }
                Msg::Copy { from, to } => {
                    let mut src = root
                        .open_file(&from)
                        .map_err(|e| fat_err(e, "opening", &from))?;
                    let mut dst = root
                        .create_file(&to)
                        .map_err(|e| fat_err(e, "creating", &to))?;
                    dst.truncate().map_err(|e| fat_err(e, "emptying", &to))?;
                    io::copy(&mut src, &mut dst).map_err(|e| fat_err(e, "copying to", &to))?;
                    dst.flush().map_err(|e| fat_err(e, "writing", &to))?;
                }
                Msg::File(p, data) => {
                    let mut f = root
                        .create_file(&p)
                        .map_err(|e| fat_err(e, "creating", &p))?;
                    f.truncate().map_err(|e| fat_err(e, "emptying", &p))?;
                    f.write_all(&data).map_err(|e| fat_err(e, "writing", &p))?;
                    f.flush().map_err(|e| fat_err(e, "writing", &p))?;
                }
                Msg::RequirePe(p) => {
                    let mut f = root.open_file(&p).map_err(|e| fat_err(e, "opening", &p))?;
                    let mut head = [0u8; 4096];
                    let n = read_up_to(&mut f, &mut head)?;
                    if !is_pe(&head[..n]) {
                        bail!(
                            "the kernel /boot/{p} has no EFI stub (it is not a PE image), so no \
                             UEFI loader can start it: use a kernel built with CONFIG_EFI_STUB \
                             (Alpine's linux-virt and linux-lts are), or --firmware bios"
                        );
                    }
                }
            }
        }
    }
    fs.unmount()
        .context("writing the ESP's allocation tables")?;
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A PE/COFF image: `MZ`, and at the offset stored at 0x3C, `PE\0\0` (the EFI stub's header).
pub fn is_pe(head: &[u8]) -> bool {
    if head.len() < 0x40 || &head[..2] != b"MZ" {
        return false;
    }
    let at = u32::from_le_bytes([head[0x3c], head[0x3d], head[0x3e], head[0x3f]]) as usize;
    head.get(at..at + 4) == Some(b"PE\0\0")
}

/// A path abox can name on FAT and hand to mtools: no character FAT forbids, no control
/// characters, nothing beyond the Basic Multilingual Plane (mtools mangles it), no empty or
/// `.`/`..` component, none ending in a dot or a space (FAT strips them).
pub fn check_name(path: &str) -> Result<()> {
    let bad = path.split('/').any(|c| {
        c.is_empty()
            || c == "."
            || c == ".."
            || c.ends_with('.')
            || c.ends_with(' ')
            || c.chars()
                .any(|ch| ch.is_control() || "\"*:<>?\\|".contains(ch) || u32::from(ch) > 0xffff)
    });
    if bad {
        bail!(
            "/boot/{path}: a name FAT cannot hold (\" * : < > ? \\ |, control characters, \
             characters beyond U+FFFF, or a trailing dot or space); rename it in the image"
        );
    }
    Ok(())
}

/// A name as FAT compares it: without case (fatfs folds with `char::to_uppercase`).
pub fn fold(path: &str) -> String {
    path.chars().flat_map(char::to_uppercase).collect()
}

fn fat_err(e: io::Error, what: &str, path: &str) -> anyhow::Error {
    anyhow!("{what} /boot/{path} on the FAT ESP: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size_for(0), DEFAULT_BYTES);
        assert_eq!(size_for(40 << 20), DEFAULT_BYTES);
        assert_eq!(size_for(200 << 20), 432 << 20);
    }

    #[test]
    fn fat_names() {
        assert!(check_name("EFI/BOOT").is_ok());
        assert!(check_name("grub/x86_64-efi").is_ok());
        for bad in [
            "a:b",
            "a/../b",
            "x*",
            "q?",
            "",
            "a//b",
            "t\tab",
            "n\n",
            "dot.",
            "sp ",
            "\u{1F600}",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(fold("EFI/boot/ſyslinux"), "EFI/BOOT/SYSLINUX");
        assert_eq!(fold("straße"), "STRASSE");
    }

    #[test]
    fn pe_header() {
        let mut h = vec![0u8; 0x200];
        h[..2].copy_from_slice(b"MZ");
        h[0x3c] = 0x80;
        assert!(!is_pe(&h));
        h[0x80..0x84].copy_from_slice(b"PE\0\0");
        assert!(is_pe(&h));
        assert!(!is_pe(b"MZ"));
    }

    /// A FAT32 ESP written at an offset of a larger file passes `fsck.fat`, keeps names, folders
    /// and content, and has its hidden sectors set to its start.
    #[test]
    fn esp_at_an_offset_is_clean_fat32() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(DEFAULT_BYTES + (2 << 20)).unwrap();
        let dirs = ["EFI".to_string(), "EFI/BOOT".into()];
        let mut esp = Esp::create(
            &f,
            &p,
            1 << 20,
            DEFAULT_BYTES,
            0x1234abcd,
            1_700_000_000,
            &dirs,
        )
        .unwrap();
        assert_eq!(esp.volume_id, "1234-ABCD");
        esp.begin("vmlinuz-virt", 600_000).unwrap();
        for _ in 0..3 {
            esp.data(&[7u8; 200_000]).unwrap();
        }
        esp.end().unwrap();
        esp.copy("vmlinuz-virt", "EFI/BOOT/copy").unwrap();
        esp.file("EFI/BOOT/Long Name.conf", b"hello\n".to_vec())
            .unwrap();
        esp.finish().unwrap();
        drop(f);
        let part = d.path().join("esp");
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dd if={} of={} bs=1M skip=1 count=256 status=none && fsck.fat -n {} && mdir -/ -i {} ::",
                p.display(),
                part.display(),
                part.display(),
                part.display()
            ))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("Long Name.conf"), "{out}");
        assert!(out.contains("vmlinuz-virt"), "{out}");
        let raw = std::fs::read(&part).unwrap();
        assert_eq!(&raw[0x1c..0x20], &2048u32.to_le_bytes());
        assert_eq!(&raw[6 * 512 + 0x1c..6 * 512 + 0x20], &2048u32.to_le_bytes());
        let copy = std::process::Command::new("mtype")
            .args(["-i"])
            .arg(&part)
            .arg("::EFI/BOOT/copy")
            .output()
            .unwrap();
        assert_eq!(copy.stdout, vec![7u8; 600_000]);
    }
}
