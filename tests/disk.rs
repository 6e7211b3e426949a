//! `abox disk`: the judge is a real boot. A test image made of Debian's busybox-static and
//! cloud kernel boots under QEMU (TCG) and its init prints what it sees to the serial console;
//! the disks are also checked with sgdisk, sfdisk, e2fsck, debugfs and qemu-img — never with
//! abox's own reading of them. Needs root, QEMU and the syslinux packages: fails loudly
//! without them (scripts/setup installs everything).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::boot::{self, assert_nothing_left, Bus, Fw};
use common::{
    abox, files_in, require_lxd, require_root, require_tool, run_err, run_ok, sh, ImageSpec,
};

/// The init of the test image: proves the root was found and mounted, shows what the disk's
/// fix-ups did, then powers off. The marker comes from a file of the image, never from the
/// kernel command line (the kernel echoes that).
const INIT: &str = r#"#!/bin/busybox sh
b=/bin/busybox
$b mount -t devtmpfs dev /dev
$b mount -t proc proc /proc
m=$($b cat /etc/abox-marker)
root=$($b awk '$2=="/"{d=$1} END{print d}' /proc/mounts)
extra=$($b grep -c abox.extra=1 /proc/cmdline)
env=no; [ -e /.dockerenv ] && env=yes
fstab=$($b head -n1 /etc/fstab | $b cut -f1)
pw=$($b grep '^root:' /etc/shadow | $b cut -d: -f2 | $b cut -c1-3)
hl=$($b cat /etc/hardlink)
echo "ABOX-TEST $m extra=$extra dockerenv=$env fstab=$fstab pw=$pw hl=$hl" > /dev/ttyS0
$b poweroff -f
"#;

struct TestImage {
    _dir: tempfile::TempDir,
    spec: ImageSpec,
    marker: String,
}

/// The bootable test image: busybox as /bin/busybox, the init above, the cloud kernel in
/// /boot (with a `vmlinuz` symlink to it, as Debian has), optionally an initramfs, a file of
/// zero blocks in /boot, and the things the disk fix-ups handle.
fn test_image(with_initrd: bool) -> TestImage {
    require_tool("busybox");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let marker = format!(
        "marker-{}",
        std::process::id() as u64 * 1000 + rand_suffix()
    );
    std::fs::write(d.join("init"), INIT).unwrap();
    std::fs::write(d.join("marker"), &marker).unwrap();
    let mut zeros = vec![0u8; 256 << 10];
    zeros.extend_from_slice(b"end of zeros\n");
    std::fs::write(d.join("zeros"), zeros).unwrap();
    let busybox = sh("command -v busybox");
    let v = &boot::kernel().1;
    let base = format!(
        "d bin 0755\nH bin/busybox 0755 {bb}\nd sbin 0755\nH sbin/init 0755 {init}\n\
         d etc 0755\nH etc/abox-marker 0644 {marker}\n\
         f etc/fstab 0644 /dev/sda1 / ext4 defaults 0 1\\n/dev/cdrom /media/cdrom iso9660 noauto,ro 0 0\\n\n\
         f etc/shadow 0640 root:*:19000:0:::::\\nalpine:!:19000:0:99999:7:::\\n\n\
         f etc/hardlink-source 0644 same-inode\nh etc/hardlink => etc/hardlink-source\n\
         f usr-suid 4755 setuid\nu 1000 1000\nx security.capability 0x0100000200200000000000000000000000000000\n\
         f .dockerenv 0644 \nd dev 0755\nd proc 0555\nd sys 0555\nd tmp 1777\n\
         c dev/null 0666 1 3\np run-fifo 0600\nl bin/sh -> busybox\n",
        bb = busybox.trim(),
        init = d.join("init").display(),
        marker = d.join("marker").display(),
    );
    let mut bootl = format!(
        "d boot 0755\nH boot/vmlinuz-{v} 0644 {k}\nl boot/vmlinuz -> vmlinuz-{v}\nH boot/zeros.bin 0644 {z}\n",
        k = boot::kernel_file().display(),
        z = d.join("zeros").display()
    );
    if with_initrd {
        let initrd = d.join("initrd");
        boot::initramfs(&initrd);
        bootl.push_str(&format!(
            "H boot/initrd.img-{v} 0644 {}\n",
            initrd.display()
        ));
    }
    let spec = ImageSpec::new(&[&base, &bootl]);
    TestImage {
        _dir: dir,
        spec,
        marker,
    }
}

fn rand_suffix() -> u64 {
    let mut b = [0u8; 4];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u32::from_le_bytes(b) as u64 % 1000
}

/// What every disk test needs; the guard it returns serialises them, since each one checks
/// that no loop device or mount of abox's is left, which a parallel test's would break.
fn needs() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    for t in [
        "syslinux",
        "mtype",
        "fsck.fat",
        "qemu-img",
        "qemu-system-x86_64",
        "sgdisk",
        "e2fsck",
    ] {
        require_tool(t);
    }
    guard
}

/// The test image as an OCI layout: `oci:DIR:boot`.
fn oci_source(img: &TestImage, dir: &Path) -> String {
    img.spec.write_oci(dir, "boot");
    format!("oci:{}:boot", dir.display())
}

/// Which loaders a disk was made with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Made {
    Bios,
    Uefi,
    Hybrid,
}

impl Made {
    fn bios(self) -> bool {
        self != Made::Uefi
    }
    fn uefi(self) -> bool {
        self != Made::Bios
    }
}

