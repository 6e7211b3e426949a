//! OpenRC fix-ups, one table per target. The images stay clean container images; what differs
//! between running one as a WSL distribution, an LXD container or a VM is applied here, to the
//! rootfs stream, by the target that writes it:
//!
//! - `/etc/rc.conf`: the subsystem type (`rc_sys`) and the virtual services the host provides;
//! - `/etc/inittab`: which gettys busybox init runs (console only in a container, plus the
//!   serial port in a VM);
//! - `/etc/init.d/localmount`: LXD wants it to run (its `-lxc` keyword removed);
//! - `/etc/network/interfaces` with eth0 on DHCP when the image has none;
//! - runlevel links (`/etc/runlevels/LEVEL/SERVICE → /etc/init.d/SERVICE`) for services the
//!   image has, as `rc-update add` would make them;
//! - files a target adds (the WSL start helper, the VM's root-growing service).
//!
//! Nothing happens to an image without `/etc/rc.conf` (not OpenRC). Each rewrite is a pure
//! function of the file's text, tested on Alpine-shaped fixtures
//! (`tests/fixtures/openrc/input` → `tests/fixtures/openrc/<target>`).

use std::collections::BTreeSet;

use super::{Action, Extra};
use crate::flatten::tree::{Node, Tree};
use crate::flatten::Facts;
use crate::tarfmt::{Kind, Meta};

/// A change to one `/etc/rc.conf` variable.
#[derive(Clone, Copy, Debug)]
pub enum RcVar {
    /// `KEY="VALUE"`: replaces an active line, else the first commented-out `#KEY=` line (where
    /// Alpine documents it), else is appended.
    Set(&'static str, &'static str),
    /// Comment out an active `KEY=` line (back to OpenRC's default).
    Unset(&'static str),
}

/// What to do with the gettys of `/etc/inittab`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inittab {
    Keep,
    /// A container has no ttys: one getty on `console`, the others removed.
    ConsoleOnly,
    /// A VM: the ttys kept (the hypervisor's screen) and a getty on the first serial port.
    Serial,
}

/// One target's OpenRC set-up.
#[derive(Debug)]
pub struct Profile {
    pub target: &'static str,
    pub rc_conf: &'static [RcVar],
    pub inittab: Inittab,
    /// A keyword removed from `/etc/init.d/localmount`'s `keyword` line.
    pub localmount_drop: Option<&'static str>,
    /// Write `/etc/network/interfaces` (lo + eth0 DHCP) when the image has none.
    pub interfaces: bool,
    /// Runlevel → services to link; `a|b` links the first of the names the image has.
    pub runlevels: &'static [(&'static str, &'static [&'static str])],
    /// Files the target adds (path, mode, content) unless the image has them.
    pub files: &'static [(&'static str, u32, &'static str)],
    /// Bring up the devices (a VM): the image's device manager in `sysinit`, or without one the
    /// NIC and disk drivers from `/etc/modules-load.d` ([`DEVICE_MANAGERS`], [`VM_DRIVERS`]).
    pub devices: bool,
}

/// The OpenRC device managers Alpine packages (each `provide dev`), in the order abox prefers
/// them, with the services `setup-devd` links for each: (runlevel, service).
pub const DEVICE_MANAGERS: &[(&str, &[(&str, &str)])] = &[
    // busybox-mdev-openrc
    ("mdev", &[("sysinit", "mdev"), ("sysinit", "hwdrivers")]),
    // mdevd-openrc
    (
        "mdevd",
        &[
            ("sysinit", "mdevd-init"),
            ("sysinit", "mdevd"),
            ("sysinit", "hwdrivers"),
        ],
    ),
    // eudev-openrc
    (
        "udev",
        &[
            ("sysinit", "udev"),
            ("sysinit", "udev-trigger"),
            ("sysinit", "udev-settle"),
            ("default", "udev-postmount"),
        ],
    ),
];

/// The kernel modules a VM needs for its NIC and disks on QEMU/KVM, Proxmox, VirtualBox,
/// Hyper-V and VMware, loaded by OpenRC's `modules` service when the image has no device
/// manager to load them (hwdrivers needs one). Only those the image's kernel has as module
/// files are listed; built-in drivers need nothing.
pub const VM_DRIVERS: &[&str] = &[
    // NICs: virtio, Intel (QEMU's and VirtualBox's default, Hyper-V generation 1 legacy),
    // VMware, Hyper-V; and the packet sockets DHCP clients use.
    "virtio_net",
    "e1000",
    "e1000e",
    "vmxnet3",
    "hv_netvsc",
    "af_packet",
    // Disks and CD-ROMs (a NoCloud seed): virtio, SATA, NVMe, SCSI, Hyper-V, VMware.
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "ahci",
    "ata_piix",
    "nvme",
    "sd_mod",
    "sr_mod",
    "hv_storvsc",
    "vmw_pvscsi",
    "mptspi",
];

/// Where the VM's driver list goes: read by OpenRC's `modules` service at boot, beside the
/// image's own `/etc/modules`.
pub const VM_DRIVERS_CONF: &str = "etc/modules-load.d/abox-vm.conf";

/// The WSL start helper: `/etc/wsl.conf`'s `[boot] command`.
pub const WSL_START: &str = "usr/lib/wsl/openrc-start";
/// The VM's root-growing service and the script it runs.
pub const GROWROOT_SERVICE: &str = "abox-growroot";
pub const GROWROOT: &str = "usr/lib/alpine-boxes/growroot";

/// WSL owns mounts, devices and the network: OpenRC runs as a "prefix" (services with the
/// `-prefix` keyword, like localmount and hwclock, are skipped) and treats `net` as provided.
/// WSL does not run busybox init, so nothing starts OpenRC by itself: `/etc/wsl.conf` runs the
/// start helper at the distribution's start.
pub const WSL: Profile = Profile {
    target: "wsl",
    rc_conf: &[
        RcVar::Set("rc_sys", "prefix"),
        RcVar::Set("rc_provide", "loopback net"),
    ],
    inittab: Inittab::Keep,
    localmount_drop: None,
    interfaces: false,
    runlevels: &[],
    files: &[(WSL_START, 0o755, WSL_START_SH)],
    devices: false,
};

/// What the official LXD/Incus Alpine images do (REFERENCE §5).
pub const LXD: Profile = Profile {
    target: "lxd",
    rc_conf: &[RcVar::Set("rc_sys", "lxc")],
    inittab: Inittab::ConsoleOnly,
    localmount_drop: Some("-lxc"),
    interfaces: true,
    runlevels: &[
        ("boot", &["bootmisc", "syslog", "devfs"]),
        ("default", &["networking", "crond"]),
    ],
    files: &[],
    devices: false,
};

