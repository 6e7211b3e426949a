//! The identity applied to a rootfs stream: [`Identified`] puts an [`IdentityFixup`] over a
//! target's own fix-ups (disk, LXD/Incus, WSL). Everything is decided in `start`, from the
//! image's tree and its captured `/etc/passwd` and `/etc/group`: which account is created or
//! completed and where its home is (real folders only: a symlink on the way is refused), that
//! the time zone and keymap are in the image, which NTP client it has; then every path claimed
//! is checked against the tree (no parent that is not a folder, no file over a folder, no two
//! claims on one path, no authorized_keys shared by hard links). A file the identity rewrites
//! must be a regular file (anything else at its name is dropped and the file written afresh); a
//! file the target's fix-ups also rewrite gets theirs first, then the identity's; what the
//! target drops stays dropped.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::{bail, Result};

use super::writers::{self, Account, Secret};
use super::Identity;
use crate::flatten::tree::{Node, Tree};
use crate::flatten::{Facts, Plan};
use crate::tarfmt::{Kind, Meta};
use crate::target::{Action, Extra, Fixup};

/// Which artifact the identity is written into: what applies differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// A VM disk (and the LXD/Incus VM image's disk): everything.
    Disk,
    /// An LXD/Incus container image: no keymap (no console of its own).
    Lxd,
    /// WSL: no resolv.conf (WSL writes it), no hostname files (wsl.conf's `[network]
    /// hostname`), no interfaces, NTP or keymap (WSL owns the network, clock and console).
    Wsl,
    /// The `.wsl` package: as WSL, and no password hashes (Microsoft's package rules).
    WslPackage,
}

impl Flavor {
    fn wsl(self) -> bool {
        matches!(self, Flavor::Wsl | Flavor::WslPackage)
    }
    /// The `[target.KIND]` a flavor reads in `abox.toml`.
    pub fn kind(self) -> &'static str {
        match self {
            Flavor::Disk => "disk",
            Flavor::Lxd => "lxd",
            Flavor::Wsl | Flavor::WslPackage => "wsl",
        }
    }
    /// The artifact's name in notes.
    pub fn label(self) -> &'static str {
        match self {
            Flavor::Disk => "disk",
            Flavor::Lxd => "LXD/Incus container",
            Flavor::Wsl | Flavor::WslPackage => "WSL",
        }
    }

    /// Settings that do not apply to this flavor, to be said when given.
    pub fn unused(self, id: &Identity) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.wsl() {
            if !id.dns.is_empty() || id.search_domain.is_some() {
                v.push("dns/search-domain (WSL writes /etc/resolv.conf itself)");
            }
            if id.interfaces.is_some() {
                v.push("interfaces (WSL configures the network)");
            }
            if !id.ntp.is_empty() {
                v.push("ntp (WSL keeps the clock in step with Windows)");
            }
        }
        if id.cloud_init && self.wsl() {
            v.push("cloud-init (WSL distributions start without tiny-cloud)");
        }
        if id.keymap.is_some() && self != Flavor::Disk {
            v.push("keymap (containers have no console of their own; disks, the LXD VM image's too, get it)");
        }
        if self == Flavor::WslPackage
            && (id.root_hash.is_some() || id.user.as_ref().is_some_and(|u| u.hash.is_some()))
        {
            v.push(
                "passwords (a .wsl package carries no password hashes; WSL logs in without one)",
            );
        }
        v
    }
}

/// What the identity writes at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum What {
    Hostname,
    Hosts,
    Passwd,
    Group,
    Shadow,
    /// authorized_keys of the user (`false`) or root (`true`).
    Keys(bool),
    Timezone,
    Resolv,
    Udhcpc,
    /// `/etc/dhcpcd.conf`.
    Dhcpcd,
    /// LXD: the OpenRC service that sets the running hostname from /etc/hostname.
    HostnameService,
    Interfaces,
    Chrony,
    Ntpd,
    Sshd,
    WslConf,
    Loadkmap,
    /// `/etc/tiny-cloud.conf`.
    TinyCloud,
    /// Dropped (a runlevel link abox replaces).
    Gone,
    /// A symlink to this target.
    Link(String),
    /// A folder owned by (uid, gid) with this mode.
    Dir(u64, u64, u32),
}

