//! Flattening an image that can only be read as a whole `docker save` tar, front to back — the
//! Docker engine's `GET /images/{id}/get`. Nothing is spooled to disk; the stream is read twice:
//!
//! 1. [`index`]: every layer member is indexed as it passes (its digests computed on the way),
//!    the small JSON members (`manifest.json`, the config) are kept. When the stream ends, the
//!    manifest says which member is which layer, the config must be the one the image was
//!    opened with, every layer's diff_id must match it, and the indexes are merged in order.
//! 2. [`emit`]: a second stream; each layer's files are written as that layer passes. Files
//!    therefore come in the stream's layer order, which is fixed for a given image.
//!
//! Docker 20.10 writes the legacy layout (`<id>/layer.tar`, a symlink to an earlier member when
//! two layers are identical, `<hex>.json`, `manifest.json` last); Docker 25+ writes an OCI
//! layout (`blobs/sha256/<hex>`) plus the same `manifest.json`. Both are read here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Cursor, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use super::index::{index_reader, LayerIndex};
use super::tree::Tree;
use super::{emit_head, emit_layer, emit_tail, plan, Plan, CHUNK, TICK};
use crate::progress::Progress;
use crate::source::blobs::MAX_JSON;
use crate::source::layer::{sniff, Compression, DigestMismatch};
use crate::source::{Image, LayerDesc, LayerReader};
use crate::tarfmt::Meta;

/// A source of `docker save` streams of one image.
pub trait SaveStream: Send + Sync {
    /// A fresh stream of the whole image, from its first byte.
    fn open(&self) -> Result<Box<dyn Read + Send>>;
    /// What to call it in messages.
    fn describe(&self) -> String;
    /// About how many bytes a stream has (for progress; 0 when unknown).
    fn size_hint(&self) -> u64;
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestEntry {
    config: String,
    layers: Vec<String>,
}

/// What pass 1 learned about one member of the stream.
enum Member {
    Layer {
        blob_digest: String,
        diff_id: String,
        index: LayerIndex,
    },
    /// A symlink to another member (Docker 20.10 writes one for a repeated layer).
    Alias(String),
}

/// Normalize a member's name: no `./`, no empty parts.
fn member_key(raw: &[u8]) -> Result<String> {
    let s = std::str::from_utf8(raw).map_err(|_| anyhow!("a member name is not UTF-8"))?;
    let parts: Vec<&str> = s
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        bail!("member {s:?} leaves the archive");
    }
    Ok(parts.join("/"))
}

/// Whether a member is a layer: by name in the legacy layout, by content in the OCI one (a
/// blob is a layer when it is compressed, a tar, or an empty tar).
fn is_layer(key: &str, head: &[u8]) -> bool {
    if key.ends_with("/layer.tar") {
        return true;
    }
    if !key.starts_with("blobs/") {
        return false;
    }
    sniff(head) != Compression::None
        || head.get(257..262) == Some(b"ustar")
        || (head.len() >= 512 && head[..512].iter().all(|b| *b == 0))
}

/// The first bytes of a member, to sniff it; the caller chains them back in front.
fn peek(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    r.take(512)
        .read_to_end(&mut head)
        .context("reading the image stream")?;
    Ok(head)
}

fn resolve<'m>(members: &'m HashMap<String, Member>, key: &str) -> Result<(String, &'m Member)> {
    let mut k = key.to_string();
    for _ in 0..8 {
        match members.get(&k) {
            Some(Member::Alias(t)) => k = t.clone(),
            Some(m) => return Ok((k, m)),
            None => {
                bail!("the image stream has no member {k} (truncated or not a docker save stream?)")
            }
        }
    }
    bail!("member {key}: too many symlinks")
}

