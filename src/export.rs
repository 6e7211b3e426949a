//! `abox export`: one image → the chosen artifacts, in one flattening shared by all targets.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::flatten;
use crate::output::{commit_all, Artifact};
use crate::progress::Progress;
use crate::source::{self, SelectOptions};
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

pub fn export(opts: &ExportOptions, progress: &Progress) -> Result<ExportReport> {
    export_with(opts, progress, None, Vec::new())
}

/// [`export`], reusing a connection to the engine for `docker:` sources; `extra` artifacts
/// (already written, like a disk) are committed and listed with the export's own.
pub fn export_with(
    opts: &ExportOptions,
    progress: &Progress,
    engine: Option<&std::sync::Arc<crate::engine::Engine>>,
    extra: Vec<Artifact>,
) -> Result<ExportReport> {
    if !opts.targets.any() {
        bail!("nothing to write: choose at least one of --wsl, --wsl-package, --lxd, --lxd-split, --rootfs");
    }
    let image = source::open_with(&opts.source, &opts.select, engine)?;
    let name = opts.name.clone().unwrap_or_else(|| image.name.clone());
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| default_out_dir(&name));
    std::fs::create_dir_all(&out_dir).with_context(|| {
        format!(
            "cannot create the output folder {} (choose another with -o)",
            out_dir.display()
        )
    })?;

    let config = image.config.config().as_ref();
    let created = target::build_time(image.config.created().as_deref());
    let wsl_opts = wsl::WslOptions {
        name: name.clone(),
        user: opts.wsl_user.clone(),
        icon: opts.icon.clone(),
        config_user: config.and_then(|c| c.user().clone()),
        mtime: created,
    };
    let lxd_opts = lxd::LxdOptions {
        name: name.clone(),
        architecture: image.architecture(),
        created,
    };

    // Create every output first: an unwritable folder fails before any work.
    let mut targets: Vec<Box<dyn Target>> = Vec::new();
    let t = &opts.targets;
    if t.wsl {
        targets.push(wsl::create_tarball(&out_dir, &wsl_opts)?);
    }
    if t.wsl_package {
        targets.push(wsl::create_package(&out_dir, &wsl_opts)?);
    }
    if t.lxd {
        targets.push(lxd::create_unified(&out_dir, &lxd_opts)?);
    }
    if t.lxd_split {
        targets.push(lxd::create_split(&out_dir, &lxd_opts)?);
    }
    if t.rootfs {
        targets.push(target::rootfs::create(&out_dir, &name)?);
    }

    let plan = flatten::index(&image, progress)?;
    // The plain rootfs tar holds every byte of content (plus a header block per path); the
    // compressed targets are smaller than that and are not estimated.
    if t.rootfs {
        let need = plan.facts.content_bytes + plan.facts.paths as u64 * 1024;
        crate::output::check_room(&out_dir, need, "the rootfs tar")?;
    }
    for t in targets.iter_mut() {
        t.start(&plan.facts)?;
    }
    let mut fan = Fanout(targets);
    flatten::emit(&image, &plan, &mut fan, progress)?;
    let mut task = progress.task("finishing", 0);
    let mut artifacts: Vec<Artifact> = Vec::new();
    for t in fan.0 {
        artifacts.extend(t.finish()?);
    }
    artifacts.extend(extra);
    crate::signals::check()?;
    let files = commit_all(&out_dir, &opts.source, &image.summary(), artifacts)?;
    task.set(0);
    task.finish(&format!(
        "{} artifacts in {}",
        files.len(),
        out_dir.display()
    ));
    Ok(ExportReport {
        name,
        out_dir,
        files,
    })
}
