//! BuildKit builds through the engine API: the context streamed as a tar (`.dockerignore`
//! honoured, symlinks kept as symlinks), BuildKit's status stream decoded into one line or bar
//! per step, the image tagged `<prefix>/<name>:<version>` and `:latest`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bollard::models::{BuildInfo, BuildInfoAux};
use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion, TagImageOptionsBuilder};
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::session::SessionConfig;
use super::Engine;
use crate::progress::{Mode, Progress};

/// What to build one recipe with.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec {
    /// The recipe's folder (the build context).
    pub context: PathBuf,
    pub name: String,
    /// First tag is the one used as the image's name; the others are added after.
    pub tags: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub no_cache: bool,
    pub cache_from: Vec<String>,
    /// Secrets and SSH agents the build's session serves.
    pub session: Arc<SessionConfig>,
}

/// A built image.
#[derive(Debug, Clone)]
pub struct Built {
    pub name: String,
    pub tags: Vec<String>,
    pub id: String,
    /// Steps that ran / came from the cache.
    pub steps: usize,
    pub cached: usize,
}

/// How often a build that prints nothing looks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(200);

/// Lines of a failed step's log kept for the error message.
const LOG_TAIL_LINES: usize = 20;

// ---------------------------------------------------------------------------------------------
// Build context

/// `.dockerignore`, matched exactly as the docker CLI and BuildKit match it (moby
/// `patternmatcher` and buildkit `dockerignore.ReadAll`): each line trimmed, `#` lines and blank
/// lines skipped, `!` for an exception, the pattern cleaned like Go's `filepath.Clean`
/// (`foo/../x` is `x`, a leading `/` dropped), then `*` (no `/`), `?`, `**` (any folders),
/// `[…]`/`[^…]` classes and `\` escapes; the last matching line wins, and a pattern matching a
/// parent folder matches what is inside.
pub struct Ignore {
    rules: Vec<Rule>,
}

struct Rule {
    exclusion: bool,
    matcher: Matcher,
}

enum Matcher {
    Exact(String),
    /// `dir/**`: everything below the prefix.
    Prefix(String),
    /// `**/name`: the suffix, or the name alone.
    Suffix(String),
    Regex(regex::Regex),
}

/// Go's meaning of `\d \D \s \S \w \W \b \B` (ASCII), spelled for the regex crate; usable
/// inside a class too (a nested class is a union there).
fn go_escape(c: char) -> Option<&'static str> {
    Some(match c {
        'd' => "[0-9]",
        'D' => "[^0-9]",
        's' => "[\\t\\n\\x0C\\r ]",
        'S' => "[^\\t\\n\\x0C\\r ]",
        'w' => "[0-9A-Za-z_]",
        'W' => "[^0-9A-Za-z_]",
        'b' => "(?-u:\\b)",
        'B' => "(?-u:\\B)",
        _ => return None,
    })
}

/// Go's `filepath.Clean` on a `/`-separated path.
pub fn clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".into(),
        (false, false) => body,
    }
}

