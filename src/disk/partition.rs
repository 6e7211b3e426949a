//! Partitioning a disk image: one Linux root partition, 1 MiB aligned, under a GPT (with a
//! protective MBR and the LegacyBIOSBootable attribute, for syslinux's `gptmbr.bin`) or an MBR
//! (active flag, for `mbr.bin`). Written with gptman / mbrman, not by calling sgdisk. This step
//! only touches the table and the first 440 bytes (boot code); making the filesystem and
//! installing the boot loader are separate steps.

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
/// GPT attribute bit 2: legacy BIOS bootable (what `gptmbr.bin` looks for).
pub const LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;
/// MBR type of a Linux partition.
const MBR_LINUX: u8 = 0x83;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Table {
    /// GUID partition table with a protective MBR (default).
    #[default]
    Gpt,
    /// Classic MBR (DOS) partition table.
    Mbr,
}

/// Where the root partition is, and how the kernel will name it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub table: Table,
    pub disk_bytes: u64,
    /// Byte offset and length of the root partition.
    pub part_offset: u64,
    pub part_bytes: u64,
    /// `PARTUUID=` value: the partition's GUID (GPT) or `<disk signature>-01` (MBR).
    pub part_uuid: String,
}

/// A UUID in its text form → the 16 bytes GPT stores (first three fields little-endian).
pub fn guid_bytes(uuid: &str) -> Result<[u8; 16]> {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || uuid.len() != 36 {
        bail!("{uuid:?} is not a UUID");
    }
    let raw = hex::decode(&hex).with_context(|| format!("{uuid:?} is not a UUID"))?;
    let mut b = [0u8; 16];
    b.copy_from_slice(&raw);
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Ok(b)
}

/// The layout for a root partition of at least `part_bytes` (rounded up to the alignment).
/// `uuid` becomes the GPT partition GUID; for MBR its first 4 bytes are the disk signature.
pub fn layout(table: Table, part_bytes: u64, uuid: &str) -> Result<Layout> {
    let part_bytes = part_bytes.div_ceil(ALIGN) * ALIGN;
    if part_bytes == 0 {
        bail!("the root partition cannot be empty");
    }
    let disk_bytes = ALIGN + part_bytes + TAIL;
    let part_uuid = match table {
        Table::Gpt => {
            guid_bytes(uuid)?;
            uuid.to_ascii_lowercase()
        }
        Table::Mbr => {
            if disk_bytes / SECTOR > u32::MAX as u64 {
                bail!("an MBR disk cannot exceed 2 TiB; use --table gpt");
            }
            format!("{:08x}-01", u32::from_le_bytes(signature(uuid)?))
        }
    };
    Ok(Layout {
        table,
        disk_bytes,
        part_offset: ALIGN,
        part_bytes,
        part_uuid,
    })
}

/// MBR disk signature: the first 4 bytes of the UUID, as stored on disk.
fn signature(uuid: &str) -> Result<[u8; 4]> {
    let b = guid_bytes(uuid)?;
    Ok([b[0], b[1], b[2], b[3]])
}

