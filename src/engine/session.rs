//! The BuildKit session of a build: the gRPC services abox serves to the engine while it builds,
//! as the docker CLI and buildx do (moby/buildkit `session/`):
//!
//! - registry credentials on demand (`moby.filesync.v1.Auth/Credentials`), from the docker CLI's
//!   config and helpers ([`super::auth`]), for `FROM`, `--cache-from` and pushes BuildKit makes;
//! - build secrets (`moby.buildkit.secrets.v1.Secrets/GetSecret`) for
//!   `RUN --mount=type=secret,id=NAME`, read from a file or an environment variable when BuildKit
//!   asks, never sent as a build argument, never written into the image;
//! - SSH agent forwarding (`moby.sshforward.v1.SSH`) for `RUN --mount=type=ssh`, to the agent
//!   socket given with `--ssh ID[=SOCKET]` (default `$SSH_AUTH_SOCK`);
//! - `grpc.health.v1.Health/Check`, which the engine polls to keep the session.
//!
//! The session is an HTTP connection to the engine upgraded with `POST /session` (`Upgrade: h2c`,
//! `X-Docker-Expose-Session-*` headers); the engine then speaks gRPC to abox over it. The
//! connection is dialled over the same transport as every other call ([`Dial`]): the unix
//! socket (also the relay of an `ssh://` engine), plain TCP, or TLS with the endpoint's
//! certificates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bollard::health::health_server::{Health, HealthServer};
use bollard::health::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
    HealthListRequest, HealthListResponse,
};
use bollard::moby::buildkit::secrets::v1::secrets_server::{Secrets, SecretsServer};
use bollard::moby::buildkit::secrets::v1::{GetSecretRequest, GetSecretResponse};
use bollard::moby::filesync::v1::auth_server::{Auth, AuthServer};
use bollard::moby::filesync::v1::{
    CredentialsRequest, CredentialsResponse, FetchTokenRequest, FetchTokenResponse,
    GetTokenAuthorityRequest, GetTokenAuthorityResponse, VerifyTokenAuthorityRequest,
    VerifyTokenAuthorityResponse,
};
use bollard::moby::sshforward::v1::ssh_server::{Ssh, SshServer};
use bollard::moby::sshforward::v1::{BytesMessage, CheckAgentRequest, CheckAgentResponse};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tonic::{Request, Response, Status};

use super::endpoint::Tls;

/// BuildKit's limit on one secret (`secretsprovider.MaxSecretSize`), in bytes.
pub const MAX_SECRET_SIZE: u64 = 500 * 1024;

/// Where a build secret comes from (buildx's `--secret` forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `src=FILE`: the file's bytes, read when BuildKit asks.
    File(PathBuf),
    /// `env=VAR`: the variable's value.
    Env(String),
}

/// What the session serves besides credentials.
#[derive(Debug, Clone, Default)]
pub struct SessionConfig {
    /// `--secret` id → source.
    pub secrets: BTreeMap<String, SecretSource>,
    /// `--ssh` id → agent socket.
    pub ssh: BTreeMap<String, PathBuf>,
}

/// Parse a `--secret` value as buildx spells it: `id=NAME,src=FILE` (or `source=`),
/// `id=NAME,env=VAR`, `type=file|env` with `src=`; a lone `id=NAME` reads the variable `NAME`
/// when it is set, else the file `NAME`.
pub fn parse_secret(spec: &str) -> Result<(String, SecretSource)> {
    let mut id = None;
    let mut kind = None;
    let mut src = None;
    let mut env = None;
    for part in spec.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            anyhow!("--secret {spec:?}: expected KEY=VALUE pairs, e.g. id=token,src=./token.txt")
        })?;
        match k.trim() {
            "id" => id = Some(v.to_string()),
            "type" => kind = Some(v.to_string()),
            "src" | "source" => src = Some(v.to_string()),
            "env" => env = Some(v.to_string()),
            other => bail!("--secret {spec:?}: unknown key {other:?} (id, type, src, env)"),
        }
    }
    let id = id.filter(|i| !i.is_empty()).ok_or_else(|| {
        anyhow!("--secret {spec:?}: no id= (the id RUN --mount=type=secret,id=… names)")
    })?;
    let source = match (kind.as_deref(), src, env) {
        (Some("env"), Some(v), None) | (_, None, Some(v)) => SecretSource::Env(v),
        (None | Some("file"), Some(f), None) => SecretSource::File(PathBuf::from(f)),
        (None, None, None) => match std::env::var_os(&id) {
            Some(_) => SecretSource::Env(id.clone()),
            None => SecretSource::File(PathBuf::from(&id)),
        },
        (Some(t), _, _) if t != "env" && t != "file" => {
            bail!("--secret {spec:?}: type must be file or env")
        }
        _ => bail!("--secret {spec:?}: give either src= or env=, not both"),
    };
    Ok((id, source))
}

