//! `.dockerignore`, differentially: the same context is sent by the real docker CLI (its legacy
//! builder filters the context on the client, with moby's patternmatcher, and `COPY . /ctx/`
//! shows what the engine received) and by abox (what `write_context` streams to the engine);
//! the two file lists must be equal, over a pattern table with every rule of Docker's
//! documented syntax and the patterns a review found abox sending by mistake. Needs dockerd.

mod common;

use std::collections::BTreeSet;

use common::engine::{engine_lock, require_docker, rmi, standin};
use common::{require_tool, sh};

const IGNORE: &str = "# a comment line
   # an indented line is a pattern, not a comment
*.log
!keep.log
/secret
foo/../secret2
\\#secret
[^x]ecret
temp?
docs/**/*.md
**/cache
build/
!build/keep.txt
./dot-slash
a/b/c
  padded.txt  
**/*.bak
sub/*/inner
[a-c]range
star\\*name
secret\\D
k\\Sy
w\\W
v[x&&y]z
w[a~~b]
d\\d
";

const FILES: &[&str] = &[
    "a.log",
    "keep.log",
    "sub/b.log",
    "secret",
    "sub/secret",
    "secret2",
    "#secret",
    "xecret",
    "aecret",
    "temp1",
    "temp12",
    "docs/a.md",
    "docs/x/y/b.md",
    "docs/c.txt",
    "cache/x",
    "deep/cache/y",
    "build/out",
    "build/keep.txt",
    "dot-slash",
    "a/b/c/d",
    "a/b/e",
    "padded.txt",
    "x.bak",
    "deep/y.bak",
    "sub/q/inner",
    "sub/q/r/inner",
    "arange",
    "drange",
    "star*name",
    "starXname",
    "normal.txt",
    // Go's \d \s \w are ASCII, and its classes have no set operations.
    "secret\u{663}",
    "k\u{3000}y",
    "w\u{e9}",
    "vxz",
    "v&z",
    "w~",
    "d\u{663}",
    "d7",
    "   # an indented line is a pattern, not a comment",
];

#[test]
fn abox_sends_exactly_what_the_docker_cli_sends() {
    let _l = engine_lock();
    require_docker();
    require_tool("docker");
    let d = tempfile::tempdir().unwrap();
    let ctx = d.path().join("ctx");
    for f in FILES {
        let p = ctx.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, f.as_bytes()).unwrap();
    }
    std::fs::write(ctx.join(".dockerignore"), IGNORE).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\nCOPY . /ctx/\n", standin()),
    )
    .unwrap();

    // What the docker CLI sends: its legacy builder filters on the client side.
    let tag = "abox-test/dockerignore-cli:latest";
    sh(&format!(
        "cd {} && DOCKER_BUILDKIT=0 docker build -q -t {tag} . >/dev/null 2>&1",
        ctx.display()
    ));
    let listing = sh(&format!(
        "docker run --rm --entrypoint /bin/sh {tag} -c 'cd /ctx && find . ! -type d' "
    ));
    let cli: BTreeSet<String> = listing
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .collect();
    rmi(&[tag.to_string()]);

    // What abox sends.
    let mut tar = Vec::new();
    alpine_boxes::engine::build::write_context(&ctx, &mut tar).unwrap();
    let ours: BTreeSet<String> = common::read_tar(&tar[..])
        .into_iter()
        .filter(|(_, n)| n.kind != 'd')
        .map(|(p, _)| p)
        .collect();

    assert!(
        cli.contains("keep.log") && !cli.contains("a.log"),
        "the CLI build is not what this test thinks: {cli:?}"
    );
    let only_cli: Vec<_> = cli.difference(&ours).collect();
    let only_ours: Vec<_> = ours.difference(&cli).collect();
    assert!(
        only_cli.is_empty() && only_ours.is_empty(),
        "abox and the docker CLI disagree.\nsent by abox only: {only_ours:?}\nsent by the CLI only: {only_cli:?}"
    );
    // The three a review found leaking stay out.
    for leak in ["secret2", "#secret", "aecret"] {
        assert!(!ours.contains(leak), "{leak} was sent");
    }
}
