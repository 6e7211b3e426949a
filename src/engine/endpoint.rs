//! Which Docker engine abox talks to, chosen exactly as the docker CLI chooses it
//! (docker/cli `cli/command/cli.go` `resolveContextName`, `cli/context/store`):
//!
//! 1. `--context NAME` (a flag; with `--host` too it is an error, as in the CLI);
//! 2. `--host`/`-H URL`;
//! 3. `DOCKER_HOST`;
//! 4. `DOCKER_CONTEXT`;
//! 5. `currentContext` of `$DOCKER_CONFIG/config.json` (default `~/.docker`);
//! 6. the default socket, `unix:///var/run/docker.sock`.
//!
//! A context named `default` is the CLI's built-in one (steps 2, 3, 6). Other contexts are read
//! from the store the CLI writes: `contexts/meta/<sha256 of the name>/meta.json`
//! (`Endpoints.docker.Host`, `SkipTLSVerify`) and TLS material in
//! `contexts/tls/<sha256>/docker/{ca,cert,key}.pem`. Without a context, TLS comes from
//! `DOCKER_TLS_VERIFY` + `DOCKER_CERT_PATH` (default the config folder), like the CLI's.
//! Resolution is a pure function of the flags, an environment lookup and the config folder,
//! so it is tested on plain folders.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The engine every `abox` command uses when nothing else is said.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// The `--host` and `--context` flags, as given.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub host: Option<String>,
    pub context: Option<String>,
}

/// Why an endpoint was chosen (shown by `abox doctor` and at debug level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    HostFlag,
    DockerHostEnv,
    /// A context from the store, and what named it.
    Context {
        name: String,
        from: ContextFrom,
    },
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextFrom {
    Flag,
    Env,
    /// `currentContext` in this config.json.
    Config(PathBuf),
}

/// TLS material: PEM files, as the docker CLI lays them out. The CA is required; the client
/// certificate and key are optional (both or neither), as in the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Whether `cert` and `key` exist and are sent.
    pub client_cert: bool,
}

/// A resolved engine endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `unix:///…`, `tcp://HOST:PORT`, `ssh://[USER@]HOST[:PORT]`.
    pub host: String,
    pub tls: Option<Tls>,
    pub why: Why,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::HostFlag => write!(f, "--host"),
            Why::DockerHostEnv => write!(f, "DOCKER_HOST"),
            Why::Context { name, from } => {
                write!(f, "context {name:?} from ")?;
                match from {
                    ContextFrom::Flag => write!(f, "--context"),
                    ContextFrom::Env => write!(f, "DOCKER_CONTEXT"),
                    ContextFrom::Config(p) => write!(f, "currentContext in {}", p.display()),
                }
            }
            Why::Default => write!(f, "the default socket: no --host, DOCKER_HOST, --context, DOCKER_CONTEXT or currentContext"),
        }
    }
}

impl fmt::Display for Endpoint {
    /// `HOST [TLS] (why)`, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.host)?;
        if self.tls.is_some() {
            write!(f, " with TLS")?;
        }
        write!(f, " ({})", self.why)
    }
}

/// The docker CLI's configuration folder: `$DOCKER_CONFIG`, else `~/.docker`.
pub fn config_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    env("DOCKER_CONFIG")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".docker")))
        .unwrap_or_else(|| PathBuf::from(".docker"))
}

