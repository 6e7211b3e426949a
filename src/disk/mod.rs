//! Bootable VM disks (issue #4, in progress): partitioning first. Filesystem creation, the
//! rootfs copy and the boot loader come as separate steps, so each can later run without root.

pub mod partition;