/// Size `file` to the disk (sparse) and write the table and the boot code (at most 440
/// bytes: syslinux's `gptmbr.bin` or `mbr.bin`).
pub fn write_table(
    file: &mut File,
    l: &Layout,
    uuid: &str,
    disk_guid: &str,
    boot_code: &[u8],
) -> Result<()> {
    if boot_code.len() > 440 {
        bail!(
            "boot code of {} bytes does not fit the 440 bytes of the MBR",
            boot_code.len()
        );
    }
    file.set_len(l.disk_bytes)
        .context("sizing the disk image")?;
    let first = l.part_offset / SECTOR;
    let sectors = l.part_bytes / SECTOR;
    match l.table {
        Table::Gpt => {
            let mut gpt = gptman::GPT::new_from(file, SECTOR, guid_bytes(disk_guid)?)
                .context("creating the GPT")?;
            gpt.align = ALIGN / SECTOR;
            gpt[1] = gptman::GPTPartitionEntry {
                partition_type_guid: guid_bytes(LINUX_FS)?,
                unique_partition_guid: guid_bytes(uuid)?,
                starting_lba: first,
                ending_lba: first + sectors - 1,
                attribute_bits: LEGACY_BIOS_BOOTABLE,
                partition_name: "root".into(),
            };
            gpt.write_into(file).context("writing the GPT")?;
            // Marked active: some BIOSes only boot a disk with an active MBR entry.
            gptman::GPT::write_bootable_protective_mbr_into(file, SECTOR)
                .context("writing the protective MBR")?;
        }
        Table::Mbr => {
            let mut mbr = mbrman::MBR::new_from(file, SECTOR as u32, signature(uuid)?)
                .context("creating the MBR")?;
            mbr[1] = mbrman::MBRPartitionEntry {
                boot: mbrman::BOOT_ACTIVE,
                first_chs: mbrman::CHS::empty(),
                sys: MBR_LINUX,
                last_chs: mbrman::CHS::empty(),
                starting_lba: first as u32,
                sectors: sectors as u32,
            };
            mbr.write_into(file).context("writing the MBR")?;
        }
    }
    file.seek(SeekFrom::Start(0))?;
    file.write_all(boot_code).context("writing the boot code")?;
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
            10 * ALIGN + 1,
            "12345678-9abc-def0-1234-56789abcdef0",
        )
        .unwrap();
        assert_eq!(l.part_offset, ALIGN);
        assert_eq!(l.part_bytes, 11 * ALIGN);
        assert_eq!(l.disk_bytes, 13 * ALIGN);
        assert_eq!(l.part_uuid, "12345678-9abc-def0-1234-56789abcdef0");
        let m = layout(Table::Mbr, ALIGN, "12345678-9abc-def0-1234-56789abcdef0").unwrap();
        assert_eq!(m.part_uuid, "12345678-01");
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
        let l = layout(Table::Gpt, 20 * ALIGN, UUID).unwrap();
        let mut f = File::create(&p).unwrap();
        let code = [0xebu8; 440];
        write_table(
            &mut f,
            &l,
            UUID,
            "11111111-2222-4333-8444-555555555555",
            &code,
        )
        .unwrap();
        drop(f);
        let v = tool(&format!("sgdisk -v {}", p.display()));
        assert!(v.contains("No problems found"), "{v}");
        let i = tool(&format!("sgdisk -i 1 {}", p.display()));
        assert!(i.contains("0FC63DAF-8483-4772-8E79-3D69D8477DE4"), "{i}");
        assert!(i.to_ascii_lowercase().contains(UUID), "{i}");
        assert!(i.contains("First sector: 2048 "), "{i}");
        assert!(
            i.contains("Attribute flags: 0000000000000004"),
            "legacy BIOS bootable: {i}"
        );
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[..440], &code[..], "boot code");
        assert_eq!(&raw[510..512], &[0x55, 0xaa]);
        assert_eq!(raw.len() as u64, l.disk_bytes);
    }

    #[test]
    fn mbr_is_active_linux_at_1mib() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.raw");
        let l = layout(Table::Mbr, 8 * ALIGN, UUID).unwrap();
        let mut f = File::create(&p).unwrap();
        write_table(&mut f, &l, UUID, UUID, &[0x33; 440]).unwrap();
        drop(f);
        let dump = tool(&format!("sfdisk -d {}", p.display()));
        assert!(dump.contains("label: dos"), "{dump}");
        assert!(dump.contains("label-id: 0x0b1c2d3e"), "{dump}");
        assert!(
            dump.contains("start=        2048, size=       16384, type=83, bootable"),
            "{dump}"
        );
        assert_eq!(l.part_uuid, "0b1c2d3e-01");
    }
}
