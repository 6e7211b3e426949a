//! WSL: `<name>.rootfs.tar.gz` for `wsl --import`, and the `<name>.wsl` package (WSL ≥ 2.4.4)
//! with `/etc/wsl-distribution.conf`, following Microsoft's rules for distribution packages:
//! root-owned 0644 configuration files, the OOBE command root-owned 0755 under `/usr/lib/wsl`,
//! an icon of at most 1 MiB, no `/etc/resolv.conf`, no password hashes, no kernel.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::openrc::{self, OpenRc};
use super::{Action, Extra, Fixup, TarDest, TarFileTarget, Target};
use crate::flatten::Facts;
use crate::identity::fixup::{Flavor, Identified, IdentityFixup};
use crate::tarfmt::{Kind, Meta};

/// Microsoft's limit for the package icon.
const ICON_MAX: u64 = 1 << 20;
/// The uid the OOBE command gives the user it creates (what WSL's own distributions use).
const OOBE_UID: u32 = 1000;
/// Users WSL should start as: ordinary accounts, not system ones.
const USER_UIDS: std::ops::Range<u32> = 1000..60000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
}

/// Parse `/etc/passwd` into (name, uid, shell).
fn passwd(text: &str) -> Vec<(String, u32, String)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some((f[0].to_string(), f[2].parse().ok()?, f[6].to_string()))
        })
        .collect()
}

/// The user WSL should log in as: `wanted` if given (it must exist), else the image config's
/// `User` when it is not root, else the lowest ordinary account with a login shell.
pub fn default_user(
    facts: &Facts,
    config_user: Option<&str>,
    wanted: Option<&str>,
) -> Result<Option<User>> {
    let users = passwd(facts.text("etc/passwd").unwrap_or(""));
    let find = |who: &str| {
        let who = who.split(':').next().unwrap_or(who);
        users
            .iter()
            .find(|(n, uid, _)| n == who || uid.to_string() == who)
            .map(|(n, uid, _)| User {
                name: n.clone(),
                uid: *uid,
            })
    };
    if let Some(w) = wanted {
        return match find(w) {
            Some(u) => Ok(Some(u)),
            None => bail!("--wsl-user {w}: the image has no such user in /etc/passwd"),
        };
    }
    if let Some(u) = config_user.filter(|u| !u.is_empty()).and_then(find) {
        if u.uid != 0 {
            return Ok(Some(u));
        }
    }
    let mut ordinary: Vec<_> = users
        .iter()
        .filter(|(_, uid, shell)| {
            USER_UIDS.contains(uid) && !shell.ends_with("nologin") && !shell.ends_with("false")
        })
        .collect();
    ordinary.sort_by_key(|(_, uid, _)| *uid);
    Ok(ordinary.first().map(|(n, uid, _)| User {
        name: n.clone(),
        uid: *uid,
    }))
}

/// Remove password hashes from `/etc/shadow`: every password field that holds one becomes `!`
/// (locked). Empty, `*` and `!` fields are kept.
pub fn strip_hashes(shadow: &str) -> String {
    let mut out = String::new();
    for line in shadow.lines() {
        let mut f: Vec<&str> = line.split(':').collect();
        if f.len() > 1 && !matches!(f[1], "" | "*" | "!" | "!!" | "!*") {
            f[1] = "!";
        }
        out.push_str(&f.join(":"));
        out.push('\n');
    }
    out
}

/// Whether an INI text has `key` (any spacing) in `[section]`.
fn ini_has(text: &str, section: &str, key: &str) -> bool {
    let mut current = String::new();
    text.lines().any(|l| {
        let t = l.trim();
        if t.starts_with('[') {
            current = t.to_ascii_lowercase();
            false
        } else {
            current == section
                && t.split_once('=')
                    .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        }
    })
}

/// Add `key=value` to `[section]` (at the section's start, or in a new section at the end).
fn ini_add(text: &mut String, section: &str, key: &str, value: &str) {
    let line = format!("{key}={value}\n");
    let mut offset = 0;
    for l in text.split_inclusive('\n') {
        offset += l.len();
        if l.trim().eq_ignore_ascii_case(section) {
            if !l.ends_with('\n') {
                text.push('\n');
                offset += 1;
            }
            text.insert_str(offset, &line);
            return;
        }
    }
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("{section}\n{line}"));
}

