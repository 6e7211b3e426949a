//! Flattening: an image's layers → one rootfs tar stream, with OCI whiteout semantics.
//!
//! Two passes keep memory bounded by the number of paths, never by file sizes:
//! 1. [`index`] reads every layer (in parallel), checks its digests and records each entry's
//!    metadata; the indexes are merged bottom to top into a [`tree::Tree`] of the final rootfs.
//! 2. [`emit`] writes that tree to a [`Sink`]: folders first (sorted, so parents precede
//!    children), then symlinks, devices and fifos (sorted; a second path of one is a copy), then
//!    regular files streamed from their layers in layer order, then hard links (sorted, to
//!    regular files only), each after its target.
//!    The output depends only on the image, never on timing.

pub mod export;
pub mod index;
pub mod path;
pub mod tree;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::progress::Progress;
use crate::source::{Blobs, Image};
use crate::tarfmt::{Kind, Meta};
use index::{check_len, LayerIndex};
use tree::{Node, Tree};

/// Where the flattened rootfs goes, entry by entry. Paths are relative, without `./`.
pub trait Sink {
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()>;
    fn data(&mut self, buf: &[u8]) -> Result<()>;
    fn end(&mut self) -> Result<()>;
}

/// What the targets learn about the image before any byte is written.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    /// Final content of the small files listed in [`index::CAPTURE`] that the image has,
    /// symlinks (like `etc/os-release` → `../usr/lib/os-release`) resolved.
    pub files: HashMap<String, Vec<u8>>,
    /// Paths of the final tree.
    pub paths: usize,
    /// Bytes of regular-file content.
    pub content_bytes: u64,
    /// For each of [`SECRET_FILES`] the image has: the path under which the stream writes the
    /// regular file it resolves to (symlinks on the way followed, a hard link's first path), so
    /// a target that must clean or rewrite it reaches the content, not only the name.
    pub secret_files: HashMap<String, String>,
    /// For each of those: how many paths share its content (hard links), 1 when none.
    pub secret_links: HashMap<String, usize>,
}

/// Files that hold password hashes (shadow and gshadow, and the backups `shadow-` tools leave).
pub const SECRET_FILES: &[&str] = &["etc/shadow", "etc/shadow-", "etc/gshadow", "etc/gshadow-"];

impl Facts {
    pub fn text(&self, path: &str) -> Option<&str> {
        self.files
            .get(path)
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// The result of pass 1.
pub struct Plan {
    tree: Tree,
    pub facts: Facts,
    /// Per layer: ordinal → (path, meta) of the regular files whose content comes from it.
    files: Vec<BTreeMap<u32, (String, Meta)>>,
    /// Non-folder, non-regular entries (sorted by path).
    specials: Vec<(String, Meta)>,
    /// Second and later paths of an inode (sorted by path).
    links: Vec<(String, Meta)>,
    /// Exported images: the export, spooled in pass 1 (its files are "layer 0").
    spool: Option<export::Spool>,
}

impl Plan {
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// The second and later paths of each inode, with the path that carries its content (the
    /// target of their hard-link entries), sorted by path.
    pub fn hard_links(&self) -> impl Iterator<Item = (&str, &str)> {
        self.links.iter().filter_map(|(p, m)| match &m.kind {
            Kind::Hardlink(t) => Some((p.as_str(), t.as_str())),
            _ => None,
        })
    }
}

/// Interval at which the progress bar of the parallel pass is refreshed.
const TICK: Duration = Duration::from_millis(100);

/// Pass 1: index every layer, in parallel, and merge.
pub fn index(image: &Image, progress: &Progress) -> Result<Plan> {
    if let Blobs::Export(s) = &image.blobs {
        return export::index(s.as_ref(), image, progress);
    }
    let n = image.layers.len();
    let total: u64 = image.layers.iter().filter_map(|l| l.size).sum();
    let mut task = progress.task("reading layers", total);
    let counter = Arc::new(AtomicU64::new(0));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<LayerIndex>>>> =
        Mutex::new((0..n).map(|_| None).collect());
    let workers = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .min(n.max(1));
    let exited = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let r = index::index_layer(image, i, counter.clone()).with_context(|| {
                        format!("layer {} of {} ({})", i + 1, n, image.layers[i].key)
                    });
                    if r.is_err() {
                        // Stop handing out work; the error is reported below.
                        next.store(n, Ordering::SeqCst);
                    }
                    results.lock().expect("poisoned")[i] = Some(r);
                }
                exited.fetch_add(1, Ordering::SeqCst);
            });
        }
        while exited.load(Ordering::SeqCst) < workers {
            task.set(counter.load(Ordering::Relaxed));
            std::thread::sleep(TICK);
        }
    });
    task.set(counter.load(Ordering::Relaxed));
    let mut tree = Tree::default();
    let mut captured = Vec::new();
    for (i, r) in results
        .into_inner()
        .expect("poisoned")
        .into_iter()
        .enumerate()
    {
        let idx = match r {
            Some(r) => r?,
            None => bail!("layer {} was not read (an earlier layer failed)", i + 1),
        };
        tree.apply(i as u32, idx.ops).with_context(|| {
            format!("applying layer {} of {n} ({})", i + 1, image.layers[i].key)
        })?;
        captured.push(idx.captured);
    }
    let plan = plan(tree, captured, n);
    task.finish(&format!(
        "{n} layers, {} paths, {} of files",
        plan.facts.paths,
        crate::disk::fs::human(plan.facts.content_bytes)
    ));
    Ok(plan)
}

