//! Test support for bootable disks: a Debian cloud kernel (downloaded with apt, unpacked with
//! dpkg-deb, never installed), an initramfs that loads virtio-blk, a QEMU (TCG) boot that reads
//! the serial console, and ways to look inside a disk image without abox.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{require_tool, sh};

/// The unpacked `linux-image-*-cloud-amd64` package: (folder, kernel version).
pub fn kernel() -> &'static (PathBuf, String) {
    static K: OnceLock<(PathBuf, String)> = OnceLock::new();
    K.get_or_init(|| {
        require_tool("apt-get");
        require_tool("dpkg-deb");
        // The metapackage only depends on the versioned image package.
        let pkg = sh("apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}'");
        let pkg = pkg.trim().to_string();
        assert!(
            pkg.starts_with("linux-image-"),
            "apt knows no linux-image-cloud-amd64 (run apt-get update)"
        );
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel").join(&pkg);
        let done = cache.join(".unpacked");
        if !done.exists() {
            let _ = std::fs::remove_dir_all(&cache);
            std::fs::create_dir_all(&cache).unwrap();
            sh(&format!(
                "cd {} && apt-get download -q {pkg} 2>&1 && dpkg-deb -x {pkg}_*.deb root && rm -f {pkg}_*.deb",
                cache.display()
            ));
            std::fs::write(&done, "").unwrap();
        }
        let version = pkg.trim_start_matches("linux-image-").to_string();
        let root = cache.join("root");
        assert!(root.join(format!("boot/vmlinuz-{version}")).is_file());
        (root, version)
    })
}

pub fn kernel_file() -> PathBuf {
    let (root, v) = kernel();
    root.join(format!("boot/vmlinuz-{v}"))
}

/// Modules the cloud kernel needs for a virtio-blk root, in load order.
const VIRTIO: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];

/// An uncompressed newc initramfs (written by bsdtar) whose /init loads the virtio modules,
/// finds `root=UUID=…` with busybox findfs, and switches to it.
pub fn initramfs(out: &Path) {
    require_tool("bsdtar");
    let (root, v) = kernel();
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    std::fs::copy(sh("command -v busybox").trim(), r.join("bin/busybox")).unwrap();
    let mut loads = String::new();
    for m in VIRTIO {
        let found = sh(&format!(
            "find {}/lib/modules/{v} -name '{m}.ko*' | head -n1",
            root.display()
        ));
        let found = found.trim();
        assert!(!found.is_empty(), "module {m} not in the kernel package");
        assert!(
            found.ends_with(".ko"),
            "{found}: compressed modules not handled"
        );
        std::fs::copy(found, r.join(format!("modules/{m}.ko"))).unwrap();
        loads.push_str(&format!("$b insmod /modules/{m}.ko\n"));
    }
    let init = format!(
        r#"#!/bin/busybox sh
b=/bin/busybox
$b mount -t devtmpfs dev /dev
$b mount -t proc proc /proc
$b mount -t sysfs sys /sys
{loads}
root=$($b sed -n 's/.*root=\([^ ]*\).*/\1/p' /proc/cmdline)
n=0
while ! dev=$($b findfs "$root" 2>/dev/null); do
  n=$((n+1)); [ $n -gt 100 ] && {{ echo "initramfs: $root not found" > /dev/ttyS0; $b poweroff -f; }}
  $b sleep 0.1
done
$b mount -t ext4 -o ro "$dev" /newroot
$b umount /sys /proc
$b mount --move /dev /newroot/dev
exec $b switch_root /newroot /sbin/init
"#
    );
    std::fs::write(r.join("init"), init).unwrap();
    sh(&format!(
        "chmod 755 {0}/init && cd {0} && bsdtar --format newc --uid 0 --gid 0 -cf {1} .",
        r.display(),
        out.display()
    ));
}

/// How the disk is attached.
#[derive(Clone, Copy, Debug)]
pub enum Bus {
    /// NVMe: built into the cloud kernel, no initramfs needed.
    Nvme,
    /// virtio-blk: a module, so only through an initramfs.
    Virtio,
}

/// Strings on the console that mean the boot failed.
const FAILURES: [&str; 6] = [
    "Boot failed",
    "No bootable device",
    "failed: I/O error",
    "Kernel panic",
    "initramfs: ",
    // busybox init, when an inittab line names a missing program
    "can't run '",
];

/// Boot a disk under QEMU (TCG; KVM here cannot run firmware) and return the line starting
/// with `ABOX-TEST ` that the image's init prints, or panic with the console log.
pub fn boot(disk: &Path, format: &str, bus: Bus) -> String {
    let marker = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("ABOX-TEST "))
            .map(|l| l.trim().to_string())
    };
    let log = boot_until(disk, format, bus, &|t| marker(t).is_some());
    marker(&log).unwrap()
}