/// `/etc/wsl.conf`: the image's own, with `[user] default=` and `[boot] command=` added where
/// it sets none.
pub fn wsl_conf(existing: Option<&str>, user: Option<&User>, boot_command: Option<&str>) -> String {
    let mut text = existing.unwrap_or("").to_string();
    let header = "# Written by alpine-boxes.\n";
    if let Some(u) = user.filter(|_| !ini_has(&text, "[user]", "default")) {
        if text.is_empty() {
            text.push_str(header);
        }
        ini_add(&mut text, "[user]", "default", &u.name);
    }
    if let Some(c) = boot_command.filter(|_| !ini_has(&text, "[boot]", "command")) {
        if text.is_empty() {
            text.push_str(header);
        }
        ini_add(&mut text, "[boot]", "command", c);
    }
    if text.is_empty() {
        text = format!("{header}[boot]\nsystemd=false\n");
    }
    text
}

/// The OOBE script of a package whose image has no ordinary user: WSL runs it once, as root, on
/// first start, and then starts the distribution as `defaultUid`.
fn oobe_script() -> String {
    format!(
        r#"#!/bin/sh
# Written by alpine-boxes: first start of this WSL distribution. Creates the default user
# (uid {OOBE_UID}), then WSL logs in as that user.
set -u
uid={OOBE_UID}
if getent passwd "$uid" >/dev/null 2>&1; then
    exit 0
fi
while :; do
    printf 'Create a default user account. Username: '
    read -r name || exit 1
    case "$name" in
        ''|*[!a-z0-9_-]*) echo "Use lower-case letters, digits, '-' and '_'."; continue ;;
    esac
    if command -v useradd >/dev/null 2>&1; then
        useradd -m -u "$uid" -s /bin/sh "$name" || continue
    else
        adduser -D -u "$uid" -s /bin/sh "$name" || continue
    fi
    break
done
for g in wheel sudo; do
    if getent group "$g" >/dev/null 2>&1; then
        addgroup "$name" "$g" 2>/dev/null || usermod -aG "$g" "$name" 2>/dev/null || true
    fi
done
echo "Set a password for $name:"
until passwd "$name"; do :; done
"#
    )
}

/// The `.wsl` package's `/etc/wsl-distribution.conf`.
fn distribution_conf(name: &str, uid: u32, oobe: bool, icon: Option<&str>) -> String {
    let mut s =
        String::from("# Written by alpine-boxes: how WSL installs this distribution.\n[oobe]\n");
    if oobe {
        s.push_str("command = /usr/lib/wsl/oobe.sh\n");
    }
    s.push_str(&format!("defaultUid = {uid}\ndefaultName = {name}\n"));
    s.push_str("\n[shortcut]\nenabled = true\n");
    if let Some(i) = icon {
        s.push_str(&format!("icon = {i}\n"));
    }
    s
}

/// Options of the WSL targets.
#[derive(Clone, Debug, Default)]
pub struct WslOptions {
    pub name: String,
    /// `--wsl-user`.
    pub user: Option<String>,
    /// `--icon`.
    pub icon: Option<PathBuf>,
    /// The image config's `User`.
    pub config_user: Option<String>,
    pub mtime: u64,
    /// The first-boot identity; its user is WSL's default user unless `--wsl-user` says.
    pub identity: Option<std::sync::Arc<crate::identity::Identity>>,
}

/// The WSL fix-ups with the identity over them.
fn fixup(opts: &WslOptions, package: bool) -> Result<Identified<WslFixup>> {
    let mut o = opts.clone();
    if o.user.is_none() {
        o.user = opts
            .identity
            .as_ref()
            .and_then(|i| i.user.as_ref().map(|u| u.name.clone()));
    }
    let flavor = if package {
        Flavor::WslPackage
    } else {
        Flavor::Wsl
    };
    let id = opts
        .identity
        .clone()
        .map(|i| IdentityFixup::new(i, flavor, opts.mtime).with_wsl_user(opts.user.clone()));
    Ok(Identified::new(WslFixup::new(o, package)?, id))
}

/// The WSL fix-ups: one table for both the tarball and the package.
pub struct WslFixup {
    opts: WslOptions,
    package: bool,
    user: Option<User>,
    conf_seen: bool,
    existing_conf: Option<String>,
    icon: Option<Vec<u8>>,
    openrc: OpenRc,
    /// `[boot] command` for wsl.conf: the OpenRC start helper, for OpenRC images.
    boot_command: Option<String>,
    /// Package: the paths whose content is stripped of password hashes — the shadow files and
    /// whatever they resolve to (a symlink's target, a hard link's first path).
    strip: HashSet<String>,
}

