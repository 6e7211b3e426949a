//! `abox disk`: an image → a VM disk that boots on BIOS and UEFI, as one output of the pipeline
//! (`crate::export`): a [`DiskTarget`] receives the flattened rootfs like the WSL and LXD
//! targets do, so `abox all` reads each image once for all of its artifacts. Nothing in it needs
//! root, a loop device or a mount.
//!
//! The stages, each in its own module: [`partition`] (the layout: GPT or MBR with the ESP and the
//! root, MBR boot code), [`esp`] and [`fs`] (the filesystems: FAT32 written in-process, ext4 by
//! `mke2fs -d -` from the fixed-up tar stream), [`boot`] (one boot entry → SYSLINUX for BIOS,
//! systemd-boot for UEFI), [`package`] (`qemu-img convert`). [`vmlayer`] decides, before
//! flattening, which image the disk is made from; [`fixup`] holds the disk's rootfs fix-ups.
//! The disk appears under its final name only when all of that succeeded.

pub mod boot;
pub mod esp;
pub mod fixup;
pub mod fs;
pub mod package;
pub mod partition;
pub mod vmlayer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::flatten::Plan;
use crate::output::{Artifact, PendingFile};
use crate::progress::Progress;
use crate::source::{self, SelectOptions};
use crate::tarfmt::{Meta, TarWriter};
use crate::target::{os_release, os_release_get, TarStream, Target};
pub use fixup::{fstab, random_uuid};
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
    /// VHD, fixed (QEMU's `vpc`): Azure, Hyper-V generation 1, older Virtual PC tools.
    Vhd,
}

/// The virtual size of a disk in a sparse format when no `--size` is given: room to work in
/// (peers give 2–10 GiB) that costs nothing until written, filled by the root at first boot.
pub const DEFAULT_VIRTUAL_BYTES: u64 = 4 << 30;

impl Format {
    /// Whether the file holds only what is written (not raw, not a fixed VHD).
    pub fn sparse(self) -> bool {
        !matches!(self, Format::Raw | Format::Vhd)
    }

    pub fn ext(self) -> &'static str {
        match self {
            Format::Raw => "img",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Vhd => "vhd",
        }
    }

    /// The extensions abox writes, for messages.
    pub const EXTENSIONS: &'static str = ".img or .raw (raw), .qcow2, .vmdk, .vdi, .vhdx, .vhd";

    /// The format an output file name asks for.
    pub fn from_path(p: &Path) -> Option<Self> {
        let ext = p.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "img" | "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "vhdx" => Format::Vhdx,
            "vhd" => Format::Vhd,
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
            Format::Vhd => "vpc",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    pub source: String,
    /// Output file (an existing folder: `<name>.<ext>` in it); default `out/<name>/<name>.<ext>`.
    pub output: Option<PathBuf>,
    pub format: Option<Format>,
    /// Bytes of the whole disk; `None` = auto.
    pub size: Option<u64>,
    /// `size` was chosen (`--size`, auto included). Otherwise a growable disk in a sparse format
    /// gets [`DEFAULT_VIRTUAL_BYTES`] ([`virtual_bytes`]).
    pub sized: bool,
    pub table: Table,
    /// Which firmware boots the disk.
    pub firmware: boot::Firmware,
    pub cmdline: Option<String>,
    /// Users, keys, passwords, hostname… written into the root ([`crate::identity`]).
    pub identity: Option<std::sync::Arc<crate::identity::Identity>>,
    /// qcow2 only: compressed clusters.
    pub compress: bool,
    pub select: SelectOptions,
    /// Do not build the VM layer (a kernel) on an Alpine `docker:` image that has none.
    pub no_vm_layer: bool,
    /// Install the LXD/Incus VM agent service (the disk of an `--lxd-vm` image).
    pub vm_agent: bool,
}

/// Whether the image's os-release says Alpine.
pub fn is_alpine(facts: &crate::flatten::Facts) -> bool {
    facts
        .text("etc/os-release")
        .map(|t| os_release_get(&os_release(t), "ID") == Some("alpine"))
        .unwrap_or(false)
}

