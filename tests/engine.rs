//! `abox build`, `abox push` and `docker:` sources against the real Docker engine and a real
//! registry (Debian's docker.io and docker-registry; `scripts/setup` installs and starts
//! them). The fixture recipes under tests/fixtures build on a busybox stand-in for Alpine,
//! since no registry can be reached here. Without a running dockerd these tests fail, never
//! skip.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::engine::{
    docker_export_tree, engine_lock, fixtures, image_exists, image_id, require_docker, rmi,
    standin, Registry,
};
use common::{abox, read_tar_file, run_err, run_ok, sh};

const CHAIN: [&str; 3] = ["one", "two", "three"];
/// The chain's pinned ALPINE_VERSION (tests/fixtures/chain/one/Dockerfile).
const VERSION: &str = "3.20.3";

fn tags(prefix: &str) -> Vec<String> {
    CHAIN
        .iter()
        .flat_map(|n| {
            [
                format!("{prefix}/{n}:{VERSION}"),
                format!("{prefix}/{n}:latest"),
            ]
        })
        .collect()
}

fn build_cmd(prefix: &str) -> Command {
    let mut c = abox();
    c.arg("build").arg("--dir").arg(fixtures("chain")).args([
        "--base-image",
        standin(),
        "--registry",
        prefix,
    ]);
    c
}

/// Every JSON event on stderr (every line must parse).
fn json_events(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON event ({e}): {l}")))
        .collect()
}

/// Final state of each Dockerfile step (`[stage n/m] INSTR …`) per image.
fn step_states(events: &[serde_json::Value]) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for e in events.iter().filter(|e| e["event"] == "step") {
        let name = e["name"].as_str().unwrap().to_string();
        if name.starts_with('[') && !name.starts_with("[internal]") {
            out.insert(
                (e["image"].as_str().unwrap().to_string(), name),
                e["state"].as_str().unwrap().to_string(),
            );
        }
    }
    out
}

#[test]
fn chain_builds_parents_first_then_everything_is_cached() {
    let _l = engine_lock();
    let prefix = "abox-test-chain";
    rmi(&tags(prefix));

    // Cold: asking for the top builds the missing parents first, every step runs.
    let o = run_ok(build_cmd(prefix).args(["three", "--no-cache", "--progress", "json"]));
    let events = json_events(&o.stderr);
    let order: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "start")
        .filter_map(|e| e["phase"].as_str()?.strip_prefix("building "))
        .collect();
    assert_eq!(order, CHAIN, "build order");
    let cold = step_states(&events);
    for n in CHAIN {
        assert!(
            cold.keys().any(|(i, s)| i == n && s.contains("RUN")),
            "{n}: no RUN step reported: {cold:?}"
        );
    }
    for ((img, step), state) in &cold {
        if step.contains(" RUN ") || step.contains(" COPY ") {
            assert_eq!(state, "done", "{img} {step} with --no-cache");
        }
    }
    for t in tags(prefix) {
        assert!(image_exists(&t), "{t} was not tagged");
    }
    // stdout: "TAG IMAGE_ID" per tag, and the id is the tag's.
    let stdout = String::from_utf8(o.stdout).unwrap();
    for line in stdout.lines() {
        let (tag, id) = line.split_once(' ').unwrap();
        let real = sh(&format!(
            "docker image inspect --format '{{{{.Id}}}}' {tag}"
        ));
        assert_eq!(id, real.trim(), "{line}");
    }
    assert_eq!(stdout.lines().count(), 6, "{stdout}");

    // Warm: every step of every image comes from the cache.
    let o = run_ok(build_cmd(prefix).args(["--progress", "json"]));
    let warm = step_states(&json_events(&o.stderr));
    let mut checked = 0;
    for ((img, step), state) in &warm {
        if step.contains(" RUN ") || step.contains(" COPY ") {
            assert_eq!(state, "cached", "{img} {step} on the second build");
            checked += 1;
        }
    }
    assert!(checked >= 6, "too few steps seen: {warm:?}");
    rmi(&tags(prefix));
}

