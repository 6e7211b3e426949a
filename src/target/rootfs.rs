//! `--rootfs`: the flattened rootfs as a plain, uncompressed tar, for piping elsewhere.

use std::path::Path;

use anyhow::Result;

use super::{AsIs, TarFileTarget, Target};

pub fn create(out_dir: &Path, name: &str) -> Result<Box<dyn Target>> {
    Ok(Box::new(TarFileTarget::create(
        "rootfs",
        &out_dir.join(format!("{name}.rootfs.tar")),
        false,
        "",
        AsIs,
    )?))
}