/// The process environment, for [`resolve`].
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// Choose the endpoint (see the module header for the order). Errors: `--host` with
/// `--context`, a named context missing from the store or unreadable, TLS asked for without
/// its files.
pub fn resolve(flags: &Flags, env: &dyn Fn(&str) -> Option<String>) -> Result<Endpoint> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let dir = config_dir(env);
    if flags.host.is_some() && flags.context.is_some() {
        bail!("conflicting options: give either --host or --context, not both");
    }
    let (name, from) = if let Some(c) = &flags.context {
        (c.clone(), ContextFrom::Flag)
    } else if let Some(h) = &flags.host {
        return default_endpoint(h.clone(), Why::HostFlag, env, &dir);
    } else if let Some(h) = set("DOCKER_HOST") {
        return default_endpoint(h, Why::DockerHostEnv, env, &dir);
    } else if let Some(c) = set("DOCKER_CONTEXT") {
        (c, ContextFrom::Env)
    } else if let Some(c) = current_context(&dir)? {
        (c, ContextFrom::Config(dir.join("config.json")))
    } else {
        return default_endpoint(DEFAULT_HOST.into(), Why::Default, env, &dir);
    };
    if name == "default" {
        // The CLI's built-in context: DOCKER_HOST or the socket.
        return match set("DOCKER_HOST") {
            Some(h) => default_endpoint(h, Why::DockerHostEnv, env, &dir),
            None => default_endpoint(DEFAULT_HOST.into(), Why::Context { name, from }, env, &dir),
        };
    }
    from_store(&dir, &name, from)
}

/// An endpoint outside the store: TLS from `DOCKER_TLS_VERIFY` and `DOCKER_CERT_PATH`.
fn default_endpoint(
    host: String,
    why: Why,
    env: &dyn Fn(&str) -> Option<String>,
    dir: &Path,
) -> Result<Endpoint> {
    let host = normalize(&host)?;
    let verify = env("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty());
    if !verify && host.starts_with("tcp://") && env("DOCKER_TLS").is_some_and(|v| !v.is_empty()) {
        bail!(
            "DOCKER_TLS without DOCKER_TLS_VERIFY: abox always checks the engine's certificate; \
             set DOCKER_TLS_VERIFY=1 and put ca.pem (and cert.pem, key.pem) in DOCKER_CERT_PATH"
        );
    }
    let tls = if verify && host.starts_with("tcp://") {
        let certs = env("DOCKER_CERT_PATH")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.to_path_buf());
        Some(tls_files(&certs, "DOCKER_CERT_PATH")?)
    } else {
        None
    };
    Ok(Endpoint { host, tls, why })
}

/// `ca.pem` in `dir` (required), and `cert.pem` with `key.pem` when both are there.
fn tls_files(dir: &Path, what: &str) -> Result<Tls> {
    let t = Tls {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        client_cert: false,
    };
    if !t.ca.is_file() {
        bail!(
            "TLS to the engine needs the CA certificate {} ({what}: {}); copy the CA that signed \
             the engine's certificate there",
            t.ca.display(),
            dir.display()
        );
    }
    match (t.cert.is_file(), t.key.is_file()) {
        (true, true) => Ok(Tls {
            client_cert: true,
            ..t
        }),
        (false, false) => Ok(t),
        (has_cert, _) => bail!(
            "{} is there but {} is not: a client certificate needs its key ({what})",
            if has_cert { &t.cert } else { &t.key }.display(),
            if has_cert { &t.key } else { &t.cert }.display()
        ),
    }
}

/// `currentContext` of `<dir>/config.json`, when set to something else than `default`.
fn current_context(dir: &Path) -> Result<Option<String>> {
    let p = dir.join("config.json");
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(rename = "currentContext", default)]
        current: Option<String>,
    }
    let c: Config =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    Ok(c.current.filter(|c| !c.is_empty()))
}

/// The store's folder name for a context: the hex SHA-256 of its name.
pub fn context_id(name: &str) -> String {
    hex::encode(Sha256::digest(name.as_bytes()))
}

