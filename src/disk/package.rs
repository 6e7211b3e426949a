//! The package stage: the raw disk → the requested format with `qemu-img convert` (through the
//! command runner). Raw disks are written in place and need no step here.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::Format;

/// Convert the raw disk `raw` into `dest` (which exists, empty, under its temporary name) in
/// `format`; `compress` makes qcow2 clusters compressed. VMDK is written as one growable file
/// (`monolithicSparse`, what VirtualBox and VMware both read), VHDX as `dynamic`, VHD as
/// `fixed` (qemu's `vpc`).
pub fn convert(raw: &Path, dest: &Path, format: Format, compress: bool) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", format.qemu_name()]);
    if compress {
        cmd.arg("-c");
    }
    match format {
        Format::Vmdk => {
            cmd.args(["-o", "subformat=monolithicSparse"]);
        }
        Format::Vhdx => {
            cmd.args(["-o", "subformat=dynamic"]);
        }
        // Fixed, with the exact size (Azure takes only fixed VHDs of whole MiB; without
        // force_size qemu-img rounds to its CHS geometry).
        Format::Vhd => {
            cmd.args(["-o", "subformat=fixed,force_size=on"]);
        }
        _ => {}
    }
    cmd.arg(raw).arg(dest);
    crate::cmd::run(&mut cmd).map(|_| ())
}
