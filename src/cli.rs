//! The command line (clap derive). `main.rs` parses it and calls [`run`].

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::export::{self, ExportOptions, Targets};

/// The help heading of the options every command takes.
const GLOBAL: &str = "Global options";

/// `abox --version`: the package version and the commit it was built from (build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ABOX_COMMIT"), ")");
use crate::progress::{Mode, Progress};
use crate::source::SelectOptions;

/// alpine-boxes: build layered Alpine images and turn each into every artifact a homelab boots
/// or imports — WSL distributions, LXD/Incus images and bootable VM disks.
///
/// Images are named as skopeo and podman name them:
///   docker-archive:PATH[:TAG]  what `docker save` writes (Docker 20.10 and 25+ layouts)
///   oci:DIR[:REF]              an OCI image layout folder (skopeo, umoci, buildah, buildx)
///   oci-archive:PATH[:REF]     a tar of an OCI image layout
///   docker:NAME[:TAG]          an image in the Docker engine, streamed out
///   NAME[:TAG]                 the same, when no file or folder has that name (never pulled)
///   PATH                       a docker save file or OCI layout, recognised from its content
///
/// The Docker engine is the one the docker CLI would use: --host, --context, DOCKER_HOST,
/// DOCKER_CONTEXT, the currentContext of ~/.docker/config.json, else the local socket;
/// unix://, tcp:// (TLS with DOCKER_TLS_VERIFY or the context's certificates) and ssh://.
#[derive(Parser, Debug)]
#[command(name = "abox", version = VERSION, verbatim_doc_comment)]
pub struct Cli {
    /// More logging (-v: debug, shows every external command; -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = GLOBAL)]
    pub verbose: u8,

    /// How to show progress.
    #[arg(long, value_enum, default_value_t = Mode::Auto, global = true, help_heading = GLOBAL)]
    pub progress: Mode,

    /// Log level (error, warn, info, debug, trace); overrides -v. debug shows which engine
    /// was chosen and why, and every external command.
    #[arg(long, value_name = "LEVEL", global = true, help_heading = GLOBAL)]
    pub log_level: Option<log::LevelFilter>,

    /// Docker engine to use (unix:///PATH, tcp://HOST:PORT, ssh://[USER@]HOST[:PORT]),
    /// as the docker CLI's --host [default: DOCKER_HOST, else the docker context].
    #[arg(short = 'H', long, value_name = "URL", global = true, help_heading = GLOBAL)]
    pub host: Option<String>,

    /// Docker context to use, as the docker CLI's --context [default: DOCKER_CONTEXT, else
    /// the currentContext of $DOCKER_CONFIG/config.json].
    #[arg(short = 'c', long, value_name = "NAME", global = true, help_heading = GLOBAL)]
    pub context: Option<String>,

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

    /// Build the recipes under Dockerfiles/ with BuildKit, parents first.
    ///
    /// The order comes from the Dockerfiles: a recipe whose FROM uses a build argument that
    /// defaults to another recipe's image (ARG BASE_IMAGE=alpine-boxes/base:latest) is built
    /// after it, with the argument set to the parent's tag. Naming a recipe builds its missing
    /// parents too. Each image is tagged PREFIX/NAME:ALPINE_VERSION and PREFIX/NAME:latest;
    /// one line "TAG IMAGE_ID" per tag goes to stdout.
    ///
    /// Examples:
    ///   abox build                                  all recipes
    ///   abox build docker-host --no-cache
    ///   abox build --registry 192.168.1.10:5000/boxes --push
    ///   abox build --registry reg:5000/boxes --cache-from 'reg:5000/boxes/{name}:latest'
    #[command(verbatim_doc_comment)]
    Build(BuildArgs),

