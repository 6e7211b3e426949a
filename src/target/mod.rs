//! Targets: the last stage. Each target receives the flattened rootfs entry by entry (through a
//! fan-out, so several targets share one read of the image), applies its own fix-ups, and
//! writes its artifacts under temporary names; [`crate::output::commit_all`] renames them.

pub mod lxd;
pub mod openrc;
pub mod rootfs;
pub mod wsl;

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use gzp::deflate::Gzip;
use gzp::par::compress::{ParCompress, ParCompressBuilder};
use gzp::ZWriter;

use crate::flatten::{Facts, Plan, Sink};
use crate::output::{hash_file, Artifact, HashingWriter, PendingFile};
use crate::tarfmt::{Kind, Meta, TarWriter};

/// A writer of one or more artifacts.
pub trait Target {
    /// Called once pass 1 has indexed the image (its tree and facts), before the first entry.
    fn start(&mut self, plan: &Plan) -> Result<()>;
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()>;
    fn data(&mut self, buf: &[u8]) -> Result<()>;
    fn end(&mut self) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<Vec<Artifact>>;
}

/// Forwards every entry to every target.
pub struct Fanout(pub Vec<Box<dyn Target>>);

impl Sink for Fanout {
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        self.0.iter_mut().try_for_each(|t| t.begin(path, meta))
    }
    fn data(&mut self, buf: &[u8]) -> Result<()> {
        self.0.iter_mut().try_for_each(|t| t.data(buf))
    }
    fn end(&mut self) -> Result<()> {
        self.0.iter_mut().try_for_each(|t| t.end())
    }
}

/// What a target does with one rootfs entry.
pub enum Action {
    Keep,
    /// Keep, with other metadata (ownership, mode).
    KeepAs(Meta),
    Drop,
    /// Buffer the content (small files only) and pass it to [`Fixup::rewrite`].
    Rewrite,
}

/// An entry a target adds itself.
pub struct Extra {
    pub path: String,
    pub meta: Meta,
    pub data: Vec<u8>,
}

impl Extra {
    pub fn dir(path: &str, mtime: u64) -> Self {
        Self {
            path: path.into(),
            meta: Meta::new(Kind::Dir, 0o755, 0, mtime),
            data: Vec::new(),
        }
    }
    pub fn file(path: &str, mode: u32, data: Vec<u8>, mtime: u64) -> Self {
        Self {
            path: path.into(),
            meta: Meta::new(Kind::File, mode, data.len() as u64, mtime),
            data,
        }
    }
    pub fn symlink(path: &str, target: &str, mtime: u64) -> Self {
        Self {
            path: path.into(),
            meta: Meta::new(Kind::Symlink(target.into()), 0o777, 0, mtime),
            data: Vec::new(),
        }
    }
}

/// A target's policy over the rootfs: table-driven fix-ups in one place per target.
pub trait Fixup: Send {
    fn start(&mut self, _facts: &Facts) -> Result<()> {
        Ok(())
    }
    /// Called once pass 1 is done, with the whole plan (the tree too) and the facts to go by
    /// (the plan's own, or a view another fix-up changed); by default [`Self::start`].
    fn start_with(&mut self, _plan: &Plan, facts: &Facts) -> Result<()> {
        self.start(facts)
    }
    /// Called once pass 1 is done, with the whole plan: [`Self::start_with`] its own facts.
    fn start_plan(&mut self, plan: &Plan) -> Result<()> {
        self.start_with(plan, &plan.facts)
    }
    /// Entries before the rootfs, outside the rootfs prefix (LXD's `metadata.yaml`).
    fn prologue(&mut self) -> Result<Vec<Extra>> {
        Ok(Vec::new())
    }
    fn action(&mut self, _path: &str, _meta: &Meta) -> Action {
        Action::Keep
    }
    fn rewrite(&mut self, _path: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        Ok(data)
    }
    /// The metadata a rewritten file is written with (its own, unless the fix-up says).
    fn rewritten_meta(&self, _path: &str, meta: Meta) -> Meta {
        meta
    }
    /// Entries added to the rootfs after the image's own (inside the prefix).
    fn epilogue(&mut self, _seen_dirs: &HashSet<String>) -> Result<Vec<Extra>> {
        Ok(Vec::new())
    }
}