impl Matcher {
    /// patternmatcher's `Pattern.compile`.
    fn compile(pattern: &str) -> Result<Matcher> {
        #[derive(PartialEq)]
        enum Kind {
            Exact,
            Prefix,
            Suffix,
            Regex,
        }
        let mut kind = Kind::Exact;
        let mut re = String::from("^");
        let chars: Vec<char> = pattern.chars().collect();
        let mut i = 0;
        let mut first = true;
        // Inside a `[…]` class: the index just after its `[`.
        let mut class_at: Option<usize> = None;
        while i < chars.len() {
            let ch = chars[i];
            i += 1;
            match ch {
                '*' if chars.get(i) == Some(&'*') => {
                    i += 1;
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i >= chars.len() {
                        if kind == Kind::Exact {
                            kind = Kind::Prefix;
                        } else {
                            re.push_str(".*");
                            kind = Kind::Regex;
                        }
                    } else {
                        re.push_str("(.*/)?");
                        kind = Kind::Regex;
                    }
                    if first {
                        kind = Kind::Suffix;
                    }
                }
                '*' => {
                    re.push_str("[^/]*");
                    kind = Kind::Regex;
                }
                '?' => {
                    re.push_str("[^/]");
                    kind = Kind::Regex;
                }
                '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                    re.push('\\');
                    re.push(ch);
                }
                '\\' => match chars.get(i) {
                    Some(next) => {
                        i += 1;
                        // Go's regexp classes are ASCII; the regex crate's are Unicode.
                        match go_escape(*next) {
                            Some(class) => re.push_str(class),
                            None => {
                                re.push('\\');
                                re.push(*next);
                            }
                        }
                        kind = Kind::Regex;
                    }
                    None => re.push_str("\\\\"),
                },
                '[' if class_at.is_none() => {
                    re.push(ch);
                    class_at = Some(i);
                    kind = Kind::Regex;
                }
                // A `]` right after `[` or `[^` is a literal in Go.
                ']' if class_at
                    .is_some_and(|at| i - 1 > at + usize::from(chars.get(at) == Some(&'^'))) =>
                {
                    re.push(ch);
                    class_at = None;
                }
                // Inside a class Go has no nested classes or set operations (`[`, `&&`, `~~`,
                // `--` are the regex crate's): literal, or, for `--`, Go's syntax error.
                '[' | '&' | '~' if class_at.is_some() => {
                    re.push('\\');
                    re.push(ch);
                }
                '-' if class_at.is_some() && chars.get(i) == Some(&'-') => {
                    bail!("syntax error in pattern {pattern:?}");
                }
                '[' | ']' => {
                    re.push(ch);
                    kind = Kind::Regex;
                }
                c => re.push(c),
            }
            first = false;
        }
        Ok(match kind {
            Kind::Exact => Matcher::Exact(pattern.to_string()),
            Kind::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_string()),
            Kind::Suffix => Matcher::Suffix(pattern[2..].to_string()),
            Kind::Regex => {
                re.push('$');
                Matcher::Regex(
                    regex::Regex::new(&re).with_context(|| format!("bad pattern {pattern:?}"))?,
                )
            }
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Exact(p) => path == p,
            Matcher::Prefix(p) => path.starts_with(p.as_str()),
            Matcher::Suffix(s) => {
                path.ends_with(s.as_str()) || (s.starts_with('/') && path == &s[1..])
            }
            Matcher::Regex(r) => r.is_match(path),
        }
    }
}

impl Ignore {
    pub fn load(dir: &Path) -> Result<Ignore> {
        let p = dir.join(".dockerignore");
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(anyhow!(e).context(format!("reading {}", p.display()))),
        };
        Self::parse(&text).with_context(|| format!("in {}", p.display()))
    }

    pub fn parse(text: &str) -> Result<Ignore> {
        let mut rules = Vec::new();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for line in text.lines() {
            // buildkit's ReadAll: comments before trimming, then trim, `!`, clean.
            if line.starts_with('#') {
                continue;
            }
            let l = line.trim();
            if l.is_empty() {
                continue;
            }
            let (exclusion, pat) = match l.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, l),
            };
            let mut pat = clean(pat);
            if pat.len() > 1 && pat.starts_with('/') {
                pat.remove(0);
            }
            if exclusion && pat.is_empty() {
                bail!("illegal exclusion pattern: \"!\"");
            }
            rules.push(Rule {
                exclusion,
                matcher: Matcher::compile(&pat).with_context(|| format!("line {l:?}"))?,
            });
        }
        Ok(Ignore { rules })
    }

    /// Whether `rel` (a relative path with `/`) is left out of the context
    /// (patternmatcher's `MatchesOrParentMatches`).
    pub fn excluded(&self, rel: &str) -> bool {
        let parent = crate::flatten::path::parent(rel);
        let dirs: Vec<&str> = if parent.is_empty() {
            Vec::new()
        } else {
            parent.split('/').collect()
        };
        let mut matched = false;
        for r in &self.rules {
            // An exception only matters once matched, an exclusion only before.
            if r.exclusion != matched {
                continue;
            }
            let mut hit = r.matcher.matches(rel);
            if !hit {
                for i in 0..dirs.len() {
                    if r.matcher.matches(&dirs[..=i].join("/")) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                matched = !r.exclusion;
            }
        }
        matched
    }

    fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.exclusion)
    }
}

/// A context file read for exactly the size its tar header announces: one that grows or
/// shrinks while it streams is an error naming it (a longer copy would shift every later
/// entry of the archive, a shorter one would leave the header lying).
struct Exactly<'a, R> {
    inner: R,
    left: u64,
    path: &'a Path,
}

impl<'a, R: std::io::Read> Exactly<'a, R> {
    fn new(inner: R, size: u64, path: &'a Path) -> Self {
        Self {
            inner,
            left: size,
            path,
        }
    }

