//! `ssh://` engines, reached the way the docker CLI reaches them (docker/cli
//! `cli/connhelper`): for every connection, `ssh -o ConnectTimeout=30 -T [-l USER] [-p PORT]
//! -- HOST docker system dial-stdio`, whose stdin and stdout carry the engine's HTTP stream.
//!
//! abox serves those connections on a private unix socket (in a 0700 temporary folder) and
//! hands bollard that socket, so every API call — builds with their BuildKit session, saves,
//! pushes — runs unchanged over SSH, with the user's own `ssh` configuration, keys, agent and
//! known_hosts. What `ssh` prints on stderr (a host-key or login failure) is kept for the
//! error message. The socket, its folder and every `ssh` child go away with the [`SshProxy`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

/// The local end of an `ssh://` engine; dropping it stops accepting and kills the children.
pub struct SshProxy {
    /// `unix://…` for bollard.
    pub socket: String,
    /// The last lines `ssh` wrote on stderr, for errors.
    stderr: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// What `ssh` may print about one connection before abox stops keeping it.
const STDERR_KEEP: usize = 2048;

impl SshProxy {
    /// Listen on a private socket; each connection to it runs one `ssh … docker system
    /// dial-stdio` (`args` from [`super::endpoint::ssh_args`]). Must be called inside the
    /// engine's runtime.
    pub fn start(args: Vec<String>) -> Result<SshProxy> {
        let dir = tempfile::Builder::new()
            .prefix("abox-ssh-")
            .tempdir()
            .context("making a folder for the ssh relay socket")?;
        let path: PathBuf = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        let stderr: Arc<Mutex<String>> = Arc::default();
        let keep = stderr.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let args = args.clone();
                let keep = keep.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay(conn, &args, &keep).await {
                        log::debug!("ssh relay: {e:#}");
                    }
                });
            }
        });
        Ok(SshProxy {
            socket: format!("unix://{}", path.display()),
            stderr,
            task,
            _dir: dir,
        })
    }

    /// What `ssh` last said on stderr, trimmed; empty when it said nothing.
    pub fn last_error(&self) -> String {
        self.stderr
            .lock()
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for SshProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Carry one connection over one `ssh` child until either side closes.
async fn relay(conn: tokio::net::UnixStream, args: &[String], keep: &Mutex<String>) -> Result<()> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(["-o", "ConnectTimeout=30", "-T"])
        .args(args)
        .args(["docker", "system", "dial-stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    log::debug!(
        "running ssh -o ConnectTimeout=30 -T {} docker system dial-stdio",
        args.join(" ")
    );
    let mut child = cmd
        .spawn()
        .context("running ssh (install openssh-client)")?;
    let mut stdin = child.stdin.take().context("ssh stdin")?;
    let mut stdout = child.stdout.take().context("ssh stdout")?;
    let mut stderr = child.stderr.take().context("ssh stderr")?;
    let (mut rd, mut wr) = conn.into_split();
    let up = async {
        let r = tokio::io::copy(&mut rd, &mut stdin).await;
        let _ = stdin.shutdown().await;
        drop(stdin);
        r
    };
    let down = async {
        let r = tokio::io::copy(&mut stdout, &mut wr).await;
        let _ = wr.shutdown().await;
        r
    };
    let err = async {
        let mut buf = Vec::new();
        let _ = (&mut stderr)
            .take(STDERR_KEEP as u64)
            .read_to_end(&mut buf)
            .await;
        let text = String::from_utf8_lossy(&buf).trim().to_string();
        if !text.is_empty() {
            if let Ok(mut k) = keep.lock() {
                *k = text;
            }
        }
    };
    // The engine side closing ends the relay; ssh's own end is seen on stdout.
    let (_, d, _) = tokio::join!(up, down, err);
    let _ = child.kill().await;
    d.map(|_| ()).context("relaying the engine stream")
}

/// The lines of what `ssh` said that carry its verdict: the line naming the offending
/// known_hosts entry (the file to fix) and the last two lines; banners (`@@@…`) and advice
/// dropped; joined with " / ".
pub fn summary(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '@'))
        .collect();
    let last = lines.len().saturating_sub(2);
    let mut keep: Vec<&str> = lines[..last]
        .iter()
        .copied()
        .filter(|l| l.starts_with("Offending "))
        .collect();
    keep.extend(&lines[last..]);
    keep.join(" / ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ssh_verdict() {
        let said = "@@@@@@\n@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @\n@@@@@@\nOffending key in kh:1\nHost key for [127.0.0.1]:22 has changed and you have requested strict checking.\nHost key verification failed.\n";
        assert_eq!(
            super::summary(said),
            "Offending key in kh:1 / Host key for [127.0.0.1]:22 has changed and you have requested strict checking. / Host key verification failed."
        );
        assert_eq!(super::summary(""), "");
    }
}
