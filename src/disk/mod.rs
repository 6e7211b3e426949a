//! `abox disk`: an image → a bootable VM disk, d2vm-fashion, from the flattened stream.
//!
//! The steps are separate so each can later run without root: [`partition`] writes the table
//! and boot code into a sparse file; [`fs`] makes the filesystem on a loop device over the
//! partition and mounts it; [`populate`] writes the rootfs into it straight from the flattening
//! (no tar file, no extraction step); [`boot`] writes `extlinux.conf` and installs extlinux;
//! `qemu-img convert` makes the requested format. The disk appears under its final name only
//! when all of that succeeded.

pub mod boot;
pub mod fs;
pub mod partition;
pub mod populate;
pub mod vmlayer;

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::flatten::{self};
use crate::output::PendingFile;
use crate::progress::Progress;
use crate::source::{self, SelectOptions};
use crate::tarfmt::{Kind, Meta};
use crate::target::openrc::{self, OpenRc};
use crate::target::{os_release, os_release_get, Action, Extra, Fixup, TarStream};
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

    fn qemu_name(self) -> &'static str {
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

#[derive(Debug)]
pub struct DiskReport {
    pub path: PathBuf,
    pub format: Format,
    pub disk_bytes: u64,
    pub fs_uuid: String,
    pub part_uuid: String,
    pub kernel: String,
}

/// A random (version 4) UUID.
pub fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// `--root-password-file`: a crypt(3) hash (`$6$…`, `$y$…`) is used as it is; anything else is
/// the password itself (first line), hashed with SHA-512 crypt.
pub fn root_password_hash(file: &Path) -> Result<String> {
    use sha_crypt::password_hash::PasswordHasher;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the root password from {}", file.display()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        bail!(
            "{} is empty: put the root password (or its crypt hash) on its first line",
            file.display()
        );
    }
    if line.starts_with('$') && line.matches('$').count() >= 3 && !line.contains(':') {
        return Ok(line.to_string());
    }
    let mut salt = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .context("reading /dev/urandom")?;
    let h = sha_crypt::ShaCrypt::SHA512
        .hash_password_with_salt(line.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing the root password: {e}"))?;
    Ok(h.to_string())
}