impl What {
    /// What it is, for messages.
    fn name(&self) -> &'static str {
        match self {
            What::Hostname => "hostname",
            What::Hosts => "hosts file",
            What::Passwd => "passwd",
            What::Group => "group file",
            What::Shadow => "shadow file",
            What::Keys(_) => "authorized_keys",
            What::Timezone => "time zone",
            What::Resolv => "resolv.conf",
            What::Udhcpc => "udhcpc.conf",
            What::Dhcpcd => "dhcpcd.conf",
            What::HostnameService => "hostname service",
            What::Interfaces => "interfaces",
            What::Chrony => "chrony.conf",
            What::Ntpd => "ntpd settings",
            What::Sshd => "sshd_config",
            What::WslConf => "wsl.conf",
            What::Loadkmap => "loadkmap settings",
            What::TinyCloud => "tiny-cloud.conf",
            What::Gone => "runlevel link",
            What::Link(_) => "symlink",
            What::Dir(..) => "folder",
        }
    }
}

/// The identity's fix-ups for one artifact.
pub struct IdentityFixup {
    id: Arc<Identity>,
    flavor: Flavor,
    mtime: u64,
    account: Option<Account>,
    /// Paths the identity writes, in the order their entries are added when the image has none
    /// (folders before what is in them).
    owned: BTreeMap<String, What>,
    order: Vec<String>,
    /// Owned paths the image had in the right kind (rewritten or kept in place).
    seen: HashSet<String>,
    facts: Facts,
    /// WSL: the default user when `--wsl-user` names one (else the identity's user).
    wsl_user: Option<String>,
    /// The first conflicting claim ([`IdentityFixup::own`]).
    conflict: Option<String>,
}

/// Where `rel` (a path in the image) is: (path, whether a folder is there). Every component
/// that exists must be a real folder: a symlink on the way is refused, since following it would
/// let the image choose where abox writes keys and whose folder it hands to the user (a
/// `/home/alice -> /root` would give alice root's `.ssh`).
fn place(tree: &Tree, rel: &str, what: &str) -> Result<(String, bool)> {
    let mut done = String::new();
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    for (i, p) in parts.iter().enumerate() {
        if *p == ".." || *p == "." {
            bail!("{what} /{rel}: '.' and '..' are not allowed in it");
        }
        let here = crate::flatten::path::join(&done, p);
        match tree.entries.get(&here).map(|e| &e.node) {
            None => {
                let rest: Vec<&str> = parts[i..].to_vec();
                return Ok((
                    crate::flatten::path::join(&here_parent(&here), &rest.join("/")),
                    false,
                ));
            }
            Some(Node::Dir(_)) => done = here,
            Some(Node::Inode(_)) => bail!(
                "{what} /{rel}: /{here} in the image is not a folder (a symlink or a file); abox \
                 writes there only through real folders — make it one in the image"
            ),
        }
    }
    Ok((done, true))
}

fn here_parent(p: &str) -> String {
    crate::flatten::path::parent(p).to_string()
}

/// Whether the tree has tiny-cloud (its command and service) with the NoCloud module.
pub fn has_tiny_cloud(tree: &Tree) -> bool {
    let cmd = is_file(tree, "sbin/tiny-cloud") || is_file(tree, "usr/sbin/tiny-cloud");
    let nocloud = [
        "lib/tiny-cloud/cloud/nocloud/imds",
        "usr/lib/tiny-cloud/cloud/nocloud/imds",
        "lib/tiny-cloud/nocloud/imds",
    ]
    .iter()
    .any(|p| is_file(tree, p));
    cmd && nocloud && is_file(tree, "etc/init.d/tiny-cloud")
}

fn is_file(tree: &Tree, rel: &str) -> bool {
    tree.resolve(rel)
        .and_then(|r| tree.inode_at(&r))
        .is_some_and(|i| i.meta.kind == Kind::File)
}

impl IdentityFixup {
    pub fn new(id: Arc<Identity>, flavor: Flavor, mtime: u64) -> Self {
        IdentityFixup {
            id,
            flavor,
            mtime,
            account: None,
            owned: BTreeMap::new(),
            order: Vec::new(),
            seen: HashSet::new(),
            facts: Facts::default(),
            wsl_user: None,
            conflict: None,
        }
    }

