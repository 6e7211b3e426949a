//! `docker save` archives. Docker 20.10 writes the legacy layout (`manifest.json`,
//! `<id>/layer.tar`, `<id>.json`); Docker 25+ writes an OCI layout plus the same
//! `manifest.json`, which is the one entry point both share.

use std::path::Path;

use anyhow::{bail, Context, Result};
use oci_spec::image::ImageConfiguration;
use serde::Deserialize;

use super::blobs::{BlobStore, TarStore, MAX_JSON};
use super::{diff_ids, name_from_path, short_name, Image, LayerDesc};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

pub fn open(path: &Path, reference: Option<&str>) -> Result<Image> {
    let store = TarStore::open(path)?;
    if !store.contains("manifest.json") {
        if store.contains("index.json") {
            bail!(
                "this is an OCI archive, not a docker save archive: use oci-archive:{}",
                path.display()
            );
        }
        bail!(
            "not an image: {} has no manifest.json (is it the output of docker save?)",
            path.display()
        );
    }
    let raw = store.read_small("manifest.json", MAX_JSON)?;
    let entries: Vec<Entry> =
        serde_json::from_slice(&raw).context("manifest.json is not a docker save manifest")?;
    let entry = match reference {
        Some(r) => entries
            .iter()
            .find(|e| {
                e.repo_tags
                    .iter()
                    .flatten()
                    .any(|t| t == r || t.ends_with(&format!("/{r}")) || short_name(t) == r)
            })
            .with_context(|| format!("no image tagged {r} in {}", path.display()))?,
        None => {
            if entries.len() > 1 {
                let tags: Vec<_> = entries
                    .iter()
                    .flat_map(|e| e.repo_tags.iter().flatten())
                    .collect();
                bail!(
                    "{} holds {} images; add :TAG to choose one of {tags:?}",
                    path.display(),
                    entries.len()
                );
            }
            entries.first().context("manifest.json lists no image")?
        }
    };
    // In the legacy layout the config file is named after its own digest; in the OCI one it
    // sits at blobs/sha256/<hex>. Either way its sha256 is the image ID.
    let config_raw = super::read_verified(&store, &entry.config, None)?;
    let config_digest = {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&config_raw)))
    };
    let config = ImageConfiguration::from_reader(&config_raw[..])
        .with_context(|| format!("{} is not an image config", entry.config))?;
    let ids = diff_ids(&config, entry.layers.len())?;
    let layers = entry
        .layers
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(index, (key, diff_id))| {
            // In the OCI-style layout the blob is named after its (maybe compressed) digest.
            let digest = key
                .strip_prefix("blobs/sha256/")
                .map(|h| format!("sha256:{h}"));
            LayerDesc {
                index,
                diff_id,
                key: key.clone(),
                digest,
                size: None,
            }
        })
        .collect();
    // The tag chosen by (else the first).
    let chosen = entry.repo_tags.as_ref().and_then(|tags| {
        reference
            .and_then(|r| {
                tags.iter()
                    .find(|t| *t == r || t.ends_with(&format!("/{r}")) || short_name(t) == r)
            })
            .or_else(|| tags.first())
    });
    let name = chosen
        .map(|t| short_name(t))
        .unwrap_or_else(|| name_from_path(path));
    let tag = chosen.and_then(|t| super::tag_of(t));
    Ok(Image {
        reference: String::new(),
        name,
        tag,
        digest: config_digest.clone(),
        config_digest,
        config,
        layers,
        blobs: super::Blobs::Store(Box::new(store)),
    })
}