/// Paths never shipped to WSL: WSL writes resolv.conf itself; `.dockerenv` is a container
/// marker.
const WSL_DROP: &[&str] = &[".dockerenv", "etc/resolv.conf"];
/// The package must carry no kernel.
fn is_kernel(path: &str) -> bool {
    path.strip_prefix("boot/").is_some_and(|f| {
        !f.contains('/')
            && [
                "vmlinuz",
                "vmlinux",
                "bzImage",
                "initramfs",
                "initrd",
                "System.map",
                "config-",
            ]
            .iter()
            .any(|p| f.starts_with(p))
    })
}

impl WslFixup {
    pub fn new(opts: WslOptions, package: bool) -> Result<Self> {
        let icon = match (&opts.icon, package) {
            (Some(p), true) => Some(read_icon(p)?),
            _ => None,
        };
        Ok(Self {
            opts,
            package,
            user: None,
            conf_seen: false,
            existing_conf: None,
            icon,
            openrc: OpenRc::new(&openrc::WSL),
            boot_command: None,
            strip: HashSet::new(),
        })
    }

    fn conf_meta(&self) -> Meta {
        Meta::new(Kind::File, 0o644, 0, self.opts.mtime)
    }
}

fn read_icon(p: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(p)
        .with_context(|| format!("--icon {}", p.display()))?
        .len();
    if len > ICON_MAX {
        bail!(
            "--icon {}: {len} bytes; WSL allows at most {ICON_MAX} bytes",
            p.display()
        );
    }
    let data = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    if !data.starts_with(&[0, 0, 1, 0]) {
        bail!("--icon {}: not a Windows .ico file", p.display());
    }
    Ok(data)
}

impl Fixup for WslFixup {
    fn start_with(&mut self, plan: &crate::flatten::Plan, facts: &Facts) -> Result<()> {
        self.user = default_user(
            facts,
            self.opts.config_user.as_deref(),
            self.opts.user.as_deref(),
        )?;
        self.existing_conf = facts.text("etc/wsl.conf").map(str::to_string);
        self.openrc.start(facts, Some(plan.tree()));
        self.boot_command = self
            .openrc
            .active()
            .then(|| format!("/{}", openrc::WSL_START));
        if self.package {
            self.strip = crate::flatten::SECRET_FILES
                .iter()
                .map(|s| s.to_string())
                .chain(facts.secret_files.values().cloned())
                .collect();
        }
        Ok(())
    }

    fn action(&mut self, path: &str, meta: &Meta) -> Action {
        if WSL_DROP.contains(&path) || (self.package && is_kernel(path)) {
            return Action::Drop;
        }
        match path {
            "etc/wsl.conf" if meta.kind == Kind::File => {
                self.conf_seen = true;
                Action::Rewrite
            }
            "etc/wsl.conf" => Action::Drop,
            // Hashes are stripped wherever the shadow files' content is written; a link at the
            // name itself is kept (it leads to the stripped file).
            p if self.strip.contains(p) && meta.kind == Kind::File => Action::Rewrite,
            "etc/wsl-distribution.conf" if self.package => Action::Drop,
            _ => self.openrc.action(path, meta).unwrap_or(Action::Keep),
        }
    }

    fn rewrite(&mut self, path: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        let text = String::from_utf8_lossy(&data);
        Ok(match path {
            p if self.strip.contains(p) => strip_hashes(&text).into_bytes(),
            "etc/wsl.conf" => wsl_conf(
                Some(&text),
                self.user.as_ref(),
                self.boot_command.as_deref(),
            )
            .into_bytes(),
            _ => self.openrc.rewrite(path, &data).unwrap_or(data),
        })
    }

    fn epilogue(&mut self, _seen: &HashSet<String>) -> Result<Vec<Extra>> {
        let t = self.opts.mtime;
        let mut out = self.openrc.extras(t);
        if !self.conf_seen {
            let conf = wsl_conf(
                self.existing_conf.as_deref(),
                self.user.as_ref(),
                self.boot_command.as_deref(),
            );
            out.push(Extra {
                path: "etc/wsl.conf".into(),
                meta: self.conf_meta(),
                data: conf.into_bytes(),
            });
        }
        if self.package {
            let oobe = self.user.is_none();
            let uid = self.user.as_ref().map(|u| u.uid).unwrap_or(OOBE_UID);
            if oobe {
                out.push(Extra::file(
                    "usr/lib/wsl/oobe.sh",
                    0o755,
                    oobe_script().into_bytes(),
                    t,
                ));
            }
            let icon_path = self.icon.take().map(|icon| {
                let p = format!("usr/lib/wsl/{}.ico", self.opts.name);
                out.push(Extra::file(&p, 0o644, icon, t));
                format!("/{p}")
            });
            let conf = distribution_conf(&self.opts.name, uid, oobe, icon_path.as_deref());
            out.push(Extra::file(
                "etc/wsl-distribution.conf",
                0o644,
                conf.into_bytes(),
                t,
            ));
        }
        Ok(out)
    }
}