    fn changed(&self) -> std::io::Error {
        std::io::Error::other(format!(
            "{} changed as we read it: build again once nothing writes to it",
            self.path.display()
        ))
    }
}

impl<R: std::io::Read> std::io::Read for Exactly<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // The announced size is done: one more byte means the file grew.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(self.changed()),
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(self.changed());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Sends what is written to it as chunks over a channel (to the request body).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 << 10;

impl ChannelWriter {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let b = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(b))
            .map_err(|_| std::io::Error::other("the engine stopped reading the build context"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.flush_chunk()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_chunk()
    }
}

/// Write the context of `dir` as a tar: files, folders and symlinks (never followed) in name
/// order, owned by root like the docker CLI sends them. The Dockerfile and `.dockerignore` are
/// always sent.
pub fn write_context(dir: &Path, out: impl Write) -> Result<()> {
    let ignore = Ignore::load(dir)?;
    let mut tar = tar::Builder::new(out);
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&abs)
            .with_context(|| format!("reading {}", abs.display()))?
            .collect::<std::io::Result<Vec<_>>>()?;
        names.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in names {
            let name = e.file_name();
            let name = name
                .to_str()
                .with_context(|| format!("{}: file name is not UTF-8", e.path().display()))?;
            let r = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let always = r == "Dockerfile" || r == ".dockerignore";
            let excluded = !always && ignore.excluded(&r);
            // An excluded folder may still hold re-included paths (`!`): descend when any
            // rule is an exception, as Docker does, but do not send the folder itself.
            if excluded && !(e.file_type()?.is_dir() && ignore.has_exceptions()) {
                continue;
            }
            let path = e.path();
            let md = std::fs::symlink_metadata(&path)?;
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&md, tar::HeaderMode::Deterministic);
            h.set_uid(0);
            h.set_gid(0);
            {
                use std::os::unix::fs::MetadataExt;
                h.set_mtime(md.mtime().max(0) as u64);
                h.set_mode(md.mode() & 0o7777);
            }
            let ft = md.file_type();
            if ft.is_dir() {
                if !excluded {
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{r}/"), std::io::empty())?;
                }
                subdirs.push((path, r));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                h.set_size(0);
                tar.append_link(&mut h, &r, &target)?;
            } else if ft.is_file() {
                let f = std::fs::File::open(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let reader = Exactly::new(f, md.len(), &path);
                tar.append_data(&mut h, &r, reader)
                    .with_context(|| format!("adding {} to the build context", path.display()))?;
            }
            // Sockets, fifos and devices have no place in a build context.
        }
        subdirs.reverse();
        stack.extend(subdirs);
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Status display

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
    Cached,
    Done,
    Error,
}

impl State {
    /// Later states never go back to earlier ones (BuildKit may repeat a vertex's start).
    fn rank(self) -> u8 {
        match self {
            State::Waiting => 0,
            State::Running => 1,
            _ => 2,
        }
    }

    fn word(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Running => "started",
            State::Cached => "cached",
            State::Done => "done",
            State::Error => "error",
        }
    }
}

struct Step {
    number: usize,
    name: String,
    state: State,
    started: Option<Instant>,
    error: String,
    log: VecDeque<String>,
    partial: String,
    bar: Option<ProgressBar>,
}

/// BuildKit's vertices, as steps the user sees.
struct View {
    mode: Mode,
    image: String,
    steps: Vec<Step>,
    by_digest: HashMap<String, usize>,
    multi: Option<MultiProgress>,
}

impl View {
    fn new(progress: &Progress, image: &str) -> View {
        let mode = progress.mode();
        let multi = (mode == Mode::Auto).then(|| {
            let m = MultiProgress::new();
            m.set_draw_target(ProgressDrawTarget::stderr());
            m
        });
        View {
            mode,
            image: image.to_string(),
            steps: Vec::new(),
            by_digest: HashMap::new(),
            multi,
        }
    }

