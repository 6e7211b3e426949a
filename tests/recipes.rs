//! The real recipes (`Dockerfiles/*`) built through `abox build` on the stand-in for Alpine
//! (tests/fixtures/standin: busybox plus an `apk` that records what it is asked for and installs
//! the files later steps touch, and an `rc-update` that links runlevels like the real one).
//!
//! This checks the recipes' wiring — build order, the packages each image asks for, runlevels,
//! the user and its groups, subuid/subgid, the sshd and doas configuration, labels — not Alpine
//! itself: a real build needs network access to Docker Hub and an Alpine mirror. Needs a
//! running dockerd (fails, never skips, without one).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::engine::{engine_lock, in_image, pinned, rmi, standin};
use common::{abox, run_ok, sh};

const PREFIX: &str = "abox-test-recipes";
const RECIPES: [&str; 3] = ["base", "docker-host", "podman-host"];

fn dockerfiles() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfiles")
}

fn tags() -> Vec<String> {
    let version = pinned();
    RECIPES
        .iter()
        .flat_map(|n| {
            [
                format!("{PREFIX}/{n}:{version}"),
                format!("{PREFIX}/{n}:latest"),
            ]
        })
        .collect()
}

fn words(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// `apk add` calls of an image, each as its set of packages; every call asked for --no-cache.
fn apk_adds(image: &str) -> Vec<BTreeSet<String>> {
    in_image(image, "cat /var/lib/abox-standin/apk.log")
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(w.first(), Some(&"add"), "{image}: apk {l}");
            assert!(
                w.contains(&"--no-cache"),
                "{image}: apk {l} without --no-cache"
            );
            w[1..]
                .iter()
                .filter(|a| !a.starts_with('-'))
                .map(|a| a.to_string())
                .collect()
        })
        .collect()
}

