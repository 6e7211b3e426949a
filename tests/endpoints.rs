//! Every engine the docker CLI reaches, reached by abox: `ssh://` through a real sshd, `tcp://`
//! with TLS through a real TLS front (stunnel4, client certificates required), and contexts
//! written by the real `docker context create`, chosen by DOCKER_CONTEXT, --context and
//! currentContext. All on 127.0.0.1, in front of this machine's dockerd; builds (BuildKit
//! session, progress, cache-from with credentials), pushes and `docker:` exports go through each.
//! Without dockerd, sshd, stunnel4 or openssl these tests fail, never skip.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::engine::{engine_lock, fixtures, image_exists, require_docker, rmi, standin, Registry};
use common::remote::{Sshd, TlsFront};
use common::{abox, read_tar_file, run_err, run_ok, sh};

/// The chain fixture's pinned ALPINE_VERSION (tests/fixtures/chain/one/Dockerfile).
const VERSION: &str = "3.20.3";

/// abox with no engine settings inherited from the machine: a private DOCKER_CONFIG (no
/// contexts) unless the test gives one, no DOCKER_HOST/DOCKER_CONTEXT/TLS variables.
fn clean_abox(config: &Path) -> Command {
    let mut c = abox();
    for v in [
        "DOCKER_HOST",
        "DOCKER_CONTEXT",
        "DOCKER_TLS_VERIFY",
        "DOCKER_CERT_PATH",
        "DOCKER_TLS",
    ] {
        c.env_remove(v);
    }
    c.env("DOCKER_CONFIG", config);
    c
}

/// `abox build` of the chain fixture on the stand-in, tagged under `prefix`.
fn build<'a>(c: &'a mut Command, prefix: &str) -> &'a mut Command {
    c.args(["build", "--dir"]).arg(fixtures("chain")).args([
        "--base-image",
        standin(),
        "--registry",
        prefix,
    ])
}

/// Final state per Dockerfile step from `--progress json`.
fn step_states(stderr: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for l in String::from_utf8_lossy(stderr).lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if e["event"] == "step" {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            if name.contains(" RUN ") || name.contains(" COPY ") {
                out.insert(
                    format!("{} {name}", e["image"].as_str().unwrap_or_default()),
                    e["state"].as_str().unwrap_or_default().to_string(),
                );
            }
        }
    }
    out
}

/// Export `image` through `c` and check the rootfs is the fixture's.
fn export_and_check(c: &mut Command, image: &str, out: &Path) {
    run_ok(
        c.args([
            "export",
            &format!("docker:{image}"),
            "--rootfs",
            "--name",
            "x",
            "-o",
        ])
        .arg(out),
    );
    let t = read_tar_file(&out.join("x.rootfs.tar"));
    assert!(
        t.contains_key("opt/one/hello.txt"),
        "the fixture's file is missing"
    );
    assert!(
        t.contains_key("etc/one-release"),
        "the RUN step's file is missing"
    );
}

