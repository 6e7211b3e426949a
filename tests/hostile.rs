//! Hostile images must never reach the host (issue "A hostile image must never reach the
//! host"): each test builds, in code, a small image carrying one kind of attack and runs it
//! through every command it applies to, asserting the exit code and message, that a decoy file
//! outside the output is untouched (hashed before and after), that no host device was written,
//! and that nothing is left behind (loop devices, mounts, files). Needs root (the disk path)
//! and fails without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::boot::{assert_nothing_left, debugfs, extract_partition, fat_cat};
use common::{
    abox, files_in, require_root, require_tool, run_err, run_ok, sh, sha256_hex, ImageSpec,
};

/// Disk tests check that no loop device or mount of abox's is left: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    for t in ["syslinux", "mtype", "debugfs", "mke2fs"] {
        require_tool(t);
    }
    g
}

/// A bootable-looking image: a kernel file is enough for abox to write a disk (nothing here
/// boots it). The "kernel" is a PE image (systemd's EFI stub), as a UEFI loader wants.
const KERNELED: &str = "d bin 0755\nf bin/sh 0755 x\nd boot 0755\nH boot/vmlinuz 0644 /usr/lib/systemd/boot/efi/linuxx64.efi.stub\nd etc 0755\nf etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\n\n";

/// `abox export SRC` with every target, into `out`.
fn export_all(src: &str, out: &Path) -> Command {
    let mut c = abox();
    c.args([
        "export",
        src,
        "--name",
        "x",
        "--wsl",
        "--wsl-package",
        "--lxd",
        "--lxd-split",
        "--rootfs",
        "-o",
    ])
    .arg(out);
    c
}

fn oci(spec: &ImageSpec, dir: &Path) -> String {
    spec.write_oci(dir, "x");
    format!("oci:{}:x", dir.display())
}

/// A file outside everything abox writes, hashed to prove it was not touched.
struct Decoy {
    path: PathBuf,
    sum: String,
    _dir: tempfile::TempDir,
}

impl Decoy {
    fn new() -> Decoy {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("victim");
        std::fs::write(&path, b"the host's own file\n").unwrap();
        let sum = sha256_hex(&std::fs::read(&path).unwrap());
        Decoy { path, sum, _dir: d }
    }
    fn assert_untouched(&self, what: &str) {
        let now = std::fs::read(&self.path).unwrap_or_default();
        assert_eq!(
            sha256_hex(&now),
            self.sum,
            "{what}: the host file outside was changed"
        );
        let attrs = sh(&format!(
            "lsattr {} 2>/dev/null || true",
            self.path.display()
        ));
        assert!(
            !attrs.split_whitespace().next().unwrap_or("").contains('i'),
            "{what}: made immutable"
        );
    }
}

/// Unmounts its folder however the test ends.
struct Umount(PathBuf);

impl Drop for Umount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tmpfs of `size` (mount's spelling, e.g. `3m`) on the folder `dir`, made here.
fn tmpfs(dir: &Path, size: &str) -> Umount {
    std::fs::create_dir_all(dir).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size={size} abox-test-tmpfs {}",
        dir.display()
    ));
    Umount(dir.to_path_buf())
}

/// The raw disk's root filesystem, extracted to a file for debugfs.
fn root_fs(disk: &Path, work: &Path) -> PathBuf {
    let fs = work.join("root.ext4");
    extract_partition(disk, &fs);
    fs
}

#[test]
fn owner_ids_beyond_32_bits_are_refused_for_every_target() {
    let _g = serial();
    for id in [
        "4294967296",
        "4294967295",
        "18446744073709551615",
        "99999999999999999999999",
    ] {
        for key in ["uid", "gid"] {
            let work = tempfile::tempdir().unwrap();
            let out = work.path().join("out");
            std::fs::create_dir_all(&out).unwrap();
            let spec = ImageSpec::new(&[&format!(
                "{KERNELED}f bin/su 4755 setuid-root-if-cut\nP {key} {id}\n"
            )]);
            let src = oci(&spec, &work.path().join("img"));
            let o = export_all(&src, &out).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{key} {id}: {err}");
            assert!(err.contains("bin/su"), "{key} {id}: names the entry: {err}");
            assert!(
                err.contains("beyond the 32-bit ids") || err.contains("is not a number"),
                "{key} {id}: {err}"
            );
            assert_nothing_left(&out, &format!("export, {key} {id}"));
            let err = run_err(abox().args(["disk", &src, "-o"]).arg(out.join("d.img")));
            assert!(err.contains("bin/su"), "disk, {key} {id}: {err}");
            assert_nothing_left(&out, &format!("disk, {key} {id}"));
        }
    }
    // The largest real id passes and is kept.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let spec = ImageSpec::new(&[&format!("{KERNELED}f bin/su 4755 x\nP uid 4294967294\n")]);
    let src = oci(&spec, &work.path().join("img"));
    run_ok(
        abox()
            .args(["export", &src, "--rootfs", "--name", "x", "-o"])
            .arg(&out),
    );
    let t = common::read_tar_file(&out.join("x.rootfs.tar"));
    assert_eq!(t["bin/su"].uid, 4294967294);
}

