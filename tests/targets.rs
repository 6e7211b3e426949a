//! WSL and LXD artifacts as files: layout, fix-ups and Microsoft's package rules. No root needed.

mod common;

use common::*;

const IMAGE: &[&str] = &[
    "d etc 0755\n\
     f etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\nalpine:x:1000:1000::/home/alpine:/bin/ash\\n\n\
     f etc/shadow 0640 root:*:19000:0:::::\\nalpine:$6$salt$secrethash:19000:0:99999:7:::\\n\n\
     f etc/resolv.conf 0644 nameserver 10.0.0.1\n\
     d usr/lib 0755\nf usr/lib/os-release 0644 ID=alpine\\nVERSION_ID=3.20.3\\nPRETTY_NAME=\"Alpine Linux v3.20\"\\n\n\
     l etc/os-release -> ../usr/lib/os-release\n\
     d boot 0755\nf boot/vmlinuz-virt 0644 kernel\nf boot/initramfs-virt 0644 initrd\n\
     f .dockerenv 0644 \n\
     f bin/busybox 0755 bb",
];

fn export(dir: &std::path::Path, spec: &ImageSpec, args: &[&str]) -> std::path::PathBuf {
    let lay = dir.join("layout");
    spec.write_oci(&lay, "t");
    let out = dir.join("out");
    run_ok(
        abox()
            .arg("export")
            .arg(format!("oci:{}", lay.display()))
            .args(["--name", "base", "-o"])
            .arg(&out)
            .args(args),
    );
    out
}

#[test]
fn wsl_tarball_logs_in_as_the_image_user() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(dir.path(), &ImageSpec::new(IMAGE), &["--wsl"]);
    let tgz = out.join("base.rootfs.tar.gz");
    let t = read_tar_file(&tgz);
    assert!(
        !t.contains_key("etc/resolv.conf"),
        "WSL writes resolv.conf itself"
    );
    assert!(!t.contains_key(".dockerenv"));
    assert!(t.contains_key("bin/busybox") && t.contains_key("etc/passwd"));
    let (mode, uid, gid, conf) = tar_entry(&tgz, "etc/wsl.conf");
    assert_eq!((mode, uid, gid), (0o644, 0, 0));
    assert!(String::from_utf8(conf)
        .unwrap()
        .contains("[user]\ndefault=alpine\n"));
    // The archive root is the filesystem root: no ./ or folder above etc/.
    assert!(tar_names(&tgz)
        .iter()
        .all(|n| !n.starts_with("./") && !n.starts_with('/')));
}

#[test]
fn wsl_user_flag_and_missing_user() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(
        dir.path(),
        &ImageSpec::new(IMAGE),
        &["--wsl", "--wsl-user", "root"],
    );
    let (_, _, _, conf) = tar_entry(&out.join("base.rootfs.tar.gz"), "etc/wsl.conf");
    assert!(String::from_utf8(conf).unwrap().contains("default=root"));
    let dir = tempfile::tempdir().unwrap();
    let lay = dir.path().join("l");
    ImageSpec::new(IMAGE).write_oci(&lay, "t");
    let err = run_err(
        abox()
            .arg("export")
            .arg(format!("oci:{}", lay.display()))
            .args(["--wsl", "--wsl-user", "ghost", "-o"])
            .arg(dir.path().join("o")),
    );
    assert!(err.contains("no such user"), "{err}");
    assert!(files_in(&dir.path().join("o")).is_empty());
}

