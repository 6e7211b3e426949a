//! First-boot identity (#14): users, SSH keys, passwords, hostname, time zone, DNS, NTP — from
//! flags, `abox.toml` and a setup-alpine answer file, written into WSL, LXD/Incus and disk
//! artifacts; judged by what consumes them: bsdtar extracting as `wsl --import` does, LXD
//! launching the image, and a disk booted under QEMU that a test logs into over SSH with the key.
//! Needs root (owners on extraction, LXD), bsdtar, ssh-keygen, lxd, QEMU: fails loudly without.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

/// An image with what the identity writes into: users, sshd_config, chrony, tzdata's
/// Europe/Berlin (this machine's), an `/etc/hostname` of its own, OpenRC runlevel folders, and
/// a "kernel" (systemd's EFI stub, which boots nothing) so a disk of it gets written.
fn image_desc(tiny_cloud: bool) -> String {
    let bb = sh("command -v busybox");
    let tc = if tiny_cloud {
        "f sbin/tiny-cloud 0755 #!/bin/sh\\n\n\
         f etc/init.d/tiny-cloud 0755 #!/sbin/openrc-run\\n\n\
         f etc/init.d/tiny-cloud-early 0755 #!/sbin/openrc-run\\n\n\
         f etc/init.d/tiny-cloud-final 0755 #!/sbin/openrc-run\\n\n\
         f etc/tiny-cloud.conf 0644 #CLOUD=\\n\n\
         d lib 0755\nd lib/tiny-cloud 0755\nd lib/tiny-cloud/cloud 0755\nd lib/tiny-cloud/cloud/nocloud 0755\n\
         f lib/tiny-cloud/cloud/nocloud/imds 0644 # NoCloud\\n\n\
         l etc/runlevels/sysinit/tiny-cloud-early -> /etc/init.d/tiny-cloud-early\n"
    } else {
        ""
    };
    let desc = format!(
        "d bin 0755\nH bin/busybox 0755 {bb}\nl bin/sh -> busybox\nd sbin 0755\nl sbin/init -> /bin/busybox\n\
         d etc 0755\nf etc/os-release 0644 ID=alpine\\nVERSION_ID=3.20.3\\nPRETTY_NAME=\"Alpine Linux v3.20\"\\n\n\
         f etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\nsshd:x:22:22:sshd:/run/sshd:/sbin/nologin\\n\n\
         f etc/group 0644 root:x:0:root\\nwheel:x:10:root\\nsshd:x:22:\\n\n\
         f etc/shadow 0640 root:*:19000:0:::::\\nsshd:!:19000:0:99999:7:::\\n\n\
         f etc/hostname 0644 image-host\\n\n\
         d etc/ssh 0755\nf etc/ssh/sshd_config 0644 UsePAM no\\nPermitRootLogin yes\\nPasswordAuthentication yes\\n\n\
         d etc/chrony 0755\nf etc/chrony/chrony.conf 0644 pool pool.ntp.org iburst\\ndriftfile /var/lib/chrony/chrony.drift\\n\n\
         d etc/init.d 0755\nf etc/init.d/chronyd 0755 #!/sbin/openrc-run\\n\n\
         d etc/runlevels 0755\nd etc/runlevels/default 0755\n\
         d usr 0755\nd usr/sbin 0755\nf usr/sbin/chronyd 0755 stub\nf sbin/dhcpcd 0755 stub\n\
         d usr/share 0755\nd usr/share/zoneinfo 0755\nd usr/share/zoneinfo/Europe 0755\n\
         H usr/share/zoneinfo/Europe/Berlin 0644 /usr/share/zoneinfo/Europe/Berlin\n\
         d boot 0755\nH boot/vmlinuz-virt 0644 /usr/lib/systemd/boot/efi/linuxx64.efi.stub\n\
         d home 0755\nd root 0700\nd proc 0755\nd sys 0755\nd dev 0755\nd tmp 1777\nd run 0755\nd var 0755\n\
         d etc/runlevels/sysinit 0755\nd etc/runlevels/boot 0755\n",
        bb = bb.trim()
    );
    format!("{desc}{tc}")
}

/// A key pair made by ssh-keygen: (private key path, public key line).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    require_tool("ssh-keygen");
    let k = dir.join(name);
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -C {name}@lab -f {}",
        k.display()
    ));
    let pubkey = std::fs::read_to_string(k.with_extension("pub")).unwrap();
    (k, pubkey.trim().to_string())
}

/// A crypt(3) hash is used as it is: outputs stay comparable between runs.
const HASH: &str = "$6$abcdefgh$Wq8yVhYb0t1x9kqOj6rSeVfqv3HTXGNqAnGSlDmXgR1jfdjCl4Wk2Y3JS1O5p2k2Qq5bFZxq7k0w9tNQZ.1AB/";

struct Inputs {
    dir: tempfile::TempDir,
    layout: PathBuf,
    alice: String,
    root: String,
}

fn inputs() -> Inputs {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let layout = d.join("layout");
    ImageSpec::new(&[&image_desc(true)]).write_oci(&layout, "t");
    let (_, alice) = keypair(d, "alice");
    let (_, root) = keypair(d, "root");
    std::fs::write(d.join("alice.pw"), format!("{HASH}\n")).unwrap();
    Inputs {
        dir,
        layout,
        alice,
        root,
    }
}

