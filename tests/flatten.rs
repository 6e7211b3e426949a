//! Flattening semantics through the real binary: every whiteout rule and entry type, every
//! on-disk layout, and every kind of bad input. Needs no root, no engine.

mod common;

use std::path::{Path, PathBuf};

use common::*;

struct Run {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Run {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Self { _dir: dir, root }
    }
    fn p(&self, s: &str) -> PathBuf {
        self.root.join(s)
    }
    /// Export `--rootfs` from an OCI layout of `spec`; returns the tar path.
    fn rootfs(&self, spec: &ImageSpec) -> PathBuf {
        let lay = self.p("layout");
        spec.write_oci(&lay, "t");
        run_ok(
            abox()
                .arg("export")
                .arg(format!("oci:{}:t", lay.display()))
                .args(["--rootfs", "--name", "img", "-o"])
                .arg(self.p("out")),
        );
        self.p("out/img.rootfs.tar")
    }
    fn tree(&self, spec: &ImageSpec) -> Tree {
        read_tar_file(&self.rootfs(spec))
    }
}

fn kinds(t: &Tree) -> Vec<(String, char)> {
    t.iter().map(|(k, n)| (k.clone(), n.kind)).collect()
}

#[test]
fn whiteouts_hide_lower_files_and_folders() {
    let r = Run::new();
    let t = r.tree(&ImageSpec::new(&[
        "d etc 0755\nf etc/a 0644 a\nd etc/sub 0755\nf etc/sub/x 0644 x\nf etc/keep 0644 k\nf top 0644 t",
        "w etc/a\nw etc/sub\nw top\nw etc/never-existed",
    ]));
    assert_eq!(
        kinds(&t),
        vec![("etc".into(), 'd'), ("etc/keep".into(), 'f')]
    );
}

#[test]
fn opaque_folders_hide_lower_children_only() {
    let r = Run::new();
    let t = r.tree(&ImageSpec::new(&[
        "d opt 0755\nf opt/old 0644 o\nd opt/deep 0755\nf opt/deep/y 0644 y\nf other 0644 z",
        "d opt 0700\no opt\nf opt/new 0644 n",
    ]));
    assert_eq!(
        kinds(&t),
        vec![
            ("opt".into(), 'd'),
            ("opt/new".into(), 'f'),
            ("other".into(), 'f')
        ]
    );
    assert_eq!(
        t["opt"].mode, 0o700,
        "the upper layer's folder metadata wins"
    );
}

#[test]
fn a_layers_whiteouts_do_not_hide_its_own_entries() {
    let r = Run::new();
    // The whiteout and opaque marker come *after* the entries of the same layer.
    let t = r.tree(&ImageSpec::new(&[
        "d etc 0755\nf etc/a 0644 old\nd opt 0755\nf opt/old 0644 o",
        "f etc/a 0600 new\nw etc/a\nf opt/fresh 0644 f\no opt",
    ]));
    assert_eq!(t["etc/a"].what, sha256_hex(b"new"));
    assert_eq!(t["etc/a"].mode, 0o600);
    assert!(t.contains_key("opt/fresh"));
    assert!(!t.contains_key("opt/old"));
}

#[test]
fn replacing_changes_type_content_and_metadata() {
    let r = Run::new();
    let t = r.tree(&ImageSpec::new(&[
        "d a 0755\nf a/child 0644 c\nf b 0644 file\nf c 0644 one\nu 1 1",
        // a: folder → symlink (children go); b: file → folder; c: new content and owner.
        "l a -> /elsewhere\nd b 0750\nf b/inside 0644 i\nf c 0640 two\nu 1000 1001",
    ]));
    assert_eq!(t["a"].kind, 'l');
    assert_eq!(t["a"].what, "/elsewhere");
    assert!(!t.contains_key("a/child"));
    assert_eq!(t["b"].kind, 'd');
    assert_eq!(t["b"].mode, 0o750);
    assert!(t.contains_key("b/inside"));
    assert_eq!((t["c"].uid, t["c"].gid, t["c"].mode), (1000, 1001, 0o640));
    assert_eq!(t["c"].what, sha256_hex(b"two"));
}