/// The output file and format from `-o` / `--format`; without `-o`,
/// `out/<folder>/<name>.<format>`.
fn output_and_format(opts: &DiskOptions, name: &str, folder: &str) -> Result<(PathBuf, Format)> {
    match &opts.output {
        // A folder (one that exists, or a name ending in `/`, created): the disk goes into it
        // under its default name.
        Some(dir) if dir.is_dir() || dir.as_os_str().as_encoded_bytes().ends_with(b"/") => {
            let f = opts.format.unwrap_or_default();
            Ok((dir.join(format!("{name}.{}", f.ext())), f))
        }
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
                // A name abox does not write (`.vhd`-like but not, `.ova`, `.box`, `.iso`, none):
                // refused rather than a qcow2 under a misleading name.
                (None, None) => bail!(
                    "{}: abox writes {} disks; name the file with one of these extensions, \
                     give --format to write that format under this name, or end the name with \
                     / for a folder",
                    p.display(),
                    Format::EXTENSIONS
                ),
            };
            Ok((p.clone(), format))
        }
        None => {
            let f = opts.format.unwrap_or_default();
            Ok((
                crate::export::default_out_dir(folder).join(format!("{name}.{}", f.ext())),
                f,
            ))
        }
    }
}

/// The disk as a target of the pipeline. [`DiskTarget::create`] checks the tools and creates the
/// output (so an unwritable folder or a missing loader fails before any work); [`Target::start`]
/// lays out the disk from the plan and starts the two filesystems; the entries flow into them
/// ([`DiskOut`]); [`Target::finish`] writes the loaders' files, installs SYSLINUX and packages
/// the disk. No step needs root, a loop device or a mount.
pub struct DiskTarget {
    /// Between `start` and `finish`. Declared before `out`: fields drop in order, so on an
    /// error mke2fs is killed and waited for before the output's temporary file is removed
    /// (mke2fs creates a missing image file: one still starting would make it again).
    building: Option<Building>,
    opts: DiskOptions,
    out_path: PathBuf,
    format: Format,
    out: PendingFile,
    /// BIOS: syslinux's MBR code for the table.
    boot_code: Option<Vec<u8>>,
    /// UEFI: systemd-boot's loader.
    efi_loader: Option<Vec<u8>>,
    /// Seconds since the epoch for the entries the disk adds.
    mtime: u64,
    progress: Progress,
    /// Whether `finish` hashes the disk (for `SHA256SUMS`): [`DiskTarget::listed`].
    hashed: bool,
    /// The artifact's kind in `manifest.json`.
    kind: &'static str,
}

struct Building {
    stream: TarStream<crate::identity::fixup::Identified<fixup::DiskFixup>, DiskOut>,
    /// The raw disk when the output is another format (dropped last: it is removed).
    scratch: Option<PendingFile>,
    /// The raw disk as the external tools are given it (a link in `_tool_dir`).
    raw_path: PathBuf,
    /// The output file as `qemu-img` is given it.
    out_link: PathBuf,
    /// A private folder of links to the disk files: tools parse their path arguments (mtools
    /// splits at `@@`, qemu-img reads `NAME:` as a protocol), so they never see the user's.
    _tool_dir: TrackedDir,
    layout: partition::Layout,
    entry: boot::BootEntry,
}

impl DiskTarget {
    /// Check what the disk needs (the loaders for `opts.firmware`, the password file), refuse
    /// what cannot boot (another architecture than amd64: both loaders are x86-64), release
    /// what a killed earlier run left in the output folder, and create the output file
    /// `out_path` under its temporary name. `architecture` is the image's (OCI name).
    pub fn create(
        opts: &DiskOptions,
        out_path: &Path,
        format: Format,
        architecture: &str,
        mtime: u64,
        progress: &Progress,
    ) -> Result<Self> {
        if architecture != "amd64" {
            bail!(
                "the image is for {architecture}: abox writes x86-64 disks (SYSLINUX for BIOS, \
                 systemd-boot x64 for UEFI); choose the amd64 image with --platform linux/amd64"
            );
        }
        if opts.compress && format != Format::Qcow2 {
            bail!("--compress applies to qcow2 only");
        }
        boot::check_tools(format != Format::Raw)?;
        fs::check_tmpdir()?;
        let boot_code = if opts.firmware.bios() {
            boot::check_syslinux()?;
            Some(boot::boot_code(opts.table)?)
        } else {
            None
        };
        let efi_loader = if opts.firmware.uefi() {
            let p = boot::efi_loader()?;
            Some(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?)
        } else {
            None
        };
        // What an abox that died here before (SIGKILL) left behind is removed first, and said.
        for done in fs::reap_stale(out_dir_of(out_path))? {
            progress.note(&done);
        }
        let out = PendingFile::create(out_path)?;
        Ok(DiskTarget {
            opts: opts.clone(),
            out_path: out_path.to_path_buf(),
            format,
            out,
            boot_code,
            efi_loader,
            mtime,
            progress: *progress,
            hashed: false,
            kind: "disk",
            building: None,
        })
    }

