//! Pass 1: read one layer's tar stream and record what each entry does (metadata only, no
//! content), checking the layer's digests on the way. Layers are independent here, so they
//! are indexed in parallel; the order of layers only matters when the indexes are merged.

use std::io::Read;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use super::path::{classify, normalize, Name};
use crate::source::{Image, LayerReader};
use crate::tarfmt::{Kind, Meta};

/// What one layer entry does to the tree.
#[derive(Debug, Clone)]
pub enum Op {
    Whiteout(String),
    Opaque(String),
    Put {
        ordinal: u32,
        path: String,
        meta: Meta,
    },
}

/// Small files whose final content the targets need (users, OS release), kept from pass 1.
pub const CAPTURE: &[&str] = &[
    "etc/passwd",
    "etc/group",
    "etc/os-release",
    "usr/lib/os-release",
    "etc/alpine-release",
    "etc/wsl.conf",
    // OpenRC images: the targets' fix-ups apply (src/target/openrc.rs).
    "etc/rc.conf",
];
/// Largest captured file.
const CAPTURE_MAX: u64 = 1 << 20;

#[derive(Clone)]
pub struct Captured {
    pub ordinal: u32,
    pub path: String,
    pub data: Vec<u8>,
}

#[derive(Clone)]
pub struct LayerIndex {
    pub ops: Vec<Op>,
    pub captured: Vec<Captured>,
    /// Whether the tar's end-of-archive block was read (a stream cut between two entries
    /// otherwise reads as a shorter archive).
    pub ended: bool,
}

/// Read pax records a layer entry carries: xattrs and the numeric fields that override the
/// ustar header.
struct Pax {
    xattrs: Vec<(String, Vec<u8>)>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
}

fn pax<R: Read>(e: &mut tar::Entry<R>, path: &str) -> Result<Pax> {
    let mut p = Pax {
        xattrs: Vec::new(),
        uid: None,
        gid: None,
        mtime: None,
    };
    if let Some(exts) = e.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            // A number abox cannot read is an error, never the ustar field's value instead.
            let num = || -> Result<Option<u64>> {
                std::str::from_utf8(ext.value_bytes())
                    .ok()
                    .and_then(|v| v.split('.').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Some)
                    .ok_or_else(|| {
                        anyhow!(
                            "{path}: PAX {key} {:?} is not a number",
                            String::from_utf8_lossy(ext.value_bytes())
                        )
                    })
            };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                p.xattrs
                    .push((name.to_string(), ext.value_bytes().to_vec()));
            } else if key == "uid" {
                p.uid = num()?;
            } else if key == "gid" {
                p.gid = num()?;
            } else if key == "mtime" {
                p.mtime = num()?;
            }
        }
    }
    Ok(p)
}

/// The largest owner or group id an entry may carry: Linux ids are 32 bits and 4294967295 is
/// `(uid_t)-1`, "no owner change".
pub const MAX_ID: u64 = 4_294_967_294;

/// The metadata of one tar entry.
fn meta_of<R: Read>(e: &mut tar::Entry<R>, path: &str) -> Result<Meta> {
    let h = e.header();
    let ty = h.entry_type();
    let dev = |h: &tar::Header| -> Result<(u32, u32)> {
        Ok((
            h.device_major()?.unwrap_or(0),
            h.device_minor()?.unwrap_or(0),
        ))
    };
    let link = |e: &tar::Entry<R>| -> Result<Vec<u8>> {
        e.link_name_bytes()
            .map(|b| b.into_owned())
            .ok_or_else(|| anyhow!("{path}: link without a target"))
    };
    let kind = match ty {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            Kind::File
        }
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => {
            let t = link(e)?;
            if t.contains(&0) {
                bail!("symlink {path} has a NUL byte in its target");
            }
            let t =
                String::from_utf8(t).map_err(|_| anyhow!("symlink {path}: target is not UTF-8"))?;
            if t.len() >= MAX_PATH {
                bail!(
                    "symlink {path}: a target of {} bytes (Linux takes less than {MAX_PATH})",
                    t.len()
                );
            }
            Kind::Symlink(t)
        }
        tar::EntryType::Link => {
            let t = normalize(&link(e)?).with_context(|| format!("hard link {path}"))?;
            if t.is_empty() {
                bail!("hard link {path} points to the root folder");
            }
            Kind::Hardlink(t)
        }
        tar::EntryType::Char => {
            let (a, b) = dev(h)?;
            Kind::Char(a, b)
        }
        tar::EntryType::Block => {
            let (a, b) = dev(h)?;
            Kind::Block(a, b)
        }
        tar::EntryType::Fifo => Kind::Fifo,
        other => bail!("{path}: unsupported tar entry type {other:?}"),
    };
    let size = if kind == Kind::File { e.size() } else { 0 };
    let h = e.header();
    let (mode, uid, gid, mtime) = (h.mode()?, h.uid()?, h.gid()?, h.mtime()?);
    let p = pax(e, path)?;
    let (uid, gid) = (p.uid.unwrap_or(uid), p.gid.unwrap_or(gid));
    // Owners are 32-bit on Linux and (u32)-1 means "no change" to chown: a larger id would be
    // cut to another one (4294967296 → 0, root) on a disk or in a squashfs.
    for (what, id) in [("owner", uid), ("group", gid)] {
        if id > MAX_ID {
            bail!("{path}: {what} id {id} is beyond the 32-bit ids Linux has (at most {MAX_ID}): refusing the image");
        }
    }
    Ok(Meta {
        kind,
        mode: mode & 0o7777,
        uid,
        gid,
        mtime: p.mtime.unwrap_or(mtime),
        size,
        xattrs: p.xattrs,
    })
}

