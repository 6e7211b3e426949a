//! Output files: each artifact is written under a temporary name in the output folder and only
//! renamed to its final name when the whole run succeeded, so a failed or interrupted run leaves
//! no artifact behind. Also the run's `SHA256SUMS` and `manifest.json`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A file being written. Dropped without [`PendingFile::commit`], it removes itself.
///
/// Artifacts are created 0600 (as `docker save -o` writes them): a rootfs, package or disk may
/// hold password hashes. `SHA256SUMS` and `manifest.json` are 0644.
pub struct PendingFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
    committed: bool,
}

impl PendingFile {
    /// A private (0600) file that becomes `dest`.
    pub fn create(dest: &Path) -> Result<Self> {
        Self::create_mode(dest, 0o600)
    }

    /// A file readable by all (0644, less the umask) that becomes `dest`: for lists that hold
    /// no secret.
    pub fn create_public(dest: &Path) -> Result<Self> {
        Self::create_mode(dest, 0o644)
    }

    fn create_mode(dest: &Path, mode: u32) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = dest.parent().unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .with_context(|| format!("{} has no file name", dest.display()))?;
        let tmp = dir.join(format!(
            ".{}.abox-tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
        };
        let file = open()
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    std::fs::remove_file(&tmp)?;
                    open()
                } else {
                    Err(e)
                }
            })
            .with_context(|| {
                format!(
                    "cannot write in the output folder {} (is it writable? choose another with -o)",
                    dir.display()
                )
            })?;
        // Held until the file is closed: `reap_stale` of another abox (in another PID
        // namespace, where this PID means nothing) sees the file is alive.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .with_context(|| format!("locking {}", tmp.display()))?;
        crate::signals::track(&tmp);
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            file: Some(file),
            committed: false,
        })
    }

    /// The temporary path (for tools that write the file themselves).
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file open until commit")
    }

    /// Flush to disk and move to the final name.
    pub fn commit(mut self) -> Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_all()
                .with_context(|| format!("writing {}", self.tmp.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.dest.display())
        })?;
        crate::signals::untrack(&self.tmp);
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            drop(self.file.take());
            let _ = std::fs::remove_file(&self.tmp);
            crate::signals::untrack(&self.tmp);
        }
    }
}

/// [`check_room`]'s way out for an output folder.
pub const OUT_FIX: &str = "make room or choose another place with -o";

/// Fail before anything is written when the filesystem holding `dir` has less than `need`
/// bytes free for an unprivileged writer (`statvfs`'s `f_bavail`); the message says what
/// (`what`) needs how much, how much there is, and the way out (`fix`).
pub fn check_room(dir: &Path, need: u64, what: &str, fix: &str) -> Result<()> {
    let st = rustix::fs::statvfs(dir)
        .with_context(|| format!("asking how much room {} has", dir.display()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < need {
        anyhow::bail!(
            "{what} needs about {} in {}, which has {} free: {fix}",
            crate::disk::fs::human(need),
            dir.display(),
            crate::disk::fs::human(free)
        );
    }
    Ok(())
}

/// Whether `e` comes from a full filesystem or an exhausted quota: an I/O error `ENOSPC` or
/// `EDQUOT` in its chain, or a tool that said so (mke2fs, qemu-img, tar2sqfs).
pub fn is_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|n| n == libc::ENOSPC || n == libc::EDQUOT)
            || {
                let t = c.to_string();
                t.contains("No space left on device") || t.contains("Disk quota exceeded")
            }
    })
}

/// `e` as the user should read it when the output folder `dir` filled up while writing:
/// which folder, how much it has free now (the run's temporary files are gone by then) and
/// what to do; any other error unchanged.
pub fn explain_full(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    if !is_full(&e) {
        return e;
    }
    let free = rustix::fs::statvfs(dir)
        .map(|st| crate::disk::fs::human(st.f_bavail.saturating_mul(st.f_frsize)))
        .unwrap_or_else(|_| "?".into());
    e.context(format!(
        "the output folder {} ran out of room while writing (it has {free} free again now that \
         the unfinished files are removed): {OUT_FIX}",
        dir.display()
    ))
}

/// A writer that hashes and counts what passes through.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 and size of a file on disk, read as a stream.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut w = HashingWriter::new(io::sink());
    io::copy(&mut f, &mut w).with_context(|| format!("reading {}", path.display()))?;
    let (_, sha, len) = w.finish();
    Ok((sha, len))
}