/// Pass 1 over a stream.
pub fn index(src: &dyn SaveStream, image: &Image, progress: &Progress) -> Result<Plan> {
    let n = image.layers.len();
    let mut task = progress.task("reading layers", src.size_hint());
    let counter = Arc::new(AtomicU64::new(0));
    let done = AtomicBool::new(false);
    let (members, json) = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                task.set(counter.load(Ordering::Relaxed));
                std::thread::sleep(TICK);
            }
        });
        let r = read_members(src, counter.clone());
        done.store(true, Ordering::SeqCst);
        r
    })?;
    task.set(counter.load(Ordering::Relaxed));

    let raw = json
        .get("manifest.json")
        .with_context(|| format!("{}: the stream has no manifest.json", src.describe()))?;
    let entries: Vec<ManifestEntry> =
        serde_json::from_slice(raw).context("manifest.json is not a docker save manifest")?;
    let [entry] = &entries[..] else {
        bail!(
            "{}: expected one image in the stream, found {}",
            src.describe(),
            entries.len()
        );
    };
    let config_raw = json.get(&entry.config).with_context(|| {
        format!(
            "{}: the stream has no config {}",
            src.describe(),
            entry.config
        )
    })?;
    let config_digest = {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(config_raw)))
    };
    if config_digest != image.config_digest {
        bail!(
            "{}: the engine sent image {config_digest}, not {} (was the image replaced while it was read?)",
            src.describe(),
            image.config_digest
        );
    }
    if entry.layers.len() != n {
        bail!(
            "{}: the manifest lists {} layers, the image config {n}",
            src.describe(),
            entry.layers.len()
        );
    }

    let mut tree = Tree::default();
    let mut captured = Vec::new();
    let mut keys: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, key) in entry.layers.iter().enumerate() {
        let want = &image.layers[i];
        let (canonical, m) = resolve(&members, key)?;
        let Member::Layer {
            blob_digest,
            diff_id,
            index,
        } = m
        else {
            unreachable!("resolve returns layers only")
        };
        if let Some(hex) = canonical.strip_prefix("blobs/sha256/") {
            let expected = format!("sha256:{hex}");
            if *blob_digest != expected {
                return Err(mismatch(i, &canonical, "blob", expected, blob_digest));
            }
        }
        if *diff_id != want.diff_id {
            return Err(mismatch(
                i,
                &canonical,
                "diff_id (uncompressed)",
                want.diff_id.clone(),
                diff_id,
            ));
        }
        tree.apply(i as u32, index.ops.clone())
            .with_context(|| format!("applying layer {} of {n} ({canonical})", i + 1))?;
        captured.push(index.captured.clone());
        keys.entry(canonical).or_default().push(i);
    }
    let mut plan = plan(tree, captured, n);
    plan.stream_keys = keys;
    task.finish(&format!(
        "{n} layers, {} paths, {} MB of files",
        plan.facts.paths,
        plan.facts.content_bytes / 1_000_000
    ));
    Ok(plan)
}

fn mismatch(
    i: usize,
    key: &str,
    what: &'static str,
    expected: String,
    actual: &str,
) -> anyhow::Error {
    DigestMismatch {
        index: i,
        key: key.to_string(),
        what,
        expected,
        actual: actual.to_string(),
    }
    .into()
}

type Members = (HashMap<String, Member>, HashMap<String, Vec<u8>>);

/// Read one stream: index the layers, keep the JSON.
fn read_members(src: &dyn SaveStream, counter: Arc<AtomicU64>) -> Result<Members> {
    let what = || format!("reading the image stream from {}", src.describe());
    let mut ar = tar::Archive::new(super::index::HeaderGuard::new(src.open()?));
    let mut members = HashMap::new();
    let mut json = HashMap::new();
    for entry in ar.entries().with_context(what)? {
        crate::signals::check()?;
        let mut e = entry.with_context(what)?;
        let key = member_key(&e.path_bytes())?;
        match e.header().entry_type() {
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .with_context(|| format!("member {key}: symlink without a target"))?;
                let target = super::path::resolve_link(
                    super::path::parent(&key),
                    &String::from_utf8_lossy(&target),
                );
                members.insert(key, Member::Alias(target));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let head = peek(&mut e)?;
                if is_layer(&key, &head) {
                    let desc = LayerDesc {
                        index: members.len(),
                        diff_id: String::new(),
                        key: key.clone(),
                        digest: None,
                        size: Some(e.size()),
                    };
                    let body: Box<dyn Read + '_> = Box::new(Cursor::new(head).chain(&mut e));
                    let reader = LayerReader::open(body, &desc, Some(counter.clone()), true)?;
                    let (index, reader) =
                        index_reader(reader).with_context(|| format!("layer {key}"))?;
                    let (_, blob_digest, diff_id) = reader.digests()?;
                    members.insert(
                        key,
                        Member::Layer {
                            blob_digest,
                            diff_id,
                            index,
                        },
                    );
                } else if e.size() <= MAX_JSON && matches!(head.first(), Some(b'{' | b'[')) {
                    let mut buf = head;
                    e.read_to_end(&mut buf)
                        .with_context(|| format!("reading {key} (truncated stream?)"))?;
                    counter.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    json.insert(key, buf);
                }
            }
            _ => {}
        }
    }
    Ok((members, json))
}

