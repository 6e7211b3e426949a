//! Build secrets, SSH agent forwarding and proxies reach `RUN` steps through abox's BuildKit
//! session and build arguments, and never the image: a fixture recipe (written here, on the
//! busybox stand-in with Debian's ssh-add copied in) records the sha256 of what it saw; the test
//! checks the hashes, then searches every byte of `docker save`, the history and the config for
//! the values themselves. Needs dockerd, ssh-agent and ssh-add; fails without them.

mod common;

use std::path::Path;
use std::process::Command;

use common::engine::{engine_lock, image_exists, in_image, require_docker, rmi, standin};
use common::{abox, require_tool, run_ok, sh, sha256_hex};

const RECIPE: &str = r#"ARG BASE_IMAGE
FROM ${BASE_IMAGE}
LABEL org.alpine-boxes.test=fixture
COPY sshtools/ /
RUN --mount=type=secret,id=token sha256sum /run/secrets/token | cut -d' ' -f1 > /token.sha256
RUN --mount=type=secret,id=fromenv,required=true sha256sum /run/secrets/fromenv | cut -d' ' -f1 > /fromenv.sha256
RUN printf %s "$HTTP_PROXY" | sha256sum | cut -d' ' -f1 > /proxy.sha256 \
 && printf %s "$https_proxy" | sha256sum | cut -d' ' -f1 > /cfgproxy.sha256
RUN --mount=type=ssh ssh-add -l > /agent-keys.txt
"#;

/// Debian's ssh-add and the libraries it loads, laid out under `dir` at their own paths.
fn ssh_add_tree(dir: &Path) {
    require_tool("ssh-add");
    let files = sh("ldd /usr/bin/ssh-add | grep -o '/[^ ]*' ; echo /usr/bin/ssh-add");
    for f in files.lines().map(str::trim).filter(|f| !f.is_empty()) {
        let real = std::fs::canonicalize(f).unwrap();
        let to = dir.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&real, &to).unwrap();
    }
}

/// An ssh-agent on a private socket holding one fresh key; killed on drop.
struct Agent {
    socket: std::path::PathBuf,
    fingerprint: String,
    pid: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        require_tool("ssh-agent");
        let d = tempfile::tempdir().unwrap();
        let socket = d.path().join("agent.sock");
        let out = sh(&format!("ssh-agent -a {} -s", socket.display()));
        let pid = out
            .split(';')
            .find_map(|p| p.trim().strip_prefix("SSH_AGENT_PID="))
            .unwrap()
            .to_string();
        let key = d.path().join("key");
        sh(&format!(
            "ssh-keygen -q -t ed25519 -N '' -C abox-agent-test -f {0} && SSH_AUTH_SOCK={1} ssh-add -q {0}",
            key.display(),
            socket.display()
        ));
        let fp = sh(&format!("ssh-keygen -lf {}.pub", key.display()));
        let fingerprint = fp.split_whitespace().nth(1).unwrap().to_string();
        Agent {
            socket,
            fingerprint,
            pid,
            _dir: d,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}

#[test]
fn secrets_ssh_and_proxies_reach_run_and_never_the_image() {
    let _l = engine_lock();
    require_docker();
    let agent = Agent::start();
    let project = tempfile::tempdir().unwrap();
    let dir = project.path().join("secretive");
    std::fs::create_dir_all(dir.join("sshtools")).unwrap();
    std::fs::write(dir.join("Dockerfile"), RECIPE).unwrap();
    ssh_add_tree(&dir.join("sshtools"));

    let nonce = sha256_hex(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    let token = format!("tok-{}-file-secret", &nonce[..16]);
    let from_env = format!("env-{}-secret", &nonce[16..32]);
    let proxy = format!("http://proxy-{}.invalid:3128", &nonce[32..44]);
    let cfg_proxy = format!("http://cfgproxy-{}.invalid:8080", &nonce[44..56]);
    let secret_file = project.path().join("token.txt");
    std::fs::write(&secret_file, &token).unwrap();
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("config.json"),
        format!(r#"{{"proxies": {{"default": {{"httpsProxy": "{cfg_proxy}"}}}}}}"#),
    )
    .unwrap();

    let prefix = "abox-test-secrets";
    let image = format!("{prefix}/secretive:latest");
    rmi(std::slice::from_ref(&image));
    let build = |secret: &str| {
        let mut c = abox();
        c.env("DOCKER_CONFIG", cfg.path())
            .env("ABOX_TEST_FROM_ENV", &from_env)
            .env("HTTP_PROXY", &proxy)
            .env("SSH_AUTH_SOCK", &agent.socket)
            .args(["build", "--no-cache", "--dir"])
            .arg(project.path())
            .args(["--base-image", standin(), "--registry", prefix])
            .args(["--secret", secret])
            .args(["--secret", "id=fromenv,env=ABOX_TEST_FROM_ENV"])
            .args(["--ssh", "default"]);
        c
    };

    // A missing secret file stops abox before anything is built.
    let o = build(&format!(
        "id=token,src={}/nope.txt",
        project.path().display()
    ))
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--secret id=token") && err.contains("nope.txt"),
        "{err}"
    );
    assert!(!err.contains("building"), "a build started: {err}");
    assert!(!image_exists(&image));

    let o = run_ok(&mut build(&format!(
        "id=token,src={}",
        secret_file.display()
    )));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    for v in [&token, &from_env] {
        assert!(
            !printed.contains(v.as_str()),
            "a secret was printed: {printed}"
        );
    }

    // What the RUN steps saw.
    let seen = |f: &str| in_image(&image, &format!("cat /{f}")).trim().to_string();
    assert_eq!(
        seen("token.sha256"),
        sha256_hex(token.as_bytes()),
        "file secret"
    );
    assert_eq!(
        seen("fromenv.sha256"),
        sha256_hex(from_env.as_bytes()),
        "env secret"
    );
    assert_eq!(
        seen("proxy.sha256"),
        sha256_hex(proxy.as_bytes()),
        "HTTP_PROXY from the environment"
    );
    assert_eq!(
        seen("cfgproxy.sha256"),
        sha256_hex(cfg_proxy.as_bytes()),
        "https_proxy from proxies.default"
    );
    let keys = seen("agent-keys.txt");
    assert!(
        keys.contains(&agent.fingerprint),
        "the forwarded agent's key: {keys}"
    );

    // None of the values anywhere in the image: layers, config, history, labels.
    let save = Command::new("docker")
        .args(["save", &image])
        .output()
        .unwrap();
    assert!(save.status.success());
    let meta = sh(&format!(
        "docker image inspect {image}; docker history --no-trunc --format '{{{{.CreatedBy}}}}' {image}"
    ));
    for v in [&token, &from_env, &proxy, &cfg_proxy] {
        let needle = v.as_bytes();
        assert!(
            !save.stdout.windows(needle.len()).any(|w| w == needle),
            "{v} is in the saved image"
        );
        assert!(
            !meta.contains(v.as_str()),
            "{v} is in the config or history: {meta}"
        );
    }
    rmi(&[image]);
}
