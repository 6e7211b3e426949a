//! Flattening an image the engine hands over already flattened: a container's filesystem as
//! one tar (`GET /containers/{id}/export`, what `docker export` calls), read once.
//!
//! Pass 1 ([`index`]) indexes the stream as a single layer while it copies every byte into a
//! spool file (unnamed, in `$TMPDIR`: it vanishes with the process, even a killed one); pass 2
//! ([`emit`]) reads the files back from the spool. The engine is asked once, and its export
//! is cheap next to `docker save`, which tars every layer into a temporary folder first.
//!
//! A container is more than its image. Docker's init layer (moby
//! `daemon/initlayer/setup_unix.go`) prepares what it bind-mounts at run time: it replaces
//! whatever the image has at `.dockerenv`, `etc/resolv.conf`, `etc/hosts`, `etc/hostname`,
//! `dev/console` with empty files (mode 0755) and `etc/mtab` with a symlink to `/proc/mounts`,
//! and makes the folders `dev/pts`, `dev/shm`, `proc`, `sys` where the image lacks them (and
//! `dev`, `etc` as parents), all owned by root and stamped with the container's creation time
//! (the folders it writes in, too). So through the engine those six files of the image cannot
//! be read: [`EngineAdded`] recognises the init layer's shapes stamped then and leaves them out
//! (a folder only when nothing of the image is inside it), a note names [`REPLACED`], and the
//! targets write what a system needs there (a disk gets a working `/etc/hosts` and `/etc/hostname`; LXD's templates
//! and WSL write their own). A kept folder stamped then gets the image's creation time, so the
//! output still depends only on the image.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::index::{index_reader, Op};
use super::path::parent;
use super::tree::Tree;
use super::{emit_head, emit_layer, emit_tail, plan, Plan, CHUNK, TICK};
use crate::progress::Progress;
use crate::source::{Image, LayerDesc, LayerReader};
use crate::tarfmt::{Kind, Meta};

/// A source of one image's flattened tree as a single tar stream.
pub trait ExportSource: Send + Sync {
    /// The stream, from its first byte, and how to recognise what the engine added.
    fn open(&self) -> Result<ExportStream>;
    /// What to call it in messages.
    fn describe(&self) -> String;
    /// About how many bytes the stream has (for progress; 0 when unknown).
    fn size_hint(&self) -> u64;
}

pub struct ExportStream {
    pub reader: Box<dyn Read + Send>,
    pub added: EngineAdded,
}

/// What Docker's init layer adds to a container, stamped at `created`.
#[derive(Debug, Clone, Copy)]
pub struct EngineAdded {
    /// The container's creation time, seconds since the epoch, on the engine's clock.
    pub created: u64,
}

/// How long after the container's creation time the init layer may still be written, in
/// seconds (it is written right after; a loaded engine takes a moment).
const INIT_WINDOW: u64 = 120;

impl EngineAdded {
    /// Whether `meta` carries the container's creation time (the init layer writes then).
    fn stamped(&self, meta: &Meta) -> bool {
        meta.mtime.saturating_add(1) >= self.created
            && meta.mtime <= self.created.saturating_add(INIT_WINDOW)
    }

    /// Whether the entry `path` with `meta` has the shape and time of one the init layer adds.
    /// Folders are only candidates here; [`filter`] keeps the ones the image has files in.
    pub fn matches(&self, path: &str, meta: &Meta) -> bool {
        let stamped = self.stamped(meta);
        if !stamped || meta.uid != 0 || meta.gid != 0 || !meta.xattrs.is_empty() {
            return false;
        }
        match &meta.kind {
            Kind::Dir => {
                matches!(path, "dev" | "dev/pts" | "dev/shm" | "proc" | "sys" | "etc")
                    && meta.mode & 0o7777 == 0o755
            }
            Kind::File => {
                matches!(
                    path,
                    ".dockerenv" | "etc/resolv.conf" | "etc/hosts" | "etc/hostname" | "dev/console"
                ) && meta.size == 0
                    && meta.mode & 0o7777 == 0o755
            }
            Kind::Symlink(t) => path == "etc/mtab" && t == "/proc/mounts",
            _ => false,
        }
    }
}

