//! OCI image layouts, as a folder (`oci:`) or a tar of one (`oci-archive:`): `index.json` →
//! (nested indexes, chosen by platform) → manifest → config and layers.

use std::path::Path;

use anyhow::{bail, Context, Result};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use super::blobs::{BlobStore, MAX_JSON};
use super::{diff_ids, name_from_path, read_verified, short_name, Image, LayerDesc, SelectOptions};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Nested indexes deeper than this are refused (a loop, or a hostile image).
const MAX_INDEX_DEPTH: usize = 8;

fn is_index(mt: &str) -> bool {
    mt == "application/vnd.oci.image.index.v1+json"
        || mt == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_manifest(mt: &str) -> bool {
    mt == "application/vnd.oci.image.manifest.v1+json"
        || mt == "application/vnd.docker.distribution.manifest.v2+json"
}

fn blob_key(d: &Descriptor) -> Result<String> {
    let digest = d.digest().to_string();
    let (algo, hex) = digest
        .split_once(':')
        .with_context(|| format!("malformed digest {digest}"))?;
    if algo != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("unsupported digest {digest} (only sha256 is supported)");
    }
    Ok(format!("blobs/{algo}/{hex}"))
}

fn annotation<'a>(d: &'a Descriptor, key: &str) -> Option<&'a str> {
    d.annotations().as_ref()?.get(key).map(|s| s.as_str())
}

fn platform_of(d: &Descriptor) -> Option<String> {
    let p = d.platform().as_ref()?;
    let mut s = format!("{}/{}", p.os(), p.architecture());
    if let Some(v) = p.variant() {
        s.push('/');
        s.push_str(v);
    }
    Some(s)
}

fn platform_matches(d: &Descriptor, want: &str) -> bool {
    platform_of(d).is_some_and(|p| super::platform_is(&p, want))
}

/// Choose among an index's manifests: by reference name, then by platform.
fn choose<'a>(
    ds: &'a [Descriptor],
    reference: Option<&str>,
    opts: &SelectOptions,
) -> Result<&'a Descriptor> {
    let mut cands: Vec<&Descriptor> = ds.iter().collect();
    if let Some(r) = reference {
        cands.retain(|d| {
            annotation(d, REF_NAME) == Some(r)
                || annotation(d, CONTAINERD_NAME)
                    .is_some_and(|n| n == r || n.ends_with(&format!(":{r}")))
        });
        if cands.is_empty() {
            let refs: Vec<_> = ds.iter().filter_map(|d| annotation(d, REF_NAME)).collect();
            bail!("no image with reference {r:?} (available: {refs:?})");
        }
    }
    if cands.len() > 1 {
        let by_platform: Vec<_> = cands
            .iter()
            .copied()
            .filter(|d| platform_matches(d, &opts.platform))
            .collect();
        if by_platform.len() == 1 {
            return Ok(by_platform[0]);
        }
        let refs: Vec<_> = cands
            .iter()
            .map(|d| {
                annotation(d, REF_NAME)
                    .map(str::to_string)
                    .or_else(|| platform_of(d))
                    .unwrap_or_else(|| d.digest().to_string())
            })
            .collect();
        bail!("several images match; choose one with :REF or --platform (found {refs:?})");
    }
    cands
        .first()
        .copied()
        .context("the index lists no manifests")
}

pub fn open(
    store: Box<dyn BlobStore>,
    path: &Path,
    reference: Option<&str>,
    opts: &SelectOptions,
) -> Result<Image> {
    if !store.contains("index.json") {
        if store.contains("manifest.json") {
            bail!(
                "this is a docker save archive, not an OCI layout: use docker-archive:{}",
                path.display()
            );
        }
        bail!(
            "not an OCI image layout: {} has no index.json",
            path.display()
        );
    }
    let raw = store.read_small("index.json", MAX_JSON)?;
    let index =
        ImageIndex::from_reader(&raw[..]).context("index.json is not an OCI image index")?;
    let mut desc = choose(index.manifests(), reference, opts)?.clone();
    let mut name = annotation(&desc, CONTAINERD_NAME).map(short_name);
    // The tag: containerd's full name's, else the reference name's (a plain `3.23` in an
    // OCI layout is a tag).
    let tag = annotation(&desc, CONTAINERD_NAME)
        .and_then(super::tag_of)
        .or_else(|| {
            annotation(&desc, REF_NAME).map(|r| match r.contains('/') || r.contains(':') {
                true => super::tag_of(r),
                false => Some(r.to_string()),
            })?
        });
    let mut depth = 0;
    let manifest = loop {
        let mt = desc.media_type().to_string();
        let key = blob_key(&desc)?;
        let digest = desc.digest().to_string();
        let bytes = read_verified(store.as_ref(), &key, Some(&digest))?;
        if is_index(&mt) {
            depth += 1;
            if depth > MAX_INDEX_DEPTH {
                bail!("image indexes nested deeper than {MAX_INDEX_DEPTH}");
            }
            let idx = ImageIndex::from_reader(&bytes[..])
                .with_context(|| format!("{key} is not an image index"))?;
            let want: Vec<Descriptor> = idx
                .manifests()
                .iter()
                .filter(|d| d.platform().is_none() || platform_matches(d, &opts.platform))
                .cloned()
                .collect();
            if want.is_empty() {
                let have: Vec<_> = idx.manifests().iter().filter_map(platform_of).collect();
                bail!(
                    "no image for platform {} (available: {have:?}); choose with --platform",
                    opts.platform
                );
            }
            desc = choose(&want, None, opts)?.clone();
            continue;
        }
        if !is_manifest(&mt) {
            bail!("unsupported manifest media type {mt}");
        }
        let m = ImageManifest::from_reader(&bytes[..])
            .with_context(|| format!("{key} is not an image manifest"))?;
        break (m, digest);
    };
    let (manifest, digest) = manifest;
    let cfg_desc = manifest.config();
    let cfg_key = blob_key(cfg_desc)?;
    let cfg_digest = cfg_desc.digest().to_string();
    let cfg_raw = read_verified(store.as_ref(), &cfg_key, Some(&cfg_digest))?;
    let config = ImageConfiguration::from_reader(&cfg_raw[..])
        .with_context(|| format!("{cfg_key} is not an image config"))?;
    let ids = diff_ids(&config, manifest.layers().len())?;
    let mut layers = Vec::new();
    for (index, (d, diff_id)) in manifest.layers().iter().zip(ids).enumerate() {
        let mt = d.media_type().to_string();
        if !(mt.contains(".layer.") || mt.contains("rootfs.diff.tar")) {
            bail!("layer {index} has unsupported media type {mt}");
        }
        layers.push(LayerDesc {
            index,
            diff_id,
            key: blob_key(d)?,
            digest: Some(d.digest().to_string()),
            size: Some(d.size()),
        });
    }
    if name.is_none() {
        name = reference.filter(|r| r.contains('/')).map(short_name);
    }
    Ok(Image {
        reference: String::new(),
        name: name.unwrap_or_else(|| name_from_path(path)),
        tag,
        digest,
        config_digest: cfg_digest,
        config,
        layers,
        blobs: super::Blobs::Store(store),
    })
}
