//! First-boot identity: who may log in (users, SSH keys, passwords), the hostname, time zone,
//! DNS, NTP, keymap and network interfaces — given once and written into every artifact without
//! booting anything.
//!
//! Three ways in, one model ([`Settings`], every field optional): flags, a TOML config file
//! (`abox.toml`, [`ConfigFile`]: top-level keys, then `[recipe.NAME]`, then `[target.KIND]`,
//! each overriding the one before) and a `setup-alpine` answer file ([`answers`]). Layered as
//! config < answers < flags, then [`Settings::resolve`] reads the key and password files once and
//! checks every value, before any output exists: the result is an [`Identity`]. The writers
//! ([`writers`]) are pure text functions; [`fixup::Identified`] applies them to a target's rootfs
//! stream on top of the target's own fix-ups.

pub mod answers;
pub mod fixup;
pub mod writers;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One layer of identity settings; `None` = not given at this layer.
///
/// In TOML the keys are kebab-case (`ssh-keys`, `root-password-file`…); paths are relative to the
/// config file's folder. Unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// `/etc/hostname` (a name, or a fully qualified one).
    pub hostname: Option<String>,
    /// The ordinary user to create (if missing: uid 1000 or the next free, in `wheel`).
    pub user: Option<String>,
    /// authorized_keys sources for the user.
    pub ssh_keys: Option<Vec<KeySource>>,
    /// authorized_keys sources for root.
    pub root_ssh_keys: Option<Vec<KeySource>>,
    /// The user's password (first line: a password or a crypt(3) hash).
    pub password_file: Option<PathBuf>,
    /// Root's password, the same way.
    pub root_password_file: Option<PathBuf>,
    /// `Area/City` as in the tz database (`UTC` too).
    pub timezone: Option<String>,
    /// Name servers (IPv4 or IPv6).
    pub dns: Option<Vec<String>>,
    /// The DNS search domain.
    pub search_domain: Option<String>,
    /// NTP servers (host names or addresses).
    pub ntp: Option<Vec<String>>,
    /// Console keymap, `LAYOUT VARIANT` as setup-alpine's KEYMAPOPTS (`us us`, `de de-nodeadkeys`).
    pub keymap: Option<String>,
    /// `/etc/network/interfaces`, verbatim (setup-alpine's INTERFACESOPTS).
    pub interfaces: Option<String>,
    /// Set up Alpine's tiny-cloud (NoCloud) so a seed applies at first boot; LXD/Incus images
    /// also get the cloud-init templates (`cloud-init.user-data`…).
    pub cloud_init: Option<bool>,
}

/// Where authorized_keys lines come from: a file (flags and TOML), or the lines themselves (an
/// answer file's `USERSSHKEY`, or `{ key = "ssh-ed25519 …" }` in TOML).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum KeySource {
    File(PathBuf),
    Text(KeyText),
}

/// `{ key = "ssh-ed25519 …" }`: authorized_keys lines given in place.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyText {
    pub key: String,
}

impl KeySource {
    /// Key lines given in place.
    pub fn text(key: &str) -> Self {
        KeySource::Text(KeyText { key: key.into() })
    }
}

impl Settings {
    /// `self` with every field `over` gives replaced. A layer that names another user starts
    /// that user's keys and password afresh (they were the other user's).
    pub fn overlay(mut self, over: &Settings) -> Settings {
        if over.user.is_some() && over.user != self.user {
            self.ssh_keys = None;
            self.password_file = None;
        }
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f.clone(); } )* };
        }
        take!(
            hostname,
            user,
            ssh_keys,
            root_ssh_keys,
            password_file,
            root_password_file,
            timezone,
            dns,
            search_domain,
            ntp,
            keymap,
            interfaces,
            cloud_init
        );
        self
    }

    pub fn is_empty(&self) -> bool {
        *self == Settings::default()
    }

    /// Relative file paths taken from `base` (the config file's folder).
    fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for list in [&mut self.ssh_keys, &mut self.root_ssh_keys]
            .into_iter()
            .flatten()
        {
            for k in list.iter_mut() {
                if let KeySource::File(p) = k {
                    fix(p);
                }
            }
        }
        for p in [&mut self.password_file, &mut self.root_password_file]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
    }
}

/// The kinds of artifact a `[target.KIND]` table applies to.
pub const TARGET_KINDS: &[&str] = &["disk", "wsl", "lxd"];