/// The rootfs fix-ups of no target: the image as it is.
pub struct AsIs;
impl Fixup for AsIs {}

/// Largest file a fix-up may rewrite in memory.
const REWRITE_MAX: u64 = 16 << 20;

/// Where a tar target's bytes go.
pub enum Out {
    Plain(HashingWriter<BufWriter<File>>),
    Gzip(GzipOut),
    Pipe(BufWriter<std::process::ChildStdin>),
}

type Compressor = ParCompress<'static, Gzip, HashingWriter<BufWriter<File>>>;

/// The parallel gzip writer, finished exactly once. gzp's own `Drop` finishes an unfinished
/// compressor and panics when that fails (a full disk), and its `finish` panics once a failed
/// write has closed the pipeline: on an error path abox drops its output unfinished, so this
/// guard finishes a healthy compressor itself (ignoring the consequence error) and leaves a
/// failed one alone, and the error that stopped the run is the one reported.
pub struct GzipOut {
    gz: Option<Compressor>,
    /// A write or flush failed: gzp has shut its pipeline down already.
    failed: bool,
}

impl GzipOut {
    fn finish(mut self) -> Result<HashingWriter<BufWriter<File>>> {
        if self.failed {
            bail!("gzip: the output failed earlier");
        }
        let mut gz = self.gz.take().context("gzip finished twice")?;
        gz.finish().map_err(|e| anyhow::anyhow!("gzip: {e}"))
    }

    /// Run `f` on the compressor, remembering a failure.
    fn with<T>(&mut self, f: impl FnOnce(&mut Compressor) -> io::Result<T>) -> io::Result<T> {
        if self.failed {
            return Err(io::Error::other("gzip output failed earlier"));
        }
        let gz = self
            .gz
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip output already finished"))?;
        let r = f(gz);
        self.failed = r.is_err();
        r
    }
}

impl Drop for GzipOut {
    fn drop(&mut self) {
        if let Some(mut gz) = self.gz.take() {
            if !self.failed {
                // The run already failed elsewhere; this error is a consequence of it.
                let _ = gz.finish();
            }
        }
    }
}

/// Output buffer for files and pipes.
const OUT_BUF: usize = 1 << 20;

impl Out {
    pub fn plain(f: &mut PendingFile) -> Result<Self> {
        Self::plain_to(f.file().try_clone()?)
    }
    /// gzip on every core, as one gzip member (what WSL1 and WSL2 both read).
    pub fn gzip(f: &mut PendingFile) -> Result<Self> {
        Self::gzip_to(f.file().try_clone()?)
    }
    fn plain_to(f: File) -> Result<Self> {
        Ok(Out::Plain(HashingWriter::new(BufWriter::with_capacity(
            OUT_BUF, f,
        ))))
    }
    fn gzip_to(f: File) -> Result<Self> {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let w = HashingWriter::new(BufWriter::with_capacity(OUT_BUF, f));
        let gz = ParCompressBuilder::<Gzip>::new()
            .num_threads(threads)
            .context("gzip threads")?
            .compression_level(gzp::Compression::new(6))
            .from_writer(w);
        Ok(Out::Gzip(GzipOut {
            gz: Some(gz),
            failed: false,
        }))
    }
    /// Flush everything; for files, the sha256 and size of what was written.
    fn close(self) -> Result<Option<(String, u64)>> {
        let done = |w: HashingWriter<BufWriter<File>>| -> Result<Option<(String, u64)>> {
            let (mut inner, sha, len) = w.finish();
            inner.flush()?;
            Ok(Some((sha, len)))
        };
        match self {
            Out::Plain(w) => done(w),
            Out::Gzip(gz) => done(gz.finish()?),
            Out::Pipe(mut w) => {
                w.flush()?;
                Ok(None)
            }
        }
    }
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::Plain(w) => w.write(buf),
            Out::Gzip(w) => w.with(|gz| gz.write(buf)),
            Out::Pipe(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::Plain(w) => w.flush(),
            Out::Gzip(w) => w.with(|gz| gz.flush()),
            Out::Pipe(w) => w.flush(),
        }
    }
}

