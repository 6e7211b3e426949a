//! Where an image's blobs live: a directory (OCI layout) or the members of a tar file
//! (`docker save` output, OCI archive). A tar file is indexed once — member offsets only, the
//! content is skipped — and each blob is then read in place, so layers can be opened several
//! times and in parallel without unpacking anything.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A stream of one blob.
pub type BlobReader = Box<dyn Read + Send>;

pub trait BlobStore: Send + Sync {
    /// Open the blob stored under `key` (a path relative to the layout or archive root).
    fn open(&self, key: &str) -> Result<BlobReader>;
    /// Whether the store holds `key`.
    fn contains(&self, key: &str) -> bool;
    /// What to call the store in messages.
    fn describe(&self) -> String;

    fn read_small(&self, key: &str, limit: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.open(key)?
            .take(limit + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading {key} in {}", self.describe()))?;
        if buf.len() as u64 > limit {
            bail!("{key} in {} is larger than {limit} bytes", self.describe());
        }
        Ok(buf)
    }
}

/// Largest JSON document (manifest, index, config) read into memory.
pub const MAX_JSON: u64 = 16 << 20;

/// Keys are relative paths; refuse anything that could leave the store.
fn clean_key(key: &str) -> Result<String> {
    let mut parts = Vec::new();
    for c in key.split('/') {
        match c {
            "" | "." => {}
            ".." => bail!("blob path {key:?} leaves the image"),
            c => parts.push(c),
        }
    }
    if key.starts_with('/') || parts.is_empty() {
        bail!("blob path {key:?} is not a relative path inside the image");
    }
    Ok(parts.join("/"))
}

pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
}

impl BlobStore for DirStore {
    fn open(&self, key: &str) -> Result<BlobReader> {
        let p = self.root.join(clean_key(key)?);
        let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        Ok(Box::new(f))
    }
    fn contains(&self, key: &str) -> bool {
        clean_key(key)
            .map(|k| self.root.join(k).is_file())
            .unwrap_or(false)
    }
    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

enum Member {
    Data {
        offset: u64,
        size: u64,
    },
    /// `docker save` stores a repeated layer as a symlink to the first copy.
    Link(String),
}

pub struct TarStore {
    path: PathBuf,
    members: HashMap<String, Member>,
}

/// How deep symlinked members are followed.
const MAX_MEMBER_LINKS: usize = 8;

impl TarStore {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut magic = [0u8; 4];
        let n = (&f).read(&mut magic)?;
        if n >= 2 && magic[..2] == [0x1f, 0x8b] {
            bail!(
                "{} is gzip-compressed; decompress it first (gunzip -k {})",
                path.display(),
                path.display()
            );
        }
        (&f).seek(SeekFrom::Start(0))?;
        let mut ar = tar::Archive::new(crate::flatten::index::HeaderGuard::new(f));
        let mut members = HashMap::new();
        let not_tar = || format!("{} is not a tar archive (or is truncated)", path.display());
        for entry in ar.entries_with_seek().with_context(not_tar)? {
            let entry = entry.with_context(not_tar)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Ok(key) = clean_key(&name) else { continue };
            let ty = entry.header().entry_type();
            if ty.is_file() {
                members.insert(
                    key,
                    Member::Data {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    },
                );
            } else if ty.is_symlink() || ty.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let target = if ty.is_symlink() {
                    // Relative to the member's folder.
                    let dir = key.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    format!("{dir}/{target}")
                } else {
                    target
                };
                members.insert(key, Member::Link(target));
            }
        }
        let len = std::fs::metadata(path)?.len();
        for m in members.values() {
            if let Member::Data { offset, size } = m {
                if offset + size > len {
                    bail!("{} is truncated", path.display());
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            members,
        })
    }

    fn resolve(&self, key: &str) -> Result<(u64, u64)> {
        let mut k = clean_key(key)?;
        for _ in 0..MAX_MEMBER_LINKS {
            match self.members.get(&k) {
                Some(Member::Data { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(t)) => k = clean_key(t)?,
                None => bail!("{} has no member {key}", self.path.display()),
            }
        }
        bail!("{}: member {key} is a symlink loop", self.path.display())
    }
}

impl BlobStore for TarStore {
    fn open(&self, key: &str) -> Result<BlobReader> {
        let (offset, size) = self.resolve(key)?;
        let mut f =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        f.seek(SeekFrom::Start(offset))?;
        Ok(Box::new(ExactReader {
            inner: f.take(size),
            left: size,
            what: format!("{key} in {}", self.path.display()),
        }))
    }
    fn contains(&self, key: &str) -> bool {
        self.resolve(key).is_ok()
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Fails instead of ending early when the file is shorter than the member said.
struct ExactReader<R> {
    inner: R,
    left: u64,
    what: String,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is truncated", self.what),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