    /// Push the recipes' images (built with the same --registry) to the registry.
    ///
    /// Credentials are read like the docker CLI reads them: $DOCKER_CONFIG/config.json (or
    /// ~/.docker/config.json): auths, credHelpers, credsStore. One line "TAG@DIGEST" per tag.
    ///
    /// Example:
    ///   docker login 192.168.1.10:5000
    ///   abox push --registry 192.168.1.10:5000/boxes
    #[command(verbatim_doc_comment)]
    Push(PushArgs),

    /// Write a VM disk that boots on BIOS and UEFI: GPT (or MBR), an EFI System Partition
    /// (FAT32: kernel, initramfs, SYSLINUX for BIOS, systemd-boot for UEFI) and the ext4 root.
    ///
    /// The image must carry a kernel in /boot (Alpine: linux-virt; Debian:
    /// linux-image-cloud-amd64; an Alpine docker: image without one gets the VM layer). One
    /// boot entry for both loaders: the root by UUID when there is an initramfs, by PARTUUID
    /// otherwise, the console on the screen and on ttyS0 (115200 baud). No root, loop device
    /// or mount needed: mke2fs (e2fsprogs >= 1.47.1) makes the root from a tar stream. Needs
    /// syslinux + mtools (BIOS), systemd-boot-efi (UEFI; Secure Boot off), and qemu-utils for
    /// formats other than raw. The format follows the file name's extension unless --format
    /// is given.
    ///
    /// Examples:
    ///   abox disk docker:alpine-boxes/base                      → out/base/base.qcow2
    ///   abox disk docker:alpine-boxes/base -o vm.vdi            VirtualBox (BIOS or EFI)
    ///   abox disk oci:build/base -o base.vhdx --size 8G         Hyper-V (generation 1 or 2)
    ///   qemu-system-x86_64 -m 1G -drive file=out/base/base.qcow2 -nographic
    #[command(verbatim_doc_comment)]
    Disk(DiskArgs),

    /// Write a NoCloud seed: an ISO labelled cidata with user-data, meta-data and
    /// network-config, which cloud-init and Alpine's tiny-cloud read at first boot.
    ///
    /// For QEMU, Proxmox and VirtualBox: attach it as a CD-ROM to a VM whose image runs
    /// cloud-init or tiny-cloud. Without --meta-data, one is made with an instance-id from the
    /// content. The ISO is 0600 (user-data often holds password hashes and keys).
    ///
    /// Example:
    ///   abox seed --user-data user-data.yaml -o seed.iso
    ///   qemu-system-x86_64 ... -drive file=seed.iso,media=cdrom
    #[command(verbatim_doc_comment)]
    Seed(SeedArgs),

    /// Is the pinned Alpine version behind? Compares the recipes' ARG ALPINE_VERSION with
    /// Alpine's latest-releases.yaml of its branch and of latest-stable.
    ///
    /// Prints a warning and exits 0 when behind; with --strict (for CI) exits 3.
    ///
    /// Example:
    ///   abox check --strict
    #[command(verbatim_doc_comment)]
    Check(CheckArgs),

    /// Check what abox needs: the engine (which one and why), BuildKit, external tools and
    /// their versions, the syslinux, systemd-boot and OVMF files, registry credentials.
    ///
    /// Prints a table (or JSON with --json); each missing part names the package to install.
    /// Exits 1 when a part `abox all` needs is missing.
    ///
    /// Example:
    ///   abox doctor
    ///   abox --context buildbox doctor --json
    #[command(verbatim_doc_comment)]
    Doctor(DoctorArgs),

    /// Build every recipe, then write every artifact of each into out/<name>/.
    ///
    /// Artifacts: <name>.rootfs.tar.gz and <name>.wsl (WSL), <name>.lxd.tar.gz and the split
    /// <name>.lxd-meta.tar.gz + <name>.lxd-rootfs.squashfs (LXD/Incus), SHA256SUMS,
    /// manifest.json, the BIOS+UEFI disk <name>.qcow2 and the LXD/Incus VM image
    /// <name>.lxd-vm-meta.tar.gz + <name>.lxd-vm.qcow2 (for images that carry a kernel, or
    /// Alpine images given one by the VM layer).
    #[command(verbatim_doc_comment)]
    All(AllArgs),

