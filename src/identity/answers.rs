//! `setup-alpine -f FILE` answer files, read without a shell: setup-alpine sources the file
//! (`. "$ANSWERFILE"`), so it is a list of shell assignments — `NAME=value`, `NAME="…"`
//! (multi-line; `\"`, `\\`, `\$`, `` \` `` escapes), `NAME='…'`, `#` comments, an optional
//! `export`. Expansions (`$VAR`, `${VAR}`) of variables assigned earlier are done; command
//! substitution and anything else a shell would run is an error (abox runs no shell).
//!
//! Mapped onto [`Settings`] as setup-alpine's scripts read each option (setup-alpine(8), the
//! `setup-*` scripts of alpine-conf): HOSTNAMEOPTS (`[-n] NAME`), USEROPTS (`[-a] [-u] [-f
//! NAME] [-g GROUPS] [-k KEY] USER`), USERSSHKEY, ROOTSSHKEY, TIMEZONEOPTS (`[-z|-i] ZONE`),
//! DNSOPTS (`[-d DOMAIN] [-n] SERVER…`), INTERFACESOPTS (the interfaces file), KEYMAPOPTS
//! (`LAYOUT VARIANT`). Options that cannot apply to an image written offline (DISKOPTS,
//! APKREPOSOPTS, LBUOPTS…), the choice of NTP client or SSH server (the image's packages decide),
//! key URLs, and unknown variables are listed in [`Answers::ignored`] with the reason.

use anyhow::{bail, Result};

use super::{KeySource, Settings};

/// What an answer file gives.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Answers {
    pub settings: Settings,
    /// (variable, why it does not apply).
    pub ignored: Vec<(String, String)>,
}

