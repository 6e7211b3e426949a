//! The thin VM layer, d2vm-fashion: an Alpine image without a kernel (every alpine-boxes recipe:
//! they are container images) gets one from a one-step build on top of it through BuildKit —
//! `linux-virt`, `mkinitfs` with the drivers a VM disk needs, `syslinux` — tagged
//! `<repository>:<tag>-vm` next to it. With `--cloud-init`, an image without tiny-cloud gets
//! `tiny-cloud-nocloud` in the same layer (`-vm-cloud`, or `-cloud` when it has a kernel). The disk is made from that image; the image itself stays
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

/// What the layer adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// A kernel, its initramfs and SYSLINUX's files.
    pub kernel: bool,
    /// tiny-cloud with its NoCloud module.
    pub tiny_cloud: bool,
}

impl Needs {
    fn any(self) -> bool {
        self.kernel || self.tiny_cloud
    }
    /// The tag suffix of the layer's image.
    fn suffix(self) -> &'static str {
        match (self.kernel, self.tiny_cloud) {
            (true, true) => "vm-cloud",
            (false, true) => "cloud",
            _ => "vm",
        }
    }
}

/// The layer's Dockerfile. mkinitfs.conf is written before `apk add`, so the kernel package's
/// trigger builds the initramfs with those features (apk keeps an existing config file).
pub fn dockerfile(needs: Needs) -> String {
    let mut packages = Vec::new();
    let mut mkinitfs = String::new();
    if needs.kernel {
        packages.extend(["linux-virt", "mkinitfs", "syslinux"]);
        mkinitfs = format!(
            "mkdir -p /etc/mkinitfs \\\n \
             && echo 'features=\"{MKINITFS_FEATURES}\"' > /etc/mkinitfs/mkinitfs.conf \\\n \
             && "
        );
    }
    if needs.tiny_cloud {
        packages.push("tiny-cloud-nocloud");
    }
    format!(
        "# Written by alpine-boxes: the thin VM layer (a kernel and its initramfs, tiny-cloud\n\
         # for --cloud-init) on top of an Alpine container image, for `abox disk`.\n\
         ARG BASE_IMAGE\n\
         FROM ${{BASE_IMAGE}}\n\
         RUN {mkinitfs}apk add --no-cache {} \\\n \
         && rm -rf /var/cache/apk/*\n",
        packages.join(" ")
    )
}

/// `repo:tag` → `repo:tag-vm` (`repo` alone is `repo:latest`; a digest reference gets a tag made
/// from the digest).
pub fn vm_tag(name: &str) -> String {
    layer_tag(name, "vm")
}

fn layer_tag(name: &str, suffix: &str) -> String {
    if let Some((repo, digest)) = name.split_once('@') {
        let hex = digest.rsplit(':').next().unwrap_or(digest);
        return format!("{repo}:{suffix}-{}", &hex[..hex.len().min(12)]);
    }
    let (repo, tag) = split_tag(name);
    let tag = if tag.is_empty() { "latest" } else { tag };
    format!("{repo}:{tag}-{suffix}")
}

/// Build the VM layer on the engine's image `name`; returns the new image's tag.
pub fn build_on(
    name: &str,
    needs: Needs,
    engine: &Arc<Engine>,
    progress: &Progress,
) -> Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("abox-vm-layer-")
        .tempdir()
        .context("creating the VM layer's build context")?;
    std::fs::write(dir.path().join("Dockerfile"), dockerfile(needs))?;
    let tag = layer_tag(name, needs.suffix());
    let spec = BuildSpec {
        context: dir.path().to_path_buf(),
        name: format!("{name} VM layer"),
        tags: vec![tag.clone()],
        build_args: BTreeMap::from([("BASE_IMAGE".to_string(), name.to_string())]),
        ..Default::default()
    };
    let what = match (needs.kernel, needs.tiny_cloud) {
        (true, true) => "a kernel and tiny-cloud",
        (false, true) => "tiny-cloud",
        _ => "a kernel",
    };
    let task = progress.task(&format!("adding {what} to {name} (VM layer)"), 0);
    build(engine, &spec, progress).with_context(|| {
        format!(
            "building the VM layer on {name} (it installs {what} with apk, so it needs an \
             Alpine package mirror; or add them to the image yourself, or pass --no-vm-layer)"
        )
    })?;
    task.finish(&tag);
    Ok(tag)
}

/// The engine image to build the VM layer on: an Alpine `docker:` image, unless
/// `--no-vm-layer`.
fn base_for(opts: &DiskOptions, plan: &Plan) -> Option<String> {
    if opts.no_vm_layer {
        return None;
    }
    match SourceRef::parse(&opts.source).ok()? {
        SourceRef::Docker { name } if super::is_alpine(&plan.facts) => Some(name),
        _ => None,
    }
}

/// Which image the disk is made from, decided once, before any output is written: `None` when
/// `image` (indexed as `plan`) carries a kernel (and tiny-cloud, when `cloud` asks for it);
/// else, for an Alpine `docker:` image, the VM layer is built on it with what is missing and
/// the layer's image is opened and indexed (its output name stays `image`'s). Errors:
/// [`boot::NoKernel`] when there is no kernel and no VM layer to add; the build's error when
/// the layer fails. An image without tiny-cloud that gets no layer is left to the identity's
/// fix-ups, which say what to do.
pub fn resolve(
    opts: &DiskOptions,
    image: &Image,
    plan: &Plan,
    cloud: bool,
    engine: Option<&Arc<Engine>>,
    progress: &Progress,
) -> Result<Option<(Image, Plan)>> {
    let kernel = boot::find_kernel(plan.tree());
    let needs = Needs {
        kernel: kernel.is_err(),
        tiny_cloud: cloud && !crate::identity::fixup::has_tiny_cloud(plan.tree()),
    };
    if !needs.any() {
        return Ok(None);
    }
    let Some(name) = base_for(opts, plan) else {
        return match kernel {
            Err(e) => Err(e),
            Ok(_) => Ok(None),
        };
    };
    if let Err(e) = &kernel {
        if e.downcast_ref::<boot::NoKernel>().is_none() {
            return Err(kernel.unwrap_err());
        }
    }
    let engine = match engine {
        Some(e) => e.clone(),
        None => Arc::new(Engine::connect()?),
    };
    let tag = build_on(&name, needs, &engine, progress)?;
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
        let d = dockerfile(Needs {
            kernel: true,
            tiny_cloud: false,
        });
        let conf = d.find("mkinitfs.conf").unwrap();
        let add = d
            .find("apk add --no-cache linux-virt mkinitfs syslinux")
            .unwrap();
        assert!(conf < add, "{d}");
        assert!(d.contains("FROM ${BASE_IMAGE}"));
        assert!(!d.contains("# syntax"));
        // Every line continued with a backslash ends with one (no stray spaces after it).
        assert!(!d.contains("\\ \n"));
        let both = dockerfile(Needs {
            kernel: true,
            tiny_cloud: true,
        });
        assert!(
            both.contains("apk add --no-cache linux-virt mkinitfs syslinux tiny-cloud-nocloud"),
            "{both}"
        );
        let cloud = dockerfile(Needs {
            kernel: false,
            tiny_cloud: true,
        });
        assert!(
            cloud.contains("RUN apk add --no-cache tiny-cloud-nocloud \\\n"),
            "{cloud}"
        );
        assert!(!cloud.contains("mkinitfs"), "{cloud}");
        assert_eq!(layer_tag("a/b:1", "vm-cloud"), "a/b:1-vm-cloud");
    }
}