/// Checks every disk gets, with independent tools: the table (sgdisk -v / sfdisk), the ESP
/// first and marked for BIOS when BIOS boots it, the MBR boot code; the ESP clean for
/// `fsck.fat` and holding /boot's files and the loaders (the same boot entry for both); the
/// root clean for `e2fsck`, labelled, with an empty /boot and an fstab naming both by UUID.
/// Returns the root filesystem's UUID.
fn check_raw(raw: &Path, gpt: bool, initrd: bool, made: Made) -> String {
    let work = tempfile::tempdir().unwrap();
    if gpt {
        let v = sh(&format!("sgdisk -v {}", raw.display()));
        assert!(v.contains("No problems found"), "{v}");
        let esp = sh(&format!("sgdisk -i 1 {}", raw.display()));
        assert!(esp.contains("EFI system partition"), "{esp}");
        assert!(esp.contains("First sector: 2048 "), "{esp}");
        // LegacyBIOSBootable is attribute bit 2.
        let attr = if made.bios() {
            "0000000000000004"
        } else {
            "0000000000000000"
        };
        assert!(esp.contains(&format!("Attribute flags: {attr}")), "{esp}");
        let root = sh(&format!("sgdisk -i 2 {}", raw.display()));
        assert!(root.contains("Linux filesystem"), "{root}");
    } else {
        let d = sh(&format!("sfdisk -d {}", raw.display()));
        assert!(d.contains("label: dos"), "{d}");
        assert!(
            d.contains("start=        2048") && d.contains("type=ef, bootable"),
            "{d}"
        );
        assert!(d.contains("type=83\n"), "{d}");
    }
    // The boot code: syslinux's gptmbr.bin / mbr.bin in the first 440 bytes (BIOS only).
    let mut code = [0u8; 440];
    {
        use std::io::Read;
        std::fs::File::open(raw)
            .unwrap()
            .read_exact(&mut code)
            .unwrap();
    }
    let bin = if gpt { "gptmbr.bin" } else { "mbr.bin" };
    let want = std::fs::read(Path::new("/usr/lib/syslinux/mbr").join(bin)).unwrap();
    assert_eq!(
        code[..want.len()] == want[..],
        made.bios(),
        "{bin} in the MBR iff BIOS boots it"
    );

    let part = work.path().join("root.ext4");
    boot::extract_partition(raw, &part);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&part)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "e2fsck -fn: {fsck:?}");
    let head = sh(&format!("dumpe2fs -h {} 2>/dev/null", part.display()));
    let uuid = head
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem UUID:"))
        .unwrap()
        .trim()
        .to_string();
    assert!(head.contains("Filesystem volume name:   root"), "{head}");
    // /boot on the root is the ESP's empty mount point.
    let ls = boot::debugfs(&part, "ls -p /boot");
    assert_eq!(ls.lines().filter(|l| !l.is_empty()).count(), 2, "{ls}");

    let esp = work.path().join("esp.fat");
    boot::extract_esp(raw, &esp);
    let fsck = Command::new("fsck.fat")
        .arg("-n")
        .arg(&esp)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "fsck.fat -n: {fsck:?}");
    let esp_uuid = sh(&format!("blkid -p -o value -s UUID {}", esp.display()));
    let esp_uuid = esp_uuid.trim();
    assert_eq!(esp_uuid.len(), 9, "{esp_uuid}");
    let v = &boot::kernel().1;
    assert_eq!(
        boot::fat_cat(&esp, &format!("vmlinuz-{v}")),
        std::fs::read(boot::kernel_file()).unwrap()
    );
    let zeros = boot::fat_cat(&esp, "zeros.bin");
    assert!(zeros.ends_with(b"end of zeros\n") && zeros.len() == (256 << 10) + 13);
    let root_arg = if initrd {
        format!("root=UUID={uuid} ")
    } else {
        let partuuid = if gpt {
            let info = sh(&format!("sgdisk -i 2 {}", raw.display()));
            info.lines()
                .find_map(|l| l.strip_prefix("Partition unique GUID: "))
                .unwrap()
                .trim()
                .to_ascii_lowercase()
        } else {
            let id = sh(&format!("sfdisk --disk-id {}", raw.display()));
            format!("{}-02", id.trim().trim_start_matches("0x"))
        };
        format!("root=PARTUUID={partuuid} ")
    };
    let mut options = Vec::new();
    if made.bios() {
        let conf = String::from_utf8(boot::fat_cat(&esp, "syslinux/syslinux.cfg")).unwrap();
        assert!(conf.contains("PROMPT 0"), "{conf}");
        assert!(conf.contains(&format!("LINUX /vmlinuz-{v}\n")), "{conf}");
        assert!(conf.contains("console=ttyS0,115200n8"), "{conf}");
        assert!(conf.contains(&root_arg), "{conf}");
        assert_eq!(
            conf.contains(&format!("INITRD /initrd.img-{v}\n")),
            initrd,
            "{conf}"
        );
        assert!(!boot::fat_cat(&esp, "syslinux/ldlinux.sys").is_empty());
        assert!(!boot::fat_cat(&esp, "syslinux/ldlinux.c32").is_empty());
        let append = conf.lines().find_map(|l| l.trim().strip_prefix("APPEND "));
        options.push(append.unwrap().to_string());
    }
    if made.uefi() {
        assert_eq!(
            boot::fat_cat(&esp, "EFI/BOOT/BOOTX64.EFI"),
            std::fs::read("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").unwrap()
        );
        let loader = String::from_utf8(boot::fat_cat(&esp, "loader/loader.conf")).unwrap();
        assert!(loader.contains("default abox.conf"), "{loader}");
        let entry = String::from_utf8(boot::fat_cat(&esp, "loader/entries/abox.conf")).unwrap();
        assert!(entry.contains(&format!("linux /vmlinuz-{v}\n")), "{entry}");
        assert_eq!(
            entry.contains(&format!("initrd /initrd.img-{v}\n")),
            initrd,
            "{entry}"
        );
        let opts = entry.lines().find_map(|l| l.strip_prefix("options "));
        assert!(opts.unwrap().contains(&root_arg), "{entry}");
        options.push(opts.unwrap().to_string());
    }
    // One entry for both loaders.
    options.dedup();
    assert_eq!(options.len(), 1, "{options:?}");

    let fstab = boot::debugfs(&part, "cat /etc/fstab");
    let mut lines = fstab.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with(&format!("UUID={uuid}\t/\text4\t")),
        "{fstab}"
    );
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with(&format!("UUID={esp_uuid}\t/boot\tvfat\t")),
        "{fstab}"
    );
    assert!(!fstab.contains("/dev/sda1"), "{fstab}");
    assert!(fstab.contains("/dev/cdrom /media/cdrom"), "{fstab}");
    uuid
}

fn check_line(line: &str, img: &TestImage, uuid: &str, extra: bool, pw: &str) {
    let want = format!(
        "ABOX-TEST {} extra={} dockerenv=no fstab=UUID={uuid} pw={pw} hl=same-inode",
        img.marker,
        if extra { 1 } else { 0 }
    );
    assert_eq!(line, want);
}

