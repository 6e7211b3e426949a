//! The layout stage: the partition table and the MBR boot code, written in-process (gptman /
//! mbrman) into a sparse file. Two partitions, 1 MiB aligned: 1 the EFI System Partition (FAT32;
//! kernel, initramfs and both loaders), 2 the ext4 root, last, so first-boot growth extends it.
//! - GPT (default): a protective MBR; the ESP of type C12A7328-F81F-11D2-BA4B-00A0C93EC93B,
//!   marked LegacyBIOSBootable when BIOS boots the disk (SYSLINUX's `gptmbr.bin` chain-loads the
//!   partition with that attribute, UEFI Specification 2.10 §5.3.3).
//! - MBR: the ESP as type 0xEF, active (what `mbr.bin` starts and UEFI firmware reads); the root
//!   as 0x83.
//!
//! Making the filesystems and installing the loaders are later stages.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use anyhow::{bail, Context, Result};

/// Sector size of every image abox writes.
pub const SECTOR: u64 = 512;
/// Partition alignment and start: 1 MiB.
pub const ALIGN: u64 = 1 << 20;
/// Room kept at the end for the backup GPT (33 sectors, rounded up to the alignment).
const TAIL: u64 = ALIGN;
/// GPT type of a Linux filesystem partition (0FC63DAF-8483-4772-8E79-3D69D8477DE4).
pub const LINUX_FS: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";
/// GPT type of an EFI System Partition.
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// GPT attribute bit 2: legacy BIOS bootable (what `gptmbr.bin` looks for).
pub const LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;
/// MBR type of a Linux partition.
const MBR_LINUX: u8 = 0x83;
/// MBR type of an EFI System Partition.
const MBR_ESP: u8 = 0xef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Table {
    /// GUID partition table with a protective MBR (default).
    #[default]
    Gpt,
    /// Classic MBR (DOS) partition table.
    Mbr,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Gpt => "GPT",
            Table::Mbr => "MBR",
        }
    }
}

/// A partition's byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub offset: u64,
    pub bytes: u64,
}

/// Where the partitions are, and how the kernel will name the root.
#[derive(Debug, Clone)]
pub struct Layout {
    pub table: Table,
    pub disk_bytes: u64,
    pub esp: Part,
    pub root: Part,
    /// The root's `PARTUUID=`: its GUID (GPT) or `<disk signature>-02` (MBR).
    pub part_uuid: String,
}

/// A UUID in its hyphenated text form → the 16 bytes GPT stores (first three fields
/// little-endian, the "mixed-endian" GUID layout of the UEFI specification).
pub fn guid_bytes(uuid: &str) -> Result<[u8; 16]> {
    if uuid.len() != 36 {
        bail!("{uuid:?} is not a UUID");
    }
    let u = uuid::Uuid::try_parse(uuid).with_context(|| format!("{uuid:?} is not a UUID"))?;
    Ok(u.to_bytes_le())
}

/// The layout for an ESP of `esp_bytes` and a root of at least `root_bytes` (both rounded up
/// to the alignment). `uuid` becomes the root's GPT partition GUID; for MBR its first 4 bytes
/// are the disk signature. An MBR disk cannot pass 2 TiB.
pub fn layout(table: Table, esp_bytes: u64, root_bytes: u64, uuid: &str) -> Result<Layout> {
    let esp_bytes = esp_bytes.div_ceil(ALIGN) * ALIGN;
    let root_bytes = root_bytes.div_ceil(ALIGN) * ALIGN;
    if esp_bytes == 0 || root_bytes == 0 {
        bail!("a partition cannot be empty");
    }
    let esp = Part {
        offset: ALIGN,
        bytes: esp_bytes,
    };
    let root = Part {
        offset: esp.offset + esp.bytes,
        bytes: root_bytes,
    };
    let disk_bytes = root.offset + root.bytes + TAIL;
    let part_uuid = match table {
        Table::Gpt => {
            guid_bytes(uuid)?;
            uuid.to_ascii_lowercase()
        }
        Table::Mbr => {
            if disk_bytes / SECTOR > u32::MAX as u64 {
                bail!("an MBR disk cannot exceed 2 TiB; use --table gpt");
            }
            format!("{:08x}-02", u32::from_le_bytes(signature(uuid)?))
        }
    };
    Ok(Layout {
        table,
        disk_bytes,
        esp,
        root,
        part_uuid,
    })
}

