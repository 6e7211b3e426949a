//! The command line as a newcomer meets it: `--version` names the commit, global options under
//! their own heading, shell completions that the shells accept, manual pages, and in
//! `--progress json` mode the final artifact list and errors as JSON events. No root needed.

mod common;

use common::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn version_names_the_commit() {
    let o = run_ok(abox().arg("--version"));
    let v = stdout(&o);
    let head = sh(&format!(
        "git -C {} rev-parse --short=12 HEAD",
        env!("CARGO_MANIFEST_DIR")
    ));
    assert_eq!(
        v.trim(),
        format!("abox {} ({})", env!("CARGO_PKG_VERSION"), head.trim())
    );
}

#[test]
fn help_puts_global_options_under_their_own_heading() {
    let help = stdout(&run_ok(abox().args(["disk", "--help"])));
    let global = help
        .find("Global options:")
        .expect("a Global options heading");
    // Where an option is listed: its line starts with spaces and the flag.
    let listed = |flag: &str| {
        help.lines()
            .scan(0, |pos, l| {
                let here = *pos;
                *pos += l.len() + 1;
                Some((here, l))
            })
            .find(|(_, l)| {
                let is = |x: &str| {
                    x.strip_prefix(flag)
                        .is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '-'))
                };
                let t = l.trim_start();
                is(t) || t.split(", ").nth(1).is_some_and(is)
            })
            .map(|(p, _)| p)
            .unwrap_or_else(|| panic!("{flag} not listed:\n{help}"))
    };
    for flag in [
        "--progress",
        "--host",
        "--context",
        "--log-level",
        "--verbose",
    ] {
        assert!(listed(flag) > global, "{flag} is under Global options");
    }
    assert!(listed("--size") < global);
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    // A reader that stops early is no error (no panic, exit 0).
    let o = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} completions zsh | head -1; echo \"exit=${{PIPESTATUS[0]}}\"",
            env!("CARGO_BIN_EXE_abox")
        ))
        .output()
        .unwrap();
    let o = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.contains("exit=0") && !o.contains("panicked"), "{o}");
    let bash = stdout(&run_ok(abox().args(["completions", "bash"])));
    assert!(bash.contains("complete -F _abox") && bash.contains("--wsl-package"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("abox.bash");
    std::fs::write(&f, &bash).unwrap();
    // The shell accepts it: parsed, and sourcing it registers the completion.
    let o = sh(&format!(
        "bash -c 'source {} && complete -p abox'",
        f.display()
    ));
    assert!(o.contains("_abox"), "{o}");
    let zsh = stdout(&run_ok(abox().args(["completions", "zsh"])));
    assert!(zsh.starts_with("#compdef abox"), "{zsh}");
    let fish = stdout(&run_ok(abox().args(["completions", "fish"])));
    assert!(fish.contains("complete -c abox"), "{fish}");
    let err = run_err(abox().args(["completions", "tcsh"]));
    assert!(err.contains("bash") && err.contains("fish"), "{err}");
}

#[test]
fn man_pages_for_abox_and_each_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = run_ok(abox().args(["man", "-o"]).arg(&out));
    let listed: Vec<&str> = std::str::from_utf8(&o.stdout).unwrap().lines().collect();
    for page in [
        "abox",
        "abox-export",
        "abox-disk",
        "abox-build",
        "abox-seed",
        "abox-all",
    ] {
        let p = out.join(format!("{page}.1"));
        assert!(listed.contains(&p.to_str().unwrap()), "{listed:?}");
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(&format!(".TH {page} 1")), "{page}");
        assert!(text.contains(".SH NAME"), "{page}");
    }
    let disk = std::fs::read_to_string(out.join("abox-disk.1")).unwrap();
    assert!(disk.contains("\\-\\-size"), "{disk}");
    // Every page abox.1 names exists (no abox-help(1)); a command's page has the global
    // options too.
    let top = std::fs::read_to_string(out.join("abox.1")).unwrap();
    for named in top.split("\\fBabox\\-").skip(1) {
        let page = named.split("\\fR").next().unwrap().replace("\\-", "-");
        assert!(
            out.join(format!("abox-{page}.1")).exists(),
            "abox.1 names abox-{page}"
        );
    }
    assert!(!out.join("abox-help.1").exists());
    assert!(disk.contains("\\-\\-progress"), "{disk}");
}

/// `--progress json`: every line on stderr is a JSON event; a success ends with the artifact
/// list, a failure with an error event and its exit code.
#[test]
fn json_progress_reports_artifacts_and_errors_as_events() {
    let dir = tempfile::tempdir().unwrap();
    let lay = dir.path().join("layout");
    ImageSpec::new(&["d etc 0755\nf etc/os-release 0644 ID=alpine\\n"]).write_oci(&lay, "t");
    let events = |o: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    };
    let out = dir.path().join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_abox"))
        .args(["--progress", "json", "export"])
        .arg(format!("oci:{}", lay.display()))
        .args(["--rootfs", "--name", "j", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success());
    let ev = events(&o);
    let last = ev.last().unwrap();
    assert_eq!(last["event"], "artifacts", "{ev:?}");
    assert_eq!(
        last["files"],
        serde_json::json!([out.join("j.rootfs.tar").display().to_string()])
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_abox"))
        .args([
            "--progress",
            "json",
            "export",
            "oci:/nonexistent",
            "--rootfs",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let ev = events(&o);
    let last = ev.last().unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["exit"], 1);
    assert!(
        last["message"].as_str().unwrap().contains("/nonexistent"),
        "{last}"
    );
    // A usage error (clap's own) is a JSON error event too, with its exit code.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_abox"))
        .args(["--progress", "json", "export", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let ev = events(&o);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["event"], "error");
    assert_eq!(ev[0]["exit"], 2);
    assert!(ev[0]["message"]
        .as_str()
        .unwrap()
        .contains("--no-such-flag"));
}