/// The partition table of a disk as sgdisk prints it, without what is random (GUIDs).
fn table_shape(raw: &Path) -> String {
    sh(&format!("sgdisk -p {}", raw.display()))
        .lines()
        .filter(|l| !l.contains("GUID") && !l.starts_with("Disk "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `mdir -/ -b` of a FAT image: every path on it.
fn fat_paths(esp: &Path) -> Vec<String> {
    let o = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-/", "-b", "-i"])
        .arg(esp)
        .arg("::")
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

#[test]
fn gpt_raw_built_without_privilege_boots_on_bios_and_uefi_and_holds_the_image() {
    let _disk = needs();
    let img = test_image(false);
    // A folder uid 65534 can read (the OCI layout) and write (the output).
    let work = tempfile::Builder::new()
        .prefix("abox-unpriv-")
        .tempdir()
        .unwrap();
    sh(&format!("chmod 755 {}", work.path().display()));
    let src = oci_source(&img, &work.path().join("oci"));
    sh(&format!(
        "chmod -R a+rX {}",
        work.path().join("oci").display()
    ));
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    sh(&format!("chown 65534:65534 {}", out.display()));
    let disk = out.join("boot.img");
    // As nobody: no root, no loop device (/dev/loop-control is root's), no mount.
    require_tool("setpriv");
    let o = run_ok(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_abox"))
            .args(["--progress", "plain", "disk", &src, "-o"])
            .arg(&disk),
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        disk.display().to_string()
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(meta.uid(), 65534);
    // Raw stays sparse: far fewer bytes allocated than its length.
    assert!(
        meta.blocks() * 512 < meta.len() / 2,
        "{} of {}",
        meta.blocks() * 512,
        meta.len()
    );
    let uuid = check_raw(&disk, true, false, Made::Hybrid);

    // Built as root: the same table and the same files in both filesystems.
    let as_root = work.path().join("root.img");
    run_ok(abox().args(["disk", &src, "-o"]).arg(&as_root));
    assert_eq!(table_shape(&disk), table_shape(&as_root));
    let (esp_a, esp_b) = (work.path().join("a.fat"), work.path().join("b.fat"));
    boot::extract_esp(&disk, &esp_a);
    boot::extract_esp(&as_root, &esp_b);
    assert_eq!(fat_paths(&esp_a), fat_paths(&esp_b));
    let (root_a, root_b) = (work.path().join("a.ext4"), work.path().join("b.ext4"));
    boot::extract_partition(&disk, &root_a);
    boot::extract_partition(&as_root, &root_b);
    let mut tree_b = {
        let m = boot::Mounted::new(&root_b);
        common::read_dir_tree(m.path())
    };
    // (fstab differs: it names each disk's own UUIDs.)
    tree_b.remove("etc/fstab").unwrap();

    // The root holds exactly the image (as `--rootfs` flattens it) less /boot's content (on
    // the ESP), plus the fix-ups.
    let rootfs_dir = work.path().join("rootfs");
    run_ok(
        abox()
            .args(["export", &src, "--rootfs", "-o"])
            .arg(&rootfs_dir),
    );
    let tar = files_in(&rootfs_dir)
        .into_iter()
        .find(|f| f.to_string_lossy().ends_with(".rootfs.tar"))
        .unwrap();
    let mut want = common::read_tar_file(&tar);
    {
        let m = boot::Mounted::new(&root_a);
        let mut got = common::read_dir_tree(m.path());
        got.remove("etc/fstab").unwrap();
        common::assert_same_tree(&got, &tree_b, "unprivileged vs root build");
        for added in ["lost+found", "run"] {
            assert!(got.remove(added).is_some(), "{added} missing on the disk");
        }
        // The image has no hosts or hostname: the disk gets ones that work.
        assert!(!want.contains_key("etc/hosts") && !want.contains_key("etc/hostname"));
        let hosts = std::fs::read_to_string(m.path().join("etc/hosts")).unwrap();
        assert!(hosts.starts_with("127.0.0.1\tlocalhost "), "{hosts}");
        let name = std::fs::read_to_string(m.path().join("etc/hostname")).unwrap();
        assert_eq!(name, "localhost\n");
        got.remove("etc/hosts");
        got.remove("etc/hostname");
        want.remove(".dockerenv").expect("the image has .dockerenv");
        want.remove("etc/fstab");
        want.retain(|p, _| !p.starts_with("boot/"));
        common::assert_same_tree(&got, &common::without_xattrs(&want), "disk vs --rootfs");
    }
    // mke2fs keeps security.capability (and only that attribute).
    let caps = boot::debugfs(&root_a, "ea_get -x /usr-suid security.capability");
    assert!(caps.contains("01 00 00 02 00 20 00 00"), "{caps}");

    // The same file boots on both firmwares.
    for fw in [Fw::Bios, Fw::Uefi] {
        let line = boot::boot_fw(&disk, "raw", Bus::Nvme, fw);
        check_line(&line, &img, &uuid, false, "*");
    }
    assert_eq!(files_in(&out), vec![disk.clone()]);
}

#[test]
fn gpt_qcow2_from_the_engine_boots_and_checks_clean() {
    let _disk = needs();
    common::engine::require_docker();
    let img = test_image(false);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("boot.tar");
    let tag = format!("abox-test/disk-boot:{}", std::process::id());
    img.spec.write_docker_archive(&archive, &tag);
    sh(&format!("docker load -q -i {}", archive.display()));
    let out = work.path().join("out");
    // No -o: the default name under -o's sibling is out/<name>/<name>.qcow2, so run in `work`.
    let o = abox()
        .current_dir(work.path())
        .args(["disk", &format!("docker:{tag}"), "--compress"])
        .output()
        .unwrap();
    common::engine::rmi(std::slice::from_ref(&tag));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let disk = out.join(format!("disk-boot-{}/disk-boot.qcow2", std::process::id()));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("out/disk-boot-{}/disk-boot.qcow2", std::process::id())
    );
    let check = sh(&format!("qemu-img check {}", disk.display()));
    assert!(check.contains("No errors were found"), "{check}");
    let info = sh(&format!("qemu-img info --output json {}", disk.display()));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zlib");
    let raw = work.path().join("back.raw");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        disk.display(),
        raw.display()
    ));
    // Compressed clusters: the file is smaller than the data it holds.
    use std::os::unix::fs::MetadataExt;
    let held = std::fs::metadata(&raw).unwrap().blocks() * 512;
    let size = std::fs::metadata(&disk).unwrap().len();
    assert!(
        size < held,
        "qcow2 of {size} bytes holds {held} bytes of data"
    );
    let uuid = check_raw(&raw, true, false, Made::Hybrid);
    let line = boot::boot_fw(&disk, "qcow2", Bus::Nvme, Fw::Uefi);
    check_line(&line, &img, &uuid, false, "*");
    // The default folder is abox's: the disk is listed in its SHA256SUMS and manifest.json,
    // nothing else was left there.
    let dir = disk.parent().unwrap();
    let mut want = vec![
        dir.join("SHA256SUMS"),
        disk.clone(),
        dir.join("manifest.json"),
    ];
    want.sort();
    assert_eq!(files_in(&out), want);
    let sha = sh(&format!("sha256sum {}", disk.display()));
    let sha = sha.split_whitespace().next().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap(),
        format!("{sha}  disk-boot.qcow2\n")
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["artifacts"][0]["kind"], "disk");
    assert_eq!(m["artifacts"][0]["sha256"], sha);
}

#[test]
fn mbr_raw_boots_on_bios_and_uefi() {
    let _disk = needs();
    let img = test_image(false);
    let work = tempfile::tempdir().unwrap();
    let src = oci_source(&img, &work.path().join("oci"));
    let disk = work.path().join("mbr.raw");
    run_ok(
        abox()
            .args(["disk", &src, "--table", "mbr", "-o"])
            .arg(&disk),
    );
    let uuid = check_raw(&disk, false, false, Made::Hybrid);
    for fw in [Fw::Bios, Fw::Uefi] {
        let line = boot::boot_fw(&disk, "raw", Bus::Nvme, fw);
        check_line(&line, &img, &uuid, false, "*");
    }
}

#[test]
fn virtio_with_initramfs_boots_by_uuid_with_cmdline_and_password() {
    let _disk = needs();
    let img = test_image(true);
    let work = tempfile::tempdir().unwrap();
    let src = oci_source(&img, &work.path().join("oci"));
    let pw = work.path().join("pw");
    std::fs::write(&pw, "correct horse\n").unwrap();
    let disk = work.path().join("v.qcow2");
    let o = run_ok(
        abox()
            .args([
                "disk",
                &src,
                "--cmdline",
                "abox.extra=1",
                "--root-password-file",
            ])
            .arg(&pw)
            .arg("-o")
            .arg(&disk),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!all.contains("correct horse"), "{all}");
    let raw = work.path().join("v.raw");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        disk.display(),
        raw.display()
    ));
    let uuid = check_raw(&raw, true, true, Made::Hybrid);
    let part = work.path().join("p.ext4");
    boot::extract_partition(&raw, &part);
    let shadow = boot::debugfs(&part, "cat /etc/shadow");
    let hash = shadow
        .lines()
        .next()
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap()
        .to_string();
    let verify = sh(&format!(
        "python3 -W ignore -c 'import crypt,sys; print(crypt.crypt(\"correct horse\", sys.argv[1]) == sys.argv[1])' '{hash}'"
    ));
    assert_eq!(verify.trim(), "True", "{shadow}");
    assert!(shadow.contains("\nalpine:!:19000:0:99999:7:::"), "{shadow}");
    for fw in [Fw::Bios, Fw::Uefi] {
        let line = boot::boot_fw(&disk, "qcow2", Bus::Virtio, fw);
        check_line(&line, &img, &uuid, true, "$6$");
    }
}

