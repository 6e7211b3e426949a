//! The pipeline: one image → its artifacts, in one flattening shared by all targets
//! ([`run_targets`]); `abox export`, `abox disk` and `abox all` are made of its steps.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::disk::boot::{Firmware, NoKernel};
use crate::disk::{vmlayer, DiskOptions, DiskTarget, Format};
use crate::flatten::{self, Plan};
use crate::identity::fixup::Flavor;
use crate::identity::Identity;
use crate::output::{commit_all, Artifact};
use crate::progress::Progress;
use crate::source::{self, Image, SelectOptions};
use crate::target::{self, lxd, wsl, Fanout, Target};
use std::sync::Arc;

/// Which artifacts to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub wsl: bool,
    pub wsl_package: bool,
    pub lxd: bool,
    pub lxd_split: bool,
    /// The LXD/Incus virtual-machine image: metadata + the UEFI qcow2.
    pub lxd_vm: bool,
    pub rootfs: bool,
}

impl Targets {
    pub fn any(&self) -> bool {
        self.count() > 0
    }

    /// The single-file tar targets asked for: (flag, the file endings it accepts).
    fn tar_targets(&self) -> Vec<(&'static str, &'static [&'static str])> {
        let mut v: Vec<(&'static str, &'static [&'static str])> = Vec::new();
        if self.wsl {
            v.push(("--wsl", &[".tar.gz", ".tgz"]));
        }
        if self.wsl_package {
            v.push(("--wsl-package", &[".wsl"]));
        }
        if self.lxd {
            v.push(("--lxd", &[".tar.gz", ".tgz"]));
        }
        if self.rootfs {
            v.push(("--rootfs", &[".tar"]));
        }
        v
    }

    fn count(&self) -> usize {
        [
            self.wsl,
            self.wsl_package,
            self.lxd,
            self.lxd_split,
            self.lxd_vm,
            self.rootfs,
        ]
        .iter()
        .filter(|t| **t)
        .count()
    }
}

/// Names that end like a file abox writes: `-o` with one of these names a file, not a folder.
const FILE_ENDINGS: &[&str] = &[
    ".tar",
    ".tar.gz",
    ".tgz",
    ".gz",
    ".wsl",
    ".squashfs",
    ".qcow2",
    ".xz",
    ".zst",
];

/// Where `-o` sends an export: a folder (None: the default one), and for a single tar
/// artifact, a file or standard output.
///
/// - `-o -`: the one tar target asked for (`--wsl`, `--wsl-package`, `--lxd` or `--rootfs`)
///   streams to standard output (refused on a terminal);
/// - `-o FILE` ending like an artifact (`.tar.gz`, `.tar`, `.wsl`…): with one tar target, the
///   file's name (its ending must be the target's); with several targets, an error;
/// - anything else: a folder (created when missing).
pub fn resolve_output(
    o: Option<&Path>,
    targets: &Targets,
) -> Result<(Option<PathBuf>, Option<target::TarDest>)> {
    let Some(o) = o else {
        return Ok((None, None));
    };
    let tars = targets.tar_targets();
    let single = || -> Result<(&'static str, &'static [&'static str])> {
        let n = targets.count();
        if let (1, Some(t)) = (n, tars.first()) {
            return Ok(*t);
        }
        let stdout = o == Path::new("-");
        let why = if n == 1 {
            let flag = if targets.lxd_vm {
                "--lxd-vm"
            } else {
                "--lxd-split"
            };
            let to = if stdout {
                "cannot go to standard output"
            } else {
                "cannot go to one file"
            };
            format!("{flag} writes two files and {to}: use -o FOLDER, or one of --wsl, --wsl-package, --lxd, --rootfs for a single file")
        } else {
            format!("names one file, but {n} artifacts were asked for (no target flag means --wsl and --lxd): give one of --wsl, --wsl-package, --lxd, --rootfs, or a folder")
        };
        let sep = if n == 1 { ":" } else { "" };
        bail!("-o {}{sep} {why}", o.display())
    };
    if o == Path::new("-") {
        single()?;
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            bail!(
                "-o - writes a tar to standard output, which is a terminal: pipe it (to \
                 `wsl --import NAME DIR -`, tar, ssh…) or redirect it to a file"
            );
        }
        return Ok((None, Some(target::TarDest::Stdout)));
    }
    if o.is_dir() {
        return Ok((Some(o.to_path_buf()), None));
    }
    let name = o
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if !FILE_ENDINGS.iter().any(|e| name.ends_with(e)) {
        return Ok((Some(o.to_path_buf()), None));
    }
    let (flag, endings) = single()?;
    if !endings.iter().any(|e| name.ends_with(e)) {
        bail!(
            "-o {}: {flag} writes a {} file: name it {}",
            o.display(),
            endings[0].trim_start_matches('.'),
            endings.join(" or ")
        );
    }
    let dir = match o.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((Some(dir), Some(target::TarDest::File(o.to_path_buf()))))
}

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    pub source: String,
    pub out_dir: Option<PathBuf>,
    /// The one tar artifact's file or standard output ([`resolve_output`]); None: named in
    /// `out_dir`.
    pub single: Option<target::TarDest>,
    pub name: Option<String>,
    pub targets: Targets,
    pub wsl_user: Option<String>,
    pub icon: Option<PathBuf>,
    pub select: SelectOptions,
    /// Where the first-boot identity comes from (config file, answer file, flags).
    pub identity: crate::identity::Sources,
}

/// The identity each kind of artifact gets, resolved before any output exists (None: none given).
#[derive(Clone, Default)]
pub struct Identities {
    pub disk: Option<Arc<Identity>>,
    pub wsl: Option<Arc<Identity>>,
    pub lxd: Option<Arc<Identity>>,
}

impl Identities {
    /// Resolve `src` for image `name`'s artifacts of the given flavors (reading key and
    /// password files once); a note names each setting a flavor leaves out.
    pub fn resolve(
        src: &crate::identity::Sources,
        name: &str,
        flavors: &[Flavor],
        progress: &Progress,
    ) -> Result<Self> {
        let mut ids = Identities::default();
        let mut said = std::collections::HashSet::new();
        for f in flavors {
            let id = src.resolve(name, f.kind())?;
            if id.is_empty() {
                continue;
            }
            for what in f.unused(&id) {
                let note = format!("{name}: {}: {what}: left out", f.label());
                if said.insert(note.clone()) {
                    progress.note(&note);
                }
            }
            let slot = match f.kind() {
                "disk" => &mut ids.disk,
                "wsl" => &mut ids.wsl,
                _ => &mut ids.lxd,
            };
            *slot = Some(Arc::new(id));
        }
        Ok(ids)
    }
}

#[derive(Debug)]
pub struct ExportReport {
    pub name: String,
    pub out_dir: PathBuf,
    pub files: Vec<PathBuf>,
}

/// The default output folder: `out/<name>`.
pub fn default_out_dir(name: &str) -> PathBuf {
    Path::new("out").join(name)
}

/// The targets `opts` asks for, created in `out_dir` (an unwritable folder fails here, before
/// any work), named `name`.
pub fn create_targets(
    opts: &ExportOptions,
    image: &Image,
    name: &str,
    out_dir: &Path,
    ids: &Identities,
) -> Result<Vec<Box<dyn Target>>> {
    let config = image.config.config().as_ref();
    let created = target::build_time(image.config.created().as_deref());
    let wsl_opts = wsl::WslOptions {
        name: name.to_string(),
        user: opts.wsl_user.clone(),
        icon: opts.icon.clone(),
        config_user: config.and_then(|c| c.user().clone()),
        mtime: created,
        identity: ids.wsl.clone(),
    };
    let lxd_opts = lxd_options(image, name, ids.lxd.clone());
    let t = &opts.targets;
    let dest = |default: String| match &opts.single {
        Some(d) => d.clone(),
        None => target::TarDest::in_dir(out_dir, &default),
    };
    let mut targets: Vec<Box<dyn Target>> = Vec::new();
    if t.wsl {
        targets.push(wsl::create_tarball(
            &dest(format!("{name}.rootfs.tar.gz")),
            &wsl_opts,
        )?);
    }
    if t.wsl_package {
        targets.push(wsl::create_package(
            &dest(format!("{name}.wsl")),
            &wsl_opts,
        )?);
    }
    if t.lxd {
        targets.push(lxd::create_unified(
            &dest(format!("{name}.lxd.tar.gz")),
            &lxd_opts,
        )?);
    }
    if t.lxd_split {
        targets.push(lxd::create_split(out_dir, &lxd_opts)?);
    }
    if t.rootfs {
        targets.push(target::rootfs::create(&dest(format!("{name}.rootfs.tar")))?);
    }
    Ok(targets)
}

fn lxd_options(image: &Image, name: &str, identity: Option<Arc<Identity>>) -> lxd::LxdOptions {
    lxd::LxdOptions {
        name: name.to_string(),
        architecture: image.architecture(),
        created: target::build_time(image.config.created().as_deref()),
        vm: false,
        identity,
    }
}

/// The disks of one image and what goes with them: made from the image when it carries a
/// kernel, else from its `-vm` image ([`crate::disk::vmlayer::resolve`]).
pub struct DiskSet {
    pub opts: DiskOptions,
    /// The disk targets and their companions (the LXD VM image's metadata).
    pub targets: Vec<Box<dyn Target>>,
    /// A disk of the set sets up tiny-cloud (`--cloud-init`): the VM layer adds it if missing.
    pub cloud: bool,
}

impl DiskSet {
    /// `disk`: the bootable disk `<name>.qcow2`; `lxd_vm`: the LXD/Incus VM image
    /// `<name>.lxd-vm-meta.tar.gz` + `<name>.lxd-vm.qcow2` (UEFI, with the VM agent). Both are
    /// listed in `SHA256SUMS`. Errors as [`DiskTarget::create`].
    pub fn create(
        source: &str,
        image: &Image,
        name: &str,
        out_dir: &Path,
        (disk, lxd_vm): (bool, bool),
        ids: &Identities,
        progress: &Progress,
    ) -> Result<Self> {
        let opts = DiskOptions {
            source: source.to_string(),
            identity: ids.disk.clone(),
            ..Default::default()
        };
        let mtime = target::build_time(image.config.created().as_deref());
        let arch = image.architecture();
        let mut targets: Vec<Box<dyn Target>> = Vec::new();
        if disk {
            let path = out_dir.join(format!("{name}.{}", Format::Qcow2.ext()));
            let d = DiskTarget::create(&opts, &path, Format::Qcow2, &arch, mtime, progress)?;
            targets.push(Box::new(d.listed()));
        }
        if lxd_vm {
            let vm_opts = DiskOptions {
                firmware: Firmware::Uefi,
                vm_agent: true,
                // LXD/Incus sizes the instance's root disk itself (the pool's size).
                sized: true,
                identity: ids.lxd.clone(),
                ..opts.clone()
            };
            let path = out_dir.join(format!("{name}.lxd-vm.qcow2"));
            let d = DiskTarget::create(&vm_opts, &path, Format::Qcow2, &arch, mtime, progress)?;
            targets.push(Box::new(d.listed().kind("lxd-vm")));
            targets.push(lxd::create_vm_meta(
                out_dir,
                &lxd_options(image, name, ids.lxd.clone()),
            )?);
        }
        let cloud_of = |i: &Option<Arc<Identity>>| i.as_ref().is_some_and(|i| i.cloud_init);
        let cloud = (disk && cloud_of(&ids.disk)) || (lxd_vm && cloud_of(&ids.lxd));
        Ok(DiskSet {
            opts,
            targets,
            cloud,
        })
    }
}

/// Write the artifacts of `image` (indexed as `plan`): `targets` and the disks. The disks join
/// the same flattening when the image carries a kernel; when the VM layer gives it one they
/// are made from the `-vm` image in a second flattening, and their manifest entries name that
/// image. With `skip_no_kernel`, an image that can have no kernel gets no disk (a note says
/// why) instead of an error.
pub fn run_with_disks(
    image: &Image,
    plan: &Plan,
    mut targets: Vec<Box<dyn Target>>,
    disks: Option<DiskSet>,
    engine: Option<&std::sync::Arc<crate::engine::Engine>>,
    skip_no_kernel: bool,
    progress: &Progress,
) -> Result<Vec<Artifact>> {
    let mut vm = None;
    if let Some(set) = disks {
        match vmlayer::resolve(&set.opts, image, plan, set.cloud, engine, progress) {
            Ok(None) => targets.extend(set.targets),
            Ok(Some((vm_image, vm_plan))) => vm = Some((vm_image, vm_plan, set.targets)),
            Err(e) if skip_no_kernel && e.downcast_ref::<NoKernel>().is_some() => {
                progress.note(&format!("{}: no disk written: {e}", image.name));
            }
            Err(e) => return Err(e),
        }
    }
    let mut artifacts = run_targets(image, plan, targets, progress)?;
    if let Some((vm_image, vm_plan, disk_targets)) = vm {
        let mut summary = vm_image.summary();
        summary.name = vm_image.reference.trim_start_matches("docker:").to_string();
        for mut a in run_targets(&vm_image, &vm_plan, disk_targets, progress)? {
            a.image = Some(summary.clone());
            artifacts.push(a);
        }
    }
    Ok(artifacts)
}

/// One flattening of `image` (indexed as `plan`) fed to every target: each starts with the
/// plan, receives every entry, and finishes into its artifacts (under temporary names; the
/// caller commits them).
pub fn run_targets(
    image: &Image,
    plan: &Plan,
    mut targets: Vec<Box<dyn Target>>,
    progress: &Progress,
) -> Result<Vec<Artifact>> {
    for t in targets.iter_mut() {
        t.start(plan)?;
    }
    let mut fan = Fanout(targets);
    flatten::emit(image, plan, &mut fan, progress)?;
    let mut artifacts = Vec::new();
    for t in fan.0 {
        artifacts.extend(t.finish()?);
    }
    crate::signals::check()?;
    Ok(artifacts)
}

/// Create `dir` (and its parents), or say which folder could not be made.
pub fn create_out_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the output folder {} (choose another with -o)",
            dir.display()
        )
    })
}