/// Parse a `--ssh` value: `ID` (the agent at `$SSH_AUTH_SOCK`) or `ID=SOCKET`.
pub fn parse_ssh(spec: &str) -> Result<(String, PathBuf)> {
    let (id, sock) = match spec.split_once('=') {
        Some((id, s)) => (id.to_string(), PathBuf::from(s)),
        None => (
            spec.to_string(),
            std::env::var_os("SSH_AUTH_SOCK")
                .map(PathBuf::from)
                .ok_or_else(|| {
                    anyhow!("--ssh {spec}: SSH_AUTH_SOCK is not set: start an agent (eval $(ssh-agent); ssh-add) or give --ssh {spec}=SOCKET")
                })?,
        ),
    };
    if id.is_empty() || id.contains(',') {
        bail!("--ssh {spec:?}: expected ID or ID=SOCKET (default for RUN --mount=type=ssh)");
    }
    Ok((id, sock))
}

impl SessionConfig {
    /// Check every source before a build starts: files readable and within
    /// [`MAX_SECRET_SIZE`], variables set, agent sockets present.
    pub fn check(&self) -> Result<()> {
        for (id, s) in &self.secrets {
            match s {
                SecretSource::File(p) => {
                    let md = std::fs::metadata(p).with_context(|| {
                        format!("--secret id={id}: cannot read {}", p.display())
                    })?;
                    if !md.is_file() {
                        bail!("--secret id={id}: {} is not a file", p.display());
                    }
                    if md.len() > MAX_SECRET_SIZE {
                        bail!(
                            "--secret id={id}: {} is {} bytes; BuildKit takes at most {MAX_SECRET_SIZE}",
                            p.display(),
                            md.len()
                        );
                    }
                    std::fs::File::open(p).with_context(|| {
                        format!("--secret id={id}: cannot read {}", p.display())
                    })?;
                }
                SecretSource::Env(v) => {
                    if std::env::var_os(v).is_none() {
                        bail!("--secret id={id}: the environment variable {v} is not set");
                    }
                }
            }
        }
        for (id, sock) in &self.ssh {
            use std::os::unix::fs::FileTypeExt;
            match std::fs::metadata(sock) {
                Ok(m) if m.file_type().is_socket() => {}
                Ok(_) => bail!(
                    "--ssh {id}: {} is not an agent socket: abox forwards an ssh-agent (start \
                     one, `ssh-add` the key, then --ssh {id} or --ssh {id}=$SSH_AUTH_SOCK)",
                    sock.display()
                ),
                Err(_) => bail!(
                    "--ssh {id}: no agent socket at {} (is ssh-agent running?)",
                    sock.display()
                ),
            }
        }
        Ok(())
    }
}