    fn event(&self, s: &Step, extra: Option<(&str, serde_json::Value)>) {
        match self.mode {
            Mode::Plain => {
                let secs = s
                    .started
                    .filter(|_| s.state == State::Done)
                    .map(|t| format!(" ({:.1}s)", t.elapsed().as_secs_f64()))
                    .unwrap_or_default();
                let err = if s.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", s.error)
                };
                eprintln!(
                    "{} #{} {}: {}{secs}{err}",
                    self.image,
                    s.number,
                    s.name,
                    s.state.word()
                );
            }
            Mode::Json => {
                let mut v = serde_json::json!({
                    "event": "step", "image": self.image, "step": s.number,
                    "name": s.name, "state": s.state.word(),
                });
                if !s.error.is_empty() {
                    v["error"] = s.error.clone().into();
                }
                if let Some((k, x)) = extra {
                    v[k] = x;
                }
                eprintln!("{v}");
            }
            _ => {}
        }
    }

    fn update(&mut self, st: &bollard::moby::buildkit::v1::StatusResponse) {
        for v in &st.vertexes {
            let i = match self.by_digest.get(&v.digest) {
                Some(i) => *i,
                None => {
                    let i = self.steps.len();
                    self.by_digest.insert(v.digest.clone(), i);
                    let bar = self.multi.as_ref().map(|m| {
                        let pb = m.add(ProgressBar::new_spinner());
                        pb.set_style(
                            ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                                .expect("template"),
                        );
                        pb.set_message(format!("#{} {}", i + 1, v.name));
                        pb.enable_steady_tick(Duration::from_millis(120));
                        pb
                    });
                    self.steps.push(Step {
                        number: i + 1,
                        name: v.name.clone(),
                        state: State::Waiting,
                        started: None,
                        error: String::new(),
                        log: VecDeque::new(),
                        partial: String::new(),
                        bar,
                    });
                    i
                }
            };
            let new = if !v.error.is_empty() {
                State::Error
            } else if v.cached && v.completed.is_some() {
                State::Cached
            } else if v.completed.is_some() {
                State::Done
            } else if v.started.is_some() {
                State::Running
            } else {
                State::Waiting
            };
            let s = &mut self.steps[i];
            if new == s.state || new.rank() < s.state.rank() {
                continue;
            }
            if new == State::Running || s.started.is_none() {
                s.started = Some(Instant::now());
            }
            s.state = new;
            s.error = v.error.clone();
            if let Some(pb) = &s.bar {
                match new {
                    State::Running | State::Waiting => {}
                    _ => {
                        let mark = match new {
                            State::Cached => "CACHED",
                            State::Error => "ERROR",
                            _ => "done",
                        };
                        pb.set_style(ProgressStyle::with_template("  {msg}").expect("template"));
                        pb.finish_with_message(format!(
                            "#{} {} — {mark} {:.1}s",
                            s.number,
                            s.name,
                            s.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0)
                        ));
                    }
                }
            }
            let s = &self.steps[i];
            self.event(s, None);
        }
        for l in &st.logs {
            let Some(&i) = self.by_digest.get(&l.vertex) else {
                continue;
            };
            let text = String::from_utf8_lossy(&l.msg).into_owned();
            let s = &mut self.steps[i];
            s.partial.push_str(&text);
            let mut lines = Vec::new();
            while let Some(pos) = s.partial.find('\n') {
                let line: String = s.partial.drain(..=pos).collect();
                lines.push(line.trim_end_matches(['\n', '\r']).to_string());
            }
            for line in lines {
                match self.mode {
                    Mode::Plain => eprintln!("{} #{} | {line}", self.image, s.number),
                    Mode::Json => eprintln!(
                        "{}",
                        serde_json::json!({"event": "log", "image": self.image,
                            "step": s.number, "line": line})
                    ),
                    Mode::Auto => {
                        if let Some(pb) = &s.bar {
                            pb.set_message(format!("#{} {} | {}", s.number, s.name, clip(&line)));
                        }
                    }
                    Mode::None => {}
                }
                s.log.push_back(line);
                if s.log.len() > LOG_TAIL_LINES {
                    s.log.pop_front();
                }
            }
        }
    }

    /// The failed step and its log tail, for the error message.
    fn failure(&self) -> Option<String> {
        let s = self.steps.iter().find(|s| s.state == State::Error)?;
        let mut log: Vec<String> = s.log.iter().cloned().collect();
        if !s.partial.trim().is_empty() {
            log.push(s.partial.trim_end().to_string());
        }
        let tail = if log.is_empty() {
            "(the step printed nothing)".to_string()
        } else {
            log.join("\n")
        };
        Some(format!("step #{} `{}` failed:\n{tail}", s.number, s.name))
    }

    fn counts(&self) -> (usize, usize) {
        let steps = self.steps.len();
        let cached = self
            .steps
            .iter()
            .filter(|s| s.state == State::Cached)
            .count();
        (steps, cached)
    }
}