/// `abox export`: the chosen artifacts of one image, with `SHA256SUMS` and `manifest.json`.
pub fn export(opts: &ExportOptions, progress: &Progress) -> Result<ExportReport> {
    if !opts.targets.any() {
        bail!("nothing to write: choose at least one of --wsl, --wsl-package, --lxd, --lxd-split, --lxd-vm, --rootfs");
    }
    let image = source::open(&opts.source, &opts.select)?;
    let name = opts.name.clone().unwrap_or_else(|| image.name.clone());
    let t = &opts.targets;
    let mut flavors = Vec::new();
    if t.wsl {
        flavors.push(Flavor::Wsl);
    }
    if t.wsl_package {
        flavors.push(Flavor::WslPackage);
    }
    if t.lxd || t.lxd_split || t.lxd_vm {
        flavors.push(Flavor::Lxd);
    }
    let ids = Identities::resolve(&opts.identity, &name, &flavors, progress)?;
    if t.rootfs && !opts.identity.settings(&name, "disk").is_empty() {
        progress.note(&format!(
            "{name}: the plain rootfs tar (--rootfs) is the image as it is: no identity in it"
        ));
    }
    // The default folder: the name given, else the image's name and tag.
    let out_dir = opts.out_dir.clone().unwrap_or_else(|| {
        default_out_dir(&opts.name.clone().unwrap_or_else(|| image.folder_name()))
    });
    // Lists in the folder: always in a folder of artifacts, for a single named file only in a
    // folder abox keeps lists in already; never for standard output.
    let listed = match &opts.single {
        None => true,
        Some(target::TarDest::File(_)) => matches!(
            crate::output::folder_lists(&out_dir),
            crate::output::Lists::Abox(_)
        ),
        Some(target::TarDest::Stdout) => false,
    };
    if !matches!(opts.single, Some(target::TarDest::Stdout)) {
        create_out_dir(&out_dir)?;
    }
    if listed {
        crate::output::check_lists(&out_dir)?;
    }
    let targets = create_targets(opts, &image, &name, &out_dir, &ids)?;
    let disks = if opts.targets.lxd_vm {
        Some(DiskSet::create(
            &opts.source,
            &image,
            &name,
            &out_dir,
            (false, true),
            &ids,
            progress,
        )?)
    } else {
        None
    };
    let plan = flatten::index(&image, progress)?;
    // The plain rootfs tar holds every byte of content (plus a header block per path); the
    // compressed targets are smaller than that and are not estimated.
    if opts.targets.rootfs && !matches!(opts.single, Some(target::TarDest::Stdout)) {
        let need = plan.facts.content_bytes + plan.facts.paths as u64 * 1024;
        crate::output::check_room(&out_dir, need, "the rootfs tar", crate::output::OUT_FIX)?;
    }
    let artifacts = run_with_disks(&image, &plan, targets, disks, None, false, progress).map_err(
        |e| match opts.single {
            Some(target::TarDest::Stdout) => e,
            _ => crate::output::explain_full(e, &out_dir),
        },
    )?;
    let files = if listed {
        commit(&out_dir, &opts.source, &image, artifacts, progress)?
    } else {
        let mut files = Vec::new();
        for a in artifacts {
            files.push(a.file.dest().to_path_buf());
            a.file.commit()?;
        }
        files
    };
    Ok(ExportReport {
        name,
        out_dir,
        files,
    })
}

