//! The boot stage: which kernel and initramfs the image carries, one boot entry made from them,
//! and the two loaders that read it from the ESP — SYSLINUX for BIOS (`syslinux.cfg`; the mtools
//! installer writes `ldlinux.sys` into the unmounted FAT and patches its boot sector; the MBR
//! holds `gptmbr.bin` / `mbr.bin`) and systemd-boot for UEFI (`\EFI\BOOT\BOOTX64.EFI`, the
//! removable-media path every firmware tries; `loader/loader.conf` and a Boot Loader
//! Specification type 1 entry). Secure Boot is not supported: Debian's systemd-boot is unsigned.
//!
//! Why systemd-boot and not SYSLINUX's own `syslinux.efi`: SYSLINUX's EFI port (6.04, last
//! changed in 2019) hangs or fails on current OVMF and many real firmwares, while systemd-boot is
//! maintained, small, starts any EFI-stub kernel, and reads the standard entry format other
//! tools (and a later `kernel-install`) write.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::partition::Table;
use crate::flatten::tree::{Node, Tree};

/// Kernel and initramfs found in the image's `/boot` (paths relative to the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub kernel: String,
    pub initrd: Option<String>,
}

/// Alpine's kernel flavours, most suitable for a VM first.
const FLAVOURS: [&str; 3] = ["virt", "lts", "edge"];

/// Names an initramfs for the kernel `vmlinuz<suffix>` may have, in order of preference.
fn initrd_names(suffix: &str) -> Vec<String> {
    vec![
        format!("initramfs{suffix}"),
        format!("initrd.img{suffix}"),
        format!("initrd{suffix}"),
        format!("initrd{suffix}.img"),
        format!("initramfs{suffix}.img"),
    ]
}

/// Version-aware ordering: runs of digits compare as numbers (`6.10` after `6.9`).
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let strip = |d: &[u8]| -> usize { d.iter().take_while(|c| **c == b'0').count() };
                let (ta, tb) = (&da[strip(da)..], &db[strip(db)..]);
                let o = ta.len().cmp(&tb.len()).then(ta.cmp(tb));
                if o != std::cmp::Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// The kernel to boot, from the names of the regular files in `/boot` (symlinks resolved by the
/// caller). Alpine's `vmlinuz-virt` is preferred, then `lts`, then the newest version, then a
/// bare `vmlinuz`.
pub fn pick_kernel(boot_files: &[String]) -> Option<Kernel> {
    let mut kernels: Vec<&str> = boot_files
        .iter()
        .map(String::as_str)
        .filter(|n| *n == "vmlinuz" || n.starts_with("vmlinuz-"))
        .collect();
    let rank = |n: &str| {
        let suffix = n.trim_start_matches("vmlinuz").trim_start_matches('-');
        FLAVOURS
            .iter()
            .position(|f| *f == suffix)
            .unwrap_or(FLAVOURS.len())
    };
    kernels.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| (*a == "vmlinuz").cmp(&(*b == "vmlinuz")))
            .then_with(|| natural_cmp(b, a))
    });
    let k = kernels.first()?;
    let suffix = &k["vmlinuz".len()..];
    let initrd = initrd_names(suffix)
        .into_iter()
        .find(|n| boot_files.iter().any(|f| f == n));
    Some(Kernel {
        kernel: format!("boot/{k}"),
        initrd: initrd.map(|n| format!("boot/{n}")),
    })
}

/// Regular files directly in `/boot` of the tree; a symlink there counts under its own name when
/// it points at a regular file of `/boot`.
pub fn boot_files(tree: &Tree) -> Vec<String> {
    let is_file = |p: &str| match tree.entries.get(p).map(|e| &e.node) {
        Some(Node::Inode(_)) => tree
            .inode_at(p)
            .is_some_and(|i| i.meta.kind == crate::tarfmt::Kind::File),
        _ => false,
    };
    let mut out = Vec::new();
    for (p, e) in tree.entries.range("boot/".to_string().."boot0".to_string()) {
        let Some(name) = p.strip_prefix("boot/") else {
            continue;
        };
        if name.contains('/') || !matches!(e.node, Node::Inode(_)) {
            continue;
        }
        let ok = match tree.inode_at(p).map(|i| &i.meta.kind) {
            Some(crate::tarfmt::Kind::File) => true,
            Some(crate::tarfmt::Kind::Symlink(t)) => {
                let target = crate::flatten::path::resolve_link("boot", t);
                target.starts_with("boot/") && is_file(&target)
            }
            _ => false,
        };
        if ok {
            out.push(name.to_string());
        }
    }
    out
}

