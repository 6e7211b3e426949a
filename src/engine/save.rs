//! `docker:NAME[:TAG]` as an image source: the image is streamed out of the engine
//! (`GET /images/{id}/get`, what `docker save` calls) straight into the flattener, twice (see
//! [`crate::flatten::stream`]), never copied to disk. The image is pinned by its ID first, so
//! both reads see the same image even if the tag moves meanwhile.

use std::io::{self, Read};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use oci_spec::image::ImageConfiguration;

use super::Engine;
use crate::flatten::stream::SaveStream;
use crate::source::{short_name, Blobs, Image, LayerDesc};

/// Chunks in flight between the engine and the flattener.
const QUEUE: usize = 16;

struct EngineSave {
    engine: Arc<Engine>,
    id: String,
    name: String,
    size: u64,
    /// The second stream, asked for together with the first: Docker 20.10 gathers the whole
    /// image into a temporary folder before it sends the first byte, and two saves prepare in
    /// the time of one. Until it is read, the engine waits on a full socket.
    next: std::sync::Mutex<Option<Box<dyn Read + Send>>>,
}

impl EngineSave {
    fn request(&self) -> Box<dyn Read + Send> {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let docker = self.engine.docker.clone();
        let id = self.id.clone();
        self.engine.handle().spawn(async move {
            let mut s = docker.export_image(&id);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| io::Error::other(super::api_error(e).to_string()));
                let failed = chunk.is_err();
                // The reader went away: stop reading from the engine.
                if tx.send(chunk).await.is_err() || failed {
                    break;
                }
            }
        });
        Box::new(ChannelReader {
            rx,
            cur: Bytes::new(),
        })
    }
}

impl SaveStream for EngineSave {
    fn open(&self) -> Result<Box<dyn Read + Send>> {
        let mut next = self.next.lock().expect("poisoned");
        if let Some(r) = next.take() {
            return Ok(r);
        }
        let first = self.request();
        *next = Some(self.request());
        Ok(first)
    }

    fn describe(&self) -> String {
        format!("the Docker engine (image {})", self.name)
    }

    fn size_hint(&self) -> u64 {
        self.size
    }
}

/// A blocking reader over chunks sent by an async task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Open `docker:NAME` (`name` without the transport).
pub fn open(engine: Arc<Engine>, name: &str) -> Result<Image> {
    if name.is_empty() {
        bail!("docker: needs an image name, e.g. docker:alpine-boxes/base:latest");
    }
    let info = engine.inspect(name)?;
    let id = info.id.clone().context("the engine gave the image no ID")?;
    let diff_ids = info
        .root_fs
        .as_ref()
        .and_then(|r| r.layers.clone())
        .unwrap_or_default();
    let config = config_of(&info, &diff_ids)?;
    let layers = diff_ids
        .iter()
        .enumerate()
        .map(|(index, diff_id)| LayerDesc {
            index,
            diff_id: diff_id.clone(),
            key: diff_id.clone(),
            digest: None,
            size: None,
        })
        .collect();
    // A registry digest names the image best when it has one.
    let digest = info
        .repo_digests
        .iter()
        .flatten()
        .find_map(|d| d.split_once('@').map(|(_, d)| d.to_string()))
        .unwrap_or_else(|| id.clone());
    let size = info.size.unwrap_or(0).max(0) as u64;
    Ok(Image {
        reference: format!("docker:{name}"),
        name: short_name(name),
        digest,
        config_digest: id.clone(),
        config,
        layers,
        blobs: Blobs::Stream(Box::new(EngineSave {
            engine,
            id,
            name: name.to_string(),
            size,
            next: std::sync::Mutex::new(None),
        })),
    })
}

/// The parts of the image config abox uses, from the engine's inspect answer. The config in
/// the stream is checked against the image ID when it is read.
fn config_of(
    info: &bollard::models::ImageInspect,
    diff_ids: &[String],
) -> Result<ImageConfiguration> {
    let c = info.config.clone().unwrap_or_default();
    let mut cfg = serde_json::json!({
        "architecture": info.architecture.clone().unwrap_or_else(|| "amd64".into()),
        "os": info.os.clone().unwrap_or_else(|| "linux".into()),
        "config": {
            "User": c.user,
            "Env": c.env,
            "Cmd": c.cmd,
            "Entrypoint": c.entrypoint,
            "WorkingDir": c.working_dir,
            "Labels": c.labels,
            "StopSignal": c.stop_signal,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if let Some(v) = &info.variant {
        cfg["variant"] = v.clone().into();
    }
    if let Some(t) = &info.created {
        cfg["created"] = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into();
    }
    // Drop nulls: oci-spec wants absent fields, not nulls.
    if let Some(o) = cfg["config"].as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    ImageConfiguration::from_reader(serde_json::to_vec(&cfg)?.as_slice())
        .context("the engine's description of the image is not a valid image config")
}
