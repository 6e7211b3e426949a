//! Ctrl-C and SIGTERM. The first signal sets a flag that every long loop checks, so the error
//! unwinds through the guards (temporary files, child processes, loop devices and mounts) and
//! they clean up. A further signal ends the process at once — unless a loop device or mount is
//! held ([`hold`]): then it is ignored (with a word on stderr), since dying there would leave
//! them attached to the host; the guards release them and abox exits by itself.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};

static INTERRUPTED: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Loop devices and mounts held right now.
static HELD: AtomicUsize = AtomicUsize::new(0);

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
                if HELD.load(Ordering::SeqCst) > 0 {
                    eprintln!(
                        "abox: releasing its loop device and mount first; it stops right after"
                    );
                    continue;
                }
                std::process::exit(130);
            }
        })?;
    Ok(())
}

/// Fails once the user asked us to stop.
pub fn check() -> Result<()> {
    if INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed)) {
        bail!("interrupted");
    }
    Ok(())
}

/// Marks a host resource (a loop device, a mount) as held until the value is dropped: a
/// second Ctrl-C then waits for its release instead of ending abox.
pub struct Held(());

pub fn hold() -> Held {
    HELD.fetch_add(1, Ordering::SeqCst);
    Held(())
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::SeqCst);
    }
}
