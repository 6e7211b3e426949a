//! `abox seed`: a NoCloud seed — the ISO 9660 volume labelled `cidata` holding `user-data`,
//! `meta-data` and optionally `network-config` that cloud-init's and Alpine tiny-cloud's
//! NoCloud datasource read at first boot (cloud-init docs, "NoCloud": `genisoimage -volid
//! cidata -joliet -rock user-data meta-data`). For QEMU, Proxmox and VirtualBox users who keep
//! a machine's identity outside its image: attach the file as a CD-ROM.
//!
//! The ISO is written by xorriso (`-as mkisofs`, Joliet + Rock Ridge) through the command
//! runner, from copies under fixed names in a private folder, into that folder; the result
//! is then copied to the output, which appears only when complete and is 0600 (user-data
//! often holds password hashes and keys); the private folder is 0700. Times in the ISO are the
//! newest input's and owners root, so the same inputs (content and times) give the same bytes
//! with the same xorriso (its version is in the volume's preparer field).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::output::PendingFile;

/// Largest input file read (cloud-init reads user-data whole into memory too).
pub const MAX_INPUT: u64 = 16 << 20;

/// The first-line markers cloud-init and tiny-cloud act on (cloud-init docs, "User data
/// formats"; tiny-cloud also reads `#alpine-config`); gzip and MIME multipart are recognised
/// by their first bytes.
const USER_DATA_HEADERS: &[&str] = &[
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "#alpine-config",
    "Content-Type:",
    "MIME-Version:",
];

#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub user_data: PathBuf,
    pub meta_data: Option<PathBuf>,
    pub network_config: Option<PathBuf>,
    /// The ISO to write (`.iso`).
    pub output: PathBuf,
}

/// Read one input, bounded by [`MAX_INPUT`].
fn read_input(p: &Path, what: &str) -> Result<(Vec<u8>, u64)> {
    let f =
        std::fs::File::open(p).with_context(|| format!("reading the {what} {}", p.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        bail!("the {what} {} is not a regular file", p.display());
    }
    let mut data = Vec::new();
    f.take(MAX_INPUT + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading the {what} {}", p.display()))?;
    if data.len() as u64 > MAX_INPUT {
        bail!(
            "the {what} {} is larger than {} MiB",
            p.display(),
            MAX_INPUT >> 20
        );
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok((data, mtime))
}

/// Whether `data` is user data cloud-init or tiny-cloud would act on; the error names the
/// formats.
pub fn check_user_data(data: &[u8]) -> Result<()> {
    if data.starts_with(&[0x1f, 0x8b]) {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&data[..data.len().min(64)]);
    let head = head.trim_start_matches('\u{feff}');
    if USER_DATA_HEADERS.iter().any(|h| head.starts_with(h)) {
        return Ok(());
    }
    bail!(
        "the user-data does not start with a format cloud-init knows ({}, or gzip): a \
         cloud-config file must begin with the line #cloud-config",
        USER_DATA_HEADERS.join(", ")
    )
}

/// The meta-data when none is given: an instance ID from the content, so the same seed is
/// the same instance (cloud-init runs its once-per-instance modules again for a new ID).
pub fn default_meta_data(user_data: &[u8], network_config: Option<&[u8]>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(user_data);
    if let Some(n) = network_config {
        h.update(b"\0network-config\0");
        h.update(n);
    }
    let id = hex::encode(h.finalize());
    format!("instance-id: iid-abox-{}\n", &id[..16])
}

/// Whether the meta-data names an instance ID (NoCloud needs one).
fn has_instance_id(meta: &[u8]) -> bool {
    String::from_utf8_lossy(meta).lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("instance-id:") || l.starts_with("\"instance-id\"")
    })
}

/// Write the seed ISO; its path.
pub fn write_seed(opts: &SeedOptions) -> Result<PathBuf> {
    let (user, mut newest) = read_input(&opts.user_data, "user-data")?;
    check_user_data(&user)?;
    let network = match &opts.network_config {
        Some(p) => {
            let (d, t) = read_input(p, "network-config")?;
            newest = newest.max(t);
            Some(d)
        }
        None => None,
    };
    let meta = match &opts.meta_data {
        Some(p) => {
            let (d, t) = read_input(p, "meta-data")?;
            newest = newest.max(t);
            if !has_instance_id(&d) {
                bail!(
                    "the meta-data {} has no instance-id line: NoCloud needs one (e.g. \
                     instance-id: my-vm-1), or leave --meta-data out for one made from the \
                     user-data",
                    p.display()
                );
            }
            d
        }
        None => default_meta_data(&user, network.as_deref()).into_bytes(),
    };

    let dest = if opts.output.is_dir() {
        opts.output.join("seed.iso")
    } else {
        opts.output.clone()
    };
    if dest
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("iso"))
    {
        bail!(
            "{}: a NoCloud seed is an ISO image; name it NAME.iso",
            dest.display()
        );
    }
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut out = PendingFile::create(&dest)?;
    let work = tempfile::Builder::new()
        .prefix(&format!("abox-seed-{}-", std::process::id()))
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("making a private folder for the seed's files")?;
    crate::signals::track(work.path());
    let result = (|| {
        let mut names = vec!["user-data", "meta-data"];
        let mut files: Vec<(&str, &[u8])> = vec![("user-data", &user), ("meta-data", &meta)];
        if let Some(n) = &network {
            names.push("network-config");
            files.push(("network-config", n));
        }
        for (name, data) in &files {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(work.path().join(name))?;
            f.write_all(data)?;
            // xorriso dates each file by its own time: the newest input's, for the same bytes.
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(newest))?;
        }
        let iso = work.path().join("seed.iso");
        cmd::run(
            Command::new("xorriso")
                .current_dir(work.path())
                .env("SOURCE_DATE_EPOCH", newest.to_string())
                .args(["-no_rc", "-as", "mkisofs", "-quiet", "-o", "seed.iso"])
                // -r: Rock Ridge with owner root and read-only modes, whoever runs abox.
                .args(["-volid", "cidata", "-joliet", "-r"])
                .args(&names),
        )
        .context("writing the seed ISO")?;
        let mut src = std::fs::File::open(&iso)?;
        std::io::copy(&mut src, out.file()).context("writing the seed ISO")?;
        out.file().sync_all()?;
        Ok::<_, anyhow::Error>(())
    })();
    crate::signals::untrack(work.path());
    drop(work);
    result?;
    crate::signals::check()?;
    out.commit()?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_formats() {
        for ok in [
            &b"#cloud-config\nhostname: a\n"[..],
            b"#!/bin/sh\necho hi\n",
            b"\xef\xbb\xbf#cloud-config\n",
            b"Content-Type: multipart/mixed; boundary=x\n",
            b"\x1f\x8b\x08\x00",
        ] {
            check_user_data(ok).unwrap();
        }
        for bad in [&b""[..], b"hostname: a\n", b" #cloud-config\n"] {
            let e = check_user_data(bad).unwrap_err().to_string();
            assert!(e.contains("#cloud-config"), "{e}");
        }
    }

    #[test]
    fn meta_data_defaults_to_a_content_instance_id() {
        let a = default_meta_data(b"#cloud-config\n", None);
        assert!(
            a.starts_with("instance-id: iid-abox-") && a.ends_with('\n'),
            "{a}"
        );
        assert_eq!(a, default_meta_data(b"#cloud-config\n", None));
        assert_ne!(
            a,
            default_meta_data(b"#cloud-config\n", Some(b"version: 2\n"))
        );
        assert!(has_instance_id(a.as_bytes()));
        assert!(!has_instance_id(b"local-hostname: x\n"));
    }
}