#[test]
fn ssh_engine_builds_with_its_session_pushes_and_exports() {
    let _l = engine_lock();
    require_docker();
    let sshd = Sshd::start();
    let reg = Registry::start();
    let prefix = format!("{}/ssh", reg.host);
    let ssh_abox = || {
        let mut c = clean_abox(&reg.config_with);
        c.env("PATH", sshd.path_env())
            .env("DOCKER_HOST", sshd.url());
        c
    };
    let tags = |n: &str| {
        vec![
            format!("{prefix}/{n}:{VERSION}"),
            format!("{prefix}/{n}:latest"),
        ]
    };
    rmi(&[tags("one"), tags("two")].concat());

    // Build and push through ssh: BuildKit's progress arrives, the registry serves the image.
    let o = run_ok(build(&mut ssh_abox(), &prefix).args(["one", "--push", "--progress", "json"]));
    let states = step_states(&o.stderr);
    assert!(
        states.len() >= 2,
        "no BuildKit progress came through ssh: {states:?}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!(
            "{prefix}/one:latest@{}",
            reg.manifest_digest("ssh/one", "latest")
        )),
        "push through ssh"
    );
    let calls = sshd.call_count();
    assert!(calls >= 2, "abox did not go through ssh ({calls} calls)");
    assert!(
        std::fs::read_to_string(&sshd.calls)
            .unwrap()
            .lines()
            .all(|l| l.ends_with(&format!(
                "-l root -p {} -- 127.0.0.1 docker system dial-stdio",
                sshd.port
            ))),
        "the docker CLI's ssh arguments"
    );

    // Cold engine: the pushed image is the cache; the registry credentials reach BuildKit
    // through the session that runs over ssh.
    rmi(&tags("one"));
    sh("docker builder prune -af >/dev/null 2>&1");
    let o = run_ok(
        build(&mut ssh_abox(), &prefix)
            .args(["one", "--progress", "json", "--cache-from"])
            .arg(format!("{prefix}/{{name}}:latest")),
    );
    let states = step_states(&o.stderr);
    assert!(
        !states.is_empty() && states.values().all(|s| s == "cached"),
        "cache-from over ssh: {states:?}"
    );

    // A child image, then a docker: source streamed out over ssh.
    run_ok(build(&mut ssh_abox(), &prefix).arg("two"));
    let out = tempfile::tempdir().unwrap();
    export_and_check(
        &mut ssh_abox(),
        &format!("{prefix}/two:{VERSION}"),
        out.path(),
    );

    // The VM layer (a BuildKit build on the image) and the disk's save stream, over ssh.
    let before = sshd.call_count();
    let disk = out.path().join("two.raw");
    run_ok(
        ssh_abox()
            .args(["disk", &format!("docker:{prefix}/two:{VERSION}"), "-o"])
            .arg(&disk),
    );
    assert!(disk.is_file(), "no disk written");
    assert!(
        image_exists(&format!("{prefix}/two:{VERSION}-vm")),
        "no VM layer"
    );
    assert!(
        sshd.call_count() > before,
        "the disk did not go through ssh"
    );

    // A host key that does not match: a clear error naming the endpoint and what ssh said.
    let err = run_err(
        ssh_abox()
            .env("ABOX_TEST_KNOWN_HOSTS", sshd.dir.join("known_hosts.wrong"))
            .args(["export", &format!("docker:{prefix}/two:{VERSION}"), "-o"])
            .arg(out.path().join("never")),
    );
    assert!(err.contains(&sshd.url()), "{err}");
    assert!(err.contains("DOCKER_HOST"), "says why this endpoint: {err}");
    assert!(
        err.to_ascii_lowercase().contains("host key"),
        "ssh's own words: {err}"
    );
    assert!(
        err.contains(&sshd.dir.join("known_hosts.wrong").display().to_string()),
        "names the known_hosts file: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.path().join("never").exists());
    rmi(&[tags("one"), tags("two")].concat());
}

#[test]
fn tls_engine_builds_and_exports_and_a_wrong_ca_is_refused() {
    let _l = engine_lock();
    require_docker();
    let tls = TlsFront::start();
    let cfg = tempfile::tempdir().unwrap();
    let prefix = "abox-test-tls";
    let tls_abox = |certs: &Path| {
        let mut c = clean_abox(cfg.path());
        c.env("DOCKER_HOST", tls.url())
            .env("DOCKER_TLS_VERIFY", "1")
            .env("DOCKER_CERT_PATH", certs);
        c
    };
    run_ok(build(&mut tls_abox(&tls.certs), prefix).arg("one"));
    assert!(image_exists(&format!("{prefix}/one:{VERSION}")));
    assert!(tls.accepted() >= 2, "abox did not go through the TLS front");
    let out = tempfile::tempdir().unwrap();
    export_and_check(
        &mut tls_abox(&tls.certs),
        &format!("{prefix}/one:{VERSION}"),
        out.path(),
    );

    let err = run_err(
        tls_abox(&tls.wrong)
            .args(["export", &format!("docker:{prefix}/one:{VERSION}"), "-o"])
            .arg(out.path().join("never")),
    );
    assert!(err.contains(&tls.url()), "{err}");
    assert!(err.contains("TLS failed"), "{err}");
    assert!(
        err.contains(&tls.wrong.join("ca.pem").display().to_string()),
        "names the CA file: {err}"
    );
    // The CA alone (no client certificate, which the CLI allows): the front asks for one and
    // refuses the handshake; the error says TLS failed and names the CA.
    let ca_only = tempfile::tempdir().unwrap();
    std::fs::copy(tls.certs.join("ca.pem"), ca_only.path().join("ca.pem")).unwrap();
    let err = run_err(tls_abox(ca_only.path()).args(["export", "docker:x"]));
    assert!(err.contains("TLS failed"), "{err}");
    assert!(
        err.contains(&ca_only.path().join("ca.pem").display().to_string()),
        "{err}"
    );
    // No CA at all: refused before connecting, naming the file to provide.
    let empty = tempfile::tempdir().unwrap();
    let err = run_err(tls_abox(empty.path()).args(["export", "docker:x"]));
    assert!(
        err.contains(&empty.path().join("ca.pem").display().to_string()),
        "{err}"
    );
    rmi(&[
        format!("{prefix}/one:{VERSION}"),
        format!("{prefix}/one:latest"),
    ]);
}