/// One finished artifact, ready to be renamed into place.
pub struct Artifact {
    pub kind: &'static str,
    pub file: PendingFile,
    pub sha256: String,
    pub size: u64,
    /// The image the artifact was made from, when it is not the folder's image (a disk made
    /// from the `-vm` image of the VM layer).
    pub image: Option<ImageSummary>,
}

/// One artifact as `manifest.json` lists it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ManifestArtifact {
    kind: String,
    file: String,
    size: u64,
    sha256: String,
    /// The image it was made from, when not the manifest's `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<ImageSummary>,
}

/// `manifest.json`: what abox wrote into an output folder, from which image.
#[derive(Serialize, Deserialize)]
pub struct Manifest {
    tool: String,
    source: String,
    image: ImageSummary,
    artifacts: Vec<ManifestArtifact>,
}

/// What `manifest.json` says about the image the artifacts came from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ImageSummary {
    pub name: String,
    /// Digest of the manifest (OCI) or of the config (docker-archive: the image ID).
    pub digest: String,
    pub config_digest: String,
    pub architecture: String,
    pub layers: usize,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Largest `manifest.json` read back from an output folder.
const MANIFEST_MAX: u64 = 4 << 20;

/// What an output folder's `manifest.json` is.
pub enum Lists {
    /// None there: abox may write its lists.
    None,
    /// One abox wrote (`tool` starts with `abox `): the folder is abox's.
    Abox(Box<Manifest>),
    /// Something else (another tool's, unreadable, not a regular file): never overwritten.
    Foreign(String),
}

/// Read the `manifest.json` of `dir`: never follows a link, never blocks on a FIFO or device,
/// at most [`MANIFEST_MAX`] bytes.
pub fn folder_lists(dir: &Path) -> Lists {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("manifest.json");
    let md = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Lists::None,
        Err(e) => return Lists::Foreign(format!("cannot be read ({e})")),
    };
    if !md.is_file() {
        return Lists::Foreign("is not a regular file".into());
    }
    let read = || -> io::Result<Vec<u8>> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)?;
        if !f.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let mut buf = Vec::new();
        f.take(MANIFEST_MAX + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > MANIFEST_MAX {
            return Err(io::Error::other(format!(
                "larger than {MANIFEST_MAX} bytes"
            )));
        }
        Ok(buf)
    };
    let text = match read() {
        Ok(t) => t,
        Err(e) => return Lists::Foreign(format!("cannot be read ({e})")),
    };
    match serde_json::from_slice::<Manifest>(&text) {
        Ok(m) if m.tool.starts_with("abox ") => Lists::Abox(Box::new(m)),
        Ok(_) => Lists::Foreign("was written by another tool".into()),
        Err(_) => Lists::Foreign("is not one abox wrote".into()),
    }
}

/// Fail unless abox may write `SHA256SUMS` and `manifest.json` in `dir`: there is no
/// `manifest.json`, or abox wrote it. Another tool's is never overwritten.
pub fn check_lists(dir: &Path) -> Result<()> {
    if let Lists::Foreign(why) = folder_lists(dir) {
        anyhow::bail!(
            "{} {why}: abox writes its own manifest.json and SHA256SUMS in the output folder \
             and does not overwrite that one; choose another folder with -o",
            dir.join("manifest.json").display()
        );
    }
    Ok(())
}

/// Whether a name from a manifest is one abox could have written in the folder: a plain file
/// name, no control characters, not one of the lists.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('/')
        && !name.starts_with('.')
        && !name.chars().any(char::is_control)
        && name != "SHA256SUMS"
        && name != "manifest.json"
}