/// The fingerprint LXD and Incus give a split image: the sha256 of the metadata tarball's
/// bytes followed by the root image's.
pub fn split_fingerprint(meta: &Path, rootfs: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in [meta, rootfs] {
        let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", p.display()))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Rename the artifacts of one image into place with its `SHA256SUMS` and `manifest.json`.
pub fn commit(
    out_dir: &Path,
    source: &str,
    image: &Image,
    artifacts: Vec<Artifact>,
    progress: &Progress,
) -> Result<Vec<PathBuf>> {
    let mut task = progress.task("finishing", 0);
    let dest_of = |kind: &str| {
        artifacts
            .iter()
            .find(|a| a.kind == kind)
            .map(|a| a.file.dest().to_path_buf())
    };
    let vm_pair = dest_of("lxd-vm-meta").zip(dest_of("lxd-vm"));
    let (files, notes) = commit_all(out_dir, source, &image.summary(), artifacts)?;
    for n in notes {
        progress.note(&n);
    }
    if let Some((meta, disk)) = vm_pair {
        progress.note(&format!(
            "LXD/Incus VM image {} + {} written (fingerprint {})",
            meta.display(),
            disk.display(),
            split_fingerprint(&meta, &disk)?
        ));
    }
    task.set(0);
    task.finish(&format!(
        "{} artifact{} in {}",
        files.len(),
        if files.len() == 1 { "" } else { "s" },
        out_dir.display()
    ));
    Ok(files)
}
