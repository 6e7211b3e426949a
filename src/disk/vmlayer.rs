//! The thin VM layer, d2vm-fashion: an Alpine image without a kernel (every alpine-boxes recipe:
//! they are container images) gets one from a one-step build on top of it through BuildKit —
//! `linux-virt`, `mkinitfs` with the drivers a VM disk needs, `syslinux` — tagged
//! `<repository>:<tag>-vm` next to it. The disk is made from that image; the image itself stays
//! a clean container image, and BuildKit's cache makes the next disk of the same image instant.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::{boot, DiskOptions};
use crate::engine::build::{build, split_tag, BuildSpec};
use crate::engine::Engine;
use crate::flatten::{self, Plan};
use crate::progress::Progress;
use crate::source::{self, Image, SourceRef};

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

/// The engine image to build the VM layer on, when `err` says the image has no kernel and it
/// is an Alpine `docker:` image (the layer installs Alpine's kernel with apk).
fn base_for(opts: &DiskOptions, plan: &Plan, err: &anyhow::Error) -> Option<String> {
    err.downcast_ref::<boot::NoKernel>()?;
    if opts.no_vm_layer {
        return None;
    }
    match SourceRef::parse(&opts.source).ok()? {
        SourceRef::Docker { name } if super::is_alpine(&plan.facts) => Some(name),
        _ => None,
    }
}

/// Which image the disk is made from, decided once, before any output is written: `None` when
/// `image` (indexed as `plan`) carries a kernel; else, for an Alpine `docker:` image, the VM
/// layer is built on it and the `-vm` image is opened and indexed (its output name stays
/// `image`'s). Errors: [`boot::NoKernel`] when there is no kernel and no VM layer to add; the
/// build's error when the layer fails.
pub fn resolve(
    opts: &DiskOptions,
    image: &Image,
    plan: &Plan,
    engine: Option<&Arc<Engine>>,
    progress: &Progress,
) -> Result<Option<(Image, Plan)>> {
    let err = match boot::find_kernel(plan.tree()) {
        Ok(_) => return Ok(None),
        Err(e) => e,
    };
    let Some(name) = base_for(opts, plan, &err) else {
        return Err(err);
    };
    let engine = match engine {
        Some(e) => e.clone(),
        None => Arc::new(Engine::connect()?),
    };
    let tag = build_on(&name, &engine, progress)?;
    let mut vm = source::open_with(&format!("docker:{tag}"), &opts.select, Some(&engine))?;
    vm.name = image.name.clone();
    let vm_plan = flatten::index(&vm, progress)?;
    boot::find_kernel(vm_plan.tree())
        .with_context(|| format!("the VM layer {tag} installed no kernel"))?;
    Ok(Some((vm, vm_plan)))
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