#[test]
fn hard_links_keep_their_inode_across_layers() {
    let r = Run::new();
    let tar = r.rootfs(&ImageSpec::new(&[
        "f a 0644 first\nh b => a\nf x 0644 ex\nh y => x\nh z => x\nf keep 0644 k\nh keep2 => keep",
        // a is replaced: b keeps the old content. x is deleted: y and z keep it, as one inode.
        "f a 0644 second\nw x",
    ]));
    let t = read_tar_file(&tar);
    assert_eq!(t["a"].what, sha256_hex(b"second"));
    assert_eq!(t["b"].what, sha256_hex(b"first"));
    assert_eq!(t["y"].what, sha256_hex(b"ex"));
    assert_eq!(t["z"].what, sha256_hex(b"ex"));
    assert!(!t.contains_key("x"));
    // In the archive: links come after their target, and point at a path that exists.
    let names = tar_names(&tar);
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(pos("keep2") > pos("keep"));
    assert!(pos("z") > pos("y"), "y carries x's content, z links to it");
    let mut ar = tar::Archive::new(std::fs::File::open(&tar).unwrap());
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type() == tar::EntryType::Link {
            let p = e.path().unwrap().to_string_lossy().into_owned();
            let target = e
                .link_name()
                .unwrap()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            match p.as_str() {
                "keep2" => assert_eq!(target, "keep"),
                "z" => assert_eq!(target, "y"),
                other => panic!("unexpected hard link {other} -> {target}"),
            }
        }
    }
}

#[test]
fn every_entry_type_and_attribute_survives() {
    let r = Run::new();
    let long_dir = "l".repeat(120);
    let long_name = format!("{long_dir}/{}", "n".repeat(200));
    let long_target = format!("/{}", "t".repeat(150));
    let spec = ImageSpec::new(&[&format!(
        "d dev 0755\nc dev/null 0666 1 3\nb dev/loop0 0660 7 0\np run.fifo 0600\n\
         f bin/busybox 0755 bb\nt 1234567\nu 0 0\nl bin/sh -> busybox\n\
         f with-xattr 0644 x\nx user.comment hello\nx security.capability caps\n\
         f setuid 4755 s\nd {long_dir} 0755\nf {long_name} 0644 long\nl farlink -> {long_target}"
    )]);
    let tar = r.rootfs(&spec);
    let t = read_tar_file(&tar);
    assert_eq!(t["dev/null"].kind, 'c');
    assert_eq!(t["dev/null"].what, "1,3");
    assert_eq!(t["dev/loop0"].kind, 'b');
    assert_eq!(t["dev/loop0"].what, "7,0");
    assert_eq!(t["run.fifo"].kind, 'p');
    assert_eq!(t["bin/sh"].what, "busybox");
    assert_eq!(t["setuid"].mode, 0o4755);
    assert_eq!(
        t["with-xattr"].xattrs,
        vec![
            ("security.capability".to_string(), b"caps".to_vec()),
            ("user.comment".to_string(), b"hello".to_vec())
        ]
    );
    assert_eq!(t[&long_name].what, sha256_hex(b"long"));
    assert_eq!(t["farlink"].what, long_target);
    assert!(t.contains_key("bin"), "implied parent folders are written");
    let mut ar = tar::Archive::new(std::fs::File::open(&tar).unwrap());
    let e = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some("bin/busybox"))
        .unwrap();
    assert_eq!(e.header().mtime().unwrap(), 1234567);
}

#[test]
fn folders_come_before_children_and_output_is_deterministic() {
    let r = Run::new();
    let spec = ImageSpec::new(&[
        "f z/y/x/file 0644 1\nd a 0755\nf a/f 0644 2\nh z/link => a/f",
        "d z 0700\nf b/c 0644 3\nl a/s -> f",
    ]);
    let tar = r.rootfs(&spec);
    let names = tar_names(&tar);
    for (i, n) in names.iter().enumerate() {
        let n = n.trim_end_matches('/');
        if let Some((parent, _)) = n.rsplit_once('/') {
            let ppos = names.iter().position(|x| x.trim_end_matches('/') == parent);
            assert!(
                ppos.is_some_and(|p| p < i),
                "{parent} must precede {n}: {names:?}"
            );
        }
    }
    let first = std::fs::read(&tar).unwrap();
    let again = r.rootfs(&spec);
    assert_eq!(
        first,
        std::fs::read(again).unwrap(),
        "same image, same bytes"
    );
}

