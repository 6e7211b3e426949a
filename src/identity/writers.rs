//! The identity's file writers: pure functions from a file's current text (empty when the image
//! has none) to its new text. Line formats follow the files' manuals: passwd(5), shadow(5),
//! group(5) as busybox and shadow-utils read them, sshd_config(5) (the first value of a keyword
//! wins), resolv.conf(5), chrony.conf(5), Alpine's `/etc/conf.d/ntpd` (busybox ntpd) and
//! `/etc/conf.d/loadkmap`, WSL's wsl.conf (INI).

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use base64::Engine;

/// Lines of a text with CRLF and a missing final newline made regular.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(|l| l.trim_end_matches('\r'))
}

/// SSH public-key algorithms an authorized_keys line may name (sshd(8), AUTHORIZED_KEYS).
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
];

/// Split an authorized_keys line into words, double quotes grouping (options like
/// `command="a b"`).
fn words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    out.push(&line[s..i]);
                }
                continue;
            }
            _ => {}
        }
        if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(&line[s..]);
    }
    out
}

/// The authorized_keys lines of a key file (what `ssh-keygen` writes in `*.pub`, or an
/// authorized_keys file): blank lines and `#` comments skipped; each line `[options] TYPE BASE64
/// [comment]`, whose base64 blob must decode and start with TYPE (RFC 4253 §6.6). Errors name
/// the line; a private key is refused as such; no key at all is an error.
pub fn key_lines(text: &str) -> Result<Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.contains("PRIVATE KEY-----") {
        bail!("this is a private key: give the public one (the .pub file next to it)");
    }
    let mut out = Vec::new();
    for (n, line) in lines(text).enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let w = words(l);
        // The line itself is never repeated in an error: a wrong file given here may hold a
        // secret (a password file, say).
        let Some(at) = w.iter().position(|t| KEY_TYPES.contains(t)) else {
            bail!(
                "line {}: not a public key line (no key type like ssh-ed25519, ssh-rsa, \
                 ecdsa-sha2-…); give the .pub file",
                n + 1
            );
        };
        if at > 1 {
            bail!(
                "line {}: not an authorized_keys line ([options] TYPE KEY [comment])",
                n + 1
            );
        }
        let ty = w[at];
        let blob = w.get(at + 1).copied().unwrap_or("");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .map_err(|_| anyhow::anyhow!("line {}: the {ty} key is not valid base64", n + 1))?;
        // The blob is SSH strings (RFC 4251 §5) end to end: the type name first, then the
        // key's fields; one cut short or with bytes left over is not a key.
        let mut fields = Vec::new();
        let mut rest = &bytes[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            match rest.get(4..4 + len) {
                Some(f) => fields.push(f),
                None => break,
            }
            rest = &rest[4 + len..];
        }
        if fields.first() != Some(&ty.as_bytes()) || fields.len() < 2 || !rest.is_empty() {
            bail!(
                "line {}: the key's data is not a whole {ty} key (truncated or pasted wrongly)",
                n + 1
            );
        }
        out.push(l.to_string());
    }
    if out.is_empty() {
        bail!("no key in it (expected lines like `ssh-ed25519 AAAA… user@host`)");
    }
    Ok(out)
}

/// `~/.ssh/authorized_keys`: the existing lines, then each of `keys` not already there.
pub fn authorized_keys(existing: &str, keys: &[String]) -> String {
    let mut out = String::new();
    let have: Vec<&str> = lines(existing).collect();
    for l in &have {
        out.push_str(l);
        out.push('\n');
    }
    for k in keys {
        if !have.iter().any(|h| h.trim() == k) {
            out.push_str(k);
            out.push('\n');
        }
    }
    out
}

/// One passwd(5) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// The entries of a passwd file (lines that do not parse are skipped).
pub fn passwd_entries(text: &str) -> Vec<PasswdEntry> {
    lines(text)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || f[0].starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].into(),
                shell: f[6].into(),
            })
        })
        .collect()
}

