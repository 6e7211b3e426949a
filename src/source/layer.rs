//! Opening one layer as an uncompressed tar stream. Compression is sniffed from magic bytes,
//! never from names or media types. Two digests are checked as the bytes pass: the compressed
//! blob's (manifest `digest`, when known) and the uncompressed stream's (`diff_id`). Both are
//! only known at the end of the stream, so [`LayerReader::finish`] drains it to EOF — which also
//! makes gzip check its trailer.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// One layer of an image, in order (0 = bottom).
#[derive(Clone, Debug)]
pub struct LayerDesc {
    pub index: usize,
    /// `sha256:<hex>` of the uncompressed tar (from the config's `rootfs.diff_ids`).
    pub diff_id: String,
    /// Where the blob is in its store.
    pub key: String,
    /// `sha256:<hex>` of the blob as stored, when the manifest gives it.
    pub digest: Option<String>,
    /// Stored size, when known (for progress).
    pub size: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("layer {index} ({key}): {what} digest mismatch: expected {expected}, got {actual} — the image is corrupt or was modified")]
pub struct DigestMismatch {
    pub index: usize,
    pub key: String,
    pub what: &'static str,
    pub expected: String,
    pub actual: String,
}

/// Counts and hashes what is read through it.
pub struct HashingReader<R> {
    inner: R,
    /// None when the digest was already checked (the second pass over a layer).
    hasher: Option<Sha256>,
    counter: Option<Arc<AtomicU64>>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, counter: Option<Arc<AtomicU64>>, hash: bool) -> Self {
        Self {
            inner,
            hasher: hash.then(Sha256::new),
            counter,
        }
    }
    pub fn finish(self) -> (R, String) {
        let digest = self
            .hasher
            .map(|h| format!("sha256:{}", hex::encode(h.finalize())))
            .unwrap_or_default();
        (self.inner, digest)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        if let Some(c) = &self.counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// A blob being read; borrowed when it is a member of a tar that is read front to back.
pub type AnyReader<'a> = Box<dyn Read + 'a>;

type Raw<'a> = BufReader<HashingReader<AnyReader<'a>>>;

enum Decoder<'a> {
    Plain(Raw<'a>),
    Gzip(flate2::bufread::MultiGzDecoder<Raw<'a>>),
    Zstd(zstd::stream::read::Decoder<'static, Raw<'a>>),
}

impl<'a> Decoder<'a> {
    fn into_inner(self) -> Raw<'a> {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
        }
    }
}

impl Read for Decoder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

/// Compression of a blob, from its first bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn sniff(magic: &[u8]) -> Compression {
    if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Read buffer for layer blobs.
const READ_BUF: usize = 256 << 10;

/// A layer's uncompressed tar stream.
pub struct LayerReader<'a> {
    desc: LayerDesc,
    inner: HashingReader<Decoder<'a>>,
    verify: bool,
}

impl<'a> LayerReader<'a> {
    /// Open a layer; with `verify`, [`LayerReader::finish`] checks its digests.
    pub fn open(
        blob: AnyReader<'a>,
        desc: &LayerDesc,
        counter: Option<Arc<AtomicU64>>,
        verify: bool,
    ) -> Result<Self> {
        let mut raw = BufReader::with_capacity(READ_BUF, HashingReader::new(blob, counter, verify));
        let magic = raw
            .fill_buf()
            .with_context(|| format!("reading layer {} ({})", desc.index, desc.key))?;
        let dec = match sniff(magic) {
            Compression::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(raw)),
            Compression::Zstd => Decoder::Zstd(
                zstd::stream::read::Decoder::with_buffer(raw).context("starting zstd decoder")?,
            ),
            Compression::None => Decoder::Plain(raw),
        };
        Ok(Self {
            desc: desc.clone(),
            inner: HashingReader::new(dec, None, verify),
            verify,
        })
    }

    /// Read to the end of the stream; return the digests of the blob and of the uncompressed
    /// tar (empty strings without `verify`).
    pub fn digests(mut self) -> Result<(LayerDesc, String, String)> {
        let what = || format!("reading layer {} ({})", self.desc.index, self.desc.key);
        io::copy(&mut self.inner, &mut io::sink()).with_context(what)?;
        let (dec, diff_id) = self.inner.finish();
        let mut raw = dec.into_inner();
        io::copy(&mut raw, &mut io::sink()).with_context(what)?;
        let (_, digest) = raw.into_inner().finish();
        Ok((self.desc, digest, diff_id))
    }

    /// Read to the end of the stream and check both digests.
    pub fn finish(self) -> Result<()> {
        let verify = self.verify;
        let (desc, digest, diff_id) = self.digests()?;
        if !verify {
            return Ok(());
        }
        if let Some(expected) = &desc.digest {
            if *expected != digest {
                return Err(DigestMismatch {
                    index: desc.index,
                    key: desc.key.clone(),
                    what: "blob",
                    expected: expected.clone(),
                    actual: digest,
                }
                .into());
            }
        }
        if desc.diff_id != diff_id {
            return Err(DigestMismatch {
                index: desc.index,
                key: desc.key.clone(),
                what: "diff_id (uncompressed)",
                expected: desc.diff_id.clone(),
                actual: diff_id,
            }
            .into());
        }
        Ok(())
    }
}

impl Read for LayerReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
