//! The pipeline: one image → its artifacts, in one flattening shared by all targets
//! ([`run_targets`]); `abox export`, `abox disk` and `abox all` are made of its steps.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::flatten::{self, Plan};
use crate::output::{commit_all, Artifact};
use crate::progress::Progress;
use crate::source::{self, Image, SelectOptions};
use crate::target::{self, lxd, wsl, Fanout, Target};

/// Which artifacts to write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub wsl: bool,
    pub wsl_package: bool,
    pub lxd: bool,
    pub lxd_split: bool,
    pub rootfs: bool,
}

impl Targets {
    pub fn any(&self) -> bool {
        self.wsl || self.wsl_package || self.lxd || self.lxd_split || self.rootfs
    }
}

#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    pub source: String,
    pub out_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub targets: Targets,
    pub wsl_user: Option<String>,
    pub icon: Option<PathBuf>,
    pub select: SelectOptions,
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
) -> Result<Vec<Box<dyn Target>>> {
    let config = image.config.config().as_ref();
    let created = target::build_time(image.config.created().as_deref());
    let wsl_opts = wsl::WslOptions {
        name: name.to_string(),
        user: opts.wsl_user.clone(),
        icon: opts.icon.clone(),
        config_user: config.and_then(|c| c.user().clone()),
        mtime: created,
    };
    let lxd_opts = lxd::LxdOptions {
        name: name.to_string(),
        architecture: image.architecture(),
        created,
    };
    let mut targets: Vec<Box<dyn Target>> = Vec::new();
    let t = &opts.targets;
    if t.wsl {
        targets.push(wsl::create_tarball(out_dir, &wsl_opts)?);
    }
    if t.wsl_package {
        targets.push(wsl::create_package(out_dir, &wsl_opts)?);
    }
    if t.lxd {
        targets.push(lxd::create_unified(out_dir, &lxd_opts)?);
    }
    if t.lxd_split {
        targets.push(lxd::create_split(out_dir, &lxd_opts)?);
    }
    if t.rootfs {
        targets.push(target::rootfs::create(out_dir, name)?);
    }
    Ok(targets)
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
        bail!("nothing to write: choose at least one of --wsl, --wsl-package, --lxd, --lxd-split, --rootfs");
    }
    let image = source::open(&opts.source, &opts.select)?;
    let name = opts.name.clone().unwrap_or_else(|| image.name.clone());
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| default_out_dir(&name));
    create_out_dir(&out_dir)?;
    let targets = create_targets(opts, &image, &name, &out_dir)?;
    let plan = flatten::index(&image, progress)?;
    // The plain rootfs tar holds every byte of content (plus a header block per path); the
    // compressed targets are smaller than that and are not estimated.
    if opts.targets.rootfs {
        let need = plan.facts.content_bytes + plan.facts.paths as u64 * 1024;
        crate::output::check_room(&out_dir, need, "the rootfs tar")?;
    }
    let artifacts = run_targets(&image, &plan, targets, progress)?;
    let files = commit(&out_dir, &opts.source, &image, artifacts, progress)?;
    Ok(ExportReport {
        name,
        out_dir,
        files,
    })
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
    let files = commit_all(out_dir, source, &image.summary(), artifacts)?;
    task.set(0);
    task.finish(&format!(
        "{} artifacts in {}",
        files.len(),
        out_dir.display()
    ));
    Ok(files)
}
