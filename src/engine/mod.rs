//! The Docker engine, through its HTTP API (bollard): the engine the docker CLI would use
//! ([`endpoint`]: flags, environment, contexts; unix, TCP/TLS, or SSH through a relay), BuildKit
//! builds ([`build`]) with abox's own session ([`session`]: credentials, secrets, SSH agents),
//! base-image pulls ([`pull`]), pushes with the docker CLI's credentials ([`auth`], [`push`]) and
//! streaming images out of it ([`export`]). The rest of abox is synchronous; an [`Engine`] owns a
//! small tokio runtime and blocks on it.

pub mod auth;
pub mod build;
pub mod endpoint;
pub mod export;
pub mod pull;
pub mod push;
pub mod session;
mod ssh;

use std::future::Future;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::Docker;

pub use endpoint::{Endpoint, Flags};

/// Oldest engine API abox talks to (Docker 20.10).
pub const MIN_API: (usize, usize) = (1, 41);

/// Time allowed for the engine to start answering a request. Builds, exports and pushes stream
/// their bodies afterwards without a limit; generous, as an engine under load (a registry
/// behind a slow link, a large image being committed) can be slow to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct Engine {
    pub docker: Docker,
    rt: tokio::runtime::Runtime,
    /// Where it was reached (URL), for messages.
    pub host: String,
    /// Where it was reached and why that one.
    pub endpoint: Endpoint,
    /// The API version both sides speak.
    pub api: String,
    /// How to open a raw connection to it (for BuildKit sessions).
    pub dial: session::Dial,
    /// The local relay of an `ssh://` engine (dropped after the runtime).
    _ssh: Option<ssh::SshProxy>,
}

/// `--host`/`--context`, set once by the command line before any engine is reached.
static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Record the command line's `--host` and `--context` for every later [`Engine::connect`].
pub fn set_flags(flags: Flags) {
    let _ = FLAGS.set(flags);
}

/// The endpoint the next [`Engine::connect`] uses: the flags, the environment, the docker
/// CLI's config and context store (see [`endpoint`]).
pub fn resolve_endpoint() -> Result<Endpoint> {
    let flags = FLAGS.get().cloned().unwrap_or_default();
    endpoint::resolve(&flags, &endpoint::process_env)
}

/// bollard's own per-connection read timeout, in seconds; [`REQUEST_TIMEOUT`] replaces it.
const CONNECT_TIMEOUT_SECS: u64 = 120;

impl Engine {
    /// Connect to the engine the docker CLI would use ([`resolve_endpoint`]): a unix socket,
    /// `tcp://` (TLS with `DOCKER_TLS_VERIFY` or a context's certificates) or `ssh://`; agree on
    /// an API version and refuse engines older than [`MIN_API`]. Errors name the endpoint,
    /// why it was chosen, and for TLS or SSH the file or the ssh message at fault.
    pub fn connect() -> Result<Engine> {
        let ep = resolve_endpoint()?;
        log::debug!("engine endpoint: {ep}");
        Self::connect_to(ep)
    }