#[test]
fn contexts_from_the_docker_cli_store_are_chosen_like_the_cli_chooses_them() {
    let _l = engine_lock();
    require_docker();
    let sshd = Sshd::start();
    let tls = TlsFront::start();
    let cfg = tempfile::tempdir().unwrap();
    let docker = |args: &str| {
        sh(&format!(
            "env -u DOCKER_HOST -u DOCKER_CONTEXT DOCKER_CONFIG={} docker {args}",
            cfg.path().display()
        ))
    };
    let c = tls.certs.display();
    docker(&format!(
        "context create abox-tls --docker 'host={},ca={c}/ca.pem,cert={c}/cert.pem,key={c}/key.pem' >/dev/null",
        tls.url()
    ));
    docker(&format!(
        "context create abox-ssh --docker 'host={}' >/dev/null",
        sshd.url()
    ));
    let image = standin();
    let out = tempfile::tempdir().unwrap();
    let ctx_abox = || {
        let mut c = clean_abox(cfg.path());
        c.env("PATH", sshd.path_env());
        c
    };
    // Export the stand-in (a file every stand-in has) with --log-level debug; the line saying
    // which endpoint was chosen and why.
    let export = |c: &mut Command, name: &str| -> String {
        let o = run_ok(
            c.args([
                "--log-level",
                "debug",
                "export",
                &format!("docker:{image}"),
                "--rootfs",
                "--name",
                name,
                "-o",
            ])
            .arg(out.path().join(name)),
        );
        assert!(out
            .path()
            .join(name)
            .join(format!("{name}.rootfs.tar"))
            .is_file());
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .find(|l| l.contains("engine endpoint:"))
            .unwrap_or_else(|| panic!("no endpoint line at debug level"))
            .to_string()
    };

    // DOCKER_CONTEXT → the TLS context, with the store's certificates.
    let before = tls.accepted();
    let line = export(ctx_abox().env("DOCKER_CONTEXT", "abox-tls"), "by-env");
    assert!(
        line.contains(&tls.url()) && line.contains("\"abox-tls\" from DOCKER_CONTEXT"),
        "{line}"
    );
    assert!(
        tls.accepted() > before,
        "DOCKER_CONTEXT: not through the TLS front"
    );

    // --context wins over DOCKER_CONTEXT → ssh.
    let before = sshd.call_count();
    let line = export(
        ctx_abox()
            .env("DOCKER_CONTEXT", "abox-tls")
            .args(["--context", "abox-ssh"]),
        "by-flag",
    );
    assert!(
        line.contains(&sshd.url()) && line.contains("from --context"),
        "{line}"
    );
    assert!(sshd.call_count() > before, "--context: not through ssh");

    // currentContext, as `docker context use` writes it.
    docker("context use abox-tls >/dev/null 2>&1");
    let before = tls.accepted();
    let line = export(&mut ctx_abox(), "by-config");
    assert!(line.contains("currentContext in"), "{line}");
    assert!(
        tls.accepted() > before,
        "currentContext: not through the TLS front"
    );

    // The docker CLI agrees on the name in each case (`docker context show`).
    for (env, want) in [
        ("DOCKER_CONTEXT=abox-ssh", "abox-ssh"),
        ("", "abox-tls"),
        (
            "DOCKER_HOST=unix:///var/run/docker.sock DOCKER_CONTEXT=abox-ssh",
            "default",
        ),
    ] {
        let got = sh(&format!(
            "env -u DOCKER_HOST -u DOCKER_CONTEXT DOCKER_CONFIG={} {env} docker context show 2>/dev/null",
            cfg.path().display()
        ));
        assert_eq!(got.trim(), want, "docker CLI with {env:?}");
        let mut c = ctx_abox();
        for kv in env.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap();
            c.env(k, v);
        }
        let line = export(&mut c, &format!("agree-{want}"));
        let ours = if line.contains("DOCKER_HOST") {
            "default".to_string()
        } else {
            line.split('"').nth(1).unwrap_or_default().to_string()
        };
        assert_eq!(ours, want, "abox with {env:?}: {line}");
    }

    // A context that is not there, named by currentContext: says so and how to reset it.
    std::fs::write(
        cfg.path().join("config.json"),
        r#"{"currentContext":"gone"}"#,
    )
    .unwrap();
    let err = run_err(ctx_abox().args(["export", &format!("docker:{image}")]));
    assert!(
        err.contains("\"gone\" not found") && err.contains("docker context use default"),
        "{err}"
    );
}