/// Index layer `i` of `image`, checking its digests.
pub fn index_layer(image: &Image, i: usize, counter: Arc<AtomicU64>) -> Result<LayerIndex> {
    let reader = image.open_layer(i, Some(counter), true)?;
    let (ix, reader) = index_reader(reader)?;
    reader.finish()?;
    Ok(ix)
}

/// The largest extension member (GNU long name or link, PAX header) abox reads: the tar crate
/// reads them whole into memory, so a 1 GiB one (a few MB gzipped) would exhaust the host.
pub const MAX_EXTENSION: u64 = 1 << 20;
/// Linux's PATH_MAX and NAME_MAX: longer names cannot be written to a filesystem.
pub const MAX_PATH: usize = 4096;
pub const MAX_NAME: usize = 255;

const BLOCK: usize = 512;

/// Watches a tar stream's structure as it is read and fails the read that would hand the tar
/// crate an extension member over [`MAX_EXTENSION`] (before any of it is buffered). It follows
/// the tar crate's own reading rules (tar 0.4.46 `Archive::next_entry`): a GNU long name/link or
/// PAX header is one only with a ustar or GNU magic; pending PAX records apply their first
/// `size` to the next member that is not an extension header, and are used up by the first
/// member that is not a recognised long name/link (a `g` too); old-GNU sparse extension blocks
/// follow a header whose `isextended` is exactly 1; the first zero block ends the archive.
pub struct HeaderGuard<R> {
    inner: R,
    state: Guard,
    header: Vec<u8>,
    /// Data left in the current member (whole blocks).
    left: u64,
    /// The current member's data when it is a recognised PAX header (bounded), and its size.
    pax: Option<Vec<u8>>,
    pax_len: usize,
    /// PAX records waiting for the member they describe.
    pending: Option<Vec<u8>>,
}

#[derive(PartialEq)]
enum Guard {
    Header,
    SparseExt,
    Data,
    Done,
}

impl<R: Read> HeaderGuard<R> {
    /// Guard the tar stream `inner` (layers, and the outer archives of every source).
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            state: Guard::Header,
            header: Vec::with_capacity(BLOCK),
            left: 0,
            pax: None,
            pax_len: 0,
            pending: None,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Whether the end-of-archive block has been read.
    pub fn ended(&self) -> bool {
        self.state == Guard::Done
    }

