//! The thin VM layer, d2vm-fashion: an Alpine image without a kernel (every alpine-boxes recipe:
//! they are container images) gets one from a one-step build on top of it through BuildKit —
//! `linux-virt`, `mkinitfs` with the drivers a VM disk needs, `syslinux` — tagged
//! `<repository>:<tag>-vm` next to it. The disk is made from that image; the image itself stays
//! a clean container image, and BuildKit's cache makes the next disk of the same image instant.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::engine::build::{build, split_tag, BuildSpec};
use crate::engine::Engine;
use crate::progress::Progress;

/// mkinitfs features: the disk controllers of QEMU/libvirt/Proxmox (virtio, NVMe, SCSI, ATA),
/// VirtualBox (ATA/AHCI), Hyper-V generation 1 (IDE/ATA), the root filesystem, USB keyboards.
pub const MKINITFS_FEATURES: &str = "ata base ide scsi usb virtio nvme ext4";

/// The layer's Dockerfile. mkinitfs.conf is written before `apk add`, so the kernel package's
/// trigger builds the initramfs with those features (apk keeps an existing config file).
pub fn dockerfile() -> String {
    format!(
        "# Written by alpine-boxes: the thin VM layer (a kernel and its initramfs) on top of an\n\
         # Alpine container image, for `abox disk`.\n\
         ARG BASE_IMAGE\n\
         FROM ${{BASE_IMAGE}}\n\
         RUN mkdir -p /etc/mkinitfs \\\n \
         && echo 'features=\"{MKINITFS_FEATURES}\"' > /etc/mkinitfs/mkinitfs.conf \\\n \
         && apk add --no-cache linux-virt mkinitfs syslinux \\\n \
         && rm -rf /var/cache/apk/*\n"
    )
}

/// `repo:tag` → `repo:tag-vm` (`repo` alone is `repo:latest`; a digest reference gets a tag made
/// from the digest).
pub fn vm_tag(name: &str) -> String {
    if let Some((repo, digest)) = name.split_once('@') {
        let hex = digest.rsplit(':').next().unwrap_or(digest);
        return format!("{repo}:vm-{}", &hex[..hex.len().min(12)]);
    }
    let (repo, tag) = split_tag(name);
    let tag = if tag.is_empty() { "latest" } else { tag };
    format!("{repo}:{tag}-vm")
}

/// Build the VM layer on the engine's image `name`; returns the new image's tag.
pub fn build_on(name: &str, engine: &Arc<Engine>, progress: &Progress) -> Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("abox-vm-layer-")
        .tempdir()
        .context("creating the VM layer's build context")?;
    std::fs::write(dir.path().join("Dockerfile"), dockerfile())?;
    let tag = vm_tag(name);
    let spec = BuildSpec {
        context: dir.path().to_path_buf(),
        name: format!("{name} VM layer"),
        tags: vec![tag.clone()],
        build_args: BTreeMap::from([("BASE_IMAGE".to_string(), name.to_string())]),
        ..Default::default()
    };
    let task = progress.task(&format!("adding a kernel to {name} (VM layer)"), 0);
    build(engine, &spec, progress).with_context(|| {
        format!(
            "building the VM layer on {name} (it installs linux-virt with apk, so it needs an \
             Alpine package mirror; or add a kernel to the image yourself, or pass --no-vm-layer)"
        )
    })?;
    task.finish(&tag);
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_tags() {
        assert_eq!(
            vm_tag("alpine-boxes/base:3.22.2"),
            "alpine-boxes/base:3.22.2-vm"
        );
        assert_eq!(vm_tag("base"), "base:latest-vm");
        assert_eq!(
            vm_tag("127.0.0.1:5000/b/base"),
            "127.0.0.1:5000/b/base:latest-vm"
        );
        assert_eq!(
            vm_tag("base@sha256:0123456789abcdef0123"),
            "base:vm-0123456789ab"
        );
    }

    #[test]
    fn dockerfile_configures_mkinitfs_before_the_kernel() {
        let d = dockerfile();
        let conf = d.find("mkinitfs.conf").unwrap();
        let add = d
            .find("apk add --no-cache linux-virt mkinitfs syslinux")
            .unwrap();
        assert!(conf < add, "{d}");
        assert!(d.contains("FROM ${BASE_IMAGE}"));
        assert!(!d.contains("# syntax"));
        // Every line continued with a backslash ends with one (no stray spaces after it).
        assert!(!d.contains("\\ \n"));
    }
}
