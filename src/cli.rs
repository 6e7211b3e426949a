//! The command line (clap derive). `main.rs` parses it and calls [`run`].

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::export::{self, ExportOptions, Targets};
use crate::progress::{Mode, Progress};
use crate::source::SelectOptions;

/// alpine-boxes: build layered Alpine images and turn each into every artifact a homelab boots
/// or imports — WSL distributions, LXD/Incus images and (soon) bootable VM disks.
///
/// Images are named as skopeo and podman name them:
///   docker-archive:PATH[:TAG]  what `docker save` writes (Docker 20.10 and 25+ layouts)
///   oci:DIR[:REF]              an OCI image layout folder (skopeo, umoci, buildah, buildx)
///   oci-archive:PATH[:REF]     a tar of an OCI image layout
#[derive(Parser, Debug)]
#[command(name = "abox", version, verbatim_doc_comment)]
pub struct Cli {
    /// More logging (-v: debug, shows every external command; -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// How to show progress.
    #[arg(long, value_enum, default_value_t = Mode::Auto, global = true)]
    pub progress: Mode,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write WSL and LXD/Incus artifacts (and a plain rootfs tar) from an image.
    ///
    /// The image is read once, whatever the number of targets. With no target flag, --wsl and
    /// --lxd are written. Every run also writes SHA256SUMS and manifest.json in the output
    /// folder; artifacts appear only when complete.
    ///
    /// Example:
    ///   abox export docker-archive:base.tar --wsl --lxd
    ///   → out/base/base.rootfs.tar.gz, out/base/base.lxd.tar.gz
    #[command(verbatim_doc_comment)]
    Export(ExportArgs),
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The image: docker-archive:PATH[:TAG], oci:DIR[:REF] or oci-archive:PATH[:REF] (a bare path is
    /// recognised too).
    pub source: String,

    /// `<name>.rootfs.tar.gz` for `wsl --import` (gzip, archive root = filesystem root, with an
    /// /etc/wsl.conf that logs in as the image's user).
    #[arg(long)]
    pub wsl: bool,

    /// `<name>.wsl` package for WSL ≥ 2.4.4 (double-click install), with
    /// /etc/wsl-distribution.conf.
    #[arg(long)]
    pub wsl_package: bool,

    /// `<name>.lxd.tar.gz`: unified LXD/Incus image for `lxc image import`.
    #[arg(long)]
    pub lxd: bool,

    /// `<name>.lxd-meta.tar.gz` + `<name>.lxd-rootfs.squashfs`: split LXD/Incus image
    /// (needs tar2sqfs from squashfs-tools-ng).
    #[arg(long)]
    pub lxd_split: bool,

    /// `<name>.rootfs.tar`: the flattened rootfs, uncompressed.
    #[arg(long)]
    pub rootfs: bool,

    /// Output folder [default: out/<name>].
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Name used for the files [default: from the image's tag, else the file name].
    #[arg(long)]
    pub name: Option<String>,

    /// User WSL logs in as [default: the image's USER if not root, else its lowest ordinary
    /// account (uid 1000–59999); none: root, and the .wsl package asks for one on first start].
    #[arg(long, value_name = "NAME")]
    pub wsl_user: Option<String>,

    /// Icon for the .wsl package's Start-menu shortcut (.ico, at most 1 MiB).
    #[arg(long, value_name = "FILE.ico")]
    pub icon: Option<PathBuf>,

    /// Platform to pick from a multi-platform image.
    #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
    pub platform: String,
}

pub fn run(cli: Cli) -> Result<()> {
    let progress = Progress::new(cli.progress);
    match cli.command {
        Command::Export(a) => {
            let mut targets = Targets {
                wsl: a.wsl,
                wsl_package: a.wsl_package,
                lxd: a.lxd,
                lxd_split: a.lxd_split,
                rootfs: a.rootfs,
            };
            if !targets.any() {
                targets.wsl = true;
                targets.lxd = true;
            }
            let opts = ExportOptions {
                source: a.source,
                out_dir: a.output,
                name: a.name,
                targets,
                wsl_user: a.wsl_user,
                icon: a.icon,
                select: SelectOptions {
                    platform: a.platform,
                },
            };
            let report = export::export(&opts, &progress)?;
            for f in &report.files {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}