const BASIC: &[&str] = &[
    "d etc 0755\nf etc/passwd 0644 root:x:0:0::/root:/bin/sh\\nalpine:x:1000:1000::/home/alpine:/bin/sh\\n\n\
     f etc/os-release 0644 ID=alpine\\nVERSION_ID=3.20.3\\n\nf etc/old 0644 o\nF big 0644 300000\nh big2 => big",
    "w etc/old\nf etc/new 0644 n\nd home/alpine 0700\nu 1000 1000",
];

#[test]
fn every_layout_and_compression_gives_the_same_rootfs() {
    let r = Run::new();
    let mut outputs = Vec::new();
    let mut export = |src: String, label: &str| {
        let out = r.p(&format!("out-{label}"));
        run_ok(
            abox()
                .args(["export", &src, "--rootfs", "--name", "img", "-o"])
                .arg(&out),
        );
        outputs.push((
            label.to_string(),
            std::fs::read(out.join("img.rootfs.tar")).unwrap(),
        ));
    };
    for (label, comp) in [
        ("gzip", Comp::Gzip),
        ("zstd", Comp::Zstd),
        ("plain", Comp::None),
    ] {
        let mut spec = ImageSpec::new(BASIC);
        spec.comp = comp;
        let dir = r.p(&format!("oci-{label}"));
        spec.write_oci(&dir, "v1");
        export(format!("oci:{}:v1", dir.display()), &format!("oci-{label}"));
    }
    let spec = ImageSpec::new(BASIC);
    let a = r.p("oci.tar");
    spec.write_oci_archive(&a, "v1");
    export(format!("oci-archive:{}", a.display()), "oci-archive");
    let d = r.p("legacy.tar");
    spec.write_docker_archive(&d, "alpine-boxes/base:3.20.3");
    export(format!("docker-archive:{}", d.display()), "docker-legacy");
    let d25 = r.p("d25.tar");
    spec.write_docker25_archive(&d25, "alpine-boxes/base:3.20.3");
    export(format!("docker-archive:{}", d25.display()), "docker-25");
    // A bare path is recognised too.
    export(d.display().to_string(), "bare");
    let (first_label, first) = &outputs[0];
    for (label, bytes) in &outputs[1..] {
        assert!(bytes == first, "{label} differs from {first_label}");
    }
    let t = read_tar(&first[..]);
    assert!(!t.contains_key("etc/old") && t.contains_key("etc/new"));
    assert_eq!(t["big2"].what, t["big"].what);
}

