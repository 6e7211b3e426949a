//! `abox disk`: an image → a bootable VM disk, d2vm-fashion, as one output of the pipeline
//! (`crate::export`): a [`DiskTarget`] receives the flattened rootfs like the WSL and LXD
//! targets do, so `abox all` reads each image once for all of its artifacts.
//!
//! The stages, each in its own module: [`partition`] (the layout: table and boot code in a
//! sparse file), [`fs`] (the root filesystem: sizing, `mke2fs`, the loop device and mount),
//! [`populate`] (the rootfs written into it straight from the flattening, through the
//! [`fixup::DiskFixup`]), [`boot`] (`extlinux.conf`, extlinux), [`package`] (`qemu-img convert`
//! to the requested format). [`vmlayer`] decides, before flattening, which image the disk is
//! made from. The disk appears under its final name only when all of that succeeded.

pub mod boot;
pub mod fixup;
pub mod fs;
pub mod package;
pub mod partition;
pub mod populate;
pub mod vmlayer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::flatten::Plan;
use crate::output::{Artifact, PendingFile};
use crate::progress::Progress;
use crate::source::{self, SelectOptions};
use crate::tarfmt::Meta;
use crate::target::{os_release, os_release_get, TarStream, Target};
pub use fixup::{fstab, random_uuid, root_password_hash, set_root_hash};
use partition::Table;

/// Disk image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// Raw disk image (sparse), for QEMU, `dd` to a real disk, or cloud uploads.
    Raw,
    /// QEMU copy-on-write (default); libvirt, Proxmox.
    #[default]
    Qcow2,
    /// VMware, and VirtualBox.
    Vmdk,
    /// VirtualBox.
    Vdi,
    /// Hyper-V (generation 1 VM: the disk boots with BIOS).
    Vhdx,
}

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Raw => "img",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
        }
    }

    /// The format an output file name asks for.
    pub fn from_path(p: &Path) -> Option<Self> {
        let ext = p.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "img" | "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "vhdx" => Format::Vhdx,
            _ => return None,
        })
    }

    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    pub source: String,
    /// Output file; default `out/<name>/<name>.<ext>`.
    pub output: Option<PathBuf>,
    pub format: Option<Format>,
    /// Bytes of the whole disk; `None` = auto.
    pub size: Option<u64>,
    pub table: Table,
    pub cmdline: Option<String>,
    pub root_password_file: Option<PathBuf>,
    /// qcow2 only: compressed clusters.
    pub compress: bool,
    pub select: SelectOptions,
    /// Do not build the VM layer (a kernel) on an Alpine `docker:` image that has none.
    pub no_vm_layer: bool,
}

/// Whether the image's os-release says Alpine.
pub fn is_alpine(facts: &crate::flatten::Facts) -> bool {
    facts
        .text("etc/os-release")
        .map(|t| os_release_get(&os_release(t), "ID") == Some("alpine"))
        .unwrap_or(false)
}

/// The output file and format from `-o` / `--format`.
fn output_and_format(opts: &DiskOptions, name: &str) -> Result<(PathBuf, Format)> {
    match &opts.output {
        Some(p) => {
            let inferred = Format::from_path(p);
            let format = match (opts.format, inferred) {
                (Some(f), Some(i)) if f != i => bail!(
                    "{} looks like a {} file but --format {} was given",
                    p.display(),
                    i.ext(),
                    f.qemu_name()
                ),
                (Some(f), _) | (None, Some(f)) => f,
                (None, None) => Format::default(),
            };
            Ok((p.clone(), format))
        }
        None => {
            let f = opts.format.unwrap_or_default();
            Ok((
                crate::export::default_out_dir(name).join(format!("{name}.{}", f.ext())),
                f,
            ))
        }
    }
}

/// The disk as a target of the pipeline. [`DiskTarget::create`] checks the tools and creates the
/// output (so an unwritable folder fails before any work); [`Target::start`] sizes, partitions
/// and makes the filesystem from the plan; the entries go into it; [`Target::finish`] installs
/// the boot loader, releases the filesystem and packages the disk.
pub struct DiskTarget {
    opts: DiskOptions,
    out_path: PathBuf,
    format: Format,
    out: PendingFile,
    boot_code: Vec<u8>,
    root_hash: Option<String>,
    /// Seconds since the epoch for the entries the disk adds.
    mtime: u64,
    progress: Progress,
    /// Between `start` and `finish`. Fields drop in order: the stream, the mount, the loop
    /// device, the scratch file.
    building: Option<Building>,
}

