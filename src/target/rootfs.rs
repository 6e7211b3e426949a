//! `--rootfs`: the flattened rootfs as a plain, uncompressed tar, for piping elsewhere.

use anyhow::Result;

use super::{AsIs, TarDest, TarFileTarget, Target};

/// The plain rootfs tar, `<name>.rootfs.tar` by default.
pub fn create(dest: &TarDest) -> Result<Box<dyn Target>> {
    Ok(Box::new(TarFileTarget::create(
        "rootfs", dest, false, "", AsIs,
    )?))
}