impl Layout {
    /// The same partitions on a disk of `bytes` (at least what they need; the GPT backup goes
    /// to the new end). An MBR disk cannot pass 2 TiB.
    pub fn with_disk_bytes(mut self, bytes: u64) -> Result<Self> {
        let bytes = bytes.div_ceil(SECTOR) * SECTOR;
        if bytes > self.disk_bytes {
            if self.table == Table::Mbr && bytes / SECTOR > u32::MAX as u64 {
                bail!("an MBR disk cannot exceed 2 TiB; use --table gpt");
            }
            self.disk_bytes = bytes;
        }
        Ok(self)
    }
}

/// MBR disk signature: the first 4 bytes of the UUID, as stored on disk.
fn signature(uuid: &str) -> Result<[u8; 4]> {
    let b = guid_bytes(uuid)?;
    Ok([b[0], b[1], b[2], b[3]])
}

/// The GUIDs a GPT disk is written with.
pub struct Guids<'a> {
    pub disk: &'a str,
    pub esp: &'a str,
    /// The root's (also the MBR signature's source).
    pub root: &'a str,
}

/// Size `file` to the disk (sparse) and write the table; with `boot_code` (BIOS: syslinux's
/// `gptmbr.bin` or `mbr.bin`, at most 440 bytes) the ESP is marked for BIOS boot and the code
/// goes into the MBR's boot code area.
pub fn write_table(
    file: &mut File,
    l: &Layout,
    ids: &Guids,
    boot_code: Option<&[u8]>,
) -> Result<()> {
    if let Some(code) = boot_code {
        if code.len() > 440 {
            bail!(
                "boot code of {} bytes does not fit the 440 bytes of the MBR",
                code.len()
            );
        }
    }
    let bios = boot_code.is_some();
    file.set_len(l.disk_bytes)
        .context("sizing the disk image")?;
    let lba = |p: Part| (p.offset / SECTOR, p.bytes / SECTOR);
    let (esp_first, esp_n) = lba(l.esp);
    let (root_first, root_n) = lba(l.root);
    match l.table {
        Table::Gpt => {
            let mut gpt = gptman::GPT::new_from(file, SECTOR, guid_bytes(ids.disk)?)
                .context("creating the GPT")?;
            gpt.align = ALIGN / SECTOR;
            gpt[1] = gptman::GPTPartitionEntry {
                partition_type_guid: guid_bytes(ESP_TYPE)?,
                unique_partition_guid: guid_bytes(ids.esp)?,
                starting_lba: esp_first,
                ending_lba: esp_first + esp_n - 1,
                attribute_bits: if bios { LEGACY_BIOS_BOOTABLE } else { 0 },
                partition_name: "ESP".into(),
            };
            gpt[2] = gptman::GPTPartitionEntry {
                partition_type_guid: guid_bytes(LINUX_FS)?,
                unique_partition_guid: guid_bytes(ids.root)?,
                starting_lba: root_first,
                ending_lba: root_first + root_n - 1,
                attribute_bits: 0,
                partition_name: "root".into(),
            };
            gpt.write_into(file).context("writing the GPT")?;
            if bios {
                // Marked active: some BIOSes only boot a disk with an active MBR entry.
                gptman::GPT::write_bootable_protective_mbr_into(file, SECTOR)
            } else {
                gptman::GPT::write_protective_mbr_into(file, SECTOR)
            }
            .context("writing the protective MBR")?;
        }
        Table::Mbr => {
            let mut mbr = mbrman::MBR::new_from(file, SECTOR as u32, signature(ids.root)?)
                .context("creating the MBR")?;
            let entry = |sys, boot, first: u64, n: u64| mbrman::MBRPartitionEntry {
                boot,
                first_chs: mbrman::CHS::empty(),
                sys,
                last_chs: mbrman::CHS::empty(),
                starting_lba: first as u32,
                sectors: n as u32,
            };
            mbr[1] = entry(MBR_ESP, mbrman::BOOT_ACTIVE, esp_first, esp_n);
            mbr[2] = entry(MBR_LINUX, mbrman::BOOT_INACTIVE, root_first, root_n);
            mbr.write_into(file).context("writing the MBR")?;
        }
    }
    if let Some(code) = boot_code {
        file.seek(SeekFrom::Start(0))?;
        file.write_all(code).context("writing the boot code")?;
    }
    file.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_encoding() {
        // The Linux filesystem type as it appears on disk.
        assert_eq!(
            hex::encode(guid_bytes(LINUX_FS).unwrap()),
            "af3dc60f838472478e793d69d8477de4"
        );
        assert!(guid_bytes("not-a-uuid").is_err());
    }

    #[test]
    fn layouts() {
        let l = layout(
            Table::Gpt,
            4 * ALIGN,
            10 * ALIGN + 1,
            "12345678-9abc-def0-1234-56789abcdef0",
        )
        .unwrap();
        assert_eq!(
            l.esp,
            Part {
                offset: ALIGN,
                bytes: 4 * ALIGN
            }
        );
        assert_eq!(
            l.root,
            Part {
                offset: 5 * ALIGN,
                bytes: 11 * ALIGN
            }
        );
        assert_eq!(l.disk_bytes, 17 * ALIGN);
        assert_eq!(l.part_uuid, "12345678-9abc-def0-1234-56789abcdef0");
        let m = layout(
            Table::Mbr,
            ALIGN,
            ALIGN,
            "12345678-9abc-def0-1234-56789abcdef0",
        )
        .unwrap();
        assert_eq!(m.part_uuid, "12345678-02");
    }

    fn tool(cmd: &str) -> String {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "`{cmd}` failed (scripts/setup installs gdisk and fdisk): {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    const UUID: &str = "0b1c2d3e-4f50-4617-8899-aabbccddeeff";

    #[test]
    fn gpt_is_clean_for_sgdisk() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        let l = layout(Table::Gpt, 8 * ALIGN, 20 * ALIGN, UUID).unwrap();
        let mut f = File::create(&p).unwrap();
        let code = [0xebu8; 440];
        let ids = Guids {
            disk: "11111111-2222-4333-8444-555555555555",
            esp: "22222222-2222-4333-8444-555555555555",
            root: UUID,
        };
        write_table(&mut f, &l, &ids, Some(&code)).unwrap();
        drop(f);
        let v = tool(&format!("sgdisk -v {}", p.display()));
        assert!(v.contains("No problems found"), "{v}");
        let e = tool(&format!("sgdisk -i 1 {}", p.display()));
        assert!(e.contains("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), "{e}");
        assert!(e.contains("First sector: 2048 "), "{e}");
        assert!(
            e.contains("Attribute flags: 0000000000000004"),
            "legacy BIOS bootable: {e}"
        );
        let i = tool(&format!("sgdisk -i 2 {}", p.display()));
        assert!(i.contains("0FC63DAF-8483-4772-8E79-3D69D8477DE4"), "{i}");
        assert!(i.to_ascii_lowercase().contains(UUID), "{i}");
        assert!(i.contains("First sector: 18432 "), "{i}");
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[..440], &code[..], "boot code");
        assert_eq!(&raw[510..512], &[0x55, 0xaa]);
        assert_eq!(raw.len() as u64, l.disk_bytes);
    }

    #[test]
    fn mbr_has_an_active_esp_then_linux() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        let l = layout(Table::Mbr, 4 * ALIGN, 8 * ALIGN, UUID).unwrap();
        let mut f = File::create(&p).unwrap();
        let ids = Guids {
            disk: UUID,
            esp: UUID,
            root: UUID,
        };
        write_table(&mut f, &l, &ids, Some(&[0x33; 440])).unwrap();
        drop(f);
        let dump = tool(&format!("sfdisk -d {}", p.display()));
        assert!(dump.contains("label: dos"), "{dump}");
        assert!(dump.contains("label-id: 0x0b1c2d3e"), "{dump}");
        assert!(
            dump.contains("start=        2048, size=        8192, type=ef, bootable"),
            "{dump}"
        );
        assert!(
            dump.contains("start=       10240, size=       16384, type=83\n"),
            "{dump}"
        );
        assert_eq!(l.part_uuid, "0b1c2d3e-02");
    }
}