pub(crate) fn plan(tree: Tree, captured: Vec<Vec<index::Captured>>, layers: usize) -> Plan {
    // Group paths by inode; the first-created surviving path of each carries the content.
    let mut paths_of: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for (p, e) in &tree.entries {
        if let Node::Inode(n) = e.node {
            paths_of.entry(n).or_default().push(p);
        }
    }
    let mut files = vec![BTreeMap::new(); layers];
    let mut specials = Vec::new();
    let mut links = Vec::new();
    let mut content_bytes = 0;
    for (n, paths) in &paths_of {
        let ino = &tree.inodes[*n as usize];
        let primary = paths
            .iter()
            .find(|p| **p == ino.origin)
            .unwrap_or(&paths[0])
            .to_string();
        for p in paths.iter().filter(|p| **p != primary) {
            if ino.meta.kind == Kind::File {
                let mut m = ino.meta.clone();
                m.kind = Kind::Hardlink(primary.clone());
                m.size = 0;
                links.push((p.to_string(), m));
            } else {
                // A hard link to a symlink, device or FIFO (`ln` of a symlink makes one): a
                // copy of that entry, so every hard link abox writes names a regular file
                // earlier in the stream (WSL's importer stops on any other).
                specials.push((p.to_string(), ino.meta.clone()));
            }
        }
        if ino.meta.kind == Kind::File {
            content_bytes += ino.meta.size;
            files[ino.layer as usize].insert(ino.ordinal, (primary, ino.meta.clone()));
        } else {
            specials.push((primary, ino.meta.clone()));
        }
    }
    specials.sort_by(|a, b| a.0.cmp(&b.0));
    links.sort_by(|a, b| a.0.cmp(&b.0));
    // The path each secret file's content is written under (its inode's first path).
    let mut secret_files = HashMap::new();
    let mut secret_links = HashMap::new();
    for want in SECRET_FILES {
        let Some(real) = tree.resolve(want) else {
            continue;
        };
        let Some(ino) = tree.entries.get(&real).and_then(|e| match e.node {
            tree::Node::Inode(n) => Some(n),
            tree::Node::Dir(_) => None,
        }) else {
            continue;
        };
        if tree.inodes[ino as usize].meta.kind != Kind::File {
            continue;
        }
        if let Some(paths) = paths_of.get(&ino) {
            let origin = &tree.inodes[ino as usize].origin;
            let primary = paths.iter().find(|p| **p == *origin).unwrap_or(&paths[0]);
            secret_files.insert(want.to_string(), primary.to_string());
            secret_links.insert(want.to_string(), paths.len());
        }
    }

    // The final content of captured files: only where the tree's inode is that very entry.
    let mut facts = Facts {
        paths: tree.len(),
        content_bytes,
        secret_files,
        secret_links,
        ..Default::default()
    };
    let mut by_source = HashMap::new();
    for (layer, caps) in captured.into_iter().enumerate() {
        for c in caps {
            by_source.insert((layer as u32, c.ordinal), c);
        }
    }
    for want in index::CAPTURE {
        let mut p = want.to_string();
        // Follow a few symlinks (etc/os-release → ../usr/lib/os-release).
        for _ in 0..4 {
            match tree.inode_at(&p) {
                Some(ino) => match &ino.meta.kind {
                    Kind::Symlink(t) => p = path::resolve_link(path::parent(&p), t),
                    Kind::File => {
                        if let Some(c) = by_source.get(&(ino.layer, ino.ordinal)) {
                            facts.files.insert(want.to_string(), c.data.clone());
                        }
                        break;
                    }
                    _ => break,
                },
                None => break,
            }
        }
    }
    Plan {
        tree,
        facts,
        files,
        specials,
        links,
        spool: None,
    }
}