#[test]
fn wsl_package_follows_microsofts_rules() {
    let dir = tempfile::tempdir().unwrap();
    let icon = dir.path().join("box.ico");
    let mut ico = vec![0, 0, 1, 0];
    ico.extend(noise("icon", 2000));
    std::fs::write(&icon, &ico).unwrap();
    let out = export(
        dir.path(),
        &ImageSpec::new(IMAGE),
        &["--wsl-package", "--icon", icon.to_str().unwrap()],
    );
    let pkg = out.join("base.wsl");
    let t = read_tar_file(&pkg);
    assert!(!t.contains_key("etc/resolv.conf"));
    assert!(
        !t.keys()
            .any(|k| k.starts_with("boot/vmlinuz") || k.starts_with("boot/initramfs")),
        "no kernel"
    );
    let (_, _, _, shadow) = tar_entry(&pkg, "etc/shadow");
    let shadow = String::from_utf8(shadow).unwrap();
    assert!(!shadow.contains("$6$"), "{shadow}");
    assert!(shadow.contains("alpine:!:19000"));
    let (mode, uid, gid, conf) = tar_entry(&pkg, "etc/wsl-distribution.conf");
    assert_eq!((mode, uid, gid), (0o644, 0, 0));
    let conf = String::from_utf8(conf).unwrap();
    assert!(
        conf.contains("defaultUid = 1000\n") && conf.contains("defaultName = base\n"),
        "{conf}"
    );
    assert!(conf.contains("icon = /usr/lib/wsl/base.ico"), "{conf}");
    assert!(
        !conf.contains("command ="),
        "the image has a user: no OOBE needed\n{conf}"
    );
    let (mode, uid, _, data) = tar_entry(&pkg, "usr/lib/wsl/base.ico");
    assert_eq!((mode, uid), (0o644, 0));
    assert_eq!(data, ico);
}

#[test]
fn wsl_package_without_a_user_creates_one_on_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec::new(&[
        "d etc 0755\nf etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\n\nf bin/sh 0755 x",
    ]);
    let out = export(dir.path(), &spec, &["--wsl-package"]);
    let pkg = out.join("base.wsl");
    let (_, _, _, conf) = tar_entry(&pkg, "etc/wsl-distribution.conf");
    let conf = String::from_utf8(conf).unwrap();
    assert!(
        conf.contains("command = /usr/lib/wsl/oobe.sh\n") && conf.contains("defaultUid = 1000\n"),
        "{conf}"
    );
    let (mode, uid, gid, script) = tar_entry(&pkg, "usr/lib/wsl/oobe.sh");
    assert_eq!((mode, uid, gid), (0o755, 0, 0));
    let script = String::from_utf8(script).unwrap();
    assert!(script.starts_with("#!/bin/sh") && script.contains("adduser -D -u \"$uid\""));
    let names = tar_names(&pkg);
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(
        pos("usr/lib/wsl/") < pos("usr/lib/wsl/oobe.sh"),
        "parents are added first: {names:?}"
    );
    let sh = std::process::Command::new("sh")
        .arg("-n")
        .arg("-c")
        .arg(&script)
        .status()
        .unwrap();
    assert!(sh.success(), "oobe.sh is valid shell");
}

#[test]
fn big_or_wrong_icons_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lay = dir.path().join("l");
    ImageSpec::new(IMAGE).write_oci(&lay, "t");
    let big = dir.path().join("big.ico");
    let mut data = vec![0, 0, 1, 0];
    data.resize((1 << 20) + 1, 7);
    std::fs::write(&big, data).unwrap();
    let png = dir.path().join("x.ico");
    std::fs::write(&png, b"\x89PNG....").unwrap();
    for (icon, needle) in [(&big, "at most"), (&png, "not a Windows .ico")] {
        let err = run_err(
            abox()
                .arg("export")
                .arg(format!("oci:{}", lay.display()))
                .args(["--wsl-package", "--icon"])
                .arg(icon)
                .arg("-o")
                .arg(dir.path().join("o")),
        );
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn lxd_unified_image_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(dir.path(), &ImageSpec::new(IMAGE), &["--lxd"]);
    let img = out.join("base.lxd.tar.gz");
    let names = tar_names(&img);
    assert_eq!(
        names[0], "metadata.yaml",
        "metadata.yaml first, at the archive root"
    );
    assert!(names.contains(&"templates/hostname.tpl".to_string()));
    assert!(names.contains(&"templates/hosts.tpl".to_string()));
    assert!(names.contains(&"rootfs/etc/passwd".to_string()));
    assert!(
        names.iter().all(|n| n == "metadata.yaml"
            || n.starts_with("templates/")
            || n.starts_with("rootfs/")),
        "{names:?}"
    );
    let (_, _, _, meta) = tar_entry(&img, "metadata.yaml");
    let meta: serde_yaml_ng::Value = serde_yaml_ng::from_slice(&meta).unwrap();
    assert_eq!(meta["architecture"], "x86_64", "{meta:?}");
    assert_eq!(
        meta["creation_date"], 1704164645,
        "from the image's created time"
    );
    assert_eq!(
        meta["properties"]["os"], "alpine",
        "os-release through its symlink"
    );
    assert_eq!(meta["properties"]["release"], "3.20.3");
    assert_eq!(
        meta["templates"]["/etc/hostname"]["template"],
        "hostname.tpl"
    );
    // The rootfs keeps what a container needs (resolv.conf is LXD's business) minus .dockerenv.
    assert!(names.contains(&"rootfs/etc/resolv.conf".to_string()));
    assert!(!names.contains(&"rootfs/.dockerenv".to_string()));
}