/// `abox.toml`: identity settings at the top, per recipe (`[recipe.NAME]`, NAME = the image's
/// name, as in `out/NAME/`) and per artifact kind (`[target.disk]`, `[target.wsl]`,
/// `[target.lxd]`; the LXD/Incus VM image is `lxd`).
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    pub top: Settings,
    pub recipe: BTreeMap<String, Settings>,
    pub target: BTreeMap<String, Settings>,
}

/// The file as written: [`Settings`]' keys at the top level, typed (serde's `flatten` would
/// lose the position of a type error and the list of keys of an unknown one).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    hostname: Option<String>,
    user: Option<String>,
    ssh_keys: Option<Vec<KeySource>>,
    root_ssh_keys: Option<Vec<KeySource>>,
    password_file: Option<PathBuf>,
    root_password_file: Option<PathBuf>,
    timezone: Option<String>,
    dns: Option<Vec<String>>,
    search_domain: Option<String>,
    ntp: Option<Vec<String>>,
    keymap: Option<String>,
    interfaces: Option<String>,
    cloud_init: Option<bool>,
    #[serde(default)]
    recipe: BTreeMap<String, Settings>,
    #[serde(default)]
    target: BTreeMap<String, Settings>,
}

/// The config file's name in the project root.
pub const CONFIG_NAME: &str = "abox.toml";

/// A TOML error as `PATH: line L, column C: MESSAGE`, without the source line (a value typed
/// where it does not belong may be a password).
fn toml_error(e: toml::de::Error, text: &str, path: &Path) -> anyhow::Error {
    let at = e
        .span()
        .map(|s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
            let col = before.len() - start + 1;
            // The key the line assigns (never its value).
            let key = text[start..]
                .lines()
                .next()
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                })
                .map(|k| format!("key `{k}`: "))
                .unwrap_or_default();
            format!("line {line}, column {col}: {key}")
        })
        .unwrap_or_default();
    let msg = e.message().trim();
    let hint = if msg.contains("unknown field `password`")
        || msg.contains("unknown field `root-password`")
    {
        "; a password goes in a file of its own: password-file = \"FILE\""
    } else {
        ""
    };
    anyhow::anyhow!("{}: {at}{msg}{hint}", path.display())
}

