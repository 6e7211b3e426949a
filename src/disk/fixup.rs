//! The disk's rootfs fix-ups ([`DiskFixup`]) and the identity it is given: filesystem and
//! partition UUIDs, `/etc/fstab` by UUID (users, keys and passwords: [`crate::identity`]).

use std::collections::HashSet;

use anyhow::{bail, Result};

use crate::flatten;
use crate::tarfmt::{Kind, Meta};
use crate::target::openrc::OpenRc;
use crate::target::{Action, Extra, Fixup};

/// A random (version 4) UUID, hyphenated, lowercase.
pub fn random_uuid() -> Result<String> {
    Ok(uuid::Uuid::new_v4().hyphenated().to_string())
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
/// `/boot`; anything but a folder at `/boot` dropped), missing mount points created, OpenRC images get the VM set-up
/// ([`openrc::VM`]: serial getty, runlevels, DHCP on eth0, root grown to the disk at boot).
pub struct DiskFixup {
    fs_uuid: String,
    /// The ESP's FAT serial (`XXXX-XXXX`), mounted at `/boot`.
    esp_uuid: String,
    mtime: u64,
    has_fstab: bool,
    has_hosts: bool,
    has_hostname: bool,
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
    pub fn new(fs_uuid: &str, esp_uuid: String, mtime: u64) -> Self {
        DiskFixup {
            fs_uuid: fs_uuid.to_string(),
            esp_uuid,
            mtime,
            has_fstab: false,
            has_hosts: false,
            has_hostname: false,
            openrc: OpenRc::new(&crate::target::openrc::VM),
            vm_agent: false,
        }
    }

    /// What the VM set-up did that the user should know (known once started).
    pub fn notes(&self) -> &[String] {
        self.openrc.notes()
    }

    /// Also install the LXD/Incus VM agent service ([`VM_AGENT`]) in the default runlevel.
    pub fn with_vm_agent(mut self, on: bool) -> Self {
        self.vm_agent = on;
        self
    }
}

impl Fixup for DiskFixup {
    fn start_with(&mut self, plan: &flatten::Plan, facts: &flatten::Facts) -> Result<()> {
        self.openrc.start(facts, Some(plan.tree()));
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
            _ => self.openrc.action(path, meta).unwrap_or(Action::Keep),
        }
    }

    fn rewrite(&mut self, path: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        let text = String::from_utf8_lossy(&data);
        Ok(match path {
            "etc/fstab" => fstab(&text, &self.fs_uuid, &self.esp_uuid).into_bytes(),
            "etc/hosts" => hosts(&text).into_bytes(),
            "etc/hostname" => hostname(&text).into_bytes(),
            _ => self.openrc.rewrite(path, &data).unwrap_or(data),
        })
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
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn uuids_are_v4() {
        let u = random_uuid().unwrap();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, random_uuid().unwrap());
    }
}