    /// Print a shell completion script.
    ///
    /// Examples:
    ///   abox completions bash > ~/.local/share/bash-completion/completions/abox
    ///   abox completions zsh > ~/.zfunc/_abox      (with fpath+=~/.zfunc in ~/.zshrc)
    ///   abox completions fish > ~/.config/fish/completions/abox.fish
    #[command(verbatim_doc_comment)]
    Completions { shell: clap_complete::Shell },

    /// Write the manual pages: abox.1 and one per command (abox-export.1, …).
    ///
    /// Example:
    ///   abox man -o ~/.local/share/man/man1 && man abox-disk
    #[command(verbatim_doc_comment)]
    Man {
        /// Folder to write the pages in (created when missing).
        #[arg(short, long, value_name = "DIR")]
        output: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ProjectArgs {
    /// Folder holding one <name>/Dockerfile per recipe [default: the Dockerfiles/ folder of
    /// the current folder or the nearest one above it that has one].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Tag prefix, HOST[:PORT]/NAMESPACE for a registry.
    #[arg(long, default_value = crate::factory::DEFAULT_PREFIX, value_name = "HOST[:PORT]/NAMESPACE")]
    pub registry: String,

    /// Alpine version passed to the recipes as ALPINE_VERSION and used as the tag
    /// [default: the recipes' pinned ARG ALPINE_VERSION].
    #[arg(long, value_name = "X.Y.Z")]
    pub alpine_version: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct BuildOpts {
    /// Base image of the root recipe (replaces its FROM argument, e.g. alpine:X.Y.Z).
    #[arg(long, value_name = "REF")]
    pub base_image: Option<String>,

    /// Extra build argument (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,

    /// Build every step again.
    #[arg(long)]
    pub no_cache: bool,

    /// Image to use as BuildKit cache (repeatable); {name} and {version} are replaced per
    /// recipe. Images abox builds carry inline cache metadata, so pushed ones qualify.
    #[arg(long, value_name = "REF")]
    pub cache_from: Vec<String>,

    /// Push each image after building it (needs --registry).
    #[arg(long)]
    pub push: bool,

    /// Secret for RUN --mount=type=secret,id=NAME (repeatable), as buildx spells it:
    /// id=NAME,src=FILE or id=NAME,env=VAR. Served through the BuildKit session when the step
    /// runs; never a build argument, never in the image or its history.
    #[arg(long, value_name = "id=NAME,src=FILE|env=VAR")]
    pub secret: Vec<String>,

    /// SSH agent for RUN --mount=type=ssh (repeatable): default (the agent at $SSH_AUTH_SOCK)
    /// or ID=SOCKET.
    #[arg(long, value_name = "default|ID[=SOCKET]")]
    pub ssh: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Recipes to build [default: all].
    pub names: Vec<String>,
    #[command(flatten)]
    pub project: ProjectArgs,
    #[command(flatten)]
    pub build: BuildOpts,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Recipes to push [default: all].
    pub names: Vec<String>,
    #[command(flatten)]
    pub project: ProjectArgs,
}

#[derive(Args, Debug)]
pub struct AllArgs {
    #[command(flatten)]
    pub project: ProjectArgs,
    #[command(flatten)]
    pub build: BuildOpts,
    /// Output folder; each image's artifacts go to <DIR>/<name>/ [default: out/ beside the
    /// recipes' Dockerfiles/ folder].
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

fn factory_options(
    names: Vec<String>,
    p: ProjectArgs,
    b: Option<BuildOpts>,
) -> Result<crate::factory::Options> {
    let mut o = crate::factory::Options {
        dir: crate::project::recipes_dir(p.dir)?,
        names,
        prefix: crate::factory::check_prefix(&p.registry)?,
        alpine_version: p.alpine_version,
        ..Default::default()
    };
    if let Some(b) = b {
        o.base_image = b.base_image;
        o.no_cache = b.no_cache;
        o.cache_from = b.cache_from;
        o.push = b.push;
        let mut session = crate::engine::session::SessionConfig::default();
        for spec in &b.secret {
            let (id, source) = crate::engine::session::parse_secret(spec)?;
            if session.secrets.insert(id.clone(), source).is_some() {
                anyhow::bail!("--secret id={id} is given twice");
            }
        }
        for spec in &b.ssh {
            let (id, sock) = crate::engine::session::parse_ssh(spec)?;
            if session.ssh.insert(id.clone(), sock).is_some() {
                anyhow::bail!("--ssh {id} is given twice");
            }
        }
        o.session = std::sync::Arc::new(session);
        for a in b.build_args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--build-arg {a:?}: expected KEY=VALUE"))?;
            o.build_args.push((k.to_string(), v.to_string()));
        }
    }
    Ok(o)
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The image: NAME[:TAG] or docker:NAME[:TAG] (in the Docker engine; never pulled),
    /// docker-archive:PATH[:TAG], oci:DIR[:REF], oci-archive:PATH[:REF], or a bare PATH.
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

    /// `<name>.lxd-vm-meta.tar.gz` + `<name>.lxd-vm.qcow2`: LXD/Incus virtual-machine image
    /// (the UEFI disk, Secure Boot off, with the VM agent service); import both with
    /// `lxc image import META DISK`. An Alpine docker: image without a kernel gets the VM layer.
    #[arg(long)]
    pub lxd_vm: bool,

    /// `<name>.rootfs.tar`: the flattened rootfs, uncompressed.
    #[arg(long)]
    pub rootfs: bool,

    /// Output folder [default: out/<name>-<tag>]; with one of --wsl, --wsl-package, --lxd or
    /// --rootfs, a file name ending like it (.tar.gz, .wsl, .tar) names the file, and - streams
    /// it to standard output (wsl --import NAME DIR -, pipes).
    #[arg(short, long, value_name = "DIR|FILE|-")]
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

    /// Platform to pick from a multi-platform image [default: linux/amd64]; given, an image of
    /// another platform is refused.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    #[command(flatten)]
    pub identity: IdentityArgs,
}

/// First-boot identity flags, shared by `disk`, `export` and `all`; they override abox.toml
/// and --answers.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Identity (first boot; override abox.toml and --answers)")]
pub struct IdentityArgs {
    /// Identity settings file [default: ./abox.toml when present]: top-level keys, [recipe.NAME]
    /// and [target.disk|wsl|lxd] tables, the flags' names as keys.
    #[arg(long, value_name = "FILE", conflicts_with = "no_config")]
    pub config: Option<PathBuf>,

    /// Do not read ./abox.toml.
    #[arg(long)]
    pub no_config: bool,

    /// A setup-alpine answer file (HOSTNAMEOPTS, USEROPTS, USERSSHKEY, ROOTSSHKEY, TIMEZONEOPTS,
    /// DNSOPTS, INTERFACESOPTS, KEYMAPOPTS); options that cannot apply offline are listed.
    #[arg(long, value_name = "FILE")]
    pub answers: Option<PathBuf>,

    /// Host name (/etc/hostname and /etc/hosts; WSL: wsl.conf [network] hostname; LXD: kept
    /// instead of the instance name).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,

    /// User to create if missing (uid 1000 or the next free, own group, in wheel); WSL logs in
    /// as this user.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// authorized_keys lines for --user (a .pub or authorized_keys file; repeatable).
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<PathBuf>,

    /// authorized_keys lines for root (repeatable); sshd then allows root by key only
    /// (PermitRootLogin prohibit-password), else not at all.
    #[arg(long = "root-ssh-key", value_name = "FILE")]
    pub root_ssh_keys: Vec<PathBuf>,

    /// --user's password: the first line of FILE, a password or a crypt(3) hash ($6$...).
    /// Without it the user logs in by key only.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Root's password, the same way. Without it root keeps the image's (usually locked) one.
    #[arg(long, value_name = "FILE")]
    pub root_password_file: Option<PathBuf>,

    /// Time zone, Area/City (/etc/localtime -> the image's tzdata).
    #[arg(long, value_name = "AREA/CITY")]
    pub timezone: Option<String>,

    /// Name servers for /etc/resolv.conf (not WSL); DHCP then leaves them alone.
    #[arg(long, value_name = "IP[,IP]")]
    pub dns: Vec<String>,

    /// DNS search domain.
    #[arg(long, value_name = "DOMAIN")]
    pub search_domain: Option<String>,

    /// NTP server for chrony or busybox ntpd (repeatable).
    #[arg(long, value_name = "SERVER")]
    pub ntp: Vec<String>,

    /// Console keymap, "LAYOUT VARIANT" (disks; needs kbd-bkeymaps in the image).
    #[arg(long, value_name = "LAYOUT VARIANT")]
    pub keymap: Option<String>,

    /// Set up Alpine's tiny-cloud for NoCloud (a seed from `abox seed` applies at first boot);
    /// the VM layer installs it when a docker: Alpine image lacks it. LXD/Incus images also get
    /// the cloud-init templates, so `-c cloud-init.user-data=...` works.
    #[arg(long)]
    pub cloud_init: bool,
}

impl IdentityArgs {
    /// The flags as the top layer of settings.
    pub fn settings(&self) -> crate::identity::Settings {
        use crate::identity::{KeySource, Settings};
        let files = |v: &[PathBuf]| {
            (!v.is_empty()).then(|| v.iter().cloned().map(KeySource::File).collect())
        };
        let list = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
        Settings {
            hostname: self.hostname.clone(),
            user: self.user.clone(),
            ssh_keys: files(&self.ssh_keys),
            root_ssh_keys: files(&self.root_ssh_keys),
            password_file: self.password_file.clone(),
            root_password_file: self.root_password_file.clone(),
            timezone: self.timezone.clone(),
            dns: list(&self.dns),
            search_domain: self.search_domain.clone(),
            ntp: list(&self.ntp),
            keymap: self.keymap.clone(),
            interfaces: None,
            cloud_init: self.cloud_init.then_some(true),
        }
    }

    /// Load the config and answer files under the flags.
    /// Load the config and answer files under the flags and check every value (before the
    /// image is opened).
    pub fn sources(&self) -> Result<crate::identity::Sources> {
        let s = crate::identity::Sources::load(
            self.config.as_deref(),
            self.no_config,
            self.answers.as_deref(),
            self.settings(),
        )?;
        s.check()?;
        Ok(s)
    }
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// One JSON object on stdout ({"ok": bool, "checks": [{name, ok, required, detail,
    /// needed_by, fix}]}) instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SeedArgs {
    /// The user data: a #cloud-config file, a #! script, or MIME multipart.
    #[arg(long, value_name = "FILE")]
    pub user_data: PathBuf,

    /// The meta-data (YAML with an instance-id) [default: an instance-id from the content].
    #[arg(long, value_name = "FILE")]
    pub meta_data: Option<PathBuf>,

    /// Network configuration (cloud-init's network-config, version 1 or 2).
    #[arg(long, value_name = "FILE")]
    pub network_config: Option<PathBuf>,

    /// The ISO to write, or an existing folder to write seed.iso in.
    #[arg(short, long, default_value = "seed.iso", value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Folder holding one <name>/Dockerfile per recipe [default: the Dockerfiles/ folder of
    /// the current folder or the nearest one above it that has one].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Version to check instead of the recipes' pin.
    #[arg(long, value_name = "X.Y.Z")]
    pub alpine_version: Option<String>,

    /// Alpine mirror (the folder holding v3.22/, latest-stable/).
    #[arg(long, default_value = crate::check::DEFAULT_MIRROR, value_name = "URL")]
    pub mirror: String,

    /// Architecture folder of the release lists.
    #[arg(long, default_value = "x86_64")]
    pub arch: String,

    /// Exit 3 when the pin is behind.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Args, Debug)]
pub struct DiskArgs {
    /// The image: NAME[:TAG] or docker:NAME[:TAG] (in the Docker engine; never pulled),
    /// docker-archive:PATH[:TAG], oci:DIR[:REF], oci-archive:PATH[:REF], or a bare PATH.
    pub source: String,

    /// Output file, or an existing folder to write <name>.<format> in [default:
    /// out/<name>/<name>.<format>]; missing folders are created.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Disk format [default: from the output's extension (.img/.raw, .qcow2, .vmdk, .vdi,
    /// .vhdx, .vhd; another is refused), qcow2 without -o]. VirtualBox: vdi or vmdk; Hyper-V:
    /// vhdx; Azure and Hyper-V generation 1: vhd (fixed); QEMU/libvirt/Proxmox: qcow2 or raw.
    #[arg(long, value_enum)]
    pub format: Option<crate::disk::Format>,

    /// Size of the whole disk (e.g. 8G, 1536M), or auto: the rootfs's blocks and inodes plus
    /// ext4 overhead plus max(20%, 64 MiB) of headroom. [default: sparse formats 4 GiB of
    /// virtual size that the root grows into at first boot (images with growpart and
    /// resize2fs), else auto]
    #[arg(long, value_name = "auto|SIZE")]
    pub size: Option<String>,

    /// Partition table. MBR: the ESP as type 0xEF, active; at most 2 TiB.
    #[arg(long, value_enum, default_value_t = crate::disk::partition::Table::Gpt)]
    pub table: crate::disk::partition::Table,

    /// Firmware the disk boots on: BIOS (SYSLINUX), UEFI (systemd-boot; Secure Boot off), or
    /// both from the same disk.
    #[arg(long, value_enum, default_value_t = crate::disk::boot::Firmware::Hybrid)]
    pub firmware: crate::disk::boot::Firmware,

    /// Extra kernel command line, appended after root=, console= and rootfstype=.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,

    /// Compress the qcow2 (smaller, slower to write; QEMU reads it transparently).
    #[arg(long)]
    pub compress: bool,

    /// Fail on an image without a kernel instead of building the VM layer (linux-virt,
    /// mkinitfs, syslinux through BuildKit; Alpine docker: images only).
    #[arg(long)]
    pub no_vm_layer: bool,

    /// Platform to pick from a multi-platform image [default: linux/amd64]; given, an image of
    /// another platform is refused.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    #[command(flatten)]
    pub identity: IdentityArgs,
}

pub fn run(cli: Cli) -> Result<()> {
    let progress = Progress::new(cli.progress);
    crate::engine::set_flags(crate::engine::Flags {
        host: cli.host,
        context: cli.context,
    });
    match cli.command {
        Command::Export(a) => {
            let mut targets = Targets {
                wsl: a.wsl,
                wsl_package: a.wsl_package,
                lxd: a.lxd,
                lxd_split: a.lxd_split,
                lxd_vm: a.lxd_vm,
                rootfs: a.rootfs,
            };
            if !targets.any() {
                targets.wsl = true;
                targets.lxd = true;
            }
            let (out_dir, single) = export::resolve_output(a.output.as_deref(), &targets)?;
            let opts = ExportOptions {
                source: a.source,
                out_dir,
                single,
                name: a.name,
                targets,
                wsl_user: a.wsl_user,
                icon: a.icon,
                select: SelectOptions::new(a.platform),
                identity: a.identity.sources()?,
            };
            let report = export::export(&opts, &progress)?;
            for f in &report.files {
                println!("{}", f.display());
            }
            progress.artifacts(&report.files);
            Ok(())
        }
        Command::Build(a) => {
            let opts = factory_options(a.names, a.project, Some(a.build))?;
            let engine = crate::engine::Engine::connect()?;
            crate::factory::build_images(&engine, &opts, &progress)?;
            Ok(())
        }
        Command::Push(a) => {
            let opts = factory_options(a.names, a.project, None)?;
            let engine = crate::engine::Engine::connect()?;
            crate::factory::push_images(&engine, &opts, &progress)?;
            Ok(())
        }
        Command::Seed(a) => {
            let path = crate::seed::write_seed(&crate::seed::SeedOptions {
                user_data: a.user_data,
                meta_data: a.meta_data,
                network_config: a.network_config,
                output: a.output,
            })?;
            println!("{}", path.display());
            progress.artifacts(std::slice::from_ref(&path));
            Ok(())
        }
        Command::Check(a) => {
            let pinned = match a.alpine_version {
                Some(v) => v,
                None => {
                    let dir = crate::project::recipes_dir(a.dir)?;
                    crate::project::Project::load(&dir)?
                        .alpine_version()?
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "no recipe under {} pins ARG ALPINE_VERSION; pass --alpine-version",
                                dir.display()
                            )
                        })?
                }
            };
            let drift = crate::check::check(&pinned, &a.mirror, &a.arch)?;
            for line in drift.report() {
                println!("{line}");
            }
            if a.strict && drift.behind() {
                std::process::exit(3);
            }
            Ok(())
        }
        Command::Disk(a) => {
            let opts = crate::disk::DiskOptions {
                source: a.source,
                output: a.output,
                format: a.format,
                size: match &a.size {
                    Some(s) => crate::disk::fs::parse_size(s)?,
                    None => None,
                },
                sized: a.size.is_some(),
                table: a.table,
                firmware: a.firmware,
                cmdline: a.cmdline,
                identity: None,
                compress: a.compress,
                select: SelectOptions::new(a.platform),
                no_vm_layer: a.no_vm_layer,
                vm_agent: false,
            };
            let identity = a.identity.sources()?;
            let path = crate::disk::write_disk(&opts, &identity, &progress)?;
            println!("{}", path.display());
            progress.artifacts(std::slice::from_ref(&path));
            Ok(())
        }
        Command::Doctor(a) => {
            let report = crate::doctor::run();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            if !report.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::All(a) => {
            let opts = factory_options(Vec::new(), a.project, Some(a.build))?;
            let identity = a.identity.sources()?;
            // Beside the recipes' folder: out/ of the project, wherever abox runs from.
            let output = a.output.unwrap_or_else(|| {
                let root = opts.dir.parent().filter(|p| !p.as_os_str().is_empty());
                root.unwrap_or(std::path::Path::new(".")).join("out")
            });
            let files = crate::factory::all(&opts, &identity, &output, &progress)?;
            for f in &files {
                println!("{}", f.display());
            }
            progress.artifacts(&files);
            Ok(())
        }
        Command::Completions { shell } => {
            use std::io::Write;
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "abox", &mut script);
            // A reader that stopped early (`| head`) is not an error.
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow::Error::new(e).context("writing the completion script"))
                }
                _ => Ok(()),
            }
        }
        Command::Man { output } => {
            for p in write_man_pages(&output)? {
                println!("{}", p.display());
            }
            Ok(())
        }
    }
}

/// Write `abox.1` and a page per command (`abox-export.1`, …) into `dir` (roff, clap_mangen),
/// each atomically; returns their paths.
pub fn write_man_pages(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    use anyhow::Context;
    use std::io::Write;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create {} (choose another with -o)", dir.display()))?;
    // No `help` command page (it would name pages of `abox help <command>` that do not exist);
    // built: the global options are copied into every command's page.
    let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![("abox".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        let name = format!("abox-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    let mut written = Vec::new();
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = crate::output::PendingFile::create_public(&path)?;
        let mut buf = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut buf)
            .with_context(|| format!("rendering {}", path.display()))?;
        out.file().write_all(&buf)?;
        out.commit()?;
        written.push(path);
    }
    Ok(written)
}