/// Chunk size for streaming file content.
const CHUNK: usize = 256 << 10;

/// Pass 2: write the tree to `sink`.
pub fn emit(image: &Image, plan: &Plan, sink: &mut dyn Sink, progress: &Progress) -> Result<()> {
    if let Blobs::Export(s) = &image.blobs {
        return export::emit(s.as_ref(), plan, sink, progress);
    }
    let mut task = progress.task("writing rootfs", plan.facts.content_bytes);
    emit_head(plan, sink)?;
    let mut buf = vec![0u8; CHUNK];
    for (layer, wanted) in plan.files.iter().enumerate() {
        if wanted.is_empty() {
            continue;
        }
        // Digests were checked in pass 1.
        let reader = image.open_layer(layer, None, false)?;
        let what = format!("layer {} ({})", layer + 1, image.layers[layer].key);
        emit_layer(reader, wanted, &what, sink, &mut task, &mut buf)?;
    }
    emit_tail(plan, sink)?;
    task.finish(&format!("{} paths", plan.facts.paths));
    Ok(())
}

/// Folders (sorted, parents first), then symlinks, devices and fifos.
fn emit_head(plan: &Plan, sink: &mut dyn Sink) -> Result<()> {
    for (p, e) in &plan.tree.entries {
        if let Node::Dir(m) = &e.node {
            sink.begin(p, m)?;
            sink.end()?;
        }
    }
    for (p, m) in &plan.specials {
        sink.begin(p, m)?;
        sink.end()?;
    }
    Ok(())
}

/// The regular files whose content comes from one layer, in the layer's order.
fn emit_layer(
    reader: impl Read,
    wanted: &BTreeMap<u32, (String, Meta)>,
    what: &str,
    sink: &mut dyn Sink,
    task: &mut crate::progress::Task,
    buf: &mut [u8],
) -> Result<()> {
    let mut ar = tar::Archive::new(reader);
    let mut left = wanted.len();
    if left == 0 {
        return Ok(());
    }
    for (ordinal, entry) in ar.entries().context(what.to_string())?.enumerate() {
        crate::signals::check()?;
        let mut e = entry.context(what.to_string())?;
        let Some((p, m)) = wanted.get(&(ordinal as u32)) else {
            continue;
        };
        sink.begin(p, m)?;
        let mut n = 0u64;
        loop {
            let k = e.read(buf).with_context(|| format!("reading {p}"))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            sink.data(&buf[..k])?;
            task.inc(k as u64);
            // A large file (or a sparse one's zeros) must not outlast a Ctrl-C.
            crate::signals::check()?;
        }
        check_len(p, n, m.size)?;
        sink.end()?;
        left -= 1;
        if left == 0 {
            break;
        }
    }
    if left != 0 {
        bail!(
            "{what}: {left} files missing on the second read (the image changed while it was read)"
        );
    }
    Ok(())
}

/// Hard links, each after its target.
fn emit_tail(plan: &Plan, sink: &mut dyn Sink) -> Result<()> {
    for (p, m) in &plan.links {
        sink.begin(p, m)?;
        sink.end()?;
    }
    Ok(())
}
