//! Test support for the Docker engine: a stand-in base image made from this machine's
//! busybox-static (no registry can be reached here), a private `docker-registry` with basic
//! auth on 127.0.0.1, and a docker-export reader.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};

pub use super::fixtures;
use super::{require_tool, sh, Tree};

/// Tests that build or prune share BuildKit's cache; they take this lock so one test's prune
/// cannot turn another's cached step into a rebuilt one.
pub fn engine_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fail loudly unless a Docker engine answers.
pub fn require_docker() {
    require_tool("docker");
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test needs a running dockerd: run scripts/setup (it starts one)"
    );
}

/// The stand-in for `alpine:<version>` (see tests/fixtures/standin/README.md): busybox-static
/// as /bin/busybox with every applet linked, `/etc/os-release`, `passwd`, `group`, `shadow`, and
/// the `apk` stand-in with its package list; imported once, under a tag that changes with its
/// content.
pub fn standin() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| standin_image(None))
}

/// The stand-in whose `linux-virt` installs a real kernel (`kernel`, at /boot/vmlinuz-virt), for
/// boot tests of the VM layer.
pub fn standin_with_kernel(kernel: &std::path::Path) -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| standin_image(Some(kernel)))
}

fn standin_image(kernel: Option<&std::path::Path>) -> String {
    {
        require_docker();
        require_tool("busybox");
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for dir in [
            "bin",
            "etc",
            "root",
            "tmp",
            "usr/bin",
            "sbin",
            "usr/share/abox-standin",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let busybox = sh("command -v busybox");
        std::fs::copy(busybox.trim(), root.join("bin/busybox")).unwrap();
        for applet in sh("busybox --list").lines() {
            let l = root.join("bin").join(applet);
            if applet != "busybox" && !l.exists() {
                std::os::unix::fs::symlink("busybox", l).unwrap();
            }
        }
        // Also where Alpine's busybox puts them (/sbin/getty, /sbin/init…): inittab names them so.
        for path in sh("busybox --list-full").lines() {
            let l = root.join(path);
            if !path.starts_with("bin/") && std::fs::symlink_metadata(&l).is_err() {
                std::fs::create_dir_all(l.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink("/bin/busybox", l).unwrap();
            }
        }
        std::fs::write(
            root.join("etc/os-release"),
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.20.3\nPRETTY_NAME=\"stand-in for Alpine (busybox)\"\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:root\nwheel:x:10:root\n").unwrap();
        std::fs::write(root.join("etc/shadow"), "root:*::0:::::\n").unwrap();
        sh(&format!(
            "chmod 1777 {}/tmp && chmod 640 {}/etc/shadow",
            root.display(),
            root.display()
        ));
        let fx = fixtures("");
        let share = root.join("usr/share/abox-standin");
        sh(&format!(
            "cp -a {f}/standin/apk {r}/sbin/apk && cp -a {f}/standin/bin/. {r}/bin/ && cp -a {f}/standin/packages {f}/standin/files {s}/ \
             && cp -a {f}/openrc/input/etc {s}/files/",
            f = fx.display(),
            r = root.display(),
            s = share.display()
        ));
        // linux-virt's kernel: the real one given, else a PE image that boots nothing
        // (systemd's EFI stub), enough for a UEFI disk to be written.
        let k = kernel.unwrap_or(std::path::Path::new(
            "/usr/lib/systemd/boot/efi/linuxx64.efi.stub",
        ));
        std::fs::create_dir_all(share.join("files/boot")).unwrap();
        std::fs::copy(k, share.join("files/boot/vmlinuz-virt")).unwrap();
        // With the real kernel, its iso9660 module and the one it needs (the stand-in
        // tiny-cloud mounts a seed).
        if kernel.is_some() {
            let (kroot, v) = super::boot::kernel();
            std::fs::create_dir_all(share.join("files/lib/modules/abox")).unwrap();
            for m in ["cdrom", "isofs"] {
                let found = sh(&format!(
                    "find {}/lib/modules/{v} -name {m}.ko | head -n1",
                    kroot.display()
                ));
                assert!(
                    found.trim().ends_with(".ko"),
                    "no {m}.ko in the kernel package"
                );
                std::fs::copy(
                    found.trim(),
                    share.join(format!("files/lib/modules/abox/{m}.ko")),
                )
                .unwrap();
            }
        }
        // The tag follows the content, so a changed stand-in is imported anew and an unchanged
        // one is reused (repeated runs do not pile up images).
        let sum = sh(&format!(
            "cd {} && {{ find . -printf '%y %m %p %l\\n' | sort; find . -type f | sort | xargs sha256sum; }} | sha256sum | cut -c1-12",
            root.display()
        ));
        let tag = format!("abox-test/standin:{}", sum.trim());
        if !image_exists(&tag) {
            sh(&format!(
                "tar -C {} --numeric-owner --owner=0 --group=0 -c . | docker import -c 'LABEL org.alpine-boxes.test=standin' - {tag} >/dev/null",
                root.display()
            ));
        }
        tag
    }
}

/// The base recipe built on the stand-in with a real kernel (`abox build base`), tagged
/// `PREFIX/base:VERSION` and `PREFIX/base:latest`: returns those two and the VM layer's tag
/// `PREFIX/base:VERSION-SUFFIX`, all three removed first.
pub fn base_on_standin(prefix: &str, layer_suffix: &str) -> [String; 3] {
    let standin = standin_with_kernel(&super::boot::kernel_file());
    let image = format!("{prefix}/base:{}", pinned());
    let tags = [
        image.clone(),
        format!("{prefix}/base:latest"),
        format!("{image}-{layer_suffix}"),
    ];
    rmi(&tags);
    super::run_ok(
        super::abox()
            .args(["build", "base", "--dir"])
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfiles"))
            .args(["--base-image", standin, "--registry", prefix]),
    );
    tags
}

/// Remove images (ignoring the ones that are not there), then the test images left dangling
/// by tags that moved (fixtures carry the `org.alpine-boxes.test` label; nothing else is
/// touched).
pub fn rmi(refs: &[String]) {
    for r in refs {
        let _ = Command::new("docker").args(["rmi", "-f", r]).output();
    }
    let _ = Command::new("docker")
        .args([
            "image",
            "prune",
            "-f",
            "--filter",
            "label=org.alpine-boxes.test",
        ])
        .output();
}

/// The engine's ID of an image (`sha256:…`).
pub fn image_id(r: &str) -> String {
    sh(&format!("docker image inspect --format '{{{{.Id}}}}' {r}"))
        .trim()
        .to_string()
}

pub fn image_exists(r: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", r])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `docker export` of a container made from `image` (never started), as a tree, without what
/// the engine adds to every container: `/.dockerenv` and the mount targets.
pub fn docker_export_tree(image: &str) -> Tree {
    let id = sh(&format!("docker create {image} /bin/true"))
        .trim()
        .to_string();
    let out = Command::new("docker")
        .args(["export", &id])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rm", "-f", &id]).output();
    assert!(out.status.success(), "docker export failed");
    let mut t = super::read_tar(&out.stdout[..]);
    t.retain(|p, _| !engine_added(p));
    t
}

/// What the engine puts into every container's rootfs.
pub fn engine_added(p: &str) -> bool {
    matches!(
        p,
        ".dockerenv"
            | "dev"
            | "proc"
            | "sys"
            | "etc/hosts"
            | "etc/hostname"
            | "etc/resolv.conf"
            | "etc/mtab"
    ) || p.starts_with("dev/")
}

/// A `docker-registry` on 127.0.0.1 with htpasswd basic auth and temporary storage; killed
/// on drop.
pub struct Registry {
    pub host: String,
    pub user: String,
    pub password: String,
    child: Child,
    _dir: tempfile::TempDir,
    /// `DOCKER_CONFIG` folders with and without the credentials.
    pub config_with: PathBuf,
    pub config_without: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Registry {
    pub fn start() -> Registry {
        require_tool("docker-registry");
        require_tool("htpasswd");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (user, password) = ("tester".to_string(), "s3cret-Pa55word".to_string());
        sh(&format!(
            "htpasswd -Bbn {user} {password} > {}/htpasswd",
            d.display()
        ));
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(d.join("data")).unwrap();
        std::fs::write(
            d.join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {0}/data\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\nauth:\n  htpasswd:\n    realm: abox-test\n    path: {0}/htpasswd\n",
                d.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        // Wait until it answers (401 without credentials).
        let mut up = false;
        for _ in 0..100 {
            if std::net::TcpStream::connect(&host).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(up, "docker-registry did not start on {host}");
        let config_with = d.join("config-with");
        let config_without = d.join("config-without");
        std::fs::create_dir_all(&config_with).unwrap();
        std::fs::create_dir_all(&config_without).unwrap();
        let auth = sh(&format!("printf %s '{user}:{password}' | base64 -w0"));
        std::fs::write(
            config_with.join("config.json"),
            format!(
                "{{\"auths\": {{\"{host}\": {{\"auth\": \"{}\"}}}}}}",
                auth.trim()
            ),
        )
        .unwrap();
        std::fs::write(config_without.join("config.json"), "{\"auths\": {}}").unwrap();
        Registry {
            host,
            user,
            password,
            child,
            _dir: dir,
            config_with,
            config_without,
        }
    }

    /// The digest the registry serves for `repo:tag` (its Docker-Content-Digest header).
    pub fn manifest_digest(&self, repo: &str, tag: &str) -> String {
        let headers = sh(&format!(
            "curl -sf -I -u {}:{} -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' -H 'Accept: application/vnd.oci.image.manifest.v1+json' http://{}/v2/{repo}/manifests/{tag}",
            self.user, self.password, self.host
        ));
        headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("docker-content-digest")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no Docker-Content-Digest in {headers}"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pinned Alpine version, read here independently of abox: the one
/// `ARG ALPINE_VERSION=` line of `Dockerfiles/base/Dockerfile`.
pub fn pinned() -> String {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Dockerfiles/base/Dockerfile"),
    )
    .unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ARG ALPINE_VERSION="))
        .collect();
    assert_eq!(lines.len(), 1, "the pin is one line");
    lines[0].to_string()
}

/// Run a shell command in a throw-away container of `image`; its stdout.
pub fn in_image(image: &str, cmd: &str) -> String {
    sh(&format!(
        "docker run --rm --entrypoint /bin/sh {image} -c '{cmd}'"
    ))
}