fn runlevels(image: &str) -> BTreeSet<String> {
    in_image(
        image,
        "cd /etc/runlevels && for l in */*; do echo \"$l=$(readlink $l)\"; done",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn label(image: &str, key: &str) -> String {
    sh(&format!(
        "docker image inspect --format '{{{{index .Config.Labels \"{key}\"}}}}' {image}"
    ))
    .trim()
    .to_string()
}

#[test]
fn the_recipes_build_on_the_standin_with_their_packages_services_user_and_labels() {
    let _l = engine_lock();
    rmi(&tags());
    let version = pinned();
    let o = run_ok(
        abox()
            .arg("build")
            .arg("--dir")
            .arg(dockerfiles())
            .args(["--base-image", standin(), "--registry", PREFIX])
            .args(["--build-arg", "SOURCE=https://example.invalid/alpine-boxes"])
            .args(["--progress", "json"])
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    );
    let order: Vec<String> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "start")
        .filter_map(|e| Some(e["phase"].as_str()?.strip_prefix("building ")?.to_string()))
        .collect();
    assert_eq!(order.first().map(String::as_str), Some("base"), "{order:?}");
    assert_eq!(
        order.iter().collect::<BTreeSet<_>>(),
        RECIPES
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
            .iter()
            .collect(),
        "every recipe once, base first"
    );
    let img = |n: &str| format!("{PREFIX}/{n}:{version}");

    // Packages: the base's one call, then each host's own on top of it.
    let base_pkgs = words(
        "openrc busybox-openrc busybox-mdev-openrc openssh chrony doas ca-certificates tzdata \
         curl e2fsprogs e2fsprogs-extra cloud-utils-growpart sfdisk blkid partx",
    );
    assert_eq!(apk_adds(&img("base")), vec![base_pkgs.clone()]);
    assert_eq!(
        apk_adds(&img("docker-host")),
        vec![
            base_pkgs.clone(),
            words("docker containerd docker-cli-compose")
        ]
    );
    assert_eq!(
        apk_adds(&img("podman-host")),
        vec![
            base_pkgs,
            words("podman crun fuse-overlayfs slirp4netns passt")
        ]
    );

    // Services, as rc-update linked them.
    let base_rl = words("default/sshd=/etc/init.d/sshd default/chronyd=/etc/init.d/chronyd");
    assert_eq!(runlevels(&img("base")), base_rl);
    let mut docker_rl = base_rl.clone();
    docker_rl.extend(words(
        "boot/cgroups=/etc/init.d/cgroups default/containerd=/etc/init.d/containerd \
         default/docker=/etc/init.d/docker",
    ));
    assert_eq!(runlevels(&img("docker-host")), docker_rl);
    let mut podman_rl = base_rl.clone();
    podman_rl.insert("boot/cgroups=/etc/init.d/cgroups".into());
    assert_eq!(runlevels(&img("podman-host")), podman_rl);

    // The user: uid 1000, a login shell, no password, in wheel; doas lets wheel in.
    for n in RECIPES {
        let passwd = in_image(&img(n), "grep ^alpine: /etc/passwd");
        let f: Vec<&str> = passwd.trim().split(':').collect();
        assert_eq!(
            (f[2], f[5], f[6]),
            ("1000", "/home/alpine", "/bin/sh"),
            "{n}: {passwd}"
        );
        // No password can match `*`, and unlike `!` it does not lock out SSH keys.
        let shadow = in_image(&img(n), "grep ^alpine: /etc/shadow | cut -d: -f2");
        assert_eq!(shadow.trim(), "*", "{n}: alpine's password field");
        let wheel = in_image(&img(n), "grep ^wheel: /etc/group");
        assert!(
            wheel
                .trim()
                .split(':')
                .nth(3)
                .unwrap()
                .split(',')
                .any(|u| u == "alpine"),
            "{wheel}"
        );
    }
    let doas = in_image(
        &img("base"),
        "stat -c %a /etc/doas.d/20-wheel.conf; cat /etc/doas.d/20-wheel.conf",
    );
    assert_eq!(doas, "600\npermit nopass :wheel\n");
    let docker_group = in_image(&img("docker-host"), "grep ^docker: /etc/group");
    assert!(docker_group.trim().ends_with(":alpine"), "{docker_group}");
    assert!(in_image(&img("podman-host"), "grep -c ^docker: /etc/group || true").trim() == "0");

    // SSH: keys only, no root, and sshd_config reads the drop-in folder.
    let sshd = in_image(
        &img("base"),
        "cat /etc/ssh/sshd_config.d/10-alpine-boxes.conf /etc/ssh/sshd_config",
    );
    let shipped =
        std::fs::read_to_string(common::fixtures("standin/files/etc/ssh/sshd_config")).unwrap();
    assert_eq!(
        sshd,
        format!("PermitRootLogin no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nInclude /etc/ssh/sshd_config.d/*.conf\n{shipped}"),
        "the drop-in, then the package's sshd_config with the Include on top"
    );

    // Rootless podman: subordinate ids, overlay storage.
    let sub = in_image(&img("podman-host"), "cat /etc/subuid /etc/subgid");
    assert_eq!(sub, "alpine:100000:65536\nalpine:100000:65536\n");
    let storage = in_image(&img("podman-host"), "cat /etc/containers/storage.conf");
    assert!(
        storage.contains("[storage]\ndriver = \"overlay\"\n"),
        "{storage}"
    );

    // Labels: the pin, SOURCE_DATE_EPOCH as created, the source given, each image's title.
    for n in RECIPES {
        let i = img(n);
        assert_eq!(
            label(&i, "org.opencontainers.image.version"),
            version,
            "{n}"
        );
        assert_eq!(
            label(&i, "org.opencontainers.image.created"),
            "2023-11-14T22:13:20Z",
            "{n}"
        );
        assert_eq!(
            label(&i, "org.opencontainers.image.source"),
            "https://example.invalid/alpine-boxes",
            "{n}"
        );
        assert_eq!(
            label(&i, "org.opencontainers.image.title"),
            format!("alpine-boxes {n}")
        );
    }

    // No step cleans up after another: no apk cache in any layer.
    for n in RECIPES {
        let cache = in_image(&img(n), "ls -A /var/cache/apk 2>/dev/null | wc -l");
        assert_eq!(cache.trim(), "0", "{n}: /var/cache/apk not empty");
    }
    rmi(&tags());
}

/// The recipe files themselves: no `# syntax=` line (it would need a pull), a `.dockerignore`
/// each, the pin in one place.
#[test]
fn recipe_files_follow_the_rules() {
    for n in RECIPES {
        let dir = dockerfiles().join(n);
        let text = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().to_ascii_lowercase().starts_with("# syntax")),
            "{n}: # syntax= needs a pull"
        );
        assert!(dir.join(".dockerignore").is_file(), "{n}: .dockerignore");
        let pins = text
            .lines()
            .filter(|l| l.starts_with("ARG ALPINE_VERSION="))
            .count();
        assert_eq!(
            pins,
            usize::from(n == "base"),
            "{n}: the pin lives in base only"
        );
        for l in text.lines().filter(|l| l.contains("apk add")) {
            assert!(l.contains("--no-cache"), "{n}: {l}");
        }
    }
}