/// The image has nothing to boot (`abox all` skips the disk of such images).
#[derive(Debug, thiserror::Error)]
#[error(
    "the image has no kernel in /boot (found: {found}), so a disk made from it cannot boot. \
     Add one in the Dockerfile: on Alpine `RUN apk add linux-virt` (plus `mkinitfs`), on \
     Debian `RUN apt-get install -y linux-image-cloud-amd64`"
)]
pub struct NoKernel {
    pub found: String,
}

/// The kernel of the tree, or a [`NoKernel`] error that says how to add one.
pub fn find_kernel(tree: &Tree) -> Result<Kernel> {
    let files = boot_files(tree);
    // syslinux is given the files themselves, not symlinks to them.
    let real = |p: String| match tree.inode_at(&p).map(|i| &i.meta.kind) {
        Some(crate::tarfmt::Kind::Symlink(t)) => crate::flatten::path::resolve_link("boot", t),
        _ => p,
    };
    let k = pick_kernel(&files).map(|k| Kernel {
        kernel: real(k.kernel),
        initrd: k.initrd.map(real),
    });
    k.ok_or_else(|| {
        NoKernel {
            found: if files.is_empty() {
                "nothing".to_string()
            } else {
                files.join(", ")
            },
        }
        .into()
    })
}

/// The kernel command line's root: the kernel resolves `PARTUUID=` itself, `UUID=` only
/// through an initramfs.
pub fn root_arg(k: &Kernel, fs_uuid: &str, part_uuid: &str) -> String {
    if k.initrd.is_some() {
        format!("root=UUID={fs_uuid}")
    } else {
        format!("root=PARTUUID={part_uuid}")
    }
}

/// How the disk boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Firmware {
    /// Legacy BIOS only (SYSLINUX).
    Bios,
    /// UEFI only (systemd-boot).
    Uefi,
    /// Both, from the same disk (default).
    #[default]
    Hybrid,
}

impl Firmware {
    pub fn bios(self) -> bool {
        matches!(self, Firmware::Bios | Firmware::Hybrid)
    }
    pub fn uefi(self) -> bool {
        matches!(self, Firmware::Uefi | Firmware::Hybrid)
    }
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "BIOS",
            Firmware::Uefi => "UEFI",
            Firmware::Hybrid => "BIOS+UEFI",
        }
    }
}

/// The one boot entry both loaders are configured from. Paths are on the ESP (its root is the
/// booted system's `/boot`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    pub title: String,
    /// `vmlinuz-virt`.
    pub kernel: String,
    pub initrd: Option<String>,
    /// The kernel command line.
    pub options: String,
}

/// The entry for kernel `k` with root `root` (see [`root_arg`]); Alpine's initramfs gets the
/// `modules=` its `update-extlinux` passes; consoles on the screen and the first serial port;
/// `extra` (the user's `--cmdline`) last.
pub fn entry(k: &Kernel, root: &str, alpine: bool, extra: Option<&str>, title: &str) -> BootEntry {
    let mut options = vec![root.to_string(), "rootfstype=ext4".to_string()];
    if alpine && k.initrd.is_some() {
        options.push("modules=sd-mod,usb-storage,ext4".into());
    }
    options.push("console=tty0".into());
    options.push("console=ttyS0,115200n8".into());
    if let Some(e) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        options.push(e.to_string());
    }
    let on_esp = |p: &str| p.strip_prefix("boot/").unwrap_or(p).to_string();
    BootEntry {
        title: title.to_string(),
        kernel: on_esp(&k.kernel),
        initrd: k.initrd.as_deref().map(on_esp),
        options: options.join(" "),
    }
}

/// Where abox writes on the ESP (the image's files of these names are left out).
pub const SYSLINUX_DIR: &str = "syslinux";
pub const SYSLINUX_CFG: &str = "syslinux/syslinux.cfg";
pub const EFI_LOADER: &str = "EFI/BOOT/BOOTX64.EFI";
pub const LOADER_CONF: &str = "loader/loader.conf";
pub const BLS_ENTRY: &str = "loader/entries/abox.conf";
/// Folders on the ESP abox writes into.
pub const ESP_DIRS: [&str; 5] = ["EFI", "EFI/BOOT", "loader", "loader/entries", SYSLINUX_DIR];
/// Names on the ESP that abox or the SYSLINUX installer write (compared without case, as FAT
/// does).
pub const ESP_OWNED: [&str; 6] = [
    SYSLINUX_CFG,
    "syslinux/ldlinux.sys",
    "syslinux/ldlinux.c32",
    EFI_LOADER,
    LOADER_CONF,
    BLS_ENTRY,
];

