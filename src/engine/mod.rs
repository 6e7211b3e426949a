//! The Docker engine, through its HTTP API (bollard): connecting, BuildKit builds
//! ([`build`]), pushes with the docker CLI's credentials ([`auth`], [`push`]) and streaming
//! images out of it ([`save`]). The rest of abox is synchronous; an [`Engine`] owns a small
//! tokio runtime and blocks on it.

pub mod auth;
pub mod build;
pub mod pull;
pub mod push;
pub mod save;

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::Docker;

/// Oldest engine API abox talks to (Docker 20.10).
pub const MIN_API: (usize, usize) = (1, 41);

/// Time allowed for the engine to start answering a request. Builds, saves and pushes stream
/// their bodies afterwards without a limit; a `docker save` of a large image answers only
/// once the engine has gathered the layers, hence the generous figure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct Engine {
    pub docker: Docker,
    rt: tokio::runtime::Runtime,
    /// Where it was reached, for messages.
    pub host: String,
    /// The API version both sides speak.
    pub api: String,
}

/// `DOCKER_HOST`, or the default socket.
pub fn host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

impl Engine {
    /// Connect to the engine `DOCKER_HOST` names (unix socket, tcp, or the default socket),
    /// agree on an API version and refuse engines older than [`MIN_API`].
    pub fn connect() -> Result<Engine> {
        let host = host();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("abox-engine")
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let unreachable = |e: &dyn std::fmt::Display| {
            anyhow!(
                "cannot reach the Docker engine at {host}: {e} — is dockerd running? \
                 (start it with `sudo systemctl start docker` or `sudo dockerd &`, \
                 or point DOCKER_HOST at a running engine)"
            )
        };
        let docker = Docker::connect_with_host(&host)
            .map_err(|e| unreachable(&e))?
            .with_timeout(REQUEST_TIMEOUT);
        let docker = rt.block_on(async {
            // A dead socket or port fails fast; a hung one should not hang us forever.
            match tokio::time::timeout(Duration::from_secs(30), docker.negotiate_version()).await {
                Ok(r) => r.map_err(|e| unreachable(&e)),
                Err(_) => Err(unreachable(&"no answer within 30 s")),
            }
        })?;
        let v = docker.client_version();
        if (v.major_version, v.minor_version) < MIN_API {
            bail!(
                "the Docker engine at {host} speaks API {v}, abox needs at least {}.{} \
                 (Docker 20.10): upgrade the engine",
                MIN_API.0,
                MIN_API.1
            );
        }
        log::debug!("engine at {host}, API {v}");
        Ok(Engine {
            api: v.to_string(),
            docker,
            rt,
            host,
        })
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.rt.handle().clone()
    }

    /// The image's ID (`sha256:…`, the digest of its config) and its inspect data; a missing
    /// image is a clear error.
    pub fn inspect(&self, name: &str) -> Result<bollard::models::ImageInspect> {
        self.block_on(self.docker.inspect_image(name))
            .map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => anyhow!(
                    "no image {name} in the Docker engine at {} (build it with `abox build`, \
                     or `docker pull`/`docker load` it)",
                    self.host
                ),
                e => anyhow!(e).context(format!("inspecting image {name}")),
            })
    }
}

/// Turn an engine error into a message with its status.
pub(crate) fn api_error(e: bollard::errors::Error) -> anyhow::Error {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message,
        } => anyhow!("the engine answered {status_code}: {message}"),
        e => anyhow!(e),
    }
}