    /// WSL: `--wsl-user` names the default user; it wins over the identity's user.
    pub fn with_wsl_user(mut self, user: Option<String>) -> Self {
        self.wsl_user = user;
        self
    }

    /// Claim `path` for `w`. Two different claims on one path (a shadow file that is also
    /// sshd_config through links, a user's home that is root's) are recorded and refused at
    /// the end of `start`.
    fn own(&mut self, path: &str, w: What) {
        match self.owned.get(path) {
            Some(old) if *old != w => {
                if self.conflict.is_none() {
                    self.conflict = Some(format!(
                        "/{path} would be written twice ({} and {}): the image's links or \
                         accounts lead two of abox's files to one place",
                        old.name(),
                        w.name()
                    ));
                }
            }
            Some(_) => {}
            None => {
                self.owned.insert(path.to_string(), w);
                self.order.push(path.to_string());
            }
        }
    }

    /// Refuse what cannot be written as a plain entry: a claim conflict, a path whose existing
    /// parent is not a real folder (a symlink or a file: the entry would go through it or clash
    /// with it), a file where the image has a folder, authorized_keys sharing its inode with
    /// other names (it is handed to the user).
    fn check_paths(&self, plan: &Plan) -> Result<()> {
        if let Some(c) = &self.conflict {
            bail!("{c}");
        }
        let tree = plan.tree();
        let linked: HashSet<&str> = plan.hard_links().flat_map(|(a, b)| [a, b]).collect();
        for (path, w) in &self.owned {
            let mut parent = crate::flatten::path::parent(path);
            while !parent.is_empty() {
                if let Some(Node::Inode(_)) = tree.entries.get(parent).map(|e| &e.node) {
                    bail!(
                        "/{parent} in the image is not a folder (a symlink or a file): abox \
                         writes /{path} ({}) only through real folders; make it one in the image",
                        w.name()
                    );
                }
                parent = crate::flatten::path::parent(parent);
            }
            let is_dir = matches!(
                tree.entries.get(path.as_str()).map(|e| &e.node),
                Some(Node::Dir(_))
            );
            if is_dir && !matches!(w, What::Dir(..)) {
                bail!(
                    "/{path} is a folder in the image: abox writes its {} there as a file; \
                     remove the folder from the image",
                    w.name()
                );
            }
            if matches!(w, What::Keys(_)) && linked.contains(path.as_str()) {
                bail!(
                    "/{path} shares its file with other names in the image (hard links): abox \
                     hands it to the account it belongs to, so it must be a file of its own"
                );
            }
        }
        Ok(())
    }

    /// The account, if any (after `start`).
    pub fn account(&self) -> Option<&Account> {
        self.account.as_ref()
    }