struct Building {
    stream: TarStream<fixup::DiskFixup, populate::DirOut>,
    mnt: fs::Mount,
    lo: fs::Loop,
    scratch: Option<PendingFile>,
    kernel: boot::Kernel,
}

impl DiskTarget {
    /// Check what the disk needs (root, extlinux, syslinux's boot code, the password file),
    /// release what a killed earlier run left in the output folder, and create the output file
    /// `out_path` under its temporary name.
    pub fn create(
        opts: &DiskOptions,
        out_path: &Path,
        format: Format,
        mtime: u64,
        progress: &Progress,
    ) -> Result<Self> {
        fs::require_root()?;
        boot::check_extlinux()?;
        if opts.compress && format != Format::Qcow2 {
            bail!("--compress applies to qcow2 only");
        }
        let boot_code = boot::boot_code(opts.table)?;
        let root_hash = opts
            .root_password_file
            .as_deref()
            .map(root_password_hash)
            .transpose()?;
        let out_dir = out_dir_of(out_path);
        // What an abox that died here before (SIGKILL) left behind is released first, and said.
        for done in fs::reap_stale(out_dir)? {
            progress.note(&done);
        }
        let out = PendingFile::create(out_path)?;
        Ok(DiskTarget {
            opts: opts.clone(),
            out_path: out_path.to_path_buf(),
            format,
            out,
            boot_code,
            root_hash,
            mtime,
            progress: *progress,
            building: None,
        })
    }

    fn building(&mut self) -> &mut Building {
        self.building.as_mut().expect("disk started before entries")
    }
}

