//! `docker:NAME[:TAG]` as an image source: the engine flattens the image itself. abox creates a
//! container from the image's ID (never started: no process runs, no network), streams its
//! filesystem out once (`GET /containers/{id}/export`, what `docker export` calls) into the
//! flattener ([`crate::flatten::export`]), and removes the container — when the stream ends,
//! on an error, on Ctrl-C. Pinning by ID means a tag that moves meanwhile changes nothing.
//!
//! Why not `docker save`: Docker 20.10 tars every layer into a temporary folder before the
//! first byte, and a save stream must be read twice to flatten without spooling layers; the
//! export of the same image is about 2.5 times quicker to read once (scripts/bench --disk).
//! What the export cannot give is each layer's diff_id to check: the engine is trusted here,
//! as it is for the image it built. What the container adds (Docker's init layer) is
//! recognised and left out.
//!
//! A container a killed abox could not remove carries the labels [`OWNER_LABEL`] (this boot's
//! ID and the PID); the next `docker:` read from this machine removes it once that PID is gone.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use oci_spec::image::ImageConfiguration;

use super::Engine;
use crate::flatten::export::{EngineAdded, ExportSource, ExportStream};
use crate::source::{short_name, Blobs, Image, LayerDesc};

/// The label naming the abox run that made a container: `<boot id>/<pid namespace>/<pid>`.
pub const OWNER_LABEL: &str = "org.alpine-boxes.export-owner";

/// Chunks in flight between the engine and the flattener.
const QUEUE: usize = 16;

struct EngineExport {
    engine: Arc<Engine>,
    id: String,
    name: String,
    size: u64,
}

/// Where a PID means this process: the boot and the PID namespace (containers sharing an
/// engine socket share the boot ID, not their PIDs).
fn pid_scope() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{boot}/{ns}")
}

/// Longest wait for the engine to remove a container.
const REMOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A container created for one export; removed (with its anonymous volumes) when dropped, or
/// by a second Ctrl-C on its way out.
struct TempContainer {
    engine: Arc<Engine>,
    id: String,
    on_exit: Option<crate::signals::OnExit>,
}

/// Remove container `id`, waiting at most `wait`.
fn remove(engine: &Engine, id: &str, wait: std::time::Duration) -> Result<(), String> {
    let opts = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    // (The timer is made inside the runtime: outside one it panics.)
    engine
        .block_on(async {
            tokio::time::timeout(wait, engine.docker.remove_container(id, Some(opts))).await
        })
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
}

impl TempContainer {
    fn create(engine: &Arc<Engine>, image: &str) -> Result<(Self, u64)> {
        let owner = format!("{}/{}", pid_scope(), std::process::id());
        let body = bollard::models::ContainerCreateBody {
            image: Some(image.to_string()),
            // Never started; the engine wants a command all the same.
            cmd: Some(vec!["/abox-export-never-runs".into()]),
            entrypoint: Some(vec![]),
            // The engine makes the working folder at create when the image lacks it.
            working_dir: Some("/".into()),
            network_disabled: Some(true),
            labels: Some(HashMap::from([(OWNER_LABEL.to_string(), owner)])),
            ..Default::default()
        };
        let created = engine
            .block_on(engine.docker.create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            ))
            .map_err(super::api_error)
            .with_context(|| {
                format!(
                    "creating a container of image {image} to read it (abox reads docker: images \
                     as a container export; if the engine refuses, `docker save -o img.tar` the \
                     image and use docker-archive:img.tar)"
                )
            })?;
        let on_exit = {
            let (engine, id) = (engine.clone(), created.id.clone());
            crate::signals::on_exit(move || {
                let r = remove(&engine, &id, std::time::Duration::from_secs(3));
                if r.is_err() {
                    eprintln!("left the export's container {id}: `docker rm -f {id}` removes it");
                }
            })
        };
        let guard = Self {
            engine: engine.clone(),
            id: created.id,
            on_exit: Some(on_exit),
        };
        let info = engine
            .block_on(engine.docker.inspect_container(
                &guard.id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            ))
            .map_err(super::api_error)
            .context("inspecting the container made for the export")?;
        let at = info
            .created
            .map(|t| t.timestamp().max(0) as u64)
            .context("the engine gave the export's container no creation time")?;
        Ok((guard, at))
    }
}