    /// Decide what is written where; errors for what the image cannot take (a time zone or
    /// keymap it lacks, no NTP client, a home that is not a folder, a shadow file shared by
    /// hard links).
    pub fn start(&mut self, plan: &Plan) -> Result<()> {
        let tree = plan.tree();
        let facts = &plan.facts;
        self.facts = facts.clone();
        let id = self.id.clone();
        let flavor = self.flavor;
        if id.hostname.is_some() {
            if flavor.wsl() {
                self.own("etc/wsl.conf", What::WslConf);
            } else {
                self.own("etc/hostname", What::Hostname);
                self.own("etc/hosts", What::Hosts);
            }
            // LXD names a container after its instance, and OpenRC's hostname service does not
            // run in containers (`keyword -lxc`): a service of abox's sets the name instead.
            if flavor == Flavor::Lxd && tree.entries.contains_key("etc/runlevels") {
                self.own("etc/init.d/abox-hostname", What::HostnameService);
                self.own(
                    "etc/runlevels/boot/abox-hostname",
                    What::Link("/etc/init.d/abox-hostname".into()),
                );
            }
        }
        if flavor.wsl() && (id.user.is_some() || id.timezone.is_some()) {
            self.own("etc/wsl.conf", What::WslConf);
        }
        // passwd and group are rewritten from what pass 1 kept of them: a regular file of at
        // most 1 MiB at that very path. Anything else there (a link, a second name of another
        // file, a bigger file) would be rebuilt from nothing, losing the image's accounts.
        if id.user.is_some() {
            for f in ["etc/passwd", "etc/group"] {
                if tree.entries.contains_key(f) && facts.text(f).is_none() {
                    bail!(
                        "the image's /{f} is not a regular UTF-8 file of at most 1 MiB (a link, \
                         a hard link's second name, or bigger): abox adds --user only to a plain \
                         /{f}"
                    );
                }
            }
        }
        let passwd = facts.text("etc/passwd").unwrap_or("");
        let group = facts.text("etc/group").unwrap_or("");
        if id.touches_shadow() {
            let shadow_at = facts
                .secret_files
                .get("etc/shadow")
                .cloned()
                .unwrap_or_else(|| "etc/shadow".into());
            if facts.secret_links.get("etc/shadow").is_some_and(|n| *n > 1) {
                bail!(
                    "the image's /etc/shadow shares its file with other names (hard links): \
                     refusing to write passwords into it; make /etc/shadow a file of its own"
                );
            }
            self.own(&shadow_at, What::Shadow);
        }
        if let Some(u) = &id.user {
            let a = writers::plan_account(&u.name, passwd, group)?;
            self.own("etc/passwd", What::Passwd);
            self.own("etc/group", What::Group);
            if a.new || !u.keys.is_empty() {
                // Another account's home (root's, say) is not handed to this one.
                if let Some(other) = writers::passwd_entries(passwd).into_iter().find(|e| {
                    e.name != a.name && e.home.trim_end_matches('/') == a.home.trim_end_matches('/')
                }) {
                    bail!(
                        "the user {}'s home {} is also {}'s in the image's /etc/passwd: abox \
                         writes keys only into a home of the user's own",
                        a.name,
                        a.home,
                        other.name
                    );
                }
                self.home(tree, &a.home.clone(), a.uid as u64, a.gid as u64, false)?;
            }
            if !u.keys.is_empty() {
                self.keys(&a.home.clone(), a.uid as u64, a.gid as u64, false, tree)?;
            }
            self.account = Some(a);
        }
        if !id.root_keys.is_empty() {
            let home = writers::passwd_entries(passwd)
                .into_iter()
                .find(|e| e.name == "root")
                .map(|e| e.home)
                .unwrap_or_else(|| "/root".into());
            self.home(tree, &home, 0, 0, true)?;
            self.keys(&home, 0, 0, true, tree)?;
        }
        if let Some(tz) = &id.timezone {
            let zone = format!("usr/share/zoneinfo/{tz}");
            if is_file(tree, &zone) {
                self.own("etc/localtime", What::Link(format!("/{zone}")));
                self.own("etc/timezone", What::Timezone);
            } else if tz == "UTC" || tz == "Etc/UTC" {
                // Without tzdata the C library's time is UTC: no /etc/localtime at all.
                self.own("etc/localtime", What::Timezone);
                self.own("etc/timezone", What::Timezone);
            } else {
                bail!(
                    "--timezone {tz}: the image has no /{zone}; install tzdata in the image \
                     (apk add tzdata) or choose a zone it has"
                );
            }
        }
        if !flavor.wsl() {
            // Fixed name servers: resolv.conf, and both DHCP clients Alpine's ifupdown-ng may
            // run told to leave it (udhcpc: RESOLV_CONF="no"; dhcpcd, when the image has it:
            // `nohook resolv.conf`). A search domain alone names the host in /etc/hosts and
            // leaves resolv.conf to DHCP.
            if !id.dns.is_empty() {
                self.own("etc/resolv.conf", What::Resolv);
                self.own("etc/udhcpc/udhcpc.conf", What::Udhcpc);
                if is_file(tree, "sbin/dhcpcd") || is_file(tree, "usr/sbin/dhcpcd") {
                    self.own("etc/dhcpcd.conf", What::Dhcpcd);
                }
            }
            if id.interfaces.is_some() {
                self.own("etc/network/interfaces", What::Interfaces);
            }
            if !id.ntp.is_empty() {
                self.ntp(tree)?;
            }
        }
        if id.has_keys() && is_file(tree, "etc/ssh/sshd_config") {
            let real = tree
                .resolve("etc/ssh/sshd_config")
                .unwrap_or_else(|| "etc/ssh/sshd_config".into());
            self.own(&real, What::Sshd);
        }
        if let (Some((l, v)), Flavor::Disk) = (&id.keymap, flavor) {
            let map = format!("usr/share/bkeymaps/{l}/{v}.bmap.gz");
            if !is_file(tree, &map) {
                bail!(
                    "--keymap {l} {v}: the image has no /{map}; install kbd-bkeymaps in the \
                     image (apk add kbd-bkeymaps) or choose a keymap it has"
                );
            }
            if !is_file(tree, "etc/init.d/loadkmap") {
                bail!("--keymap: the image has no /etc/init.d/loadkmap service (busybox-openrc) to load it at boot");
            }
            self.own("etc/keymap", What::Dir(0, 0, 0o755));
            self.own(
                &format!("etc/keymap/{v}.bmap.gz"),
                What::Link(format!("/{map}")),
            );
            self.own("etc/conf.d/loadkmap", What::Loadkmap);
            self.own(
                "etc/runlevels/boot/loadkmap",
                What::Link("/etc/init.d/loadkmap".into()),
            );
        }
        if id.cloud_init && !flavor.wsl() {
            self.tiny_cloud(tree)?;
        }
        self.check_paths(plan)
    }

