//! Independent judges: the artifacts are checked by the tools that consume them, not by abox's
//! own reader. umoci unpacks the same image; bsdtar unpacks the WSL tarball exactly as
//! `wsl --import` does; Docker imports and runs it; LXD imports, launches and runs the LXD
//! images. These tests need root, dockerd and lxd: `scripts/setup` installs and starts them,
//! and a missing one fails the test (it never skips).

mod common;

use std::path::Path;

use common::*;

/// Every rule the flattener implements, in a form umoci can unpack (no device nodes: this
/// machine's container may not allow mknod; they are covered at tar level in tests/flatten.rs).
const FIXTURE: &[&str] = &[
    "d bin 0755\nH bin/busybox 0755 /bin/busybox\nl bin/sh -> busybox\nd sbin 0755\nl sbin/init -> /bin/busybox\n\
     d etc 0755\nf etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\nalpine:x:1000:1000::/home/alpine:/bin/sh\\n\n\
     f etc/group 0644 root:x:0:\\nalpine:x:1000:\\n\n\
     f etc/os-release 0644 ID=alpine\\nVERSION_ID=3.20.3\\nPRETTY_NAME=\"Alpine Linux v3.20\"\\n\n\
     f etc/gone 0644 g\nd etc/gonedir 0755\nf etc/gonedir/x 0644 x\n\
     d opt 0755\nf opt/old 0644 o\nd opt/sub 0755\nf opt/sub/deep 0644 d\n\
     f hl-a 0644 first\nh hl-b => hl-a\nf hl-x 0644 ex\nh hl-y => hl-x\n\
     d home 0755\nd home/alpine 0700\nu 1000 1000\nf home/alpine/.profile 0600 export X=1\nu 1000 1000\n\
     d proc 0755\nd sys 0755\nd dev 0755\nd tmp 1777\nd root 0700\nd run 0755\nd var 0755",
    "f etc/marker 0644 abox-marker-7f3a\nw etc/gone\nw etc/gonedir\nd opt 0750\no opt\nf opt/new 0644 n\n\
     f hl-a 0644 second\nw hl-x\nf setgid 2755 s\nu 12 34",
    "f etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\nalpine:x:1000:1000::/home/alpine:/bin/sh\\nbob:x:1001:1001::/home/bob:/bin/sh\\n\n\
     l etc/motd -> /etc/marker",
];

fn fixture(dir: &Path) -> std::path::PathBuf {
    let lay = dir.join("layout");
    ImageSpec::new(FIXTURE).write_oci(&lay, "t");
    lay
}

fn export(lay: &Path, out: &Path, args: &[&str]) {
    run_ok(
        abox()
            .arg("export")
            .arg(format!("oci:{}:t", lay.display()))
            .args(["--name", "judge", "-o"])
            .arg(out)
            .args(args),
    );
}

#[test]
fn umoci_unpacks_the_same_tree_as_abox_flattens() {
    require_root();
    require_tool("umoci");
    let dir = tempfile::tempdir().unwrap();
    let lay = fixture(dir.path());
    let out = dir.path().join("out");
    export(&lay, &out, &["--rootfs"]);
    let ours = read_tar_file(&out.join("judge.rootfs.tar"));
    let bundle = dir.path().join("bundle");
    sh(&format!(
        "umoci unpack --image {}:t {}",
        lay.display(),
        bundle.display()
    ));
    let theirs = read_dir_tree(&bundle.join("rootfs"));
    assert_same_tree(&without_xattrs(&ours), &theirs, "umoci unpack");
    // Spot checks, so the comparison cannot pass on two empty trees.
    assert_eq!(ours["hl-b"].what, sha256_hex(b"first"));
    assert!(ours.contains_key("opt/new") && !ours.contains_key("opt/old"));
    assert!(ours.len() > 25);
}

#[test]
fn skopeo_copies_read_the_same_as_docker_save_archives() {
    require_tool("skopeo");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = ImageSpec::new(FIXTURE);
    spec.write_docker_archive(&d.join("saved.tar"), "alpine-boxes/judge:1");
    // skopeo re-packs the archive independently: new gzip layers, a new manifest, an OCI index.
    sh(&format!(
        "skopeo copy --quiet docker-archive:{0}/saved.tar oci:{0}/copied:v1 && skopeo copy --quiet docker-archive:{0}/saved.tar oci-archive:{0}/copied.tar:v1",
        d.display()
    ));
    let mut trees = Vec::new();
    for src in [
        format!("docker-archive:{}/saved.tar", d.display()),
        format!("oci:{}/copied:v1", d.display()),
        format!("oci-archive:{}/copied.tar:v1", d.display()),
    ] {
        let out = d.join(format!("out{}", trees.len()));
        run_ok(
            abox()
                .args(["export", &src, "--rootfs", "--name", "x", "-o"])
                .arg(&out),
        );
        trees.push(std::fs::read(out.join("x.rootfs.tar")).unwrap());
    }
    assert!(
        trees[0] == trees[1] && trees[1] == trees[2],
        "the three sources flatten to the same bytes"
    );
}