#[test]
fn vmdk_vdi_vhdx_vhd_check_clean_and_boot_like_hyper_v_gen2_and_gen1() {
    let _disk = needs();
    let img = test_image(true);
    let work = tempfile::tempdir().unwrap();
    let src = oci_source(&img, &work.path().join("oci"));
    let odd = work.path().join("odd@@0:name");
    std::fs::create_dir_all(&odd).unwrap();
    for (ext, name, made) in [
        ("vmdk", "vmdk", Made::Bios),
        ("vdi", "vdi", Made::Hybrid),
        ("vhdx", "vhdx", Made::Uefi),
        ("vhd", "vpc", Made::Hybrid),
    ] {
        // A folder name the tools would misread (mtools splits at `@@`, qemu-img takes `x:`
        // for a protocol): abox hands them only its own links.
        let disk = odd.join(format!("d.{ext}"));
        let fw = format!("{made:?}").to_ascii_lowercase();
        run_ok(
            abox()
                .args(["disk", &src, "--firmware", &fw, "-o"])
                .arg(&disk),
        );
        // A fixed VHD has its footer only at the end: qemu-img is told the format, as
        // Hyper-V and Azure know it from the extension.
        let fmt = if ext == "vhd" { "-f vpc" } else { "" };
        let info = sh(&format!(
            "qemu-img info {fmt} --output json {}",
            disk.display()
        ));
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["format"], name, "{info}");
        if ext == "vhd" {
            // Fixed: the whole disk then the 512-byte footer, the size exact (no CHS rounding).
            let len = std::fs::metadata(&disk).unwrap().len();
            assert_eq!(len, info["virtual-size"].as_u64().unwrap() + 512, "{info}");
            assert_eq!(
                info["virtual-size"].as_u64().unwrap() % (1 << 20),
                0,
                "{info}"
            );
        } else {
            let check = sh(&format!("qemu-img check {} 2>&1", disk.display()));
            assert!(check.contains("No errors were found"), "{ext}: {check}");
        }
        let raw = work.path().join(format!("{ext}.raw"));
        sh(&format!(
            "qemu-img convert {fmt} -O raw {} {}",
            disk.display(),
            raw.display()
        ));
        check_raw(&raw, true, true, made);
    }
    // Hyper-V generation 2: UEFI, the disk on a SCSI controller.
    let line = boot::boot_fw(&odd.join("d.vhdx"), "vhdx", Bus::Scsi, Fw::Uefi);
    assert!(
        line.starts_with(&format!("ABOX-TEST {} ", img.marker)),
        "{line}"
    );
    // The fixed VHD boots on BIOS (Hyper-V generation 1, Azure).
    let line = boot::boot_fw(&odd.join("d.vhd"), "vpc", Bus::Nvme, Fw::Bios);
    assert!(
        line.starts_with(&format!("ABOX-TEST {} ", img.marker)),
        "{line}"
    );
}