/// Pass 2 over a fresh stream.
pub fn emit(
    src: &dyn SaveStream,
    image: &Image,
    plan: &Plan,
    sink: &mut dyn super::Sink,
    progress: &Progress,
) -> Result<()> {
    let mut task = progress.task("writing rootfs", plan.facts.content_bytes);
    emit_head(plan, sink)?;
    let needed: HashSet<&String> = plan
        .stream_keys
        .iter()
        .filter(|(_, ix)| ix.iter().any(|i| !plan.files[*i].is_empty()))
        .map(|(k, _)| k)
        .collect();
    let what = || format!("reading the image stream from {} again", src.describe());
    let mut ar = tar::Archive::new(super::index::HeaderGuard::new(src.open()?));
    let mut buf = vec![0u8; CHUNK];
    let mut seen = HashSet::new();
    for entry in ar.entries().with_context(what)? {
        crate::signals::check()?;
        let mut e = entry.with_context(what)?;
        let key = member_key(&e.path_bytes())?;
        let Some(layers) = plan.stream_keys.get(&key) else {
            continue;
        };
        if !needed.contains(&key) || !seen.insert(key.clone()) {
            continue;
        }
        let wanted = merged(plan, layers, &key)?;
        let desc: &LayerDesc = &image.layers[layers[0]];
        let reader = LayerReader::open(Box::new(&mut e), desc, None, false)?;
        let label = format!("layer {} ({key})", layers[0] + 1);
        emit_layer(reader, &wanted, &label, sink, &mut task, &mut buf)?;
    }
    if let Some(k) = needed.iter().find(|k| !seen.contains(**k)) {
        bail!(
            "{}: the second read lacks layer {k} (the image changed while it was read?)",
            src.describe()
        );
    }
    emit_tail(plan, sink)?;
    task.finish(&format!("{} paths", plan.facts.paths));
    Ok(())
}

/// The files several identical layers (one member) contribute.
fn merged<'p>(
    plan: &'p Plan,
    layers: &[usize],
    key: &str,
) -> Result<Cow<'p, BTreeMap<u32, (String, Meta)>>> {
    let nonempty: Vec<usize> = layers
        .iter()
        .copied()
        .filter(|i| !plan.files[*i].is_empty())
        .collect();
    if let [one] = nonempty[..] {
        return Ok(Cow::Borrowed(&plan.files[one]));
    }
    let mut all = BTreeMap::new();
    for i in nonempty {
        for (o, v) in &plan.files[i] {
            if all.insert(*o, v.clone()).is_some() {
                bail!(
                    "member {key}: an entry of this repeated layer is needed twice (not supported)"
                );
            }
        }
    }
    Ok(Cow::Owned(all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_members() {
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(is_layer("abc/layer.tar", b"anything"));
        assert!(is_layer("blobs/sha256/ab", &tar));
        assert!(is_layer("blobs/sha256/ab", &[0x1f, 0x8b, 8]));
        assert!(is_layer("blobs/sha256/ab", &[0u8; 1024]));
        assert!(!is_layer("blobs/sha256/ab", b"{\"schemaVersion\":2}"));
        assert!(!is_layer("abc/json", &tar));
        assert_eq!(member_key(b"./a//b/layer.tar").unwrap(), "a/b/layer.tar");
        assert!(member_key(b"../x").is_err());
    }
}