/// Boot a disk under QEMU until `done` holds for the serial console's text (then stop the VM)
/// and return that text; panic with the console log on a boot failure, an exit before `done`,
/// or after 300 s.
pub fn boot_until(disk: &Path, format: &str, bus: Bus, done: &dyn Fn(&str) -> bool) -> String {
    require_tool("qemu-system-x86_64");
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("serial.log");
    let drive = match bus {
        Bus::Nvme => vec![
            "-drive".to_string(),
            format!("file={},format={format},if=none,id=d0", disk.display()),
            "-device".into(),
            "nvme,drive=d0,serial=abox".into(),
        ],
        Bus::Virtio => vec![
            "-drive".to_string(),
            format!("file={},format={format},if=virtio", disk.display()),
        ],
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-display", "none"])
        .args(["-machine", "graphics=off", "-nic", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(&drive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let limit = Duration::from_secs(300);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let outcome = loop {
        let text = read();
        if done(&text) {
            break Ok(text);
        }
        if let Some(f) = FAILURES.iter().find(|f| text.contains(*f)) {
            break Err(format!("console shows {f:?}"));
        }
        if let Some(status) = child.try_wait().unwrap() {
            // Exited: read the log once more (the marker may have landed just before).
            let text = read();
            if done(&text) {
                break Ok(text);
            }
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            break Err(format!(
                "qemu exited ({status}) before the console showed what was awaited: {err}"
            ));
        }
        if start.elapsed() > limit {
            break Err(format!("not done after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = child.kill();
    let _ = child.wait();
    match outcome {
        Ok(text) => text,
        Err(e) => panic!(
            "booting {} ({format}, {bus:?}): {e}\n--- serial console ---\n{}",
            disk.display(),
            read()
        ),
    }
}

/// Copy partition 1 of a raw disk out to a file (sparse), using the table as sgdisk/sfdisk
/// read it — not abox's own idea of the layout.
pub fn extract_partition(disk: &Path, out: &Path) {
    require_tool("sfdisk");
    let dump = sh(&format!("sfdisk --json {}", disk.display()));
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let p = &v["partitiontable"]["partitions"][0];
    let start = p["start"].as_u64().unwrap();
    let size = p["size"].as_u64().unwrap();
    sh(&format!(
        "dd if={} of={} bs=1M iflag=skip_bytes,count_bytes skip={} count={} conv=sparse status=none",
        disk.display(),
        out.display(),
        start * 512,
        size * 512
    ));
}

/// `debugfs` on a filesystem image.
pub fn debugfs(fs: &Path, request: &str) -> String {
    require_tool("debugfs");
    let o = Command::new("debugfs")
        .args(["-R", request])
        .arg(fs)
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs -R {request:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert a file of the filesystem image has no holes: its extents cover every block from 0 to
/// its size, in order.
pub fn assert_no_holes(fs: &Path, path: &str) {
    let stat = debugfs(fs, &format!("stat {path}"));
    let size: u64 = stat
        .split_whitespace()
        .skip_while(|w| *w != "Size:")
        .nth(1)
        .unwrap_or_else(|| panic!("no size for {path}: {stat}"))
        .parse()
        .unwrap();
    let blocks = size.div_ceil(4096);
    let ext = debugfs(fs, &format!("ex {path}"));
    // Leaf extents: "Level Entries Logical Physical Length Flags", logical as "a - b".
    let mut covered = Vec::new();
    for line in ext.lines().skip(1) {
        let w: Vec<&str> = line.split_whitespace().collect();
        // e.g. ["0/", "0", "1/", "1", "0", "-", "3463", "4559", "-", "8022", "3464", ...]
        let Some(dash) = w.iter().position(|x| *x == "-") else {
            continue;
        };
        let (lvl, max) = (w[0].trim_end_matches('/'), w[1]);
        if lvl != max {
            continue; // an index node, not a leaf
        }
        let a: u64 = w[dash - 1].parse().unwrap();
        let b: u64 = w[dash + 1].parse().unwrap();
        let uninit = line.contains("Uninit");
        assert!(!uninit, "{path}: unwritten extent {line}");
        covered.push((a, b));
    }
    covered.sort();
    let mut next = 0;
    for (a, b) in &covered {
        assert_eq!(*a, next, "{path}: hole before block {a}\n{ext}");
        next = b + 1;
    }
    assert_eq!(
        next, blocks,
        "{path}: extents end at block {next} of {blocks}\n{ext}"
    );
}

/// Loop devices attached to `file` (by the kernel's backing-file name).
pub fn loops_of(file: &Path) -> Vec<String> {
    let all = sh("losetup --list --noheadings --output NAME,BACK-FILE");
    let name = file.to_string_lossy();
    all.lines()
        .filter(|l| l.contains(name.as_ref()))
        .map(str::to_string)
        .collect()
}

/// abox's mounts still present.
pub fn abox_mounts() -> Vec<String> {
    sh("findmnt --raw --noheadings --output TARGET")
        .lines()
        .filter(|l| l.contains("abox-mnt-"))
        .map(str::to_string)
        .collect()
}

/// A filesystem image mounted read-only for inspection; unmounted when dropped.
pub struct Mounted {
    pub dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(fs_image: &Path) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -t ext4 -o ro,loop {} {}",
            fs_image.display(),
            dir.path().display()
        ));
        Mounted { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // `-d` also frees the loop device `mount -o loop` attached.
        let _ = Command::new("umount")
            .arg("-d")
            .arg(self.dir.path())
            .status();
    }
}

/// No file left in `out_dir`, no mount of abox's, no loop device over a file in it.
pub fn assert_nothing_left(out_dir: &Path, what: &str) {
    assert_eq!(
        super::files_in(out_dir),
        Vec::<PathBuf>::new(),
        "{what}: files left"
    );
    assert!(abox_mounts().is_empty(), "{what}: mounts left");
    let loops = sh("losetup --list --noheadings --output BACK-FILE");
    assert!(
        !loops.contains(&out_dir.display().to_string()),
        "{what}: loop devices left: {loops}"
    );
}
