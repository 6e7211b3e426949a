//! `abox doctor`: what abox needs on this machine, checked for real — the engine (which one,
//! why, its API version), BuildKit (a tiny build), each external tool with its version, the
//! syslinux, systemd-boot and OVMF files, and the credentials the docker CLI's config holds (their kind only,
//! never a secret). Each missing part says which package brings it. The library returns a
//! [`Report`]; the command line prints it as a table or JSON and sets the exit code.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::engine::Engine;

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked (`engine`, `mke2fs`, `loop devices`…).
    pub name: String,
    pub ok: bool,
    /// Whether a failure here stops `abox all` (then the exit code is not 0).
    pub required: bool,
    /// What was found (a version, a path) or what went wrong.
    pub detail: String,
    /// The commands that need it.
    pub needed_by: String,
    /// What to do when it is missing (the package to install).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Every check, in the order shown.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// No required check failed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    /// A table: NAME, ok/MISSING/warn, detail; the fix under each failed line.
    pub fn table(&self) -> String {
        let w = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let state = match (c.ok, c.required) {
                (true, _) => "ok",
                (false, true) => "MISSING",
                (false, false) => "absent",
            };
            out.push_str(&format!(
                "{:w$}  {:7}  {}  [{}]\n",
                c.name, state, c.detail, c.needed_by
            ));
            if let (false, Some(f)) = (c.ok, &c.fix) {
                out.push_str(&format!("{:w$}  {:7}  → {f}\n", "", ""));
            }
        }
        out.push_str(if self.ok {
            "everything abox needs is here\n"
        } else {
            "some required parts are missing: see → above\n"
        });
        out
    }
}

fn check(name: &str, required: bool, needed_by: &str) -> Check {
    Check {
        name: name.into(),
        ok: false,
        required,
        detail: String::new(),
        needed_by: needed_by.into(),
        fix: None,
    }
}

/// Run every check.
pub fn run() -> Report {
    let mut checks = Vec::new();
    let engine = engine_checks(&mut checks);
    drop(engine);
    tool_checks(&mut checks);
    // ssh is required when the engine is reached through it.
    if crate::engine::resolve_endpoint().is_ok_and(|ep| ep.host.starts_with("ssh://")) {
        for c in checks.iter_mut().filter(|c| c.name == "ssh") {
            c.required = true;
        }
    }
    credential_checks(&mut checks);
    Report {
        ok: checks.iter().all(|c| c.ok || !c.required),
        checks,
    }
}

const ENGINE_USERS: &str = "build, push, all, docker: sources";

fn engine_checks(checks: &mut Vec<Check>) -> Option<Engine> {
    let mut c = check("engine", true, ENGINE_USERS);
    let mut skipped = check("BuildKit", true, "build, all, the VM layer");
    skipped.detail = "not tried: no engine".into();
    skipped.fix = Some("fix the engine first".into());
    let ep = match crate::engine::resolve_endpoint() {
        Ok(ep) => ep,
        Err(e) => {
            c.detail = format!("{e:#}");
            c.fix = Some("fix the engine settings named above".into());
            checks.extend([c, skipped]);
            return None;
        }
    };
    let engine = match Engine::connect_to(ep.clone()) {
        Ok(engine) => engine,
        Err(e) => {
            c.detail = format!("{e:#}");
            c.fix = Some(if ep.host.starts_with("ssh://") {
                "make `ssh HOST docker version` work without a prompt (keys or agent, \
                 known_hosts), with dockerd running there"
                    .into()
            } else if ep.tls.is_some() {
                "check the TLS files named above against the engine's certificate".into()
            } else {
                "install docker.io and start dockerd (scripts/setup does both), or choose a \
                 running engine with --host/--context"
                    .into()
            });
            checks.extend([c, skipped]);
            return None;
        }
    };
    let version = engine
        .block_on(engine.docker.version())
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_else(|| "?".into());
    c.ok = true;
    c.detail = format!("{ep}: Docker {version}, API {}", engine.api);
    checks.push(c);

    let mut b = check("BuildKit", true, "build, all, the VM layer");
    match buildkit_probe(&engine) {
        Ok(()) => {
            b.ok = true;
            b.detail = "a BuildKit build with a session ran on the engine".into();
        }
        Err(e) => {
            b.detail = format!("{e:#}");
            b.fix = Some("use Docker ≥ 20.10 with BuildKit enabled (the default on Linux)".into());
        }
    }
    checks.push(b);
    Some(engine)
}