/// Drop the entries the engine added (see the module's documentation), and give the folders it
/// stamped that the image has files in the time `image_time`; the number dropped.
pub fn filter(ops: &mut Vec<Op>, added: &EngineAdded, image_time: u64) -> usize {
    let candidates: HashSet<String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Put { path, meta, .. } if added.matches(path, meta) => Some(path.clone()),
            _ => None,
        })
        .collect();
    if candidates.is_empty() {
        return 0;
    }
    // A candidate folder holding anything that is not itself a candidate belongs to the image.
    let mut kept_dirs = HashSet::new();
    for op in ops.iter() {
        if let Op::Put { path, .. } = op {
            if candidates.contains(path) {
                continue;
            }
            let mut p = parent(path);
            while !p.is_empty() {
                if candidates.contains(p) {
                    kept_dirs.insert(p.to_string());
                }
                p = parent(p);
            }
        }
    }
    let before = ops.len();
    ops.retain(|op| match op {
        Op::Put { path, .. } => !candidates.contains(path) || kept_dirs.contains(path),
        _ => true,
    });
    for op in ops.iter_mut() {
        if let Op::Put { path, meta, .. } = op {
            // `etc/mtab -> /proc/mounts` is what images have there (Alpine's is
            // `../proc/mounts`): kept, as the image's would be.
            let mtab =
                path == "etc/mtab" && matches!(&meta.kind, Kind::Symlink(t) if t == "/proc/mounts");
            if (mtab || kept_dirs.contains(path.as_str())) && added.stamped(meta) {
                meta.mtime = image_time;
            }
        }
    }
    before - ops.len()
}

/// The files of the image the engine's init layer replaces, which a `docker:` read cannot give.
pub const REPLACED: &[&str] = &["etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab"];

/// Copies what is read into the spool.
struct Tee<'w, R> {
    inner: R,
    spool: &'w mut BufWriter<File>,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.spool.write_all(&buf[..n]).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "spooling the image to {}: {e} (set TMPDIR to a folder with room for the \
                     image's files)",
                    std::env::temp_dir().display()
                ),
            )
        })?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The spooled export: read at any offset, by any number of readers.
pub struct Spool(Arc<File>);

struct SpoolReader {
    file: Arc<File>,
    pos: u64,
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Pass 1: read the stream once, spooling it, and index it as one layer.
pub fn index(src: &dyn ExportSource, image: &Image, progress: &Progress) -> Result<Plan> {
    let mut task = progress.task("reading the image", src.size_hint());
    let counter = Arc::new(AtomicU64::new(0));
    let done = AtomicBool::new(false);
    let tmp = std::env::temp_dir();
    crate::output::check_room(
        &tmp,
        src.size_hint(),
        "spooling the image",
        "set TMPDIR to a folder with room",
    )?;
    let spool = tempfile::tempfile().with_context(|| {
        format!(
            "creating a spool file in {} (set TMPDIR to a writable folder)",
            tmp.display()
        )
    })?;
    let (ix, added, spool) = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                task.set(counter.load(Ordering::Relaxed));
                std::thread::sleep(TICK);
            }
        });
        // The progress thread ends however this does (a panic too, or the scope never ends).
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _done = Done(&done);
        (|| {
            let stream = src.open()?;
            let mut writer = BufWriter::with_capacity(CHUNK, spool);
            let what = || format!("reading the image from {}", src.describe());
            let ix = {
                let tee = Tee {
                    inner: stream.reader,
                    spool: &mut writer,
                    counter: counter.clone(),
                };
                let desc = LayerDesc {
                    index: 0,
                    diff_id: String::new(),
                    key: src.describe(),
                    digest: None,
                    size: None,
                };
                let reader = LayerReader::open(Box::new(tee), &desc, None, false)?;
                let (ix, mut rest) = index_reader(reader).with_context(what)?;
                // The rest of the stream (the tar's end blocks) goes to the spool too.
                std::io::copy(&mut rest, &mut std::io::sink()).with_context(what)?;
                ix
            };
            let file = writer
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| {
                    format!("spooling the image to {}", std::env::temp_dir().display())
                })?;
            Ok::<_, anyhow::Error>((ix, stream.added, file))
        })()
    })?;
    task.set(counter.load(Ordering::Relaxed));
    if !ix.ended {
        bail!(
            "{}: the image stream ended before the end of its archive (the engine stopped \
             sending; is it still running?)",
            src.describe()
        );
    }
    let image_time = image
        .config
        .created()
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp().max(0) as u64)
        .unwrap_or(0);
    let mut ops = ix.ops;
    let replaced: Vec<String> = REPLACED
        .iter()
        .filter(|want| {
            ops.iter().any(|op| {
                matches!(op, Op::Put { path, meta, .. }
                    if path == *want && added.matches(path, meta))
            })
        })
        .map(|p| format!("/{p}"))
        .collect();
    let dropped = filter(&mut ops, &added, image_time);
    log::debug!("left out {dropped} entries the engine's init layer added");
    if !replaced.is_empty() {
        progress.note(&format!(
            "{} come from Docker, not the image (every container's are the engine's): left \
             out; for the image's own, `docker save` it and read docker-archive:FILE",
            replaced.join(", ")
        ));
    }
    let mut tree = Tree::default();
    tree.apply(0, ops)
        .with_context(|| format!("reading the image from {}", src.describe()))?;
    let mut plan = plan(tree, vec![ix.captured], 1);
    plan.spool = Some(Spool(Arc::new(spool)));
    task.finish(&format!(
        "{} paths, {} of files",
        plan.facts.paths,
        crate::disk::fs::human(plan.facts.content_bytes)
    ));
    Ok(plan)
}