    fn header_done(&mut self) -> std::io::Result<()> {
        let block = std::mem::replace(&mut self.header, Vec::with_capacity(BLOCK));
        if block.iter().all(|b| *b == 0) {
            self.state = Guard::Done;
            return Ok(());
        }
        let h = tar::Header::from_byte_slice(&block);
        let ty = h.entry_type();
        let recognised = h.as_gnu().is_some() || h.as_ustar().is_some();
        let extension = ty.is_gnu_longname()
            || ty.is_gnu_longlink()
            || ty.is_pax_local_extensions()
            || ty.is_pax_global_extensions();
        // The tar crate fails on a bad size itself; follow it with 0 meanwhile.
        let mut size = h.entry_size().unwrap_or(0);
        let buffered = recognised
            && (ty.is_gnu_longname() || ty.is_gnu_longlink() || ty.is_pax_local_extensions());
        if buffered {
            if size > MAX_EXTENSION {
                let what = if ty.is_gnu_longname() {
                    "GNU long name"
                } else if ty.is_gnu_longlink() {
                    "GNU long link name"
                } else {
                    "PAX header"
                };
                return Err(std::io::Error::other(format!(
                    "a {what} member of {size} bytes: more than the {MAX_EXTENSION} abox reads \
                     (a name is at most {MAX_PATH} bytes); refusing the layer"
                )));
            }
        } else if let Some(pax) = self.pending.take() {
            if !extension {
                if let Some(v) = tar::PaxExtensions::new(&pax)
                    .map_while(|e| e.ok())
                    .find(|e| e.key() == Ok("size"))
                    .and_then(|e| e.value().ok()?.parse::<u64>().ok())
                {
                    size = v;
                }
            }
        }
        // A sparse member's claim against the bytes it really stores (its data size as the tar
        // crate reads it: the PAX size when there is one).
        if ty.is_gnu_sparse() {
            if let Some(real) = h.as_gnu().and_then(|g| g.real_size().ok()) {
                let name = String::from_utf8_lossy(&h.path_bytes()).into_owned();
                check_sparse(&name, size, real).map_err(std::io::Error::other)?;
            }
        }
        self.pax = (recognised && ty.is_pax_local_extensions()).then(Vec::new);
        self.pax_len = size as usize;
        self.left = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let sparse_ext = ty.is_gnu_sparse() && h.as_gnu().is_some_and(|g| g.is_extended());
        self.state = if sparse_ext {
            Guard::SparseExt
        } else if self.left > 0 {
            Guard::Data
        } else {
            self.data_done();
            Guard::Header
        };
        Ok(())
    }

    fn data_done(&mut self) {
        if let Some(mut pax) = self.pax.take() {
            // The records without the block's padding, as the tar crate reads them.
            pax.truncate(self.pax_len);
            self.pending = Some(pax);
        }
        self.state = Guard::Header;
    }

    /// Follow the structure over bytes that were just read.
    fn watch(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.state {
                Guard::Done => return Ok(()),
                Guard::Header | Guard::SparseExt => {
                    let n = (BLOCK - self.header.len()).min(buf.len());
                    self.header.extend_from_slice(&buf[..n]);
                    buf = &buf[n..];
                    if self.header.len() == BLOCK {
                        if self.state == Guard::SparseExt {
                            // GnuExtSparseHeader: `isextended` at byte 504, exactly 1.
                            let more = self.header[504] == 1;
                            self.header.clear();
                            if !more {
                                self.state = if self.left > 0 {
                                    Guard::Data
                                } else {
                                    Guard::Header
                                };
                            }
                        } else {
                            self.header_done()?;
                        }
                    }
                }
                Guard::Data => {
                    let n = (self.left.min(buf.len() as u64)) as usize;
                    if let Some(p) = &mut self.pax {
                        p.extend_from_slice(&buf[..n]);
                    }
                    buf = &buf[n..];
                    self.left -= n as u64;
                    if self.left == 0 {
                        self.data_done();
                    }
                }
            }
        }
        Ok(())
    }
}

/// The tar crate skips a member's data with `SeekFrom::Current` when the archive can seek: the
/// guard follows such skips within a member's data and refuses any other seek.
impl<R: Read + std::io::Seek> std::io::Seek for HeaderGuard<R> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let std::io::SeekFrom::Current(d) = pos else {
            return Err(std::io::Error::other(
                "the tar guard follows forward skips only",
            ));
        };
        let d = u64::try_from(d)
            .map_err(|_| std::io::Error::other("a backward seek in a tar stream"))?;
        if d > 0 {
            if self.state != Guard::Data || d > self.left || self.pax.is_some() {
                if self.state != Guard::Done {
                    return Err(std::io::Error::other("a seek past the member being read"));
                }
            } else {
                self.left -= d;
                if self.left == 0 {
                    self.data_done();
                }
            }
        }
        self.inner.seek(pos)
    }
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.watch(&buf[..n])?;
        Ok(n)
    }
}