/// The WSL rootfs tarball, `<name>.rootfs.tar.gz` by default.
pub fn create_tarball(dest: &TarDest, opts: &WslOptions) -> Result<Box<dyn Target>> {
    Ok(Box::new(TarFileTarget::create(
        "wsl",
        dest,
        true,
        "",
        fixup(opts, false)?,
    )?))
}

/// The WSL package, `<name>.wsl` by default.
pub fn create_package(dest: &TarDest, opts: &WslOptions) -> Result<Box<dyn Target>> {
    Ok(Box::new(TarFileTarget::create(
        "wsl-package",
        dest,
        true,
        "",
        fixup(opts, true)?,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(passwd: &str) -> Facts {
        let mut f = Facts::default();
        f.files
            .insert("etc/passwd".into(), passwd.as_bytes().to_vec());
        f
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        nobody:x:65534:65534:nobody:/:/sbin/nologin\n\
        svc:x:1001:1001::/var/svc:/sbin/nologin\n\
        alpine:x:1000:1000:Alpine:/home/alpine:/bin/ash\n\
        bob:x:1002:1002::/home/bob:/bin/sh\n";

    #[test]
    fn default_user_choice() {
        let f = facts(PASSWD);
        let u = |n: &str, uid| {
            Some(User {
                name: n.into(),
                uid,
            })
        };
        assert_eq!(default_user(&f, None, None).unwrap(), u("alpine", 1000));
        assert_eq!(default_user(&f, Some("bob"), None).unwrap(), u("bob", 1002));
        assert_eq!(
            default_user(&f, Some("1002:1002"), None).unwrap(),
            u("bob", 1002)
        );
        assert_eq!(
            default_user(&f, Some("root"), None).unwrap(),
            u("alpine", 1000)
        );
        assert_eq!(default_user(&f, None, Some("svc")).unwrap(), u("svc", 1001));
        assert!(default_user(&f, None, Some("ghost")).is_err());
        assert_eq!(
            default_user(&facts("root:x:0:0::/root:/bin/sh\n"), None, None).unwrap(),
            None
        );
    }

    #[test]
    fn shadow_hashes_are_removed() {
        let s = "root:*:19000:0:::::\nalpine:$6$salt$hash:19000:0:99999:7:::\nlocked:!$6$x$y:1::::::\nnopw::1::::::\n";
        assert_eq!(
            strip_hashes(s),
            "root:*:19000:0:::::\nalpine:!:19000:0:99999:7:::\nlocked:!:1::::::\nnopw::1::::::\n"
        );
    }

    #[test]
    fn wsl_conf_merging() {
        let u = User {
            name: "alpine".into(),
            uid: 1000,
        };
        let start = Some("/usr/lib/wsl/openrc-start");
        assert_eq!(
            wsl_conf(None, Some(&u), None),
            "# Written by alpine-boxes.\n[user]\ndefault=alpine\n"
        );
        assert_eq!(
            wsl_conf(None, Some(&u), start),
            "# Written by alpine-boxes.\n[user]\ndefault=alpine\n[boot]\ncommand=/usr/lib/wsl/openrc-start\n"
        );
        let has = "[user]\ndefault = bob\n";
        assert_eq!(wsl_conf(Some(has), Some(&u), None), has);
        // The image's own boot command wins; a [boot] section without one gets ours first.
        let other = "[boot]\ncommand=/sbin/openrc default";
        assert_eq!(
            wsl_conf(Some(other), Some(&u), start),
            "[boot]\ncommand=/sbin/openrc default\n[user]\ndefault=alpine\n"
        );
        assert_eq!(
            wsl_conf(
                Some("[boot]\nsystemd=false\n[network]\nhostname=x\n"),
                None,
                start
            ),
            "[boot]\ncommand=/usr/lib/wsl/openrc-start\nsystemd=false\n[network]\nhostname=x\n"
        );
        assert_eq!(
            wsl_conf(None, None, None),
            "# Written by alpine-boxes.\n[boot]\nsystemd=false\n"
        );
    }

    #[test]
    fn kernels_are_recognised() {
        assert!(is_kernel("boot/vmlinuz-virt"));
        assert!(is_kernel("boot/initramfs-virt"));
        assert!(is_kernel("boot/vmlinuz"));
        assert!(!is_kernel("boot/extlinux.conf"));
        assert!(!is_kernel("usr/boot/vmlinuz"));
    }
}