#[test]
fn device_nodes_and_fifos_where_abox_writes_never_reach_the_host() {
    let _g = serial();
    // A real host block device the image names: a loop device over a decoy file.
    let decoy_dir = tempfile::tempdir().unwrap();
    let decoy = decoy_dir.path().join("device.img");
    std::fs::write(&decoy, vec![0u8; 1 << 20]).unwrap();
    let dev = sh(&format!("losetup --find --show {}", decoy.display()));
    let dev = dev.trim().to_string();
    /// Detaches the decoy's loop device however the test ends.
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["--detach", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let rdev = sh(&format!("stat -c '%t %T' {dev}"));
    let mut it = rdev
        .split_whitespace()
        .map(|h| u32::from_str_radix(h, 16).unwrap());
    let (major, minor) = (it.next().unwrap(), it.next().unwrap());
    let before = sha256_hex(&std::fs::read(&decoy).unwrap());

    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, "s3cret-root\n").unwrap();
    let cases = [
        (
            "block device",
            format!("b etc/shadow 0600 {major} {minor}\nb etc/fstab 0644 {major} {minor}\n"),
        ),
        ("fifo", "p etc/shadow 0600\np etc/fstab 0644\n".to_string()),
        (
            "symlink",
            format!("l etc/shadow -> {dev}\nl etc/fstab -> {dev}\n"),
        ),
    ];
    for (what, extra) in &cases {
        let out = work.path().join(format!("out-{}", what.replace(' ', "-")));
        std::fs::create_dir_all(&out).unwrap();
        let spec = ImageSpec::new(&[&format!("{KERNELED}{extra}")]);
        let src = oci(
            &spec,
            &work.path().join(format!("img-{}", what.replace(' ', "-"))),
        );
        let disk = out.join("d.img");
        // Bounded: a FIFO opened for writing would hang abox for ever.
        let mut child = abox()
            .args(["disk", &src, "--root-password-file"])
            .arg(&pw)
            .arg("-o")
            .arg(&disk)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > std::time::Duration::from_secs(180) {
                let _ = child.kill();
                panic!("{what}: abox hung");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(status.success(), "{what}: abox failed");
        assert_eq!(
            sha256_hex(&std::fs::read(&decoy).unwrap()),
            before,
            "{what}: the host device was written"
        );
        // The disk's /etc/shadow and /etc/fstab are regular files with what abox meant.
        let fs = root_fs(&disk, work.path());
        for f in ["/etc/shadow", "/etc/fstab"] {
            let st = debugfs(&fs, &format!("stat {f}"));
            assert!(
                st.contains("Type: regular"),
                "{what}: {f} is not a regular file: {st}"
            );
        }
        let shadow = debugfs(&fs, "cat /etc/shadow");
        assert!(
            shadow.starts_with("root:$6$"),
            "{what}: root's password not set: {shadow}"
        );
        assert!(debugfs(&fs, "cat /etc/fstab").contains("UUID="), "{what}");
        std::fs::remove_file(&disk).unwrap();
        std::fs::remove_file(&fs).unwrap();
        assert_nothing_left(&out, what);
    }
}

#[test]
fn the_esp_never_takes_the_images_links_or_its_loader_files() {
    let _g = serial();
    let decoy = Decoy::new();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let v = decoy.path.display();
    // Links at the files abox and SYSLINUX's installer write on the ESP, absolute and relative,
    // any case (FAT ignores it): FAT holds no links, so they are left out and the files are
    // abox's own.
    let spec = ImageSpec::new(&[&format!(
        "{KERNELED}d boot/syslinux 0755\nl boot/syslinux/ldlinux.sys -> {v}\n\
         l boot/syslinux/ldlinux.c32 -> ../../../../../../..{v}\nl boot/syslinux/syslinux.cfg -> {v}\n\
         d boot/efi 0755\nd boot/efi/boot 0755\nl boot/efi/boot/bootx64.efi -> {v}\n\
         d boot/loader 0755\nf boot/loader/loader.conf 0644 default evil.conf\n"
    )]);
    let src = oci(&spec, &work.path().join("links"));
    let disk = out.join("d.img");
    let o = run_ok(abox().args(["disk", &src, "-o"]).arg(&disk));
    decoy.assert_untouched("links at the ESP's files");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/boot/efi/boot/bootx64.efi"), "{err}");
    let esp = work.path().join("esp.fat");
    common::boot::extract_esp(&disk, &esp);
    assert_eq!(
        fat_cat(&esp, "EFI/BOOT/BOOTX64.EFI"),
        std::fs::read("/usr/lib/systemd/boot/efi/systemd-bootx64.efi").unwrap()
    );
    assert!(
        String::from_utf8_lossy(&fat_cat(&esp, "loader/loader.conf")).contains("default abox.conf")
    );
    // SYSLINUX's own (hidden, system) file, not the link.
    assert!(fat_cat(&esp, "syslinux/ldlinux.sys").len() > 10_000);
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(&esp).unwrap();
    assert_nothing_left(&out, "links at the ESP's files");

    // /boot itself a link to a host folder: refused, nothing written there.
    let host_dir = decoy.path.parent().unwrap().display().to_string();
    let spec = ImageSpec::new(&[&format!(
        "d bin 0755\nf bin/sh 0755 x\nd kernel 0755\nf kernel/vmlinuz 0644 k\nl boot -> {host_dir}\n"
    )]);
    let src = oci(&spec, &work.path().join("bootlink"));
    let before: Vec<_> = files_in(decoy.path.parent().unwrap());
    let o = abox()
        .args(["disk", &src, "-o"])
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        files_in(decoy.path.parent().unwrap()),
        before,
        "files appeared in the host folder"
    );
    decoy.assert_untouched("/boot as a link");
    assert_nothing_left(&out, "/boot as a link");
}

