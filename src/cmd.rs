//! The one runner for external tools (`tar2sqfs` today; `mke2fs`, `extlinux`, `losetup`,
//! `qemu-img` later). Every command is logged at debug level with its full command line, and a
//! failure comes back as an error that carries the command line and the tail of its stderr.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

/// How much of a failed command's stderr goes into the error message.
const STDERR_TAIL: usize = 1024;

/// Render a command line the way a person would paste it into a shell.
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

fn quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&bytes[start..])
        .trim_end()
        .to_string()
}

fn not_found_hint(cmd: &Command, e: std::io::Error) -> anyhow::Error {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow!("`{prog}` is not installed or not on PATH (run scripts/setup, or install the package that ships it)")
    } else {
        anyhow!(e).context(format!("starting `{}`", display(cmd)))
    }
}

/// Run a command to completion and return its stdout. Non-zero exit is an error carrying the
/// command line and the tail of stderr.
pub fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    log::debug!("running: {}", display(cmd));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| not_found_hint(cmd, e))?;
    if !out.status.success() {
        return Err(anyhow!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            tail(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// A child process fed through its stdin (for example `tar2sqfs` reading a tar stream).
/// Dropping it without [`PipedChild::wait`] kills the child.
pub struct PipedChild {
    line: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl PipedChild {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let line = display(cmd);
        log::debug!("running: {line}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| not_found_hint(cmd, e))?;
        let stdin = child.stdin.take();
        let mut err = child.stderr.take().context("child stderr")?;
        let stderr = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            buf
        });
        Ok(Self {
            line,
            child: Some(child),
            stdin,
            stderr: Some(stderr),
        })
    }

    /// Hand the child's stdin to the caller (drop it to signal end of input).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// The error to report when writing to the child's stdin failed: usually the child died,
    /// and its stderr says why.
    pub fn broken(mut self, e: std::io::Error) -> anyhow::Error {
        drop(self.stdin.take());
        let status = self.child.take().and_then(|mut c| c.wait().ok());
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        anyhow!(
            "`{}` stopped reading its input ({e}; exit {}): {}",
            self.line,
            status.map(|s| s.to_string()).unwrap_or_default(),
            tail(&err)
        )
    }

    /// Close stdin and wait; a non-zero exit is an error with the stderr tail.
    pub fn wait(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self
            .child
            .take()
            .expect("child present until wait()")
            .wait()
            .with_context(|| format!("waiting for `{}`", self.line))?;
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if !status.success() {
            return Err(anyhow!("`{}` failed ({status}): {}", self.line, tail(&err)));
        }
        Ok(())
    }
}

impl Drop for PipedChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_command_line_and_stderr() {
        let e = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("sh -c 'echo boom >&2; exit 3'"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn missing_program_says_so() {
        let e = run(&mut Command::new("abox-no-such-tool")).unwrap_err();
        assert!(format!("{e:#}").contains("not installed"), "{e:#}");
    }
}