#[test]
fn name_and_default_folder_come_from_the_tag() {
    let r = Run::new();
    let d = r.p("img.tar");
    ImageSpec::new(BASIC).write_docker_archive(&d, "alpine-boxes/docker-host:3.20.3");
    run_ok(
        abox()
            .current_dir(&r.root)
            .args(["export", "docker-archive:img.tar", "--rootfs"]),
    );
    let dir = r.p("out/docker-host-3.20.3");
    assert!(dir.join("docker-host.rootfs.tar").is_file());
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let tar = std::fs::read(dir.join("docker-host.rootfs.tar")).unwrap();
    assert_eq!(
        sums,
        format!("{}  docker-host.rootfs.tar\n", sha256_hex(&tar))
    );
    let manifest = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let m = manifest(&dir);
    assert_eq!(m["source"], "docker-archive:img.tar");
    assert_eq!(m["image"]["name"], "docker-host");
    let cfg = ImageSpec::new(BASIC).config();
    assert_eq!(m["image"]["digest"], format!("sha256:{}", sha256_hex(&cfg)));
    assert_eq!(m["artifacts"][0]["size"], tar.len() as u64);
    assert_eq!(m["artifacts"][0]["sha256"], sha256_hex(&tar));

    // Another tag of the same name gets its own folder; `latest` (or no tag) the plain name.
    let mut other = ImageSpec::new(BASIC);
    other.layers.push(layer("f extra 0644 x"));
    other.write_docker_archive(&r.p("nokernel.tar"), "docker-host:3.20.3-nokernel");
    ImageSpec::new(BASIC).write_docker_archive(&r.p("latest.tar"), "docker-host:latest");
    for src in ["nokernel.tar", "latest.tar"] {
        run_ok(abox().current_dir(&r.root).args([
            "export",
            &format!("docker-archive:{src}"),
            "--rootfs",
        ]));
    }
    assert!(r
        .p("out/docker-host-3.20.3-nokernel/docker-host.rootfs.tar")
        .is_file());
    assert!(r.p("out/docker-host/docker-host.rootfs.tar").is_file());
    assert_eq!(
        std::fs::read(dir.join("docker-host.rootfs.tar")).unwrap(),
        tar
    );

    // A second run into the folder keeps the first run's artifacts listed; another image's
    // artifacts in the same folder are listed with their image, and said.
    run_ok(
        abox()
            .current_dir(&r.root)
            .args(["export", "docker-archive:img.tar", "--wsl", "-o"])
            .arg(&dir),
    );
    let m = manifest(&dir);
    let files: Vec<&str> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        ["docker-host.rootfs.tar", "docker-host.rootfs.tar.gz"]
    );
    assert!(m["artifacts"][0].get("image").is_none(), "same image: {m}");
    // Another image into the same folder (its stderr).
    let export_nk = || {
        let o = run_ok(
            abox()
                .current_dir(&r.root)
                .args([
                    "export",
                    "docker-archive:nokernel.tar",
                    "--lxd",
                    "--name",
                    "nk",
                    "-o",
                ])
                .arg(&dir),
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = export_nk();
    assert!(
        err.contains("also holds docker-host.rootfs.tar, docker-host.rootfs.tar.gz from another image, docker-host (sha256:"),
        "{err}"
    );
    let m = manifest(&dir);
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    for a in m["artifacts"].as_array().unwrap() {
        let f = a["file"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(f)).unwrap();
        assert_eq!(a["sha256"], sha256_hex(&bytes), "{f}");
        assert!(
            sums.contains(&format!("{}  {f}\n", sha256_hex(&bytes))),
            "{sums}"
        );
        let from_other = f.starts_with("docker-host.");
        assert_eq!(a.get("image").is_some(), from_other, "{f}: {a}");
    }
    assert_eq!(sums.lines().count(), 3, "{sums}");
    // A listed file changed by hand is no longer vouched for.
    std::fs::write(dir.join("docker-host.rootfs.tar"), b"edited").unwrap();
    let err = export_nk();
    assert!(
        err.contains("docker-host.rootfs.tar: changed since abox wrote it"),
        "{err}"
    );
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    assert!(!sums.contains("docker-host.rootfs.tar\n"), "{sums}");
}

/// Export that must fail; checks the message and that nothing was left anywhere.
fn expect_failure(r: &Run, src: &str, needle: &str) {
    let out = r.p("out");
    let before = files_in(&r.root);
    let err = run_err(
        abox()
            .args([
                "export",
                src,
                "--wsl",
                "--wsl-package",
                "--lxd",
                "--rootfs",
                "-o",
            ])
            .arg(&out),
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(
        err.starts_with("error: ") || err.contains("\nerror: "),
        "{err}"
    );
    assert_eq!(files_in(&r.root), before, "files were left behind");
}

fn hostile(layers: &[&str], needle: &str) {
    let r = Run::new();
    let lay = r.p("layout");
    ImageSpec::new(layers).write_oci(&lay, "t");
    expect_failure(&r, &format!("oci:{}", lay.display()), needle);
}

#[test]
fn hostile_entries_are_refused() {
    hostile(&["R ../evil"], "contains `..`");
    hostile(&["R a/../../evil"], "contains `..`");
    hostile(&["R /etc/evil"], "is absolute");
    hostile(&[&format!("R {}\0tail", "n".repeat(120))], "NUL");
    hostile(&["d etc 0755\nR etc/.wh."], "invalid whiteout");
    hostile(&["d etc 0755\nR etc/.wh.."], "invalid whiteout");
    hostile(&["L link => missing"], "does not exist");
    hostile(&["d x 0755\nL link => x"], "points to the folder");
    // A symlink that would carry a later entry out of the root, in a later layer or the same.
    hostile(
        &["l escape -> ../../../../tmp", "f escape/pwned 0644 x"],
        "through the symlink",
    );
    hostile(
        &["l lib -> /usr/lib\nf lib/x 0644 x"],
        "through the symlink",
    );
    hostile(&["f file 0644 x\nf file/child 0644 y"], "is not a folder");
}

#[test]
fn bad_files_are_refused_with_a_clear_error() {
    let r = Run::new();
    expect_failure(
        &r,
        &format!("docker-archive:{}", r.p("missing.tar").display()),
        "no such file",
    );
    expect_failure(&r, r.p("nothing-here").to_str().unwrap(), "no such file");
    std::fs::write(r.p("junk.tar"), noise("junk", 5000)).unwrap();
    expect_failure(
        &r,
        &format!("docker-archive:{}", r.p("junk.tar").display()),
        "not a tar archive",
    );
    // A tar that is not an image.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(2);
    h.set_cksum();
    b.append_data(&mut h, "hello.txt", &b"hi"[..]).unwrap();
    std::fs::write(r.p("notimage.tar"), b.into_inner().unwrap()).unwrap();
    expect_failure(&r, r.p("notimage.tar").to_str().unwrap(), "not an image");
    expect_failure(
        &r,
        &format!("docker-archive:{}", r.p("notimage.tar").display()),
        "no manifest.json",
    );
    expect_failure(&r, &format!("oci:{}", r.root.display()), "no index.json");
}

/// Rewrite the one layer blob of an OCI layout with `f(blob)`, keeping the manifest as it was.
fn tamper_layer(lay: &Path, f: impl Fn(Vec<u8>) -> Vec<u8>) {
    let blobs = lay.join("blobs/sha256");
    let spec_layer = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let data = std::fs::read(&spec_layer).unwrap();
    std::fs::write(&spec_layer, f(data)).unwrap();
}

#[test]
fn corrupt_layers_are_refused() {
    let spec = ImageSpec::new(&["f a 0644 hello\nF big 0644 200000"]);
    // Truncated gzip.
    let r = Run::new();
    let lay = r.p("l");
    spec.write_oci(&lay, "t");
    tamper_layer(&lay, |d| d[..d.len() / 2].to_vec());
    expect_failure(&r, &format!("oci:{}", lay.display()), "layer 1 of 1");
    // Bad gzip trailer (CRC) — only noticed when the stream is drained to its end.
    let r = Run::new();
    let lay = r.p("l");
    spec.write_oci(&lay, "t");
    tamper_layer(&lay, |mut d| {
        let n = d.len();
        d[n - 8] ^= 0xff;
        d
    });
    expect_failure(&r, &format!("oci:{}", lay.display()), "layer 1 of 1");
    // Blob digest mismatch: same length, one byte changed inside the deflate stream.
    let r = Run::new();
    let lay = r.p("l");
    spec.write_oci(&lay, "t");
    tamper_layer(&lay, |mut d| {
        d[30] ^= 0x01;
        d
    });
    expect_failure(&r, &format!("oci:{}", lay.display()), "layer 1 of 1");
    // diff_id mismatch in a docker save archive, whose layers carry no blob digest.
    let r = Run::new();
    let arch = r.p("d.tar");
    spec.write_docker_archive(&arch, "x:1");
    let mut bytes = std::fs::read(&arch).unwrap();
    let at = bytes.windows(5).position(|w| w == b"hello").unwrap();
    bytes[at] = b'j';
    std::fs::write(&arch, bytes).unwrap();
    expect_failure(
        &r,
        &format!("docker-archive:{}", arch.display()),
        "diff_id (uncompressed) digest mismatch",
    );
    // A truncated docker save archive.
    let r = Run::new();
    let arch = r.p("d.tar");
    spec.write_docker_archive(&arch, "x:1");
    let bytes = std::fs::read(&arch).unwrap();
    std::fs::write(&arch, &bytes[..bytes.len() / 3]).unwrap();
    expect_failure(&r, &format!("docker-archive:{}", arch.display()), "");
}

#[test]
fn unwritable_output_folder_is_a_clear_error() {
    let r = Run::new();
    let lay = r.p("l");
    ImageSpec::new(BASIC).write_oci(&lay, "t");
    std::fs::write(r.p("afile"), b"x").unwrap();
    let err = run_err(
        abox()
            .args(["export", &format!("oci:{}", lay.display()), "--wsl", "-o"])
            .arg(r.p("afile/out")),
    );
    assert!(err.contains("cannot create the output folder"), "{err}");
}

#[test]
fn nested_indexes_are_resolved_by_platform() {
    let r = Run::new();
    let lay = r.p("multi");
    let amd = ImageSpec::new(&["f which 0644 amd64"]);
    let mut arm = ImageSpec::new(&["f which 0644 arm64"]);
    arm.arch = "arm64".into();
    let read_index = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(lay.join("index.json")).unwrap()).unwrap()
    };
    amd.write_oci(&lay, "x");
    let a = read_index()["manifests"][0].clone();
    arm.write_oci(&lay, "x");
    let mut b = read_index()["manifests"][0].clone();
    b["platform"]["variant"] = "v8".into();
    // A nested image index holding both platforms, as buildx writes a multi-platform image.
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [a, b],
    }))
    .unwrap();
    let h = sha256_hex(&nested);
    std::fs::write(lay.join("blobs/sha256").join(&h), &nested).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{h}"), "size": nested.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    std::fs::write(lay.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let which = |platform: &str| {
        let out = r.p(&format!("out-{}", platform.replace('/', "-")));
        run_ok(
            abox()
                .arg("export")
                .arg(format!("oci:{}:multi", lay.display()))
                .args(["--rootfs", "--name", "m", "--platform", platform, "-o"])
                .arg(&out),
        );
        read_tar_file(&out.join("m.rootfs.tar"))["which"]
            .what
            .clone()
    };
    assert_eq!(which("linux/amd64"), sha256_hex(b"amd64"));
    assert_eq!(which("linux/arm64"), sha256_hex(b"arm64"));
    let err = run_err(
        abox()
            .arg("export")
            .arg(format!("oci:{}:multi", lay.display()))
            .args(["--rootfs", "--platform", "linux/s390x", "-o"])
            .arg(r.p("o3")),
    );
    assert!(err.contains("no image for platform linux/s390x"), "{err}");
    let err = run_err(
        abox()
            .arg("export")
            .arg(format!("oci:{}:nope", lay.display()))
            .args(["--rootfs", "-o"])
            .arg(r.p("o4")),
    );
    assert!(err.contains("no image with reference \"nope\""), "{err}");

    // A single-platform image: taken whatever its platform unless --platform asks for another,
    // which is an error naming what the image is (for every command), with nothing written.
    let single = r.p("arm.tar");
    arm.write_docker_archive(&single, "arm:1");
    let src = format!("docker-archive:{}", single.display());
    run_ok(
        abox()
            .args(["export", &src, "--rootfs", "-o"])
            .arg(r.p("o5")),
    );
    run_ok(
        abox()
            .args([
                "export",
                &src,
                "--rootfs",
                "--platform",
                "linux/arm64",
                "-o",
            ])
            .arg(r.p("o6")),
    );
    for cmd in [&["export", "--rootfs"][..], &["disk"][..]] {
        let out = r.p("o7");
        let err = run_err(
            abox()
                .args(cmd)
                .args([&src, "--platform", "linux/amd64", "-o"])
                .arg(&out),
        );
        assert!(
            err.contains("is a linux/arm64 image, not linux/amd64"),
            "{cmd:?}: {err}"
        );
        assert!(!out.exists() || files_in(&out).is_empty(), "{cmd:?}");
    }
}