/// What alpine-make-vm-image and d2vm do for a BIOS-booted VM (REFERENCE §6), plus growing the
/// root to the disk's size at every boot (a no-op unless the disk was enlarged).
pub const VM: Profile = Profile {
    target: "vm",
    rc_conf: &[RcVar::Unset("rc_sys")],
    inittab: Inittab::Serial,
    localmount_drop: None,
    interfaces: true,
    runlevels: &[
        // The device manager comes from `devices` (DEVICE_MANAGERS).
        ("sysinit", &["devfs", "dmesg"]),
        (
            "boot",
            &[
                "bootmisc",
                "hostname",
                "hwclock",
                "modules",
                "networking",
                "swap",
                "sysctl",
                // urandom was renamed seedrng in Alpine 3.17.
                "seedrng|urandom",
                "syslog",
                GROWROOT_SERVICE,
            ],
        ),
        ("shutdown", &["killprocs", "mount-ro", "savecache"]),
    ],
    files: &[
        ("etc/init.d/abox-growroot", 0o755, GROWROOT_SERVICE_SH),
        (GROWROOT, 0o755, GROWROOT_SH),
    ],
    devices: true,
};

const WSL_START_SH: &str = r#"#!/bin/sh
# Written by alpine-boxes: starts OpenRC's default runlevel inside WSL. /etc/wsl.conf runs it as
# root when the distribution starts ([boot] command); run it again by hand (as root) after
# adding a service with rc-update. rc_sys="prefix" in /etc/rc.conf keeps OpenRC away from the
# mounts, devices and network that WSL owns. Services stop when WSL stops the distribution.
set -u
mkdir -p /run/openrc
[ -e /run/openrc/softlevel ] || touch /run/openrc/softlevel
exec /sbin/openrc default
"#;

const GROWROOT_SERVICE_SH: &str = r#"#!/sbin/openrc-run
# Written by alpine-boxes: grows the root partition and its filesystem to the end of the disk.

description="Grow the root partition and filesystem to the disk's size"

depend() {
	need root
	before localmount
	keyword -docker -jail -lxc -openvz -podman -prefix -systemd-nspawn -vserver
}

start() {
	ebegin "Growing the root filesystem to the disk's size"
	/usr/lib/alpine-boxes/growroot
	eend $?
}
"#;

const GROWROOT_SH: &str = r#"#!/bin/sh
# Written by alpine-boxes: grow the partition that holds / to the end of its disk, then the
# ext4 filesystem to the partition (online). Safe to run at every boot: with no room left it
# changes nothing. Needs growpart (cloud-utils-growpart), sfdisk and resize2fs
# (e2fsprogs-extra).
set -u
say() { echo "growroot: $*"; }
for tool in growpart resize2fs; do
	command -v "$tool" >/dev/null 2>&1 || { say "$tool is not installed, not growing"; exit 0; }
done
# The root's device by number (without an initramfs /proc/mounts calls it /dev/root).
majmin=$(awk '$5 == "/" { m = $3 } END { print m }' /proc/self/mountinfo)
[ -n "$majmin" ] || { say "cannot tell the root's device"; exit 1; }
sys=$(readlink -f "/sys/dev/block/$majmin")
name=${sys##*/}
if [ ! -r "$sys/partition" ]; then
	say "/dev/$name is not a partition, nothing to grow"
	exit 0
fi
part=$(cat "$sys/partition")
disk=$(readlink -f "$sys/..")
disk=/dev/${disk##*/}
[ -b "/dev/$name" ] || mknod "/dev/$name" b "${majmin%%:*}" "${majmin##*:}"
out=$(growpart "$disk" "$part" 2>&1)
case $? in
0) say "$out" ;;
1) ;; # NOCHANGE: the partition already ends at the disk's end
*) say "growpart $disk $part failed: $out"; exit 1 ;;
esac
out=$(resize2fs "/dev/$name" 2>&1) || { say "resize2fs /dev/$name failed: $out"; exit 1; }
case $out in *"Nothing to do"*) ;; *) say "$out" ;; esac
exit 0
"#;

/// `/etc/network/interfaces` for a container or VM with one NIC on DHCP.
pub const INTERFACES: &str = "# Written by alpine-boxes.\n\
auto lo\n\
iface lo inet loopback\n\
\n\
auto eth0\n\
iface eth0 inet dhcp\n";

/// `/etc/network/interfaces` that brings the network up at boot, as Alpine's networking service
/// does (ifupdown-ng: `ifup -a` brings up the `auto` interfaces). `existing` is kept (CRLF made
/// LF, a final newline added) when it marks an interface other than `lo` `auto`, or sources
/// files that exist (`exists`, a path of the image); a `source` of a missing path (ifupdown-ng
/// then fails to parse the whole file) is commented out; an `iface` that no `auto` line names
/// gets one (eth0 first); with no interface at all, `lo` when missing and eth0 on DHCP are
/// appended. Empty or comments only: [`INTERFACES`].
pub fn interfaces(existing: &str, exists: &dyn Fn(&str) -> bool) -> String {
    let mut lines = lines_of(existing);
    let (mut lo, mut auto, mut sourced, mut active) = (false, false, false, false);
    let mut ifaces: Vec<String> = Vec::new();
    for l in lines.iter_mut() {
        let words: Vec<&str> = l.split_whitespace().collect();
        let Some(first) = words.first().filter(|f| !f.starts_with('#')) else {
            continue;
        };
        active = true;
        match *first {
            "iface" | "interface" => match words.get(1) {
                Some(&"lo") => lo = true,
                Some(name) => ifaces.push(name.to_string()),
                None => {}
            },
            "auto" | "allow-auto" => auto |= words[1..].iter().any(|n| *n != "lo"),
            "source" | "source-directory" | "source-dir" => {
                let Some(target) = words.get(1) else { continue };
                // A pattern names what is in its folder.
                let dir_of = |t: &str| {
                    t.rsplit_once('/')
                        .map(|(d, _)| d.to_string())
                        .unwrap_or_default()
                };
                let probe = if target.contains(['*', '?', '[']) {
                    dir_of(target)
                } else {
                    target.to_string()
                };
                if exists(&probe) {
                    sourced = true;
                } else if *first == "source" {
                    *l = format!("# alpine-boxes: the image has no {target}: {l}");
                }
            }
            _ => {}
        }
    }
    if !active {
        return INTERFACES.to_string();
    }
    let mut out = join(lines);
    if sourced || auto {
        return out;
    }
    if let Some(name) = ifaces
        .iter()
        .find(|n| *n == "eth0")
        .or_else(|| ifaces.first())
    {
        out.push_str(&format!(
            "\n# Added by alpine-boxes: no interface came up at boot.\nauto {name}\n"
        ));
        return out;
    }
    if !lo {
        out.push_str("\nauto lo\niface lo inet loopback\n");
    }
    out.push_str("\n# Added by alpine-boxes: no interface was configured.\nauto eth0\niface eth0 inet dhcp\n");
    out
}

