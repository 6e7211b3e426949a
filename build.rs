//! Build script: `ABOX_COMMIT`, the commit abox is built from (`git rev-parse --short=12
//! HEAD`), for `abox --version` and manifest.json; `unknown` outside a git checkout.

use std::process::Command;

/// `git ARGS` in the package's folder, its trimmed output when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ABOX_COMMIT={commit}");
    // Rebuilt when HEAD moves: a checkout (HEAD) or a commit (the branch's ref, loose or packed).
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(r);
    }
    for w in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &w]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