#[test]
fn failing_step_names_itself_and_shows_its_log() {
    let _l = engine_lock();
    let o = Command::new(env!("CARGO_BIN_EXE_abox"))
        .args(["--progress", "plain", "build", "--dir"])
        .arg(fixtures("broken"))
        .args(["--base-image", standin(), "--registry", "abox-test-broken"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.rsplit("error: building bad").next().unwrap();
    assert!(
        last.contains("`[3/3] RUN echo \"preparing the widget\""),
        "step name missing: {err}"
    );
    assert!(
        last.contains("widget-log-line-42"),
        "log tail missing: {err}"
    );
    assert!(last.contains("exit code: 3"), "{err}");
    assert!(!image_exists("abox-test-broken/bad:latest"));
}

#[test]
fn docker_source_flattens_like_the_engine_exports() {
    let _l = engine_lock();
    let prefix = "abox-test-flat";
    run_ok(&mut build_cmd(prefix));
    let out = tempfile::tempdir().unwrap();
    for n in CHAIN {
        let image = format!("{prefix}/{n}:{VERSION}");
        run_ok(
            abox()
                .args([
                    "export",
                    &format!("docker:{image}"),
                    "--rootfs",
                    "--wsl",
                    "-o",
                ])
                .arg(out.path().join(n)),
        );
        let mut ours = read_tar_file(&out.path().join(n).join(format!("{n}.rootfs.tar")));
        // BuildKit leaves its RUN mount targets (dev, proc, sys) in the layers; the engine
        // mounts over the same paths in a container. Compare everything else.
        ours.retain(|p, _| !common::engine::engine_added(p));
        let engine = docker_export_tree(&image);
        common::assert_same_tree(&ours, &engine, &format!("docker export of {image}"));

        // And the fixture's intent, so an agreeing pair of bugs cannot pass.
        assert!(ours.contains_key("opt/one/hello.txt"));
        assert_eq!(ours["opt/one/hello-link"].what, "hello.txt", "symlink kept");
        assert!(
            !ours.contains_key("opt/one/sub/debug.log"),
            ".dockerignore was not honoured"
        );
        if n != "one" {
            assert!(!ours.contains_key("data/gone"), "whiteout");
            assert!(!ours.contains_key("data/keep/a"));
            assert_eq!(
                ours["data/keep/hard"].what,
                common::sha256_hex(b"keep\n"),
                "hard link outlives its first name"
            );
            assert_eq!(ours["data/replace"].what, common::sha256_hex(b"new\n"));
            let opaque: Vec<_> = ours
                .keys()
                .filter(|k| k.starts_with("data/opaque/"))
                .collect();
            assert_eq!(opaque, ["data/opaque/y"], "opaque folder");
        }
        if n == "three" {
            assert!(ours.contains_key("opt/three/artifact"));
            assert!(!ours.contains_key("out"), "the build stage leaked");
            assert!(!ours.contains_key("tmp/junk"), "the build stage leaked");
        }
    }
    rmi(&tags(prefix));
}

/// Containers abox made to export an image (see src/engine/export.rs).
fn export_containers() -> Vec<String> {
    sh("docker ps -a -q --filter label=org.alpine-boxes.export-owner")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn docker_source_is_the_image_not_its_container() {
    // abox reads docker: images as a container export: what the container adds (Docker's init
    // layer) must not show, what the image has at the same paths must.
    let _l = engine_lock();
    let d = tempfile::tempdir().unwrap();
    let spec = common::ImageSpec::new(&[
        "d opt 755\nf opt/a 644 first\n",
        "f opt/same 644 same\n",
        "f opt/a 644 second\n",
        // The image's own /proc and /etc, where the init layer puts its mount points: kept.
        "d etc 755\nf etc/motd 644 hi\nd proc 755\n",
    ]);
    let tag = "abox-test-export/img:1";
    spec.write_docker_archive(&d.path().join("img.tar"), tag);
    sh(&format!(
        "docker load -q -i {}/img.tar >/dev/null",
        d.path().display()
    ));
    let o = run_ok(
        abox()
            .args(["export", &format!("docker:{tag}"), "--rootfs", "-o"])
            .arg(d.path().join("out")),
    );
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("/etc/hosts, /etc/hostname, /etc/resolv.conf, /etc/mtab come from Docker"),
        "{said}"
    );
    let ours = read_tar_file(&d.path().join("out/img.rootfs.tar"));
    run_ok(
        abox()
            .arg("export")
            .arg(format!("docker-archive:{}/img.tar", d.path().display()))
            .args(["--rootfs", "-o"])
            .arg(d.path().join("file")),
    );
    let from_file = read_tar_file(&d.path().join("file/img.rootfs.tar"));
    common::assert_same_tree(&ours, &from_file, "the same image read from its file");
    assert_eq!(ours["opt/a"].what, common::sha256_hex(b"second"));
    assert!(ours.contains_key("etc/motd") && ours.contains_key("proc"));
    let init = [
        ".dockerenv",
        "dev",
        "dev/console",
        "sys",
        "etc/hosts",
        "etc/hostname",
        "etc/resolv.conf",
        "etc/mtab",
    ];
    for added in init {
        assert!(!ours.contains_key(added), "{added} is the container's");
    }
    // The engine does add them to a container of this image.
    let engine = common::read_tar(
        &Command::new("sh")
            .arg("-c")
            .arg(format!(
                "c=$(docker create {tag} /x) && docker export $c; docker rm $c >/dev/null"
            ))
            .output()
            .unwrap()
            .stdout[..],
    );
    for added in init {
        assert!(
            engine.contains_key(added),
            "the engine no longer adds {added}"
        );
    }
    assert!(
        export_containers().is_empty(),
        "the export's container stays"
    );
    rmi(&[tag.to_string()]);
}

#[test]
fn an_interrupted_or_killed_docker_read_leaves_no_container() {
    let _l = engine_lock();
    let d = tempfile::tempdir().unwrap();
    // Big enough that the export takes a while.
    let spec = common::ImageSpec::new(&["d opt 755\nF opt/big 644 300000000\n"]);
    let tag = "abox-test-export/big:1";
    spec.write_docker_archive(&d.path().join("big.tar"), tag);
    sh(&format!(
        "docker load -q -i {0}/big.tar >/dev/null && rm {0}/big.tar",
        d.path().display()
    ));
    let start = |out: &str| {
        let child = abox()
            .args(["export", &format!("docker:{tag}"), "--rootfs", "-o"])
            .arg(d.path().join(out))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while export_containers().is_empty() {
            assert!(t0.elapsed().as_secs() < 60, "abox made no container");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    };
    // Ctrl-C: abox removes the container itself. Two signals at once (`timeout -s INT`
    // signals the whole group; an impatient double Ctrl-C): abox ends at once, and removes
    // the container on its way out.
    for (out, kill) in [
        ("int", "kill -INT {0}"),
        ("int2", "kill -INT {0}; kill -INT {0}"),
    ] {
        let child = start(out);
        sh(&kill.replace("{0}", &child.id().to_string()));
        let o = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(130), "{kill}: {said}");
        assert!(
            out == "int2" || said.contains("error: interrupted"),
            "{said}"
        );
        assert!(export_containers().is_empty(), "{kill} left the container");
        assert!(common::files_in(&d.path().join(out)).is_empty(), "{kill}");
    }
    // SIGKILL: the container stays, labelled with the dead PID; the next docker: read on this
    // machine removes it.
    let mut child = start("kill");
    sh(&format!("kill -KILL {}", child.id()));
    child.wait().unwrap();
    let left = export_containers();
    assert_eq!(left.len(), 1, "{left:?}");
    let owner = sh(&format!(
        "docker inspect -f '{{{{index .Config.Labels \"org.alpine-boxes.export-owner\"}}}}' {}",
        left[0]
    ));
    assert!(
        owner.trim().ends_with(&format!("/{}", child.id())),
        "{owner}"
    );
    rmi(&[tag.to_string()]);
    let small = "abox-test-export/small:1";
    common::ImageSpec::new(&["f x 644 x\n"]).write_docker_archive(&d.path().join("s.tar"), small);
    sh(&format!(
        "docker load -q -i {}/s.tar >/dev/null",
        d.path().display()
    ));
    run_ok(
        abox()
            .args(["export", &format!("docker:{small}"), "--rootfs", "-o"])
            .arg(d.path().join("small")),
    );
    assert!(
        export_containers().is_empty(),
        "the leftover was not reaped"
    );
    rmi(&[small.to_string()]);
}

#[test]
fn push_needs_credentials_and_stores_the_local_digest_then_serves_as_cache() {
    let _l = engine_lock();
    let reg = Registry::start();
    let prefix = format!("{}/boxes", reg.host);
    run_ok(build_cmd(&prefix).arg("one"));

    // No credentials: refused, with the registry and where credentials are looked up.
    let err = run_err(
        abox()
            .env("DOCKER_CONFIG", &reg.config_without)
            .args(["push", "--dir"])
            .arg(fixtures("chain"))
            .args(["one", "--registry", &prefix]),
    );
    assert!(
        err.contains(&format!("registry {} refused", reg.host)),
        "{err}"
    );
    assert!(
        err.contains(&reg.config_without.join("config.json").display().to_string()),
        "{err}"
    );
    assert!(!err.contains(&reg.password), "the password leaked: {err}");

    // With credentials: pushed, and the registry holds what the engine calls the image.
    let o = run_ok(
        abox()
            .env("DOCKER_CONFIG", &reg.config_with)
            .args(["push", "-v", "--dir"])
            .arg(fixtures("chain"))
            .args(["one", "--registry", &prefix]),
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!all.contains(&reg.password), "the password leaked: {all}");
    let remote = reg.manifest_digest("boxes/one", VERSION);
    let local = sh(&format!(
        "docker image inspect --format '{{{{range .RepoDigests}}}}{{{{println .}}}}{{{{end}}}}' {prefix}/one:{VERSION}"
    ));
    assert!(
        local.lines().any(|l| l == format!("{prefix}/one@{remote}")),
        "registry {remote} vs RepoDigests {local}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("{prefix}/one:{VERSION}@{remote}"))
    );

    // Cold engine: no local image, no build cache; the pushed image is the cache.
    rmi(&[
        format!("{prefix}/one:{VERSION}"),
        format!("{prefix}/one:latest"),
    ]);
    sh("docker builder prune -af >/dev/null 2>&1");
    let o = run_ok(
        build_cmd(&prefix)
            .env("DOCKER_CONFIG", &reg.config_with)
            .args(["one", "--progress", "json", "--cache-from"])
            .arg(format!("{prefix}/{{name}}:{{version}}")),
    );
    let states = step_states(&json_events(&o.stderr));
    let mut checked = 0;
    for ((_, step), state) in &states {
        if step.contains(" RUN ") || step.contains(" COPY ") {
            assert_eq!(
                state, "cached",
                "{step} should come from the registry cache"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "{states:?}");

    // build --push: built, then pushed; the registry serves what was printed.
    let o = run_ok(
        build_cmd(&prefix)
            .env("DOCKER_CONFIG", &reg.config_with)
            .args(["two", "--push"]),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let remote = reg.manifest_digest("boxes/two", "latest");
    assert!(
        stdout.contains(&format!("{prefix}/two:latest@{remote}")),
        "{stdout}"
    );
    rmi(&[
        format!("{prefix}/one:{VERSION}"),
        format!("{prefix}/one:latest"),
        format!("{prefix}/two:{VERSION}"),
        format!("{prefix}/two:latest"),
    ]);
}

#[test]
fn no_daemon_is_a_clear_error() {
    for args in [
        vec![
            "build".to_string(),
            "--dir".into(),
            fixtures("chain").display().to_string(),
        ],
        vec!["export".into(), "docker:anything".into()],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_abox"))
            .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("unix:///nonexistent/docker.sock"), "{err}");
        assert!(err.contains("is dockerd running?"), "{err}");
    }
    // A tcp engine address that nobody answers.
    let o = Command::new(env!("CARGO_BIN_EXE_abox"))
        .env("DOCKER_HOST", "tcp://127.0.0.1:9")
        .args(["export", "docker:anything"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is dockerd running?"));
}

#[test]
fn missing_image_says_how_to_get_it() {
    require_docker();
    let err = run_err(abox().args(["export", "docker:abox-test/never-built:1"]));
    assert!(err.contains("no image abox-test/never-built:1"), "{err}");
    assert!(err.contains("abox build"), "{err}");
}

/// A bare reference (`abox export alpine:3.20`, as `docker run` takes it) is the engine's image
/// when no file or folder has that name; a tag the engine lacks lists the tags it has.
#[test]
fn bare_references_are_engine_images_and_a_missing_tag_lists_the_others() {
    require_docker();
    let _l = engine_lock();
    let pid = std::process::id();
    let repo = format!("abox-test/bare-{pid}");
    let tags = vec![format!("{repo}:1"), format!("{repo}:2")];
    for t in &tags {
        sh(&format!("docker tag {} {t}", standin()));
    }
    let work = tempfile::tempdir().unwrap();
    let o = abox()
        .current_dir(work.path())
        .args(["export", &tags[0], "--rootfs", "-o", "out"])
        .output()
        .unwrap();
    let err = abox()
        .current_dir(work.path())
        .args(["export", &format!("{repo}:9"), "--rootfs", "-o", "out9"])
        .output()
        .unwrap();
    rmi(&tags);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = read_tar_file(
        &work
            .path()
            .join("out")
            .join(format!("bare-{pid}.rootfs.tar")),
    );
    assert!(t.contains_key("bin/busybox"), "the stand-in's rootfs");
    let err = String::from_utf8_lossy(&err.stderr);
    assert!(
        err.contains(&format!("no image {repo}:9 in the Docker engine"))
            && err.contains(&format!("it has {repo}:1, {repo}:2")),
        "{err}"
    );
    assert!(!work.path().join("out9").exists());
    // A name that reads as a path stays a path.
    let err = run_err(
        abox()
            .current_dir(work.path())
            .args(["export", "./alpine:3.20"]),
    );
    assert!(err.contains("no such file or folder"), "{err}");
}

#[test]
fn all_builds_then_writes_every_artifact_of_every_image() {
    let _l = engine_lock();
    let prefix = "abox-test-all";
    let out = tempfile::tempdir().unwrap();
    let o = run_ok(
        abox()
            .args(["all", "--dir"])
            .arg(fixtures("chain"))
            .args(["--base-image", standin(), "--registry", prefix, "-o"])
            .arg(out.path()),
    );
    let printed = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    for n in CHAIN {
        let d = out.path().join(n);
        // The fixtures carry no kernel but are "Alpine" (the stand-in's os-release): the VM
        // layer is built on each (the stand-in apk's linux-virt) and the disk is written.
        assert!(
            stderr.contains(&format!(
                "adding a kernel to {prefix}/{n}:{VERSION} (VM layer)"
            )),
            "{stderr}"
        );
        assert!(image_exists(&format!("{prefix}/{n}:{VERSION}-vm")));
        for f in [
            format!("{n}.qcow2"),
            format!("{n}.rootfs.tar.gz"),
            format!("{n}.wsl"),
            format!("{n}.lxd.tar.gz"),
            format!("{n}.lxd-meta.tar.gz"),
            format!("{n}.lxd-rootfs.squashfs"),
            format!("{n}.lxd-vm-meta.tar.gz"),
            format!("{n}.lxd-vm.qcow2"),
            "SHA256SUMS".into(),
            "manifest.json".into(),
        ] {
            assert!(d.join(&f).is_file(), "{n}: {f} missing");
            if f.starts_with(n) {
                assert!(printed.contains(&f), "{f} not printed: {printed}");
            }
        }
        // The WSL tarball is the image (plus wsl.conf).
        let mut wsl = read_tar_file(&d.join(format!("{n}.rootfs.tar.gz")));
        assert!(wsl.remove("etc/wsl.conf").is_some());
        wsl.retain(|p, _| !common::engine::engine_added(p));
        let engine = docker_export_tree(&format!("{prefix}/{n}:{VERSION}"));
        common::assert_same_tree(&wsl, &engine, &format!("docker export of {n}"));
        sh(&format!(
            "cd {} && sha256sum -c --quiet SHA256SUMS",
            d.display()
        ));
        // The disks (and the VM image's metadata) were made from the -vm image, and the
        // manifest says so; the other artifacts come from the image the folder is named after.
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
        let vm_id = image_id(&format!("{prefix}/{n}:{VERSION}-vm"));
        assert_ne!(m["image"]["config_digest"], vm_id.as_str(), "{m}");
        for a in m["artifacts"].as_array().unwrap() {
            if ["disk", "lxd-vm", "lxd-vm-meta"].contains(&a["kind"].as_str().unwrap()) {
                assert_eq!(a["image"]["config_digest"], vm_id.as_str(), "{m}");
                assert_eq!(a["image"]["name"], format!("{prefix}/{n}:{VERSION}-vm"));
            } else {
                assert!(a.get("image").is_none(), "{m}");
            }
        }
    }
    let mut all_tags = tags(prefix);
    all_tags.extend(CHAIN.iter().map(|n| format!("{prefix}/{n}:{VERSION}-vm")));
    rmi(&all_tags);
}

#[test]
fn engine_older_than_api_1_41_is_refused() {
    // A fake engine that answers /version like Docker 19.03.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().take(4) {
            let Ok(mut s) = s else { continue };
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = r#"{"Version":"19.03.15","ApiVersion":"1.40","MinAPIVersion":"1.12"}"#;
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nApi-Version: 1.40\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let o = Command::new(env!("CARGO_BIN_EXE_abox"))
        .env("DOCKER_HOST", format!("tcp://127.0.0.1:{port}"))
        .args(["export", "docker:anything"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("speaks API 1.40"), "{err}");
    assert!(err.contains("at least 1.41"), "{err}");
}

#[test]
fn offline_all_names_the_base_image_it_cannot_pull_and_the_way_out() {
    let _l = engine_lock();
    require_docker();
    // The repository's own recipes, as README's first command runs them: nothing can be pulled
    // here, so the pinned alpine:<version> is missing (a machine that has it would build).
    let pinned = common::engine::pinned();
    let image = format!("alpine:{pinned}");
    assert!(
        !image_exists(&image),
        "{image} is in the engine: this test needs a machine without it"
    );
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_abox"))
        .current_dir(&root)
        .args(["--progress", "none", "all", "-o"])
        .arg(out.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&format!(
            "cannot pull {image}, the base image of recipe base"
        )),
        "{err}"
    );
    assert!(
        err.contains("--base-image") && err.contains("scripts/demo"),
        "{err}"
    );
    assert!(common::files_in(out.path()).is_empty(), "nothing written");

    // A registry that takes the connection and never answers: abox gives up after its idle
    // limit with the same one line, instead of waiting on the engine's own time-outs.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().take(16) {
            held.push(s);
        }
    });
    let recipes = tempfile::tempdir().unwrap();
    let dir = recipes.path().join("hung");
    std::fs::create_dir_all(&dir).unwrap();
    let hung = format!("127.0.0.1:{port}/abox-test/hung:1");
    // Build the recipe folder with `base` as its base image; exit code and stderr.
    let build_on = |base: &str| {
        std::fs::write(
            dir.join("Dockerfile"),
            format!("ARG BASE_IMAGE={base}\nFROM ${{BASE_IMAGE}}\nRUN true\n"),
        )
        .unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_abox"))
            .args([
                "--progress",
                "none",
                "build",
                "--registry",
                "abox-test-hung",
                "--dir",
            ])
            .arg(recipes.path())
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = build_on(&hung);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&format!(
            "cannot pull {hung}, the base image of recipe hung"
        )),
        "{err}"
    );
    assert!(err.contains("no answer from the registry within"), "{err}");

    // A base pinned by digest is pulled by digest (not taken apart as name:tag).
    let pinned = format!("alpine@sha256:{}", "ab".repeat(32));
    let (_, err) = build_on(&pinned);
    assert!(err.contains(&format!("cannot pull {pinned},")), "{err}");
    assert!(!err.contains("invalid reference"), "{err}");
}