#[test]
fn lxd_split_image_and_several_targets_at_once() {
    require_tool("tar2sqfs");
    require_tool("unsquashfs");
    let dir = tempfile::tempdir().unwrap();
    let out = export(
        dir.path(),
        &ImageSpec::new(IMAGE),
        &["--lxd-split", "--lxd", "--wsl", "--rootfs"],
    );
    let meta = out.join("base.lxd-meta.tar.gz");
    assert_eq!(
        tar_names(&meta),
        vec![
            "metadata.yaml",
            "templates/",
            "templates/hostname.tpl",
            "templates/hosts.tpl"
        ]
    );
    let sq = out.join("base.lxd-rootfs.squashfs");
    let list = std::process::Command::new("unsquashfs")
        .args(["-lls", "-d", ""])
        .arg(&sq)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("/etc/passwd") && list.contains("/bin/busybox"),
        "{list}"
    );
    assert!(
        list.contains("/etc/os-release -> ../usr/lib/os-release"),
        "{list}"
    );
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 5, "{sums}");
    for line in sums.lines() {
        let (sum, name) = line.split_once("  ").unwrap();
        assert_eq!(
            sum,
            sha256_hex(&std::fs::read(out.join(name)).unwrap()),
            "{name}"
        );
    }
    let mut names: Vec<_> = files_in(&out)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "SHA256SUMS",
            "base.lxd-meta.tar.gz",
            "base.lxd-rootfs.squashfs",
            "base.lxd.tar.gz",
            "base.rootfs.tar",
            "base.rootfs.tar.gz",
            "manifest.json"
        ]
    );
}

/// The OpenRC fix-up tables on an Alpine-shaped image: each target's files equal the expected
/// fixtures (tests/fixtures/openrc/<target>), its runlevel links are the table's, its added
/// files are there; `--rootfs` stays the image as it is.
#[test]
fn openrc_images_get_each_targets_setup() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(
        dir.path(),
        &openrc_image(""),
        &["--wsl", "--wsl-package", "--lxd", "--rootfs"],
    );

    let wsl = read_tar_file(&out.join("base.rootfs.tar.gz"));
    assert_openrc_setup(&wsl, "", "wsl", &[("default", "sshd")]);
    let (mode, uid, _, start) =
        tar_entry(&out.join("base.rootfs.tar.gz"), "usr/lib/wsl/openrc-start");
    assert_eq!((mode & 0o7777, uid), (0o755, 0));
    let start = String::from_utf8(start).unwrap();
    assert!(start.starts_with("#!/bin/sh") && start.contains("exec /sbin/openrc default"));
    let (_, _, _, conf) = tar_entry(&out.join("base.rootfs.tar.gz"), "etc/wsl.conf");
    assert_eq!(
        String::from_utf8(conf).unwrap(),
        "# Written by alpine-boxes.\n[user]\ndefault=alpine\n[boot]\ncommand=/usr/lib/wsl/openrc-start\n"
    );
    let pkg = read_tar_file(&out.join("base.wsl"));
    assert_openrc_setup(&pkg, "", "wsl", &[("default", "sshd")]);
    assert!(pkg.contains_key("usr/lib/wsl/openrc-start"));

    let lxd = read_tar_file(&out.join("base.lxd.tar.gz"));
    assert_openrc_setup(
        &lxd,
        "rootfs/",
        "lxd",
        &[
            ("boot", "bootmisc"),
            ("boot", "syslog"),
            ("boot", "devfs"),
            ("default", "networking"),
            ("default", "crond"),
            ("default", "sshd"),
        ],
    );
    let (_, _, _, ifaces) = tar_entry(
        &out.join("base.lxd.tar.gz"),
        "rootfs/etc/network/interfaces",
    );
    let ifaces = String::from_utf8(ifaces).unwrap();
    assert!(
        ifaces.contains("auto eth0\niface eth0 inet dhcp\n"),
        "{ifaces}"
    );
    assert!(!lxd.contains_key("rootfs/usr/lib/wsl/openrc-start"));

    // The plain rootfs is the image as built: no target's set-up.
    let plain = read_tar_file(&out.join("base.rootfs.tar"));
    assert_openrc_setup(&plain, "", "input", &[("default", "sshd")]);
    assert!(!plain.contains_key("etc/network/interfaces"));
}