/// SYSLINUX's `syslinux.cfg`: no menu, serial console on ttyS0 at 115200 baud.
pub fn syslinux_cfg(e: &BootEntry) -> String {
    let mut s = String::from(
        "# Written by abox. Serial console on ttyS0 at 115200 baud and on the screen.\n\
         SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 10\n\nLABEL linux\n",
    );
    s.push_str(&format!("  MENU LABEL {}\n", e.title));
    s.push_str(&format!("  LINUX /{}\n", e.kernel));
    if let Some(i) = &e.initrd {
        s.push_str(&format!("  INITRD /{i}\n"));
    }
    s.push_str(&format!("  APPEND {}\n", e.options));
    s
}

/// systemd-boot's `loader/loader.conf`: the entry at once, no editor.
pub fn loader_conf() -> String {
    "# Written by abox.\ndefault abox.conf\ntimeout 0\nconsole-mode keep\neditor no\n".into()
}

/// The Boot Loader Specification type 1 entry (`loader/entries/abox.conf`).
pub fn bls_entry(e: &BootEntry) -> String {
    let mut s = format!("title {}\nlinux /{}\n", e.title, e.kernel);
    if let Some(i) = &e.initrd {
        s.push_str(&format!("initrd /{i}\n"));
    }
    s.push_str(&format!("options {}\n", e.options));
    s
}

/// Where distributions keep syslinux's MBR boot code.
const MBR_DIRS: [&str; 4] = [
    "/usr/lib/syslinux/mbr",
    "/usr/lib/EXTLINUX",
    "/usr/share/syslinux",
    "/usr/lib/syslinux/bios",
];

/// The 440 bytes of boot code for the table: `gptmbr.bin` or `mbr.bin`.
pub fn boot_code(table: Table) -> Result<Vec<u8>> {
    let p = boot_code_path(table)?;
    let code = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    if code.len() > 440 {
        bail!(
            "{} is {} bytes, more than the 440 of an MBR",
            p.display(),
            code.len()
        );
    }
    Ok(code)
}

/// Where syslinux's boot code for the table is: `ABOX_SYSLINUX_DIR`, else the folders
/// Debian, Ubuntu, Alpine and Fedora install it in. Missing: an error naming the package.
pub fn boot_code_path(table: Table) -> Result<PathBuf> {
    let name = match table {
        Table::Gpt => "gptmbr.bin",
        Table::Mbr => "mbr.bin",
    };
    let dirs: Vec<PathBuf> = std::env::var_os("ABOX_SYSLINUX_DIR")
        .map(|d| vec![PathBuf::from(d)])
        .unwrap_or_else(|| MBR_DIRS.iter().map(PathBuf::from).collect());
    for d in &dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "syslinux's {name} was not found in {}: install the `syslinux-common` package (Debian, \
         Ubuntu) or `syslinux` (Alpine, Fedora)",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Fails early, with the package to install, when the BIOS loader's installer is missing (the
/// mtools flavour of `syslinux`).
pub fn check_syslinux() -> Result<()> {
    if !on_path("syslinux") {
        bail!("`syslinux` (the mtools installer) is not installed: install the `syslinux` package (Debian, Ubuntu, Alpine), or make a UEFI-only disk with --firmware uefi");
    }
    Ok(())
}

/// Fails early, with the package to install, when a tool every disk needs is missing: mtools
/// (the ESP's folders, SYSLINUX's installer), `mke2fs` ≥ 1.47.1 (it reads a tar), and
/// `qemu-img` when the format is not raw.
pub fn check_tools(qemu_img: bool) -> Result<()> {
    for t in ["mmd", "mcopy"] {
        if !on_path(t) {
            bail!("`{t}` is not installed: install the `mtools` package");
        }
    }
    if qemu_img && !on_path("qemu-img") {
        bail!("`qemu-img` is not installed: install the `qemu-utils` package, or write a raw disk (-o NAME.img)");
    }
    let o = std::process::Command::new("mke2fs")
        .arg("-V")
        .output()
        .map_err(|_| anyhow::anyhow!("`mke2fs` is not installed: install e2fsprogs ≥ 1.47.1"))?;
    let text =
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    match crate::doctor::parse_version(text.lines().next().unwrap_or("")) {
        Some(v) if v >= (1, 47, 1) => Ok(()),
        v => bail!(
            "mke2fs is {}; abox needs e2fsprogs ≥ 1.47.1 (it makes the root filesystem from a tar \
             stream): on Debian 12, apt-get install -t bookworm-backports e2fsprogs",
            v.map(|(a, b, c)| format!("{a}.{b}.{c}"))
                .unwrap_or_else(|| "of an unknown version".into())
        ),
    }
}

/// systemd-boot's x64 loader on this machine: `ABOX_SYSTEMD_BOOT_EFI`, else Debian's and
/// Fedora's place. Missing: an error naming the package.
pub fn efi_loader() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ABOX_SYSTEMD_BOOT_EFI") {
        return Ok(PathBuf::from(p));
    }
    for p in [
        "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        "/lib/systemd/boot/efi/systemd-bootx64.efi",
    ] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("systemd-boot's systemd-bootx64.efi is not installed: install the `systemd-boot-efi` package (Debian, Ubuntu), or make a BIOS-only disk with --firmware bios")
}