#[test]
fn refusals_leave_nothing_behind() {
    let _disk = needs();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    // No kernel.
    let spec =
        ImageSpec::new(&["d bin 0755\nf bin/true 0755 x\nd boot 0755\nf boot/config-1 0644 y\n"]);
    spec.write_oci(&work.path().join("nok"), "x");
    let err = run_err(
        abox()
            .args([
                "disk",
                &format!("oci:{}:x", work.path().join("nok").display()),
                "-o",
            ])
            .arg(out.join("nok.qcow2")),
    );
    assert!(err.contains("no kernel in /boot"), "{err}");
    assert!(err.contains("apk add linux-virt"), "{err}");
    assert_nothing_left(&out, "no kernel");

    // Explicit size too small: refused before anything is written.
    let img = test_image(false);
    let src = oci_source(&img, &work.path().join("oci"));
    let err = run_err(
        abox()
            .args(["disk", &src, "--size", "12M", "-o"])
            .arg(out.join("small.img")),
    );
    assert!(err.contains("--size 12 MiB is too small"), "{err}");
    assert!(err.contains("needs at least"), "{err}");
    assert_nothing_left(&out, "too small");

    // A name abox writes no format for (and none): refused with the list, nothing written.
    for name in ["x.ova", "x.box", "x.iso", "x.tar.gz", "noext"] {
        let err = run_err(abox().args(["disk", &src, "-o"]).arg(out.join(name)));
        assert!(
            err.contains(".qcow2, .vmdk, .vdi, .vhdx, .vhd") && err.contains("--format"),
            "{name}: {err}"
        );
        assert_nothing_left(&out, name);
    }

    // A TMPDIR e2fsprogs cannot name ('?' starts its options): refused before any work.
    let q = work.path().join("t?q");
    std::fs::create_dir_all(&q).unwrap();
    let err = run_err(
        abox()
            .env("TMPDIR", &q)
            .args(["disk", &src, "-o"])
            .arg(out.join("q.qcow2")),
    );
    assert!(err.contains("set TMPDIR to a folder without one"), "{err}");
    assert!(!err.contains("writing rootfs"), "refused late: {err}");
    assert_nothing_left(&out, "'?' in TMPDIR");
    assert!(files_in(&q).is_empty() && std::fs::read_dir(&q).unwrap().next().is_none());

    // An unwritable output folder (a read-only mount: root ignores permission bits).
    let ro = work.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    sh(&format!(
        "mount -t tmpfs -o ro,size=1m abox-test-ro {}",
        ro.display()
    ));
    let o = abox()
        .args(["disk", &src, "-o"])
        .arg(ro.join("d.qcow2"))
        .output()
        .unwrap();
    sh(&format!("umount {}", ro.display()));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write in the output folder"), "{err}");
    assert_nothing_left(&ro, "read-only folder");

    // Missing tools and loader parts name the package to install.
    let err = run_err(
        abox()
            .env("PATH", "/nonexistent")
            .args(["disk", &src, "-o"])
            .arg(out.join("p.qcow2")),
    );
    assert!(err.contains("install the `mtools` package"), "{err}");
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for t in ["mmd", "mcopy", "mke2fs", "qemu-img"] {
        let p = sh(&format!("command -v {t}"));
        std::os::unix::fs::symlink(p.trim(), bin.join(t)).unwrap();
    }
    let err = run_err(
        abox()
            .env("PATH", &bin)
            .args(["disk", &src, "-o"])
            .arg(out.join("p.qcow2")),
    );
    assert!(err.contains("install the `syslinux` package"), "{err}");
    std::fs::remove_file(bin.join("mke2fs")).unwrap();
    std::fs::write(
        bin.join("mke2fs"),
        "#!/bin/sh\necho 'mke2fs 1.47.0 (5-Feb-2023)' >&2\n",
    )
    .unwrap();
    sh(&format!("chmod 755 {}", bin.join("mke2fs").display()));
    let err = run_err(
        abox()
            .env("PATH", &bin)
            .args(["disk", &src, "--firmware", "uefi", "-o"])
            .arg(out.join("p.qcow2")),
    );
    assert!(err.contains("mke2fs is 1.47.0"), "{err}");
    assert!(err.contains("bookworm-backports"), "{err}");
    assert_nothing_left(&out, "missing tools");
    let err = run_err(
        abox()
            .env("ABOX_SYSTEMD_BOOT_EFI", "/nonexistent/systemd-bootx64.efi")
            .args(["disk", &src, "--firmware", "uefi", "-o"])
            .arg(out.join("p.qcow2")),
    );
    assert!(err.contains("/nonexistent/systemd-bootx64.efi"), "{err}");
    assert_nothing_left(&out, "missing systemd-boot");

    // A kernel without the EFI stub: no UEFI loader can start it; BIOS alone can.
    let spec = ImageSpec::new(&[
        "d bin 0755\nf bin/true 0755 x\nd boot 0755\nf boot/vmlinuz-1 0644 not-a-pe-kernel\n",
    ]);
    spec.write_oci(&work.path().join("nostub"), "x");
    let nostub = format!("oci:{}:x", work.path().join("nostub").display());
    let err = run_err(
        abox()
            .args(["disk", &nostub, "-o"])
            .arg(out.join("s.qcow2")),
    );
    assert!(err.contains("no EFI stub"), "{err}");
    assert!(err.contains("--firmware bios"), "{err}");
    assert_nothing_left(&out, "no EFI stub");
    run_ok(
        abox()
            .args(["disk", &nostub, "--firmware", "bios", "-o"])
            .arg(out.join("s.img")),
    );
    std::fs::remove_file(out.join("s.img")).unwrap();

    let empty = work.path().join("no-syslinux");
    std::fs::create_dir_all(&empty).unwrap();
    let err = run_err(
        abox()
            .env("ABOX_SYSLINUX_DIR", &empty)
            .args(["disk", &src, "--table", "mbr", "-o"])
            .arg(out.join("p.qcow2")),
    );
    assert!(err.contains("mbr.bin was not found"), "{err}");
    assert!(
        err.contains("install the `syslinux-common` package"),
        "{err}"
    );
    assert_nothing_left(&out, "missing syslinux");

    // A format the name contradicts.
    let err = run_err(
        abox()
            .args(["disk", &src, "--format", "raw", "-o"])
            .arg(out.join("x.vdi")),
    );
    assert!(err.contains("looks like a vdi file"), "{err}");
    assert_nothing_left(&out, "format mismatch");

    // An existing folder as -o: the disk goes into it under its default name.
    let o = run_ok(abox().args(["disk", &src, "-o"]).arg(&out));
    let printed = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(files_in(&out), vec![std::path::PathBuf::from(&printed)]);
    assert!(printed.ends_with(".qcow2"), "{printed}");
    std::fs::remove_file(&printed).unwrap();
}