impl Drop for View {
    fn drop(&mut self) {
        for s in &self.steps {
            if let Some(pb) = &s.bar {
                if !pb.is_finished() {
                    pb.finish_and_clear();
                }
            }
        }
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() > 60 {
        let c: String = s.chars().take(57).collect();
        format!("{c}...")
    } else {
        s.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Building

/// Build one image with BuildKit and tag it.
pub fn build(engine: &Engine, spec: &BuildSpec, progress: &Progress) -> Result<Built> {
    let tag = spec.tags.first().context("no tag to build")?;
    if !spec.context.join("Dockerfile").is_file() {
        bail!("{}: no Dockerfile", spec.context.display());
    }
    // The context, streamed from a thread that writes the tar.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let ctx_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let writer = {
        let dir = spec.context.clone();
        let ctx_error = ctx_error.clone();
        std::thread::spawn(move || {
            let mut w = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
            };
            if let Err(e) = write_context(&dir, &mut w).and_then(|_| Ok(w.flush()?)) {
                let _ = tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
                *ctx_error.lock().expect("poisoned") = Some(e);
            }
        })
    };
    let body =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });

    let mut args: HashMap<String, String> = spec
        .build_args
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Proxies as the docker CLI passes them; BuildKit keeps these predefined arguments out of
    // the image's history and config.
    for (k, v) in proxy_args(&super::endpoint::process_env, &engine.endpoint.host) {
        args.entry(k).or_insert(v);
    }
    // Record cache metadata in the image so a pushed image can serve as --cache-from.
    args.entry("BUILDKIT_INLINE_CACHE".into())
        .or_insert_with(|| "1".into());
    let session = format!("abox-{}-{}", std::process::id(), rand_suffix());
    // bollard's own BuildKit session serves only credentials; abox serves its own (secrets,
    // SSH agents, credentials on demand) and asks bollard for a plain build request, turned
    // into a BuildKit one on its way out.
    let served = engine
        .block_on(super::session::start(
            &engine.dial,
            &session,
            spec.session.clone(),
        ))
        .with_context(|| format!("building {}", spec.name))?;
    let _serving = AbortOnDrop(served);
    let docker = engine
        .docker
        .clone()
        .with_request_modifier(buildkit_request);
    let mut opts = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(tag)
        .rm(true)
        .forcerm(true)
        .nocache(spec.no_cache)
        .buildargs(&args)
        .version(BuilderVersion::BuilderV1)
        .session(&session);
    if !spec.cache_from.is_empty() {
        opts = opts.cachefrom(&spec.cache_from);
    }

    let mut view = View::new(progress, &spec.name);
    let mut id: Option<String> = None;
    let mut stream_error: Option<String> = None;
    engine.block_on(async {
        let mut s = docker.build_image(opts.build(), None, Some(bollard::body_try_stream(body)));
        // A step may run for minutes without a word: Ctrl-C is looked at between events and
        // at least every SIGNAL_POLL.
        let mut tick = tokio::time::interval(SIGNAL_POLL);
        loop {
            let item = tokio::select! {
                item = s.next() => item,
                _ = tick.tick() => {
                    if crate::signals::check().is_err() {
                        stream_error = Some("interrupted".into());
                        break;
                    }
                    continue;
                }
            };
            let Some(item) = item else { break };
            if crate::signals::check().is_err() {
                stream_error = Some("interrupted".into());
                break;
            }
            match item {
                Ok(BuildInfo {
                    aux: Some(BuildInfoAux::BuildKit(st)),
                    ..
                }) => view.update(&st),
                Ok(BuildInfo {
                    aux: Some(BuildInfoAux::Default(img)),
                    ..
                }) => id = img.id.or(id.take()),
                Ok(BuildInfo {
                    error_detail: Some(d),
                    ..
                }) => stream_error = d.message,
                Ok(_) => {}
                Err(e) => {
                    stream_error = Some(match e {
                        bollard::errors::Error::DockerStreamError { error } => error,
                        e => super::api_error(e).to_string(),
                    });
                    break;
                }
            }
        }
    });
    let _ = writer.join();
    if let Some(e) = ctx_error.lock().expect("poisoned").take() {
        return Err(e.context(format!("sending the build context of {}", spec.name)));
    }
    if let Some(e) = stream_error {
        if e == "interrupted" {
            bail!("interrupted");
        }
        let step = view.failure().unwrap_or_default();
        drop(view);
        if step.is_empty() {
            bail!("building {}: {e}", spec.name);
        }
        bail!("building {}: {step}\nerror: {e}", spec.name);
    }
    let (steps, cached) = view.counts();
    drop(view);
    let info = engine.inspect(tag)?;
    let real_id = info.id.context("the built image has no ID")?;
    if let Some(i) = &id {
        if *i != real_id {
            log::debug!("build reported {i}, the tag points at {real_id}");
        }
    }
    for extra in &spec.tags[1..] {
        let (repo, t) = split_tag(extra);
        engine
            .block_on(engine.docker.tag_image(
                &real_id,
                Some(TagImageOptionsBuilder::default().repo(repo).tag(t).build()),
            ))
            .map_err(super::api_error)
            .with_context(|| format!("tagging {extra}"))?;
    }
    Ok(Built {
        name: spec.name.clone(),
        tags: spec.tags.clone(),
        id: real_id,
        steps,
        cached,
    })
}