fn export(i: &Inputs, out: &Path, args: &[&str]) -> String {
    let o = run_ok(
        abox()
            .current_dir(i.dir.path())
            .arg("export")
            .arg(format!("oci:{}:t", i.layout.display()))
            .args(["--name", "id", "--wsl", "--wsl-package", "--lxd", "-o"])
            .arg(out)
            .args(args),
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Extract a tar as `wsl --import` does (bsdtar, numeric owners, modes kept).
fn extract(tar: &Path, to: &Path) {
    require_tool("bsdtar");
    std::fs::create_dir_all(to).unwrap();
    sh(&format!(
        "bsdtar -x -p --xattrs --numeric-owner -f {} -C {}",
        tar.display(),
        to.display()
    ));
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// (uid, gid, mode & 0o7777) of a path, not following a symlink.
fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.permissions().mode() & 0o7777)
}

#[test]
fn flags_config_and_answers_write_one_identity_into_wsl_and_lxd() {
    require_root();
    let i = inputs();
    let d = i.dir.path();
    let flags = [
        "--hostname",
        "box1",
        "--user",
        "alice",
        "--ssh-key",
        "alice.pub",
        "--root-ssh-key",
        "root.pub",
        "--password-file",
        "alice.pw",
        "--timezone",
        "Europe/Berlin",
        "--dns",
        "192.168.1.1",
        "--search-domain",
        "home.arpa",
        "--ntp",
        "10.0.0.1",
    ];
    let by_flags = d.join("flags");
    export(&i, &by_flags, &flags);

    // The same identity from abox.toml (key paths relative to its folder), a typo-free file.
    std::fs::create_dir_all(d.join("conf/keys")).unwrap();
    std::fs::copy(d.join("alice.pub"), d.join("conf/keys/alice.pub")).unwrap();
    std::fs::copy(d.join("root.pub"), d.join("conf/keys/root.pub")).unwrap();
    std::fs::copy(d.join("alice.pw"), d.join("conf/alice.pw")).unwrap();
    std::fs::write(
        d.join("conf/abox.toml"),
        "hostname = \"lab\"\nuser = \"alice\"\nssh-keys = [\"keys/alice.pub\"]\n\
         root-ssh-keys = [\"keys/root.pub\"]\npassword-file = \"alice.pw\"\n\
         timezone = \"Europe/Berlin\"\ndns = [\"192.168.1.1\"]\nsearch-domain = \"home.arpa\"\n\
         ntp = [\"10.0.0.1\"]\n\n[recipe.id]\nhostname = \"box1\"\n\n[recipe.other]\nhostname = \"x\"\n",
    )
    .unwrap();
    let by_toml = d.join("toml");
    export(&i, &by_toml, &["--config", "conf/abox.toml"]);

    // And from a setup-alpine answer file; what it cannot say (a password, NTP servers) by flags.
    std::fs::write(
        d.join("answers"),
        format!(
            "KEYMAPOPTS=none\nHOSTNAMEOPTS=box1\nUSEROPTS=\"-a -u alice\"\nUSERSSHKEY=\"{}\"\n\
             ROOTSSHKEY=\"{}\"\nTIMEZONEOPTS=\"-z Europe/Berlin\"\nDNSOPTS=\"-d home.arpa 192.168.1.1\"\n\
             NTPOPTS=chrony\nDISKOPTS=\"-m sys /dev/sda\"\nAPKREPOSOPTS=\"-1\"\n",
            i.alice, i.root
        ),
    )
    .unwrap();
    let by_answers = d.join("answers-out");
    let err = export(
        &i,
        &by_answers,
        &[
            "--answers",
            "answers",
            "--password-file",
            "alice.pw",
            "--ntp",
            "10.0.0.1",
        ],
    );
    for ignored in [
        "NTPOPTS ignored",
        "DISKOPTS ignored",
        "APKREPOSOPTS ignored",
    ] {
        assert!(
            err.contains(ignored),
            "the answer file's leftovers are said: {err}"
        );
    }
    assert!(!err.contains(HASH), "no hash in the log: {err}");

    for f in ["id.rootfs.tar.gz", "id.wsl", "id.lxd.tar.gz"] {
        let a = read_tar_file(&by_flags.join(f));
        assert_same_tree(&a, &read_tar_file(&by_toml.join(f)), &format!("{f}: toml"));
        assert_same_tree(
            &a,
            &read_tar_file(&by_answers.join(f)),
            &format!("{f}: answers"),
        );
    }
    for f in ["manifest.json", "SHA256SUMS"] {
        assert!(
            !read(&by_flags.join(f)).contains(HASH),
            "{f} holds no secret"
        );
    }

    // WSL, extracted as wsl --import does.
    let wsl = d.join("wsl");
    extract(&by_flags.join("id.rootfs.tar.gz"), &wsl);
    let conf = read(&wsl.join("etc/wsl.conf"));
    assert!(conf.contains("[user]\ndefault=alice\n"), "{conf}");
    assert!(conf.contains("[network]\nhostname=box1\n"), "{conf}");
    assert!(
        conf.contains("[time]\nuseWindowsTimezone=false\n"),
        "the zone given stays: {conf}"
    );
    assert_eq!(
        read(&wsl.join("etc/hostname")),
        "image-host\n",
        "WSL names the host from wsl.conf"
    );
    assert!(
        !wsl.join("etc/resolv.conf").exists(),
        "WSL writes resolv.conf itself"
    );
    assert!(
        read(&wsl.join("etc/chrony/chrony.conf")).starts_with("pool pool.ntp.org"),
        "WSL keeps its clock: NTP left alone"
    );
    assert!(read(&wsl.join("etc/passwd"))
        .contains("\nalice:x:1000:1000:Linux User,,,:/home/alice:/bin/sh\n"));
    assert!(read(&wsl.join("etc/group")).contains("\nwheel:x:10:root,alice\n"));
    assert!(read(&wsl.join("etc/group")).contains("\nalice:x:1000:\n"));
    assert!(read(&wsl.join("etc/shadow")).contains(&format!("\nalice:{HASH}:")));
    assert_eq!(owner_mode(&wsl.join("home/alice")), (1000, 1000, 0o755));
    assert_eq!(
        owner_mode(&wsl.join("home/alice/.ssh")),
        (1000, 1000, 0o700)
    );
    let ak = wsl.join("home/alice/.ssh/authorized_keys");
    assert_eq!(owner_mode(&ak), (1000, 1000, 0o600));
    assert_eq!(read(&ak), format!("{}\n", i.alice));
    let rk = wsl.join("root/.ssh/authorized_keys");
    assert_eq!(owner_mode(&rk), (0, 0, 0o600));
    assert_eq!(read(&rk), format!("{}\n", i.root));
    assert_eq!(
        std::fs::read_link(wsl.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/Europe/Berlin")
    );
    assert_eq!(read(&wsl.join("etc/timezone")), "Europe/Berlin\n");

    // The .wsl package: the same user, no password hash (Microsoft's rule), WSL starts as 1000.
    let pkg = d.join("pkg");
    extract(&by_flags.join("id.wsl"), &pkg);
    let shadow = read(&pkg.join("etc/shadow"));
    assert!(
        shadow.contains("\nalice:*:") && !shadow.contains("$6$"),
        "{shadow}"
    );
    let dist = read(&pkg.join("etc/wsl-distribution.conf"));
    assert!(
        dist.contains("defaultUid = 1000\n") && !dist.contains("oobe.sh"),
        "{dist}"
    );
    assert!(!pkg.join("usr/lib/wsl/oobe.sh").exists());
    assert!(
        err.contains("passwords (a .wsl package carries no password hashes"),
        "{err}"
    );

    // LXD: the hostname is kept (no templates), DNS fixed, NTP and sshd set.
    let lxd = d.join("lxd");
    extract(&by_flags.join("id.lxd.tar.gz"), &lxd);
    let meta = read(&lxd.join("metadata.yaml"));
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&meta).unwrap();
    assert_eq!(
        yaml["templates"],
        serde_yaml_ng::Value::Mapping(Default::default()),
        "{meta}"
    );
    assert!(!lxd.join("templates/hostname.tpl").exists());
    let r = lxd.join("rootfs");
    assert_eq!(read(&r.join("etc/hostname")), "box1\n");
    let hosts = read(&r.join("etc/hosts"));
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");
    assert!(
        hosts.ends_with("127.0.1.1\tbox1.home.arpa box1\n"),
        "{hosts}"
    );
    assert_eq!(
        read(&r.join("etc/resolv.conf")),
        "# Written by alpine-boxes.\nsearch home.arpa\nnameserver 192.168.1.1\n"
    );
    assert!(read(&r.join("etc/udhcpc/udhcpc.conf")).contains("RESOLV_CONF=\"no\""));
    assert!(read(&r.join("etc/dhcpcd.conf")).ends_with("\nnohook resolv.conf\n"));
    // The running hostname in a container: abox's service (LXD names it after the instance).
    assert!(read(&r.join("etc/init.d/abox-hostname")).contains("hostname -F /etc/hostname"));
    assert_eq!(
        owner_mode(&r.join("etc/init.d/abox-hostname")),
        (0, 0, 0o755)
    );
    assert_eq!(
        std::fs::read_link(r.join("etc/runlevels/boot/abox-hostname")).unwrap(),
        Path::new("/etc/init.d/abox-hostname")
    );
    assert_eq!(
        read(&r.join("etc/chrony/chrony.conf")),
        "server 10.0.0.1 iburst\ndriftfile /var/lib/chrony/chrony.drift\n"
    );
    assert_eq!(
        std::fs::read_link(r.join("etc/runlevels/default/chronyd")).unwrap(),
        Path::new("/etc/init.d/chronyd")
    );
    let sshd = read(&r.join("etc/ssh/sshd_config"));
    assert!(
        sshd.starts_with("# alpine-boxes: first-boot identity\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\n"),
        "a root key: root by key only; a password given: password logins stay: {sshd}"
    );
    assert!(sshd.contains("\n#PermitRootLogin yes"), "{sshd}");
    assert_eq!(
        owner_mode(&r.join("home/alice/.ssh/authorized_keys")),
        (1000, 1000, 0o600)
    );
}

/// Bad input: a clear error naming the input, exit code not 0, nothing written.
#[test]
fn bad_identity_input_is_refused_before_anything_is_written() {
    let i = inputs();
    let d = i.dir.path();
    std::fs::write(d.join("bad.pub"), "ssh-ed25519 AAAAnotakey alice@lab\n").unwrap();
    std::fs::write(d.join("typo.toml"), "hostname = \"a\"\nusr = \"alice\"\n").unwrap();
    std::fs::write(d.join("answers"), "HOSTNAMEOPTS=$(hostname)\n").unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--user", "alice", "--ssh-key", "bad.pub"],
            &["--ssh-key bad.pub", "line 1", "base64"],
        ),
        (
            &["--user", "alice", "--ssh-key", "missing.pub"],
            &["missing.pub", "cannot read"],
        ),
        (
            &["--user", "alice", "--ssh-key", "alice"],
            &["private key", ".pub"],
        ),
        (
            &["--user", "Alice Smith"],
            &["\"Alice Smith\"", "adduser would refuse"],
        ),
        (&["--ssh-key", "alice.pub"], &["--ssh-key needs --user"]),
        (&["--timezone", "Mars/Olympus"], &["Mars/Olympus", "tzdata"]),
        (
            &["--timezone", "../../etc/passwd"],
            &["not a time zone name"],
        ),
        (&["--hostname", "box_1"], &["--hostname \"box_1\""]),
        (
            &["--dns", "1.1.1.1,dns.example"],
            &["dns.example", "not an IPv4 or IPv6"],
        ),
        (&["--config", "typo.toml"], &["typo.toml", "usr", "line 2"]),
        (
            &["--answers", "answers"],
            &["answers", "line 1", "command substitution"],
        ),
        (
            &["--keymap", "de de"],
            &["/usr/share/bkeymaps/de/de.bmap.gz", "kbd-bkeymaps"],
        ),
    ];
    for (n, (args, says)) in cases.iter().enumerate() {
        let out = d.join(format!("out{n}"));
        let mut c = abox();
        c.current_dir(d)
            .arg("disk")
            .arg(format!("oci:{}:t", i.layout.display()))
            .arg("-o")
            .arg(out.join("x.qcow2"))
            .args(*args);
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        for s in *says {
            assert!(err.contains(s), "{args:?}: {s:?} not in: {err}");
        }
        assert!(
            files_in(&out).is_empty() || !out.exists(),
            "{args:?}: left {:?}",
            files_in(&out)
        );
    }
}