/// How to open a raw connection to the engine.
#[derive(Debug, Clone)]
pub enum Dial {
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
    Tls {
        addr: String,
        tls: Tls,
    },
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The upgraded connection, as tonic's server wants it.
struct SessionIo(Box<dyn Io>);

impl AsyncRead for SessionIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for SessionIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

async fn dial(d: &Dial) -> Result<(Box<dyn Io>, String)> {
    Ok(match d {
        Dial::Unix(p) => (
            Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .with_context(|| format!("connecting to {}", p.display()))?,
            ),
            "docker".to_string(),
        ),
        Dial::Tcp(addr) => (
            Box::new(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?,
            ),
            addr.clone(),
        ),
        Dial::Tls { addr, tls } => {
            let config = tls_config(tls)?;
            let host = match addr.rsplit_once(':') {
                Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
                None => addr.as_str(),
            };
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .with_context(|| format!("{host:?} is not a host name or address"))?;
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS with {addr} (CA {})", tls.ca.display()))?;
            (Box::new(stream), addr.clone())
        }
    })
}

/// A rustls client configuration from the docker CLI's PEM files.
fn tls_config(t: &Tls) -> Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&t.ca)
        .with_context(|| format!("reading {}", t.ca.display()))?
    {
        roots
            .add(c.with_context(|| format!("parsing {}", t.ca.display()))?)
            .with_context(|| format!("{} holds a bad CA certificate", t.ca.display()))?;
    }
    let certs = CertificateDer::pem_file_iter(&t.cert)
        .with_context(|| format!("reading {}", t.cert.display()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", t.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&t.key)
        .with_context(|| format!("reading the key {}", t.key.display()))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .with_context(|| format!("the client certificate {}", t.cert.display()))
}

/// The longest HTTP response head the engine sends for the upgrade.
const MAX_HEAD: usize = 16 * 1024;

/// Open the session `id` on the engine and serve it until the returned task is aborted or the
/// engine closes it.
pub async fn start(
    d: &Dial,
    id: &str,
    config: Arc<SessionConfig>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut methods = vec![
        "/grpc.health.v1.Health/Check",
        "/moby.filesync.v1.Auth/Credentials",
        "/moby.buildkit.secrets.v1.Secrets/GetSecret",
    ];
    if !config.ssh.is_empty() {
        methods.extend([
            "/moby.sshforward.v1.SSH/CheckAgent",
            "/moby.sshforward.v1.SSH/ForwardAgent",
        ]);
    }
    let upgrade = async {
        let (mut io, host) = dial(d).await?;
        let mut head = format!(
            "POST /session HTTP/1.1\r\nHost: {host}\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\
             Content-Length: 0\r\nX-Docker-Expose-Session-Uuid: {id}\r\n\
             X-Docker-Expose-Session-Name: abox\r\nX-Docker-Expose-Session-Sharedkey: {id}\r\n"
        );
        for m in &methods {
            head.push_str(&format!("X-Docker-Expose-Session-Grpc-Method: {m}\r\n"));
        }
        head.push_str("\r\n");
        io.write_all(head.as_bytes()).await?;
        // Byte by byte: the engine's first HTTP/2 frames may follow the head at once.
        let mut resp = Vec::new();
        while !resp.ends_with(b"\r\n\r\n") {
            if resp.len() > MAX_HEAD {
                bail!("the engine's answer to POST /session is longer than {MAX_HEAD} bytes");
            }
            let b = io
                .read_u8()
                .await
                .context("reading the answer to POST /session")?;
            resp.push(b);
        }
        let text = String::from_utf8_lossy(&resp);
        let status = text.lines().next().unwrap_or_default().to_string();
        if !status.contains(" 101 ") {
            bail!("the engine refused the BuildKit session: {status}");
        }
        Ok::<_, anyhow::Error>(io)
    };
    let io = tokio::time::timeout(Duration::from_secs(30), upgrade)
        .await
        .map_err(|_| anyhow!("the engine did not answer POST /session within 30 s"))?
        .context("opening the BuildKit session")?;
    let services = tonic::transport::Server::builder()
        .add_service(HealthServer::new(HealthSvc))
        .add_service(AuthServer::new(AuthSvc))
        .add_service(SecretsServer::new(SecretsSvc(config.clone())))
        .add_service(SshServer::new(SshSvc(config)));
    Ok(tokio::spawn(async move {
        let incoming = futures_util::stream::iter([Ok::<_, std::io::Error>(SessionIo(io))]);
        if let Err(e) = services.serve_with_incoming(incoming).await {
            log::debug!("BuildKit session ended: {e}");
        }
    }))
}

struct HealthSvc;

#[tonic::async_trait]
impl Health for HealthSvc {
    type WatchStream =
        Pin<Box<dyn Stream<Item = std::result::Result<HealthCheckResponse, Status>> + Send>>;

    async fn check(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> std::result::Result<Response<HealthCheckResponse>, Status> {
        Ok(Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    async fn list(
        &self,
        _: Request<HealthListRequest>,
    ) -> std::result::Result<Response<HealthListResponse>, Status> {
        Err(Status::unimplemented("list"))
    }

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

/// Credentials as the docker CLI's session gives them: a user name and password, or an
/// identity token as the secret with no user name.
struct AuthSvc;

#[tonic::async_trait]
impl Auth for AuthSvc {
    async fn credentials(
        &self,
        req: Request<CredentialsRequest>,
    ) -> std::result::Result<Response<CredentialsResponse>, Status> {
        let host = &req.get_ref().host;
        // Docker Hub's credentials live under its historic key.
        let key = if host == "registry-1.docker.io" || host == "docker.io" {
            super::auth::DOCKER_HUB
        } else {
            host.as_str()
        };
        let c = tokio::task::block_in_place(|| super::auth::credentials(key));
        Ok(Response::new(match c {
            Some(c) => match c.identitytoken {
                Some(t) => CredentialsResponse {
                    username: String::new(),
                    secret: t,
                },
                None => CredentialsResponse {
                    username: c.username.unwrap_or_default(),
                    secret: c.password.unwrap_or_default(),
                },
            },
            None => CredentialsResponse::default(),
        }))
    }

    async fn fetch_token(
        &self,
        _: Request<FetchTokenRequest>,
    ) -> std::result::Result<Response<FetchTokenResponse>, Status> {
        // Not advertised: BuildKit fetches tokens itself with the credentials above.
        Err(Status::unimplemented("fetch_token"))
    }

    async fn get_token_authority(
        &self,
        _: Request<GetTokenAuthorityRequest>,
    ) -> std::result::Result<Response<GetTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("get_token_authority"))
    }

    async fn verify_token_authority(
        &self,
        _: Request<VerifyTokenAuthorityRequest>,
    ) -> std::result::Result<Response<VerifyTokenAuthorityResponse>, Status> {
        Err(Status::unimplemented("verify_token_authority"))
    }
}

struct SecretsSvc(Arc<SessionConfig>);

#[tonic::async_trait]
impl Secrets for SecretsSvc {
    async fn get_secret(
        &self,
        req: Request<GetSecretRequest>,
    ) -> std::result::Result<Response<GetSecretResponse>, Status> {
        let id = &req.get_ref().id;
        let data = match self.0.secrets.get(id) {
            None => {
                return Err(Status::not_found(format!(
                    "secret {id} not given: pass --secret id={id},src=FILE"
                )))
            }
            Some(SecretSource::Env(v)) => std::env::var_os(v)
                .ok_or_else(|| Status::not_found(format!("secret {id}: {v} is not set")))?
                .into_encoded_bytes(),
            Some(SecretSource::File(p)) => read_secret(p)
                .await
                .map_err(|e| Status::failed_precondition(format!("secret {id}: {e:#}")))?,
        };
        Ok(Response::new(GetSecretResponse { data }))
    }
}

/// A secret file's bytes, at most [`MAX_SECRET_SIZE`] of them. Opened without blocking and
/// read only when it is a regular file (a FIFO swapped in would hang the build).
async fn read_secret(p: &Path) -> Result<Vec<u8>> {
    let p = p.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        if !f.metadata()?.is_file() {
            bail!("{} is not a regular file", p.display());
        }
        let mut data = Vec::new();
        f.take(MAX_SECRET_SIZE + 1).read_to_end(&mut data)?;
        if data.len() as u64 > MAX_SECRET_SIZE {
            bail!("{} is larger than {MAX_SECRET_SIZE} bytes", p.display());
        }
        Ok(data)
    })
    .await?
}

struct SshSvc(Arc<SessionConfig>);

/// The metadata key BuildKit names the forwarded agent with (`sshforward.KeySSHID`).
const KEY_SSH_ID: &str = "buildkit.ssh.id";

impl SshSvc {
    fn socket(&self, id: &str) -> std::result::Result<&PathBuf, Status> {
        let id = if id.is_empty() { "default" } else { id };
        self.0.ssh.get(id).ok_or_else(|| {
            Status::not_found(format!("no SSH agent {id:?} forwarded: pass --ssh {id}"))
        })
    }
}

type AgentStream = Pin<Box<dyn Stream<Item = std::result::Result<BytesMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Ssh for SshSvc {
    type ForwardAgentStream = AgentStream;

    async fn check_agent(
        &self,
        req: Request<CheckAgentRequest>,
    ) -> std::result::Result<Response<CheckAgentResponse>, Status> {
        self.socket(&req.get_ref().id)?;
        Ok(Response::new(CheckAgentResponse {}))
    }

    async fn forward_agent(
        &self,
        req: Request<tonic::Streaming<BytesMessage>>,
    ) -> std::result::Result<Response<AgentStream>, Status> {
        let id = req
            .metadata()
            .get(KEY_SSH_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("default")
            .to_string();
        let path = self.socket(&id)?.clone();
        let sock = tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| Status::unavailable(format!("SSH agent {}: {e}", path.display())))?;
        let (rd, mut wr) = sock.into_split();
        let mut incoming = req.into_inner();
        tokio::spawn(async move {
            while let Some(Ok(m)) = incoming.next().await {
                if wr.write_all(&m.data).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let out = futures_util::stream::unfold(Some(rd), |rd| async move {
            let mut rd = rd?;
            let mut buf = vec![0u8; 32 * 1024];
            match rd.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(BytesMessage { data: buf }), Some(rd)))
                }
                Err(e) => Some((Err(Status::unavailable(e.to_string())), None)),
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_forms_as_buildx_spells_them() {
        assert_eq!(
            parse_secret("id=token,src=/x/t.txt").unwrap(),
            ("token".into(), SecretSource::File("/x/t.txt".into()))
        );
        assert_eq!(
            parse_secret("type=file,id=t,source=a").unwrap(),
            ("t".into(), SecretSource::File("a".into()))
        );
        assert_eq!(
            parse_secret("id=t,env=TOKEN").unwrap(),
            ("t".into(), SecretSource::Env("TOKEN".into()))
        );
        assert_eq!(
            parse_secret("type=env,id=t,src=TOKEN").unwrap(),
            ("t".into(), SecretSource::Env("TOKEN".into()))
        );
        assert!(parse_secret("src=a").is_err(), "no id");
        assert!(parse_secret("id=a,src=b,env=c").is_err());
        assert!(parse_secret("id=a,type=bogus,src=b").is_err());
        assert!(parse_secret("id=a,colour=red").is_err());
    }

    #[test]
    fn ssh_forms() {
        assert_eq!(
            parse_ssh("default=/run/agent.sock").unwrap(),
            ("default".into(), PathBuf::from("/run/agent.sock"))
        );
        assert!(parse_ssh("=x").is_err());
    }

    #[test]
    fn sources_are_checked_before_a_build() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_SECRET_SIZE as usize + 1]).unwrap();
        let cfg = |s: SecretSource| SessionConfig {
            secrets: [("s".to_string(), s)].into(),
            ..Default::default()
        };
        let e = cfg(SecretSource::File(d.path().join("missing")))
            .check()
            .unwrap_err();
        assert!(format!("{e:#}").contains("cannot read"), "{e:#}");
        let e = cfg(SecretSource::File(big)).check().unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let e = cfg(SecretSource::Env("ABOX_SURELY_UNSET_VAR".into()))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("not set"), "{e}");
        let ssh = SessionConfig {
            ssh: [("default".to_string(), d.path().join("nope.sock"))].into(),
            ..Default::default()
        };
        assert!(ssh
            .check()
            .unwrap_err()
            .to_string()
            .contains("no agent socket"));
    }
}