/// The shell assignments of `text`, in order.
pub fn assignments(text: &str) -> Result<Vec<(String, String)>> {
    // A file saved on Windows: CRLF line ends are plain line ends here (a shell would keep the
    // \r in the values; setup-alpine would then write it into the files).
    let text = text.replace("\r\n", "\n");
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut line = 1;
    let mut out: Vec<(String, String)> = Vec::new();
    // `$NAME` of a variable assigned earlier; a lone `$` is itself; anything else is an error
    // (the variable would come from setup-alpine's environment, which abox does not have).
    let lookup =
        |out: &Vec<(String, String)>, name: &str, line: usize, word: &str| -> Result<String> {
            if name.is_empty() {
                return Ok("$".into());
            }
            match out.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => Ok(v.clone()),
                None => bail!(
                    "line {line}: {word} uses ${name}, which the answer file does not set \
                 (abox runs no shell); write the value itself"
                ),
            }
        };
    while i < chars.len() {
        // Blank space, ';', comments.
        match chars[i] {
            '\n' => {
                line += 1;
                i += 1;
                continue;
            }
            c if c.is_whitespace() || c == ';' => {
                i += 1;
                continue;
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        if word == "export" && i < chars.len() && chars[i].is_whitespace() {
            continue;
        }
        if word.is_empty()
            || word.starts_with(|c: char| c.is_ascii_digit())
            || i >= chars.len()
            || chars[i] != '='
        {
            let rest: String = chars[start..].iter().take_while(|c| **c != '\n').collect();
            bail!("line {line}: not a variable assignment: {rest:?} (an answer file holds only NAME=value lines)");
        }
        i += 1;
        let mut value = String::new();
        let at = line;
        // The value: a run of unquoted, '…' and "…" parts, up to unquoted blank space.
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != ';' {
            match chars[i] {
                '\'' => {
                    i += 1;
                    while i < chars.len() && chars[i] != '\'' {
                        line += (chars[i] == '\n') as usize;
                        value.push(chars[i]);
                        i += 1;
                    }
                    if i >= chars.len() {
                        bail!("line {at}: {word}: the ' is never closed");
                    }
                    i += 1;
                }
                '"' => {
                    i += 1;
                    loop {
                        let Some(&c) = chars.get(i) else {
                            bail!("line {at}: {word}: the \" is never closed");
                        };
                        match c {
                            '"' => {
                                i += 1;
                                break;
                            }
                            '\\' if matches!(chars.get(i + 1), Some('"' | '\\' | '$' | '`')) => {
                                value.push(chars[i + 1]);
                                i += 2;
                            }
                            '\\' if chars.get(i + 1) == Some(&'\n') => {
                                line += 1;
                                i += 2;
                            }
                            '$' => {
                                let (v, n) = expand(&chars[i..], line, &word)?;
                                value.push_str(&lookup(&out, &v, line, &word)?);
                                i += n;
                            }
                            '`' => bail!("line {line}: {word}: command substitution (`…`) is not run; write the value itself"),
                            c => {
                                line += (c == '\n') as usize;
                                value.push(c);
                                i += 1;
                            }
                        }
                    }
                }
                '\\' => {
                    if let Some(&c) = chars.get(i + 1) {
                        if c == '\n' {
                            line += 1;
                        } else {
                            value.push(c);
                        }
                    }
                    i += 2;
                }
                '$' => {
                    let (v, n) = expand(&chars[i..], line, &word)?;
                    value.push_str(&lookup(&out, &v, line, &word)?);
                    i += n;
                }
                '`' | '(' | ')' | '|' | '&' | '<' | '>' => bail!(
                    "line {line}: {word}: {:?} is shell syntax abox does not run; quote the value",
                    chars[i]
                ),
                c => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        // Anything after the value on the same line (other than a comment or another
        // assignment) would be a command: `A=1 cmd`.
        let mut j = i;
        while j < chars.len() && chars[j] != '\n' && chars[j].is_whitespace() {
            j += 1;
        }
        if j < chars.len() && chars[j] != '\n' && chars[j] != '#' && chars[j] != ';' {
            let mut k = j;
            while k < chars.len() && (chars[k].is_ascii_alphanumeric() || chars[k] == '_') {
                k += 1;
            }
            if k == j || chars.get(k) != Some(&'=') {
                bail!("line {line}: {word}: unquoted space in the value; quote it (\"…\")");
            }
        }
        out.push((word, value));
    }
    Ok(out)
}

/// `$NAME` or `${NAME}` at the start of `s`: (NAME, characters used). `$(` is refused.
fn expand(s: &[char], line: usize, word: &str) -> Result<(String, usize)> {
    match s.get(1) {
        Some('(') => {
            bail!(
                "line {line}: {word}: command substitution $(…) is not run; write the value itself"
            )
        }
        Some('{') => {
            let end = s
                .iter()
                .position(|c| *c == '}')
                .ok_or_else(|| anyhow::anyhow!("line {line}: {word}: ${{ is never closed"))?;
            let name: String = s[2..end].iter().collect();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("line {line}: {word}: ${{{name}}} is shell syntax abox does not run");
            }
            Ok((name, end + 1))
        }
        _ => {
            let n = s[1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                .count();
            if n == 0 {
                // A lone '$' is itself.
                return Ok((String::new(), 1));
            }
            Ok((s[1..=n].iter().collect(), n + 1))
        }
    }
}

/// Why each setup-alpine option that abox does not apply is left out.
const OFFLINE: &[(&str, &str)] = &[
    ("DEVDOPTS", "the device manager is the image's (install mdev, mdevd or udev in a recipe)"),
    ("DISKOPTS", "abox writes the disk itself (abox disk)"),
    ("APKREPOSOPTS", "no package is installed when an image is written; the image's /etc/apk/repositories is kept"),
    ("APKCACHEOPTS", "no package is installed when an image is written"),
    ("LBUOPTS", "lbu applies to diskless installs, not to images"),
    ("PROXYOPTS", "nothing is downloaded when an image is written"),
    ("NTPOPTS", "the NTP client is the one the image has; give servers with --ntp / ntp"),
    ("SSHDOPTS", "the SSH server is the one the image has (install openssh in a recipe)"),
    ("BOOTLOADER", "abox installs its own boot loaders"),
    ("BOOT_SIZE", "abox sizes the EFI System Partition itself"),
    ("SWAP_SIZE", "abox makes no swap partition"),
    ("ERASE_DISKS", "abox writes the disk itself"),
    ("USE_EFI", "every disk boots on BIOS and UEFI (--firmware)"),
    ("DEFAULT_DISK", "abox writes the disk itself"),
];

/// setup-alpine's options as the `setup-*` scripts take them.
pub fn parse(text: &str) -> Result<Answers> {
    let mut a = Answers::default();
    let mut ignore = |k: &str, why: &str| a.ignored.push((k.to_string(), why.to_string()));
    let mut s = Settings::default();
    let none = |v: &str| v.trim().is_empty() || v.trim() == "none";
    for (k, v) in assignments(text)? {
        let args: Vec<&str> = v.split_whitespace().collect();
        match k.as_str() {
            "HOSTNAMEOPTS" if !none(&v) => {
                let names: Vec<&&str> = args.iter().filter(|a| **a != "-n").collect();
                match names.as_slice() {
                    [n] => s.hostname = Some(n.to_string()),
                    _ => bail!("HOSTNAMEOPTS={v:?}: expected [-n] NAME"),
                }
            }
            "USEROPTS" if !none(&v) => {
                let mut it = args.iter();
                let mut user = None;
                while let Some(w) = it.next() {
                    match *w {
                        "-a" | "-u" => {}
                        "-f" | "-g" => {
                            // -f "Full Name" is one word only when quoted inside the value;
                            // setup-user's getopts takes the next word.
                            let val = it.next();
                            if *w == "-g" {
                                if let Some(g) = val {
                                    ignore(&k, &format!("-g {g}: extra groups are not added (the user is in wheel)"));
                                }
                            } else {
                                ignore(
                                    &k,
                                    "-f: the full name is not written (gecos is \"Linux User,,,\")",
                                );
                            }
                        }
                        "-k" => {
                            let key = it.next().copied().unwrap_or("");
                            // setup-user's `-k none`: no key.
                            if key != "none" {
                                push_key(&mut s.ssh_keys, &k, key, &mut ignore);
                            }
                        }
                        o if o.starts_with('-') => {
                            bail!("USEROPTS: unknown option {o} (setup-user takes -a -u -f -g -k)")
                        }
                        name => {
                            if user.replace(name).is_some() {
                                bail!("USEROPTS={v:?}: more than one user name");
                            }
                        }
                    }
                }
                match user {
                    Some(u) => s.user = Some(u.to_string()),
                    None => bail!("USEROPTS={v:?}: no user name"),
                }
                if !args.contains(&"-a") {
                    ignore(&k, "without -a: abox puts the user in wheel all the same");
                }
            }
            "USERSSHKEY" if !none(&v) => push_key(&mut s.ssh_keys, &k, &v, &mut ignore),
            "ROOTSSHKEY" if !none(&v) => push_key(&mut s.root_ssh_keys, &k, &v, &mut ignore),
            "TIMEZONEOPTS" if !none(&v) => {
                let zones: Vec<&&str> = args.iter().filter(|a| !a.starts_with('-')).collect();
                match zones.as_slice() {
                    [z] => s.timezone = Some(z.to_string()),
                    _ => bail!("TIMEZONEOPTS={v:?}: expected [-z] ZONE"),
                }
            }
            "DNSOPTS" if !none(&v) => {
                let mut it = args.iter();
                let mut servers = Vec::new();
                while let Some(w) = it.next() {
                    match *w {
                        "-d" => match it.next() {
                            Some(d) => s.search_domain = Some(d.to_string()),
                            None => bail!("DNSOPTS: -d needs a domain"),
                        },
                        "-n" => {}
                        o if o.starts_with('-') => bail!(
                            "DNSOPTS: unknown option {o} (setup-dns takes -d DOMAIN and servers)"
                        ),
                        ip => servers.push(ip.to_string()),
                    }
                }
                if !servers.is_empty() {
                    s.dns = Some(servers);
                }
            }
            "INTERFACESOPTS" if !none(&v) => s.interfaces = Some(v.clone()),
            "KEYMAPOPTS" if !none(&v) => s.keymap = Some(v.clone()),
            "HOSTNAMEOPTS" | "USEROPTS" | "USERSSHKEY" | "ROOTSSHKEY" | "TIMEZONEOPTS"
            | "DNSOPTS" | "INTERFACESOPTS" | "KEYMAPOPTS" => {}
            other => match OFFLINE.iter().find(|(n, _)| *n == other) {
                Some((_, why)) => ignore(other, why),
                None => ignore(other, "not a setup-alpine option abox knows"),
            },
        }
    }
    a.settings = s;
    Ok(a)
}

/// A key given inline (a key line) or as a URL (setup-user fetches it; abox cannot here).
fn push_key(
    keys: &mut Option<Vec<KeySource>>,
    var: &str,
    value: &str,
    ignore: &mut impl FnMut(&str, &str),
) {
    let value = value.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        ignore(var, &format!("{value}: keys are not fetched from URLs; put the key itself there or use --ssh-key FILE"));
        return;
    }
    keys.get_or_insert_with(Vec::new)
        .push(KeySource::text(value));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_as_setup_alpine_sources_it() {
        assert_eq!(
            assignments("A=\"box$\"\r\nB='x\r\ny'\r\n").unwrap(),
            vec![("A".into(), "box$".into()), ("B".into(), "x\ny".into())],
            "a lone $ is itself; CRLF read as LF"
        );
        let a = assignments(
            "# comment\nA=plain\nexport B=\"two words\" C='it''s'\nD=\"multi\nline \\\"q\\\" \\$x\"\nE=${A}-$A; F=a\\ b\nG=\n",
        )
        .unwrap();
        assert_eq!(
            a,
            vec![
                ("A".into(), "plain".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "its".into()),
                ("D".into(), "multi\nline \"q\" $x".into()),
                ("E".into(), "plain-plain".into()),
                ("F".into(), "a b".into()),
                ("G".into(), "".into()),
            ]
        );
        for (bad, says) in [
            ("A=$(id)\n", "command substitution"),
            ("A=\"`id`\"\n", "command substitution"),
            ("A=\"open\n", "never closed"),
            ("A=two words\n", "unquoted space"),
            ("setup-alpine -f x\n", "line 1: not a variable assignment"),
            ("\n\nrm -rf /\n", "line 3"),
            ("A=1|b\n", "shell syntax"),
            (
                "HOSTNAMEOPTS=$HOSTNAME\n",
                "uses $HOSTNAME, which the answer file does not set",
            ),
        ] {
            let e = assignments(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    /// The answer file setup-alpine's own example (`setup-alpine -c`) writes, filled in.
    const EXAMPLE: &str = r#"# Example answer file for setup-alpine script
# If you don't want to use a certain option, then comment it out

# Use US layout with US variant
KEYMAPOPTS="us us"

# Set hostname to 'alpine'
HOSTNAMEOPTS=alpine

# Set device manager to mdev
DEVDOPTS=mdev

# Contents of /etc/network/interfaces
INTERFACESOPTS="auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
hostname alpine-test
"

# Search domain of example.com, Google public nameserver
DNSOPTS="-d example.com 8.8.8.8"

# Set timezone to UTC
TIMEZONEOPTS="UTC"

# set http/ftp proxy
PROXYOPTS=none

# Add first mirror (CDN)
APKREPOSOPTS="-1"

# Create admin user
USEROPTS="-a -u -g audio,video,netdev juser"
USERSSHKEY="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl juser@lab"
#USERSSHKEY="https://example.com/juser.keys"

# Install Openssh
SSHDOPTS=openssh
ROOTSSHKEY="https://example.com/root.keys"

# Use openntpd
NTPOPTS="openntpd"

# Use /dev/sda as a sys disk
DISKOPTS="-m sys /dev/sda"

# Setup storage with label APKOVL for config storage
#LBUOPTS="LABEL=APKOVL"
LBUOPTS=none

#APKCACHEOPTS="/media/LABEL=APKOVL/cache"
APKCACHEOPTS=none
"#;

    #[test]
    fn setup_alpines_example_maps_onto_the_model() {
        let a = parse(EXAMPLE).unwrap();
        let s = &a.settings;
        assert_eq!(s.keymap.as_deref(), Some("us us"));
        assert_eq!(s.hostname.as_deref(), Some("alpine"));
        assert_eq!(
            s.interfaces.as_deref(),
            Some("auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\nhostname alpine-test\n")
        );
        assert_eq!(s.search_domain.as_deref(), Some("example.com"));
        assert_eq!(s.dns, Some(vec!["8.8.8.8".to_string()]));
        assert_eq!(s.timezone.as_deref(), Some("UTC"));
        assert_eq!(s.user.as_deref(), Some("juser"));
        assert_eq!(s.ssh_keys.as_ref().map(Vec::len), Some(1));
        assert_eq!(s.root_ssh_keys, None, "a URL is not fetched");
        let ignored: Vec<&str> = a.ignored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            ignored,
            vec![
                "DEVDOPTS",
                "PROXYOPTS",
                "APKREPOSOPTS",
                "USEROPTS",
                "SSHDOPTS",
                "ROOTSSHKEY",
                "NTPOPTS",
                "DISKOPTS",
                "LBUOPTS",
                "APKCACHEOPTS"
            ]
        );
        let why = |k: &str| &a.ignored.iter().find(|(n, _)| n == k).unwrap().1;
        assert!(why("DEVDOPTS").contains("device manager"));
        let u = parse("FOO=1\n").unwrap();
        assert_eq!(
            u.ignored,
            vec![(
                "FOO".to_string(),
                "not a setup-alpine option abox knows".to_string()
            )]
        );
        assert!(why("ROOTSSHKEY").contains("URL"));
        assert!(why("USEROPTS").contains("-g audio,video,netdev"));
        // The whole thing resolves (the key line is checked).
        s.resolve(&mut super::super::Resolver::default()).unwrap();
    }

    /// Golden files: an answer file written for this repo, the abox.toml that says the same, and
    /// the options abox reports as ignored (tests/fixtures/identity/).
    #[test]
    fn the_homelab_answer_file_equals_its_toml() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/identity");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let a = parse(&read("homelab.answers")).unwrap();
        let toml =
            super::super::ConfigFile::parse(&read("homelab.toml"), &dir.join("homelab.toml"))
                .unwrap();
        assert_eq!(a.settings, toml.settings("any", "disk"));
        let ignored: String = a
            .ignored
            .iter()
            .map(|(k, why)| format!("{k}: {why}\n"))
            .collect();
        assert_eq!(ignored, read("homelab.ignored"));
        let mut r = super::super::Resolver::default();
        let id = a.settings.resolve(&mut r).unwrap();
        assert_eq!(id.user.unwrap().keys.len(), 1);
        assert_eq!(id.keymap, Some(("de".into(), "de-nodeadkeys".into())));
    }

    #[test]
    fn option_forms() {
        let a = parse("HOSTNAMEOPTS=\"-n box\"\nTIMEZONEOPTS=\"-z Europe/Berlin\"\nDNSOPTS=\"-n 1.1.1.1 9.9.9.9\"\nUSEROPTS=none\nKEYMAPOPTS=none\n").unwrap();
        assert_eq!(a.settings.hostname.as_deref(), Some("box"));
        assert_eq!(a.settings.timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(a.settings.dns.as_ref().unwrap().len(), 2);
        assert_eq!(a.settings.user, None);
        assert!(a.ignored.is_empty(), "{:?}", a.ignored);
        assert!(parse("USEROPTS=\"-a\"\n").is_err());
        assert!(parse("USEROPTS=\"-x bob\"\n").is_err());
        assert!(parse("HOSTNAMEOPTS=\"a b\"\n").is_err());
    }
}