/// `--cloud-init` on an image without tiny-cloud (and not a docker: Alpine image the VM layer
/// could add it to): the error says what to add; nothing is written.
#[test]
fn cloud_init_without_tiny_cloud_says_what_to_add() {
    let i = inputs();
    let plain = i.dir.path().join("plain");
    ImageSpec::new(&[&image_desc(false)]).write_oci(&plain, "t");
    for target in ["disk", "export"] {
        let out = i.dir.path().join(format!("out-{target}"));
        let mut c = abox();
        c.arg(target).arg(format!("oci:{}:t", plain.display()));
        if target == "export" {
            c.args(["--lxd", "-o"]).arg(&out);
        } else {
            c.arg("-o").arg(out.join("x.qcow2"));
        }
        let err = run_err(c.arg("--cloud-init"));
        assert!(
            err.contains("--cloud-init: the image has no tiny-cloud")
                && err.contains("apk add tiny-cloud-nocloud"),
            "{target}: {err}"
        );
        assert!(files_in(&out).is_empty(), "{target}: {:?}", files_in(&out));
    }
}

/// A home the image points elsewhere with a symlink is refused (following it would hand the
/// user another folder, root's `.ssh` for `/home/alice -> /root`); a home the image has as a
/// real folder is left as it is, its `.ssh` the user's.
#[test]
fn homes_are_real_folders_or_refused() {
    let i = inputs();
    let d = i.dir.path();
    let linked = d.join("linked");
    ImageSpec::new(&[
        &image_desc(false),
        "d root/.ssh 0700\nf root/.ssh/authorized_keys 0600 root-key\\n\nl home/alice -> /root\n",
    ])
    .write_oci(&linked, "t");
    let out = d.join("out-linked");
    let err = run_err(
        abox()
            .current_dir(d)
            .arg("export")
            .arg(format!("oci:{}:t", linked.display()))
            .args(["--lxd", "-o"])
            .arg(&out)
            .args(["--user", "alice", "--ssh-key", "alice.pub"]),
    );
    assert!(
        err.contains("the user's home /home/alice") && err.contains("not a folder"),
        "{err}"
    );
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));

    let made = d.join("made");
    ImageSpec::new(&[&image_desc(false), "d home/alice 0755\n"]).write_oci(&made, "t");
    let out = d.join("out-made");
    run_ok(
        abox()
            .current_dir(d)
            .arg("export")
            .arg(format!("oci:{}:t", made.display()))
            .args(["--lxd", "--name", "m", "-o"])
            .arg(&out)
            .args(["--user", "alice", "--ssh-key", "alice.pub"]),
    );
    let t = read_tar_file(&out.join("m.lxd.tar.gz"));
    let node = |p: &str| t.get(p).unwrap_or_else(|| panic!("{p} missing"));
    let h = node("rootfs/home/alice");
    assert_eq!(
        (h.uid, h.gid, h.mode & 0o7777),
        (0, 0, 0o755),
        "the image's home kept"
    );
    let s = node("rootfs/home/alice/.ssh");
    assert_eq!((s.uid, s.gid, s.mode & 0o7777), (1000, 1000, 0o700));
    let k = node("rootfs/home/alice/.ssh/authorized_keys");
    assert_eq!((k.uid, k.gid, k.mode & 0o7777), (1000, 1000, 0o600));
}