/// Pass 2: the tree, its files read back from the spool.
pub fn emit(
    src: &dyn ExportSource,
    plan: &Plan,
    sink: &mut dyn super::Sink,
    progress: &Progress,
) -> Result<()> {
    let spool = plan
        .spool
        .as_ref()
        .context("internal: an exported image emitted before it was indexed")?;
    let mut task = progress.task("writing rootfs", plan.facts.content_bytes);
    emit_head(plan, sink)?;
    let mut buf = vec![0u8; CHUNK];
    let reader = std::io::BufReader::with_capacity(
        CHUNK,
        SpoolReader {
            file: spool.0.clone(),
            pos: 0,
        },
    );
    let what = format!("the image spooled from {}", src.describe());
    emit_layer(reader, &plan.files[0], &what, sink, &mut task, &mut buf)?;
    emit_tail(plan, sink)?;
    task.finish(&format!("{} paths", plan.facts.paths));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &str, kind: Kind, mode: u32, mtime: u64, size: u64) -> Op {
        Op::Put {
            ordinal: 0,
            path: path.into(),
            meta: Meta::new(kind, mode, size, mtime),
        }
    }

    fn paths(ops: &[Op]) -> Vec<&str> {
        ops.iter()
            .filter_map(|o| match o {
                Op::Put { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn init_layer_entries_are_left_out_and_the_images_kept() {
        let t = 1_700_000_000;
        let added = EngineAdded { created: t };
        let mut ops = vec![
            put(".dockerenv", Kind::File, 0o755, t, 0),
            put("dev", Kind::Dir, 0o755, t, 0),
            put("dev/console", Kind::File, 0o755, t, 0),
            put("dev/pts", Kind::Dir, 0o755, t, 0),
            put("dev/shm", Kind::Dir, 0o755, t, 0),
            // The image's /etc, stamped by chance at the same second: it has files in it.
            put("etc", Kind::Dir, 0o755, t + 1, 0),
            put("etc/hostname", Kind::File, 0o755, t, 0),
            // The image's own hosts (not empty), and an old resolv.conf.
            put("etc/hosts", Kind::File, 0o644, t, 20),
            put("etc/resolv.conf", Kind::File, 0o755, t - 3600, 0),
            put(
                "etc/mtab",
                Kind::Symlink("/proc/mounts".into()),
                0o777,
                t,
                0,
            ),
            put("proc", Kind::Dir, 0o755, t, 0),
            put("sys", Kind::Dir, 0o555, t, 0),
            put("usr", Kind::Dir, 0o755, t, 0),
        ];
        assert_eq!(filter(&mut ops, &added, 42), 8);
        assert_eq!(
            paths(&ops),
            ["etc", "etc/hosts", "etc/resolv.conf", "sys", "usr"]
        );
        let Op::Put { meta, .. } = &ops[0] else {
            unreachable!()
        };
        assert_eq!(
            meta.mtime, 42,
            "a kept folder the engine stamped gets the image's time"
        );
    }

    #[test]
    fn nothing_is_left_out_of_an_image_written_long_before() {
        let added = EngineAdded {
            created: 1_800_000_000,
        };
        let mut ops = vec![
            put(".dockerenv", Kind::File, 0o755, 1_700_000_000, 0),
            put("proc", Kind::Dir, 0o755, 1_700_000_000, 0),
        ];
        assert_eq!(filter(&mut ops, &added, 0), 0);
        assert_eq!(ops.len(), 2);
        let hostile = put("proc", Kind::Dir, 0o755, u64::MAX, 0);
        assert!(!added.matches(
            "proc",
            match &hostile {
                Op::Put { meta, .. } => meta,
                _ => unreachable!(),
            }
        ));
    }
}