/// The image's own choices win: its wsl.conf boot command, its interfaces file, a service it
/// already linked; an image without OpenRC gets none of it.
#[test]
fn openrc_setup_keeps_what_the_image_decided() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(
        dir.path(),
        &openrc_image(
            "f etc/wsl.conf 0644 [boot]\\ncommand=/bin/true\\n\n\
             d etc/network 0755\nf etc/network/interfaces 0644 auto br0\\niface br0 inet dhcp\\n\n\
             d etc/runlevels/boot 0755\nl etc/runlevels/boot/syslog -> /etc/init.d/syslog\n",
        ),
        &["--wsl", "--lxd"],
    );
    let (_, _, _, conf) = tar_entry(&out.join("base.rootfs.tar.gz"), "etc/wsl.conf");
    assert_eq!(
        String::from_utf8(conf).unwrap(),
        "[boot]\ncommand=/bin/true\n[user]\ndefault=alpine\n"
    );
    let lxd = out.join("base.lxd.tar.gz");
    let (_, _, _, ifaces) = tar_entry(&lxd, "rootfs/etc/network/interfaces");
    assert_eq!(ifaces, b"auto br0\niface br0 inet dhcp\n");
    let names = tar_names(&lxd);
    assert_eq!(
        names
            .iter()
            .filter(|n| *n == "rootfs/etc/runlevels/boot/syslog")
            .count(),
        1,
        "one link, the image's"
    );

    let plain = tempfile::tempdir().unwrap();
    let out = export(plain.path(), &ImageSpec::new(IMAGE), &["--lxd", "--wsl"]);
    let lxd = read_tar_file(&out.join("base.lxd.tar.gz"));
    assert!(!lxd
        .keys()
        .any(|p| p.contains("runlevels") || p.contains("network/interfaces")));
    let wsl = read_tar_file(&out.join("base.rootfs.tar.gz"));
    assert!(!wsl.contains_key("usr/lib/wsl/openrc-start"));
}