/// LXD launches the image: inside, the hostname file, the user and its keys are there.
#[test]
fn lxd_launch_shows_the_identity_inside() {
    require_lxd();
    let i = inputs();
    let out = i.dir.path().join("out");
    run_ok(
        abox()
            .current_dir(i.dir.path())
            .arg("export")
            .arg(format!("oci:{}:t", i.layout.display()))
            .args(["--name", "id", "--lxd", "-o"])
            .arg(&out)
            .args([
                "--hostname",
                "box1",
                "--user",
                "alice",
                "--ssh-key",
                "alice.pub",
            ])
            .args(["--timezone", "Europe/Berlin", "--cloud-init"]),
    );
    let alias = format!("abox-identity-{}", std::process::id());
    let name = format!("abox-id-{}", std::process::id());
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new("lxc")
                .args(["delete", "--force", &self.1])
                .output();
            let _ = std::process::Command::new("lxc")
                .args(["image", "delete", &self.0])
                .output();
        }
    }
    let _c = Cleanup(alias.clone(), name.clone());
    sh(&format!(
        "lxc image import {} --alias {alias}",
        out.join("id.lxd.tar.gz").display()
    ));
    // The user data given to the instance, as distrobuilder's cloud images take it.
    let user_data = "#cloud-config\nhostname: from-lxd\n";
    let o = std::process::Command::new("lxc")
        .args(["launch", &alias, &name, "-c"])
        .arg(format!("cloud-init.user-data={user_data}"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "lxc launch: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        sh(&format!("lxc info --show-log local:{name} 2>&1 || true"))
    );
    let cloud = sh(&format!(
        "lxc exec {name} -- /bin/sh -c 'cat /var/lib/cloud/user-data; echo ---; \
         cat /var/lib/cloud/seed/nocloud-net/user-data; echo ---; cat /var/lib/cloud/meta-data; \
         echo ---; ls -a /var/lib/cloud; echo ---; cat /etc/tiny-cloud.conf; echo ---; \
         ls /etc/runlevels/sysinit /etc/runlevels/boot /etc/runlevels/default'"
    ));
    let parts: Vec<&str> = cloud.split("---\n").collect();
    assert_eq!(parts[0].trim_end(), user_data.trim_end(), "{cloud}");
    assert_eq!(parts[1].trim_end(), user_data.trim_end(), "{cloud}");
    assert!(
        parts[2].contains(&format!("instance-id: {name}\n"))
            && parts[2].contains("local-hostname: box1\n"),
        "meta-data: the instance, the --hostname: {cloud}"
    );
    assert!(parts[3].contains(".nocloud_loaded"), "{cloud}");
    assert!(
        parts[4].contains("CLOUD=\"nocloud\"\n") && parts[4].contains("CLOUD_USER=\"alice\"\n"),
        "{cloud}"
    );
    assert!(
        !parts[4].contains("expand_root"),
        "a container's root is not grown: {cloud}"
    );
    // What the instance's config does not give: DHCP on eth0, an empty cloud-config.
    let net = sh(&format!(
        "lxc exec {name} -- /bin/sh -c 'cat /var/lib/cloud/seed/nocloud-net/network-config /var/lib/cloud/seed/nocloud-net/vendor-data'"
    ));
    assert!(
        net.contains("name: eth0\n")
            && net.contains("- type: dhcp\n")
            && net.ends_with("#cloud-config\n{}\n\n"),
        "{net}"
    );
    let links: Vec<&str> = parts[5].split_whitespace().collect();
    for l in ["tiny-cloud-early", "tiny-cloud", "tiny-cloud-final"] {
        assert_eq!(
            links.iter().filter(|x| **x == l).count(),
            1,
            "{l} once: {cloud}"
        );
    }
    let got = sh(&format!(
        "lxc exec {name} -- /bin/sh -c 'cat /etc/hostname; id alice; \
         stat -c \"%u %g %a\" /home/alice/.ssh /home/alice/.ssh/authorized_keys; \
         cat /home/alice/.ssh/authorized_keys; readlink /etc/localtime; env -u TZ date +%Z'"
    ));
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(
        lines[0], "box1",
        "the given hostname, not the instance name: {got}"
    );
    assert!(
        lines[1].starts_with("uid=1000(alice) gid=1000(alice)") && lines[1].contains("10(wheel)"),
        "{got}"
    );
    assert_eq!(lines[2], "1000 1000 700", "{got}");
    assert_eq!(lines[3], "1000 1000 600", "{got}");
    assert_eq!(lines[4], i.alice, "{got}");
    assert_eq!(lines[5], "/usr/share/zoneinfo/Europe/Berlin", "{got}");
    assert!(lines[6] == "CET" || lines[6] == "CEST", "{got}");
}