impl ConfigFile {
    /// Parse `text` (from `path`, named in errors; relative paths in it are taken from its
    /// folder). Errors: TOML syntax, unknown keys and wrong types, with line and column (never
    /// the line's text); a `[target.X]` that is not one of [`TARGET_KINDS`].
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile> {
        let r: RawConfig = toml::from_str(text).map_err(|e| toml_error(e, text, path))?;
        let mut c = ConfigFile {
            top: Settings {
                hostname: r.hostname,
                user: r.user,
                ssh_keys: r.ssh_keys,
                root_ssh_keys: r.root_ssh_keys,
                password_file: r.password_file,
                root_password_file: r.root_password_file,
                timezone: r.timezone,
                dns: r.dns,
                search_domain: r.search_domain,
                ntp: r.ntp,
                keymap: r.keymap,
                interfaces: r.interfaces,
                cloud_init: r.cloud_init,
            },
            recipe: r.recipe,
            target: r.target,
        };
        for k in c.target.keys() {
            if !TARGET_KINDS.contains(&k.as_str()) {
                bail!(
                    "{}: [target.{k}]: unknown target kind; use one of {}",
                    path.display(),
                    TARGET_KINDS.join(", ")
                );
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        c.top.rebase(base);
        c.recipe.values_mut().for_each(|s| s.rebase(base));
        c.target.values_mut().for_each(|s| s.rebase(base));
        Ok(c)
    }

    /// Read `path` (at most 1 MiB).
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = read_small(path, "the config file")?;
        Self::parse(&text, path)
    }

    /// The settings for recipe `name`'s artifacts of kind `kind`.
    pub fn settings(&self, name: &str, kind: &str) -> Settings {
        let mut s = self.top.clone();
        if let Some(r) = self.recipe.get(name) {
            s = s.overlay(r);
        }
        if let Some(t) = self.target.get(kind) {
            s = s.overlay(t);
        }
        s
    }
}

/// Read a small text file the user gave (bounded: at most 1 MiB; a FIFO or device refused before
/// it is opened).
pub fn read_small(path: &Path, what: &str) -> Result<String> {
    const MAX: u64 = 1 << 20;
    let md = std::fs::metadata(path)
        .with_context(|| format!("{what} {}: cannot read it", path.display()))?;
    if !md.is_file() {
        bail!("{what} {}: not a regular file", path.display());
    }
    if md.len() > MAX {
        bail!(
            "{what} {}: {} bytes; at most {MAX} are read",
            path.display(),
            md.len()
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    String::from_utf8(bytes).with_context(|| format!("{what} {}: not UTF-8 text", path.display()))
}

/// Where the layers come from: the config file (`--config`, else `abox.toml` in the current
/// folder when there is one), an answer file, and the flags.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub config: Option<ConfigFile>,
    pub answers: Option<Settings>,
    pub flags: Settings,
    /// Key and password files already read (each is read once per run).
    pub cache: std::sync::Arc<std::sync::Mutex<Resolver>>,
}

impl Sources {
    /// Load the config (`explicit`, else `./abox.toml` if present and not `no_config`) and the
    /// answer file; the answer file's ignored options are warned about.
    pub fn load(
        explicit: Option<&Path>,
        no_config: bool,
        answers: Option<&Path>,
        flags: Settings,
    ) -> Result<Sources> {
        let config = match explicit {
            Some(p) => Some(ConfigFile::load(p)?),
            None if !no_config && Path::new(CONFIG_NAME).is_file() => {
                // Said whatever the progress mode: it puts users and keys into every artifact.
                log::warn!(
                    "identity settings (users, keys, hostname…) from ./{CONFIG_NAME} go into \
                     every artifact; --no-config leaves it out"
                );
                Some(ConfigFile::load(Path::new(CONFIG_NAME))?)
            }
            None => None,
        };
        let answers = match answers {
            Some(p) => {
                let text = read_small(p, "the answer file")?;
                let a = answers::parse(&text)
                    .with_context(|| format!("the answer file {}", p.display()))?;
                // Said whatever the progress mode: a dropped option may be one the user relies on.
                for (var, why) in &a.ignored {
                    log::warn!("{}: {var} ignored: {why}", p.display());
                }
                Some(a.settings)
            }
            None => None,
        };
        Ok(Sources {
            config,
            answers,
            flags,
            cache: Default::default(),
        })
    }

    /// The layered settings for recipe `name`, artifact kind `kind` (one of [`TARGET_KINDS`]).
    pub fn settings(&self, name: &str, kind: &str) -> Settings {
        let mut s = self
            .config
            .as_ref()
            .map(|c| c.settings(name, kind))
            .unwrap_or_default();
        if let Some(a) = &self.answers {
            s = s.overlay(a);
        }
        s.overlay(&self.flags)
    }

    /// Check every layer the sources hold (the top level and each `[recipe.NAME]`, for each
    /// kind) before work that comes first (`abox all` builds before it writes).
    pub fn check(&self) -> Result<()> {
        let mut r = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut names = vec![String::new()];
        if let Some(c) = &self.config {
            names.extend(c.recipe.keys().cloned());
        }
        for n in &names {
            for k in TARGET_KINDS {
                let in_target = self
                    .config
                    .as_ref()
                    .is_some_and(|c| c.target.contains_key(*k));
                let r = self.settings(n, k).resolve(&mut r);
                match (n.is_empty(), in_target) {
                    (true, false) => r.map(drop)?,
                    (true, true) => r.map(drop).with_context(|| format!("[target.{k}]"))?,
                    (false, _) => r
                        .map(drop)
                        .with_context(|| format!("[recipe.{n}] for {k} artifacts"))?,
                }
            }
        }
        Ok(())
    }

    /// Resolve the settings of recipe `name` for artifacts of `kind` (key and password files
    /// come from the run's cache: each is read once).
    pub fn resolve(&self, name: &str, kind: &str) -> Result<Identity> {
        let mut r = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.settings(name, kind).resolve(&mut r)
    }
}

/// A user to create or complete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSpec {
    pub name: String,
    /// authorized_keys lines.
    pub keys: Vec<String>,
    /// A crypt(3) hash.
    pub hash: Option<String>,
}

/// Checked identity settings, ready to write. Holds password hashes: never logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub hostname: Option<String>,
    pub search_domain: Option<String>,
    pub user: Option<UserSpec>,
    pub root_keys: Vec<String>,
    pub root_hash: Option<String>,
    pub timezone: Option<String>,
    pub dns: Vec<IpAddr>,
    pub ntp: Vec<String>,
    /// (layout, variant).
    pub keymap: Option<(String, String)>,
    pub interfaces: Option<String>,
    /// tiny-cloud set up for NoCloud ([`Settings::cloud_init`]).
    pub cloud_init: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("hostname", &self.hostname)
            .field("user", &self.user.as_ref().map(|u| &u.name))
            .field("timezone", &self.timezone)
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn is_empty(&self) -> bool {
        *self == Identity::default()
    }
    /// Whether any SSH key is given (user's or root's).
    pub fn has_keys(&self) -> bool {
        !self.root_keys.is_empty() || self.user.as_ref().is_some_and(|u| !u.keys.is_empty())
    }
    /// Whether the shadow file changes.
    pub fn touches_shadow(&self) -> bool {
        self.user.is_some() || self.root_hash.is_some() || !self.root_keys.is_empty()
    }
}