/// Every tar abox writes holds hard links to regular files written earlier only: a hard link to
/// a symlink (what `ln -s busybox sh && ln sh sh2` in a `RUN` makes) or to a FIFO is written as a
/// copy of that entry (WSL's importer stops on any other hard link).
#[test]
fn every_hard_link_in_a_tar_names_an_earlier_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec::new(&[
        "d etc 0755\nf etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\n\n\
         f bin/busybox 0755 bb\nl bin/sh -> busybox\nh bin/sh2 => bin/sh\n\
         p run/fifo 0600\nh run/fifo2 => run/fifo\nf a 0644 text\nh b => a",
        // A later layer links to the symlink again.
        "h bin/sh3 => bin/sh",
    ]);
    let out = export(
        dir.path(),
        &spec,
        &["--wsl", "--wsl-package", "--lxd", "--rootfs"],
    );
    let mut tars = 0;
    for f in files_in(&out) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let file = std::fs::File::open(&f).unwrap();
        let reader: Box<dyn std::io::Read> = if name.ends_with(".tar") {
            Box::new(file)
        } else if name.ends_with(".tar.gz") || name.ends_with(".wsl") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            continue;
        };
        tars += 1;
        let mut regular = std::collections::HashSet::new();
        let mut kinds = std::collections::HashMap::new();
        let mut links = 0;
        let mut ar = tar::Archive::new(reader);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let path = path.trim_start_matches("./").to_string();
            let ty = e.header().entry_type();
            if ty == tar::EntryType::Link {
                links += 1;
                let target = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let target = target.trim_start_matches("./").to_string();
                assert!(
                    regular.contains(&target),
                    "{name}: {path} links to {target}, not a regular file written earlier"
                );
            } else if ty.is_file() {
                regular.insert(path.clone());
            }
            kinds.insert(path, ty);
        }
        assert!(links >= 1, "{name}: b is a hard link to a");
        let at = |p: &str| {
            kinds
                .iter()
                .find(|(k, _)| k.ends_with(p) && k.len() - p.len() <= "rootfs/".len())
                .map(|(_, t)| *t)
                .unwrap_or_else(|| panic!("{name}: no {p}"))
        };
        for copy in ["bin/sh2", "bin/sh3"] {
            assert_eq!(at(copy), tar::EntryType::Symlink, "{name}: {copy}");
        }
        if !name.ends_with(".wsl") {
            assert_eq!(at("run/fifo2"), tar::EntryType::Fifo, "{name}");
        }
    }
    assert_eq!(tars, 4, "{:?}", files_in(&out));
}

/// `-o FILE` with one tar target names the file (listed only in a folder abox keeps lists in);
/// `-o -` streams it to standard output; a file name for several targets or of the wrong kind is
/// refused with nothing written.
#[test]
fn one_target_goes_to_a_named_file_or_standard_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = export(d, &ImageSpec::new(IMAGE), &["--wsl", "--rootfs"]);
    let wsl = std::fs::read(out.join("base.rootfs.tar.gz")).unwrap();
    let rootfs = std::fs::read(out.join("base.rootfs.tar")).unwrap();
    let src = format!("oci:{}", d.join("layout").display());
    let named = d.join("new/box.tar.gz");
    run_ok(
        abox()
            .args(["export", &src, "--name", "base", "--wsl", "-o"])
            .arg(&named),
    );
    assert_eq!(std::fs::read(&named).unwrap(), wsl, "the same bytes");
    assert_eq!(files_in(&d.join("new")), vec![named.clone()], "no lists");
    // Into a folder with abox's lists: listed with the rest.
    let listed = out.join("renamed.tar");
    run_ok(abox().args(["export", &src, "--rootfs", "-o"]).arg(&listed));
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert!(
        sums.contains("  renamed.tar\n") && sums.contains("  base.rootfs.tar\n"),
        "{sums}"
    );
    // Standard output: the tar itself, nothing else on stdout.
    let o = run_ok(abox().args(["export", &src, "--rootfs", "-o", "-"]));
    assert_eq!(o.stdout, rootfs);
    let before = files_in(d);
    for (args, needle) in [
        (
            &["--wsl", "--lxd", "-o", "x.tar.gz"][..],
            "names one file, but 2 artifacts",
        ),
        (
            &["--wsl", "-o", "x.tar"][..],
            "--wsl writes a tar.gz file: name it .tar.gz or .tgz",
        ),
        (
            &["--rootfs", "-o", "x.tar.gz"][..],
            "--rootfs writes a tar file",
        ),
        (
            &["--lxd-split", "-o", "-"][..],
            "--lxd-split writes two files and cannot go to standard output",
        ),
        (
            &["--wsl", "--rootfs", "-o", "-"][..],
            "names one file, but 2 artifacts",
        ),
    ] {
        let err = run_err(abox().current_dir(d).args(["export", &src]).args(args));
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(files_in(d), before, "nothing written");
}
