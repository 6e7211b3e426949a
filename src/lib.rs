//! alpine-boxes: the image factory of a homelab. The pipeline, in the order of `src/`:
//! [`source`] (an image reference → config + layers) → [`flatten`] (layers → one rootfs tar
//! stream) → [`target`] (WSL, LXD/Incus, plain rootfs writers) → [`output`] (atomic artifacts,
//! `SHA256SUMS`, `manifest.json`). [`export`] drives it; [`cmd`] runs external tools; [`doctor`] checks the machine.

pub mod check;
pub mod cli;
pub mod cmd;
pub mod disk;
pub mod doctor;
pub mod engine;
pub mod export;
pub mod factory;
pub mod flatten;
pub mod identity;
pub mod output;
pub mod progress;
pub mod project;
pub mod seed;
pub mod signals;
pub mod source;
pub mod tarfmt;
pub mod target;