    /// tiny-cloud enabled as `tiny-cloud --setup` does (early in boot; net, main and final in
    /// default; its links elsewhere dropped) and `/etc/tiny-cloud.conf` set for NoCloud.
    fn tiny_cloud(&mut self, tree: &Tree) -> Result<()> {
        if !has_tiny_cloud(tree) {
            bail!(
                "--cloud-init: the image has no tiny-cloud with its NoCloud module; add \
                 `apk add tiny-cloud-nocloud` to its recipe (for a disk of a docker: Alpine image \
                 the VM layer adds it)"
            );
        }
        let services = [
            ("tiny-cloud-early", "boot"),
            ("tiny-cloud-net", "default"),
            ("tiny-cloud", "default"),
            ("tiny-cloud-final", "default"),
        ];
        for (svc, _) in services {
            for level in ["sysinit", "boot", "default"] {
                let link = format!("etc/runlevels/{level}/{svc}");
                if tree.entries.contains_key(&link) {
                    self.own(&link, What::Gone);
                }
            }
        }
        for (svc, level) in services {
            if is_file(tree, &format!("etc/init.d/{svc}")) {
                self.owned.remove(&format!("etc/runlevels/{level}/{svc}"));
                self.order
                    .retain(|p| *p != format!("etc/runlevels/{level}/{svc}"));
                self.own(
                    &format!("etc/runlevels/{level}/{svc}"),
                    What::Link(format!("/etc/init.d/{svc}")),
                );
            }
        }
        self.own("etc/tiny-cloud.conf", What::TinyCloud);
        {
            // LXD (and its VM agent) writes the templates' files only into folders that exist.
            let (at, exists) = place(tree, "var/lib/cloud/seed/nocloud-net", "cloud-init's seed")?;
            if !exists {
                self.own(&at, What::Dir(0, 0, 0o755));
            }
        }
        Ok(())
    }

    /// The home folder: made (owned by the account) when the image has none; one the image
    /// has is left as it is (a root-owned 0755 home passes sshd's StrictModes).
    fn home(&mut self, tree: &Tree, home: &str, uid: u64, gid: u64, root: bool) -> Result<()> {
        let who = if root { "root" } else { "the user" };
        let rel = home.trim_start_matches('/');
        if rel.is_empty() || !home.starts_with('/') {
            bail!("{who}'s home in /etc/passwd is {home:?}: abox writes SSH keys only into a home folder of its own");
        }
        let (at, exists) = place(tree, rel, &format!("{who}'s home"))?;
        if !exists {
            self.own(&at, What::Dir(uid, gid, if root { 0o700 } else { 0o755 }));
        }
        Ok(())
    }

    /// `~/.ssh` (0700) and `authorized_keys` (0600), the account's.
    fn keys(&mut self, home: &str, uid: u64, gid: u64, root: bool, tree: &Tree) -> Result<()> {
        let who = if root { "root" } else { "the user" };
        let (at, _) = place(tree, home.trim_start_matches('/'), &format!("{who}'s home"))?;
        let ssh = format!("{at}/.ssh");
        self.own(&ssh, What::Dir(uid, gid, 0o700));
        self.own(&format!("{ssh}/authorized_keys"), What::Keys(root));
        Ok(())
    }

