//! `abox seed`: the NoCloud seed ISO, read back with isoinfo (genisoimage) as a guest's
//! cloud-init would find it: volume `cidata`, the files under their names, their bytes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{abox, files_in, require_tool, run_err, run_ok};

fn isoinfo(iso: &Path, args: &[&str]) -> String {
    let o = Command::new("isoinfo")
        .args(args)
        .arg("-i")
        .arg(iso)
        .output()
        .unwrap();
    assert!(o.status.success(), "isoinfo {args:?}: {o:?}");
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn seed_iso_is_a_nocloud_volume_with_the_files_given() {
    require_tool("xorriso");
    require_tool("isoinfo");
    let d = tempfile::tempdir().unwrap();
    let user = "#cloud-config\nhostname: seeded\nusers:\n  - name: ops\n";
    let meta = "instance-id: lab-1\nlocal-hostname: seeded\n";
    let net = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n";
    for (n, t) in [("user.yaml", user), ("meta.yaml", meta), ("net.yaml", net)] {
        std::fs::write(d.path().join(n), t).unwrap();
    }
    let iso = d.path().join("out/vm1/seed.iso");
    let seed = |iso: &Path| {
        run_ok(
            abox()
                .current_dir(d.path())
                .args([
                    "seed",
                    "--user-data",
                    "user.yaml",
                    "--meta-data",
                    "meta.yaml",
                ])
                .args(["--network-config", "net.yaml", "-o"])
                .arg(iso),
        )
    };
    let o = seed(&iso);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        iso.display().to_string()
    );
    assert!(isoinfo(&iso, &["-d"]).contains("Volume id: cidata"));
    let mut rock: Vec<String> = isoinfo(&iso, &["-f", "-R"])
        .lines()
        .map(String::from)
        .collect();
    rock.sort();
    assert_eq!(rock, ["/meta-data", "/network-config", "/user-data"]);
    let mut joliet: Vec<String> = isoinfo(&iso, &["-f", "-J"])
        .lines()
        .map(String::from)
        .collect();
    joliet.sort();
    assert_eq!(joliet, rock, "Joliet names (Windows hosts)");
    for (name, text) in [
        ("/user-data", user),
        ("/meta-data", meta),
        ("/network-config", net),
    ] {
        assert_eq!(isoinfo(&iso, &["-R", "-x", name]), text, "{name}");
    }
    let mode = std::fs::metadata(&iso).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "user-data may hold secrets");
    // The same inputs, the same bytes (a second later: times are the inputs').
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = d.path().join("again.iso");
    seed(&again);
    assert_eq!(std::fs::read(&iso).unwrap(), std::fs::read(&again).unwrap());
}

#[test]
fn seed_without_meta_data_gets_an_instance_id_from_the_content() {
    require_tool("xorriso");
    require_tool("isoinfo");
    let d = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for (i, user) in ["#cloud-config\nhostname: a\n", "#!/bin/sh\necho b\n"]
        .iter()
        .enumerate()
    {
        let u = d.path().join(format!("u{i}"));
        std::fs::write(&u, user).unwrap();
        // An existing folder: seed.iso in it.
        let out = d.path().join(format!("o{i}"));
        std::fs::create_dir(&out).unwrap();
        run_ok(
            abox()
                .args(["seed", "--user-data"])
                .arg(&u)
                .arg("-o")
                .arg(&out),
        );
        let iso = out.join("seed.iso");
        let mut rock: Vec<String> = isoinfo(&iso, &["-f", "-R"])
            .lines()
            .map(String::from)
            .collect();
        rock.sort();
        assert_eq!(rock, ["/meta-data", "/user-data"]);
        let meta = isoinfo(&iso, &["-R", "-x", "/meta-data"]);
        let id = meta
            .strip_prefix("instance-id: iid-abox-")
            .unwrap_or_else(|| panic!("{meta}"))
            .trim()
            .to_string();
        assert_eq!(id.len(), 16, "{meta}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "another content, another instance");
}

#[test]
fn bad_seed_inputs_are_refused_and_leave_nothing() {
    require_tool("xorriso");
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("user");
    std::fs::write(&good, "#cloud-config\n").unwrap();
    let plain = d.path().join("plain");
    std::fs::write(&plain, "hostname: x\n").unwrap();
    let no_id = d.path().join("meta");
    std::fs::write(&no_id, "local-hostname: x\n").unwrap();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let missing = d.path().join("missing");
    let cases: [(Vec<&Path>, &str); 4] = [
        (vec![&plain], "must begin with the line #cloud-config"),
        (vec![&good, &no_id], "has no instance-id line"),
        (vec![&missing], "reading the user-data"),
        (vec![d.path()], "not a regular file"),
    ];
    for (inputs, want) in cases {
        let mut c = abox();
        c.args(["seed", "--user-data"]).arg(inputs[0]);
        if let Some(m) = inputs.get(1) {
            c.arg("--meta-data").arg(m);
        }
        let err = run_err(c.arg("-o").arg(out.join("s.iso")));
        assert!(err.contains(want), "{want}: {err}");
    }
    let err = run_err(
        abox()
            .args(["seed", "--user-data"])
            .arg(&good)
            .arg("-o")
            .arg(out.join("s.img")),
    );
    assert!(err.contains("name it NAME.iso"), "{err}");
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
}
