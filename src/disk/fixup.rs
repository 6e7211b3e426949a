//! The disk's rootfs fix-ups ([`DiskFixup`]) and the identity it is given: filesystem and
//! partition UUIDs, `/etc/fstab` by UUID, root's password (SHA-512 crypt).

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::flatten;
use crate::tarfmt::{Kind, Meta};
use crate::target::openrc::OpenRc;
use crate::target::{Action, Extra, Fixup};

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

/// `/etc/fstab` with the root filesystem and the ESP (at `/boot`, files 0644, never checked at
/// boot: Alpine has no `fsck.vfat` by default) by UUID; the image's other lines are kept, any
/// other line for `/` or `/boot` is dropped.
pub fn fstab(existing: &str, fs_uuid: &str, esp_uuid: &str) -> String {
    let mut out = format!(
        "UUID={fs_uuid}\t/\text4\trw,relatime\t0 1\n\
         UUID={esp_uuid}\t/boot\tvfat\trw,relatime,fmask=0133,dmask=0022,errors=remount-ro\t0 0\n"
    );
    for line in existing.lines() {
        let line = line.trim_end_matches('\r');
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !line.trim_start().starts_with('#')
            && matches!(fields.get(1), Some(&"/") | Some(&"/boot"))
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Folders created when the image has none.
const MOUNT_POINTS: [(&str, u32); 6] = [
    ("boot", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// `/etc/hosts` that resolves `localhost`: `existing` (CRLF line ends made LF, a final newline
/// added) with Alpine's two localhost lines in front when no line maps 127.0.0.1 to it.
/// Read through the engine, an image has none (Docker's init layer replaces it, see
/// [`crate::flatten::export`]); a symlink there is replaced by the file.
pub fn hosts(existing: &str) -> String {
    let mut body: String = existing.replace("\r\n", "\n");
    if !body.is_empty() && !body.ends_with('\n') {
        body.push('\n');
    }
    let resolves = body.lines().any(|l| {
        let mut f = l.split('#').next().unwrap_or("").split_whitespace();
        f.next() == Some("127.0.0.1") && f.any(|n| n == "localhost")
    });
    if resolves {
        return body;
    }
    format!(
        "127.0.0.1\tlocalhost localhost.localdomain\n::1\t\tlocalhost localhost.localdomain\n{body}"
    )
}

/// `/etc/hostname`: the first name in `existing` (what busybox `hostname -F` takes), else
/// `localhost` (what Alpine's hostname service falls back to), one line.
pub fn hostname(existing: &str) -> String {
    let name = existing
        .lines()
        .filter_map(|l| l.split('#').next().unwrap_or("").split_whitespace().next())
        .next()
        .unwrap_or("localhost");
    format!("{name}\n")
}

/// A larger `/etc/hosts` (a block list) is kept as it is, not read into memory.
const HOSTS_MAX: u64 = 1 << 20;

/// The disk's fix-ups: `/.dockerenv` dropped, `/etc/hosts` resolving localhost and a
/// non-empty `/etc/hostname` ([`hosts`], [`hostname`]), `/etc/fstab` by UUID (root and the ESP at
/// `/boot`; anything but a folder at `/boot` dropped), missing mount points created, root's password when asked; OpenRC images get the VM set-up
/// ([`openrc::VM`]: serial getty, runlevels, DHCP on eth0, root grown to the disk at boot).
pub struct DiskFixup {
    fs_uuid: String,
    /// The ESP's FAT serial (`XXXX-XXXX`), mounted at `/boot`.
    esp_uuid: String,
    root_hash: Option<String>,
    mtime: u64,
    has_fstab: bool,
    has_hosts: bool,
    has_hostname: bool,
    has_shadow: bool,
    /// Where `/etc/shadow`'s content is written (itself, or the file a link of it leads to).
    shadow_at: String,
    openrc: OpenRc,
    /// Add the LXD/Incus VM agent service (OpenRC images).
    vm_agent: bool,
}

/// The LXD/Incus VM agent as an OpenRC service: it mounts the config drive the host shares
/// (9p, else virtiofs, tag `config`) on a private folder and runs the agent found there
/// (`incus-agent` or `lxd-agent`) — what distrobuilder's Alpine VM images do with two
/// services.
pub const VM_AGENT: &str = r#"#!/sbin/openrc-run
# Written by alpine-boxes: the LXD/Incus VM agent, run from the config drive the host shares.
description="LXD/Incus VM agent (from the config drive)"
command_background=true
pidfile=/run/abox-vm-agent.pid
dir=/run/vm-agent

depend() {
	need localmount
	before networking
}

start_pre() {
	checkpath -d -m 0700 "$dir"
	if ! grep -q " $dir " /proc/mounts; then
		modprobe -q 9pnet_virtio 2>/dev/null
		mount -t 9p config "$dir" -o access=0,trans=virtio 2>/dev/null 			|| mount -t virtiofs config "$dir" 2>/dev/null 			|| { eerror "no config drive: this image runs under LXD or Incus"; return 1; }
	fi
	for agent in incus-agent lxd-agent; do
		[ -x "$dir/$agent" ] && command="$dir/$agent" && break
	done
	[ -n "$command" ] || { eerror "no incus-agent or lxd-agent on the config drive"; return 1; }
	start_stop_daemon_args="--chdir $dir"
}
"#;

impl DiskFixup {
    /// The fix-ups of a disk whose root filesystem has `fs_uuid` and whose ESP (mounted at
    /// `/boot`) has the FAT serial `esp_uuid`; `mtime` for the entries it adds.
    pub fn new(fs_uuid: &str, esp_uuid: String, root_hash: Option<String>, mtime: u64) -> Self {
        DiskFixup {
            fs_uuid: fs_uuid.to_string(),
            esp_uuid,
            root_hash,
            mtime,
            has_fstab: false,
            has_hosts: false,
            has_hostname: false,
            has_shadow: false,
            shadow_at: "etc/shadow".into(),
            openrc: OpenRc::new(&crate::target::openrc::VM),
            vm_agent: false,
        }
    }

    /// Also install the LXD/Incus VM agent service ([`VM_AGENT`]) in the default runlevel.
    pub fn with_vm_agent(mut self, on: bool) -> Self {
        self.vm_agent = on;
        self
    }
}

impl Fixup for DiskFixup {
    fn start(&mut self, facts: &flatten::Facts) -> Result<()> {
        self.openrc.start(facts);
        if let Some(real) = facts.secret_files.get("etc/shadow") {
            self.shadow_at = real.clone();
        }
        // /boot is the FAT ESP on a disk: no owners, no modes, every file readable. A password
        // file whose content lives there would be readable by every user of the VM.
        for (name, real) in &facts.secret_files {
            if real == "boot" || real.starts_with("boot/") {
                bail!(
                    "the image keeps /{name}'s content in /{real}: on a disk /boot is the FAT \
                     EFI System Partition, which has no permissions, so the password hashes \
                     would be readable by every user; keep /{name} out of /boot"
                );
            }
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
            ".dockerenv" => Action::Drop,
            // The ESP's mount point: a folder, or written afresh as one.
            "boot" if meta.kind != Kind::Dir => Action::Drop,
            // Rewritten when regular files; anything else there is dropped by the stream and
            // the file written afresh.
            "etc/fstab" => {
                self.has_fstab |= meta.kind == Kind::File;
                Action::Rewrite
            }
            "etc/hosts" => {
                self.has_hosts |= meta.kind == Kind::File;
                if meta.kind == Kind::File && meta.size > HOSTS_MAX {
                    Action::Keep
                } else {
                    Action::Rewrite
                }
            }
            "etc/hostname" => {
                self.has_hostname |= meta.kind == Kind::File;
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
            ("etc/fstab", _) => fstab(&text, &self.fs_uuid, &self.esp_uuid).into_bytes(),
            ("etc/hosts", _) => hosts(&text).into_bytes(),
            ("etc/hostname", _) => hostname(&text).into_bytes(),
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
        let mut v = Vec::new();
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
                fstab("", &self.fs_uuid, &self.esp_uuid).into_bytes(),
                self.mtime,
            ));
        }
        if !self.has_hosts {
            v.push(Extra::file(
                "etc/hosts",
                0o644,
                hosts("").into_bytes(),
                self.mtime,
            ));
        }
        if !self.has_hostname {
            v.push(Extra::file(
                "etc/hostname",
                0o644,
                hostname("").into_bytes(),
                self.mtime,
            ));
        }
        v.extend(self.openrc.extras(self.mtime));
        if self.vm_agent && self.openrc.active() {
            v.push(Extra::file(
                "etc/init.d/abox-vm-agent",
                0o755,
                VM_AGENT.as_bytes().to_vec(),
                self.mtime,
            ));
            v.push(Extra::symlink(
                "etc/runlevels/default/abox-vm-agent",
                "/etc/init.d/abox-vm-agent",
                self.mtime,
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    #[test]
    fn fstab_puts_root_by_uuid_and_keeps_the_rest() {
        let f = fstab(
            "# comment\r\n/dev/sda1 / ext4 defaults 0 1\n/dev/sda2 /boot vfat defaults 0 2\n/dev/cdrom /media/cdrom iso9660 noauto,ro 0 0",
            "U",
            "AB12-CD34",
        );
        assert_eq!(
            f,
            "UUID=U\t/\text4\trw,relatime\t0 1\n\
             UUID=AB12-CD34\t/boot\tvfat\trw,relatime,fmask=0133,dmask=0022,errors=remount-ro\t0 0\n\
             # comment\n/dev/cdrom /media/cdrom iso9660 noauto,ro 0 0\n"
        );
    }

    #[test]
    fn hosts_always_resolves_localhost() {
        let fresh = hosts("");
        assert!(fresh.starts_with("127.0.0.1\tlocalhost localhost.localdomain\n::1\t"));
        assert_eq!(
            hosts("# comments only\n"),
            format!("{fresh}# comments only\n")
        );
        assert_eq!(
            hosts("10.0.0.1 nas\r\n127.0.0.1 localhost"),
            "10.0.0.1 nas\n127.0.0.1 localhost\n",
            "CRLF and no final newline"
        );
        assert_eq!(
            hosts("# 127.0.0.1 localhost\n"),
            format!("{fresh}# 127.0.0.1 localhost\n"),
            "a commented line resolves nothing"
        );
        assert_eq!(hostname(""), "localhost\n");
        assert_eq!(hostname("\n# set by abox\n  box1 box3\r\nbox2\n"), "box1\n");
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
    fn uuids_are_v4() {
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, random_uuid().unwrap());
    }
}