#[test]
fn sigint_during_the_copy_leaves_no_file() {
    let _disk = needs();
    let work = tempfile::tempdir().unwrap();
    // Enough content that the copy lasts a while: 160 files of 2 MiB.
    let chunk = work.path().join("chunk");
    std::fs::write(&chunk, common::noise("chunk", 2 << 20)).unwrap();
    let mut desc = format!(
        "d boot 0755\nH boot/vmlinuz-x 0644 {}\nd data 0755\n",
        boot::kernel_file().display()
    );
    for i in 0..160 {
        desc.push_str(&format!("H data/f{i} 0644 {}\n", chunk.display()));
    }
    let spec = ImageSpec::new(&[&desc]);
    spec.write_oci(&work.path().join("oci"), "big");
    let out = work.path().join("out");
    let mut child = abox()
        .args([
            "disk",
            &format!("oci:{}:big", work.path().join("oci").display()),
            "-o",
        ])
        .arg(out.join("big.qcow2"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the copy to start (plain progress prints one line per phase event).
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.starts_with("writing rootfs: started") {
                let _ = tx.send(None);
            }
            all.push_str(&line);
            all.push('\n');
        }
        let _ = tx.send(Some(all));
    });
    let started = Instant::now();
    match rx.recv_timeout(Duration::from_secs(120)).unwrap() {
        None => {}
        Some(all) => panic!("abox ended before the copy: {all}"),
    }
    // Mid-copy: mke2fs reads the rootfs from abox.
    let kids = sh(&format!("ps -o comm= --ppid {} || true", child.id()));
    assert!(kids.contains("mke2fs"), "{kids}");
    sh(&format!("kill -INT {}", child.id()));
    let status = child.wait().unwrap();
    let all = rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    assert_eq!(status.code(), Some(130), "{all}");
    // The signal is the news, not what it cut short.
    assert!(all.lines().any(|l| l == "error: interrupted"), "{all}");
    assert!(
        !all.contains("; boots /"),
        "the copy finished before the signal ({:?}); make the image bigger: {all}",
        started.elapsed()
    );
    assert_nothing_left(&out, "SIGINT");
}

#[test]
fn all_writes_a_bootable_disk_for_a_recipe_with_a_kernel() {
    let _disk = needs();
    let _l = common::engine::engine_lock();
    let standin = common::engine::standin();
    let work = tempfile::tempdir().unwrap();
    let recipe = work.path().join("recipes/vm");
    std::fs::create_dir_all(&recipe).unwrap();
    let marker = format!("all-{}-{}", std::process::id(), rand_suffix());
    std::fs::copy(boot::kernel_file(), recipe.join("vmlinuz")).unwrap();
    std::fs::write(recipe.join("init"), INIT).unwrap();
    std::fs::write(recipe.join("marker"), &marker).unwrap();
    std::fs::write(
        recipe.join("Dockerfile"),
        "ARG ALPINE_VERSION=3.20.3\nARG BASE_IMAGE=alpine:3\nFROM ${BASE_IMAGE}\n\
         COPY vmlinuz /boot/vmlinuz-virt\nCOPY init /tmp/init\n\
         COPY marker /etc/abox-marker\n\
         RUN chmod 755 /tmp/init && mv /tmp/init /sbin/init && echo 'root:*:1:0:::::' > /etc/shadow && echo same-inode > /etc/hardlink\n",
    )
    .unwrap();
    let prefix = "abox-test-alldisk";
    let out = work.path().join("out");
    let o = abox()
        .args(["all", "--dir"])
        .arg(work.path().join("recipes"))
        .args(["--base-image", standin, "--registry", prefix, "-o"])
        .arg(&out)
        .output()
        .unwrap();
    common::engine::rmi(&[format!("{prefix}/vm:3.20.3"), format!("{prefix}/vm:latest")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let disk = out.join("vm/vm.qcow2");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&disk.display().to_string()),
        "{o:?}"
    );
    let line = boot::boot(&disk, "qcow2", Bus::Nvme);
    assert!(
        line.starts_with(&format!(
            "ABOX-TEST {marker} extra=0 dockerenv=no fstab=UUID="
        )),
        "{line}"
    );
    assert!(line.ends_with(" pw=* hl=same-inode"), "{line}");
}