/// `/boot` is FAT on a disk: no hard links, no case. An inode with paths on both sides of
/// /boot is written whole on both (the kernel may be a link to a file outside /boot); a second
/// name differing only in case and a folder at a name abox writes are left out, said; a /boot
/// of more entries than abox puts on the ESP is refused.
#[test]
fn boot_entries_fat_cannot_hold_are_copied_whole_or_left_out() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let stub = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
    let spec = ImageSpec::new(&[&format!(
        "d bin 0755\nf bin/sh 0755 x\nd etc 0755\nd usr 0755\nd usr/lib 0755\n\
         H usr/lib/vmlinuz 0644 {stub}\nd boot 0755\nh boot/vmlinuz-virt => usr/lib/vmlinuz\n\
         f boot/config 0644 cfg-content\nh etc/config-copy => boot/config\n\
         h boot/CONFIG => boot/config\nd boot/syslinux 0755\nd boot/syslinux/ldlinux.sys 0755\n"
    )]);
    let src = oci(&spec, &work.path().join("img"));
    let disk = out.join("d.img");
    let o = run_ok(abox().args(["disk", &src, "-o"]).arg(&disk));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/boot/CONFIG"), "{err}");
    assert!(err.contains("/boot/syslinux/ldlinux.sys"), "{err}");
    let esp = work.path().join("esp.fat");
    common::boot::extract_esp(&disk, &esp);
    assert_eq!(fat_cat(&esp, "vmlinuz-virt"), std::fs::read(stub).unwrap());
    assert_eq!(fat_cat(&esp, "config"), b"cfg-content");
    assert!(
        fat_cat(&esp, "syslinux/ldlinux.sys").len() > 10_000,
        "SYSLINUX's own file"
    );
    let fs = root_fs(&disk, work.path());
    assert_eq!(
        debugfs(&fs, "cat /etc/config-copy").as_bytes(),
        b"cfg-content"
    );
    assert!(debugfs(&fs, "stat /usr/lib/vmlinuz").contains("Type: regular"));
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(&fs).unwrap();
    assert_nothing_left(&out, "cross links");

    let mut many = String::from(KERNELED);
    for i in 0..1100 {
        many.push_str(&format!("f boot/f{i} 0644 x\n"));
    }
    let src = oci(&ImageSpec::new(&[&many]), &work.path().join("many"));
    let err = run_err(abox().args(["disk", &src, "-o"]).arg(&disk));
    assert!(err.contains("/boot holds 1101 entries"), "{err}");
    assert!(err.contains("at most 1024 entries"), "{err}");
    assert_nothing_left(&out, "a huge /boot");
}

#[test]
fn artifacts_are_private_and_the_lists_readable() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let spec = ImageSpec::new(&[&format!(
        "{KERNELED}f etc/shadow 0640 root:$6$salt$hash:1::::::\\n\n"
    )]);
    let src = oci(&spec, &work.path().join("img"));
    run_ok(&mut export_all(&src, &out));
    let disk_out = work.path().join("disk");
    std::fs::create_dir_all(&disk_out).unwrap();
    run_ok(
        abox()
            .args(["disk", &src, "-o"])
            .arg(disk_out.join("x.qcow2")),
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for f in files_in(&out).into_iter().chain(files_in(&disk_out)) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let want = if name == "SHA256SUMS" || name == "manifest.json" {
            0o644
        } else {
            0o600
        };
        assert_eq!(mode(&f), want, "{name}");
    }
}

#[test]
fn a_file_a_target_rewrites_is_never_passed_through_unchanged() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    // 17 MiB of /etc/shadow: over the in-memory rewrite limit of the .wsl package's hash strip.
    let spec = ImageSpec::new(&[&format!("{KERNELED}F etc/shadow 0640 17825792\n")]);
    let src = oci(&spec, &work.path().join("img"));
    let err = run_err(
        abox()
            .args(["export", &src, "--wsl-package", "-o"])
            .arg(&out),
    );
    assert!(err.contains("/etc/shadow is 17825792 bytes"), "{err}");
    assert!(err.contains("will not pass it through unchanged"), "{err}");
    assert_eq!(files_in(&out), Vec::<PathBuf>::new());
    // And on a disk that must set root's password.
    let pw = work.path().join("pw");
    std::fs::write(&pw, "pw\n").unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let err = run_err(
        abox()
            .args(["disk", &src, "--root-password-file"])
            .arg(&pw)
            .arg("-o")
            .arg(out.join("d.img")),
    );
    assert!(err.contains("/etc/shadow is 17825792 bytes"), "{err}");
    assert_nothing_left(&out, "big shadow on a disk");
}

