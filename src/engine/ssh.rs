//! `ssh://` engines, reached the way the docker CLI reaches them (docker/cli
//! `cli/connhelper`): for every connection, `ssh -o ConnectTimeout=30 -o BatchMode=yes -T
//! [-l USER] [-p PORT] -- HOST docker system dial-stdio`, whose stdin and stdout carry the
//! engine's HTTP stream. `BatchMode=yes` is abox's one addition: a build opens several
//! connections, and a prompt for each (an unknown host key, a key's passphrase) would hang
//! behind the progress display; ssh fails at once instead and its words reach the error.
//!
//! abox serves those connections on a private unix socket (in a folder created 0700) and
//! hands bollard that socket, so every API call — builds with their BuildKit session, saves,
//! pushes — runs unchanged over SSH, with the user's own `ssh` configuration, keys, agent and
//! known_hosts. What `ssh` prints on stderr (a host-key or login failure) is kept as it
//! arrives, for the error message. Dropping the [`SshProxy`] stops accepting and ends every
//! relay (each `ssh` child is killed with its relay); the socket's folder goes with it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::task::AbortHandle;

/// The local end of an `ssh://` engine; dropping it stops accepting and kills the children.
pub struct SshProxy {
    /// `unix://…` for bollard.
    pub socket: String,
    /// What `ssh` said on stderr lately (the last lines), for errors.
    stderr: Arc<Mutex<Vec<String>>>,
    /// The accept loop and every relay, aborted on drop (which kills their `ssh`).
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
    _dir: tempfile::TempDir,
}

/// Lines of `ssh`'s stderr kept for the error message.
const STDERR_KEEP: usize = 20;

impl SshProxy {
    /// Listen on a private socket; each connection to it runs one `ssh … docker system
    /// dial-stdio` (`args` from [`super::endpoint::ssh_args`]). Must be called inside the
    /// engine's runtime.
    pub fn start(args: Vec<String>) -> Result<SshProxy> {
        // 0700 whatever the umask: whoever reaches the socket drives the remote engine with
        // the user's ssh identity.
        let dir = tempfile::Builder::new()
            .prefix("abox-ssh-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .context("making a folder for the ssh relay socket")?;
        let path: PathBuf = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (keep, relays) = (stderr.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let args = args.clone();
                let keep = keep.clone();
                let t = tokio::spawn(async move {
                    if let Err(e) = relay(conn, &args, &keep).await {
                        log::debug!("ssh relay: {e:#}");
                    }
                });
                if let Ok(mut r) = relays.lock() {
                    r.retain(|h| !h.is_finished());
                    r.push(t.abort_handle());
                }
            }
        });
        tasks
            .lock()
            .map_err(|_| anyhow::anyhow!("ssh relay state poisoned"))?
            .push(accept.abort_handle());
        Ok(SshProxy {
            socket: format!("unix://{}", path.display()),
            stderr,
            tasks,
            _dir: dir,
        })
    }

    /// What `ssh` said on stderr lately, one line per entry; empty when it said nothing.
    pub fn last_error(&self) -> String {
        self.stderr.lock().map(|s| s.join("\n")).unwrap_or_default()
    }
}

impl Drop for SshProxy {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// Carry one connection over one `ssh` child until either side closes.
async fn relay(
    conn: tokio::net::UnixStream,
    args: &[String],
    keep: &Mutex<Vec<String>>,
) -> Result<()> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(["-o", "ConnectTimeout=30", "-o", "BatchMode=yes", "-T"])
        .args(args)
        .args(["docker", "system", "dial-stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    log::debug!(
        "running ssh -o ConnectTimeout=30 -o BatchMode=yes -T {} docker system dial-stdio",
        args.join(" ")
    );
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let said = format!("cannot run ssh: {e} (install openssh-client)");
            if let Ok(mut k) = keep.lock() {
                k.push(said.clone());
            }
            anyhow::bail!(said);
        }
    };
    let mut stdin = child.stdin.take().context("ssh stdin")?;
    let mut stdout = child.stdout.take().context("ssh stdout")?;
    let stderr = child.stderr.take().context("ssh stderr")?;
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
    // Every line as it comes (a prompt-less failure is all ssh will say), and to the end, so
    // a chatty ssh never blocks on a full pipe.
    let err = async {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = line.trim().to_string();
            if line.is_empty() {
                continue;
            }
            log::debug!("ssh: {line}");
            if let Ok(mut k) = keep.lock() {
                k.push(line);
                let extra = k.len().saturating_sub(STDERR_KEEP);
                k.drain(..extra);
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
    fn relay_socket_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        let p = super::SshProxy::start(vec!["--".into(), "127.0.0.1".into()]).unwrap();
        let sock = std::path::PathBuf::from(p.socket.trim_start_matches("unix://"));
        let dir = std::fs::metadata(sock.parent().unwrap()).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700);
        let folder = sock.parent().unwrap().to_path_buf();
        drop(p);
        assert!(!folder.exists(), "the relay's folder outlives it");
    }

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