/// Build `FROM scratch` + a label through BuildKit (nothing pulled), then remove the image.
fn buildkit_probe(engine: &Engine) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nLABEL org.alpine-boxes.doctor=probe\n",
    )?;
    let tag = format!("abox-doctor/buildkit-probe:{}", std::process::id());
    let spec = crate::engine::build::BuildSpec {
        context: dir.path().to_path_buf(),
        name: "buildkit-probe".into(),
        tags: vec![tag.clone()],
        ..Default::default()
    };
    let quiet = crate::progress::Progress::new(crate::progress::Mode::None);
    let built = crate::engine::build::build(engine, &spec, &quiet)?;
    let _ = engine.block_on(engine.docker.remove_image(
        &built.id,
        None::<bollard::query_parameters::RemoveImageOptions>,
        None,
    ));
    Ok(())
}

/// An external tool: its path on PATH and the first line of its version output.
struct Tool {
    name: &'static str,
    version_args: &'static [&'static str],
    package: &'static str,
    required: bool,
    needed_by: &'static str,
    /// Lowest version that works, when one matters.
    min: Option<(u32, u32, u32)>,
}

const TOOLS: &[Tool] = &[
    Tool {
        name: "mke2fs",
        version_args: &["-V"],
        package: "e2fsprogs ≥ 1.47.1 (Debian 12: apt-get install -t bookworm-backports e2fsprogs)",
        required: true,
        needed_by: "disk, all",
        min: Some((1, 47, 1)),
    },
    Tool {
        name: "syslinux",
        version_args: &["--version"],
        package: "syslinux (the mtools installer)",
        required: true,
        needed_by: "disk, all (BIOS boot; not --firmware uefi)",
        min: None,
    },
    Tool {
        name: "mmd",
        version_args: &["--version"],
        package: "mtools",
        required: true,
        needed_by: "disk, all (the ESP's folders, SYSLINUX's installer)",
        min: None,
    },
    Tool {
        name: "qemu-img",
        version_args: &["--version"],
        package: "qemu-utils",
        required: true,
        needed_by: "disk (qcow2, vmdk, vdi, vhdx), all",
        min: None,
    },
    Tool {
        name: "xorriso",
        version_args: &["-version"],
        package: "xorriso",
        required: false,
        needed_by: "seed (the NoCloud ISO)",
        min: None,
    },
    Tool {
        name: "tar2sqfs",
        version_args: &["--version"],
        package: "squashfs-tools-ng",
        required: true,
        needed_by: "export --lxd-split, all",
        min: None,
    },
    Tool {
        name: "sgdisk",
        version_args: &["--version"],
        package: "gdisk",
        required: false,
        needed_by: "checking disks by hand (abox writes tables itself)",
        min: None,
    },
    Tool {
        name: "ssh",
        version_args: &["-V"],
        package: "openssh-client",
        required: false,
        needed_by: "ssh:// engines",
        min: None,
    },
];