/// The real base recipe has no kernel (it is a container image). Built on the stand-in whose
/// `linux-virt` holds Debian's cloud kernel, `abox disk` adds the thin VM layer through
/// BuildKit, and the disk carries the VM's OpenRC set-up: busybox init boots it with the
/// VM-fixed inittab, the stand-in `openrc` prints each runlevel's services, and a getty
/// answers on the serial port.
#[test]
fn vm_layer_gives_the_base_recipe_a_kernel_and_its_openrc_setup_boots() {
    let _disk = needs();
    let _l = common::engine::engine_lock();
    let tags = common::engine::base_on_standin("abox-test-vmlayer", "vm");
    let image = tags[0].clone();
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("base.qcow2");
    let o = run_ok(
        abox()
            .args(["disk", &format!("docker:{image}"), "-o"])
            .arg(&disk)
            .args(["--progress", "plain"]),
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("VM layer"), "{stderr}");

    // The layer: what it asked apk for, mkinitfs configured first; the image itself untouched.
    assert_eq!(
        common::engine::in_image(
            &tags[2],
            "tail -n1 /var/lib/abox-standin/apk.log; cat /etc/mkinitfs/mkinitfs.conf"
        ),
        "add --no-cache linux-virt mkinitfs syslinux\nfeatures=\"ata base ide scsi usb virtio nvme ext4\"\n"
    );
    assert_eq!(
        common::engine::in_image(&image, "ls /boot 2>/dev/null | wc -l").trim(),
        "0"
    );

    // The disk's files: the VM table applied to the Alpine-shaped files the stand-in installed.
    let raw = work.path().join("base.raw");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        disk.display(),
        raw.display()
    ));
    let part = work.path().join("root.ext4");
    boot::extract_partition(&raw, &part);
    {
        let m = boot::Mounted::new(&part);
        let tree = common::read_dir_tree(m.path());
        let l = |level: &'static str, svc: &'static str| (level, svc);
        common::assert_openrc_setup(
            &tree,
            "",
            "vm",
            &[
                l("default", "sshd"),
                l("default", "chronyd"),
                l("sysinit", "devfs"),
                l("sysinit", "dmesg"),
                l("sysinit", "mdev"),
                l("sysinit", "hwdrivers"),
                l("boot", "bootmisc"),
                l("boot", "hostname"),
                l("boot", "hwclock"),
                l("boot", "modules"),
                l("boot", "networking"),
                l("boot", "swap"),
                l("boot", "sysctl"),
                l("boot", "seedrng"),
                l("boot", "syslog"),
                l("boot", "abox-growroot"),
                l("shutdown", "killprocs"),
                l("shutdown", "mount-ro"),
                l("shutdown", "savecache"),
            ],
        );
        let ifaces = std::fs::read_to_string(m.path().join("etc/network/interfaces")).unwrap();
        assert!(
            ifaces.contains("auto eth0\niface eth0 inet dhcp\n"),
            "{ifaces}"
        );
        for f in ["etc/init.d/abox-growroot", "usr/lib/alpine-boxes/growroot"] {
            assert_eq!(tree[f].mode, 0o755, "{f}");
        }
    }
    let esp = work.path().join("esp.fat");
    boot::extract_esp(&raw, &esp);
    assert!(!boot::fat_cat(&esp, "vmlinuz-virt").is_empty());
    drop(raw);

    // Booted: busybox init runs the VM inittab.
    let log = boot::boot_until(&disk, "qcow2", Bus::Nvme, &|t| t.contains(" login: "));
    for want in [
        "ABOX-OPENRC sysinit: devfs dmesg hwdrivers mdev",
        "ABOX-OPENRC boot: abox-growroot bootmisc hostname hwclock modules networking seedrng swap sysctl syslog",
        "ABOX-OPENRC default: chronyd sshd",
    ] {
        assert!(
            log.lines().any(|l| l.trim() == want),
            "{want:?} not on the console:\n{log}"
        );
    }
    common::engine::rmi(&tags);
    assert!(boot::abox_mounts().is_empty());
}

/// The test init of the growroot boot: run the VM set-up's growroot script as OpenRC would at
/// boot, then report the root filesystem's size in KiB.
const GROW_INIT: &str = r#"#!/bin/busybox sh
b=/bin/busybox
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
$b mount -t devtmpfs dev /dev
$b mount -t proc proc /proc
$b mount -t sysfs sys /sys
$b mount -o remount,rw /
$b mkdir -p /tmp /run
/usr/lib/alpine-boxes/growroot > /dev/ttyS0 2>&1
echo "ABOX-TEST rc=$? kib=$($b df -k / | $b awk 'NR == 2 { print $2 }')" > /dev/ttyS0
$b sync
$b poweroff -f
"#;

/// First-boot growth, for real: an OpenRC image's disk carries the `abox-growroot` service
/// and its script; run at boot with Debian's growpart, sfdisk, partx, blkid, flock and
/// resize2fs in the image, it changes nothing on a fresh disk, and after `qemu-img resize` it
/// grows the GPT partition and the mounted ext4 to the new end — sgdisk and e2fsck then find
/// the disk clean.
#[test]
fn growroot_grows_the_root_to_an_enlarged_disk_at_boot() {
    let _disk = needs();
    require_tool("growpart");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("init"), GROW_INIT).unwrap();
    let busybox = sh("command -v busybox");
    let v = &boot::kernel().1;
    let mut desc = format!(
        "d bin 0755\nH bin/busybox 0755 {bb}\nd sbin 0755\nH sbin/init 0755 {init}\n\
         d etc 0755\nd dev 0755\nd proc 0555\nd sys 0555\nd tmp 1777\n\
         d boot 0755\nH boot/vmlinuz-{v} 0644 {k}\n",
        bb = busybox.trim(),
        init = d.join("init").display(),
        k = boot::kernel_file().display(),
    );
    for applet in [
        "sh", "awk", "sed", "grep", "cat", "mktemp", "rm", "cp", "readlink", "mknod", "df", "sort",
        "tr", "cut", "head", "tail", "wc", "uname", "dd", "expr", "sleep", "mv",
    ] {
        desc.push_str(&format!("l bin/{applet} -> busybox\n"));
    }
    desc.push_str(&boot::host_programs(&[
        "growpart",
        "sfdisk",
        "partx",
        "blkid",
        "flock",
        "resize2fs",
    ]));
    let mut spec = common::openrc_image("");
    spec.layers.push(common::layer(&desc));
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("oci");
    spec.write_oci(&lay, "grow");
    let disk = work.path().join("grow.img");
    run_ok(
        abox()
            .args([
                "disk",
                &format!("oci:{}:grow", lay.display()),
                "--format",
                "raw",
                "-o",
            ])
            .arg(&disk),
    );
    let parse = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {line}"))
            .parse()
            .unwrap()
    };

    let first = boot::boot(&disk, "raw", Bus::Nvme);
    assert_eq!(parse(&first, "rc="), 0, "{first}");
    let before = parse(&first, "kib=");

    let grow = 256u64 << 20;
    sh(&format!(
        "qemu-img resize -q -f raw {} +{grow}",
        disk.display()
    ));
    let log = boot::boot_until(&disk, "raw", Bus::Nvme, &|t| t.contains("ABOX-TEST "));
    let second = log.lines().find(|l| l.starts_with("ABOX-TEST ")).unwrap();
    assert_eq!(parse(second, "rc="), 0, "{log}");
    let after = parse(second, "kib=");
    assert!(
        after >= before + (grow >> 10) * 9 / 10,
        "root grew from {before} KiB to {after} KiB only\n{log}"
    );
    assert!(log.contains("CHANGED"), "growpart's report:\n{log}");

    // The table (backup header at the new end) and the filesystem are clean.
    let v = sh(&format!("sgdisk -v {} 2>&1 || true", disk.display()));
    assert!(v.contains("No problems found"), "{v}");
    let part = work.path().join("root.ext4");
    boot::extract_partition(&disk, &part);
    let fsck = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    assert!(boot::abox_mounts().is_empty());
}