    fn ntp(&mut self, tree: &Tree) -> Result<()> {
        let openrc = tree.entries.contains_key("etc/runlevels");
        if is_file(tree, "usr/sbin/chronyd") {
            self.own("etc/chrony/chrony.conf", What::Chrony);
            if openrc
                && is_file(tree, "etc/init.d/chronyd")
                && !tree.entries.contains_key("etc/runlevels/default/chronyd")
            {
                self.own(
                    "etc/runlevels/default/chronyd",
                    What::Link("/etc/init.d/chronyd".into()),
                );
            }
        } else if is_file(tree, "etc/init.d/ntpd") {
            self.own("etc/conf.d/ntpd", What::Ntpd);
            if openrc && !tree.entries.contains_key("etc/runlevels/default/ntpd") {
                self.own(
                    "etc/runlevels/default/ntpd",
                    What::Link("/etc/init.d/ntpd".into()),
                );
            }
        } else {
            bail!(
                "--ntp: the image has no NTP client to configure (chrony: /usr/sbin/chronyd, or \
                 busybox's ntpd: /etc/init.d/ntpd from busybox-openrc); install one in the image"
            );
        }
        Ok(())
    }

    /// The facts the target's own fix-ups see: `/etc/passwd` and `/etc/group` as written (so a
    /// WSL default user can be the new account).
    pub fn facts_view(&self, facts: &Facts) -> Facts {
        let mut f = facts.clone();
        if let Some(a) = &self.account {
            let p = writers::passwd(facts.text("etc/passwd").unwrap_or(""), a);
            let g = writers::group(facts.text("etc/group").unwrap_or(""), a);
            f.files.insert("etc/passwd".into(), p.into_bytes());
            f.files.insert("etc/group".into(), g.into_bytes());
        }
        f
    }

    pub fn owns(&self, path: &str) -> bool {
        self.owned.contains_key(path)
    }

    /// The action for an owned path (None: not the identity's).
    pub fn action(&mut self, path: &str, meta: &Meta) -> Option<Action> {
        let w = self.owned.get(path)?.clone();
        Some(match w {
            What::Dir(uid, gid, mode) => {
                if meta.kind != Kind::Dir {
                    return Some(Action::Drop);
                }
                self.seen.insert(path.to_string());
                let mut m = meta.clone();
                m.uid = uid;
                m.gid = gid;
                m.mode = mode;
                Action::KeepAs(m)
            }
            // Written as abox's own symlink (or not at all) at the end.
            What::Link(_) | What::Gone => Action::Drop,
            What::Timezone if path == "etc/localtime" => Action::Drop,
            _ => {
                if meta.kind == Kind::File {
                    self.seen.insert(path.to_string());
                }
                Action::Rewrite
            }
        })
    }

    fn secret(&self, root: bool) -> Secret {
        let id = &self.id;
        let no_hash = self.flavor == Flavor::WslPackage;
        if root {
            match &id.root_hash {
                Some(h) if !no_hash => Secret::Hash(h.clone()),
                _ if !id.root_keys.is_empty() => Secret::KeyOnly,
                _ => Secret::Keep,
            }
        } else {
            match id.user.as_ref() {
                Some(u) => match &u.hash {
                    Some(h) if !no_hash => Secret::Hash(h.clone()),
                    _ => Secret::KeyOnly,
                },
                None => Secret::Keep,
            }
        }
    }