impl Drop for TempContainer {
    fn drop(&mut self) {
        // Disarmed first: a second Ctrl-C now must not remove it a second time.
        drop(self.on_exit.take());
        if let Err(e) = remove(&self.engine, &self.id, REMOVE_TIMEOUT) {
            log::warn!(
                "could not remove the export's container {}: {e} (remove it with `docker rm -f {}`)",
                self.id,
                self.id
            );
        }
    }
}

/// Remove the export containers of abox runs on this machine that have ended.
fn reap(engine: &Engine) {
    let scope = pid_scope();
    let filters = HashMap::from([("label".to_string(), vec![OWNER_LABEL.to_string()])]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let Ok(list) = engine.block_on(engine.docker.list_containers(Some(opts))) else {
        return;
    };
    for c in list {
        let Some((b, pid)) = c
            .labels
            .as_ref()
            .and_then(|l| l.get(OWNER_LABEL))
            .and_then(|o| o.rsplit_once('/'))
        else {
            continue;
        };
        let gone = b == scope
            && pid
                .parse::<u32>()
                .is_ok_and(|p| p != std::process::id() && crate::disk::fs::dead(p));
        if let (true, Some(id)) = (gone, c.id) {
            log::debug!("removing the export container {id} a killed abox left");
            let opts = bollard::query_parameters::RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            let _ = engine.block_on(async {
                tokio::time::timeout(
                    REMOVE_TIMEOUT,
                    engine.docker.remove_container(&id, Some(opts)),
                )
                .await
            });
        }
    }
}

/// The export stream; the container goes when the reader does.
struct ExportReader {
    chunks: ChannelReader,
    _container: TempContainer,
}

impl Read for ExportReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.chunks.read(buf)
    }
}

impl ExportSource for EngineExport {
    fn open(&self) -> Result<ExportStream> {
        reap(&self.engine);
        let (container, created) = TempContainer::create(&self.engine, &self.id)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(QUEUE);
        let docker = self.engine.docker.clone();
        let cid = container.id.clone();
        self.engine.handle().spawn(async move {
            let mut s = docker.export_container(&cid);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| io::Error::other(super::api_error(e).to_string()));
                let failed = chunk.is_err();
                // The reader went away: stop reading from the engine.
                if tx.send(chunk).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(ExportStream {
            reader: Box::new(ExportReader {
                chunks: ChannelReader {
                    rx,
                    cur: Bytes::new(),
                    rt: self.engine.handle(),
                },
                _container: container,
            }),
            added: EngineAdded { created },
        })
    }

    fn describe(&self) -> String {
        format!("the Docker engine (image {})", self.name)
    }

    fn size_hint(&self) -> u64 {
        self.size
    }
}

/// A blocking reader over chunks sent by an async task; a Ctrl-C ends a wait for the engine.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    rt: tokio::runtime::Handle,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            let rx = &mut self.rx;
            let next = self.rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await
            });
            match next {
                Ok(Some(Ok(b))) => self.cur = b,
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Ok(0),
                Err(_) => {
                    if crate::signals::interrupted() {
                        // Not ErrorKind::Interrupted: readers retry on that.
                        return Err(io::Error::other("interrupted"));
                    }
                }
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
        tag: crate::source::tag_of(name),
        digest,
        config_digest: id.clone(),
        config,
        layers,
        blobs: Blobs::Export(Box::new(EngineExport {
            engine,
            id,
            name: name.to_string(),
            size,
        })),
    })
}

/// The parts of the image config abox uses, from the engine's inspect answer.
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