/// `abox export --lxd-vm`: the LXD/Incus virtual-machine image pair. LXD imports it as a
/// virtual-machine image under the fingerprint abox printed, with Secure Boot not required;
/// launching needs KVM, which this machine cannot offer, so the same qcow2 is booted under
/// QEMU + OVMF instead.
#[test]
fn lxd_vm_image_imports_as_a_virtual_machine_and_its_disk_boots_on_uefi() {
    let _disk = needs();
    require_lxd();
    let img = test_image(false);
    let work = tempfile::tempdir().unwrap();
    let src = oci_source(&img, &work.path().join("oci"));
    let out = work.path().join("out");
    let o = run_ok(
        abox()
            .args(["export", &src, "--lxd-vm", "--name", "vm", "-o"])
            .arg(&out),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    let fp = err
        .split("(fingerprint ")
        .nth(1)
        .and_then(|r| r.get(..64))
        .unwrap_or_else(|| panic!("no fingerprint printed: {err}"))
        .to_string();
    let meta = out.join("vm.lxd-vm-meta.tar.gz");
    let disk = out.join("vm.lxd-vm.qcow2");
    let yaml = sh(&format!("tar -xzOf {} metadata.yaml", meta.display()));
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(v["requirements"]["secureboot"], "false", "{yaml}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let kinds: Vec<&str> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    // Listed by file name.
    assert_eq!(kinds, ["lxd-vm-meta", "lxd-vm"], "{m}");

    let alias = format!("abox-test-vm-{}", std::process::id());
    let imported = sh(&format!(
        "lxc image import {} {} --alias {alias}",
        meta.display(),
        disk.display()
    ));
    let info = Command::new("lxc")
        .args(["image", "info", &alias])
        .output()
        .unwrap();
    let _ = Command::new("lxc")
        .args(["image", "delete", &alias])
        .output();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(imported.contains(&fp), "{imported} vs {fp}");
    assert!(info.contains(&format!("Fingerprint: {fp}")), "{info}");
    assert!(info.contains("Type: virtual-machine"), "{info}");

    let raw = work.path().join("vm.raw");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        disk.display(),
        raw.display()
    ));
    let uuid = check_raw(&raw, true, false, Made::Uefi);
    let line = boot::boot_fw(&disk, "qcow2", Bus::Nvme, Fw::Uefi);
    check_line(&line, &img, &uuid, false, "*");
}

/// Without --size, a sparse disk of an image that grows its root at boot (OpenRC, growpart,
/// resize2fs) has 4 GiB of virtual size for the root to grow into (the GPT's backup at the new
/// end, checked clean by sgdisk), said in a note; --size auto, a raw disk, or an image that
/// cannot grow (named) keep the smallest size.
#[test]
fn sparse_disks_get_room_to_grow_into_by_default() {
    let _disk = needs();
    let v = &boot::kernel().1;
    let kernel = format!(
        "d boot 0755\nH boot/vmlinuz-{v} 0644 {}\n",
        boot::kernel_file().display()
    );
    let tools =
        "d usr/bin 0755\nf usr/bin/growpart 0755 #!/bin/sh\nd sbin 0755\nf sbin/resize2fs 0755 x\n";
    let work = tempfile::tempdir().unwrap();
    let source = |name: &str, growable: bool| {
        let mut spec = common::openrc_image("");
        spec.layers.push(common::layer(&kernel));
        if growable {
            spec.layers.push(common::layer(tools));
        }
        let lay = work.path().join(name);
        spec.write_oci(&lay, "t");
        format!("oci:{}:t", lay.display())
    };
    let grow = source("grow", true);
    let fixed = source("fixed", false);
    let make = |src: &str, file: &str, extra: &[&str]| -> (u64, String) {
        let disk = work.path().join(file);
        let o = run_ok(abox().args(["disk", src, "-o"]).arg(&disk).args(extra));
        let info = sh(&format!("qemu-img info --output json {}", disk.display()));
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        let size = info["virtual-size"].as_u64().unwrap();
        (size, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (size, err) = make(&grow, "grow.qcow2", &[]);
    assert_eq!(size, 4 << 30, "{err}");
    assert!(err.contains("virtual size is 4.0 GiB"), "{err}");
    let raw = work.path().join("grow.raw");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        work.path().join("grow.qcow2").display(),
        raw.display()
    ));
    let verify = sh(&format!("sgdisk -v {} 2>&1", raw.display()));
    assert!(verify.contains("No problems found"), "{verify}");
    std::fs::remove_file(&raw).unwrap();
    for (src, file, extra, needle) in [
        (&grow, "auto.vdi", &["--size", "auto"][..], ""),
        (&grow, "tight.img", &[][..], ""),
        (
            &fixed,
            "fixed.vmdk",
            &[][..],
            "no growpart (cloud-utils-growpart), no resize2fs",
        ),
    ] {
        let (size, err) = make(src, file, extra);
        assert!(size < 1 << 30, "{file}: {size}");
        assert!(err.contains(needle), "{file}: {err}");
        assert!(!err.contains("virtual size is"), "{file}: {err}");
    }
}

/// What the VM set-up adds below a symlink the image has (its own /etc/modules-load.d pointing
/// elsewhere; no device manager, so the driver list is wanted) is left out and said: the disk
/// is written, nothing through the link.
#[test]
fn vm_setup_never_writes_through_an_image_symlink() {
    let _disk = needs();
    let v = &boot::kernel().1;
    let mut spec = common::openrc_image("");
    spec.layers.push(common::layer(&format!(
        "d boot 0755\nH boot/vmlinuz-{v} 0644 {}\n\
         d lib/modules/{v}/kernel/drivers/net 0755\n\
         f lib/modules/{v}/kernel/drivers/net/virtio_net.ko 0644 module\n\
         l etc/modules-load.d -> /tmp\nw etc/init.d/mdev\n",
        boot::kernel_file().display()
    )));
    let work = tempfile::tempdir().unwrap();
    let lay = work.path().join("oci");
    spec.write_oci(&lay, "t");
    let disk = work.path().join("d.img");
    let o = run_ok(
        abox()
            .args(["disk", &format!("oci:{}:t", lay.display()), "-o"])
            .arg(&disk),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "/etc/modules-load.d/abox-vm.conf not written: /etc/modules-load.d is not a folder"
        ),
        "{err}"
    );
    let uuid_root = work.path().join("root");
    boot::extract_partition(&disk, &uuid_root);
    let link = boot::debugfs(&uuid_root, "stat /etc/modules-load.d");
    assert!(link.contains("Type: symlink"), "{link}");
}