fn out_dir_of(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The root filesystem's size for the tree: `--size` less the table's overhead, else auto.
fn fs_bytes(opts: &DiskOptions, usage: fs::Usage) -> Result<u64> {
    let Some(disk) = opts.size else {
        return Ok(fs::auto_fs_bytes(usage));
    };
    let overhead = partition::ALIGN * 2;
    let need = fs::min_fs_bytes(usage) + overhead;
    if disk < need {
        bail!(
            "--size {} is too small: this image needs at least {} ({} of files and folders, {} inodes); use --size auto or a larger size",
            fs::human(disk),
            fs::human(need),
            fs::human(usage.bytes),
            usage.inodes
        );
    }
    Ok((disk - overhead) / partition::ALIGN * partition::ALIGN)
}

impl Target for DiskTarget {
    fn start(&mut self, plan: &Plan) -> Result<()> {
        // Layout: sizes from the tree, the table and boot code into a sparse file.
        let kernel = boot::find_kernel(plan.tree())?;
        let usage = fs::usage(plan.tree());
        let fs_bytes = fs_bytes(&self.opts, usage)?;
        let fs_uuid = random_uuid()?;
        let part_guid = random_uuid()?;
        let disk_guid = random_uuid()?;
        let layout = partition::layout(self.opts.table, fs_bytes, &part_guid)?;
        // The raw disk is sparse, but what the filesystem holds is written for real; a
        // converted format needs the raw scratch and the result side by side.
        let copies = if self.format == Format::Raw { 1 } else { 2 };
        crate::output::check_room(
            out_dir_of(&self.out_path),
            fs::min_fs_bytes(usage).saturating_mul(copies),
            "the disk",
        )?;
        // The raw disk: the output itself, or a scratch file next to it for qemu-img.
        let mut scratch = match self.format {
            Format::Raw => None,
            _ => {
                let name = self
                    .out_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Some(PendingFile::create(
                    &self.out_path.with_file_name(format!("{name}.raw")),
                )?)
            }
        };
        let raw = scratch.as_mut().unwrap_or(&mut self.out);
        let raw_path = raw.tmp_path().to_path_buf();
        partition::write_table(raw.file(), &layout, &part_guid, &disk_guid, &self.boot_code)?;
        raw.file().sync_all()?;

        // Filesystem: ext4 on a loop device over the partition, mounted.
        let task = self.progress.task("making filesystem", 0);
        let lo = fs::Loop::attach(&raw_path, layout.part_offset, layout.part_bytes)?;
        fs::mkfs(lo.dev(), layout.part_bytes, usage, &fs_uuid, "root")?;
        let mnt = fs::Mount::new(lo.dev())?;
        task.finish(&format!(
            "ext4 {} on a {} {} disk",
            fs::human(layout.part_bytes),
            fs::human(layout.disk_bytes),
            match self.opts.table {
                Table::Gpt => "GPT",
                Table::Mbr => "MBR",
            }
        ));

        // The rootfs goes into it through the disk's fix-ups.
        let root = boot::root_arg(&kernel, &fs_uuid, &layout.part_uuid);
        let conf = boot::extlinux_conf(
            &kernel,
            &root,
            is_alpine(&plan.facts),
            self.opts.cmdline.as_deref(),
        );
        let fixup = fixup::DiskFixup::new(&fs_uuid, conf, self.root_hash.take(), self.mtime);
        let mut stream = TarStream::with_out(populate::DirOut::new(mnt.path())?, "", fixup);
        stream.start(&plan.facts)?;
        self.building = Some(Building {
            stream,
            mnt,
            lo,
            scratch,
            kernel,
        });
        Ok(())
    }

    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        self.building().stream.begin(path, meta)
    }

    fn data(&mut self, buf: &[u8]) -> Result<()> {
        self.building().stream.data(buf)
    }

    fn end(&mut self) -> Result<()> {
        self.building().stream.end()
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<Artifact>> {
        let b = self.building.take().expect("disk started before finish");
        b.stream.finish_entries()?.finish()?;
        crate::signals::check()?;

        // Boot: extlinux into the mounted /boot; then the filesystem is released.
        let task = self.progress.task("installing extlinux", 0);
        boot::install(&b.mnt.path().join("boot"))?;
        b.mnt.unmount()?;
        b.lo.detach()?;
        task.finish(&format!("boots /{}", b.kernel.kernel));
        crate::signals::check()?;

        // Package: the requested format from the raw scratch.
        if let Some(scratch) = b.scratch {
            let task = self
                .progress
                .task(&format!("writing {}", self.format.qemu_name()), 0);
            package::convert(
                scratch.tmp_path(),
                self.out.tmp_path(),
                self.format,
                self.opts.compress,
            )?;
            drop(scratch);
            task.finish(&format!("{}", self.out_path.display()));
        }
        crate::signals::check()?;
        let this = *self;
        let mut out = this.out;
        out.file().sync_all().context("writing the disk")?;
        let (sha256, size) = crate::output::hash_file(out.tmp_path())?;
        Ok(vec![Artifact {
            kind: "disk",
            file: out,
            sha256,
            size,
            image: None,
        }])
    }
}

/// `abox disk`: open the image, decide on the VM layer, write the disk and move it to its
/// name; returns the disk's path.
pub fn write_disk(opts: &DiskOptions, progress: &Progress) -> Result<PathBuf> {
    let image = source::open_with(&opts.source, &opts.select, None)?;
    let (out_path, format) = output_and_format(opts, &image.name)?;
    let out_dir = out_dir_of(&out_path);
    std::fs::create_dir_all(out_dir).with_context(|| {
        format!(
            "cannot create the output folder {} (choose another with -o)",
            out_dir.display()
        )
    })?;
    let mtime = crate::target::build_time(image.config.created().as_deref());
    let target = DiskTarget::create(opts, &out_path, format, mtime, progress)?;
    let plan = crate::flatten::index(&image, progress)?;
    let artifacts = match vmlayer::resolve(opts, &image, &plan, None, progress)? {
        None => crate::export::run_targets(&image, &plan, vec![Box::new(target)], progress)?,
        Some((vm, vm_plan)) => {
            crate::export::run_targets(&vm, &vm_plan, vec![Box::new(target)], progress)?
        }
    };
    for a in artifacts {
        a.file.commit()?;
    }
    Ok(out_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_names() {
        assert_eq!(Format::from_path(Path::new("a/b.VHDX")), Some(Format::Vhdx));
        assert_eq!(Format::from_path(Path::new("b.raw")), Some(Format::Raw));
        assert_eq!(Format::from_path(Path::new("b.txt")), None);
        let o = DiskOptions {
            output: Some("x.vdi".into()),
            format: Some(Format::Qcow2),
            ..Default::default()
        };
        assert!(output_and_format(&o, "n").is_err());
        let o = DiskOptions::default();
        assert_eq!(
            output_and_format(&o, "n").unwrap(),
            (PathBuf::from("out/n/n.qcow2"), Format::Qcow2)
        );
    }
}