/// Every `$6$…`-style hash in a (gzip) tar's bytes.
fn hashes_in(tar_gz: &Path) -> usize {
    let out = sh(&format!(
        "zcat {} | grep -a -o '\\$6\\$[A-Za-z0-9./]*\\$' | wc -l",
        tar_gz.display()
    ));
    out.trim().parse().unwrap()
}

#[test]
fn no_password_hash_survives_in_the_wsl_package() {
    let _g = serial();
    let h = "$6$saltsalt$0123456789abcdefABCDEF";
    let cases = [
        ("symlink", format!("f etc/real-shadow 0640 root:{h}:1::::::\\n\nl etc/shadow -> real-shadow\n")),
        ("absolute symlink", format!("d srv 0755\nf srv/sh 0640 root:{h}:1::::::\\n\nl etc/shadow -> /srv/sh\n")),
        ("hard link", format!("f etc/shadow.orig 0640 root:{h}:1::::::\\n\nh etc/shadow => etc/shadow.orig\n")),
        ("backup", format!("f etc/shadow 0640 root:*:1::::::\\n\nf etc/shadow- 0640 root:{h}:1::::::\\n\n")),
        ("gshadow", format!("f etc/gshadow 0640 wheel:{h}::root\\n\n")),
        ("etc is a link", format!("d private 0755\nd private/etc 0755\nf private/etc/shadow 0640 root:{h}:1::::::\\n\n")),
    ];
    for (what, extra) in &cases {
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("out");
        let base = if *what == "etc is a link" {
            // /etc itself is a symlink to private/etc.
            "d bin 0755\nf bin/sh 0755 x\nl etc -> private/etc\n".to_string()
        } else {
            "d bin 0755\nf bin/sh 0755 x\nd etc 0755\nf etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\n\n".to_string()
        };
        let spec = ImageSpec::new(&[&format!("{base}{extra}")]);
        let src = oci(&spec, &work.path().join("img"));
        run_ok(
            abox()
                .args([
                    "export",
                    &src,
                    "--name",
                    "x",
                    "--wsl",
                    "--wsl-package",
                    "-o",
                ])
                .arg(&out),
        );
        assert_eq!(
            hashes_in(&out.join("x.wsl")),
            0,
            "{what}: a hash is in the .wsl package"
        );
        // The plain WSL tarball is the user's own import: the image as it is.
        assert!(
            hashes_in(&out.join("x.rootfs.tar.gz")) > 0,
            "{what}: the test image carries no hash"
        );
    }
}

#[test]
fn root_password_goes_where_the_shadow_link_leads() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let spec = ImageSpec::new(&[&format!(
        "{KERNELED}f etc/real-shadow 0640 root:!:1::::::\\nalpine:*:1::::::\\n\nl etc/shadow -> real-shadow\n"
    )]);
    let src = oci(&spec, &work.path().join("img"));
    let pw = work.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let disk = out.join("d.img");
    run_ok(
        abox()
            .args(["disk", &src, "--root-password-file"])
            .arg(&pw)
            .arg("-o")
            .arg(&disk),
    );
    let fs = root_fs(&disk, work.path());
    let st = debugfs(&fs, "stat /etc/shadow");
    assert!(
        st.contains("Type: symlink"),
        "the image's link is kept: {st}"
    );
    let real = debugfs(&fs, "cat /etc/real-shadow");
    assert!(
        real.starts_with("root:$6$"),
        "root's password set where the link leads: {real}"
    );
    assert!(real.contains("alpine:*:"), "other accounts kept: {real}");
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(&fs).unwrap();

    // /etc/shadow leading into /boot: that is the FAT ESP on a disk (no permissions), so the
    // hashes would be world-readable in the VM: refused, with or without a password to set.
    let spec = ImageSpec::new(&[&format!(
        "{KERNELED}f boot/shadow 0600 root:$6$salt$hash:1::::::\\n\nl etc/shadow -> ../boot/shadow\n"
    )]);
    let src = oci(&spec, &work.path().join("esp-shadow"));
    for extra in [
        &["--root-password-file", &pw.display().to_string()][..],
        &[][..],
    ] {
        let err = run_err(abox().args(["disk", &src]).args(extra).arg("-o").arg(&disk));
        assert!(
            err.contains("keeps /etc/shadow's content in /boot/shadow"),
            "{err}"
        );
        assert_nothing_left(&out, "shadow on the ESP");
    }
}

#[test]
fn a_full_disk_is_an_error_not_a_panic() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let full = work.path().join("full");
    // 3 MiB of room for ~24 MiB of incompressible content, written by two gzip targets at once.
    let _u = tmpfs(&full, "3m");
    let spec = ImageSpec::new(&["d data 0755\nF data/a 0644 12582912\nF data/b 0644 12582912\n"]);
    let src = oci(&spec, &work.path().join("img"));
    let o = abox()
        .args(["export", &src, "--name", "x", "--wsl", "--lxd", "-o"])
        .arg(&full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.to_lowercase().contains("no space left"), "{err}");
    // Which folder, how much it has, what to do.
    assert!(
        err.contains(&format!(
            "the output folder {} ran out of room while writing (it has 3 MiB free again",
            full.display()
        )) && err.contains("make room or choose another place with -o"),
        "{err}"
    );
    assert_eq!(
        files_in(&full),
        Vec::<PathBuf>::new(),
        "half-written files left"
    );
}