const RESOLV_CONF: &str = "etc/resolv.conf";
const INTERFACES_PATH: &str = "etc/network/interfaces";

/// What replaces a `/etc/resolv.conf` symlink that leads nowhere in the image (into a `/run`
/// that is empty at boot, or a file the image lacks): the DHCP client's script writes through
/// the link, so it would fail and the guest would have no DNS.
pub const RESOLV_CONF_FRESH: &str =
    "# Written by alpine-boxes: the image's /etc/resolv.conf was a symlink to \
nothing; the DHCP client fills this file at boot.\n";

/// Alpine's `/etc/inittab` (alpine-baselayout), for an OpenRC image without a working one.
pub const ALPINE_INITTAB: &str = "# /etc/inittab (Alpine's, written by alpine-boxes)\n\
\n\
::sysinit:/sbin/openrc sysinit\n\
::sysinit:/sbin/openrc boot\n\
::wait:/sbin/openrc default\n\
\n\
# Set up a couple of getty's\n\
tty1::respawn:/sbin/getty 38400 tty1\n\
tty2::respawn:/sbin/getty 38400 tty2\n\
tty3::respawn:/sbin/getty 38400 tty3\n\
tty4::respawn:/sbin/getty 38400 tty4\n\
tty5::respawn:/sbin/getty 38400 tty5\n\
tty6::respawn:/sbin/getty 38400 tty6\n\
\n\
# Put a getty on the serial port\n\
#ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100\n\
\n\
# Stuff to do for the 3-finger salute\n\
::ctrlaltdel:/sbin/reboot\n\
\n\
# Stuff to do before rebooting\n\
::shutdown:/sbin/openrc shutdown\n";

/// The getty a VM gets on its first serial port (the console abox's extlinux.conf sets).
pub const SERIAL_GETTY: &str = "ttyS0::respawn:/sbin/getty -L ttyS0 115200 vt100";
/// The one getty of a container.
pub const CONSOLE_GETTY: &str = "::respawn:/sbin/getty 38400 console";

