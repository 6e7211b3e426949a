//! Ctrl-C and SIGTERM. The first signal sets a flag that every long loop checks, so the error
//! unwinds through the guards (temporary files, child processes) and they clean up. A further
//! signal ends the process at once, after killing the child processes ([`track_child`]) and
//! removing the temporary files ([`track`]) and running the clean-ups ([`on_exit`]) still
//! registered; what a SIGKILL leaves of a disk (files named after the PID) the next `abox disk`
//! in that folder removes, and of a `docker:` read (a container) the next such read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};

static INTERRUPTED: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Temporary files being written right now.
static TEMPORARY: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Register a temporary file (or folder): a second signal removes it before abox exits.
pub fn track(p: &std::path::Path) {
    TEMPORARY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(p.to_path_buf());
}

/// Child processes running right now.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// A child registered until this is dropped: a second signal kills it before abox exits.
pub struct Tracked(u32);

pub fn track_child(pid: u32) -> Tracked {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    Tracked(pid)
}

impl Drop for Tracked {
    fn drop(&mut self) {
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != self.0);
    }
}

/// Clean-ups a further signal runs before abox exits (each bounds its own time), by key.
type Hook = Box<dyn Fn() + Send>;
static HOOKS: std::sync::Mutex<Vec<(u64, Hook)>> = std::sync::Mutex::new(Vec::new());
static NEXT_HOOK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A clean-up registered until this is dropped (for what is neither a file nor a child: a
/// container in the engine).
pub struct OnExit(u64);

/// Register `f` to run when a further signal ends abox at once.
pub fn on_exit(f: impl Fn() + Send + 'static) -> OnExit {
    let key = NEXT_HOOK.fetch_add(1, Ordering::SeqCst);
    HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((key, Box::new(f)));
    OnExit(key)
}

impl Drop for OnExit {
    fn drop(&mut self) {
        // The hook is dropped after the lock is released (it may own an engine runtime).
        let mut hooks = HOOKS.lock().unwrap_or_else(|e| e.into_inner());
        let mine: Vec<(u64, Hook)> = hooks
            .iter()
            .position(|(k, _)| *k == self.0)
            .map(|i| hooks.remove(i))
            .into_iter()
            .collect();
        drop(hooks);
        drop(mine);
    }
}

/// The file was renamed into place or removed.
pub fn untrack(p: &std::path::Path) {
    TEMPORARY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|t| t != p);
}

/// Install the handlers (a thread that receives SIGINT and SIGTERM). Called once from `main`.
pub fn install() -> Result<()> {
    let flag = INTERRUPTED
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::Builder::new()
        .name("abox-signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if !flag.swap(true, Ordering::SeqCst) {
                    continue;
                }
                for pid in CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    if let Some(p) = rustix::process::Pid::from_raw(*pid as i32) {
                        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                    }
                }
                let hooks = std::mem::take(&mut *HOOKS.lock().unwrap_or_else(|e| e.into_inner()));
                for (_, f) in &hooks {
                    f();
                }
                for p in TEMPORARY.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    if p.is_dir() {
                        let _ = std::fs::remove_dir_all(p);
                    } else {
                        let _ = std::fs::remove_file(p);
                    }
                }
                std::process::exit(130);
            }
        })?;
    Ok(())
}

/// Whether the user asked us to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// Fails once the user asked us to stop.
pub fn check() -> Result<()> {
    if INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed)) {
        bail!("interrupted");
    }
    Ok(())
}