#[test]
fn a_context_file_that_changes_while_it_streams_is_named() {
    let _g = serial();
    common::engine::require_docker();
    let project = tempfile::tempdir().unwrap();
    let dir = project.path().join("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY . /ctx/\n",
    )
    .unwrap();
    // A file whose size says 0 while reading yields bytes: /proc/version bound over it, the way
    // a log being appended to looks to a reader that trusted its size.
    let grows = dir.join("grows.log");
    std::fs::write(&grows, "").unwrap();
    std::fs::write(dir.join("zz-after"), "a later file").unwrap();
    sh(&format!("mount --bind /proc/version {}", grows.display()));
    let _u = Umount(grows.clone());
    let o = abox()
        .args(["build", "--dir"])
        .arg(project.path())
        .args([
            "--base-image",
            common::engine::standin(),
            "--registry",
            "abox-test-ctx",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{} changed as we read it", grows.display())),
        "{err}"
    );
    assert!(!common::engine::image_exists("abox-test-ctx/ctx:latest"));
}

#[test]
fn claims_out_of_proportion_and_too_little_room_are_refused_before_writing() {
    let _g = serial();
    require_tool("tar");
    let work = tempfile::tempdir().unwrap();
    // GNU tar's sparse member: 1 TiB claimed, nothing stored.
    let src_dir = work.path().join("sparse");
    std::fs::create_dir_all(src_dir.join("data")).unwrap();
    sh(&format!(
        "truncate -s 1T {0}/data/huge && tar --format=gnu --sparse -C {0} -cf {1}/sparse.tar data",
        src_dir.display(),
        work.path().display()
    ));
    let mut spec = ImageSpec::new(&[KERNELED]);
    spec.layers
        .push(std::fs::read(work.path().join("sparse.tar")).unwrap());
    let src = oci(&spec, &work.path().join("img"));
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let err = run_err(
        abox()
            .args(["export", &src, "--wsl", "--rootfs", "-o"])
            .arg(&out),
    );
    assert!(
        err.contains("data/huge: a sparse file claiming 1099511627776 bytes"),
        "{err}"
    );
    assert!(err.contains("out of proportion"), "{err}");
    assert_nothing_left(&out, "sparse export");
    let err = run_err(abox().args(["disk", &src, "-o"]).arg(out.join("d.img")));
    assert!(err.contains("out of proportion"), "{err}");
    assert_nothing_left(&out, "sparse disk");

    // A disk larger than the room where it goes: refused before a byte is written.
    let small = work.path().join("small");
    let _u = tmpfs(&small, "8m");
    let spec = ImageSpec::new(&[&format!("{KERNELED}d data 0755\nF data/x 0644 20971520\n")]);
    let src = oci(&spec, &work.path().join("img2"));
    let err = run_err(abox().args(["disk", &src, "-o"]).arg(small.join("d.qcow2")));
    assert!(err.contains("the disk needs about"), "{err}");
    assert!(err.contains("free: make room"), "{err}");
    assert_nothing_left(&small, "no room");
    let err = run_err(abox().args(["export", &src, "--rootfs", "-o"]).arg(&small));
    assert!(err.contains("the rootfs tar needs about"), "{err}");
    assert_nothing_left(&small, "no room for the rootfs tar");
}

/// An image whose copy onto a disk lasts a while (160 files of 2 MiB), as `oci:DIR:big`.
fn big_image(work: &Path) -> String {
    let chunk = work.join("chunk");
    std::fs::write(&chunk, common::noise("chunk", 2 << 20)).unwrap();
    let mut desc = format!("{KERNELED}d data 0755\n");
    for i in 0..160 {
        desc.push_str(&format!("H data/f{i} 0644 {}\n", chunk.display()));
    }
    ImageSpec::new(&[&desc]).write_oci(&work.join("oci"), "big");
    format!("oci:{}:big", work.join("oci").display())
}

/// Start `abox disk SRC -o OUT` and return once it copies the rootfs (a loop device and a mount
/// are held then), with a reader of the rest of its stderr.
fn disk_mid_copy(
    src: &str,
    out: &Path,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<Option<String>>,
) {
    let mut child = abox()
        .args(["disk", src, "-o"])
        .arg(out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("writing rootfs: started") {
                let _ = tx.send(None);
            }
            all.push_str(&line);
            all.push('\n');
        }
        let _ = tx.send(Some(all));
    });
    match rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .unwrap()
    {
        None => {}
        Some(all) => panic!("abox ended before the copy: {all}"),
    }
    // Mid-copy: mke2fs is reading the rootfs from abox.
    let kids = sh(&format!("ps -o comm= --ppid {} || true", child.id()));
    assert!(
        kids.contains("mke2fs"),
        "mid-copy, abox runs mke2fs: {kids}"
    );
    (child, rx)
}