#[test]
fn wsl_import_unpacks_the_tarball_like_the_image() {
    require_root();
    require_tool("bsdtar");
    require_tool("umoci");
    let dir = tempfile::tempdir().unwrap();
    let lay = fixture(dir.path());
    let out = dir.path().join("out");
    export(&lay, &out, &["--wsl", "--wsl-package"]);
    let bundle = dir.path().join("bundle");
    sh(&format!(
        "umoci unpack --image {}:t {}",
        lay.display(),
        bundle.display()
    ));
    let mut image = read_dir_tree(&bundle.join("rootfs"));
    for (artifact, extra) in [
        ("judge.rootfs.tar.gz", vec!["etc/wsl.conf"]),
        (
            "judge.wsl",
            vec!["etc/wsl.conf", "etc/wsl-distribution.conf"],
        ),
    ] {
        // What `wsl --import` does: bsdtar -x -p --xattrs --numeric-owner, compression from content.
        let root = dir.path().join(format!("wsl-{artifact}"));
        std::fs::create_dir(&root).unwrap();
        sh(&format!(
            "bsdtar -x -p --xattrs --numeric-owner -f {} -C {}",
            out.join(artifact).display(),
            root.display()
        ));
        assert!(
            root.join("etc").is_dir() || root.join("bin/sh").exists(),
            "WSL requires /etc or /bin/sh"
        );
        let mut got = read_dir_tree(&root);
        for e in &extra {
            let n = got
                .remove(*e)
                .unwrap_or_else(|| panic!("{artifact} lacks {e}"));
            assert_eq!(
                (n.mode, n.uid, n.gid),
                (0o644, 0, 0),
                "{e}: root-owned 0644"
            );
        }
        let conf = std::fs::read_to_string(root.join("etc/wsl.conf")).unwrap();
        assert!(conf.contains("default=alpine"), "{conf}");
        image.remove("etc/wsl.conf");
        assert_same_tree(&got, &image, &format!("the image (unpacking {artifact})"));
    }
}

struct DockerImage(String);
impl Drop for DockerImage {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .output();
    }
}

#[test]
fn docker_runs_the_wsl_tarball() {
    require_tool("docker");
    assert!(
        std::process::Command::new("docker")
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false),
        "this test needs a running dockerd: run scripts/setup"
    );
    let dir = tempfile::tempdir().unwrap();
    let lay = fixture(dir.path());
    let out = dir.path().join("out");
    export(&lay, &out, &["--wsl"]);
    let tag = format!("abox-judge-wsl:{}", std::process::id());
    sh(&format!(
        "docker import {} {tag}",
        out.join("judge.rootfs.tar.gz").display()
    ));
    let _guard = DockerImage(tag.clone());
    let got = sh(&format!(
        "docker run --rm {tag} /bin/sh -c 'cat /etc/marker; cat /etc/motd; ls /opt; cat /hl-b'"
    ));
    assert_eq!(got, "abox-marker-7f3aabox-marker-7f3anew\nfirst");
}

struct Lxd(Vec<Vec<String>>);
impl Drop for Lxd {
    fn drop(&mut self) {
        for cmd in self.0.iter().rev() {
            let _ = std::process::Command::new("lxc").args(cmd).output();
        }
    }
}

fn lxd_check(images: &[&Path], fingerprint: &str, label: &str) {
    let alias = format!("abox-judge-{label}-{}", std::process::id());
    let name = format!("abox-{label}-{}", std::process::id());
    let mut guard = Lxd(Vec::new());
    let paths: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    let imported = sh(&format!(
        "lxc image import {} --alias {alias}",
        paths.join(" ")
    ));
    guard
        .0
        .push(vec!["image".into(), "delete".into(), alias.clone()]);
    assert!(
        imported.contains(fingerprint),
        "LXD's fingerprint is the sha256 we expect ({fingerprint}): {imported}"
    );
    let info = sh(&format!("lxc image info {alias}"));
    assert!(
        info.contains(&format!("Fingerprint: {fingerprint}")),
        "{info}"
    );
    assert!(info.contains("Architecture: x86_64"), "{info}");
    assert!(
        info.contains("os: alpine") && info.contains("release: 3.20.3"),
        "{info}"
    );
    sh(&format!("lxc launch {alias} {name}"));
    guard
        .0
        .push(vec!["delete".into(), "--force".into(), name.clone()]);
    let got = sh(&format!(
        "lxc exec {name} -- /bin/sh -c 'cat /etc/marker; cat /etc/hostname; ls /opt'"
    ));
    assert_eq!(
        got,
        format!("abox-marker-7f3a{name}\nnew\n"),
        "the container runs the image's rootfs, templates applied"
    );
}

#[test]
fn lxd_imports_and_launches_both_image_kinds() {
    require_lxd();
    let dir = tempfile::tempdir().unwrap();
    let lay = fixture(dir.path());
    let out = dir.path().join("out");
    export(&lay, &out, &["--lxd", "--lxd-split"]);
    let unified = out.join("judge.lxd.tar.gz");
    lxd_check(
        &[&unified],
        &sha256_hex(&std::fs::read(&unified).unwrap()),
        "unified",
    );
    let meta = out.join("judge.lxd-meta.tar.gz");
    let sq = out.join("judge.lxd-rootfs.squashfs");
    let mut both = std::fs::read(&meta).unwrap();
    both.extend(std::fs::read(&sq).unwrap());
    lxd_check(&[&meta, &sq], &sha256_hex(&both), "split");
}