    /// The artifact's kind in `manifest.json` (`disk` unless said).
    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    /// The disk will be listed in `SHA256SUMS` and `manifest.json`: `finish` hashes it.
    pub fn listed(mut self) -> Self {
        self.hashed = true;
        self
    }

    fn building(&mut self) -> &mut Building {
        self.building.as_mut().expect("disk started before entries")
    }
}

/// A temporary folder a second Ctrl-C removes too ([`crate::signals::track`]).
struct TrackedDir(tempfile::TempDir);

impl Drop for TrackedDir {
    fn drop(&mut self) {
        crate::signals::untrack(self.0.path());
    }
}

/// A link named `name` in `dir` to `target` (made absolute).
fn tool_link(dir: &TrackedDir, name: &str, target: &Path) -> Result<PathBuf> {
    let dir = &dir.0;
    let abs =
        std::path::absolute(target).with_context(|| format!("resolving {}", target.display()))?;
    let link = dir.path().join(name);
    std::os::unix::fs::symlink(&abs, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    Ok(link)
}

fn out_dir_of(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The virtual size to give a disk whose partitions end at `tight` bytes, with a note when it
/// is not that: without `--size`, a sparse disk of an image that grows its root at boot (OpenRC,
/// so abox's growroot service runs, with growpart and resize2fs) gets
/// [`DEFAULT_VIRTUAL_BYTES`]; one that cannot grow keeps `tight`, and the note says why.
pub fn virtual_bytes(
    opts: &DiskOptions,
    format: Format,
    tree: &crate::flatten::tree::Tree,
    tight: u64,
) -> (u64, Option<String>) {
    if opts.sized || !format.sparse() || tight >= DEFAULT_VIRTUAL_BYTES {
        return (tight, None);
    }
    let has = |paths: &[&str]| paths.iter().any(|p| tree.resolve(p).is_some());
    let openrc = crate::target::openrc::is_openrc(tree);
    let growpart = has(&["usr/bin/growpart", "bin/growpart", "usr/sbin/growpart"]);
    let resize2fs = has(&["sbin/resize2fs", "usr/sbin/resize2fs", "usr/bin/resize2fs"]);
    if openrc && growpart && resize2fs {
        let note = format!(
            "the disk's virtual size is {} (sparse: it takes only what is written); the root \
             grows to fill it at first boot. --size SIZE for another, --size auto for the \
             smallest",
            fs::human(DEFAULT_VIRTUAL_BYTES)
        );
        return (DEFAULT_VIRTUAL_BYTES, Some(note));
    }
    let missing: Vec<&str> = [
        (!openrc, "OpenRC (abox's growroot service)"),
        (!growpart, "growpart (cloud-utils-growpart)"),
        (!resize2fs, "resize2fs (e2fsprogs-extra)"),
    ]
    .iter()
    .filter(|(m, _)| *m)
    .map(|(_, w)| *w)
    .collect();
    let note = format!(
        "the disk is its smallest size, {}: the image cannot grow its root at boot (no {}); \
         give --size to make the root that large now",
        fs::human(tight),
        missing.join(", no ")
    );
    (tight, Some(note))
}

/// The root filesystem's size: `--size` less the table and the ESP, else auto.
fn fs_bytes(opts: &DiskOptions, usage: fs::Usage, esp_bytes: u64) -> Result<u64> {
    let Some(disk) = opts.size else {
        return Ok(fs::auto_fs_bytes(usage));
    };
    let overhead = partition::ALIGN * 2 + esp_bytes;
    let need = fs::min_fs_bytes(usage) + overhead;
    if disk < need {
        bail!(
            "--size {} is too small: this image needs at least {} ({} of files and folders, {} inodes, and a {} ESP); use --size auto or a larger size",
            fs::human(disk),
            fs::human(need),
            fs::human(usage.bytes),
            usage.inodes,
            fs::human(esp_bytes)
        );
    }
    Ok((disk - overhead) / partition::ALIGN * partition::ALIGN)
}

/// What `/boot` puts on the ESP: bytes in whole clusters (files and folders), and its folders
/// (parents first). More than [`esp::ENTRIES_MAX`] entries or [`esp::DIRS_MAX`] folders is an
/// error.
fn boot_tree(tree: &crate::flatten::tree::Tree) -> Result<(u64, Vec<String>)> {
    use crate::flatten::tree::Node;
    let cluster = u64::from(esp::CLUSTER);
    let mut bytes = 0u64;
    let mut dirs = Vec::new();
    let mut entries = 0usize;
    for (p, e) in tree.entries.range("boot/".to_string().."boot0".to_string()) {
        let Some(rel) = p.strip_prefix("boot/") else {
            continue;
        };
        entries += 1;
        match &e.node {
            Node::Dir(_) => {
                dirs.push(rel.to_string());
                bytes += cluster;
            }
            Node::Inode(_) => {
                if let Some(i) = tree.inode_at(p) {
                    if i.meta.kind == crate::tarfmt::Kind::File {
                        bytes = bytes.saturating_add(i.meta.size.div_ceil(cluster) * cluster);
                    }
                }
            }
        }
    }
    if entries > esp::ENTRIES_MAX || dirs.len() > esp::DIRS_MAX {
        bail!(
            "the image's /boot holds {entries} entries ({} folders): on a disk /boot is the FAT \
             EFI System Partition, and abox puts at most {} entries and {} folders there",
            dirs.len(),
            esp::ENTRIES_MAX,
            esp::DIRS_MAX
        );
    }
    Ok((bytes, dirs))
}

/// Whether `rel` (folded) is one of the ESP files abox or SYSLINUX's installer write, or lies
/// under one (an image folder at such a name).
fn under_owned(folded: &str) -> bool {
    boot::ESP_OWNED.iter().any(|o| {
        let o = esp::fold(o);
        folded == o || folded.starts_with(&format!("{o}/"))
    })
}

/// The folders to create on the ESP: the image's under `/boot` and abox's own, parents first,
/// one per name as FAT compares them; none at or under a name abox writes a file at. Returns
/// them with the image folders left out.
fn esp_dirs(image_dirs: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut all: Vec<String> = boot::ESP_DIRS.iter().map(|d| d.to_string()).collect();
    let mut left_out = Vec::new();
    for d in image_dirs {
        if under_owned(&esp::fold(&d)) {
            left_out.push(format!("/boot/{d}"));
        } else {
            all.push(d);
        }
    }
    all.sort_by_key(|d| esp::fold(d));
    let mut seen = std::collections::HashSet::new();
    all.retain(|d| seen.insert(esp::fold(d)));
    (all, left_out)
}

impl Target for DiskTarget {
    fn start(&mut self, plan: &Plan) -> Result<()> {
        // Layout: sizes from the tree; the table and boot code into a sparse file.
        let kernel = boot::find_kernel(plan.tree())?;
        let usage = fs::usage(plan.tree());
        let (boot_bytes, image_dirs) = boot_tree(plan.tree())?;
        let esp_bytes = esp::size_for(boot_bytes);
        let fs_bytes = fs_bytes(&self.opts, usage, esp_bytes)?;
        let fs_uuid = random_uuid()?;
        let root_guid = random_uuid()?;
        let esp_guid = random_uuid()?;
        let disk_guid = random_uuid()?;
        let mut layout = partition::layout(self.opts.table, esp_bytes, fs_bytes, &root_guid)?;
        let (disk_bytes, note) =
            virtual_bytes(&self.opts, self.format, plan.tree(), layout.disk_bytes);
        layout = layout.with_disk_bytes(disk_bytes)?;
        if let Some(n) = note {
            self.progress.note(&n);
        }
        // The raw disk is sparse, but what the filesystems hold is written for real; a
        // converted format needs the raw scratch and the result side by side.
        let copies = if self.format == Format::Raw { 1 } else { 2 };
        crate::output::check_room(
            out_dir_of(&self.out_path),
            (fs::min_fs_bytes(usage) + boot_bytes).saturating_mul(copies),
            "the disk",
            crate::output::OUT_FIX,
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
        let tool_dir = TrackedDir(
            tempfile::Builder::new()
                .prefix(&format!("{}{}-", fs::TOOL_DIR_PREFIX, std::process::id()))
                .tempdir()
                .with_context(|| {
                    format!(
                        "creating a temporary folder in {} (set TMPDIR to a writable folder)",
                        std::env::temp_dir().display()
                    )
                })?,
        );
        crate::signals::track(tool_dir.0.path());
        let out_link = tool_link(&tool_dir, "out", self.out.tmp_path())?;
        let raw = scratch.as_mut().unwrap_or(&mut self.out);
        let raw_path = tool_link(&tool_dir, "disk.raw", raw.tmp_path())?;
        let ids = partition::Guids {
            disk: &disk_guid,
            esp: &esp_guid,
            root: &root_guid,
        };
        partition::write_table(raw.file(), &layout, &ids, self.boot_code.as_deref())?;

        // Filesystems: FAT32 on the ESP (in-process), ext4 from the tar stream (mke2fs).
        let (dirs, dirs_left_out) = esp_dirs(image_dirs);
        let serial = u32::from_str_radix(&fs_uuid[..8], 16).unwrap_or(0x414258);
        let esp = esp::Esp::create(
            raw.file(),
            &raw_path,
            layout.esp.offset,
            layout.esp.bytes,
            serial,
            self.mtime,
            &dirs,
        )?;
        let mkfs = fs::mkfs_from_tar(
            &raw_path,
            layout.root.offset,
            layout.root.bytes,
            usage,
            &fs_uuid,
            "root",
        )?;
        let title = plan
            .facts
            .text("etc/os-release")
            .and_then(|t| os_release_get(&os_release(t), "PRETTY_NAME").map(str::to_string))
            .unwrap_or_else(|| "Linux".into());
        let root = boot::root_arg(&kernel, &fs_uuid, &layout.part_uuid);
        let entry = boot::entry(
            &kernel,
            &root,
            is_alpine(&plan.facts),
            self.opts.cmdline.as_deref(),
            &title,
        );
        let fixup = fixup::DiskFixup::new(&fs_uuid, esp.volume_id.clone(), self.mtime)
            .with_vm_agent(self.opts.vm_agent);
        let id = self.opts.identity.clone().map(|i| {
            crate::identity::fixup::IdentityFixup::new(
                i,
                crate::identity::fixup::Flavor::Disk,
                self.mtime,
            )
        });
        let fixup = crate::identity::fixup::Identified::new(fixup, id);
        // Inodes with paths on both sides of /boot (FAT has no hard links): the content goes to
        // the first path on the other side too.
        let mut cross = std::collections::HashMap::new();
        for (path, primary) in plan.hard_links() {
            if on_esp(path) != on_esp(primary) {
                cross
                    .entry(primary.to_string())
                    .or_insert_with(|| path.to_string());
            }
        }
        let out = DiskOut::new(mkfs, esp, &dirs, cross, dirs_left_out)?;
        let mut stream = TarStream::with_out(out, "", fixup);
        stream.start(plan)?;
        for n in stream.fixup.inner.notes() {
            self.progress.note(n);
        }
        self.building = Some(Building {
            stream,
            scratch,
            raw_path,
            out_link,
            _tool_dir: tool_dir,
            layout,
            entry,
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
        let task = self.progress.task("finishing the filesystems", 0);
        let (mut esp, left_out, xattrs_dropped) = b.stream.finish_entries()?.finish()?;
        crate::signals::check()?;
        fs::enable_checksums(&b.raw_path, b.layout.root.offset)?;
        // Boot: both loaders' files from the one entry, then SYSLINUX into the FAT.
        let firmware = self.opts.firmware;
        if let Some(loader) = self.efi_loader.take() {
            esp.require_pe(&b.entry.kernel)?;
            esp.file(boot::EFI_LOADER, loader)?;
            esp.file(boot::LOADER_CONF, boot::loader_conf().into_bytes())?;
            esp.file(boot::BLS_ENTRY, boot::bls_entry(&b.entry).into_bytes())?;
        }
        if firmware.bios() {
            esp.file(
                boot::SYSLINUX_CFG,
                boot::syslinux_cfg(&b.entry).into_bytes(),
            )?;
        }
        esp.finish()?;
        if firmware.bios() {
            boot::install_syslinux(&b.raw_path, b.layout.esp.offset)?;
        }
        task.finish(&format!(
            "{} {} disk: ext4 root {}, ESP {}; boots /{}",
            firmware.name(),
            b.layout.table.name(),
            fs::human(b.layout.root.bytes),
            fs::human(b.layout.esp.bytes),
            b.entry.kernel
        ));
        if !left_out.is_empty() {
            self.progress.note(&format!(
                "left out of /boot (the FAT ESP holds no symlinks or device nodes, no name twice \
                 in different case, nothing at the names abox writes): {}",
                left_out.join(", ")
            ));
        }
        if xattrs_dropped > 0 {
            self.progress.note(&format!(
                "{xattrs_dropped} files have extended attributes mke2fs does not copy (it keeps \
                 security.capability only): they are on the disk without them"
            ));
        }
        crate::signals::check()?;

        // Package: the requested format from the raw scratch.
        if let Some(scratch) = b.scratch {
            let task = self
                .progress
                .task(&format!("writing {}", self.format.qemu_name()), 0);
            package::convert(&b.raw_path, &b.out_link, self.format, self.opts.compress)?;
            drop(scratch);
            task.finish(&format!("{}", self.out_path.display()));
        }
        crate::signals::check()?;
        let this = *self;
        let mut out = this.out;
        out.file().sync_all().context("writing the disk")?;
        // Hashed only when a SHA256SUMS lists it (re-reading a large disk costs seconds).
        let (sha256, size) = if this.hashed {
            crate::output::hash_file(out.tmp_path())?
        } else {
            (String::new(), out.file().metadata()?.len())
        };
        Ok(vec![Artifact {
            kind: this.kind,
            file: out,
            sha256,
            size,
            image: None,
        }])
    }
}

fn on_esp(path: &str) -> bool {
    path.starts_with("boot/")
}

/// Where the disk's entries go: `/boot`'s content to the FAT ESP (regular files; a hard link as
/// a copy; symlinks, devices and FIFOs left out, as FAT has none), everything else into the tar
/// stream `mke2fs` reads. An inode with paths on both sides is written on both. Names FAT
/// folds together (case) are written once; what is left out is said. A write into the pipe
/// that fails reports `mke2fs`'s own error.
pub struct DiskOut {
    tar: TarWriter<std::io::BufWriter<std::process::ChildStdin>>,
    mkfs: Option<crate::cmd::PipedChild>,
    esp: esp::Esp,
    to: To,
    /// Folded names of the ESP's folders and of the files written on it.
    esp_dirs: std::collections::HashSet<String>,
    esp_files: std::collections::HashSet<String>,
    /// Content path → its first path on the other side of /boot.
    cross: std::collections::HashMap<String, String>,
    /// Such other-side paths written with the content (their hard-link entries are skipped).
    twins: std::collections::HashSet<String>,
    left_out: Vec<String>,
    /// Entries with extended attributes mke2fs does not copy (all but `security.capability`).
    xattrs_dropped: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum To {
    Root,
    Esp,
    Both,
    Nowhere,
}

impl DiskOut {
    fn new(
        mut mkfs: crate::cmd::PipedChild,
        esp: esp::Esp,
        dirs: &[String],
        cross: std::collections::HashMap<String, String>,
        left_out: Vec<String>,
    ) -> Result<Self> {
        let stdin = mkfs.take_stdin().context("mke2fs has no input")?;
        Ok(DiskOut {
            tar: TarWriter::new(std::io::BufWriter::with_capacity(1 << 20, stdin)),
            mkfs: Some(mkfs),
            esp,
            to: To::Nowhere,
            esp_dirs: dirs.iter().map(|d| esp::fold(d)).collect(),
            esp_files: Default::default(),
            cross,
            twins: Default::default(),
            left_out,
            xattrs_dropped: 0,
        })
    }

    /// A write into mke2fs's input failed: mke2fs's stderr says why.
    fn piped<T>(&mut self, r: std::io::Result<T>) -> Result<T> {
        r.map_err(|e| match self.mkfs.take() {
            Some(c) => c.broken(e),
            None => e.into(),
        })
    }

    /// End the tar stream and wait for mke2fs; hand back the ESP (still open for the loaders'
    /// files) and what the disk could not hold: the `/boot` entries left out and the number of
    /// entries whose extended attributes mke2fs dropped.
    fn finish(self) -> Result<(esp::Esp, Vec<String>, usize)> {
        let DiskOut {
            tar,
            mkfs,
            esp,
            left_out,
            xattrs_dropped,
            ..
        } = self;
        let mkfs = mkfs.context("mke2fs already failed")?;
        match tar
            .finish()
            .and_then(|mut w| std::io::Write::flush(&mut w).map(|_| w))
        {
            Ok(w) => drop(w),
            Err(e) => return Err(mkfs.broken(e)),
        }
        mkfs.wait().context("making the root filesystem")?;
        Ok((esp, left_out, xattrs_dropped))
    }

    /// Whether the file `rel` (relative to the ESP) may be written there: not a name abox
    /// writes (silently: abox's own file replaces it), not at or under another file or folder
    /// of the same name as FAT compares them (left out, said). Errors for names FAT cannot hold.
    fn esp_file(&mut self, rel: &str) -> Result<bool> {
        esp::check_name(rel)?;
        let f = esp::fold(rel);
        if boot::ESP_OWNED.iter().any(|o| esp::fold(o) == f) {
            return Ok(false);
        }
        let clash = self.esp_dirs.contains(&f)
            || self.esp_files.contains(&f)
            || under_owned(&f)
            || f.match_indices('/')
                .any(|(i, _)| self.esp_files.contains(&f[..i]));
        if clash {
            self.left_out.push(format!("/boot/{rel}"));
            return Ok(false);
        }
        self.esp_files.insert(f);
        Ok(true)
    }

    fn tar_begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        if meta.xattrs.iter().any(|(k, _)| k != "security.capability") {
            self.xattrs_dropped += 1;
        }
        let r = self.tar.begin(path, meta);
        self.piped(r)
    }
}

impl crate::tarfmt::EntryOut for DiskOut {
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        use crate::tarfmt::Kind;
        self.to = To::Nowhere;
        if self.twins.contains(path) {
            // Already written with its content, on this side of /boot.
            return Ok(());
        }
        match &meta.kind {
            Kind::Dir if on_esp(path) => {} // created with the ESP
            Kind::File => {
                let twin = self.cross.get(path).cloned();
                // Where the content goes: its own side, and the twin's.
                let mut esp_at = None;
                let mut root_at = None;
                for p in std::iter::once(path.to_string()).chain(twin.clone()) {
                    match p.strip_prefix("boot/") {
                        Some(rel) => esp_at = Some(rel.to_string()),
                        None => root_at = Some(p),
                    }
                }
                if let Some(t) = twin {
                    self.twins.insert(t);
                }
                if let Some(rel) = esp_at {
                    if self.esp_file(&rel)? {
                        self.esp.begin(&rel, meta.size)?;
                        self.to = To::Esp;
                    }
                }
                if let Some(p) = root_at {
                    self.tar_begin(&p, meta)?;
                    self.to = if self.to == To::Esp {
                        To::Both
                    } else {
                        To::Root
                    };
                }
            }
            Kind::Hardlink(t) => {
                // The path holding the content on this link's side of /boot.
                let src = if on_esp(t) == on_esp(path) {
                    Some(t.clone())
                } else {
                    self.cross
                        .get(t)
                        .filter(|c| self.twins.contains(*c))
                        .cloned()
                };
                match (src, path.strip_prefix("boot/")) {
                    (Some(src), Some(rel)) => {
                        let from = src.strip_prefix("boot/").unwrap_or(&src).to_string();
                        if self.esp_files.contains(&esp::fold(&from)) && self.esp_file(rel)? {
                            self.esp.copy(&from, rel)?;
                        } else {
                            self.left_out.push(format!("/{path}"));
                        }
                    }
                    (Some(src), None) => {
                        let mut m = meta.clone();
                        m.kind = Kind::Hardlink(src);
                        self.tar_begin(path, &m)?;
                        self.to = To::Root;
                    }
                    (None, _) => self.left_out.push(format!("/{path}")),
                }
            }
            _ if on_esp(path) => self.left_out.push(format!("/{path}")),
            _ => {
                self.tar_begin(path, meta)?;
                self.to = To::Root;
            }
        }
        Ok(())
    }

    fn data(&mut self, buf: &[u8]) -> Result<()> {
        if matches!(self.to, To::Root | To::Both) {
            let r = self.tar.data(buf);
            self.piped(r)?;
        }
        if matches!(self.to, To::Esp | To::Both) {
            self.esp.data(buf)?;
        }
        Ok(())
    }

    fn end(&mut self, size: u64) -> Result<()> {
        let to = std::mem::replace(&mut self.to, To::Nowhere);
        if matches!(to, To::Root | To::Both) {
            let r = self.tar.end(size);
            self.piped(r)?;
        }
        if matches!(to, To::Esp | To::Both) {
            self.esp.end()?;
        }
        Ok(())
    }
}

/// `abox disk`: open the image, decide on the VM layer, write the disk and move it to its
/// name; returns the disk's path. In abox's own folders (the default `out/<image>`, or one
/// with a `manifest.json`) the disk is listed in `SHA256SUMS` and `manifest.json` beside the
/// artifacts already there.
pub fn write_disk(
    opts: &DiskOptions,
    identity: &crate::identity::Sources,
    progress: &Progress,
) -> Result<PathBuf> {
    let image = source::open_with(&opts.source, &opts.select, None)?;
    let ids = crate::export::Identities::resolve(
        identity,
        &image.name,
        &[crate::identity::fixup::Flavor::Disk],
        progress,
    )?;
    let opts = &DiskOptions {
        identity: ids.disk,
        ..opts.clone()
    };
    let (out_path, format) = output_and_format(opts, &image.name, &image.folder_name())?;
    let out_dir = out_dir_of(&out_path);
    std::fs::create_dir_all(out_dir).with_context(|| {
        format!(
            "cannot create the output folder {} (choose another with -o)",
            out_dir.display()
        )
    })?;
    let mtime = crate::target::build_time(image.config.created().as_deref());
    // abox's folders: the default one (another tool's manifest.json there is refused), or one
    // holding abox's lists.
    let listed = opts.output.is_none()
        || matches!(
            crate::output::folder_lists(out_dir),
            crate::output::Lists::Abox(_)
        );
    if listed {
        crate::output::check_lists(out_dir)?;
    }
    let mut target = DiskTarget::create(
        opts,
        &out_path,
        format,
        &image.architecture(),
        mtime,
        progress,
    )?;
    if listed {
        target = target.listed();
    }
    let plan = crate::flatten::index(&image, progress)?;
    let cloud = opts.identity.as_ref().is_some_and(|i| i.cloud_init);
    let artifacts = match vmlayer::resolve(opts, &image, &plan, cloud, None, progress)? {
        None => crate::export::run_targets(&image, &plan, vec![Box::new(target)], progress)
            .map_err(|e| crate::output::explain_full(e, out_dir))?,
        Some((vm, vm_plan)) => {
            let mut a = crate::export::run_targets(&vm, &vm_plan, vec![Box::new(target)], progress)
                .map_err(|e| crate::output::explain_full(e, out_dir))?;
            // The manifest names the image the disk was made from.
            for a in a.iter_mut() {
                a.image = Some(vm.summary());
            }
            a
        }
    };
    if listed {
        crate::export::commit(out_dir, &opts.source, &image, artifacts, progress)?;
    } else {
        for a in artifacts {
            a.file.commit()?;
        }
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
        assert_eq!(Format::from_path(Path::new("b.VHD")), Some(Format::Vhd));
        for bad in ["x.ova", "x.box", "x.iso", "x.tar.gz", "x"] {
            let o = DiskOptions {
                output: Some(PathBuf::from(bad)),
                ..Default::default()
            };
            let e = output_and_format(&o, "n", "n-1").unwrap_err().to_string();
            assert!(
                e.contains(".vhdx, .vhd") && e.contains("--format"),
                "{bad}: {e}"
            );
        }
        let o = DiskOptions {
            output: Some(PathBuf::from("disk.bin")),
            format: Some(Format::Raw),
            ..Default::default()
        };
        assert_eq!(output_and_format(&o, "n", "n-1").unwrap().1, Format::Raw);
        let o = DiskOptions {
            output: Some("x.vdi".into()),
            format: Some(Format::Qcow2),
            ..Default::default()
        };
        assert!(output_and_format(&o, "n", "n-1").is_err());
        let o = DiskOptions {
            output: Some("not-yet/".into()),
            ..Default::default()
        };
        assert_eq!(
            output_and_format(&o, "n", "n-1").unwrap(),
            (PathBuf::from("not-yet/n.qcow2"), Format::Qcow2),
            "a name ending in / is a folder"
        );
        let o = DiskOptions::default();
        assert_eq!(
            output_and_format(&o, "n", "n-1").unwrap(),
            (PathBuf::from("out/n-1/n.qcow2"), Format::Qcow2)
        );
    }
}