/// (name, gid, members) of a group file.
pub fn group_entries(text: &str) -> Vec<(String, u32, Vec<String>)> {
    lines(text)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || f[0].starts_with('#') {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Where the user ends up: existing (as the image has it) or to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Absolute.
    pub home: String,
    /// Created by abox (not in the image's passwd).
    pub new: bool,
}

/// The account `name` in `passwd`, or a new one as busybox `adduser -D` makes it: uid 1000 or
/// the lowest free one above it, a group of the same name whose gid is the uid when free
/// (else the lowest free from 1000), home `/home/NAME`.
///
/// Errors: a line for `name` that does not parse (the account would be added twice), or no
/// free id below 60000.
pub fn plan_account(name: &str, passwd: &str, group: &str) -> anyhow::Result<Account> {
    let users = passwd_entries(passwd);
    if let Some(u) = users.iter().find(|u| u.name == name) {
        return Ok(Account {
            name: name.into(),
            uid: u.uid,
            gid: u.gid,
            home: u.home.clone(),
            new: false,
        });
    }
    if lines(passwd).any(|l| l.split(':').next() == Some(name)) {
        bail!(
            "the image's /etc/passwd has a line for {name} that is not NAME:PASSWORD:UID:GID:\
             GECOS:HOME:SHELL; fix it in the image"
        );
    }
    // Ids taken: those of every line with a number in the field, parsed or not.
    let taken = |text: &str, field: usize| -> Vec<u32> {
        lines(text)
            .filter_map(|l| l.split(':').nth(field)?.parse().ok())
            .collect()
    };
    let uids = taken(passwd, 2);
    let gids = taken(group, 2);
    let groups = group_entries(group);
    let free = |ids: &[u32]| (1000..60000).find(|n| !ids.contains(n));
    let uid = free(&uids).context("no free uid between 1000 and 59999")?;
    let gid = match groups.iter().find(|(g, _, _)| g == name) {
        Some((_, gid, _)) => *gid,
        None if !gids.contains(&uid) => uid,
        None => free(&gids).context("no free gid between 1000 and 59999")?,
    };
    Ok(Account {
        name: name.into(),
        uid,
        gid,
        home: format!("/home/{name}"),
        new: true,
    })
}

fn normalized(text: &str) -> String {
    let mut s = String::new();
    for l in lines(text) {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// passwd with the account's line added when it is new (Alpine's adduser fields: `Linux
/// User,,,`, `/bin/sh`).
pub fn passwd(text: &str, a: &Account) -> String {
    let mut s = normalized(text);
    if a.new && !passwd_entries(&s).iter().any(|u| u.name == a.name) {
        s.push_str(&format!(
            "{n}:x:{u}:{g}:Linux User,,,:{h}:/bin/sh\n",
            n = a.name,
            u = a.uid,
            g = a.gid,
            h = a.home
        ));
    }
    s
}

/// group with the account's own group (when new; no members listed, as addgroup makes it) and
/// the account in `wheel` (the group made, gid 10 or the lowest free under 1000, when the image
/// has none; a `wheel` line the image has in a shape abox cannot read is left alone).
pub fn group(text: &str, a: &Account) -> String {
    let text = normalized(text);
    let groups = group_entries(&text);
    let mut out = String::new();
    let mut wheel = false;
    for l in text.lines() {
        let mut f: Vec<String> = l.split(':').map(str::to_string).collect();
        if f.len() == 3 && f[0] == "wheel" {
            // `wheel:x:10` without its member field: the same group, no members yet.
            f.push(String::new());
        }
        if f.len() >= 4 && f[0] == "wheel" {
            wheel = true;
            let mut m: Vec<&str> = f[3].split(',').filter(|m| !m.is_empty()).collect();
            if !m.contains(&a.name.as_str()) {
                m.push(&a.name);
            }
            f[3] = m.join(",");
            out.push_str(&f.join(":"));
        } else {
            out.push_str(l);
        }
        out.push('\n');
    }
    let named = |n: &str| text.lines().any(|l| l.split(':').next() == Some(n));
    if !named(&a.name) && !groups.iter().any(|(_, g, _)| *g == a.gid) {
        // As busybox addgroup makes it: the user's primary group lists no members.
        out.push_str(&format!("{}:x:{}:\n", a.name, a.gid));
    }
    if !wheel && !named("wheel") {
        let gid = std::iter::once(10)
            .chain(100..1000)
            .find(|n| !groups.iter().any(|(_, g, _)| g == n))
            .unwrap_or(10);
        out.push_str(&format!("wheel:x:{gid}:{}\n", a.name));
    }
    out
}

/// What to do with an account's shadow password field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// Leave it.
    Keep,
    /// Set this crypt hash.
    Hash(String),
    /// Key login only: a locked field (`!…`) or an empty one becomes `*` — sshd refuses even
    /// key logins to a locked account when it runs without PAM (Alpine's openssh), and an empty
    /// field would let anyone in with no password.
    KeyOnly,
}

/// shadow with `name`'s password field set per `secret`, adding the line (last change =
/// `days` since the epoch, Alpine's adduser ageing `0:99999:7`) when there is none.
pub fn shadow(text: &str, name: &str, secret: &Secret, days: u64) -> String {
    let mut out = String::new();
    let mut found = false;
    let field = |old: &str| -> String {
        match secret {
            Secret::Keep => old.to_string(),
            Secret::Hash(h) => h.clone(),
            Secret::KeyOnly if old.is_empty() || old.starts_with('!') => "*".into(),
            Secret::KeyOnly => old.to_string(),
        }
    };
    for l in lines(text) {
        let mut f: Vec<String> = l.split(':').map(str::to_string).collect();
        if f.len() >= 2 && f[0] == name {
            found = true;
            f[1] = field(&f[1]);
            out.push_str(&f.join(":"));
        } else {
            out.push_str(l);
        }
        out.push('\n');
    }
    if !found {
        let pw = match secret {
            Secret::Hash(h) => h.clone(),
            // A new account without a password: locked to passwords (`*`) — what `!` does
            // for adduser, without locking it for keys.
            _ => "*".into(),
        };
        let line = format!("{name}:{pw}:{days}:0:99999:7:::\n");
        if name == "root" {
            out.insert_str(0, &line);
        } else {
            out.push_str(&line);
        }
    }
    out
}

/// `/etc/hostname`.
pub fn hostname(name: &str) -> String {
    format!("{name}\n")
}

/// `/etc/hosts` naming this host: the existing lines (CRLF made LF) without an earlier
/// `127.0.1.1` line, the localhost lines Alpine ships when none maps 127.0.0.1 to localhost,
/// and `127.0.1.1 FQDN NAME` (FQDN when a domain is known).
pub fn hosts(existing: &str, name: &str, domain: Option<&str>) -> String {
    let body: String = lines(existing)
        .filter(|l| l.split_whitespace().next() != Some("127.0.1.1"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut out = crate::disk::fixup::hosts(&body);
    let short = name.split('.').next().unwrap_or(name);
    let names = match (name.contains('.'), domain) {
        (true, _) => format!("{name} {short}"),
        (false, Some(d)) => format!("{name}.{d} {name}"),
        (false, None) => name.to_string(),
    };
    out.push_str(&format!("127.0.1.1\t{names}\n"));
    out
}

/// resolv.conf(5): `search` and `nameserver` lines (other options kept from `existing`).
pub fn resolv_conf(existing: &str, dns: &[IpAddr], domain: Option<&str>) -> String {
    let mut out = String::from("# Written by alpine-boxes.\n");
    let keep_search = domain.is_none();
    let keep_ns = dns.is_empty();
    if let Some(d) = domain {
        out.push_str(&format!("search {d}\n"));
    }
    for ip in dns {
        out.push_str(&format!("nameserver {ip}\n"));
    }
    for l in lines(existing) {
        let key = l.split_whitespace().next().unwrap_or("");
        let dropped = (key == "nameserver" && !keep_ns)
            || ((key == "search" || key == "domain") && !keep_search)
            || l.starts_with("# Written by alpine-boxes.");
        if !dropped {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// `/etc/udhcpc/udhcpc.conf` with `RESOLV_CONF="no"`: udhcpc (Alpine's DHCP client) then leaves
/// the resolv.conf given with `--dns` alone.
pub fn udhcpc_conf(existing: &str) -> String {
    let mut out: String = lines(existing)
        .filter(|l| !l.trim_start().starts_with("RESOLV_CONF="))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str("# alpine-boxes: the name servers are fixed (--dns)\nRESOLV_CONF=\"no\"\n");
    out
}

/// dhcpcd.conf(5) with `nohook resolv.conf`: dhcpcd (which ifupdown-ng runs when installed)
/// leaves the resolv.conf given with `--dns` alone.
pub fn dhcpcd_conf(existing: &str) -> String {
    let mut out = normalized(existing);
    let has = lines(existing).any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("nohook") && w.any(|h| h.trim_end_matches(',') == "resolv.conf")
    });
    if !has {
        out.push_str("# alpine-boxes: the name servers are fixed (--dns)\nnohook resolv.conf\n");
    }
    out
}

/// The OpenRC service an LXD/Incus container gets with `--hostname`: the running hostname from
/// `/etc/hostname` (LXD sets the instance name; OpenRC's own hostname service skips containers).
pub const LXD_HOSTNAME_SERVICE: &str = "#!/sbin/openrc-run
# Written by alpine-boxes: the hostname from /etc/hostname, also in a container (LXD names it
# after the instance, and OpenRC's hostname service does not run in containers).
description=\"Set the hostname from /etc/hostname\"

depend() {
\tbefore net
}

start() {
\tebegin \"Setting the hostname\"
\thostname -F /etc/hostname
\teend $?
}
";

/// chrony.conf(5): the image's `server`/`pool`/`peer` lines replaced by one `server NAME
/// iburst` per server, and its `initstepslew` (Alpine's: step a clock that is far off at
/// start) kept with the new servers; other lines kept.
pub fn chrony_conf(existing: &str, servers: &[String]) -> String {
    let mut out = String::new();
    let mut placed = false;
    let place = |out: &mut String| {
        for s in servers {
            out.push_str(&format!("server {s} iburst\n"));
        }
    };
    for l in lines(existing) {
        let mut words = l.split_whitespace();
        let key = words.next().unwrap_or("");
        if key == "initstepslew" {
            let threshold = words.next().unwrap_or("10");
            out.push_str(&format!("initstepslew {threshold} {}\n", servers.join(" ")));
            continue;
        }
        if matches!(key, "server" | "pool" | "peer") {
            if !placed {
                place(&mut out);
                placed = true;
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    if !placed {
        let mut head = String::new();
        place(&mut head);
        out.insert_str(0, &head);
    }
    if !out.lines().any(|l| l.starts_with("driftfile")) && existing.trim().is_empty() {
        out.push_str("driftfile /var/lib/chrony/chrony.drift\nrtcsync\n");
    }
    out
}

/// Alpine's `/etc/conf.d/ntpd` for busybox ntpd: `NTPD_OPTS="-N -p SERVER…"`.
pub fn ntpd_conf(existing: &str, servers: &[String]) -> String {
    let mut out: String = lines(existing)
        .filter(|l| !l.trim_start().starts_with("NTPD_OPTS="))
        .map(|l| format!("{l}\n"))
        .collect();
    let peers: Vec<String> = servers.iter().map(|s| format!("-p {s}")).collect();
    out.push_str(&format!("NTPD_OPTS=\"-N {}\"\n", peers.join(" ")));
    out
}

/// sshd_config(5) with `settings` first (sshd takes the first value of each keyword, so they win
/// over the image's lines, including an `Include` of drop-ins); the image's own active lines for
/// the same keywords before any `Match` are commented out so the file reads true.
pub fn sshd_config(existing: &str, settings: &[(&str, &str)]) -> String {
    let mut out = String::from("# alpine-boxes: first-boot identity\n");
    for (k, v) in settings {
        out.push_str(&format!("{k} {v}\n"));
    }
    out.push('\n');
    let mut in_match = false;
    for l in lines(existing) {
        let key = l.split_whitespace().next().unwrap_or("");
        in_match |= key.eq_ignore_ascii_case("match");
        if !in_match && settings.iter().any(|(k, _)| k.eq_ignore_ascii_case(key)) {
            out.push_str(&format!("#{l}  # replaced by alpine-boxes above\n"));
        } else if l == "# alpine-boxes: first-boot identity" {
            continue;
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// `/etc/conf.d/loadkmap` for OpenRC's loadkmap service.
pub fn loadkmap_conf(variant: &str) -> String {
    format!("KEYMAP=/etc/keymap/{variant}.bmap.gz\n")
}

/// A shell-variable config file (`KEY=value` lines, as tiny-cloud and OpenRC's conf.d source
/// them) with `key` set to `value` — which the caller keeps to characters that need no quoting
/// beyond double quotes (names, words): its active assignments are replaced by one, at the
/// first one's place, else it is appended.
pub fn conf_set(text: &str, key: &str, value: &str) -> String {
    let mut out = String::new();
    let mut placed = false;
    let line = format!("{key}=\"{value}\"\n");
    for l in lines(text) {
        if assigns(l, key).is_some() {
            if !placed {
                out.push_str(&line);
                placed = true;
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    if !placed {
        out.push_str(&line);
    }
    out
}

/// The value part of `l` when it assigns `key` (`KEY=…`, `export KEY=…`).
fn assigns<'a>(l: &'a str, key: &str) -> Option<&'a str> {
    let t = l.trim_start();
    let t = t.strip_prefix("export ").unwrap_or(t);
    t.strip_prefix(key)?.strip_prefix('=')
}

/// The words of `key`'s last active assignment: a quoted value up to its closing quote, an
/// unquoted one up to blank space; a trailing comment is not part of it.
fn conf_words(text: &str, key: &str) -> Vec<String> {
    let Some(v) = lines(text).filter_map(|l| assigns(l, key)).last() else {
        return Vec::new();
    };
    let value = match v.chars().next() {
        Some(q @ ('"' | '\'')) => v[1..].split(q).next().unwrap_or(""),
        _ => v.split(char::is_whitespace).next().unwrap_or(""),
    };
    value.split_whitespace().map(str::to_string).collect()
}

/// `/etc/tiny-cloud.conf` for NoCloud: `CLOUD=nocloud`, `CLOUD_USER` the given user (whose
/// authorized_keys tiny-cloud fills from the seed); on a disk `expand_root` is skipped (abox's
/// growroot service grows the root). The image's `SKIP_INIT_ACTIONS` names are kept (action
/// names only: letters, digits, `_`).
pub fn tiny_cloud_conf(existing: &str, user: Option<&str>, disk: bool) -> String {
    let mut t = conf_set(existing, "CLOUD", "nocloud");
    if let Some(u) = user {
        t = conf_set(&t, "CLOUD_USER", u);
    }
    if disk {
        let mut skip: Vec<String> = conf_words(&t, "SKIP_INIT_ACTIONS")
            .into_iter()
            .filter(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        if !skip.iter().any(|a| a == "expand_root") {
            skip.push("expand_root".into());
        }
        t = conf_set(&t, "SKIP_INIT_ACTIONS", &skip.join(" "));
    }
    t
}

/// Set `key=value` in INI `[section]` (replacing the key's value there, else adding it).
pub fn ini_set(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut out = String::new();
    let mut current = String::new();
    let mut done = false;
    let mut section_seen = false;
    let all: Vec<&str> = lines(text).collect();
    for (i, l) in all.iter().enumerate() {
        let t = l.trim();
        if t.starts_with('[') {
            current = t.to_ascii_lowercase();
            section_seen |= current == section;
        } else if current == section
            && t.split_once('=')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        {
            if !done {
                out.push_str(&format!("{key}={value}\n"));
                done = true;
            }
            continue;
        }
        out.push_str(l);
        out.push('\n');
        // Right after the section header: add it when the section has no such key.
        if t.eq_ignore_ascii_case(section) && !done {
            let has = all[i + 1..]
                .iter()
                .take_while(|n| !n.trim().starts_with('['))
                .any(|n| {
                    n.trim()
                        .split_once('=')
                        .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(key))
                });
            if !has {
                out.push_str(&format!("{key}={value}\n"));
                done = true;
            }
        }
    }
    if !section_seen {
        out.push_str(&format!("{section}\n{key}={value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ed25519 public key line (ssh-keygen's format).
    pub const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@lab";

    #[test]
    fn key_files_are_checked_line_by_line() {
        let text = format!(
            "# my keys\r\n\n{KEY}\r\nfrom=\"10.0.0.0/8\",command=\"echo hi there\" {KEY}\n"
        );
        let k = key_lines(&text).unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k[0], KEY);
        assert!(k[1].starts_with("from="));
        for (bad, says) in [
            ("", "no key"),
            ("# only a comment\n", "no key"),
            ("ssh-ed25519\n", "not a whole ssh-ed25519 key"),
            ("ssh-ed25519 !!!notbase64 x\n", "base64"),
            (
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
                "not a whole ssh-rsa key",
            ),
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9\n",
                "not a whole ssh-ed25519 key",
            ),
            ("hello world\n", "line 1: not a public key line"),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n",
                "private key",
            ),
        ] {
            let e = key_lines(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(
                !e.contains("hello") && !e.contains("notbase64"),
                "never echoed: {e}"
            );
        }
    }

    #[test]
    fn authorized_keys_adds_only_new_lines() {
        assert_eq!(authorized_keys("", &[KEY.into()]), format!("{KEY}\n"));
        assert_eq!(
            authorized_keys(&format!("{KEY}\r\nssh-rsa X"), &[KEY.into()]),
            format!("{KEY}\nssh-rsa X\n")
        );
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\nbob:x:1000:1000::/home/bob:/bin/sh";
    const GROUP: &str = "root:x:0:root\nwheel:x:10:root\nbob:x:1000:\n";

    #[test]
    fn accounts_are_planned_like_adduser() {
        let a = plan_account("alice", PASSWD, GROUP).unwrap();
        assert_eq!(
            a,
            Account {
                name: "alice".into(),
                uid: 1001,
                gid: 1001,
                home: "/home/alice".into(),
                new: true
            }
        );
        let b = plan_account("bob", PASSWD, GROUP).unwrap();
        assert!(!b.new && b.uid == 1000 && b.home == "/home/bob");
        let fresh = plan_account("alice", "root:x:0:0:root:/root:/bin/sh\n", "").unwrap();
        assert_eq!((fresh.uid, fresh.gid), (1000, 1000));
        // The uid's number is taken as a gid: the next free gid.
        let g = plan_account("alice", "root:x:0:0::/root:/bin/sh\n", "other:x:1000:\n").unwrap();
        assert_eq!((g.uid, g.gid), (1000, 1001));
        // A malformed line for the name: refused (not added twice); a malformed line's uid
        // still counts as taken.
        let e = plan_account("bob", "bob:x:1000:1000:/home/bob:/bin/sh\n", "").unwrap_err();
        assert!(e.to_string().contains("line for bob"), "{e}");
        let m = plan_account("alice", "bob:x:1000:1000:/home/bob:/bin/sh\n", "").unwrap();
        assert_eq!(m.uid, 1001);
        // wheel without its member field is the same group.
        assert_eq!(
            group("wheel:x:10\n", &m),
            "wheel:x:10:alice\nalice:x:1001:\n"
        );
    }

    #[test]
    fn passwd_and_group_gain_the_user() {
        let a = plan_account("alice", PASSWD, GROUP).unwrap();
        let p = passwd(PASSWD, &a);
        assert!(p.ends_with("bob:x:1000:1000::/home/bob:/bin/sh\nalice:x:1001:1001:Linux User,,,:/home/alice:/bin/sh\n"), "{p}");
        assert_eq!(passwd(&p, &a), p, "idempotent");
        let g = group(GROUP, &a);
        assert_eq!(
            g,
            "root:x:0:root\nwheel:x:10:root,alice\nbob:x:1000:\nalice:x:1001:\n"
        );
        assert_eq!(group(&g, &a), g, "idempotent");
        // No wheel group: made, at 10.
        assert_eq!(
            group("root:x:0:\r\n", &a),
            "root:x:0:\nalice:x:1001:\nwheel:x:10:alice\n"
        );
        // An existing user keeps its line; still joins wheel.
        let b = plan_account("bob", PASSWD, GROUP).unwrap();
        assert_eq!(passwd(PASSWD, &b), format!("{PASSWD}\n"));
        assert!(group(GROUP, &b).contains("wheel:x:10:root,bob\n"));
    }

    #[test]
    fn shadow_fields() {
        let s = "root:*:19000:0:::::\nbob:!:19000:0:99999:7:::\r\n";
        assert_eq!(
            shadow(s, "bob", &Secret::KeyOnly, 1),
            "root:*:19000:0:::::\nbob:*:19000:0:99999:7:::\n"
        );
        assert_eq!(
            shadow(s, "bob", &Secret::Hash("$6$s$h".into()), 1),
            "root:*:19000:0:::::\nbob:$6$s$h:19000:0:99999:7:::\n"
        );
        assert_eq!(
            shadow(s, "alice", &Secret::KeyOnly, 20000),
            format!("root:*:19000:0:::::\nbob:!:19000:0:99999:7:::\nalice:*:20000:0:99999:7:::\n")
        );
        assert_eq!(
            shadow("", "root", &Secret::Hash("$6$a$b".into()), 5),
            "root:$6$a$b:5:0:99999:7:::\n"
        );
        // A hash kept with KeyOnly (key and password both work).
        assert_eq!(
            shadow("x:$6$a$b:1::::::\n", "x", &Secret::KeyOnly, 1),
            "x:$6$a$b:1::::::\n"
        );
        assert_eq!(
            shadow("x::1::::::\n", "x", &Secret::KeyOnly, 1),
            "x:*:1::::::\n"
        );
    }

    #[test]
    fn hosts_names_this_host_and_keeps_localhost() {
        let h = hosts(
            "127.0.0.1 localhost\r\n127.0.1.1 old\n10.0.0.2 nas",
            "box1",
            Some("home.arpa"),
        );
        assert_eq!(
            h,
            "127.0.0.1 localhost\n10.0.0.2 nas\n127.0.1.1\tbox1.home.arpa box1\n"
        );
        let e = hosts("", "box1.lab", None);
        assert!(e.starts_with("127.0.0.1\tlocalhost"), "{e}");
        assert!(e.ends_with("127.0.1.1\tbox1.lab box1\n"), "{e}");
        assert_eq!(hostname("box1"), "box1\n");
    }

    #[test]
    fn resolv_chrony_ntpd_udhcpc() {
        let dns: Vec<IpAddr> = vec![
            "192.168.1.1".parse().unwrap(),
            "2606:4700::1111".parse().unwrap(),
        ];
        assert_eq!(
            resolv_conf("nameserver 8.8.8.8\r\noptions edns0\nsearch old", &dns, Some("home.arpa")),
            "# Written by alpine-boxes.\nsearch home.arpa\nnameserver 192.168.1.1\nnameserver 2606:4700::1111\noptions edns0\n"
        );
        assert_eq!(
            resolv_conf("nameserver 8.8.8.8\n", &[], Some("lab")),
            "# Written by alpine-boxes.\nsearch lab\nnameserver 8.8.8.8\n"
        );
        let alpine = "# default\npool pool.ntp.org iburst\ninitstepslew 10 pool.ntp.org\ndriftfile /var/lib/chrony/chrony.drift\nrtcsync\ncmdport 0\n";
        assert_eq!(
            chrony_conf(alpine, &["ntp1".into(), "10.0.0.1".into()]),
            "# default\nserver ntp1 iburst\nserver 10.0.0.1 iburst\ninitstepslew 10 ntp1 10.0.0.1\ndriftfile /var/lib/chrony/chrony.drift\nrtcsync\ncmdport 0\n"
        );
        assert_eq!(
            chrony_conf("", &["a".into()]),
            "server a iburst\ndriftfile /var/lib/chrony/chrony.drift\nrtcsync\n"
        );
        assert_eq!(
            ntpd_conf(
                "# busybox ntpd\nNTPD_OPTS=\"-N -p pool.ntp.org\"",
                &["a".into(), "b".into()]
            ),
            "# busybox ntpd\nNTPD_OPTS=\"-N -p a -p b\"\n"
        );
        assert_eq!(
            dhcpcd_conf("hostname\n"),
            "hostname\n# alpine-boxes: the name servers are fixed (--dns)\nnohook resolv.conf\n"
        );
        assert_eq!(
            dhcpcd_conf("nohook resolv.conf, wpa_supplicant\n"),
            "nohook resolv.conf, wpa_supplicant\n"
        );
        assert_eq!(
            udhcpc_conf("RESOLV_CONF=/etc/resolv.conf\n"),
            "# alpine-boxes: the name servers are fixed (--dns)\nRESOLV_CONF=\"no\"\n"
        );
    }

    #[test]
    fn sshd_config_puts_settings_first_and_comments_out_the_old() {
        let img = "Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin yes\n#PasswordAuthentication yes\nMatch User x\n\tPermitRootLogin yes\n";
        let s = sshd_config(
            img,
            &[("PermitRootLogin", "no"), ("PasswordAuthentication", "no")],
        );
        assert_eq!(
            s,
            "# alpine-boxes: first-boot identity\nPermitRootLogin no\nPasswordAuthentication no\n\n\
             Include /etc/ssh/sshd_config.d/*.conf\n#PermitRootLogin yes  # replaced by alpine-boxes above\n\
             #PasswordAuthentication yes\nMatch User x\n\tPermitRootLogin yes\n"
        );
    }

    #[test]
    fn tiny_cloud_conf_for_nocloud() {
        let shipped =
            "# Tiny Cloud configuration\n#CLOUD=\n#CLOUD_USER=alpine\n#SKIP_INIT_ACTIONS=\n";
        assert_eq!(
            tiny_cloud_conf(shipped, Some("alice"), true),
            format!("{shipped}CLOUD=\"nocloud\"\nCLOUD_USER=\"alice\"\nSKIP_INIT_ACTIONS=\"expand_root\"\n")
        );
        assert_eq!(
            tiny_cloud_conf(
                "CLOUD=aws\r\nSKIP_INIT_ACTIONS='set_hostname'\n",
                None,
                true
            ),
            "CLOUD=\"nocloud\"\nSKIP_INIT_ACTIONS=\"set_hostname expand_root\"\n"
        );
        assert_eq!(tiny_cloud_conf("", None, false), "CLOUD=\"nocloud\"\n");
        // A comment after the value, single quotes: the value's words, written safely.
        assert_eq!(
            tiny_cloud_conf("SKIP_INIT_ACTIONS=\"set_hostname\" # note\n", None, true),
            "SKIP_INIT_ACTIONS=\"set_hostname expand_root\"\nCLOUD=\"nocloud\"\n"
        );
        assert_eq!(
            tiny_cloud_conf("SKIP_INIT_ACTIONS='$(reboot) save_userdata'\n", None, true),
            "SKIP_INIT_ACTIONS=\"save_userdata expand_root\"\nCLOUD=\"nocloud\"\n"
        );
        let once = tiny_cloud_conf("", Some("a"), true);
        assert_eq!(tiny_cloud_conf(&once, Some("a"), true), once, "idempotent");
    }

    #[test]
    fn ini_set_replaces_or_adds() {
        assert_eq!(
            ini_set("", "[network]", "hostname", "b"),
            "[network]\nhostname=b\n"
        );
        assert_eq!(
            ini_set(
                "[user]\ndefault = bob\n[boot]\ncommand=x",
                "[user]",
                "default",
                "alice"
            ),
            "[user]\ndefault=alice\n[boot]\ncommand=x\n"
        );
        assert_eq!(
            ini_set(
                "[boot]\r\ncommand=x\n[network]\ngenerateHosts=true\n",
                "[network]",
                "hostname",
                "h"
            ),
            "[boot]\ncommand=x\n[network]\nhostname=h\ngenerateHosts=true\n"
        );
    }
}
