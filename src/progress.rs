//! Progress reporting: bars on a terminal (indicatif), one line per phase event in `plain` mode
//! (logs, CI), one JSON object per event in `json` mode (machines), nothing in `none`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Mode {
    /// Bars when stderr is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// One line per phase start and end.
    Plain,
    /// One JSON object per event on stderr.
    Json,
    /// Silent.
    None,
}

#[derive(Clone, Copy, Debug)]
pub struct Progress {
    mode: Mode,
}

impl Progress {
    pub fn new(mode: Mode) -> Self {
        let mode = match mode {
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Auto,
            Mode::Auto => Mode::Plain,
            m => m,
        };
        Self { mode }
    }

    /// The resolved mode (never `Auto` unless stderr is a terminal).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn event(&self, value: serde_json::Value) {
        eprintln!("{value}");
    }

    /// A phase measured in bytes (`total` known) or a spinner (`total` 0).
    pub fn task(&self, phase: &str, total: u64) -> Task {
        let pb = match self.mode {
            Mode::Auto => {
                let pb = if total > 0 {
                    ProgressBar::new(total).with_style(
                        ProgressStyle::with_template(
                            "{spinner} {msg:<18} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .expect("template")
                        .progress_chars("=> "),
                    )
                } else {
                    ProgressBar::new_spinner().with_style(
                        ProgressStyle::with_template("{spinner} {msg:<18} {elapsed}")
                            .expect("template"),
                    )
                };
                pb.set_draw_target(ProgressDrawTarget::stderr());
                pb.set_message(phase.to_string());
                pb.enable_steady_tick(Duration::from_millis(120));
                active().push(pb.clone());
                Some(pb)
            }
            Mode::Plain => {
                eprintln!("{phase}: started");
                None
            }
            Mode::Json => {
                self.event(serde_json::json!({"event": "start", "phase": phase, "total": total}));
                None
            }
            Mode::None => None,
        };
        Task {
            progress: *self,
            phase: phase.to_string(),
            pb,
            start: Instant::now(),
            pos: 0,
        }
    }

    /// A one-off message (an artifact written, a warning). On a terminal the bars on screen
    /// step aside while it is printed, so none is left behind half-drawn.
    pub fn note(&self, msg: &str) {
        match self.mode {
            Mode::Json => self.event(serde_json::json!({"event": "note", "message": msg})),
            Mode::None => {}
            Mode::Auto => {
                let bars = active().clone();
                let print = || eprintln!("{msg}");
                match bars.last() {
                    Some(pb) => pb.suspend(print),
                    None => print(),
                }
            }
            Mode::Plain => eprintln!("{msg}"),
        }
    }

    /// The run's artifacts, once they are in place: `{"event":"artifacts","files":[…]}` in
    /// JSON mode; on a terminal, how to use each kind ([`next_steps`]).
    pub fn artifacts(&self, files: &[std::path::PathBuf]) {
        match self.mode {
            Mode::Json => self.event(serde_json::json!({
                "event": "artifacts",
                "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            })),
            Mode::Auto => {
                for hint in next_steps(files) {
                    eprintln!("{hint}");
                }
            }
            _ => {}
        }
    }

    /// A failed run, as the last event in JSON mode (`{"event":"error","message":…,"exit":N}`),
    /// else `error: MESSAGE`.
    pub fn error(&self, msg: &str, exit: i32) {
        match self.mode {
            Mode::Json => {
                self.event(serde_json::json!({"event": "error", "message": msg, "exit": exit}))
            }
            _ => eprintln!("error: {msg}"),
        }
    }
}

/// One hint per kind of artifact among `files`: the command that imports or boots it.
pub fn next_steps(files: &[std::path::PathBuf]) -> Vec<String> {
    let name_of = |f: &std::path::Path, suffix: &str| {
        f.file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(suffix).to_string())
            .unwrap_or_default()
    };
    let mut hints = Vec::new();
    let mut said = std::collections::HashSet::new();
    let find = |suffix: &str| {
        files
            .iter()
            .find(|f| f.to_string_lossy().ends_with(suffix))
            .cloned()
    };
    for f in files {
        let s = f.display().to_string();
        let (kind, hint) = if s.ends_with(".rootfs.tar.gz") {
            let n = name_of(f, ".rootfs.tar.gz");
            (
                "wsl",
                format!("WSL:      wsl --import {n} C:\\WSL\\{n} {s}"),
            )
        } else if s.ends_with(".wsl") {
            (
                "wsl-package",
                format!("WSL:      wsl --install --from-file {s}"),
            )
        } else if s.ends_with(".lxd.tar.gz") {
            let n = name_of(f, ".lxd.tar.gz");
            ("lxd", format!("LXD:      lxc image import {s} --alias {n}"))
        } else if s.ends_with(".lxd-meta.tar.gz") {
            let n = name_of(f, ".lxd-meta.tar.gz");
            let Some(rootfs) = find(&format!("{n}.lxd-rootfs.squashfs")) else {
                continue;
            };
            (
                "lxd-split",
                format!(
                    "LXD:      lxc image import {s} {} --alias {n}",
                    rootfs.display()
                ),
            )
        } else if s.ends_with(".lxd-vm-meta.tar.gz") {
            let n = name_of(f, ".lxd-vm-meta.tar.gz");
            let Some(disk) = find(&format!("{n}.lxd-vm.qcow2")) else {
                continue;
            };
            (
                "lxd-vm",
                format!(
                    "LXD VM:   lxc image import {s} {} --alias {n}-vm && lxc launch {n}-vm --vm",
                    disk.display()
                ),
            )
        } else if s.ends_with(".lxd-vm.qcow2") {
            continue;
        } else if let Some(fmt) = ["qcow2", "img", "raw", "vmdk", "vdi", "vhdx", "vhd"]
            .iter()
            .find(|e| s.ends_with(&format!(".{e}")))
        {
            let qemu = match *fmt {
                "img" | "raw" => "raw",
                "vhd" => "vpc",
                other => other,
            };
            (
                "disk",
                format!(
                    "VM:       qemu-system-x86_64 -m 1G -nographic -drive file={s},format={qemu},if=virtio"
                ),
            )
        } else {
            continue;
        };
        if said.insert(kind) {
            hints.push(hint);
        }
    }
    hints
}

/// The bars on screen (terminal mode), newest last: notes print above them.
fn active() -> std::sync::MutexGuard<'static, Vec<ProgressBar>> {
    static BARS: std::sync::Mutex<Vec<ProgressBar>> = std::sync::Mutex::new(Vec::new());
    BARS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Take `pb` off screen and out of the bars notes step around.
fn retire(pb: &ProgressBar) {
    pb.finish_and_clear();
    active().retain(|b| !b.is_finished());
}

pub struct Task {
    progress: Progress,
    phase: String,
    pb: Option<ProgressBar>,
    start: Instant,
    pos: u64,
}

impl Task {
    pub fn set(&mut self, pos: u64) {
        self.pos = pos;
        if let Some(pb) = &self.pb {
            // The total was an estimate (a compressed size, an engine's figure): never past it.
            if pb.length().is_some_and(|l| l > 0 && pos > l) {
                pb.set_length(pos);
            }
            pb.set_position(pos);
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.set(self.pos + n);
    }

    pub fn finish(self, summary: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        if let Some(pb) = &self.pb {
            retire(pb);
            eprintln!("{}: {summary} ({secs:.1}s)", self.phase);
        }
        match self.progress.mode {
            Mode::Plain => eprintln!("{}: {summary} ({secs:.1}s)", self.phase),
            Mode::Json => self.progress.event(serde_json::json!({
                "event": "done", "phase": self.phase, "bytes": self.pos,
                "seconds": secs, "summary": summary
            })),
            _ => {}
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(pb) = &self.pb {
            retire(pb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn one_next_step_per_kind_of_artifact() {
        let files: Vec<PathBuf> = [
            "out/base/base.rootfs.tar.gz",
            "out/base/base.wsl",
            "out/base/base.lxd.tar.gz",
            "out/base/base.lxd-meta.tar.gz",
            "out/base/base.lxd-rootfs.squashfs",
            "out/base/base.qcow2",
            "out/base/base.lxd-vm-meta.tar.gz",
            "out/base/base.lxd-vm.qcow2",
            "out/other/other.rootfs.tar.gz",
            "out/base/SHA256SUMS",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(
            next_steps(&files),
            [
                "WSL:      wsl --import base C:\\WSL\\base out/base/base.rootfs.tar.gz",
                "WSL:      wsl --install --from-file out/base/base.wsl",
                "LXD:      lxc image import out/base/base.lxd.tar.gz --alias base",
                "LXD:      lxc image import out/base/base.lxd-meta.tar.gz out/base/base.lxd-rootfs.squashfs --alias base",
                "VM:       qemu-system-x86_64 -m 1G -nographic -drive file=out/base/base.qcow2,format=qcow2,if=virtio",
                "LXD VM:   lxc image import out/base/base.lxd-vm-meta.tar.gz out/base/base.lxd-vm.qcow2 --alias base-vm && lxc launch base-vm --vm",
            ]
        );
        assert!(next_steps(&[PathBuf::from("seed.iso")]).is_empty());
    }
}