/// Refuse a name no filesystem takes: longer than PATH_MAX, or a part longer than NAME_MAX.
fn check_name(path: &str) -> Result<()> {
    if path.len() >= MAX_PATH {
        bail!(
            "{}…: a path of {} bytes (Linux takes less than {MAX_PATH}): refusing the image",
            path.chars().take(80).collect::<String>(),
            path.len()
        );
    }
    if let Some(part) = path.split('/').find(|p| p.len() > MAX_NAME) {
        bail!(
            "{}…: a name of {} bytes in a path (Linux takes at most {MAX_NAME}): refusing the image",
            part.chars().take(80).collect::<String>(),
            part.len()
        );
    }
    Ok(())
}

/// Index one layer's tar stream; the reader is handed back, its tar fully read, for the caller
/// to drain and check digests.
pub fn index_reader(reader: LayerReader<'_>) -> Result<(LayerIndex, LayerReader<'_>)> {
    let mut ar = tar::Archive::new(HeaderGuard::new(reader));
    let mut skip_buf = vec![0u8; 64 << 10];
    let mut ops = Vec::new();
    let mut captured = Vec::new();
    let entries = ar.entries().context("reading the layer as tar")?;
    for (this, entry) in (0u32..).zip(entries) {
        crate::signals::check()?;
        let mut e = entry.context("reading a tar entry (truncated or corrupt layer?)")?;
        let ty = e.header().entry_type();
        if matches!(ty, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let raw = e.path_bytes().into_owned();
        let name =
            classify(&raw).with_context(|| format!("entry {}", String::from_utf8_lossy(&raw)))?;
        match name {
            Name::Root | Name::Ignored => {}
            Name::Whiteout(p) => ops.push(Op::Whiteout(p)),
            Name::Opaque(p) => ops.push(Op::Opaque(p)),
            Name::Path(path) => {
                check_name(&path)?;
                let meta = meta_of(&mut e, &path)?;
                if meta.kind == Kind::File {
                    if CAPTURE.contains(&path.as_str()) && meta.size <= CAPTURE_MAX {
                        let mut data = Vec::with_capacity(meta.size as usize);
                        e.read_to_end(&mut data).with_context(|| {
                            format!("reading {path} (the layer is truncated or corrupt)")
                        })?;
                        check_len(&path, data.len() as u64, meta.size)?;
                        captured.push(Captured {
                            ordinal: this,
                            path: path.clone(),
                            data,
                        });
                    } else {
                        let n =
                            skip_checking_signals(&mut e, &mut skip_buf).with_context(|| {
                                format!("reading {path} (the layer is truncated or corrupt)")
                            })?;
                        check_len(&path, n, meta.size)?;
                    }
                }
                ops.push(Op::Put {
                    ordinal: this,
                    path,
                    meta,
                });
            }
        }
    }
    let guard = ar.into_inner();
    let ended = guard.ended();
    Ok((
        LayerIndex {
            ops,
            captured,
            ended,
        },
        guard.into_inner(),
    ))
}

/// Read an entry's content to its end (verifying the layer's bytes), looking for Ctrl-C
/// between chunks; the number of bytes.
fn skip_checking_signals(r: &mut impl Read, buf: &mut [u8]) -> Result<u64> {
    let mut n = 0u64;
    loop {
        let k = r.read(buf)?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
        crate::signals::check()?;
    }
}

/// How far a sparse entry's size may exceed the bytes it stores: every target writes the holes
/// in full (a disk's files have none), so a claim out of proportion would fill the host's disk
/// from a tiny image. Ratio, then slack in bytes.
const SPARSE_RATIO: u64 = 64;
const SPARSE_SLACK: u64 = 64 << 20;

/// Refuse a sparse entry whose size is out of proportion to what it stores.
pub fn check_sparse(path: &str, stored: u64, size: u64) -> Result<()> {
    if size
        > stored
            .saturating_mul(SPARSE_RATIO)
            .saturating_add(SPARSE_SLACK)
    {
        bail!(
            "{path}: a sparse file claiming {size} bytes from {stored} stored: out of proportion \
             (abox writes sparse regions in full; at most {SPARSE_RATIO}× plus {} MiB): refusing \
             the image",
            SPARSE_SLACK >> 20
        );
    }
    Ok(())
}

pub fn check_len(path: &str, got: u64, want: u64) -> Result<()> {
    if got != want {
        bail!("{path}: layer ends after {got} of {want} bytes (truncated layer)");
    }
    Ok(())
}