/// The engine cannot be reached, each way a local user meets it, and the message says what to
/// do: a socket this user may not use (permission denied: the group, sudo, a rootless socket),
/// no socket at all (is dockerd running?), an address scheme abox does not speak (which do).
/// Exit code 1, and nothing is written to the output folder.
#[test]
fn an_engine_out_of_reach_says_what_to_do() {
    common::require_root();
    require_docker();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    let socket = "/var/run/docker.sock";
    let mode = sh(&format!("stat -L -c %a {socket}"));
    assert!(
        !mode.trim().ends_with('6') && !mode.trim().ends_with('7'),
        "{socket} is open to all ({mode}): nothing to refuse"
    );
    let run = |host: Option<&str>, as_nobody: bool| -> (i32, String) {
        let mut c = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_abox"));
            c
        } else {
            abox()
        };
        for v in ["DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY"] {
            c.env_remove(v);
        }
        c.env("DOCKER_CONFIG", work.path());
        if let Some(h) = host {
            c.env("DOCKER_HOST", h);
        }
        let o = c
            .args(["export", "docker:alpine:3.20", "--rootfs", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(None, true);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("permission denied on {socket}"))
            && err.contains("usermod -aG docker")
            && err.contains("XDG_RUNTIME_DIR"),
        "{err}"
    );
    assert!(!err.contains("is dockerd running"), "{err}");
    // A socket in a folder this user cannot enter, and a socket only root may use.
    let closed = work.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    let _l1 = std::os::unix::net::UnixListener::bind(closed.join("d.sock")).unwrap();
    sh(&format!("chmod 700 {}", closed.display()));
    let (code, err) = run(Some(&format!("unix://{}/d.sock", closed.display())), true);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("permission denied on the way to"), "{err}");
    let open = work.path().join("open");
    std::fs::create_dir(&open).unwrap();
    sh(&format!(
        "chmod 755 {} {}",
        work.path().display(),
        open.display()
    ));
    let _l2 = std::os::unix::net::UnixListener::bind(open.join("d.sock")).unwrap();
    sh(&format!("chmod 660 {}/d.sock", open.display()));
    let (code, err) = run(Some(&format!("unix://{}/d.sock", open.display())), true);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only root may use it"), "{err}");
    let gone = work.path().join("no.sock");
    let (code, err) = run(Some(&format!("unix://{}", gone.display())), false);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is dockerd running?"), "{err}");
    let (code, err) = run(Some("http://127.0.0.1:2375"), false);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("speaks unix://, tcp://"), "{err}");
    assert!(!out.exists(), "nothing written");
}