/// A context's docker endpoint from the store.
fn from_store(dir: &Path, name: &str, from: ContextFrom) -> Result<Endpoint> {
    let id = context_id(name);
    let meta = dir.join("contexts/meta").join(&id).join("meta.json");
    let text = match std::fs::read_to_string(&meta) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = match &from {
                ContextFrom::Config(p) => format!(
                    "; it is the currentContext of {}: `docker context use default` resets it",
                    p.display()
                ),
                _ => String::new(),
            };
            bail!(
                "docker context {name:?} not found (no {}){hint}; `docker context ls` lists them",
                meta.display()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", meta.display())),
    };
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "Endpoints", default)]
        endpoints: std::collections::BTreeMap<String, DockerEp>,
    }
    #[derive(serde::Deserialize)]
    struct DockerEp {
        #[serde(rename = "Host", default)]
        host: Option<String>,
        #[serde(rename = "SkipTLSVerify", default)]
        skip_tls_verify: bool,
    }
    let m: Meta =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", meta.display()))?;
    let ep = m.endpoints.get("docker").with_context(|| {
        format!(
            "docker context {name:?} has no docker endpoint ({})",
            meta.display()
        )
    })?;
    let host = match &ep.host {
        Some(h) if !h.is_empty() => normalize(h)?,
        _ => DEFAULT_HOST.to_string(),
    };
    if ep.skip_tls_verify && host.starts_with("tcp://") {
        bail!(
            "docker context {name:?} skips TLS verification: abox always checks the engine's \
             certificate; recreate the context with ca= (the CA that signed the engine's \
             certificate)"
        );
    }
    let tls_dir = dir.join("contexts/tls").join(&id).join("docker");
    let tls = if ["ca.pem", "cert.pem", "key.pem"]
        .iter()
        .any(|f| tls_dir.join(f).is_file())
    {
        Some(tls_files(&tls_dir, &format!("context {name:?}"))?)
    } else {
        None
    };
    Ok(Endpoint {
        host,
        tls,
        why: Why::Context {
            name: name.to_string(),
            from,
        },
    })
}

/// The port of `tcp://HOST` without one (docker/cli `opts.DefaultHTTPPort`).
const DEFAULT_TCP_PORT: u16 = 2375;

/// Parse an engine address as the docker CLI does (`opts.ParseHost`): `unix://PATH` (empty:
/// the default socket), `tcp://[HOST][:PORT]` (localhost and port 2375 when left out),
/// `ssh://…`, or a bare `HOST[:PORT]`, which means `tcp://`. Anything else is refused.
fn normalize(h: &str) -> Result<String> {
    let h = h.trim();
    let (scheme, rest) = h.split_once("://").unwrap_or(("tcp", h));
    match scheme {
        "unix" if rest.is_empty() => Ok(DEFAULT_HOST.to_string()),
        "unix" => Ok(format!("unix://{rest}")),
        "ssh" => {
            ssh_args(h)?;
            Ok(h.to_string())
        }
        "tcp" => {
            let rest = rest.trim_end_matches('/');
            if rest.contains('/') || rest.contains('@') || rest.contains('?') {
                bail!("engine address {h:?}: expected tcp://HOST:PORT");
            }
            let (host, port) = split_port(rest)
                .with_context(|| format!("engine address {h:?}: expected tcp://HOST:PORT"))?;
            let host = if host.is_empty() { "localhost" } else { host };
            let port = port.unwrap_or(DEFAULT_TCP_PORT);
            if host.contains(':') {
                Ok(format!("tcp://[{host}]:{port}"))
            } else {
                Ok(format!("tcp://{host}:{port}"))
            }
        }
        _ => bail!(
            "engine address {h:?}: abox (like the docker CLI) speaks unix://, tcp:// (TLS with \
             DOCKER_TLS_VERIFY or a context's certificates) and ssh://"
        ),
    }
}

/// `HOST[:PORT]` or `[V6][:PORT]` → (host, port); an empty port is no port.
fn split_port(s: &str) -> Result<(&str, Option<u16>)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => {
            let (addr, tail) = v6.split_once(']').context("unclosed [ in the address")?;
            match tail {
                "" => (addr, None),
                t => (addr, Some(t.strip_prefix(':').context("junk after ]")?)),
            }
        }
        None => match s.split_once(':') {
            Some((h, p)) if !p.contains(':') => (h, Some(p)),
            Some(_) => bail!("an IPv6 address goes in brackets: [ADDRESS]:PORT"),
            None => (s, None),
        },
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .with_context(|| format!("port {p:?} is not a port number"))?,
        ),
    };
    Ok((host, port))
}

