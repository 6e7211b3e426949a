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
}

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
        ("sysinit", &["devfs", "dmesg", "mdev", "hwdrivers"]),
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

/// The getty a VM gets on its first serial port (the console abox's extlinux.conf sets).
pub const SERIAL_GETTY: &str = "ttyS0::respawn:/sbin/getty -L ttyS0 115200 vt100";
/// The one getty of a container.
pub const CONSOLE_GETTY: &str = "::respawn:/sbin/getty 38400 console";

/// Apply `/etc/rc.conf` changes.
pub fn rc_conf(text: &str, vars: &[RcVar]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
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

/// Rewrite `/etc/inittab`'s gettys.
pub fn inittab(text: &str, mode: Inittab) -> String {
    let lines: Vec<&str> = text.lines().collect();
    match mode {
        Inittab::Keep => text.to_string(),
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
                return text.to_string();
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
    for l in script.lines() {
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
            _ => false,
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
}

impl OpenRc {
    pub fn new(profile: &'static Profile) -> Self {
        Self {
            profile,
            active: false,
            services: BTreeSet::new(),
            links: BTreeSet::new(),
            present: BTreeSet::new(),
        }
    }

    /// OpenRC images are the ones with `/etc/rc.conf`.
    pub fn start(&mut self, facts: &Facts) {
        self.active = facts.files.contains_key("etc/rc.conf");
    }

    /// Whether the image is an OpenRC one (known after [`OpenRc::start`]).
    pub fn active(&self) -> bool {
        self.active
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
        let rewrites = self.profile.rewrites(path);
        // A file abox rewrites counts as present only as a regular file: anything else there is
        // dropped by the stream, and the file is then written afresh.
        if (path == "etc/network/interfaces"
            || self.profile.files.iter().any(|(p, _, _)| *p == path))
            && (!rewrites || meta.kind == Kind::File)
        {
            self.present.insert(path.to_string());
        }
        rewrites.then_some(Action::Rewrite)
    }

    pub fn rewrite(&self, path: &str, data: &[u8]) -> Option<Vec<u8>> {
        if !self.active {
            return None;
        }
        let text = std::str::from_utf8(data).ok()?;
        self.profile.rewrite(path, text).map(String::into_bytes)
    }

    /// Files and runlevel links to add after the image's own entries.
    pub fn extras(&self, mtime: u64) -> Vec<Extra> {
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
        for (level, wanted) in self.profile.runlevels {
            for alternatives in *wanted {
                let Some(svc) = alternatives.split('|').find(|s| services.contains(*s)) else {
                    continue;
                };
                if self.links.contains(&format!("{level}/{svc}")) {
                    continue;
                }
                out.push(Extra::symlink(
                    &format!("etc/runlevels/{level}/{svc}"),
                    &format!("/etc/init.d/{svc}"),
                    mtime,
                ));
            }
        }
        out
    }
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
        o.start(&facts_with_rc_conf());
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
        o.start(&Facts::default());
        walk(&mut o, &["etc/init.d/networking", "etc/inittab"]);
        assert!(o
            .action("etc/inittab", &Meta::new(Kind::File, 0o644, 0, 0))
            .is_none());
        assert!(o.extras(0).is_empty());
        assert!(o
            .rewrite("etc/inittab", b"tty1::respawn:/sbin/getty 38400 tty1\n")
            .is_none());
    }
}