/// Install SYSLINUX into the FAT ESP at byte `offset` of the unmounted disk file `disk`: the
/// mtools installer writes `/syslinux/ldlinux.sys` and `ldlinux.c32` and patches the FAT boot
/// sector to load them. It acts only on the disk file abox made.
pub fn install_syslinux(disk: &Path, offset: u64) -> Result<()> {
    crate::cmd::run(
        std::process::Command::new("syslinux")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["--install", "--offset", &offset.to_string()])
            .args(["--directory", &format!("/{SYSLINUX_DIR}")])
            .arg(disk),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn alpine_flavours_and_initramfs() {
        let k = pick_kernel(&names(&[
            "config-6.12.1-0-lts",
            "vmlinuz-lts",
            "initramfs-lts",
            "vmlinuz-virt",
            "initramfs-virt",
        ]))
        .unwrap();
        assert_eq!(k.kernel, "boot/vmlinuz-virt");
        assert_eq!(k.initrd.as_deref(), Some("boot/initramfs-virt"));
    }

    #[test]
    fn debian_newest_version_with_its_initrd() {
        let k = pick_kernel(&names(&[
            "vmlinuz-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-10-cloud-amd64",
            "initrd.img-6.1.0-10-cloud-amd64",
            "initrd.img-6.1.0-9-cloud-amd64",
            "vmlinuz",
        ]))
        .unwrap();
        assert_eq!(k.kernel, "boot/vmlinuz-6.1.0-10-cloud-amd64");
        assert_eq!(
            k.initrd.as_deref(),
            Some("boot/initrd.img-6.1.0-10-cloud-amd64")
        );
        let bare = pick_kernel(&names(&["vmlinuz", "initrd.img"])).unwrap();
        assert_eq!(bare.kernel, "boot/vmlinuz");
        assert_eq!(bare.initrd.as_deref(), Some("boot/initrd.img"));
        let none = pick_kernel(&names(&["vmlinuz-x"])).unwrap();
        assert_eq!(none.initrd, None);
        assert!(pick_kernel(&names(&["grub", "System.map"])).is_none());
    }

    #[test]
    fn root_by_uuid_only_with_an_initramfs() {
        let with = Kernel {
            kernel: "boot/vmlinuz-virt".into(),
            initrd: Some("boot/initramfs-virt".into()),
        };
        let without = Kernel {
            kernel: "boot/vmlinuz".into(),
            initrd: None,
        };
        assert_eq!(root_arg(&with, "F", "P"), "root=UUID=F");
        assert_eq!(root_arg(&without, "F", "P"), "root=PARTUUID=P");
        let e = entry(
            &with,
            "root=UUID=F",
            true,
            Some(" quiet "),
            "Alpine Linux v3.23",
        );
        let conf = syslinux_cfg(&e);
        assert!(conf.contains("PROMPT 0\n"), "{conf}");
        assert!(conf.contains("  LINUX /vmlinuz-virt\n  INITRD /initramfs-virt\n"));
        assert!(conf.contains(
            "APPEND root=UUID=F rootfstype=ext4 modules=sd-mod,usb-storage,ext4 console=tty0 console=ttyS0,115200n8 quiet\n"
        ), "{conf}");
        // The same data for systemd-boot.
        assert_eq!(
            bls_entry(&e),
            "title Alpine Linux v3.23\nlinux /vmlinuz-virt\ninitrd /initramfs-virt\noptions root=UUID=F rootfstype=ext4 modules=sd-mod,usb-storage,ext4 console=tty0 console=ttyS0,115200n8 quiet\n"
        );
        let e = entry(&without, "root=PARTUUID=P", false, None, "Linux");
        let conf = syslinux_cfg(&e);
        assert!(!conf.contains("INITRD"));
        assert!(conf.contains(
            "APPEND root=PARTUUID=P rootfstype=ext4 console=tty0 console=ttyS0,115200n8\n"
        ));
        assert!(!bls_entry(&e).contains("initrd"));
        assert!(loader_conf().contains("default abox.conf\n"));
    }

    #[test]
    fn natural_order() {
        assert!(natural_cmp("6.10", "6.9").is_gt());
        assert!(natural_cmp("a-09", "a-10").is_lt());
        assert!(natural_cmp("x", "x").is_eq());
    }
}