#[test]
fn repeated_ctrl_c_leaves_no_file_and_no_child() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let src = big_image(work.path());
    let out = work.path().join("out");
    let (mut child, rx) = disk_mid_copy(&src, &out.join("big.qcow2"));
    // Three signals at once: the first unwinds, a further one ends abox at once — after
    // removing its temporary files.
    let pid = child.id();
    for _ in 0..3 {
        sh(&format!("kill -INT {pid}"));
    }
    let status = child.wait().unwrap();
    let all = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(130), "{all}");
    assert_nothing_left(&out, "repeated Ctrl-C");
    // mke2fs, its input closed, ends too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sh("pgrep -a mke2fs || true").contains(".big.qcow2") {
        assert!(std::time::Instant::now() < deadline, "mke2fs still running");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn what_a_killed_abox_left_is_released_by_the_next_run() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let src = big_image(work.path());
    let out = work.path().join("out");
    let (mut child, _rx) = disk_mid_copy(&src, &out.join("big.qcow2"));
    let pid = child.id();
    sh(&format!("kill -KILL {pid}"));
    child.wait().unwrap();
    // Left: its temporary files.
    let left: Vec<_> = files_in(&out);
    assert!(
        left.iter()
            .any(|f| f.to_string_lossy().ends_with(&format!(".abox-tmp-{pid}"))),
        "{left:?}"
    );
    // The next run says what it released and succeeds.
    let small = ImageSpec::new(&[KERNELED]);
    let src2 = oci(&small, &work.path().join("small"));
    let o = run_ok(abox().args(["disk", &src2, "-o"]).arg(out.join("next.img")));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("left by an abox that died"), "{err}");
    assert!(err.contains(&format!(".abox-tmp-{pid}")), "{err}");
    // And its folder of links for the tools.
    assert!(err.contains(&format!("abox-disk-{pid}-")), "{err}");
    let tmp = std::env::temp_dir();
    let left = sh(&format!(
        "ls -d {}/abox-disk-{pid}-* 2>/dev/null || true",
        tmp.display()
    ));
    assert!(left.trim().is_empty(), "{left}");
    assert_eq!(files_in(&out), vec![out.join("next.img")]);
}

/// A layer whose first member is an extension header of type `ty` claiming `size` bytes, with
/// only a little of that data behind it (abox must refuse at the header, before reading it).
fn extension_bomb(ty: tar::EntryType, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(ty);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    let mut v = h.as_bytes().to_vec();
    v.extend(std::iter::repeat_n(b'a', 64 * 1024));
    v
}

#[test]
fn extension_members_and_names_are_bounded() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    for (what, ty) in [
        ("GNU long name", tar::EntryType::GNULongName),
        ("GNU long link name", tar::EntryType::GNULongLink),
        ("PAX header", tar::EntryType::XHeader),
    ] {
        let mut spec = ImageSpec::new(&[KERNELED]);
        spec.layers.push(extension_bomb(ty, 1 << 30));
        let src = oci(&spec, &work.path().join(what.replace(' ', "-")));
        let out = work.path().join("out");
        // Peak memory of the refusal, measured by GNU time (KiB, on its last line).
        require_tool("/usr/bin/time");
        let o = Command::new("/usr/bin/time")
            .args(["-f", "%M"])
            .arg(env!("CARGO_BIN_EXE_abox"))
            .args(["--progress", "plain", "export", &src, "--rootfs", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains(&format!("a {what} member of 1073741824 bytes")),
            "{what}: {err}"
        );
        let peak_kib: u64 = err.lines().last().unwrap().trim().parse().unwrap();
        assert!(peak_kib < 128 * 1024, "{what}: peak RSS {peak_kib} KiB");
        assert_eq!(files_in(&out), Vec::<PathBuf>::new());
        let err = run_err(abox().args(["disk", &src, "-o"]).arg(out.join("d.img")));
        assert!(err.contains("1073741824 bytes"), "{what} (disk): {err}");
        assert_nothing_left(&out, what);
    }
    // Names no filesystem takes: a path of 5000 bytes (PAX, well under the member limit) and a
    // 300-byte name; both refused for every target, the disk included.
    let long_path = format!("d deep 0755\nf deep/{} 0644 x\n", "d/".repeat(2500) + "f");
    let long_name = format!("f {} 0644 x\n", "n".repeat(300));
    for (what, desc, msg) in [
        ("long path", long_path, "a path of 5006 bytes"),
        ("long name", long_name, "a name of 300 bytes"),
    ] {
        let spec = ImageSpec::new(&[KERNELED, &desc]);
        let src = oci(&spec, &work.path().join(what.replace(' ', "-")));
        let out = work.path().join("out2");
        let err = run_err(
            abox()
                .args(["export", &src, "--wsl", "--lxd", "-o"])
                .arg(&out),
        );
        assert!(err.contains(msg), "{what}: {err}");
        let err = run_err(abox().args(["disk", &src, "-o"]).arg(out.join("d.img")));
        assert!(err.contains(msg), "{what} (disk): {err}");
        assert_nothing_left(&out, what);
    }
}

