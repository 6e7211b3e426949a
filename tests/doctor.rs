//! `abox doctor` on this machine (everything present: CI installs it), and on a machine made
//! to lack parts (a PATH without some tools, an old mke2fs, no engine): each missing part is
//! named with its package and the exit code says so. Credentials are reported by kind only.

mod common;

use std::path::Path;
use std::process::Command;

use common::engine::require_docker;
use common::{require_root, sh};

fn doctor_json(c: &mut Command) -> (i32, serde_json::Value) {
    let o = c.args(["doctor", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap(), v)
}

fn find<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {v:#}"))
}

fn doctor(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_abox"));
    c.env("DOCKER_CONFIG", config)
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_CONTEXT");
    c
}

#[test]
fn doctor_finds_everything_on_this_machine() {
    require_docker();
    require_root();
    let cfg = tempfile::tempdir().unwrap();
    let (code, v) = doctor_json(&mut doctor(cfg.path()));
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    let api = sh("docker version --format '{{.Server.APIVersion}}'");
    let engine = find(&v, "engine");
    assert_eq!(engine["ok"], true);
    let detail = engine["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("API {}", api.trim())), "{detail}");
    assert!(
        detail.contains("unix:///var/run/docker.sock") && detail.contains("default socket"),
        "{detail}"
    );
    assert_eq!(find(&v, "BuildKit")["ok"], true);
    let left = sh("docker images --format '{{.Repository}}' abox-doctor/buildkit-probe");
    assert!(
        left.trim().is_empty(),
        "the BuildKit probe left its image: {left}"
    );
    // Versions as the tools themselves print them.
    let mke2fs = Command::new("mke2fs").arg("-V").output().unwrap();
    let first = String::from_utf8_lossy(&mke2fs.stderr)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(find(&v, "mke2fs")["detail"]
        .as_str()
        .unwrap()
        .contains(&first));
    let qemu = sh("qemu-img --version | head -n1");
    assert!(find(&v, "qemu-img")["detail"]
        .as_str()
        .unwrap()
        .contains(qemu.trim()));
    for name in [
        "syslinux",
        "mmd",
        "tar2sqfs",
        "syslinux gptmbr.bin",
        "systemd-boot",
    ] {
        assert_eq!(find(&v, name)["ok"], true, "{name}: {v:#}");
    }
}

#[test]
fn doctor_names_each_missing_part_and_its_package() {
    let cfg = tempfile::tempdir().unwrap();
    // A PATH with some tools only: no tar2sqfs, and an mke2fs that is too old.
    let bin = tempfile::tempdir().unwrap();
    for t in ["syslinux", "mmd", "qemu-img", "sgdisk", "ssh"] {
        let p = sh(&format!("command -v {t}"));
        std::os::unix::fs::symlink(p.trim(), bin.path().join(t)).unwrap();
    }
    std::fs::write(
        bin.path().join("mke2fs"),
        "#!/bin/sh\necho 'mke2fs 1.47.0 (5-Feb-2023)' >&2\n",
    )
    .unwrap();
    sh(&format!("chmod 755 {}/mke2fs", bin.path().display()));
    let run = |json: bool| {
        let mut c = doctor(cfg.path());
        c.env("PATH", bin.path())
            .env("DOCKER_HOST", "unix:///nonexistent/abox-doctor.sock");
        if json {
            let (code, v) = doctor_json(&mut c);
            (code, v, String::new())
        } else {
            let o = c.arg("doctor").output().unwrap();
            (
                o.status.code().unwrap(),
                serde_json::Value::Null,
                String::from_utf8_lossy(&o.stdout).into_owned(),
            )
        }
    };
    let (code, v, _) = run(true);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["ok"], false);
    let engine = find(&v, "engine");
    assert_eq!(engine["ok"], false);
    assert!(engine["detail"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/abox-doctor.sock"));
    assert!(engine["fix"].as_str().unwrap().contains("docker.io"));
    let b = find(&v, "BuildKit");
    assert_eq!(b["ok"], false);
    assert!(b["detail"].as_str().unwrap().contains("no engine"));
    let t = find(&v, "tar2sqfs");
    assert_eq!(t["ok"], false);
    assert!(t["fix"].as_str().unwrap().contains("squashfs-tools-ng"));
    let m = find(&v, "mke2fs");
    assert_eq!(m["ok"], false);
    let d = m["detail"].as_str().unwrap();
    assert!(d.contains("1.47.0") && d.contains("≥ 1.47.1"), "{d}");
    assert!(m["fix"].as_str().unwrap().contains("bookworm-backports"));
    assert_eq!(find(&v, "syslinux")["ok"], true);

    let (code, _, table) = run(false);
    assert_eq!(code, 1);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("tar2sqfs") && l.contains("MISSING")),
        "{table}"
    );
    assert!(table.contains("→ install squashfs-tools-ng"), "{table}");
}

#[test]
fn doctor_reports_credentials_by_kind_never_the_secret() {
    let cfg = tempfile::tempdir().unwrap();
    let secret = "pa55-Secret-42";
    let auth = sh(&format!("printf %s 'tester:{secret}' | base64 -w0"));
    std::fs::write(
        cfg.path().join("config.json"),
        format!(
            r#"{{"auths": {{"127.0.0.1:5999": {{"auth": "{}"}}}}, "credHelpers": {{"registry.invalid:5000": "abox-no-such-helper"}}}}"#,
            auth.trim()
        ),
    )
    .unwrap();
    let o = doctor(cfg.path())
        .env("DOCKER_HOST", "unix:///nonexistent/abox-doctor.sock")
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !all.contains(secret) && !all.contains(auth.trim()),
        "a secret leaked: {all}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = find(&v, "credentials 127.0.0.1:5999");
    assert_eq!(c["ok"], true);
    assert!(c["detail"]
        .as_str()
        .unwrap()
        .contains("a user name and password"));
    let h = find(&v, "credentials registry.invalid:5000");
    assert_eq!(h["ok"], false);
    assert_eq!(h["required"], false);
}
