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
/// what the tar crate follows: each header's size (octal or base-256), a PAX `size` record for
/// the next member, old-GNU sparse extension blocks, and stops watching at the first zero block
/// (the end of the archive as the tar crate reads it).
struct HeaderGuard<R> {
    inner: R,
    state: Guard,
    header: Vec<u8>,
    /// Data left in the current member (whole blocks).
    left: u64,
    /// Old-GNU sparse extension blocks still to come.
    sparse_ext: bool,
    /// The current member's data when it is a PAX header (bounded by MAX_EXTENSION).
    pax: Option<Vec<u8>>,
    /// `size` from the last PAX header, for the next member.
    next_size: Option<u64>,
}

#[derive(PartialEq)]
enum Guard {
    Header,
    SparseExt,
    Data,
    Done,
}

fn octal_or_binary(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256: big-endian, the marker bit cleared.
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(*b as u64)?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

impl<R: Read> HeaderGuard<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            state: Guard::Header,
            header: Vec::with_capacity(BLOCK),
            left: 0,
            sparse_ext: false,
            pax: None,
            next_size: None,
        }
    }

    fn into_inner(self) -> R {
        self.inner
    }

    fn header_done(&mut self) -> std::io::Result<()> {
        let h = std::mem::take(&mut self.header);
        if h.iter().all(|b| *b == 0) {
            self.state = Guard::Done;
            return Ok(());
        }
        let ty = h[156];
        let size = octal_or_binary(&h[124..136])
            .ok_or_else(|| std::io::Error::other("a tar header with an unreadable size"))?;
        let size = match ty {
            b'x' | b'g' | b'L' | b'K' => size,
            _ => self.next_size.take().unwrap_or(size),
        };
        if matches!(ty, b'x' | b'g' | b'L' | b'K') && size > MAX_EXTENSION {
            let what = match ty {
                b'L' => "GNU long name",
                b'K' => "GNU long link name",
                _ => "PAX header",
            };
            return Err(std::io::Error::other(format!(
                "a {what} member of {size} bytes: more than the {MAX_EXTENSION} abox reads \
                 (a name is at most {MAX_PATH} bytes); refusing the layer"
            )));
        }
        self.pax = (ty == b'x').then(Vec::new);
        self.left = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        self.sparse_ext = ty == b'S' && h[482] != 0;
        self.state = if self.sparse_ext {
            Guard::SparseExt
        } else if self.left > 0 {
            Guard::Data
        } else {
            Guard::Header
        };
        self.header = Vec::with_capacity(BLOCK);
        Ok(())
    }

    fn data_done(&mut self) {
        if let Some(pax) = self.pax.take() {
            // Records: "LEN key=value\n".
            let mut rest = &pax[..];
            while let Some(sp) = rest.iter().position(|b| *b == b' ') {
                let Some(len) = std::str::from_utf8(&rest[..sp])
                    .ok()
                    .and_then(|l| l.parse::<usize>().ok())
                else {
                    break;
                };
                if len == 0 || len > rest.len() {
                    break;
                }
                let rec = &rest[sp + 1..len];
                if let Some(v) = rec.strip_prefix(b"size=") {
                    let v = std::str::from_utf8(v).unwrap_or("").trim_end_matches('\n');
                    self.next_size = v.parse().ok();
                }
                rest = &rest[len..];
            }
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
                            let more = self.header[504] != 0;
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
                if ty == tar::EntryType::GNUSparse {
                    check_sparse(&path, e.header().entry_size()?, meta.size)?;
                }
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
                        let n = std::io::copy(&mut e, &mut std::io::sink()).with_context(|| {
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
    Ok((LayerIndex { ops, captured }, ar.into_inner().into_inner()))
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
