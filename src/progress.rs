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

    /// A one-off message (an artifact written, a warning).
    pub fn note(&self, msg: &str) {
        match self.mode {
            Mode::Json => self.event(serde_json::json!({"event": "note", "message": msg})),
            Mode::None => {}
            _ => eprintln!("{msg}"),
        }
    }
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
            pb.set_position(pos);
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.set(self.pos + n);
    }

    pub fn finish(self, summary: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
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
            pb.finish_and_clear();
        }
    }
}
