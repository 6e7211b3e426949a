//! `abox check` against a local HTTP server on 127.0.0.1 serving fixture release lists shaped
//! like Alpine's `latest-releases.yaml` (up to date, behind on patch, behind on minor,
//! malformed, 404, unreachable).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use common::abox;

fn releases(versions: &[&str]) -> String {
    let mut y = String::from("---\n");
    for v in versions {
        let branch: Vec<&str> = v.split('.').take(2).collect();
        for flavor in ["alpine-standard", "alpine-virt"] {
            y.push_str(&format!(
                "-\n  title: \"x\"\n  desc: \"x\"\n  branch: v{}\n  arch: x86_64\n  version: {v}\n  flavor: {flavor}\n  file: {flavor}-{v}-x86_64.iso\n  size: 1\n",
                branch.join(".")
            ));
        }
    }
    y
}

/// Serve `routes` (path → body; anything else is a 404) until the test ends; returns the base.
fn serve(routes: HashMap<String, String>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://127.0.0.1:{}/alpine", l.local_addr().unwrap().port());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut first = String::new();
            r.read_line(&mut first).unwrap();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, body) = match routes.get(&path) {
                Some(b) => ("200 OK", b.clone()),
                None => ("404 Not Found", "not found".to_string()),
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    base
}

fn routes(branch: &str, branch_list: String, stable_list: String) -> HashMap<String, String> {
    HashMap::from([
        (
            format!("/alpine/{branch}/releases/x86_64/latest-releases.yaml"),
            branch_list,
        ),
        (
            "/alpine/latest-stable/releases/x86_64/latest-releases.yaml".to_string(),
            stable_list,
        ),
    ])
}

/// Run `abox check`; (exit code, stdout, stderr).
fn check(base: &str, extra: &[&str]) -> (i32, String, String) {
    let mut c = abox();
    // The fixture server is local: no proxy from the environment may stand in between.
    for v in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        c.env_remove(v);
    }
    let o = c
        .args(["check", "--mirror", base])
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn up_to_date_passes_even_strict() {
    let base = serve(routes(
        "v3.22",
        releases(&["3.22.0", "3.22.2"]),
        releases(&["3.22.2"]),
    ));
    let (code, out, err) = check(&base, &["--alpine-version", "3.22.2", "--strict"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Alpine 3.22.2 is up to date"), "{out}");
}

#[test]
fn behind_on_patch_warns_and_strict_fails() {
    let base = serve(routes(
        "v3.22",
        releases(&["3.22.2", "3.22.10"]),
        releases(&["3.22.10"]),
    ));
    let (code, out, _) = check(&base, &["--alpine-version", "3.22.2"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warning: Alpine 3.22.2 is pinned but 3.22.10 is out on v3.22"),
        "{out}"
    );
    let (code, _, _) = check(&base, &["--alpine-version", "3.22.2", "--strict"]);
    assert_eq!(code, 3);
}

#[test]
fn behind_on_minor_warns_and_strict_fails() {
    // The pin read from the recipes (tests/fixtures/chain pins 3.20.3).
    let base = serve(routes(
        "v3.20",
        releases(&["3.20.3"]),
        releases(&["3.23.0", "3.23.1"]),
    ));
    let dir = common::engine::fixtures("chain");
    let dir = dir.to_str().unwrap();
    let (code, out, _) = check(&base, &["--dir", dir]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warning: the newest stable Alpine is 3.23.1 (v3.23); the pin is on v3.20"),
        "{out}"
    );
    assert!(!out.contains("patch release"), "{out}");
    let (code, _, _) = check(&base, &["--dir", dir, "--strict"]);
    assert_eq!(code, 3);
}

/// Without --dir the recipes are the Dockerfiles/ folder of the current folder or the nearest
/// one above: abox works from anywhere in the project, and outside one says how to point it.
#[test]
fn the_recipes_are_found_from_anywhere_in_the_project() {
    let base = serve(routes(
        "v3.20",
        releases(&["3.20.3"]),
        releases(&["3.20.3"]),
    ));
    let project = tempfile::tempdir().unwrap();
    let recipes = project.path().join("Dockerfiles/base");
    std::fs::create_dir_all(&recipes).unwrap();
    std::fs::write(
        recipes.join("Dockerfile"),
        "ARG ALPINE_VERSION=3.20.3\nFROM alpine:${ALPINE_VERSION}\n",
    )
    .unwrap();
    let deep = project.path().join("docs/notes");
    std::fs::create_dir_all(&deep).unwrap();
    for here in [project.path(), deep.as_path()] {
        let o = abox()
            .current_dir(here)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .args(["check", "--mirror", &base])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(out.contains("Alpine 3.20.3 is up to date"), "{out}");
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let o = abox()
        .current_dir(elsewhere.path())
        .args(["check", "--mirror", &base])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no Dockerfiles/ folder with recipes") && err.contains("--dir DIR"),
        "{err}"
    );
}

#[test]
fn malformed_missing_and_unreachable_are_clear_errors() {
    let base = serve(routes(
        "v3.22",
        "<html>maintenance</html>".into(),
        releases(&["3.22.2"]),
    ));
    let (code, _, err) = check(&base, &["--alpine-version", "3.22.2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("malformed latest-releases.yaml"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let base = serve(HashMap::new());
    let (code, _, err) = check(&base, &["--alpine-version", "3.22.2"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("v3.22/releases/x86_64/latest-releases.yaml answered HTTP 404"),
        "{err}"
    );

    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (code, _, err) = check(
        &format!("http://127.0.0.1:{port}"),
        &["--alpine-version", "3.22.2"],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot fetch") && err.contains("--mirror"),
        "{err}"
    );
}