/// `ssh://[USER@]HOST[:PORT]` → the docker CLI's ssh arguments (`-l USER -p PORT -- HOST`).
/// Refused, as in the CLI or for safety: a password in the address, a path, a query, and user
/// or host names that are not plain names (nothing ssh could read as an option).
pub fn ssh_args(host: &str) -> Result<Vec<String>> {
    let rest = host
        .strip_prefix("ssh://")
        .with_context(|| format!("{host:?} is not an ssh:// address"))?;
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        bail!("{host:?}: expected ssh://[USER@]HOST[:PORT] (no path or query; the remote engine is the one its docker CLI reaches)");
    }
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (h, port) = split_port(hostport).with_context(|| format!("{host:?}"))?;
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
    };
    if !plain(h) {
        bail!("{host:?}: {h:?} is not a host name or address");
    }
    let mut args = Vec::new();
    if let Some(u) = user {
        if u.contains(':') {
            bail!("{host:?}: a plain-text password in the address is not supported (use a key or an agent)");
        }
        if !plain(u) {
            bail!("{host:?}: {u:?} is not a user name");
        }
        args.extend(["-l".to_string(), u.to_string()]);
    }
    if let Some(p) = port {
        args.extend(["-p".to_string(), p.to_string()]);
    }
    args.extend(["--".to_string(), h.to_string()]);
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(dir: &Path, kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let mut m: HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.insert("DOCKER_CONFIG".into(), dir.display().to_string());
        move |k: &str| m.get(k).cloned()
    }

    fn context(dir: &Path, name: &str, host: &str, tls: bool) {
        let id = context_id(name);
        let m = dir.join("contexts/meta").join(&id);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("meta.json"),
            format!(r#"{{"Name":"{name}","Metadata":{{}},"Endpoints":{{"docker":{{"Host":"{host}","SkipTLSVerify":false}}}}}}"#),
        )
        .unwrap();
        if tls {
            let t = dir.join("contexts/tls").join(&id).join("docker");
            std::fs::create_dir_all(&t).unwrap();
            for f in ["ca.pem", "cert.pem", "key.pem"] {
                std::fs::write(t.join(f), "x").unwrap();
            }
        }
    }

    #[test]
    fn order_is_the_docker_clis() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        context(dir, "env-ctx", "ssh://me@box:2222", false);
        context(dir, "flag-ctx", "tcp://10.0.0.9:2375", false);
        context(dir, "cfg-ctx", "unix:///run/other.sock", false);
        std::fs::write(dir.join("config.json"), r#"{"currentContext":"cfg-ctx"}"#).unwrap();
        let none = Flags::default();
        let host_flag = Flags {
            host: Some("tcp://1.2.3.4:2375".into()),
            context: None,
        };
        let ctx_flag = Flags {
            host: None,
            context: Some("flag-ctx".into()),
        };
        let all_env = env_of(
            dir,
            &[
                ("DOCKER_HOST", "unix:///env.sock"),
                ("DOCKER_CONTEXT", "env-ctx"),
            ],
        );
        let r = |f: &Flags, e: &dyn Fn(&str) -> Option<String>| resolve(f, e).unwrap();

        let e = r(&ctx_flag, &all_env);
        assert_eq!(e.host, "tcp://10.0.0.9:2375");
        assert_eq!(
            e.why,
            Why::Context {
                name: "flag-ctx".into(),
                from: ContextFrom::Flag
            }
        );
        let e = r(&host_flag, &all_env);
        assert_eq!(
            (e.host.as_str(), &e.why),
            ("tcp://1.2.3.4:2375", &Why::HostFlag)
        );
        let e = r(&none, &all_env);
        assert_eq!(
            (e.host.as_str(), &e.why),
            ("unix:///env.sock", &Why::DockerHostEnv)
        );
        let e = r(&none, &env_of(dir, &[("DOCKER_CONTEXT", "env-ctx")]));
        assert_eq!(e.host, "ssh://me@box:2222");
        assert!(matches!(
            e.why,
            Why::Context {
                from: ContextFrom::Env,
                ..
            }
        ));
        let e = r(&none, &env_of(dir, &[]));
        assert_eq!(e.host, "unix:///run/other.sock");
        assert!(matches!(
            e.why,
            Why::Context {
                from: ContextFrom::Config(_),
                ..
            }
        ));
        std::fs::remove_file(dir.join("config.json")).unwrap();
        let e = r(&none, &env_of(dir, &[]));
        assert_eq!((e.host.as_str(), &e.why), (DEFAULT_HOST, &Why::Default));
        // `default` is the built-in context.
        let e = r(&none, &env_of(dir, &[("DOCKER_CONTEXT", "default")]));
        assert_eq!(e.host, DEFAULT_HOST);

        let both = Flags {
            host: Some("tcp://x:1".into()),
            context: Some("flag-ctx".into()),
        };
        assert!(resolve(&both, &env_of(dir, &[]))
            .unwrap_err()
            .to_string()
            .contains("conflicting"));
    }

    #[test]
    fn missing_context_and_tls_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::write(dir.join("config.json"), r#"{"currentContext":"gone"}"#).unwrap();
        let e = resolve(&Flags::default(), &env_of(dir, &[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"gone\" not found") && e.contains("docker context use default"),
            "{e}"
        );

        let e = resolve(
            &Flags::default(),
            &env_of(
                dir,
                &[
                    ("DOCKER_HOST", "tcp://h:2376"),
                    ("DOCKER_TLS_VERIFY", "1"),
                    ("DOCKER_CERT_PATH", "/nonexistent"),
                ],
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");

        context(dir, "secure", "tcp://h:2376", true);
        let e = resolve(
            &Flags {
                host: None,
                context: Some("secure".into()),
            },
            &env_of(dir, &[]),
        )
        .unwrap();
        let t = e.tls.unwrap();
        assert!(t.ca.ends_with(format!(
            "contexts/tls/{}/docker/ca.pem",
            context_id("secure")
        )));
    }

    #[test]
    fn addresses_as_the_cli_parses_them() {
        assert_eq!(normalize("127.0.0.1:2375").unwrap(), "tcp://127.0.0.1:2375");
        assert_eq!(normalize("localhost").unwrap(), "tcp://localhost:2375");
        assert_eq!(
            normalize("tcp://127.0.0.1").unwrap(),
            "tcp://127.0.0.1:2375"
        );
        assert_eq!(normalize("tcp://:2376").unwrap(), "tcp://localhost:2376");
        assert_eq!(normalize("tcp://[::1]:5").unwrap(), "tcp://[::1]:5");
        assert_eq!(normalize("unix://").unwrap(), DEFAULT_HOST);
        assert!(normalize("http://h:1/").is_err());
        assert!(normalize("npipe:////./pipe/docker").is_err());
        assert!(normalize("tcp://h:99999").is_err());
        assert_eq!(
            ssh_args("ssh://root@127.0.0.1:2222").unwrap(),
            ["-l", "root", "-p", "2222", "--", "127.0.0.1"]
        );
        assert_eq!(ssh_args("ssh://box").unwrap(), ["--", "box"]);
        assert_eq!(ssh_args("ssh://box:").unwrap(), ["--", "box"]);
        assert_eq!(
            ssh_args("ssh://u@[::1]:22").unwrap(),
            ["-l", "u", "-p", "22", "--", "::1"]
        );
        for bad in [
            "ssh://-oProxyCommand=x",
            "ssh://box/var/run/docker.sock",
            "ssh://root:Hunter2@box",
            "ssh://box?x",
            "ssh://box#f",
            "ssh://b%41x",
            "ssh://::1",
            "ssh://-l@box",
            "ssh://",
        ] {
            assert!(ssh_args(bad).is_err(), "{bad}");
        }
        let e = ssh_args("ssh://root:Hunter2@box").unwrap_err().to_string();
        assert!(e.contains("password") && e.contains("not supported"), "{e}");
    }
}