/// The artifacts an earlier run listed in `out_dir` that are still there as it left them: a
/// regular file whose sha256 (computed again, as a stream) is the one listed, not one this run
/// writes. Each keeps the image it came from, when that is not `image`; notes say what is not
/// kept and which artifacts come from another image.
fn earlier_artifacts(
    out_dir: &Path,
    old: Option<Manifest>,
    writing: &std::collections::HashSet<String>,
    image: &ImageSummary,
) -> Result<(Vec<ManifestArtifact>, Vec<String>)> {
    let mut notes = Vec::new();
    let Some(old) = old else {
        return Ok((Vec::new(), notes));
    };
    let mut kept: Vec<ManifestArtifact> = Vec::new();
    let mut others: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let hex = |h: &str| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    for mut a in old.artifacts {
        if !plain_name(&a.file)
            || !hex(&a.sha256)
            || writing.contains(&a.file)
            || kept.iter().any(|k| k.file == a.file)
        {
            continue;
        }
        let path = out_dir.join(&a.file);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == a.size && hash_file(&path)?.0 == a.sha256 => {
                // The image it came from: its own entry's, else the earlier run's.
                let from = a.image.take().unwrap_or_else(|| old.image.clone());
                if old.image.digest != image.digest {
                    others
                        .entry(format!("{} ({})", from.name, from.digest))
                        .or_default()
                        .push(a.file.clone());
                }
                a.image = (from != *image).then_some(from);
                a.kind.retain(|c| c.is_ascii_alphanumeric() || c == '-');
                kept.push(a);
            }
            Ok(_) => notes.push(format!(
                "{}: changed since abox wrote it: no longer listed in SHA256SUMS",
                path.display()
            )),
            Err(_) => {}
        }
    }
    for (img, files) in others {
        notes.push(format!(
            "{} also holds {} from another image, {img}: each listed with its image in \
             manifest.json",
            out_dir.display(),
            files.join(", ")
        ));
    }
    Ok((kept, notes))
}

/// An exclusive lock on the folder itself (flock on its descriptor), held while a run reads,
/// merges and writes its lists, so two runs into one folder never lose each other's entries.
fn lock_folder(dir: &Path) -> Result<File> {
    let d =
        File::open(dir).with_context(|| format!("opening the output folder {}", dir.display()))?;
    rustix::fs::flock(&d, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking the output folder {}", dir.display()))?;
    Ok(d)
}

/// Rename every artifact into place, then write `SHA256SUMS` and `manifest.json` (atomically
/// too, under a lock on the folder), listing this run's artifacts and those of earlier runs
/// still in the folder unchanged (with the image each came from when it is not `image`);
/// returns the paths written and notes for the user (another image's artifacts in the folder,
/// a listed file changed since). Nothing is renamed unless every artifact was complete; a
/// folder whose `manifest.json` another tool wrote is refused ([`check_lists`]).
pub fn commit_all(
    out_dir: &Path,
    source: &str,
    image: &ImageSummary,
    artifacts: Vec<Artifact>,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let _lock = lock_folder(out_dir)?;
    let old = match folder_lists(out_dir) {
        Lists::None => None,
        Lists::Abox(m) => Some(*m),
        Lists::Foreign(_) => {
            check_lists(out_dir)?;
            None
        }
    };
    let writing: std::collections::HashSet<String> =
        artifacts.iter().map(|a| file_name(a.file.dest())).collect();
    let (kept, notes) = earlier_artifacts(out_dir, old, &writing, image)?;
    let mut entries: Vec<ManifestArtifact> = artifacts
        .iter()
        .map(|a| ManifestArtifact {
            kind: a.kind.to_string(),
            file: file_name(a.file.dest()),
            size: a.size,
            sha256: a.sha256.clone(),
            image: a.image.clone(),
        })
        .collect();
    entries.extend(kept);
    entries.sort_by(|a, b| a.file.cmp(&b.file));
    let sums: String = entries
        .iter()
        .map(|a| format!("{}  {}\n", a.sha256, a.file))
        .collect();
    let manifest = Manifest {
        tool: format!("abox {}", crate::cli::VERSION),
        source: source.to_string(),
        image: image.clone(),
        artifacts: entries,
    };
    let mut sums_file = PendingFile::create_public(&out_dir.join("SHA256SUMS"))?;
    sums_file.file().write_all(sums.as_bytes())?;
    let mut man_file = PendingFile::create_public(&out_dir.join("manifest.json"))?;
    {
        let mut w = BufWriter::new(man_file.file());
        serde_json::to_writer_pretty(&mut w, &manifest)?;
        w.write_all(b"\n")?;
        w.flush()?;
    }
    let mut paths = Vec::new();
    for a in artifacts {
        paths.push(a.file.dest().to_path_buf());
        a.file.commit()?;
    }
    sums_file.commit()?;
    man_file.commit()?;
    Ok((paths, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_file_vanishes_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a.tar");
        {
            let mut p = PendingFile::create(&dest).unwrap();
            p.file().write_all(b"half").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut p = PendingFile::create(&dest).unwrap();
        p.file().write_all(b"whole").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