/// The first `a.b[.c]` in `text`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    for word in text.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
        let parts: Vec<&str> = word.split('.').filter(|p| !p.is_empty()).collect();
        if parts.len() >= 2 {
            let n = |i: usize| parts.get(i).and_then(|p| p.parse().ok());
            if let (Some(a), Some(b)) = (n(0), n(1)) {
                return Some((a, b, n(2).unwrap_or(0)));
            }
        }
    }
    None
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tool_checks(checks: &mut Vec<Check>) {
    for t in TOOLS {
        let mut c = check(t.name, t.required, t.needed_by);
        c.fix = Some(format!("install {}", t.package));
        match on_path(t.name) {
            None => c.detail = "not on PATH".into(),
            Some(p) => {
                let out = Command::new(&p).args(t.version_args).output();
                let text = out
                    .map(|o| {
                        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                        s.push_str(&String::from_utf8_lossy(&o.stderr));
                        s
                    })
                    .unwrap_or_default();
                let first = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim();
                c.detail = format!("{} ({first})", p.display());
                c.ok = true;
                if let Some(min) = t.min {
                    match parse_version(first) {
                        Some(v) if v >= min => {}
                        v => {
                            c.ok = false;
                            c.detail = format!(
                                "{} is {}, abox needs ≥ {}.{}.{}",
                                p.display(),
                                v.map(|(a, b, c)| format!("{a}.{b}.{c}"))
                                    .unwrap_or_else(|| "of an unknown version".into()),
                                min.0,
                                min.1,
                                min.2
                            );
                        }
                    }
                }
            }
        }
        checks.push(c);
    }
    for (table, file) in [
        (crate::disk::partition::Table::Gpt, "gptmbr.bin"),
        (crate::disk::partition::Table::Mbr, "mbr.bin"),
    ] {
        let mut c = check(
            &format!("syslinux {file}"),
            true,
            if file == "mbr.bin" {
                "disk --table mbr"
            } else {
                "disk, all"
            },
        );
        match crate::disk::boot::boot_code_path(table) {
            Ok(p) => {
                c.ok = true;
                c.detail = p.display().to_string();
            }
            Err(e) => {
                c.detail = format!("{e:#}");
                c.fix = Some("install syslinux-common (or set ABOX_SYSLINUX_DIR)".into());
            }
        }
        checks.push(c);
    }
    let mut c = check(
        "systemd-boot",
        true,
        "disk, all (UEFI boot; not --firmware bios)",
    );
    match crate::disk::boot::efi_loader() {
        Ok(p) => {
            c.ok = true;
            c.detail = p.display().to_string();
        }
        Err(e) => {
            c.detail = format!("{e:#}");
            c.fix = Some("install systemd-boot-efi (or set ABOX_SYSTEMD_BOOT_EFI)".into());
        }
    }
    checks.push(c);
    let mut c = check(
        "OVMF",
        false,
        "booting disks under UEFI in QEMU (tests, by hand)",
    );
    let ovmf = [
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_CODE.fd",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.is_file());
    match ovmf {
        Some(p) => {
            c.ok = true;
            c.detail = p.display().to_string();
        }
        None => {
            c.detail = "not installed".into();
            c.fix = Some("install ovmf".into());
        }
    }
    checks.push(c);
}

/// The registries the docker CLI's config names (`auths`, `credHelpers`) and the kind of
/// credential each yields; a `credsStore` is named too. Never a secret.
fn credential_checks(checks: &mut Vec<Check>) {
    let path = crate::engine::auth::config_path();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(_) => {
            let mut c = check(
                "credentials",
                false,
                "push, cache-from, private base images",
            );
            c.ok = true;
            c.detail = format!("no {} (public registries only)", path.display());
            checks.push(c);
            return;
        }
    };
    #[derive(serde::Deserialize, Default)]
    struct Config {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, serde_json::Value>,
        #[serde(rename = "credHelpers", default)]
        cred_helpers: std::collections::BTreeMap<String, String>,
        #[serde(rename = "credsStore", default)]
        creds_store: Option<String>,
    }
    let cfg: Config = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            let mut c = check("credentials", false, "push, cache-from");
            c.detail = format!("{} is not valid JSON: {e}", path.display());
            checks.push(c);
            return;
        }
    };
    let mut registries: Vec<String> = cfg.auths.keys().cloned().collect();
    registries.extend(cfg.cred_helpers.keys().cloned());
    registries.sort();
    registries.dedup();
    if registries.is_empty() {
        let mut c = check(
            "credentials",
            false,
            "push, cache-from, private base images",
        );
        c.ok = true;
        c.detail = format!(
            "none in {}{}",
            path.display(),
            cfg.creds_store
                .map(|s| format!(" (credsStore {s})"))
                .unwrap_or_default()
        );
        checks.push(c);
        return;
    }
    for r in registries {
        let mut c = check(&format!("credentials {r}"), false, "push, cache-from");
        let host = r
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let host = if r == crate::engine::auth::DOCKER_HUB {
            r.as_str()
        } else {
            host
        };
        match crate::engine::auth::credentials(host) {
            Some(cred) => {
                c.ok = true;
                // The docker CLI's order: credHelpers, then credsStore, then auths.
                let source = match cfg.cred_helpers.get(&r).or(cfg.creds_store.as_ref()) {
                    Some(h) => format!("the credential helper docker-credential-{h}"),
                    None => path.display().to_string(),
                };
                c.detail = format!(
                    "{} from {source}",
                    if cred.identitytoken.is_some() {
                        "an identity token"
                    } else {
                        "a user name and password"
                    }
                );
            }
            None => {
                c.detail = format!("listed in {} but no usable credential", path.display());
                c.fix = Some(format!("docker login {host}"));
            }
        }
        checks.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("mke2fs 1.47.2 (1-Jan-2025)"),
            Some((1, 47, 2))
        );
        assert_eq!(
            parse_version("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0, 2))
        );
        assert_eq!(parse_version("extlinux 6.04  Copyright"), Some((6, 4, 0)));
        assert_eq!(parse_version("no digits"), None);
    }
}