/// Apply `/etc/rc.conf` changes.
pub fn rc_conf(text: &str, vars: &[RcVar]) -> String {
    let mut lines = lines_of(text);
    let key_of = |l: &str| -> Option<(bool, String)> {
        let t = l.trim_start();
        let (commented, t) = match t.strip_prefix('#') {
            Some(rest) => (true, rest),
            None => (false, t),
        };
        let (k, _) = t.split_once('=')?;
        let k = k.trim_end();
        (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .then(|| (commented, k.to_string()))
    };
    for v in vars {
        match *v {
            RcVar::Set(key, value) => {
                let line = format!("{key}=\"{value}\"");
                let active: Vec<usize> = (0..lines.len())
                    .filter(|&i| key_of(&lines[i]) == Some((false, key.to_string())))
                    .collect();
                if let Some((&first, rest)) = active.split_first() {
                    lines[first] = line;
                    // A later assignment would win over ours.
                    for &i in rest {
                        lines[i] = format!("#{}", lines[i]);
                    }
                } else if let Some(i) =
                    (0..lines.len()).find(|&i| key_of(&lines[i]) == Some((true, key.to_string())))
                {
                    lines[i] = line;
                } else {
                    lines.push(line);
                }
            }
            RcVar::Unset(key) => {
                for l in lines.iter_mut() {
                    if key_of(l) == Some((false, key.to_string())) {
                        *l = format!("#{l}");
                    }
                }
            }
        }
    }
    join(lines)
}

/// The lines of a text file, CRLF line ends taken as LF (the shell would keep the CR in a value).
fn lines_of(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect()
}

fn join(lines: Vec<String>) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// The fields of an active inittab line: (id, action, process).
fn inittab_fields(l: &str) -> Option<(&str, &str, &str)> {
    if l.trim_start().starts_with('#') {
        return None;
    }
    let mut f = l.splitn(4, ':');
    let id = f.next()?;
    let _runlevels = f.next()?;
    let action = f.next()?;
    let process = f.next()?;
    Some((id, action, process))
}

fn is_getty(process: &str) -> bool {
    process
        .split_whitespace()
        .next()
        .is_some_and(|p| p.ends_with("getty"))
}

/// Rewrite `/etc/inittab`'s gettys (CRLF line ends made LF: busybox init would run
/// `getty\r`). One with no active line would start nothing (busybox init then runs no OpenRC):
/// Alpine's own ([`ALPINE_INITTAB`]) is used instead.
pub fn inittab(text: &str, mode: Inittab) -> String {
    if mode == Inittab::Keep {
        return text.to_string();
    }
    let owned = lines_of(text);
    let owned = if owned.iter().any(|l| inittab_fields(l).is_some()) {
        owned
    } else {
        lines_of(ALPINE_INITTAB)
    };
    let lines: Vec<&str> = owned.iter().map(String::as_str).collect();
    match mode {
        Inittab::Keep => unreachable!("returned above"),
        Inittab::ConsoleOnly => {
            let has_console = lines.iter().any(|l| {
                inittab_fields(l).is_some_and(|(id, a, p)| {
                    is_getty(p) && a == "respawn" && (id.is_empty() || id == "console")
                })
            });
            let mut out = Vec::new();
            let mut placed = has_console;
            for l in lines {
                match inittab_fields(l) {
                    Some((id, _, p)) if is_getty(p) && !id.is_empty() && id != "console" => {
                        if !placed {
                            out.push(CONSOLE_GETTY.to_string());
                            placed = true;
                        }
                    }
                    _ => out.push(l.to_string()),
                }
            }
            if !placed {
                out.push(CONSOLE_GETTY.to_string());
            }
            join(out)
        }
        Inittab::Serial => {
            if lines
                .iter()
                .any(|l| inittab_fields(l).is_some_and(|(id, _, p)| id == "ttyS0" && is_getty(p)))
            {
                return join(owned);
            }
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            // Where Alpine keeps it commented out, else after the last getty, else at the end.
            let commented = lines.iter().position(|l| {
                l.trim_start()
                    .strip_prefix('#')
                    .and_then(inittab_fields)
                    .is_some_and(|(id, _, p)| id == "ttyS0" && is_getty(p))
            });
            match commented {
                Some(i) => out[i] = SERIAL_GETTY.to_string(),
                None => {
                    let at = lines
                        .iter()
                        .rposition(|l| inittab_fields(l).is_some_and(|(_, _, p)| is_getty(p)))
                        .map(|i| i + 1)
                        .unwrap_or(out.len());
                    out.insert(at, SERIAL_GETTY.to_string());
                }
            }
            join(out)
        }
    }
}

/// Remove one keyword from an OpenRC service script's `keyword` lines.
pub fn drop_keyword(script: &str, keyword: &str) -> String {
    let mut out = Vec::new();
    for l in &lines_of(script) {
        let t = l.trim_start();
        if t.split_whitespace().next() == Some("keyword") {
            let indent = &l[..l.len() - t.len()];
            let words: Vec<&str> = t.split_whitespace().filter(|w| *w != keyword).collect();
            if words.len() > 1 {
                out.push(format!("{indent}{}", words.join(" ")));
            }
        } else {
            out.push(l.to_string());
        }
    }
    join(out)
}

impl Profile {
    /// Whether this profile changes `path`.
    pub fn rewrites(&self, path: &str) -> bool {
        match path {
            "etc/rc.conf" => !self.rc_conf.is_empty(),
            "etc/inittab" => self.inittab != Inittab::Keep,
            "etc/init.d/localmount" => self.localmount_drop.is_some(),
            "etc/network/interfaces" => self.interfaces,
            _ => false,
        }
    }

    /// Whether this profile writes `path` when the image has no regular file there.
    fn adds(&self, path: &str) -> bool {
        match path {
            "etc/rc.conf" | "etc/inittab" | "etc/network/interfaces" => self.rewrites(path),
            VM_DRIVERS_CONF => self.devices,
            _ => self.files.iter().any(|(p, _, _)| *p == path),
        }
    }

    /// The rewritten text of `path`, when this profile changes that file.
    pub fn rewrite(&self, path: &str, text: &str) -> Option<String> {
        if !self.rewrites(path) {
            return None;
        }
        Some(match path {
            "etc/rc.conf" => rc_conf(text, self.rc_conf),
            "etc/inittab" => inittab(text, self.inittab),
            // Sourced files are trusted here; OpenRc::rewrite checks them against the image.
            "etc/network/interfaces" => interfaces(text, &|_| true),
            _ => drop_keyword(text, self.localmount_drop?),
        })
    }
}

/// A profile applied to one rootfs stream: it watches every path go by (which services and
/// runlevel links the image has), rewrites its files, and adds what is missing at the end.
pub struct OpenRc {
    profile: &'static Profile,
    active: bool,
    services: BTreeSet<String>,
    links: BTreeSet<String>,
    present: BTreeSet<String>,
    /// [`VM_DRIVERS`] the image's kernel has as module files (known from the tree).
    drivers: Vec<String>,
    /// `/etc/resolv.conf` is a symlink that leads nowhere in the image (DHCP could not write it).
    resolv_dangling: bool,
    /// `/etc/network/interfaces` is a symlink to a regular file of the image: kept as it is.
    interfaces_link: bool,
    /// The paths under `etc/` (what `source` lines of interfaces may name), when the tree is known.
    etc_paths: Option<BTreeSet<String>>,
    notes: Vec<String>,
}

impl OpenRc {
    pub fn new(profile: &'static Profile) -> Self {
        Self {
            profile,
            active: false,
            services: BTreeSet::new(),
            links: BTreeSet::new(),
            present: BTreeSet::new(),
            drivers: Vec::new(),
            resolv_dangling: false,
            interfaces_link: false,
            etc_paths: None,
            notes: Vec::new(),
        }
    }

    /// OpenRC images are the ones with `/etc/rc.conf` or `/sbin/openrc`; with the `tree`, the
    /// services, runlevel links and kernel modules the image has are known before its entries
    /// go by (else they are learnt from the entries, and no driver list is written).
    pub fn start(&mut self, facts: &Facts, tree: Option<&Tree>) {
        self.active = facts.files.contains_key("etc/rc.conf") || tree.is_some_and(is_openrc);
        let Some(tree) = tree else {
            return;
        };
        for (path, e) in &tree.entries {
            if let Some(svc) = path.strip_prefix("etc/init.d/") {
                if !svc.contains('/') && !matches!(e.node, Node::Dir(_)) {
                    self.services.insert(svc.to_string());
                }
            }
            if let Some(link) = path.strip_prefix("etc/runlevels/") {
                if link.contains('/') {
                    self.links.insert(link.to_string());
                }
            }
        }
        if self.profile.interfaces {
            let is_link = |p: &str| {
                tree.inode_at(p)
                    .is_some_and(|i| matches!(i.meta.kind, Kind::Symlink(_)))
            };
            // Into /run counts as nowhere: it is an empty tmpfs at boot.
            let lands = |p: &str| {
                tree.resolve(p)
                    .filter(|r| !r.starts_with("run/"))
                    .and_then(|r| tree.inode_at(&r).map(|i| i.meta.kind == Kind::File))
                    .unwrap_or(false)
            };
            self.resolv_dangling = is_link(RESOLV_CONF) && !lands(RESOLV_CONF);
            self.interfaces_link = is_link(INTERFACES_PATH) && lands(INTERFACES_PATH);
            self.etc_paths = Some(
                tree.entries
                    .range("etc/".to_string().."etc0".to_string())
                    .map(|(p, _)| p.clone())
                    .collect(),
            );
        }
        if self.profile.devices {
            self.drivers = drivers_in(tree);
            if self.active && self.device_manager().is_none() && !self.drivers.is_empty() {
                let list = if tree.inode_at(VM_DRIVERS_CONF).is_some() {
                    "the image's own list, kept".to_string()
                } else {
                    self.drivers.join(", ")
                };
                self.notes.push(format!(
                    "the image has no device manager (busybox-mdev-openrc, mdevd-openrc or \
                     eudev-openrc): the VM loads its NIC and disk drivers from \
                     /{VM_DRIVERS_CONF} ({list}) instead of hwdrivers"
                ));
            }
        }
    }

    /// Whether the image is an OpenRC one (known after [`OpenRc::start`]).
    pub fn active(&self) -> bool {
        self.active
    }

    /// What the profile did that a user should know (a VM without a device manager).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The action for `path` when the profile rewrites it; records what the image has.
    pub fn action(&mut self, path: &str, meta: &Meta) -> Option<Action> {
        if !self.active {
            return None;
        }
        if let Some(svc) = path.strip_prefix("etc/init.d/") {
            if !svc.contains('/') && meta.kind != Kind::Dir {
                self.services.insert(svc.to_string());
            }
        }
        if let Some(link) = path.strip_prefix("etc/runlevels/") {
            if link.contains('/') {
                self.links.insert(link.to_string());
            }
        }
        if path == RESOLV_CONF && self.resolv_dangling {
            return Some(Action::Drop);
        }
        if path == INTERFACES_PATH && self.interfaces_link {
            self.present.insert(path.to_string());
            return None;
        }
        let rewrites = self.profile.rewrites(path);
        // A file abox rewrites or adds counts as present only as a regular file: anything else
        // there is dropped by the stream, and the file is then written afresh.
        if self.profile.adds(path) && (!rewrites || meta.kind == Kind::File) {
            self.present.insert(path.to_string());
        }
        rewrites.then_some(Action::Rewrite)
    }

    pub fn rewrite(&self, path: &str, data: &[u8]) -> Option<Vec<u8>> {
        if !self.active {
            return None;
        }
        let text = std::str::from_utf8(data).ok()?;
        if path == INTERFACES_PATH && self.profile.interfaces {
            // A path outside /etc, or an unknown tree, is trusted.
            let exists = |p: &str| {
                let rel = p.trim_start_matches('/').trim_end_matches('/');
                match (&self.etc_paths, rel.starts_with("etc/")) {
                    (Some(set), true) => set.contains(rel),
                    _ => true,
                }
            };
            return Some(interfaces(text, &exists).into_bytes());
        }
        self.profile.rewrite(path, text).map(String::into_bytes)
    }

    /// The device manager the VM runs: one the image links already, else the first it has.
    fn device_manager(
        &self,
    ) -> Option<&'static (&'static str, &'static [(&'static str, &'static str)])> {
        let linked = |svc: &str| self.links.iter().any(|l| l.ends_with(&format!("/{svc}")));
        DEVICE_MANAGERS
            .iter()
            .find(|(svc, _)| linked(svc))
            .or_else(|| {
                DEVICE_MANAGERS
                    .iter()
                    .find(|(svc, _)| self.services.contains(*svc))
            })
    }

    /// Files and runlevel links to add after the image's own entries.
    pub fn extras(&mut self, mtime: u64) -> Vec<Extra> {
        if !self.active {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut services = self.services.clone();
        for (path, mode, content) in self.profile.files {
            if !self.present.contains(*path) {
                out.push(Extra::file(path, *mode, content.as_bytes().to_vec(), mtime));
                if let Some(svc) = path.strip_prefix("etc/init.d/") {
                    services.insert(svc.to_string());
                }
            }
        }
        if self.profile.interfaces && !self.present.contains("etc/network/interfaces") {
            out.push(Extra::file(
                "etc/network/interfaces",
                0o644,
                INTERFACES.as_bytes().to_vec(),
                mtime,
            ));
        }
        if self.resolv_dangling {
            out.push(Extra::file(
                RESOLV_CONF,
                0o644,
                RESOLV_CONF_FRESH.as_bytes().to_vec(),
                mtime,
            ));
        }
        if self.profile.rewrites("etc/rc.conf") && !self.present.contains("etc/rc.conf") {
            let text = rc_conf("", self.profile.rc_conf);
            if text.lines().any(|l| !l.starts_with('#') && !l.is_empty()) {
                out.push(Extra::file("etc/rc.conf", 0o644, text.into_bytes(), mtime));
            }
        }
        if self.profile.rewrites("etc/inittab") && !self.present.contains("etc/inittab") {
            let text = inittab(ALPINE_INITTAB, self.profile.inittab);
            out.push(Extra::file("etc/inittab", 0o644, text.into_bytes(), mtime));
        }
        let mut wanted: Vec<(&str, &str)> = Vec::new();
        for (level, names) in self.profile.runlevels {
            for alternatives in *names {
                if let Some(svc) = alternatives.split('|').find(|s| services.contains(*s)) {
                    wanted.push((level, svc));
                }
            }
        }
        if self.profile.devices {
            match self.device_manager() {
                Some((_, links)) => {
                    wanted.extend(links.iter().filter(|(_, s)| services.contains(*s)))
                }
                None if !self.drivers.is_empty() => {
                    if !self.present.contains(VM_DRIVERS_CONF) {
                        let mut text = String::from(
                            "# Written by alpine-boxes: the image has no device manager (mdev, mdevd or\n\
                             # udev) to load drivers, so OpenRC's modules service loads the VM's NIC and\n\
                             # disk drivers from this list. Installing busybox-mdev-openrc makes it unneeded.\n",
                        );
                        for d in &self.drivers {
                            text.push_str(d);
                            text.push('\n');
                        }
                        out.push(Extra::file(
                            VM_DRIVERS_CONF,
                            0o644,
                            text.into_bytes(),
                            mtime,
                        ));
                    }
                    if services.contains("modules") {
                        wanted.push(("boot", "modules"));
                    }
                }
                None => {}
            }
        }
        let mut linked = BTreeSet::new();
        for (level, svc) in wanted {
            if self.links.contains(&format!("{level}/{svc}")) || !linked.insert((level, svc)) {
                continue;
            }
            out.push(Extra::symlink(
                &format!("etc/runlevels/{level}/{svc}"),
                &format!("/etc/init.d/{svc}"),
                mtime,
            ));
        }
        out
    }
}

/// Whether the image runs OpenRC: it has `/etc/rc.conf` or `/sbin/openrc`.
pub fn is_openrc(tree: &Tree) -> bool {
    ["etc/rc.conf", "sbin/openrc"]
        .iter()
        .any(|p| tree.resolve(p).is_some())
}

/// The [`VM_DRIVERS`] the tree has as module files (`lib/modules/VERSION/…/NAME.ko[.gz|.xz|.zst]`,
/// `usr/lib/modules` too), in [`VM_DRIVERS`]' order.
fn drivers_in(tree: &Tree) -> Vec<String> {
    let mut found = BTreeSet::new();
    for root in ["lib/modules", "usr/lib/modules"] {
        let Some(real) = tree.resolve(root) else {
            continue;
        };
        let from = format!("{real}/");
        for (path, e) in tree.entries.range(from.clone()..) {
            let Some(rest) = path.strip_prefix(&from) else {
                break;
            };
            if matches!(e.node, Node::Dir(_)) {
                continue;
            }
            let name = rest.rsplit('/').next().unwrap_or(rest);
            let Some(stem) = [".ko", ".ko.gz", ".ko.xz", ".ko.zst"]
                .iter()
                .find_map(|x| name.strip_suffix(x))
            else {
                continue;
            };
            found.insert(stem.replace('-', "_"));
        }
    }
    VM_DRIVERS
        .iter()
        .filter(|d| found.contains(**d))
        .map(|d| d.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openrc")
    }

    /// Every input fixture through every profile: the expected file when the target has one,
    /// else the input unchanged.
    #[test]
    fn profiles_turn_the_alpine_fixtures_into_the_expected_files() {
        let input = fixtures().join("input");
        let files = [
            "etc/rc.conf",
            "etc/inittab",
            "etc/init.d/localmount",
            "etc/os-release",
        ];
        for p in [&WSL, &LXD, &VM] {
            for f in files {
                let text = std::fs::read_to_string(input.join(f)).unwrap();
                let expected_file = fixtures().join(p.target).join(f);
                let expected = std::fs::read_to_string(&expected_file).unwrap_or(text.clone());
                let got = p.rewrite(f, &text).unwrap_or(text.clone());
                assert_eq!(got, expected, "{} {f}", p.target);
                // A second pass changes nothing (the targets may see fixed-up images).
                let again = p.rewrite(f, &got).unwrap_or(got.clone());
                assert_eq!(again, got, "{} {f} twice", p.target);
            }
        }
    }

    #[test]
    fn rc_conf_variables() {
        let set = [RcVar::Set("rc_sys", "lxc")];
        assert_eq!(rc_conf("rc_sys=\"docker\"\n", &set), "rc_sys=\"lxc\"\n");
        assert_eq!(
            rc_conf("#rc_sys=\"\"\nrc_sys=docker\nrc_sys=\"x\"\n", &set),
            "#rc_sys=\"\"\nrc_sys=\"lxc\"\n#rc_sys=\"x\"\n"
        );
        assert_eq!(rc_conf("a=1", &set), "a=1\nrc_sys=\"lxc\"\n");
        assert_eq!(rc_conf("", &set), "rc_sys=\"lxc\"\n");
        let unset = [RcVar::Unset("rc_sys")];
        assert_eq!(
            rc_conf("rc_sys=\"docker\"\n# rc_sys is\n", &unset),
            "#rc_sys=\"docker\"\n# rc_sys is\n"
        );
        // A key that merely starts with another is not it.
        assert_eq!(rc_conf("rc_system=1\n", &unset), "rc_system=1\n");
    }

    #[test]
    fn inittab_gettys() {
        let t = "::sysinit:/sbin/openrc sysinit\ntty1::respawn:/sbin/getty 38400 tty1\n::shutdown:/sbin/openrc shutdown\n";
        assert_eq!(
            inittab(t, Inittab::ConsoleOnly),
            "::sysinit:/sbin/openrc sysinit\n::respawn:/sbin/getty 38400 console\n::shutdown:/sbin/openrc shutdown\n"
        );
        assert_eq!(
            inittab(t, Inittab::Serial),
            format!("::sysinit:/sbin/openrc sysinit\ntty1::respawn:/sbin/getty 38400 tty1\n{SERIAL_GETTY}\n::shutdown:/sbin/openrc shutdown\n")
        );
        let with_serial = "ttyS0::respawn:/sbin/agetty -L ttyS0 9600\n";
        assert_eq!(inittab(with_serial, Inittab::Serial), with_serial);
        assert_eq!(
            inittab("::sysinit:/x\n", Inittab::ConsoleOnly),
            format!("::sysinit:/x\n{CONSOLE_GETTY}\n")
        );
    }

    #[test]
    fn keywords() {
        assert_eq!(
            drop_keyword("depend() {\n\tkeyword -docker -lxc -prefix\n}\n", "-lxc"),
            "depend() {\n\tkeyword -docker -prefix\n}\n"
        );
        assert_eq!(
            drop_keyword("depend() {\n\tkeyword -lxc\n}\n", "-lxc"),
            "depend() {\n}\n"
        );
        assert_eq!(drop_keyword("# keyword -lxc\n", "-lxc"), "# keyword -lxc\n");
    }

    fn facts_with_rc_conf() -> Facts {
        let mut f = Facts::default();
        f.files
            .insert("etc/rc.conf".into(), b"#rc_sys=\"\"\n".to_vec());
        f
    }

    fn walk(o: &mut OpenRc, paths: &[&str]) {
        for p in paths {
            o.action(p, &Meta::new(Kind::File, 0o755, 0, 0));
        }
    }

    #[test]
    fn runlevel_links_for_services_the_image_has() {
        let mut o = OpenRc::new(&VM);
        o.start(&facts_with_rc_conf(), None);
        walk(
            &mut o,
            &[
                "etc/init.d/devfs",
                "etc/init.d/urandom",
                "etc/init.d/networking",
                "etc/runlevels/boot/networking",
                "etc/network/interfaces",
            ],
        );
        let extras = o.extras(7);
        let links: Vec<(String, Kind)> = extras
            .iter()
            .filter(|e| e.path.starts_with("etc/runlevels/"))
            .map(|e| (e.path.clone(), e.meta.kind.clone()))
            .collect();
        assert_eq!(
            links,
            vec![
                (
                    "etc/runlevels/sysinit/devfs".into(),
                    Kind::Symlink("/etc/init.d/devfs".into())
                ),
                (
                    "etc/runlevels/boot/urandom".into(),
                    Kind::Symlink("/etc/init.d/urandom".into())
                ),
                (
                    "etc/runlevels/boot/abox-growroot".into(),
                    Kind::Symlink("/etc/init.d/abox-growroot".into())
                ),
            ]
        );
        // The image's own interfaces file stays; the growroot files are added.
        assert!(!extras.iter().any(|e| e.path == "etc/network/interfaces"));
        assert!(extras
            .iter()
            .any(|e| e.path == GROWROOT && e.meta.mode == 0o755));
    }

    #[test]
    fn images_without_openrc_are_left_alone() {
        let mut o = OpenRc::new(&LXD);
        o.start(&Facts::default(), None);
        walk(&mut o, &["etc/init.d/networking", "etc/inittab"]);
        assert!(o
            .action("etc/inittab", &Meta::new(Kind::File, 0o644, 0, 0))
            .is_none());
        assert!(o.extras(0).is_empty());
        assert!(o
            .rewrite("etc/inittab", b"tty1::respawn:/sbin/getty 38400 tty1\n")
            .is_none());
    }

    /// A tree of `paths` (files; `name -> target` symlinks), parents implied.
    fn tree(paths: &[&str]) -> Tree {
        use crate::flatten::index::Op;
        let ops = paths
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (path, kind) = match p.split_once(" -> ") {
                    Some((p, t)) => (p, Kind::Symlink(t.into())),
                    None => (*p, Kind::File),
                };
                Op::Put {
                    ordinal: i as u32,
                    path: path.into(),
                    meta: Meta::new(kind, 0o644, 0, 0),
                }
            })
            .collect();
        let mut t = Tree::default();
        t.apply(0, ops).unwrap();
        t
    }

    fn links_of(extras: &[Extra]) -> Vec<String> {
        extras
            .iter()
            .filter(|e| e.path.starts_with("etc/runlevels/"))
            .map(|e| e.path.clone())
            .collect()
    }

    const KERNEL: &[&str] = &[
        "lib -> usr/lib",
        "usr/lib/modules/6.18.56-0-virt/kernel/drivers/net/virtio_net.ko.gz",
        "usr/lib/modules/6.18.56-0-virt/kernel/drivers/net/ethernet/intel/e1000/e1000.ko.xz",
        "usr/lib/modules/6.18.56-0-virt/kernel/drivers/scsi/sd_mod.ko",
        "usr/lib/modules/6.18.56-0-virt/kernel/drivers/scsi/hv-storvsc.ko.zst",
        "usr/lib/modules/6.18.56-0-virt/kernel/fs/isofs/isofs.ko.gz",
        "usr/lib/modules/6.18.56-0-virt/modules.builtin",
    ];

    /// An image with no device manager (real Alpine's quicksand image is one): hwdrivers is not
    /// linked (it needs `dev`), the drivers the kernel has as modules are listed for the
    /// modules service, which is linked, and a note says so.
    #[test]
    fn a_vm_without_a_device_manager_loads_its_drivers_from_modules_load_d() {
        let mut paths = vec![
            "sbin/openrc",
            "etc/init.d/devfs",
            "etc/init.d/hwdrivers",
            "etc/init.d/modules",
        ];
        paths.extend(KERNEL);
        let t = tree(&paths);
        let mut o = OpenRc::new(&VM);
        o.start(&Facts::default(), Some(&t));
        assert!(o.active(), "sbin/openrc without rc.conf is OpenRC");
        assert_eq!(o.notes().len(), 1, "{:?}", o.notes());
        assert!(o.notes()[0].contains("virtio_net, e1000, sd_mod, hv_storvsc"));
        let extras = o.extras(0);
        let links = links_of(&extras);
        assert!(links.contains(&"etc/runlevels/boot/modules".to_string()));
        assert!(
            !links.iter().any(|l| l.ends_with("/hwdrivers")),
            "{links:?}"
        );
        let conf = extras.iter().find(|e| e.path == VM_DRIVERS_CONF).unwrap();
        let text = String::from_utf8(conf.data.clone()).unwrap();
        let listed: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(listed, ["virtio_net", "e1000", "sd_mod", "hv_storvsc"]);
        // No rc.conf: one is not needed for a VM (nothing to set), inittab is Alpine's.
        assert!(!extras.iter().any(|e| e.path == "etc/rc.conf"));
        let inittab = extras.iter().find(|e| e.path == "etc/inittab").unwrap();
        let inittab = String::from_utf8(inittab.data.clone()).unwrap();
        assert!(inittab.contains("::sysinit:/sbin/openrc sysinit\n"));
        assert!(inittab.contains(SERIAL_GETTY));
    }

    /// With a device manager the VM runs it the way `setup-devd` links it, and no list.
    #[test]
    fn a_vm_runs_the_device_manager_the_image_has() {
        for (manager, want, not) in [
            (
                vec!["etc/init.d/mdev"],
                vec!["sysinit/mdev", "sysinit/hwdrivers"],
                "udev",
            ),
            (
                vec!["etc/init.d/mdevd", "etc/init.d/mdevd-init"],
                vec!["sysinit/mdevd-init", "sysinit/mdevd", "sysinit/hwdrivers"],
                "mdev",
            ),
            (
                vec![
                    "etc/init.d/udev",
                    "etc/init.d/udev-trigger",
                    "etc/init.d/udev-settle",
                    "etc/init.d/udev-postmount",
                    // mdev too, but udev is the one the image links.
                    "etc/init.d/mdev",
                    "etc/runlevels/sysinit/udev -> /etc/init.d/udev",
                ],
                vec![
                    "sysinit/udev-trigger",
                    "sysinit/udev-settle",
                    "default/udev-postmount",
                ],
                "hwdrivers",
            ),
        ] {
            let mut paths = vec!["etc/init.d/hwdrivers", "etc/init.d/modules"];
            paths.extend(manager.iter().copied());
            paths.extend(KERNEL);
            let t = tree(&paths);
            let mut o = OpenRc::new(&VM);
            o.start(&facts_with_rc_conf(), Some(&t));
            assert!(o.notes().is_empty());
            let extras = o.extras(0);
            let links = links_of(&extras);
            for w in &want {
                assert!(
                    links.contains(&format!("etc/runlevels/{w}")),
                    "{w}: {links:?}"
                );
            }
            assert!(
                !links.iter().any(|l| l.ends_with(&format!("/{not}"))),
                "{links:?}"
            );
            assert!(!extras.iter().any(|e| e.path == VM_DRIVERS_CONF));
        }
    }

    #[test]
    fn a_resolv_conf_link_to_nothing_becomes_a_file() {
        for (paths, replaced) in [
            (
                vec![
                    "sbin/openrc",
                    "etc/resolv.conf -> /run/resolvconf/resolv.conf",
                ],
                true,
            ),
            (
                vec![
                    "sbin/openrc",
                    "etc/resolv.conf -> ../var/lib/x",
                    "var/lib/x",
                ],
                false,
            ),
            // /run is an empty tmpfs at boot: a link there leads nowhere.
            (
                vec!["sbin/openrc", "etc/resolv.conf -> ../run/x", "run/x"],
                true,
            ),
            (vec!["sbin/openrc", "etc/resolv.conf"], false),
        ] {
            let t = tree(&paths);
            for p in [&VM, &LXD, &WSL] {
                let mut o = OpenRc::new(p);
                o.start(&Facts::default(), Some(&t));
                let link = Meta::new(Kind::Symlink("x".into()), 0o777, 0, 0);
                let dropped = matches!(o.action("etc/resolv.conf", &link), Some(Action::Drop));
                let written = o
                    .extras(0)
                    .iter()
                    .any(|e| e.path == "etc/resolv.conf" && e.meta.kind == Kind::File);
                // WSL writes resolv.conf itself: never touched there.
                let want = replaced && p.interfaces;
                assert_eq!((dropped, written), (want, want), "{} {paths:?}", p.target);
            }
        }
    }

    #[test]
    fn interfaces_always_bring_a_network_up() {
        let all = |_: &str| true;
        let fresh = interfaces("", &all);
        assert_eq!(fresh, INTERFACES);
        assert_eq!(interfaces("# comments only\n\n", &all), INTERFACES);
        // CRLF, no final newline, an auto eth0: kept, made LF.
        assert_eq!(
            interfaces(
                "auto eth0\r\niface eth0 inet static\r\n  address 10.0.0.2/24",
                &all
            ),
            "auto eth0\niface eth0 inet static\n  address 10.0.0.2/24\n"
        );
        // Only lo: eth0 on DHCP added.
        let lo_only = interfaces("auto lo\niface lo inet loopback", &all);
        assert!(lo_only.starts_with("auto lo\niface lo inet loopback\n\n"));
        assert!(lo_only.ends_with("auto eth0\niface eth0 inet dhcp\n"));
        assert_eq!(lo_only.matches("iface lo").count(), 1);
        // Nothing configured but a stray line: lo and eth0 added.
        let stray = interfaces("auto lo", &all);
        assert!(stray.contains("iface lo inet loopback") && stray.contains("iface eth0 inet dhcp"));
        // Configured but never brought up by `ifup -a` (hotplug only, or no auto): auto added.
        for text in [
            "allow-hotplug eth0\niface eth0 inet dhcp\n",
            "iface eth1 inet dhcp\niface eth0 inet dhcp\n",
        ] {
            let got = interfaces(text, &all);
            assert!(
                got.starts_with(text) && got.ends_with("\nauto eth0\n"),
                "{got}"
            );
            assert_eq!(got.matches("iface eth0").count(), 1, "{got}");
        }
        let bridge = "auto br0\niface br0 inet dhcp\n  bridge-ports eth0\n";
        assert_eq!(interfaces(bridge, &all), bridge);
        // Other files sourced: left to them when they exist; a missing `source` (ifupdown-ng
        // would not parse the file at all) is commented out and eth0 added.
        let sourced = "source-directory /etc/network/interfaces.d\n";
        assert_eq!(interfaces(sourced, &all), sourced);
        let only = |p: &str| p == "/etc/network/interfaces.d";
        let glob = "source /etc/network/interfaces.d/*\n";
        assert_eq!(interfaces(glob, &only), glob);
        let none = |_: &str| false;
        let got = interfaces(glob, &none);
        assert!(
            got.starts_with("# alpine-boxes: the image has no /etc/network/interfaces.d/*: source")
                && got.contains("iface eth0 inet dhcp"),
            "{got}"
        );
        assert_eq!(
            interfaces(&lo_only, &all),
            lo_only,
            "a second pass changes nothing"
        );
    }

    /// A symlinked interfaces that lands on a file of the image is the image's decision: kept.
    /// One that leads nowhere is replaced; a resolv.conf into /run is nowhere at boot.
    #[test]
    fn links_are_kept_when_they_land_on_a_file() {
        let t = tree(&[
            "sbin/openrc",
            "etc/network/interfaces -> interfaces.static",
            "etc/network/interfaces.static",
            "etc/resolv.conf -> ../run/resolvconf/resolv.conf",
            "run/resolvconf/resolv.conf",
        ]);
        let mut o = OpenRc::new(&VM);
        o.start(&Facts::default(), Some(&t));
        let link = Meta::new(Kind::Symlink("interfaces.static".into()), 0o777, 0, 0);
        assert!(o.action("etc/network/interfaces", &link).is_none(), "kept");
        let extras = o.extras(0);
        assert!(!extras.iter().any(|e| e.path == "etc/network/interfaces"));
        assert!(
            extras.iter().any(|e| e.path == "etc/resolv.conf"),
            "/run is empty at boot"
        );
        let t = tree(&["sbin/openrc", "etc/network/interfaces -> gone"]);
        let mut o = OpenRc::new(&LXD);
        o.start(&Facts::default(), Some(&t));
        assert!(matches!(
            o.action("etc/network/interfaces", &link),
            Some(Action::Rewrite)
        ));
        assert!(o
            .extras(0)
            .iter()
            .any(|e| e.path == "etc/network/interfaces"));
    }

    #[test]
    fn degenerate_inittabs_and_rc_confs_still_start_openrc() {
        for bad in ["", "# nothing\n", "\n\n"] {
            let got = inittab(bad, Inittab::Serial);
            assert!(got.starts_with("# /etc/inittab"), "{bad:?}: {got}");
            assert!(got.contains(SERIAL_GETTY) && got.contains("::wait:/sbin/openrc default"));
            assert!(inittab(bad, Inittab::ConsoleOnly).contains(CONSOLE_GETTY));
        }
        // CRLF: busybox init would run "getty\r".
        let crlf =
            "::sysinit:/sbin/openrc sysinit\r\nttyS0::respawn:/sbin/getty -L ttyS0 115200\r\n";
        assert_eq!(
            inittab(crlf, Inittab::Serial),
            "::sysinit:/sbin/openrc sysinit\nttyS0::respawn:/sbin/getty -L ttyS0 115200\n"
        );
        assert!(!inittab(crlf, Inittab::ConsoleOnly).contains('\r'));
        assert_eq!(
            rc_conf(
                "rc_parallel=\"YES\"\r\nrc_sys=\"docker\"\r\n",
                &[RcVar::Set("rc_sys", "lxc")]
            ),
            "rc_parallel=\"YES\"\nrc_sys=\"lxc\"\n"
        );
        assert_eq!(
            drop_keyword("depend() {\r\n\tkeyword -lxc -docker\r\n}", "-lxc"),
            "depend() {\n\tkeyword -docker\n}\n"
        );
        // No rc.conf: LXD and WSL write the variables they need.
        for (p, want) in [(&LXD, "rc_sys=\"lxc\""), (&WSL, "rc_sys=\"prefix\"")] {
            let t = tree(&["sbin/openrc"]);
            let mut o = OpenRc::new(p);
            o.start(&Facts::default(), Some(&t));
            let extras = o.extras(0);
            let rc = extras
                .iter()
                .find(|e| e.path == "etc/rc.conf")
                .expect(p.target);
            assert!(String::from_utf8_lossy(&rc.data).contains(want));
        }
    }
}
