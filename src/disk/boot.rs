//! The boot loader step: which kernel and initramfs the image carries, the `extlinux.conf` that
//! boots them, and the host's syslinux files (`extlinux`, `gptmbr.bin` / `mbr.bin`).

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

/// `/boot/extlinux.conf`.
pub fn extlinux_conf(k: &Kernel, root: &str, alpine: bool, extra: Option<&str>) -> String {
    let mut append = vec![root.to_string(), "rootfstype=ext4".to_string()];
    if alpine && k.initrd.is_some() {
        // What Alpine's update-extlinux passes: the initramfs loads these before the root.
        append.push("modules=sd-mod,usb-storage,ext4".into());
    }
    append.push("console=tty0".into());
    append.push("console=ttyS0,115200n8".into());
    if let Some(e) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        append.push(e.to_string());
    }
    let mut s = String::from(
        "# Written by abox. Serial console on ttyS0 at 115200 baud and on the screen.\n\
         SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 10\n\nLABEL linux\n",
    );
    s.push_str(&format!("  LINUX /{}\n", k.kernel));
    if let Some(i) = &k.initrd {
        s.push_str(&format!("  INITRD /{i}\n"));
    }
    s.push_str(&format!("  APPEND {}\n", append.join(" ")));
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

/// Fails early, with the package to install, when `extlinux` is missing.
pub fn check_extlinux() -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("extlinux").is_file()));
    if !found {
        bail!("`extlinux` is not installed: install the `extlinux` package (Debian, Ubuntu) or `syslinux` (Alpine, Fedora)");
    }
    Ok(())
}

/// The files `extlinux --install` opens in the folder it is given: it writes ldlinux.sys and
/// ldlinux.c32, and reads, chmods and unlinks a legacy extlinux.sys.
pub const EXTLINUX_WRITES: [&str; 3] = ["ldlinux.sys", "ldlinux.c32", "extlinux.sys"];

/// Install extlinux into the mounted `/boot`. The tool acts on paths inside the image, so they
/// are checked first: `/boot` a real folder (no symlink anywhere on the way) and nothing at the
/// names extlinux writes (the disk's fix-ups drop the image's entries there). Nothing else
/// writes in the mount meanwhile, so the check holds when the tool runs.
pub fn install(boot_dir: &Path) -> Result<()> {
    let md = std::fs::symlink_metadata(boot_dir)
        .with_context(|| format!("{} is missing", boot_dir.display()))?;
    if !md.is_dir() {
        bail!("the image's /boot is not a folder (a symlink?): refusing to install the boot loader through it");
    }
    for f in EXTLINUX_WRITES {
        match std::fs::symlink_metadata(boot_dir.join(f)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => bail!("/boot/{f} is in the image: refusing to let extlinux write over it"),
        }
    }
    crate::cmd::run(
        std::process::Command::new("extlinux")
            .arg("--install")
            .arg(boot_dir),
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
        let conf = extlinux_conf(&with, "root=UUID=F", true, Some(" quiet "));
        assert!(conf.contains("PROMPT 0\n"), "{conf}");
        assert!(conf.contains("  LINUX /boot/vmlinuz-virt\n  INITRD /boot/initramfs-virt\n"));
        assert!(conf.contains(
            "APPEND root=UUID=F rootfstype=ext4 modules=sd-mod,usb-storage,ext4 console=tty0 console=ttyS0,115200n8 quiet\n"
        ), "{conf}");
        let conf = extlinux_conf(&without, "root=PARTUUID=P", false, None);
        assert!(!conf.contains("INITRD"));
        assert!(conf.contains(
            "APPEND root=PARTUUID=P rootfstype=ext4 console=tty0 console=ttyS0,115200n8\n"
        ));
    }

    #[test]
    fn natural_order() {
        assert!(natural_cmp("6.10", "6.9").is_gt());
        assert!(natural_cmp("a-09", "a-10").is_lt());
        assert!(natural_cmp("x", "x").is_eq());
    }
}