    /// The new content of an owned file.
    pub fn rewrite(&mut self, path: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        let Some(w) = self.owned.get(path).cloned() else {
            return Ok(data);
        };
        let text = String::from_utf8_lossy(&data).into_owned();
        let id = self.id.clone();
        let days = self.mtime / 86_400;
        let out = match w {
            What::Hostname => writers::hostname(id.hostname.as_deref().unwrap_or("localhost")),
            What::Hosts => writers::hosts(
                &text,
                id.hostname.as_deref().unwrap_or("localhost"),
                id.search_domain.as_deref(),
            ),
            What::Passwd => match &self.account {
                Some(a) => writers::passwd(&text, a),
                None => text,
            },
            What::Group => match &self.account {
                Some(a) => writers::group(&text, a),
                None => text,
            },
            What::Shadow => {
                let mut s = text;
                if id.root_hash.is_some() || !id.root_keys.is_empty() {
                    s = writers::shadow(&s, "root", &self.secret(true), days);
                }
                if let Some(a) = &self.account {
                    s = writers::shadow(&s, &a.name, &self.secret(false), days);
                }
                s
            }
            What::Keys(root) => {
                let keys = if root {
                    &id.root_keys
                } else {
                    &id.user.as_ref().map(|u| u.keys.clone()).unwrap_or_default()
                };
                writers::authorized_keys(&text, keys)
            }
            What::Timezone => format!("{}\n", id.timezone.as_deref().unwrap_or("UTC")),
            What::Resolv => writers::resolv_conf(&text, &id.dns, id.search_domain.as_deref()),
            What::Udhcpc => writers::udhcpc_conf(&text),
            What::Dhcpcd => writers::dhcpcd_conf(&text),
            What::HostnameService => writers::LXD_HOSTNAME_SERVICE.to_string(),
            What::Interfaces => id.interfaces.clone().unwrap_or_default(),
            What::Chrony => writers::chrony_conf(&text, &id.ntp),
            What::Ntpd => writers::ntpd_conf(&text, &id.ntp),
            What::Sshd => {
                let root_login = if id.root_keys.is_empty() {
                    "no"
                } else {
                    "prohibit-password"
                };
                let mut set = vec![
                    ("PermitRootLogin", root_login),
                    ("PubkeyAuthentication", "yes"),
                ];
                let any_password = self.flavor != Flavor::WslPackage
                    && (id.root_hash.is_some()
                        || id.user.as_ref().is_some_and(|u| u.hash.is_some()));
                if !any_password {
                    set.push(("PasswordAuthentication", "no"));
                    set.push(("KbdInteractiveAuthentication", "no"));
                }
                writers::sshd_config(&text, &set)
            }
            What::WslConf => {
                let mut t = text;
                let default = self
                    .wsl_user
                    .as_deref()
                    .or(self.account.as_ref().map(|a| a.name.as_str()));
                if let Some(name) = default {
                    t = writers::ini_set(&t, "[user]", "default", name);
                }
                if let Some(h) = &id.hostname {
                    t = writers::ini_set(&t, "[network]", "hostname", h);
                }
                // WSL otherwise sets the zone from Windows' at every start.
                if id.timezone.is_some() {
                    t = writers::ini_set(&t, "[time]", "useWindowsTimezone", "false");
                }
                t
            }
            What::Loadkmap => {
                let (_, v) = id.keymap.clone().unwrap_or_default();
                writers::loadkmap_conf(&v)
            }
            What::TinyCloud => writers::tiny_cloud_conf(
                &text,
                self.account.as_ref().map(|a| a.name.as_str()),
                self.flavor == Flavor::Disk,
            ),
            What::Link(_) | What::Dir(..) | What::Gone => text,
        };
        Ok(out.into_bytes())
    }

    /// The metadata an owned, rewritten file is written with.
    pub fn rewritten_meta(&self, path: &str, mut meta: Meta) -> Meta {
        match self.owned.get(path) {
            // Root's, readable by the `shadow` group at most (Alpine's root:shadow 0640);
            // any other group gets none of it.
            Some(What::Shadow) => {
                let shadow_gid = writers::group_entries(self.facts.text("etc/group").unwrap_or(""))
                    .into_iter()
                    .find(|(n, _, _)| n == "shadow")
                    .map(|(_, g, _)| g as u64);
                meta.uid = 0;
                if Some(meta.gid) != shadow_gid {
                    meta.gid = 0;
                }
                meta.mode &= 0o640;
                meta.xattrs.clear();
            }
            Some(What::Keys(root)) => {
                let (uid, gid) = match (&self.account, root) {
                    (Some(a), false) => (a.uid as u64, a.gid as u64),
                    _ => (0, 0),
                };
                meta.uid = uid;
                meta.gid = gid;
                meta.mode = 0o600;
                meta.xattrs.clear();
            }
            _ => {}
        }
        meta
    }

    /// Whether the identity has written (or kept) `path` already.
    fn done(&mut self, path: &str) {
        self.seen.insert(path.to_string());
    }