#[test]
fn honest_sparse_files_still_pass_the_header_guard() {
    let _g = serial();
    require_tool("tar");
    let work = tempfile::tempdir().unwrap();
    let src_dir = work.path().join("sparse");
    std::fs::create_dir_all(src_dir.join("data")).unwrap();
    // Eight data regions between holes: more than an old-GNU header's four, so extension
    // blocks follow the header.
    let f = src_dir.join("data/holes");
    for i in 0..8 {
        sh(&format!(
            "printf 'region-{i}' | dd of={} bs=1 seek={} conv=notrunc status=none",
            f.display(),
            i * 1_000_000
        ));
    }
    let want = sha256_hex(&std::fs::read(&f).unwrap());
    sh(&format!(
        "tar --format=gnu --sparse -C {0} -cf {1}/sparse.tar data",
        src_dir.display(),
        work.path().display()
    ));
    let mut spec = ImageSpec::new(&[KERNELED]);
    spec.layers
        .push(std::fs::read(work.path().join("sparse.tar")).unwrap());
    let src = oci(&spec, &work.path().join("img"));
    let out = work.path().join("out");
    run_ok(
        abox()
            .args(["export", &src, "--rootfs", "--name", "x", "-o"])
            .arg(&out),
    );
    let t = common::read_tar_file(&out.join("x.rootfs.tar"));
    assert_eq!(t["data/holes"].what, want, "the sparse file's content");
}

/// One raw tar member: a ustar header of type `ty` (GNU magic when `gnu`) and its data, padded.
fn raw_member(name: &str, ty: u8, data: &[u8], gnu: bool) -> Vec<u8> {
    let mut h = if gnu {
        tar::Header::new_gnu()
    } else {
        tar::Header::new_ustar()
    };
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(tar::EntryType::new(ty));
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

/// A PAX record `LEN key=value\n`.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len != body.len() + len.to_string().len() {
        len = body.len() + len.to_string().len();
    }
    format!("{len}{body}").into_bytes()
}

#[test]
fn the_header_guard_reads_a_tar_exactly_as_the_tar_crate_does() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let bomb = extension_bomb(tar::EntryType::GNULongName, 1 << 30);
    // Each prefix tries to make the guard skip the bomb's header while the tar crate reads it.
    let mut two_sizes = pax_record("size", "0");
    two_sizes.extend(pax_record("size", "1536"));
    let mut sparse2 = tar::Header::new_gnu();
    sparse2.as_old_mut().name[..1].copy_from_slice(b"s");
    sparse2.set_entry_type(tar::EntryType::GNUSparse);
    sparse2.set_mode(0o644);
    sparse2.set_uid(0);
    sparse2.set_gid(0);
    sparse2.set_mtime(0);
    sparse2.set_size(0);
    sparse2.as_gnu_mut().unwrap().isextended[0] = 2;
    sparse2.as_gnu_mut().unwrap().realsize = *b"00000000000\0";
    sparse2.set_cksum();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "two PAX size records (the crate takes the first)",
            [
                raw_member("PaxHeaders/f", b'x', &two_sizes, false),
                raw_member("f", b'0', b"", false),
            ]
            .concat(),
        ),
        (
            "a PAX header used up by a global header",
            [
                raw_member("PaxHeaders/g", b'x', &pax_record("size", "1536"), false),
                raw_member("GlobalHead", b'g', &pax_record("comment", "hi"), false),
                raw_member("f", b'0', b"", false),
            ]
            .concat(),
        ),
        (
            "a sparse header whose isextended is 2, not 1",
            sparse2.as_bytes().to_vec(),
        ),
    ];
    for (what, prefix) in cases {
        let mut spec = ImageSpec::new(&[KERNELED]);
        spec.layers.push([prefix, bomb.clone()].concat());
        let src = oci(&spec, &work.path().join(what.replace(' ', "-")));
        let out = work.path().join("out");
        let err = run_err(abox().args(["export", &src, "--rootfs", "-o"]).arg(&out));
        assert!(
            err.contains("a GNU long name member of 1073741824 bytes"),
            "{what}: {err}"
        );
        assert_nothing_left(&out, what);
    }
}

#[test]
fn the_outer_archives_are_guarded_too() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    // A docker-archive and an oci-archive whose first member is a 1 GiB long name.
    for (what, scheme) in [
        ("docker-archive", "docker-archive"),
        ("oci-archive", "oci-archive"),
    ] {
        let path = work.path().join(format!("{what}.tar"));
        std::fs::write(&path, extension_bomb(tar::EntryType::GNULongName, 1 << 30)).unwrap();
        let out = work.path().join("out");
        let err = run_err(
            abox()
                .args([
                    "export",
                    &format!("{scheme}:{}", path.display()),
                    "--rootfs",
                    "-o",
                ])
                .arg(&out),
        );
        assert!(
            err.contains("a GNU long name member of 1073741824 bytes"),
            "{what}: {err}"
        );
        assert_nothing_left(&out, what);
    }
}