/// Reads each key and password file once per run.
#[derive(Default)]
pub struct Resolver {
    hashes: HashMap<PathBuf, String>,
    keys: HashMap<PathBuf, Vec<String>>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Holds password hashes: never printed.
        f.write_str("Resolver { .. }")
    }
}

impl Resolver {
    fn hash(&mut self, p: &Path, whose: &str) -> Result<String> {
        if let Some(h) = self.hashes.get(p) {
            return Ok(h.clone());
        }
        let h = password_hash(p, whose)?;
        self.hashes.insert(p.to_path_buf(), h.clone());
        Ok(h)
    }

    fn keys(&mut self, sources: &[KeySource], flag: &str) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for s in sources {
            let lines = match s {
                KeySource::File(p) => {
                    if let Some(k) = self.keys.get(p) {
                        k.clone()
                    } else {
                        let text = read_small(p, &format!("{flag} file"))?;
                        let k = writers::key_lines(&text)
                            .with_context(|| format!("{flag} {}", p.display()))?;
                        self.keys.insert(p.clone(), k.clone());
                        k
                    }
                }
                KeySource::Text(KeyText { key }) => {
                    writers::key_lines(key).with_context(|| format!("{flag}: {key:?}"))?
                }
            };
            for l in lines {
                if !out.contains(&l) {
                    out.push(l);
                }
            }
        }
        Ok(out)
    }
}

impl Settings {
    /// Check every value and read the files: the key files (each line an authorized_keys
    /// line, see [`writers::key_lines`]), the password files (hashed with SHA-512 crypt unless
    /// they hold a crypt hash). Errors name the setting and the input.
    pub fn resolve(&self, r: &mut Resolver) -> Result<Identity> {
        let mut id = Identity::default();
        if let Some(h) = &self.hostname {
            check_hostname(h)?;
            id.hostname = Some(h.clone());
        }
        if let Some(d) = &self.search_domain {
            check_domain(d).with_context(|| format!("search domain {d:?}"))?;
            id.search_domain = Some(d.clone());
        }
        match &self.user {
            Some(name) => {
                check_user_name(name)?;
                let keys = r.keys(self.ssh_keys.as_deref().unwrap_or(&[]), "--ssh-key")?;
                let hash = self
                    .password_file
                    .as_deref()
                    .map(|p| r.hash(p, name))
                    .transpose()?;
                id.user = Some(UserSpec {
                    name: name.clone(),
                    keys,
                    hash,
                });
            }
            None => {
                if self.ssh_keys.as_ref().is_some_and(|k| !k.is_empty()) {
                    bail!("--ssh-key needs --user NAME (the user whose keys they are); root's keys go with --root-ssh-key");
                }
                if self.password_file.is_some() {
                    bail!("--password-file needs --user NAME; root's password goes with --root-password-file");
                }
            }
        }
        id.root_keys = r.keys(
            self.root_ssh_keys.as_deref().unwrap_or(&[]),
            "--root-ssh-key",
        )?;
        id.root_hash = self
            .root_password_file
            .as_deref()
            .map(|p| r.hash(p, "root"))
            .transpose()?;
        if let Some(tz) = &self.timezone {
            check_timezone(tz)?;
            id.timezone = Some(tz.clone());
        }
        for d in self.dns.iter().flatten() {
            for part in d.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let ip: IpAddr = part
                    .parse()
                    .with_context(|| format!("--dns {part:?}: not an IPv4 or IPv6 address"))?;
                if !id.dns.contains(&ip) {
                    id.dns.push(ip);
                }
            }
        }
        for n in self.ntp.iter().flatten() {
            for part in n.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if part.parse::<IpAddr>().is_err() {
                    check_domain(part).with_context(|| {
                        format!("--ntp {part:?}: not a host name or an address")
                    })?;
                }
                id.ntp.push(part.to_string());
            }
        }
        if let Some(k) = &self.keymap {
            id.keymap = Some(parse_keymap(k)?);
        }
        if let Some(i) = &self.interfaces {
            if !i.lines().any(|l| l.trim_start().starts_with("iface ")) {
                bail!("interfaces: no `iface` stanza; give /etc/network/interfaces' whole text (e.g. \"auto eth0\\niface eth0 inet dhcp\")");
            }
            id.interfaces = Some(if i.ends_with('\n') {
                i.clone()
            } else {
                format!("{i}\n")
            });
        }
        id.cloud_init = self.cloud_init.unwrap_or(false);
        Ok(id)
    }
}