enum Current {
    Keep(u64),
    Drop,
    Buffer(String, Meta, Vec<u8>),
}

pub use crate::tarfmt::EntryOut;

/// The rootfs (under `prefix`) with a target's fix-ups applied, as a tar stream or into any
/// other [`EntryOut`].
pub struct TarStream<F: Fixup, O: EntryOut = TarWriter<Out>> {
    tar: O,
    prefix: String,
    pub fixup: F,
    current: Current,
    dropped: HashSet<String>,
    seen_dirs: HashSet<String>,
    /// Paths written as something other than a folder (a symlink, a file): an entry a fix-up
    /// adds below one of them cannot be written (its folder would replace the image's link).
    seen_other: HashSet<String>,
}

impl<F: Fixup> TarStream<F> {
    pub fn new(out: Out, prefix: &str, fixup: F) -> Self {
        Self::with_out(TarWriter::new(out), prefix, fixup)
    }

    /// Add the fix-up's own entries, end the archive.
    pub fn finish(self) -> Result<Out> {
        Ok(self.finish_entries()?.finish()?)
    }
}

impl<F: Fixup, O: EntryOut> TarStream<F, O> {
    pub fn with_out(tar: O, prefix: &str, fixup: F) -> Self {
        Self {
            tar,
            prefix: prefix.to_string(),
            fixup,
            current: Current::Drop,
            dropped: HashSet::new(),
            seen_dirs: HashSet::new(),
            seen_other: HashSet::new(),
        }
    }

    fn full(&self, p: &str) -> String {
        crate::flatten::path::join(self.prefix.trim_end_matches('/'), p)
    }

    pub fn start(&mut self, plan: &Plan) -> Result<()> {
        self.fixup.start_plan(plan)?;
        for e in self.fixup.prologue()? {
            self.tar.entry(&e.path, &e.meta, &e.data)?;
        }
        if !self.prefix.is_empty() {
            let m = Meta::new(Kind::Dir, 0o755, 0, 0);
            self.tar.entry(self.prefix.trim_end_matches('/'), &m, &[])?;
        }
        Ok(())
    }