    /// Connect to `ep` (see [`Engine::connect`]).
    pub fn connect_to(ep: Endpoint) -> Result<Engine> {
        let host = ep.host.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("abox-engine")
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let mut ssh = None;
        let mut dial = None;
        let v = bollard::API_DEFAULT_VERSION;
        let docker = if host.starts_with("unix://") {
            Docker::connect_with_unix(&host, CONNECT_TIMEOUT_SECS, v)
        } else if host.starts_with("ssh://") {
            let args = endpoint::ssh_args(&host)?;
            let proxy = {
                let _g = rt.enter();
                ssh::SshProxy::start(args)?
            };
            let d = Docker::connect_with_unix(&proxy.socket, CONNECT_TIMEOUT_SECS, v);
            dial = Some(session::Dial::Unix(
                proxy.socket.trim_start_matches("unix://").into(),
            ));
            ssh = Some(proxy);
            d
        } else if let Some(t) = &ep.tls {
            Docker::connect_with_ssl(&host, &t.key, &t.cert, &t.ca, CONNECT_TIMEOUT_SECS, v)
        } else {
            Docker::connect_with_http(&host, CONNECT_TIMEOUT_SECS, v)
        };
        let unreachable = |e: &dyn std::fmt::Display| -> anyhow::Error {
            let what = format!("cannot reach the Docker engine at {ep}");
            if let Some(p) = &ssh {
                let said = ssh::summary(&p.last_error());
                let login = endpoint::ssh_args(&host)
                    .map(|a| {
                        a.into_iter()
                            .filter(|a| a != "--")
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                if !said.is_empty() {
                    return anyhow!(
                        "{what}: ssh said: {said} — check the address, your ssh keys and known_hosts (`ssh {login} docker version` must work without a prompt)"
                    );
                }
                return anyhow!("{what}: {e} — is the docker CLI installed on the remote host, and dockerd running there? (`ssh {login} docker version` tells)");
            }
            let what = format!("{what}: {e}");
            if let Some(t) = &ep.tls {
                let text = e.to_string().to_ascii_lowercase();
                if text.contains("certificate")
                    || text.contains("tls")
                    || text.contains("handshake")
                {
                    return anyhow!(
                        "{what} — TLS failed: the engine's certificate must be signed by the CA in {}, and it must accept the client certificate {} (key {})",
                        t.ca.display(),
                        t.cert.display(),
                        t.key.display()
                    );
                }
            }
            if let Some(path) = host.strip_prefix("unix://") {
                if let Some(why) = socket_refused(Path::new(path)) {
                    return anyhow!("{what} — {why}");
                }
            }
            anyhow!(
                "{what} — is dockerd running? (start it with `sudo systemctl start docker` or \
                 `sudo dockerd &`, or choose another engine with --host, --context, DOCKER_HOST \
                 or DOCKER_CONTEXT)"
            )
        };
        let docker = docker
            .map_err(|e| unreachable(&chain(&e)))?
            .with_timeout(REQUEST_TIMEOUT);
        let docker = rt.block_on(async {
            // A dead socket or port fails fast; a hung one should not hang us forever.
            match tokio::time::timeout(Duration::from_secs(30), docker.negotiate_version()).await {
                Ok(r) => r.map_err(|e| unreachable(&chain(&e))),
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
        log::debug!("engine at {ep}, API {v}");
        let dial = match dial {
            Some(d) => d,
            None => match (host.split_once("://"), &ep.tls) {
                (Some(("unix", path)), _) => session::Dial::Unix(path.into()),
                (Some((_, addr)), Some(t)) => session::Dial::Tls {
                    addr: addr.to_string(),
                    tls: t.clone(),
                },
                (Some((_, addr)), None) => session::Dial::Tcp(addr.to_string()),
                (None, _) => bail!("engine address {host:?} has no scheme"),
            },
        };
        Ok(Engine {
            api: v.to_string(),
            docker,
            rt,
            host,
            endpoint: ep,
            dial,
            _ssh: ssh,
        })
    }

    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.rt.handle().clone()
    }

    /// The image's ID (`sha256:…`, the digest of its config) and its inspect data; a missing
    /// image is a clear error that lists the tags the engine has of its repository.
    pub fn inspect(&self, name: &str) -> Result<bollard::models::ImageInspect> {
        self.block_on(self.docker.inspect_image(name))
            .map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => {
                    let tags = self.tags_of(name);
                    let has = if tags.is_empty() {
                        String::new()
                    } else {
                        format!("; it has {}", tags.join(", "))
                    };
                    anyhow!(
                        "no image {name} in the Docker engine at {}{has} (build it with `abox \
                         build`, or `docker pull`/`docker load` it)",
                        self.host
                    )
                }
                e => anyhow!(e).context(format!("inspecting image {name}")),
            })
    }

    /// The tags the engine has of `name`'s repository (`alpine:3.99` → `alpine:3.20`,
    /// `alpine:latest`), sorted; none when it cannot tell.
    pub fn tags_of(&self, name: &str) -> Vec<String> {
        let repo = crate::source::repository_of(name);
        let filters = std::collections::HashMap::from([("reference", vec![repo.clone()])]);
        let opts = bollard::query_parameters::ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let Ok(images) = self.block_on(self.docker.list_images(Some(opts))) else {
            return Vec::new();
        };
        let mut tags: Vec<String> = images
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .filter(|t| crate::source::repository_of(t) == repo)
            .collect();
        tags.sort();
        tags.dedup();
        tags
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

/// An error and its sources on one line (`a: b: c`), without repeats.
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Why a Unix socket cannot be used by this user (None: it is not that): the engine's socket is
/// root's and a group's (usually `docker`), and a user outside both gets "permission denied" —
/// on the socket, or on a folder on its way — which is no reason to ask whether dockerd runs.
fn socket_refused(path: &Path) -> Option<String> {
    use rustix::fs::{access, Access};
    use std::os::unix::fs::MetadataExt;
    const ROOTLESS: &str =
        "or use a rootless engine's socket (DOCKER_HOST=unix://$XDG_RUNTIME_DIR/docker.sock)";
    let md = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Some(format!(
                "permission denied on the way to {}: a folder on its path is closed to this \
                 user; run abox with sudo, {ROOTLESS}",
                path.display()
            ))
        }
        Err(_) => return None,
    };
    match access(path, Access::READ_OK | Access::WRITE_OK) {
        Err(rustix::io::Errno::ACCESS) | Err(rustix::io::Errno::PERM) => {}
        _ => return None,
    }
    let group = (md.gid() != 0 && md.mode() & 0o060 == 0o060)
        .then(|| group_name(md.gid()))
        .flatten();
    let fix = match group {
        Some(g) => format!(
            "add yourself to its group {g} (`sudo usermod -aG {g} $USER`, then log in again), \
             run abox with sudo,"
        ),
        None => "only root may use it: run abox with sudo, have dockerd give it a group \
                 (dockerd -G docker, then add yourself to that group),"
            .to_string(),
    };
    Some(format!(
        "permission denied on {}: {fix} {ROOTLESS}",
        path.display()
    ))
}

/// The name of group `gid` from `/etc/group` (read bounded), when it has one.
fn group_name(gid: u32) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open("/etc/group")
        .ok()?
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == gid && !name.is_empty()).then(|| name.to_string())
    })
}