#[test]
fn root_password_never_lands_in_a_readable_or_shared_file() {
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // A world-readable /etc/shadow owned by a user: written root's, 0640 at most.
    let spec = ImageSpec::new(&[&format!(
        "{KERNELED}f etc/shadow 0666 root:!:1::::::\\n\nu 1000 100\n"
    )]);
    let src = oci(&spec, &work.path().join("open"));
    let disk = out.join("d.img");
    run_ok(
        abox()
            .args(["disk", &src, "--root-password-file"])
            .arg(&pw)
            .arg("-o")
            .arg(&disk),
    );
    let fs = root_fs(&disk, work.path());
    let st = debugfs(&fs, "stat /etc/shadow");
    assert!(st.contains("Mode:  0640"), "{st}");
    assert!(
        st.contains("User:     0") && st.contains("Group:     0"),
        "{st}"
    );
    assert!(debugfs(&fs, "cat /etc/shadow").starts_with("root:$6$"));
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(&fs).unwrap();
    // /etc/shadow hard-linked to /etc/passwd: refused, nothing written.
    let spec = ImageSpec::new(&[&format!("{KERNELED}h etc/shadow => etc/passwd\n")]);
    let src = oci(&spec, &work.path().join("shared"));
    let err = run_err(
        abox()
            .args(["disk", &src, "--root-password-file"])
            .arg(&pw)
            .arg("-o")
            .arg(&disk),
    );
    assert!(err.contains("shares its file with other names"), "{err}");
    assert_nothing_left(&out, "shadow hard-linked to passwd");
}

/// An output folder is input too. Its `manifest.json` as a FIFO is refused at once (never
/// opened); another tool's is never overwritten; an abox manifest with forged entries (a hash
/// that is not one, a name with a newline or `../`, a duplicate, a hash that does not match the
/// file) lists none of them; two runs into one folder at once both end up listed.
#[test]
fn output_folder_lists_are_never_trusted_blindly() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let src = oci(&ImageSpec::new(&["f a 0644 x"]), &w.join("img"));
    let export = |dir: &Path, extra: &[&str]| {
        std::process::Command::new("timeout")
            .arg("60")
            .arg(env!("CARGO_BIN_EXE_abox"))
            .args(["export", &src, "--name", "r"])
            .args(extra)
            .arg("-o")
            .arg(dir)
            .output()
            .unwrap()
    };
    // A FIFO: an error naming it, at once.
    let fifo = w.join("fifo");
    std::fs::create_dir(&fifo).unwrap();
    sh(&format!("mkfifo {}/manifest.json", fifo.display()));
    let o = export(&fifo, &["--rootfs"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("manifest.json is not a regular file"), "{err}");
    assert_eq!(files_in(&fifo), vec![fifo.join("manifest.json")]);
    // Another tool's manifest: a folder export is refused, a named file is written alone.
    let foreign = w.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("manifest.json"), "{\"name\":\"my-web-app\"}").unwrap();
    std::fs::write(foreign.join("SHA256SUMS"), "abc  ubuntu.iso\n").unwrap();
    let o = export(&foreign, &["--rootfs"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("does not overwrite that one"), "{err}");
    let o = export(&foreign.join("r.tar"), &["--rootfs"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(foreign.join("SHA256SUMS")).unwrap(),
        "abc  ubuntu.iso\n"
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("manifest.json")).unwrap(),
        "{\"name\":\"my-web-app\"}"
    );
    // Forged entries in an abox manifest.
    let forged = w.join("forged");
    assert!(export(&forged, &["--rootfs"]).status.success());
    std::fs::write(forged.join("evil\nbin"), "x").unwrap();
    std::fs::write(forged.join("liar.bin"), "not what is listed").unwrap();
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(forged.join("manifest.json")).unwrap()).unwrap();
    let good = m["artifacts"][0].clone();
    let zeros = "0".repeat(64);
    let entry = |file: &str, sha: &str, size: u64| serde_json::json!({"kind": "disk", "file": file, "size": size, "sha256": sha});
    let list = m["artifacts"].as_array_mut().unwrap();
    list.push(entry(
        "evil.bin",
        &format!("{zeros}  evil.bin\n{zeros}  ../../etc/passwd"),
        1,
    ));
    list.push(entry("evil\nbin", &zeros, 1));
    list.push(entry(
        "../r.rootfs.tar",
        good["sha256"].as_str().unwrap(),
        good["size"].as_u64().unwrap(),
    ));
    list.push(entry("liar.bin", &zeros, 18));
    list.push(good.clone());
    std::fs::write(
        forged.join("manifest.json"),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
    let o = export(&forged, &["--lxd"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sums = std::fs::read_to_string(forged.join("SHA256SUMS")).unwrap();
    let names: Vec<&str> = sums
        .lines()
        .map(|l| l.split_once("  ").unwrap().1)
        .collect();
    assert_eq!(names, ["r.lxd.tar.gz", "r.rootfs.tar"], "{sums}");
    sh(&format!(
        "cd {} && sha256sum -c --quiet SHA256SUMS",
        forged.display()
    ));
    // Two runs at once into one folder: both listed, the two lists agree.
    for i in 0..5 {
        let both = w.join(format!("both{i}"));
        std::fs::create_dir(&both).unwrap();
        let spawn = |t: &str| {
            std::process::Command::new(env!("CARGO_BIN_EXE_abox"))
                .args(["--progress", "none", "export", &src, "--name", "r", t, "-o"])
                .arg(&both)
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (spawn("--rootfs"), spawn("--lxd"));
        assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
        let sums = std::fs::read_to_string(both.join("SHA256SUMS")).unwrap();
        assert_eq!(sums.lines().count(), 2, "run {i}: {sums}");
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(both.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m["artifacts"].as_array().unwrap().len(), 2, "run {i}: {m}");
    }
}
