//! The one runner for external tools (`mke2fs`, `mmd`, `syslinux`, `qemu-img`, `tar2sqfs`, …).
//! Every command is logged at debug level with its full command line, and a failure comes back
//! as an error that carries the command line and the tail of its stderr. A child is stopped
//! when Ctrl-C or SIGTERM arrives ([`crate::signals`]): the first signal kills it and the run
//! unwinds; a further one kills every child still registered before abox exits.

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
    run_with(cmd, &[0])
}

/// [`run`], for a tool whose success has several exit codes (`e2fsck`: 0 clean, 1 corrected).
pub fn run_with(cmd: &mut Command, ok: &[i32]) -> Result<Vec<u8>> {
    log::debug!("running: {}", display(cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| not_found_hint(cmd, e))?;
    let _tracked = crate::signals::track_child(child.id());
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    // Polled, to see Ctrl-C; quickly at first, as most tools here end in milliseconds.
    let mut pause = std::time::Duration::from_millis(1);
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for a child")? {
            break s;
        }
        if let Err(e) = crate::signals::check() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    if !status.code().is_some_and(|c| ok.contains(&c)) {
        // Some tools (e2fsck) report on stdout.
        let said = match (tail(&err), tail(&out)) {
            (e, o) if o.trim().is_empty() => e,
            (e, o) => format!("{e}\n{o}"),
        };
        return Err(anyhow!(
            "`{}` failed ({}): {}",
            display(cmd),
            exit_text(status),
            said.trim()
        ));
    }
    Ok(out)
}

/// `exit 3`, `killed by signal 9`.
fn exit_text(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// A child process fed through its stdin (for example `tar2sqfs` reading a tar stream).
/// Dropping it without [`PipedChild::wait`] kills the child.
pub struct PipedChild {
    line: String,
    _tracked: crate::signals::Tracked,
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
        let tracked = crate::signals::track_child(child.id());
        let mut err = child.stderr.take().context("child stderr")?;
        let stderr = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            buf
        });
        Ok(Self {
            line,
            _tracked: tracked,
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
            "`{}` stopped reading its input ({e}; {}): {}",
            self.line,
            status.map(exit_text).unwrap_or_default(),
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
            return Err(anyhow!(
                "`{}` failed ({}): {}",
                self.line,
                exit_text(status),
                tail(&err)
            ));
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