/// Aborts the session's task when the build is over (or fails).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Turn bollard's `POST /build?…version=1…` into a BuildKit build (`version=2`); the session
/// named in the same query is abox's.
fn buildkit_request(mut req: bollard::BollardRequest) -> bollard::BollardRequest {
    if !req.uri().path().ends_with("/build") {
        return req;
    }
    let uri = req.uri().to_string();
    let Some((path, query)) = uri.split_once('?') else {
        return req;
    };
    let query: Vec<&str> = query
        .split('&')
        .map(|kv| if kv == "version=1" { "version=2" } else { kv })
        .collect();
    if let Ok(u) = format!("{path}?{}", query.join("&")).parse() {
        *req.uri_mut() = u;
    }
    req
}

/// The proxy build arguments for a build on the engine at `daemon` (its URL): as the docker
/// CLI passes them, `proxies.<daemon>` of its config.json, else `proxies.default` (`httpProxy`,
/// `httpsProxy`, `noProxy`, `ftpProxy`, `allProxy`, each as the upper- and lower-case
/// argument); then, for an engine on this machine only (a unix socket, or TCP to a loopback
/// address), the same variables from abox's environment, either case, which win — a proxy this
/// machine uses means nothing to a remote engine.
pub fn proxy_args(env: &dyn Fn(&str) -> Option<String>, daemon: &str) -> BTreeMap<String, String> {
    const NAMES: [(&str, &str); 5] = [
        ("HTTP_PROXY", "httpProxy"),
        ("HTTPS_PROXY", "httpsProxy"),
        ("NO_PROXY", "noProxy"),
        ("FTP_PROXY", "ftpProxy"),
        ("ALL_PROXY", "allProxy"),
    ];
    let mut out = BTreeMap::new();
    let config = super::endpoint::config_dir(env).join("config.json");
    let all: serde_json::Value = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| v["proxies"].clone())
        .unwrap_or_default();
    let short = daemon.strip_suffix(":2375").unwrap_or(daemon);
    let proxies = [daemon, short]
        .iter()
        .map(|k| &all[*k])
        .find(|p| p.is_object())
        .unwrap_or(&all["default"]);
    for (upper, key) in NAMES {
        if let Some(v) = proxies[key].as_str().filter(|v| !v.is_empty()) {
            out.insert(upper.to_string(), v.to_string());
            out.insert(upper.to_ascii_lowercase(), v.to_string());
        }
    }
    let local = daemon.starts_with("unix://")
        || ["tcp://localhost:", "tcp://127.", "tcp://[::1]:"]
            .iter()
            .any(|p| daemon.starts_with(p));
    if local {
        for (upper, _) in NAMES {
            for name in [upper.to_string(), upper.to_ascii_lowercase()] {
                if let Some(v) = env(&name).filter(|v| !v.is_empty()) {
                    out.insert(name, v);
                }
            }
        }
    }
    out
}

