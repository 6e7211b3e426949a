//! Remote engines on 127.0.0.1 for the endpoint tests, made of real parts started by the test:
//! Debian's `sshd` (a temporary host key, a temporary user key in `authorized_keys`,
//! `StrictModes` as default) in front of this machine's engine, reached with `ssh` and a config
//! and known_hosts the test writes; and `stunnel4` as a TLS front (client certificates required)
//! with a CA, server and client certificates made by `openssl`. Each is stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{require_root, require_tool, sh};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!(
        "{what} did not start on port {port}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `sshd` on a free port letting root in with a key, and a `bin/ssh` wrapper that uses the
/// test's config (OpenSSH reads `~/.ssh` from the password database, not `$HOME`, so the
/// wrapper is how a test gives it a config without touching root's own). Every call of the
/// wrapper is logged in `calls`.
pub struct Sshd {
    pub port: u16,
    /// Put first in PATH.
    pub bin: PathBuf,
    pub calls: PathBuf,
    /// known_hosts holding the right host key; `known_hosts.wrong` another one.
    pub dir: PathBuf,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl Sshd {
    pub fn start() -> Sshd {
        require_root();
        require_tool("ssh");
        require_tool("ssh-keygen");
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "this test needs /usr/sbin/sshd: run scripts/setup (openssh-server)"
        );
        // StrictModes checks every folder up to / for group/world write: /run is root 0755
        // (a clone under /tmp would fail it).
        let tmp = tempfile::Builder::new()
            .prefix("abox-sshd-")
            .tempdir_in("/run")
            .unwrap();
        let d = tmp.path().to_path_buf();
        sh(&format!(
            "chmod 755 {0} && mkdir -p /run/sshd && chmod 755 /run/sshd",
            d.display()
        ));
        sh(&format!(
            "cd {0} && ssh-keygen -q -t ed25519 -N '' -f host_key && ssh-keygen -q -t ed25519 -N '' -f other_host_key \
             && ssh-keygen -q -t ed25519 -N '' -f user_key && cp user_key.pub authorized_keys && chmod 600 authorized_keys",
            d.display()
        ));
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {0}/host_key\nAuthorizedKeysFile {0}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nPidFile {0}/sshd.pid\n",
                d.display()
            ),
        )
        .unwrap();
        let log = d.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for_port(port, "sshd", &log);
        let key = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
        std::fs::write(
            d.join("known_hosts"),
            format!("[127.0.0.1]:{port} {}", key("host_key.pub")),
        )
        .unwrap();
        std::fs::write(
            d.join("known_hosts.wrong"),
            format!("[127.0.0.1]:{port} {}", key("other_host_key.pub")),
        )
        .unwrap();
        // KNOWN_HOSTS lets a test swap the file; BatchMode: never a prompt.
        std::fs::write(
            d.join("ssh_config"),
            format!(
                "Host 127.0.0.1\n  IdentityFile {0}/user_key\n  IdentitiesOnly yes\n  UserKnownHostsFile ${{ABOX_TEST_KNOWN_HOSTS}}\n  \
                 StrictHostKeyChecking yes\n  BatchMode yes\n",
                d.display()
            ),
        )
        .unwrap();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let calls = d.join("ssh.calls");
        std::fs::write(
            bin.join("ssh"),
            format!(
                "#!/bin/sh\necho \"$*\" >> {calls}\nexport ABOX_TEST_KNOWN_HOSTS=\"${{ABOX_TEST_KNOWN_HOSTS:-{d}/known_hosts}}\"\nexec /usr/bin/ssh -F {d}/ssh_config \"$@\"\n",
                calls = calls.display(),
                d = d.display()
            ),
        )
        .unwrap();
        sh(&format!("chmod 755 {}/ssh", bin.display()));
        Sshd {
            port,
            bin,
            calls,
            dir: d,
            child,
            _tmp: tmp,
        }
    }

    /// `ssh://root@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("ssh://root@127.0.0.1:{}", self.port)
    }

    /// PATH with the wrapper first.
    pub fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// How many times abox (or anything) ran `ssh` through the wrapper.
    pub fn call_count(&self) -> usize {
        std::fs::read_to_string(&self.calls)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `stunnel4` on a free port: TLS with a client certificate required, forwarding to the
/// engine's socket. `certs` holds `ca.pem`, `cert.pem`, `key.pem` for the client (the
/// `DOCKER_CERT_PATH` layout); `wrong` the same client files with another CA.
pub struct TlsFront {
    pub port: u16,
    pub certs: PathBuf,
    pub wrong: PathBuf,
    log: PathBuf,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl TlsFront {
    pub fn start() -> TlsFront {
        require_tool("openssl");
        require_tool("stunnel4");
        let tmp = tempfile::Builder::new()
            .prefix("abox-tls-")
            .tempdir()
            .unwrap();
        let d = tmp.path().to_path_buf();
        let certs = d.join("certs");
        let wrong = d.join("wrong");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::create_dir_all(&wrong).unwrap();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh(&format!(
            "set -e; cd {d}
             openssl req -x509 {ec} -keyout ca-key.pem -out certs/ca.pem -days 2 -subj /CN=abox-test-ca 2>/dev/null
             openssl req {ec} -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1 2>/dev/null
             printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext
             openssl x509 -req -in server.csr -CA certs/ca.pem -CAkey ca-key.pem -CAcreateserial -out server.pem -days 2 -extfile server.ext 2>/dev/null
             openssl req {ec} -keyout certs/key.pem -out client.csr -subj /CN=abox-client 2>/dev/null
             printf 'extendedKeyUsage=clientAuth\\n' > client.ext
             openssl x509 -req -in client.csr -CA certs/ca.pem -CAkey ca-key.pem -CAcreateserial -out certs/cert.pem -days 2 -extfile client.ext 2>/dev/null
             openssl req -x509 {ec} -keyout other-ca-key.pem -out wrong/ca.pem -days 2 -subj /CN=some-other-ca 2>/dev/null
             cp certs/cert.pem certs/key.pem wrong/",
            d = d.display()
        ));
        let port = free_port();
        let log = d.join("stunnel.log");
        std::fs::write(
            d.join("stunnel.conf"),
            format!(
                "foreground = yes\npid =\ndebug = 5\noutput = {log}\n[docker]\naccept = 127.0.0.1:{port}\nconnect = /var/run/docker.sock\n\
                 cert = {d}/server.pem\nkey = {d}/server-key.pem\nCAfile = {d}/certs/ca.pem\nverifyChain = yes\nrequireCert = yes\n",
                log = log.display(),
                d = d.display()
            ),
        )
        .unwrap();
        let child = Command::new("stunnel4")
            .arg(d.join("stunnel.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "stunnel4", &log);
        TlsFront {
            port,
            certs,
            wrong,
            log,
            child,
            _tmp: tmp,
        }
    }

    /// `tcp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Connections the front accepted so far (a TLS client reached the engine through it).
    pub fn accepted(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|s| {
                s.lines()
                    .filter(|l| l.contains("accepted connection from"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