    pub fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        let mut action = self.fixup.action(path, meta);
        if let Kind::Hardlink(t) = &meta.kind {
            if self.dropped.contains(t) {
                action = Action::Drop;
            }
        }
        if !matches!(action, Action::Drop) {
            if meta.kind == Kind::Dir {
                self.seen_dirs.insert(path.to_string());
            } else {
                self.seen_other.insert(path.to_string());
            }
        }
        self.current = match action {
            Action::Drop => {
                self.dropped.insert(path.to_string());
                Current::Drop
            }
            Action::Rewrite if meta.kind == Kind::File => {
                if meta.size > REWRITE_MAX {
                    bail!(
                        "/{path} is {} bytes: abox rewrites it for this target and takes at most \
                         {REWRITE_MAX} bytes there; it will not pass it through unchanged",
                        meta.size
                    );
                }
                Current::Buffer(
                    path.to_string(),
                    meta.clone(),
                    Vec::with_capacity(meta.size as usize),
                )
            }
            // A path a fix-up owns must be a regular file: a link, device node or FIFO there is
            // dropped (the fix-up writes the file afresh where it needs one).
            Action::Rewrite => {
                log::debug!(
                    "dropping the {:?} at /{path}: abox writes a regular file there",
                    meta.kind
                );
                self.dropped.insert(path.to_string());
                Current::Drop
            }
            Action::KeepAs(m) => self.keep(path, &m)?,
            _ => self.keep(path, meta)?,
        };
        Ok(())
    }

    fn keep(&mut self, path: &str, meta: &Meta) -> Result<Current> {
        let mut m = meta.clone();
        if let Kind::Hardlink(t) = &m.kind {
            m.kind = Kind::Hardlink(self.full(t));
        }
        self.tar.begin(&self.full(path), &m)?;
        Ok(Current::Keep(m.size))
    }

    pub fn data(&mut self, buf: &[u8]) -> Result<()> {
        match &mut self.current {
            Current::Keep(_) => self.tar.data(buf)?,
            Current::Buffer(_, _, b) => b.extend_from_slice(buf),
            Current::Drop => {}
        }
        Ok(())
    }

    pub fn end(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.current, Current::Drop) {
            Current::Keep(size) => self.tar.end(size)?,
            Current::Buffer(p, m, b) => {
                let data = self.fixup.rewrite(&p, b)?;
                let m = self.fixup.rewritten_meta(&p, m);
                let full = self.full(&p);
                self.tar.entry(&full, &m, &data)?;
            }
            Current::Drop => {}
        }
        Ok(())
    }

    /// Add the fix-up's own entries (and any folder they need); hand back the output.
    pub fn finish_entries(mut self) -> Result<O> {
        let extras = self.fixup.epilogue(&self.seen_dirs)?;
        for e in extras {
            // Below a symlink (or a file) the image has: left out, said, never written through.
            let mut up = crate::flatten::path::parent(&e.path);
            let mut blocked = None;
            while !up.is_empty() {
                if self.seen_other.contains(up) {
                    blocked = Some(up.to_string());
                    break;
                }
                up = crate::flatten::path::parent(up);
            }
            if let Some(b) = blocked {
                log::warn!(
                    "/{} not written: /{b} is not a folder in the image (a symlink or a file), \
                     and abox never writes through one",
                    e.path
                );
                continue;
            }
            let mut parents = Vec::new();
            let mut d = crate::flatten::path::parent(&e.path);
            while !d.is_empty() && !self.seen_dirs.contains(d) {
                parents.push(d.to_string());
                d = crate::flatten::path::parent(d);
            }
            for p in parents.into_iter().rev() {
                let full = self.full(&p);
                self.tar
                    .entry(&full, &Meta::new(Kind::Dir, 0o755, 0, e.meta.mtime), &[])?;
                self.seen_dirs.insert(p);
            }
            let full = self.full(&e.path);
            self.tar.entry(&full, &e.meta, &e.data)?;
            if e.meta.kind == Kind::Dir {
                self.seen_dirs.insert(e.path.clone());
            }
        }
        Ok(self.tar)
    }
}

/// A fixed-up stream is itself a place the flattening can write to.
impl<F: Fixup, O: EntryOut> Sink for TarStream<F, O> {
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        TarStream::begin(self, path, meta)
    }
    fn data(&mut self, buf: &[u8]) -> Result<()> {
        TarStream::data(self, buf)
    }
    fn end(&mut self) -> Result<()> {
        TarStream::end(self)
    }
}

/// A target that is one tar file (maybe gzip-compressed).
pub struct TarFileTarget<F: Fixup> {
    kind: &'static str,
    /// None: the tar goes to standard output.
    file: Option<PendingFile>,
    stream: TarStream<F>,
}

/// Where a tar artifact goes.
#[derive(Clone, Debug)]
pub enum TarDest {
    /// This file (written under a temporary name, renamed when the run succeeded).
    File(std::path::PathBuf),
    /// Standard output, as it is written (`-o -`: for `wsl --import NAME DIR -` and pipes).
    Stdout,
}