    /// The entries the image lacked, folders first.
    pub fn epilogue(&mut self) -> Result<Vec<Extra>> {
        let mut v = Vec::new();
        let t = self.mtime;
        for path in self.order.clone() {
            if self.seen.contains(&path) {
                continue;
            }
            let w = self.owned[&path].clone();
            let e = match w {
                What::Dir(uid, gid, mode) => {
                    let mut e = Extra::dir(&path, t);
                    e.meta.uid = uid;
                    e.meta.gid = gid;
                    e.meta.mode = mode;
                    e
                }
                What::Link(target) => Extra::symlink(&path, &target, t),
                What::Gone => continue,
                What::Timezone if path == "etc/localtime" => continue,
                _ => {
                    // passwd and group: the content the image has (captured, links resolved).
                    let base = match path.as_str() {
                        "etc/passwd" | "etc/group" => {
                            self.facts.files.get(&path).cloned().unwrap_or_default()
                        }
                        _ => Vec::new(),
                    };
                    let data = self.rewrite(&path, base)?;
                    let mode = match w {
                        What::Shadow => 0o640,
                        What::Keys(_) => 0o600,
                        What::HostnameService => 0o755,
                        _ => 0o644,
                    };
                    let e = Extra::file(&path, mode, data, t);
                    Extra {
                        meta: self.rewritten_meta(&path, e.meta.clone()),
                        ..e
                    }
                }
            };
            v.push(e);
            self.done(&path);
        }
        Ok(v)
    }
}

/// A target's fix-ups with an identity over them (none: the target's alone).
pub struct Identified<F: Fixup> {
    pub inner: F,
    id: Option<IdentityFixup>,
    /// Paths whose rewrite the inner fix-up asked for.
    inner_rewrites: HashSet<String>,
}

impl<F: Fixup> Identified<F> {
    pub fn new(inner: F, id: Option<IdentityFixup>) -> Self {
        Identified {
            inner,
            id,
            inner_rewrites: HashSet::new(),
        }
    }
}

impl<F: Fixup> Fixup for Identified<F> {
    fn start(&mut self, facts: &Facts) -> Result<()> {
        self.inner.start(facts)
    }
    fn start_plan(&mut self, plan: &Plan) -> Result<()> {
        match &mut self.id {
            Some(id) => {
                id.start(plan)?;
                let view = id.facts_view(&plan.facts);
                self.inner.start_with(plan, &view)
            }
            None => self.inner.start_plan(plan),
        }
    }
    fn prologue(&mut self) -> Result<Vec<Extra>> {
        self.inner.prologue()
    }
    fn action(&mut self, path: &str, meta: &Meta) -> Action {
        let a = self.inner.action(path, meta);
        if matches!(a, Action::Rewrite) {
            self.inner_rewrites.insert(path.to_string());
        }
        let Some(id) = self.id.as_mut() else {
            return a;
        };
        match (id.action(path, meta), a) {
            (None, a) => a,
            // What the target drops stays dropped (the .wsl package drops what its rules
            // forbid; the identity writes its own file at the end if it needs one).
            (Some(_), Action::Drop) => {
                id.seen.remove(path);
                Action::Drop
            }
            (Some(mine), _) => mine,
        }
    }
    fn rewrite(&mut self, path: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        let data = if self.inner_rewrites.remove(path) {
            self.inner.rewrite(path, data)?
        } else {
            data
        };
        match &mut self.id {
            Some(id) => id.rewrite(path, data),
            None => Ok(data),
        }
    }
    fn rewritten_meta(&self, path: &str, meta: Meta) -> Meta {
        let meta = self.inner.rewritten_meta(path, meta);
        match &self.id {
            Some(id) => id.rewritten_meta(path, meta),
            None => meta,
        }
    }
    fn epilogue(&mut self, seen_dirs: &HashSet<String>) -> Result<Vec<Extra>> {
        let mut extras = self.inner.epilogue(seen_dirs)?;
        let Some(id) = self.id.as_mut() else {
            return Ok(extras);
        };
        // The inner fix-ups' own entries at a path the identity writes: the identity's text
        // over theirs (a fresh wsl.conf, /etc/hostname of a disk).
        for e in extras.iter_mut() {
            if id.owns(&e.path) && id.seen.insert(e.path.clone()) {
                if let Kind::File = e.meta.kind {
                    e.data = id.rewrite(&e.path, std::mem::take(&mut e.data))?;
                    e.meta.size = e.data.len() as u64;
                    e.meta = id.rewritten_meta(&e.path, e.meta.clone());
                }
            }
        }
        extras.extend(id.epilogue()?);
        Ok(extras)
    }
}