/// Set root's password field in a shadow file (adding a root line if there is none).
pub fn set_root_hash(shadow: &str, hash: &str) -> String {
    let mut out = String::new();
    let mut found = false;
    for line in shadow.lines() {
        let mut f: Vec<&str> = line.split(':').collect();
        if f.first() == Some(&"root") && f.len() >= 2 {
            f[1] = hash;
            found = true;
            out.push_str(&f.join(":"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !found {
        out.insert_str(0, &format!("root:{hash}:0:0:99999:7:::\n"));
    }
    out
}

/// `/etc/fstab` with the root filesystem by UUID; the image's other lines are kept, any other
/// line for `/` is dropped.
pub fn fstab(existing: &str, fs_uuid: &str) -> String {
    let mut out = format!("UUID={fs_uuid}\t/\text4\trw,relatime\t0 1\n");
    for line in existing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !line.trim_start().starts_with('#') && fields.get(1) == Some(&"/") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Folders created when the image has none.
const MOUNT_POINTS: [(&str, u32); 5] = [
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// The disk's fix-ups: `/.dockerenv` dropped, `/etc/fstab` by UUID, `/boot/extlinux.conf`,
/// missing mount points created, root's password when asked; OpenRC images get the VM set-up
/// ([`openrc::VM`]: serial getty, runlevels, DHCP on eth0, root grown to the disk at boot).
struct DiskFixup {
    fs_uuid: String,
    extlinux_conf: String,
    root_hash: Option<String>,
    mtime: u64,
    has_fstab: bool,
    has_shadow: bool,
    /// Where `/etc/shadow`'s content is written (itself, or the file a link of it leads to).
    shadow_at: String,
    openrc: OpenRc,
}

impl Fixup for DiskFixup {
    fn start(&mut self, facts: &flatten::Facts) -> Result<()> {
        self.openrc.start(facts);
        if let Some(real) = facts.secret_files.get("etc/shadow") {
            self.shadow_at = real.clone();
        }
        // Root's hash must not land in a file another name shares (a hard link to /etc/passwd
        // would publish it).
        if self.root_hash.is_some() && facts.secret_links.get("etc/shadow").is_some_and(|n| *n > 1)
        {
            bail!(
                "the image's /etc/shadow shares its file with other names (hard links): refusing \
                 to write root's password into it; make /etc/shadow a file of its own"
            );
        }
        Ok(())
    }

    fn action(&mut self, path: &str, meta: &Meta) -> Action {
        match path {
            // extlinux writes ldlinux.sys and ldlinux.c32 in /boot: no entry of the image may
            // stand there (a symlink would send the installer's writes onto the host).
            ".dockerenv" | "boot/extlinux.conf" | "boot/extlinux.sys" | "boot/ldlinux.sys"
            | "boot/ldlinux.c32" => Action::Drop,
            // Rewritten when regular files; anything else there is dropped by the stream and
            // the file written afresh.
            "etc/fstab" => {
                self.has_fstab |= meta.kind == Kind::File;
                Action::Rewrite
            }
            // Root's password goes where the shadow file's content is; a link at the name that
            // leads to it is kept; anything else there is dropped and the file written afresh.
            p if self.root_hash.is_some() && p == self.shadow_at => {
                self.has_shadow |= meta.kind == Kind::File;
                Action::Rewrite
            }
            "etc/shadow" if self.root_hash.is_some() => Action::Keep,
            _ => self.openrc.action(path, meta).unwrap_or(Action::Keep),
        }
    }

    fn rewrite(&mut self, path: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        let text = String::from_utf8_lossy(&data);
        Ok(match (path, &self.root_hash) {
            ("etc/fstab", _) => fstab(&text, &self.fs_uuid).into_bytes(),
            (p, Some(h)) if p == self.shadow_at => set_root_hash(&text, h).into_bytes(),
            _ => self.openrc.rewrite(path, &data).unwrap_or(data),
        })
    }

    fn rewritten_meta(&self, path: &str, mut meta: Meta) -> Meta {
        // The file that now holds root's hash: root's, and not readable by others.
        if self.root_hash.is_some() && path == self.shadow_at {
            meta.uid = 0;
            meta.gid = 0;
            meta.mode &= 0o640;
            meta.xattrs.clear();
        }
        meta
    }

    fn epilogue(&mut self, seen_dirs: &HashSet<String>) -> Result<Vec<Extra>> {
        let mut v = vec![Extra::file(
            "boot/extlinux.conf",
            0o644,
            self.extlinux_conf.clone().into_bytes(),
            self.mtime,
        )];
        // Mount points a booting system needs and container images may lack (the engine
        // provides them to containers): without /dev, init has no devtmpfs to mount.
        for (dir, mode) in MOUNT_POINTS {
            if !seen_dirs.contains(dir) {
                let mut e = Extra::dir(dir, self.mtime);
                e.meta.mode = mode;
                v.push(e);
            }
        }
        if !self.has_fstab {
            v.push(Extra::file(
                "etc/fstab",
                0o644,
                fstab("", &self.fs_uuid).into_bytes(),
                self.mtime,
            ));
        }
        v.extend(self.openrc.extras(self.mtime));
        if let (Some(h), false) = (&self.root_hash, self.has_shadow) {
            v.push(Extra::file(
                "etc/shadow",
                0o600,
                set_root_hash("", h).into_bytes(),
                self.mtime,
            ));
        }
        Ok(v)
    }
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

fn is_alpine(facts: &flatten::Facts) -> bool {
    facts
        .text("etc/os-release")
        .map(|t| os_release_get(&os_release(t), "ID") == Some("alpine"))
        .unwrap_or(false)
}

/// The engine image to build the VM layer on, when `err` says the image has no kernel and it
/// is an Alpine `docker:` image (the layer installs Alpine's kernel with apk).
fn vm_layer_base(
    opts: &DiskOptions,
    facts: &flatten::Facts,
    err: &anyhow::Error,
) -> Option<String> {
    err.downcast_ref::<boot::NoKernel>()?;
    if opts.no_vm_layer {
        return None;
    }
    match source::SourceRef::parse(&opts.source).ok()? {
        source::SourceRef::Docker { name } if is_alpine(facts) => Some(name),
        _ => None,
    }
}

/// Write the disk and move it to its name.
pub fn write_disk(
    opts: &DiskOptions,
    progress: &Progress,
    engine: Option<&std::sync::Arc<crate::engine::Engine>>,
) -> Result<DiskReport> {
    let (file, report) = make_disk(opts, progress, engine)?;
    file.commit()?;
    Ok(report)
}

/// Write the disk under its temporary name; the caller commits it (with other artifacts).
pub fn make_disk(
    opts: &DiskOptions,
    progress: &Progress,
    engine: Option<&std::sync::Arc<crate::engine::Engine>>,
) -> Result<(PendingFile, DiskReport)> {
    fs::require_root()?;
    boot::check_extlinux()?;
    let boot_code = boot::boot_code(opts.table)?;
    let root_hash = opts
        .root_password_file
        .as_deref()
        .map(root_password_hash)
        .transpose()?;
    if opts.compress && opts.format.is_some_and(|f| f != Format::Qcow2) {
        bail!("--compress applies to qcow2 only");
    }

    let mut image = source::open_with(&opts.source, &opts.select, engine)?;
    let (out_path, format) = output_and_format(opts, &image.name)?;
    if opts.compress && format != Format::Qcow2 {
        bail!("--compress applies to qcow2 only");
    }
    if let Some(dir) = out_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the output folder {} (choose another with -o)",
                dir.display()
            )
        })?;
    }
    // What an abox that died here before (SIGKILL) left behind is released first, and said.
    let out_dir = out_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    for done in fs::reap_stale(out_dir)? {
        progress.note(&done);
    }
    // The final file, created now so an unwritable folder fails before any work.
    let mut out = PendingFile::create(&out_path)?;

    let mut plan = flatten::index(&image, progress)?;
    let kernel = match boot::find_kernel(plan.tree()) {
        Ok(k) => k,
        Err(e) => {
            let Some(name) = vm_layer_base(opts, &plan.facts, &e) else {
                return Err(e);
            };
            let engine = match engine {
                Some(e) => e.clone(),
                None => std::sync::Arc::new(crate::engine::Engine::connect()?),
            };
            let tag = vmlayer::build_on(&name, &engine, progress)?;
            let short = image.name.clone();
            image = source::open_with(&format!("docker:{tag}"), &opts.select, Some(&engine))?;
            image.name = short;
            plan = flatten::index(&image, progress)?;
            boot::find_kernel(plan.tree())
                .with_context(|| format!("the VM layer {tag} installed no kernel"))?
        }
    };
    let usage = fs::usage(plan.tree());
    let min_fs = fs::min_fs_bytes(usage);
    let fs_bytes = match opts.size {
        None => fs::auto_fs_bytes(usage),
        Some(disk) => {
            let overhead = partition::ALIGN * 2;
            let need = min_fs + overhead;
            if disk < need {
                bail!(
                    "--size {} is too small: this image needs at least {} ({} of files and folders, {} inodes); use --size auto or a larger size",
                    fs::human(disk),
                    fs::human(need),
                    fs::human(usage.bytes),
                    usage.inodes
                );
            }
            (disk - overhead) / partition::ALIGN * partition::ALIGN
        }
    };

    let fs_uuid = random_uuid()?;
    let part_guid = random_uuid()?;
    let disk_guid = random_uuid()?;
    let layout = partition::layout(opts.table, fs_bytes, &part_guid)?;
    // The raw disk is sparse, but what the filesystem holds is written for real; a converted
    // format needs the raw scratch and the result side by side.
    let copies = if format == Format::Raw { 1 } else { 2 };
    crate::output::check_room(out_dir, min_fs.saturating_mul(copies), "the disk")?;

    // The raw disk: the output itself, or a scratch file next to it for qemu-img.
    let mut scratch = match format {
        Format::Raw => None,
        _ => {
            let name = out_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some(PendingFile::create(
                &out_path.with_file_name(format!("{name}.raw")),
            )?)
        }
    };
    let raw = scratch.as_mut().unwrap_or(&mut out);
    let raw_path = raw.tmp_path().to_path_buf();
    partition::write_table(raw.file(), &layout, &part_guid, &disk_guid, &boot_code)?;
    raw.file().sync_all()?;

    let task = progress.task("making filesystem", 0);
    let lo = fs::Loop::attach(&raw_path, layout.part_offset, layout.part_bytes)?;
    fs::mkfs(lo.dev(), layout.part_bytes, usage, &fs_uuid, "root")?;
    let mnt = fs::Mount::new(lo.dev())?;
    task.finish(&format!(
        "ext4 {} on a {} {} disk",
        fs::human(layout.part_bytes),
        fs::human(layout.disk_bytes),
        match opts.table {
            Table::Gpt => "GPT",
            Table::Mbr => "MBR",
        }
    ));

    let alpine = is_alpine(&plan.facts);
    let root = boot::root_arg(&kernel, &fs_uuid, &layout.part_uuid);
    let created = crate::target::build_time(image.config.created().as_deref());
    let fixup = DiskFixup {
        fs_uuid: fs_uuid.clone(),
        extlinux_conf: boot::extlinux_conf(&kernel, &root, alpine, opts.cmdline.as_deref()),
        root_hash,
        mtime: created,
        has_fstab: false,
        has_shadow: false,
        shadow_at: "etc/shadow".into(),
        openrc: OpenRc::new(&openrc::VM),
    };
    let mut stream = TarStream::with_out(populate::DirOut::new(mnt.path())?, "", fixup);
    stream.start(&plan.facts)?;
    flatten::emit(&image, &plan, &mut stream, progress)?;
    stream.finish_entries()?.finish()?;
    crate::signals::check()?;

    let task = progress.task("installing extlinux", 0);
    boot::install(&mnt.path().join("boot"))?;
    mnt.unmount()?;
    lo.detach()?;
    task.finish(&format!("boots /{}", kernel.kernel));
    crate::signals::check()?;

    if let Some(scratch) = scratch.take() {
        let task = progress.task(&format!("writing {}", format.qemu_name()), 0);
        let mut cmd = Command::new("qemu-img");
        cmd.args(["convert", "-f", "raw", "-O", format.qemu_name()]);
        if opts.compress {
            cmd.arg("-c");
        }
        match format {
            // VirtualBox and VMware both read the growable single-file kind.
            Format::Vmdk => {
                cmd.args(["-o", "subformat=monolithicSparse"]);
            }
            Format::Vhdx => {
                cmd.args(["-o", "subformat=dynamic"]);
            }
            _ => {}
        }
        cmd.arg(scratch.tmp_path()).arg(out.tmp_path());
        crate::cmd::run(&mut cmd)?;
        drop(scratch);
        task.finish(&format!("{}", out_path.display()));
    }
    crate::signals::check()?;
    out.file().sync_all().context("writing the disk")?;
    Ok((
        out,
        DiskReport {
            path: out_path,
            format,
            disk_bytes: layout.disk_bytes,
            fs_uuid,
            part_uuid: layout.part_uuid,
            kernel: kernel.kernel,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_puts_root_by_uuid_and_keeps_the_rest() {
        let f = fstab(
            "# comment\n/dev/sda1 / ext4 defaults 0 1\n/dev/cdrom /media/cdrom iso9660 noauto,ro 0 0\n",
            "U",
        );
        assert_eq!(
            f,
            "UUID=U\t/\text4\trw,relatime\t0 1\n# comment\n/dev/cdrom /media/cdrom iso9660 noauto,ro 0 0\n"
        );
    }

    #[test]
    fn root_hash_replaces_only_root() {
        let s = set_root_hash("root:!::0:::::\nalpine:!:1:0:99999:7:::\n", "$6$x$y");
        assert_eq!(s, "root:$6$x$y::0:::::\nalpine:!:1:0:99999:7:::\n");
        assert!(set_root_hash("", "H").starts_with("root:H:"));
    }

    #[test]
    fn password_file_is_hashed_with_sha512_crypt() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        let h = root_password_hash(&p).unwrap();
        assert!(h.starts_with("$6$"), "{h}");
        assert!(!h.contains("s3cret"));
        // Verified by an independent implementation (Python's crypt(3) binding).
        let ok = Command::new("python3")
            .args([
                "-W",
                "ignore",
                "-c",
                "import crypt,sys; print(crypt.crypt(sys.argv[1], sys.argv[2]) == sys.argv[2])",
                "s3cret",
                &h,
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "True", "{ok:?}");
        std::fs::write(&p, "$6$abc$def\n").unwrap();
        assert_eq!(root_password_hash(&p).unwrap(), "$6$abc$def");
        std::fs::write(&p, "").unwrap();
        assert!(root_password_hash(&p).is_err());
    }

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

    #[test]
    fn uuids_are_v4() {
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, random_uuid().unwrap());
    }
}