/// A password file's first line as a crypt(3) hash: a hash (`$6$…`, `$y$…`) as it is, anything
/// else hashed with SHA-512 crypt (random salt). `whose` names the account in errors.
pub fn password_hash(file: &Path, whose: &str) -> Result<String> {
    use sha_crypt::password_hash::PasswordHasher;
    use std::io::Read;
    let text = read_small(file, &format!("{whose}'s password file"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        bail!(
            "{} is empty: put {whose}'s password (or its crypt hash) on its first line",
            file.display()
        );
    }
    if is_crypt_hash(line) {
        return Ok(line.to_string());
    }
    if ["$1$", "$2a$", "$2b$", "$2y$", "$5$", "$6$", "$y$"]
        .iter()
        .any(|p| line.starts_with(p))
    {
        bail!(
            "{}: the first line starts like a crypt hash but is not a whole one (truncated?); \
             give the password itself or the whole hash (mkpasswd -m sha-512)",
            file.display()
        );
    }
    let mut salt = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .context("reading /dev/urandom")?;
    let h = sha_crypt::ShaCrypt::SHA512
        .hash_password_with_salt(line.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing {whose}'s password: {e}"))?;
    Ok(h.to_string())
}

/// Whether `s` is a crypt(3) hash a Linux C library checks: `$ID$[rounds=N$]SALT$HASH` with ID
/// one of MD5 (1), bcrypt (2a, 2b, 2y), SHA-256 (5), SHA-512 (6), yescrypt (y) — salt and hash
/// in crypt's base64 alphabet (`./0-9A-Za-z`; yescrypt's parameters too). Anything else in a
/// password file is the password itself.
pub fn is_crypt_hash(s: &str) -> bool {
    let parts: Vec<&str> = s.split('$').collect();
    let b64 = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    };
    match parts.as_slice() {
        ["", "1" | "5" | "6", salt, hash] => b64(salt) && b64(hash),
        ["", "5" | "6", rounds, salt, hash] => {
            rounds
                .strip_prefix("rounds=")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                && b64(salt)
                && b64(hash)
        }
        ["", "2a" | "2b" | "2y", cost, rest] => {
            cost.len() == 2
                && cost.bytes().all(|b| b.is_ascii_digit())
                && rest.len() == 53
                && b64(rest)
        }
        ["", "y", params, salt, hash] => b64(params) && b64(salt) && b64(hash),
        _ => false,
    }
}

/// A host name as `hostname(1)` and setup-alpine take it: labels of letters, digits and `-`
/// (not at a label's ends), 1–63 characters each, dot-separated, at most 253 in all (RFC 1123).
pub fn check_hostname(h: &str) -> Result<()> {
    check_domain(h)
        .map_err(|e| anyhow::anyhow!("--hostname {h:?}: {e} (e.g. box1 or box1.home.arpa)"))
}

fn check_domain(d: &str) -> Result<()> {
    if d.is_empty() || d.len() > 253 {
        bail!("must be 1 to 253 characters");
    }
    for label in d.split('.') {
        if label.is_empty() || label.len() > 63 {
            bail!("each dot-separated part must be 1 to 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            bail!("a part may not start or end with '-'");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            bail!("only letters, digits and '-' are allowed");
        }
    }
    Ok(())
}

/// A user name busybox `adduser` and shadow's `useradd` both accept: a lower-case letter or
/// `_` first, then lower-case letters, digits, `_`, `-` or `.`; at most 32 characters; not root.
pub fn check_user_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 32
        && n.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b));
    if !ok {
        bail!(
            "--user {n:?}: adduser would refuse it; use at most 32 lower-case letters, digits, \
             '_', '-' or '.', starting with a letter or '_'"
        );
    }
    if n == "root" {
        bail!("--user root: root exists; use --root-ssh-key and --root-password-file");
    }
    Ok(())
}