impl TarDest {
    /// The file `<dir>/<name>`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        TarDest::File(dir.join(name))
    }
}

impl<F: Fixup> TarFileTarget<F> {
    pub fn create(
        kind: &'static str,
        dest: &TarDest,
        gzip: bool,
        prefix: &str,
        fixup: F,
    ) -> Result<Self> {
        let (file, raw) = match dest {
            TarDest::File(p) => {
                let mut f = PendingFile::create(p)?;
                let raw = f.file().try_clone()?;
                (Some(f), raw)
            }
            TarDest::Stdout => {
                use std::os::fd::AsFd;
                let fd = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("standard output")?;
                (None, File::from(fd))
            }
        };
        let out = if gzip {
            Out::gzip_to(raw)?
        } else {
            Out::plain_to(raw)?
        };
        Ok(Self {
            kind,
            file,
            stream: TarStream::new(out, prefix, fixup),
        })
    }
}

impl<F: Fixup> TarFileTarget<F> {
    /// A write error on standard output says where (a reader that went away: `| head`).
    fn said(&self, r: Result<()>) -> Result<()> {
        match (&self.file, r) {
            (None, Err(e)) if e.downcast_ref::<io::Error>().is_some() => {
                Err(e.context("writing the tar to standard output"))
            }
            (_, r) => r,
        }
    }
}

impl<F: Fixup> Target for TarFileTarget<F> {
    fn start(&mut self, plan: &Plan) -> Result<()> {
        let r = self.stream.start(plan);
        self.said(r)
    }
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        let r = self.stream.begin(path, meta);
        self.said(r)
    }
    fn data(&mut self, buf: &[u8]) -> Result<()> {
        let r = self.stream.data(buf);
        self.said(r)
    }
    fn end(&mut self) -> Result<()> {
        let r = self.stream.end();
        self.said(r)
    }
    fn finish(self: Box<Self>) -> Result<Vec<Artifact>> {
        let this = *self;
        let closed = this.stream.finish()?.close().map_err(|e| match this.file {
            None => e.context("writing the tar to standard output"),
            Some(_) => e,
        })?;
        let Some(file) = this.file else {
            return Ok(Vec::new());
        };
        let (sha256, size) = match closed {
            Some(h) => h,
            None => hash_file(file.tmp_path())?,
        };
        Ok(vec![Artifact {
            kind: this.kind,
            file,
            sha256,
            size,
            image: None,
        }])
    }
}

/// Seconds since the epoch for entries a target adds: `SOURCE_DATE_EPOCH` when set (reproducible
/// builds), else the image's creation time, else now.
pub fn build_time(created: Option<&str>) -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return t;
    }
    created
        .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
        .map(|d| d.timestamp())
        .filter(|t| *t > 0)
        .map(|t| t as u64)
        .unwrap_or_else(|| chrono::Utc::now().timestamp() as u64)
}

/// `KEY=value` pairs of an os-release file (quotes removed).
pub fn os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.replace("\\\"", "\"")))
        })
        .collect()
}

pub fn os_release_get<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_parsing() {
        let kv = os_release(
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.20.3\n# c\nPRETTY_NAME='Alpine Linux v3.20'\n",
        );
        assert_eq!(os_release_get(&kv, "ID"), Some("alpine"));
        assert_eq!(os_release_get(&kv, "NAME"), Some("Alpine Linux"));
        assert_eq!(os_release_get(&kv, "VERSION_ID"), Some("3.20.3"));
        assert_eq!(
            os_release_get(&kv, "PRETTY_NAME"),
            Some("Alpine Linux v3.20")
        );
    }

    #[test]
    fn build_time_uses_the_image_creation_time_else_now() {
        // (SOURCE_DATE_EPOCH is not set here: changing the environment races other tests.)
        assert_eq!(build_time(Some("2024-01-02T03:04:05.123Z")), 1704164645);
        assert!(build_time(None) > 1_700_000_000);
    }
}