/// The stand-in's init: mounts, the virtio-net modules, a static address on QEMU's user
/// network, the hostname from /etc/hostname, Debian's sshd; then it says so on the console.
const SSH_INIT: &str = r#"#!/bin/busybox sh
b=/bin/busybox
$b mount -t proc proc /proc
$b mount -t sysfs sys /sys
$b mount -t tmpfs tmpfs /run
$b mount -t tmpfs tmpfs /tmp
$b mkdir -p /dev/pts /run/sshd
$b mount -t devpts devpts /dev/pts
for m in failover net_failover virtio_net; do $b insmod /lib/abox-modules/$m.ko; done
$b hostname -F /etc/hostname
$b ip link set lo up
$b ip link set eth0 up
$b ip addr add 10.0.2.15/24 dev eth0
$b ip route add default via 10.0.2.2
/usr/sbin/sshd -e -f /etc/ssh/sshd_config 2>/dev/ttyS0
echo "ABOX-TEST ready" > /dev/ttyS0
while :; do $b sleep 3600; done
"#;

/// Run ssh against the guest: (exit code, stdout, stderr). The guest's sshd daemonizes before
/// it listens, so a connection QEMU's user network resets before the server's banner (nothing
/// listening yet, on a loaded machine) is tried again, for up to a minute.
fn ssh(port: u16, key: &Path, user: &str, extra: &[&str], cmd: &str) -> (i32, String, String) {
    let start = std::time::Instant::now();
    loop {
        let got = ssh_once(port, key, user, extra, cmd);
        let not_yet = got.0 == 255
            && (got.2.contains("kex_exchange_identification")
                || got.2.contains("Connection refused"));
        if !not_yet || start.elapsed() > std::time::Duration::from_secs(60) {
            return got;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

fn ssh_once(port: u16, key: &Path, user: &str, extra: &[&str], cmd: &str) -> (i32, String, String) {
    let o = std::process::Command::new("ssh")
        .args(["-F", "/dev/null", "-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "ConnectTimeout=60", "-o", "LogLevel=ERROR"])
        .args(extra)
        .arg(format!("{user}@127.0.0.1"))
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).replace('\r', ""),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A disk made with --user, --ssh-key, --hostname, --timezone boots under QEMU on the busybox
/// stand-in with Debian's sshd copied in; the test logs in over SSH with the key as that user.
/// The image's sshd_config allows root and passwords and root has the key in its own
/// authorized_keys: after abox, root is refused (no --root-ssh-key) and the server offers no
/// password login (a key and no password given).
#[test]
fn ssh_key_login_on_a_booted_disk() {
    require_root();
    for t in [
        "qemu-system-x86_64",
        "qemu-img",
        "ssh",
        "sshd",
        "syslinux",
        "mtype",
    ] {
        require_tool(t);
    }
    let i = inputs();
    let d = i.dir.path();
    let (root, v) = common::boot::kernel();
    let initrd = d.join("initrd");
    common::boot::initramfs(&initrd);
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}/hostkey",
        d.display()
    ));
    std::fs::write(d.join("init"), SSH_INIT).unwrap();
    let mut mods = String::from("d lib 0755\nd lib/abox-modules 0755\n");
    for m in ["failover", "net_failover", "virtio_net"] {
        let found = sh(&format!(
            "find {}/lib/modules/{v} -name '{m}.ko' | head -n1",
            root.display()
        ));
        assert!(
            found.trim().ends_with(".ko"),
            "module {m} not in the kernel package"
        );
        mods.push_str(&format!(
            "H lib/abox-modules/{m}.ko 0644 {}\n",
            found.trim()
        ));
    }
    let bb = sh("command -v busybox");
    let base = format!(
        "d bin 0755\nH bin/busybox 0755 {bb}\nl bin/sh -> busybox\nd sbin 0755\nH sbin/init 0755 {init}\n\
         d etc 0755\nf etc/os-release 0644 ID=debian-standin\\n\n\
         f etc/passwd 0644 root:x:0:0:root:/root:/bin/sh\\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\\n\n\
         f etc/group 0644 root:x:0:\\nwheel:x:10:root\\nnogroup:x:65534:\\n\n\
         f etc/shadow 0640 root:*:19000:0:::::\\nsshd:!:19000:0:99999:7:::\\n\n\
         f etc/nsswitch.conf 0644 passwd: files\\ngroup: files\\nshadow: files\\n\n\
         d etc/ssh 0755\nf etc/ssh/sshd_config 0644 UsePAM no\\nPermitRootLogin yes\\nPasswordAuthentication yes\\nHostKey /etc/ssh/ssh_host_ed25519_key\\nPidFile /run/sshd.pid\\n\n\
         H etc/ssh/ssh_host_ed25519_key 0600 {hk}\n\
         d root 0700\nd root/.ssh 0700\nf root/.ssh/authorized_keys 0600 {alice}\\n\n\
         d usr 0755\nd usr/share 0755\nd usr/share/zoneinfo 0755\nd usr/share/zoneinfo/Europe 0755\n\
         H usr/share/zoneinfo/Europe/Berlin 0644 /usr/share/zoneinfo/Europe/Berlin\n\
         d home 0755\nd proc 0555\nd sys 0555\nd dev 0755\nd tmp 1777\nd run 0755\n\
         d boot 0755\nH boot/vmlinuz-{v} 0644 {k}\nH boot/initrd.img-{v} 0644 {initrd}\n",
        bb = bb.trim(),
        init = d.join("init").display(),
        hk = d.join("hostkey").display(),
        alice = i.alice,
        k = common::boot::kernel_file().display(),
        initrd = initrd.display(),
    );
    let programs = common::boot::host_programs(&["sshd"]);
    let lay = d.join("ssh-layout");
    ImageSpec::new(&[&base, &mods, &programs]).write_oci(&lay, "t");
    let disk = d.join("box.qcow2");
    run_ok(
        abox()
            .current_dir(d)
            .arg("disk")
            .arg(format!("oci:{}:t", lay.display()))
            .arg("-o")
            .arg(&disk)
            .args([
                "--hostname",
                "box1",
                "--user",
                "alice",
                "--ssh-key",
                "alice.pub",
            ])
            .args(["--timezone", "Europe/Berlin"]),
    );
    let port = common::remote::free_port();
    let key = d.join("alice");
    let got = std::sync::Mutex::new(None);
    let console = common::boot::boot_nic_until(
        &disk,
        "qcow2",
        common::boot::Bus::Virtio,
        common::boot::Fw::Bios,
        &format!("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22"),
        &[],
        &|t| {
            if !t.contains("ABOX-TEST ready") {
                return false;
            }
            let login = ssh(
                port,
                &key,
                "alice",
                &["-o", "BatchMode=yes"],
                "hostname; date +%Z; id; echo ok",
            );
            let root_login = ssh(port, &key, "root", &["-o", "BatchMode=yes"], "id");
            // A password attempt: the server must not even offer it.
            let askpass = key.with_file_name("askpass");
            std::fs::write(&askpass, "#!/bin/sh\necho alice\n").unwrap();
            sh(&format!("chmod 755 {}", askpass.display()));
            let o = std::process::Command::new("ssh")
                .args(["-F", "/dev/null", "-p", &port.to_string()])
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ])
                .args([
                    "-o",
                    "PubkeyAuthentication=no",
                    "-o",
                    "NumberOfPasswordPrompts=1",
                ])
                .args([
                    "-o",
                    "PreferredAuthentications=password,keyboard-interactive",
                ])
                .env("SSH_ASKPASS", &askpass)
                .env("SSH_ASKPASS_REQUIRE", "force")
                .env("DISPLAY", ":0")
                .arg("alice@127.0.0.1")
                .arg("id")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let password = (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            );
            *got.lock().unwrap() = Some((login, root_login, password));
            true
        },
    );
    let (login, root_login, password) = got.into_inner().unwrap().expect("the guest came up");
    let (code, out, err) = login;
    assert_eq!(
        code, 0,
        "key login as alice: {err}\n--- console ---\n{console}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "box1", "{out}");
    assert!(lines[1] == "CET" || lines[1] == "CEST", "{out}");
    assert!(
        lines[2].starts_with("uid=1000(alice) gid=1000(alice)") && lines[2].contains("10(wheel)"),
        "{out}"
    );
    assert_eq!(lines[3], "ok");
    assert_ne!(root_login.0, 0, "root refused: {:?}", root_login);
    assert!(
        root_login.2.contains("Permission denied"),
        "{:?}",
        root_login
    );
    assert_ne!(password.0, 0, "password login refused: {:?}", password);
    assert!(
        password.1.contains("Permission denied (publickey)"),
        "only keys are offered: {:?}",
        password
    );
}

/// `--cloud-init`, wired end to end on the stand-in (tiny-cloud cannot be installed here: there
/// is no Alpine mirror): the base recipe built on the stand-in, a disk of it with --cloud-init
/// (the VM layer asks apk for tiny-cloud-nocloud next to the kernel), a seed from `abox seed`
/// attached as a second NVMe drive. At boot, tiny-cloud's services are in the runlevels
/// `tiny-cloud --setup` puts them in, and the stand-in tiny-cloud (what tiny-cloud's NoCloud
/// datasource does: find LABEL=cidata, mount it as iso9660, read meta-data) sets the hostname
/// from the seed, reading the configuration abox wrote.
#[test]
fn cloud_init_on_the_standin_takes_the_hostname_from_a_seed() {
    require_root();
    for t in [
        "qemu-system-x86_64",
        "qemu-img",
        "syslinux",
        "mtype",
        "xorriso",
    ] {
        require_tool(t);
    }
    let _l = common::engine::engine_lock();
    let tags = common::engine::base_on_standin("abox-test-cloud", "vm-cloud");
    let image = tags[0].clone();
    let i = inputs();
    let d = i.dir.path();
    std::fs::write(d.join("user-data"), "#cloud-config\n{}\n").unwrap();
    std::fs::write(
        d.join("meta-data"),
        "instance-id: iid-seeded\nlocal-hostname: seeded-box\n",
    )
    .unwrap();
    let seed = d.join("seed.iso");
    run_ok(
        abox()
            .current_dir(d)
            .args([
                "seed",
                "--user-data",
                "user-data",
                "--meta-data",
                "meta-data",
                "-o",
            ])
            .arg(&seed),
    );
    let disk = d.join("cloud.qcow2");
    let o = run_ok(
        abox()
            .current_dir(d)
            .args(["disk", &format!("docker:{image}"), "-o"])
            .arg(&disk)
            .args(["--cloud-init", "--user", "alice", "--ssh-key", "alice.pub"]),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("adding a kernel and tiny-cloud"), "{err}");
    assert_eq!(
        common::engine::in_image(&tags[2], "tail -n1 /var/lib/abox-standin/apk.log"),
        "add --no-cache linux-virt mkinitfs syslinux tiny-cloud-nocloud\n"
    );
    let seed_drive = [
        "-drive".to_string(),
        format!(
            "file={},if=none,id=seed,format=raw,readonly=on",
            seed.display()
        ),
        "-device".into(),
        "nvme,drive=seed,serial=seed".into(),
    ];
    let log = common::boot::boot_nic_until(
        &disk,
        "qcow2",
        common::boot::Bus::Nvme,
        common::boot::Fw::Bios,
        "none",
        &seed_drive,
        &|t| t.contains("ABOX-TINY-CLOUD"),
    );
    let line = |prefix: &str| {
        log.lines()
            .find(|l| l.trim().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} on the console:\n{log}"))
            .trim()
            .to_string()
    };
    let boot = line("ABOX-OPENRC boot:");
    assert!(
        boot.split_whitespace().any(|s| s == "tiny-cloud-early"),
        "{boot}"
    );
    let default = line("ABOX-OPENRC default:");
    for s in ["tiny-cloud", "tiny-cloud-net", "tiny-cloud-final"] {
        assert!(default.split_whitespace().any(|x| x == s), "{s}: {default}");
    }
    assert_eq!(
        line("ABOX-TINY-CLOUD"),
        "ABOX-TINY-CLOUD cloud=nocloud user=alice skip=expand_root hostname=seeded-box",
        "{log}"
    );
    common::engine::rmi(&tags);
}

/// `--wsl-user` names WSL's default user; `--user` is still created.
#[test]
fn wsl_user_flag_wins_over_the_identity_user() {
    let i = inputs();
    let out = i.dir.path().join("out");
    run_ok(
        abox()
            .current_dir(i.dir.path())
            .arg("export")
            .arg(format!("oci:{}:t", i.layout.display()))
            .args(["--wsl", "--name", "w", "-o"])
            .arg(&out)
            .args(["--user", "alice", "--wsl-user", "root"]),
    );
    let (_, _, _, conf) = tar_entry(&out.join("w.rootfs.tar.gz"), "etc/wsl.conf");
    let conf = String::from_utf8(conf).unwrap();
    assert!(conf.contains("[user]\ndefault=root\n"), "{conf}");
    let (_, _, _, passwd) = tar_entry(&out.join("w.rootfs.tar.gz"), "etc/passwd");
    assert!(String::from_utf8(passwd)
        .unwrap()
        .contains("\nalice:x:1000:1000:"));
}

/// On a disk: the keymap (the image's kbd-bkeymaps map linked, loadkmap configured and in the
/// boot runlevel), the hostname in /etc/hostname and /etc/hosts, root's key with sshd allowing
/// root by key only — read back from the disk's root filesystem with debugfs.
#[test]
fn keymap_hostname_and_root_key_on_a_disk() {
    require_root();
    for t in ["qemu-img", "syslinux", "mtype", "debugfs", "sfdisk"] {
        require_tool(t);
    }
    let i = inputs();
    let d = i.dir.path();
    let lay = d.join("kbd");
    ImageSpec::new(&[
        &image_desc(false),
        "d usr/share/bkeymaps 0755\nd usr/share/bkeymaps/de 0755\n\
         f usr/share/bkeymaps/de/de-nodeadkeys.bmap.gz 0644 bmap\n\
         f etc/init.d/loadkmap 0755 #!/sbin/openrc-run\\n\n",
    ])
    .write_oci(&lay, "t");
    let disk = d.join("kbd.img");
    run_ok(
        abox()
            .current_dir(d)
            .arg("disk")
            .arg(format!("oci:{}:t", lay.display()))
            .arg("-o")
            .arg(&disk)
            .args(["--keymap", "de de-nodeadkeys", "--hostname", "kbd1"])
            .args(["--root-ssh-key", "root.pub"]),
    );
    let fs = d.join("root.ext4");
    common::boot::extract_partition(&disk, &fs);
    let cat = |p: &str| common::boot::debugfs(&fs, &format!("cat {p}"));
    let stat = |p: &str| common::boot::debugfs(&fs, &format!("stat {p}"));
    let link = stat("/etc/keymap/de-nodeadkeys.bmap.gz");
    assert!(
        link.contains("Type: symlink")
            && link.contains("/usr/share/bkeymaps/de/de-nodeadkeys.bmap.gz"),
        "{link}"
    );
    assert_eq!(
        cat("/etc/conf.d/loadkmap"),
        "KEYMAP=/etc/keymap/de-nodeadkeys.bmap.gz\n"
    );
    assert!(stat("/etc/runlevels/boot/loadkmap").contains("/etc/init.d/loadkmap"));
    assert_eq!(cat("/etc/hostname"), "kbd1\n");
    assert!(cat("/etc/hosts").ends_with("127.0.1.1\tkbd1\n"));
    assert_eq!(cat("/root/.ssh/authorized_keys"), format!("{}\n", i.root));
    let keys = stat("/root/.ssh/authorized_keys");
    assert!(
        keys.contains("Mode:  0600") && keys.contains("User:     0"),
        "{keys}"
    );
    assert!(cat("/etc/ssh/sshd_config").contains(
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
    ));
}

/// Hostile or odd images: what the identity would write through links, into folders, into
/// files shared with others, or over another account's home is refused with a message naming
/// it; a .wsl package never carries a hash the image kept behind a link; a new user without
/// keys still gets a home.
#[test]
fn odd_images_are_refused_or_handled_safely() {
    let i = inputs();
    let d = i.dir.path();
    let base = image_desc(false);
    let drop_line = |prefix: &str| -> String {
        base.lines()
            .filter(|l| !l.starts_with(prefix))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let run = |name: &str, layers: &[&str], target: &str, args: &[&str]| {
        let lay = d.join(format!("odd-{name}"));
        ImageSpec::new(layers).write_oci(&lay, "t");
        let out = d.join(format!("out-{name}"));
        let o = abox()
            .current_dir(d)
            .arg("export")
            .arg(format!("oci:{}:t", lay.display()))
            .args([target, "--name", "o", "-o"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        (o, out)
    };
    let refused = |name: &str, layers: &[&str], args: &[&str], says: &[&str]| {
        let (o, out) = run(name, layers, "--lxd", args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        for s in says {
            assert!(err.contains(s), "{name}: {s:?} not in: {err}");
        }
        assert!(files_in(&out).is_empty(), "{name}: {:?}", files_in(&out));
    };
    let no_shadow = drop_line("f etc/shadow ");
    let no_passwd = drop_line("f etc/passwd ");
    refused(
        "passwd-link",
        &[
            &no_passwd,
            "f etc/passwd.real 0644 root:x:0:0::/root:/bin/sh\\n\nl etc/passwd -> passwd.real\n",
        ],
        &["--user", "alice"],
        &["/etc/passwd is not a regular", "--user"],
    );
    refused(
        "sshd-is-shadow",
        &[
            &drop_line("f etc/ssh/sshd_config "),
            "l etc/ssh/sshd_config -> ../shadow\n",
        ],
        &[
            "--user",
            "alice",
            "--ssh-key",
            "alice.pub",
            "--password-file",
            "alice.pw",
        ],
        &["/etc/shadow would be written twice"],
    );
    refused(
        "shadow-folder",
        &[&no_shadow, "d etc/shadow 0755\nf etc/shadow/x 0644 x\n"],
        &["--root-password-file", "alice.pw"],
        &["/etc/shadow is a folder in the image"],
    );
    refused(
        "runlevel-link",
        &[
            &drop_line("d etc/runlevels/default "),
            "d elsewhere 0755\nl etc/runlevels/default -> /elsewhere\n",
        ],
        &["--ntp", "10.0.0.1"],
        &["/etc/runlevels/default in the image is not a folder"],
    );
    refused(
        "keys-shared",
        &[
            &no_passwd,
            "f etc/passwd 0644 root:x:0:0::/root:/bin/sh\\nbob:x:1000:1000::/home/bob:/bin/sh\\n\n\
             f etc/doas.conf 0400 permit nopass :wheel\\n\nd home/bob 0755\nd home/bob/.ssh 0700\n\
             h home/bob/.ssh/authorized_keys => etc/doas.conf\n",
        ],
        &["--user", "bob", "--ssh-key", "alice.pub"],
        &["authorized_keys shares its file with other names"],
    );
    refused(
        "home-is-roots",
        &[
            &no_passwd,
            "f etc/passwd 0644 root:x:0:0::/root:/bin/sh\\nbob:x:1000:1000::/root:/bin/sh\\n\n",
        ],
        &["--user", "bob", "--ssh-key", "alice.pub"],
        &["home /root is also root's"],
    );

    // The .wsl package: a hash behind a link to a path the package drops stays out.
    let (o, out) = run(
        "wsl-hash",
        &[&no_shadow, "f .dockerenv 0640 root:$6$IMAGEsalt$IMAGEHASH:19000:0:::::\\n\nl etc/shadow -> ../.dockerenv\n"],
        "--wsl-package",
        &["--root-ssh-key", "root.pub"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pkg = std::fs::read(out.join("o.wsl")).unwrap();
    let mut all = Vec::new();
    use std::io::Read;
    flate2::read::MultiGzDecoder::new(&pkg[..])
        .read_to_end(&mut all)
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&all).contains("IMAGEHASH"),
        "no image hash in the package"
    );

    // A new user with a password and no keys: a home of its own all the same.
    let (o, out) = run(
        "no-keys",
        &[&base],
        "--wsl",
        &["--user", "alice", "--password-file", "alice.pw"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = read_tar_file(&out.join("o.rootfs.tar.gz"));
    let h = t.get("home/alice").expect("a home for alice");
    assert_eq!((h.kind, h.uid, h.gid, h.mode), ('d', 1000, 1000, 0o755));
}