/// A tz database name: `UTC`, `Area/City`, `Area/Sub/City`; letters, digits, `_`, `-`, `+`.
pub fn check_timezone(tz: &str) -> Result<()> {
    let ok = !tz.is_empty()
        && tz.len() <= 64
        && tz.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-+".contains(&b))
        });
    if !ok {
        bail!("--timezone {tz:?}: not a time zone name (like Europe/Berlin or UTC)");
    }
    Ok(())
}

/// `LAYOUT VARIANT` (setup-alpine's KEYMAPOPTS), `LAYOUT/VARIANT`, or `LAYOUT` alone (variant =
/// layout): the keymap `/usr/share/bkeymaps/LAYOUT/VARIANT.bmap.gz`.
pub fn parse_keymap(k: &str) -> Result<(String, String)> {
    let parts: Vec<&str> = k
        .split(|c: char| c.is_whitespace() || c == '/')
        .filter(|s| !s.is_empty())
        .collect();
    let good = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    };
    match parts.as_slice() {
        [l] if good(l) => Ok((l.to_string(), l.to_string())),
        [l, v] if good(l) && good(v) => Ok((l.to_string(), v.to_string())),
        _ => bail!(
            "--keymap {k:?}: expected LAYOUT VARIANT (e.g. \"us us\" or \"de de-nodeadkeys\")"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layers_top_recipe_target_and_paths_from_its_folder() {
        let c = ConfigFile::parse(
            "hostname = \"lab\"\nuser = \"alice\"\nssh-keys = [\"keys/alice.pub\"]\n\
             timezone = \"Europe/Berlin\"\n\
             [recipe.docker-host]\nhostname = \"docker1\"\n\
             [target.wsl]\nuser = \"me\"\n",
            Path::new("/p/abox.toml"),
        )
        .unwrap();
        let s = c.settings("docker-host", "disk");
        assert_eq!(s.hostname.as_deref(), Some("docker1"));
        assert_eq!(s.user.as_deref(), Some("alice"));
        assert_eq!(
            s.ssh_keys,
            Some(vec![KeySource::File("/p/keys/alice.pub".into())])
        );
        let w = c.settings("base", "wsl");
        assert_eq!(w.hostname.as_deref(), Some("lab"));
        assert_eq!(w.user.as_deref(), Some("me"));
        assert_eq!(w.timezone.as_deref(), Some("Europe/Berlin"));
    }

    #[test]
    fn config_typos_are_errors_naming_key_and_line() {
        for (text, key, line) in [
            ("hostname = \"a\"\nhostnme = \"b\"\n", "hostnme", "line 2"),
            ("[recipe.base]\nusr = \"x\"\n", "usr", "line 2"),
            ("[target.wsl]\n\ntimezon = \"UTC\"\n", "timezon", "line 3"),
        ] {
            let e = format!(
                "{:#}",
                ConfigFile::parse(text, Path::new("abox.toml")).unwrap_err()
            );
            assert!(e.contains(key) && e.contains(line), "{text:?}: {e}");
            assert!(e.contains("abox.toml"), "{e}");
        }
        let e = ConfigFile::parse("[target.vm]\nuser = \"a\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("disk, wsl, lxd"), "{e}");
        let e = ConfigFile::parse("user = 3\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        // A type error at the top level: its own line and key.
        let e =
            ConfigFile::parse("user = \"a\"\n\nntp = \"x\"\n", Path::new("x.toml")).unwrap_err();
        assert!(
            e.to_string().contains("line 3") && e.to_string().contains("key `ntp`"),
            "{e}"
        );
        // A password typed in: never repeated, and where it goes instead.
        let e = ConfigFile::parse("password = \"Hunter2-Secret\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("Hunter2") && e.contains("password-file"), "{e}");
        let e = ConfigFile::parse("user = \"Hunter2-Secret\"\nx = 1\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("Hunter2"), "{e}");
        // Unknown keys inside a key table too.
        assert!(ConfigFile::parse(
            "ssh-keys = [{ key = \"k\", typo = 1 }]\n",
            Path::new("x.toml")
        )
        .is_err());
    }

    #[test]
    fn flags_override_answers_override_the_config() {
        let src = Sources {
            config: Some(
                ConfigFile::parse(
                    "hostname = \"cfg\"\ntimezone = \"UTC\"\nntp = [\"a\"]\n",
                    Path::new("c.toml"),
                )
                .unwrap(),
            ),
            answers: Some(Settings {
                hostname: Some("ans".into()),
                ntp: Some(vec!["b".into()]),
                ..Default::default()
            }),
            flags: Settings {
                hostname: Some("flag".into()),
                ..Default::default()
            },
            cache: Default::default(),
        };
        let s = src.settings("x", "disk");
        assert_eq!(s.hostname.as_deref(), Some("flag"));
        assert_eq!(s.ntp, Some(vec!["b".to_string()]));
        assert_eq!(s.timezone.as_deref(), Some("UTC"));
    }

    #[test]
    fn values_are_checked() {
        for bad in ["-a", "a_b", "", "x..y", &"a".repeat(64)] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
        for good in ["box1", "box-1.home.arpa", "A1"] {
            check_hostname(good).unwrap();
        }
        for bad in [
            "Alice",
            "1abc",
            "a b",
            "root",
            "a:b",
            "",
            &"a".repeat(33),
            "-x",
        ] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
        for good in ["alice", "_svc", "a.b-c_1"] {
            check_user_name(good).unwrap();
        }
        for bad in [
            "../etc/passwd",
            "/UTC",
            "Europe//Berlin",
            "Europe/Ber lin",
            "",
        ] {
            assert!(check_timezone(bad).is_err(), "{bad:?}");
        }
        check_timezone("America/Argentina/Buenos_Aires").unwrap();
        check_timezone("Etc/GMT+5").unwrap();
        assert_eq!(
            parse_keymap("de de-nodeadkeys").unwrap(),
            ("de".into(), "de-nodeadkeys".into())
        );
        assert_eq!(parse_keymap("us").unwrap(), ("us".into(), "us".into()));
        assert!(parse_keymap("us ../x").is_err());
        let mut r = Resolver::default();
        let e = Settings {
            dns: Some(vec!["1.1.1.1,nope".into()]),
            ..Default::default()
        }
        .resolve(&mut r)
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = Settings {
            ssh_keys: Some(vec![KeySource::text(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ5 x",
            )]),
            ..Default::default()
        }
        .resolve(&mut r)
        .unwrap_err();
        assert!(e.to_string().contains("--user"), "{e}");
        let id = Settings {
            dns: Some(vec!["1.1.1.1, 2606:4700::1111".into(), "1.1.1.1".into()]),
            ..Default::default()
        }
        .resolve(&mut r)
        .unwrap();
        assert_eq!(id.dns.len(), 2);
    }

    #[test]
    fn password_files_are_hashed_once_and_hashes_kept() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        std::fs::write(&p, "secret\n").unwrap();
        let mut r = Resolver::default();
        let a = r.hash(&p, "alice").unwrap();
        std::fs::write(&p, "changed\n").unwrap();
        assert_eq!(r.hash(&p, "alice").unwrap(), a, "read once per run");
        assert!(a.starts_with("$6$"));
        std::fs::write(&p, "$6$abc$def\n").unwrap();
        assert_eq!(password_hash(&p, "x").unwrap(), "$6$abc$def");
        // A password that merely has dollars is a password; a BOM is not part of it.
        std::fs::write(&p, "$6$bad\n").unwrap();
        assert!(password_hash(&p, "x")
            .unwrap_err()
            .to_string()
            .contains("not a whole one"));
        std::fs::write(&p, "$uper$ecret$pass\n").unwrap();
        assert!(password_hash(&p, "x").unwrap().starts_with("$6$"));
        std::fs::write(&p, "\u{feff}$6$rounds=5000$salt$hash\n").unwrap();
        assert_eq!(password_hash(&p, "x").unwrap(), "$6$rounds=5000$salt$hash");
        assert!(is_crypt_hash("$y$j9T$salt$hash"));
        assert!(!is_crypt_hash("$6$a b$c"));
        std::fs::write(&p, "\n").unwrap();
        assert!(password_hash(&p, "x").is_err());
    }
}