/// `repo[:tag]` → (repo, tag); a registry port is not a tag.
pub fn split_tag(r: &str) -> (&str, &str) {
    match r.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (r, "latest"),
    }
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}", t.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_rules() {
        let ig = Ignore::parse("# c\n*.log\n/build\nsecrets/**\n!secrets/public.txt\ndocs/*.md\n")
            .unwrap();
        assert!(ig.excluded("a.log"));
        assert!(!ig.excluded("sub/a.log"), "* does not cross folders");
        assert!(
            ig.excluded("build/x/y"),
            "a matched folder excludes its content"
        );
        assert!(ig.excluded("secrets/key"));
        assert!(!ig.excluded("secrets/public.txt"));
        assert!(ig.excluded("docs/a.md"));
        assert!(!ig.excluded("docs/sub/a.md"));
        assert!(!ig.excluded("Dockerfile"));
    }

    #[test]
    fn proxies_from_config_and_environment() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            r#"{"proxies": {"default": {"httpProxy": "http://cfg:3128", "noProxy": "localhost"}}}"#,
        )
        .unwrap();
        let dir = d.path().display().to_string();
        let env = |k: &str| match k {
            "DOCKER_CONFIG" => Some(dir.clone()),
            "https_proxy" => Some("http://env:8080".to_string()),
            "HTTP_PROXY" => Some("http://env-wins:1".to_string()),
            _ => None,
        };
        let p = proxy_args(&env, "unix:///var/run/docker.sock");
        assert_eq!(p["http_proxy"], "http://cfg:3128");
        assert_eq!(p["HTTP_PROXY"], "http://env-wins:1");
        assert_eq!(p["NO_PROXY"], "localhost");
        assert_eq!(p["no_proxy"], "localhost");
        assert_eq!(p["https_proxy"], "http://env:8080");
        assert!(!p.contains_key("HTTPS_PROXY"));
        assert!(!p.contains_key("FTP_PROXY"));
        // A remote engine: its own entry in the config, never this machine's environment.
        std::fs::write(
            d.path().join("config.json"),
            r#"{"proxies": {"default": {"httpProxy": "http://cfg:3128"}, "ssh://me@box": {"httpProxy": "http://box-proxy:1"}}}"#,
        )
        .unwrap();
        let p = proxy_args(&env, "ssh://me@box");
        assert_eq!(p["HTTP_PROXY"], "http://box-proxy:1");
        assert!(
            !p.contains_key("https_proxy"),
            "the environment is this machine's"
        );
        let p = proxy_args(&env, "tcp://10.1.2.3:2375");
        assert_eq!(p["HTTP_PROXY"], "http://cfg:3128");
    }

    #[test]
    fn buildkit_version_in_the_build_request() {
        let mut req = bollard::BollardRequest::new(bollard::body_full(Bytes::new()));
        *req.uri_mut() = "http://docker/build?t=x&version=1&session=abox-1"
            .parse()
            .unwrap();
        let r = buildkit_request(req);
        assert_eq!(r.uri().query(), Some("t=x&version=2&session=abox-1"));
    }

    #[test]
    fn go_pattern_syntax() {
        let ig = Ignore::parse("d\\d\nw\\W\nv[x&&y]z\n").unwrap();
        assert!(ig.excluded("d7"));
        assert!(!ig.excluded("d\u{663}"), "Go's \\d is ASCII");
        assert!(
            ig.excluded("w\u{e9}"),
            "Go's \\W is every non-ASCII-word character"
        );
        assert!(
            ig.excluded("v&z") && ig.excluded("vxz"),
            "no set operations in Go classes"
        );
        assert!(Ignore::parse("q[a-c--b]\n").is_err(), "Go's syntax error");
    }

    #[test]
    fn a_context_file_must_keep_its_size_while_it_streams() {
        use std::io::Read;
        let p = Path::new("ctx/file");
        let read = |data: &[u8], size: u64| -> std::io::Result<Vec<u8>> {
            let mut out = Vec::new();
            Exactly::new(data, size, p).read_to_end(&mut out)?;
            Ok(out)
        };
        assert_eq!(read(b"hello", 5).unwrap(), b"hello");
        for (data, size) in [(&b"hello!"[..], 5), (&b"hell"[..], 5)] {
            let e = read(data, size).unwrap_err().to_string();
            assert!(e.contains("ctx/file changed as we read it"), "{e}");
        }
    }

    #[test]
    fn tags() {
        assert_eq!(
            split_tag("127.0.0.1:5000/a/b:1.2"),
            ("127.0.0.1:5000/a/b", "1.2")
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/a/b"),
            ("127.0.0.1:5000/a/b", "latest")
        );
        assert_eq!(split_tag("a/b:latest"), ("a/b", "latest"));
    }
}
