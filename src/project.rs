//! The project: the image recipes under `Dockerfiles/<name>/Dockerfile` and the order they
//! build in. The order is read from the Dockerfiles themselves: a recipe's `FROM` uses a
//! build argument (declared before the first `FROM`) whose default names another recipe of
//! the project, e.g.
//!
//! ```dockerfile
//! ARG BASE_IMAGE=alpine-boxes/base:latest
//! FROM ${BASE_IMAGE}
//! ```
//!
//! makes `base` the parent; abox passes the parent's real tag in that argument. A recipe whose
//! `FROM` arguments name nothing of the project is a root; `--base-image` replaces its `FROM`
//! argument (that is how tests substitute a local stand-in for `alpine:<version>`). The pinned
//! Alpine version is the default of `ARG ALPINE_VERSION` in the recipes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::source::short_name;

/// One recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub dir: PathBuf,
    /// `ARG`s declared before the first `FROM`, with their defaults.
    pub global_args: BTreeMap<String, Option<String>>,
    /// Build arguments used in `FROM` lines → the project image their default names, if any.
    pub from_args: BTreeMap<String, Option<String>>,
    /// `FROM` lines whose image is written out (no argument).
    pub literal_froms: Vec<String>,
    /// Every `ARG` the recipe declares, before or after a `FROM`.
    pub declared_args: BTreeSet<String>,
    /// `ARG`s before the first `FROM` in order, defaults as written (unexpanded).
    pub raw_args: Vec<(String, Option<String>)>,
    /// The image of every `FROM` as written (`${BASE_IMAGE}`, `alpine:3.20`), without
    /// `scratch` and references to earlier stages.
    pub from_images: Vec<String>,
    /// Stage names (`FROM … AS name`), lower case.
    pub stages: BTreeSet<String>,
}

impl Recipe {
    /// Project images this one is built on.
    pub fn parents(&self) -> BTreeSet<String> {
        self.from_args.values().flatten().cloned().collect()
    }

    /// The images this recipe's `FROM` lines name once `args` (what abox passes with
    /// `--build-arg`) are applied, evaluated as BuildKit does: a passed argument wins, else its
    /// default with the earlier arguments substituted.
    pub fn base_images(&self, args: &BTreeMap<String, String>) -> Vec<String> {
        let mut vars: BTreeMap<String, Option<String>> = BTreeMap::new();
        for (k, default) in &self.raw_args {
            let v = match args.get(k) {
                Some(v) => Some(v.clone()),
                None => default.as_ref().map(|d| expand(d, &vars)),
            };
            vars.insert(k.clone(), v);
        }
        let mut out: Vec<String> = Vec::new();
        for f in &self.from_images {
            let image = expand(f, &vars);
            let stage = self.stages.contains(&image.to_ascii_lowercase());
            if !image.is_empty() && image != "scratch" && !stage && !out.contains(&image) {
                out.push(image);
            }
        }
        out
    }
}

#[derive(Debug)]
pub struct Project {
    pub dir: PathBuf,
    /// Every recipe, parents before children (ties by name).
    pub recipes: Vec<Recipe>,
}

/// Dockerfile lines with continuations joined and comments dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.starts_with('#') || t.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else if !t.starts_with('#') {
            cur.push_str(t);
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner.to_string();
        }
    }
    s.to_string()
}

/// Names of the variables `s` refers to (`$X`, `${X}`, `${X:-y}`).
fn variables(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let braced = b.get(i + 1) == Some(&b'{');
            let start = i + 1 + braced as usize;
            let mut j = start;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j > start {
                out.push(s[start..j].to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Replace `$X`/`${X}` with values from `vars` (unknown ones become empty, as BuildKit does).
pub fn expand(s: &str, vars: &BTreeMap<String, Option<String>>) -> String {
    let mut out = s.to_string();
    for v in variables(s) {
        let val = vars.get(&v).cloned().flatten().unwrap_or_default();
        out = out
            .replace(&format!("${{{v}}}"), &val)
            .replace(&format!("${v}"), &val);
    }
    out
}

/// Parse one Dockerfile.
pub fn parse_recipe(
    name: &str,
    dir: &Path,
    text: &str,
    project: &BTreeSet<String>,
) -> Result<Recipe> {
    let mut global_args = BTreeMap::new();
    let mut from_args = BTreeMap::new();
    let mut literal_froms = Vec::new();
    let mut stages = BTreeSet::new();
    let mut declared_args = BTreeSet::new();
    let mut raw_args = Vec::new();
    let mut from_images = Vec::new();
    let mut seen_from = false;
    for line in logical_lines(text) {
        let mut words = line.split_whitespace();
        let Some(instr) = words.next() else { continue };
        let rest: Vec<&str> = words.collect();
        let instr = instr.to_ascii_uppercase();
        if instr == "ARG" {
            for a in &rest {
                declared_args.insert(a.split_once('=').map_or(*a, |(k, _)| k).to_string());
            }
        }
        match instr.as_str() {
            "ARG" if !seen_from => {
                for a in rest {
                    match a.split_once('=') {
                        Some((k, v)) => raw_args.push((k.to_string(), Some(unquote(v)))),
                        None => raw_args.push((a.to_string(), None)),
                    }
                    match a.split_once('=') {
                        Some((k, v)) => {
                            // A default may refer to earlier arguments (alpine:${ALPINE_VERSION}).
                            let v = expand(&unquote(v), &global_args);
                            global_args.insert(k.to_string(), Some(v))
                        }
                        None => global_args.insert(a.to_string(), None),
                    };
                }
            }
            "FROM" => {
                seen_from = true;
                let args: Vec<&str> = rest
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let Some(image) = args.first() else {
                    bail!("{name}/Dockerfile: FROM without an image");
                };
                if args.len() >= 3 && args[1].eq_ignore_ascii_case("as") {
                    stages.insert(args[2].to_ascii_lowercase());
                }
                let vars = variables(image);
                if vars.is_empty() {
                    if !stages.contains(&image.to_ascii_lowercase()) && *image != "scratch" {
                        literal_froms.push(image.to_string());
                        from_images.push(image.to_string());
                    }
                    continue;
                }
                from_images.push(image.to_string());
                for v in vars {
                    if !global_args.contains_key(&v) {
                        bail!("{name}/Dockerfile: FROM uses ${v}, which no ARG before the first FROM declares");
                    }
                    let default = expand(&format!("${{{v}}}"), &global_args);
                    let parent = (!default.is_empty())
                        .then(|| short_name(&default))
                        .filter(|p| project.contains(p) && p != name);
                    from_args.insert(v, parent);
                }
            }
            _ => {}
        }
    }
    if !seen_from {
        bail!("{name}/Dockerfile has no FROM");
    }
    Ok(Recipe {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        global_args,
        from_args,
        literal_froms,
        declared_args,
        raw_args,
        from_images,
        stages,
    })
}

/// The folder of recipes: `dir` when given; else `Dockerfiles/` in the current folder or the
/// nearest folder above it that has one holding a `<name>/Dockerfile` (so `abox build` works
/// from anywhere in the project), as a path relative to the current folder when it is below it.
pub fn recipes_dir(dir: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(d) = dir {
        return Ok(d);
    }
    let cwd = std::env::current_dir().context("the current folder")?;
    let has_recipes = |d: &Path| {
        std::fs::read_dir(d)
            .map(|rd| rd.flatten().any(|e| e.path().join("Dockerfile").is_file()))
            .unwrap_or(false)
    };
    let mut up = PathBuf::new();
    for here in cwd.ancestors() {
        let candidate = here.join("Dockerfiles");
        if has_recipes(&candidate) {
            return Ok(if up.as_os_str().is_empty() {
                PathBuf::from("Dockerfiles")
            } else {
                up.join("Dockerfiles")
            });
        }
        up.push("..");
    }
    bail!(
        "no Dockerfiles/ folder with recipes (<name>/Dockerfile) in {} or above it: run abox in \
         the project, or give --dir DIR",
        cwd.display()
    )
}

impl Project {
    /// Read every `<dir>/<name>/Dockerfile`.
    pub fn load(dir: &Path) -> Result<Project> {
        let mut names = BTreeSet::new();
        let rd = std::fs::read_dir(dir).with_context(|| {
            format!(
                "reading the recipes folder {} (choose another with --dir)",
                dir.display()
            )
        })?;
        for e in rd {
            let e = e?;
            if e.path().join("Dockerfile").is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                if short_name(&name) != name {
                    bail!("recipe folder {name:?}: use letters, digits, '.', '_' and '-' only");
                }
                names.insert(name);
            }
        }
        if names.is_empty() {
            bail!(
                "no recipes in {}: expected <name>/Dockerfile folders",
                dir.display()
            );
        }
        let mut by_name = BTreeMap::new();
        for n in &names {
            let d = dir.join(n);
            let text = std::fs::read_to_string(d.join("Dockerfile"))
                .with_context(|| format!("reading {}", d.join("Dockerfile").display()))?;
            by_name.insert(n.clone(), parse_recipe(n, &d, &text, &names)?);
        }
        // Parents first; a cycle is an error.
        let mut recipes = Vec::new();
        let mut done = BTreeSet::new();
        while done.len() < by_name.len() {
            let ready: Vec<String> = by_name
                .values()
                .filter(|r| !done.contains(&r.name) && r.parents().iter().all(|p| done.contains(p)))
                .map(|r| r.name.clone())
                .collect();
            if ready.is_empty() {
                let left: Vec<_> = by_name.keys().filter(|n| !done.contains(*n)).collect();
                bail!("the recipes {left:?} are built on each other in a cycle");
            }
            for n in ready {
                done.insert(n.clone());
                recipes.push(by_name[&n].clone());
            }
        }
        Ok(Project {
            dir: dir.to_path_buf(),
            recipes,
        })
    }

    pub fn get(&self, name: &str) -> Result<&Recipe> {
        self.recipes
            .iter()
            .find(|r| r.name == name)
            .with_context(|| {
                let all: Vec<_> = self.recipes.iter().map(|r| r.name.as_str()).collect();
                format!(
                    "no recipe {name} in {} (there are: {})",
                    self.dir.display(),
                    all.join(", ")
                )
            })
    }

    /// The pinned Alpine version: the default of `ARG ALPINE_VERSION` (all recipes that give
    /// one must agree).
    pub fn alpine_version(&self) -> Result<Option<String>> {
        let mut found: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for r in &self.recipes {
            if let Some(Some(v)) = r.global_args.get("ALPINE_VERSION") {
                found.entry(v.clone()).or_default().push(&r.name);
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.into_keys().next()),
            _ => bail!("the recipes pin different ALPINE_VERSION defaults: {found:?}"),
        }
    }

    /// `names` and their ancestors, in build order; all recipes when `names` is empty. Each is
    /// paired with whether it was asked for.
    pub fn closure(&self, names: &[String]) -> Result<Vec<(&Recipe, bool)>> {
        if names.is_empty() {
            return Ok(self.recipes.iter().map(|r| (r, true)).collect());
        }
        let mut want: BTreeSet<String> = BTreeSet::new();
        let mut stack: Vec<String> = Vec::new();
        for n in names {
            self.get(n)?;
            stack.push(n.clone());
        }
        while let Some(n) = stack.pop() {
            if want.insert(n.clone()) {
                stack.extend(self.get(&n)?.parents());
            }
        }
        Ok(self
            .recipes
            .iter()
            .filter(|r| want.contains(&r.name))
            .map(|r| (r, names.contains(&r.name)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> BTreeSet<String> {
        ["base", "docker-host"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn root_recipe() {
        let r = parse_recipe(
            "base",
            Path::new("."),
            "# comment\nARG ALPINE_VERSION=3.20.3\nARG BASE_IMAGE=alpine:${ALPINE_VERSION}\nFROM ${BASE_IMAGE}\nRUN echo \\\n  hi\n",
            &project(),
        )
        .unwrap();
        assert_eq!(
            r.global_args["BASE_IMAGE"].as_deref(),
            Some("alpine:3.20.3")
        );
        assert_eq!(r.from_args.get("BASE_IMAGE"), Some(&None));
        assert!(r.parents().is_empty());
    }

    #[test]
    fn child_recipe_and_stages() {
        let r = parse_recipe(
            "docker-host",
            Path::new("."),
            "ARG PARENT=\"alpine-boxes/base:latest\"\nFROM $PARENT AS build\nRUN x\nFROM build\nFROM --platform=linux/amd64 ${PARENT}\nFROM busybox:1\n",
            &project(),
        )
        .unwrap();
        assert_eq!(r.parents(), BTreeSet::from(["base".to_string()]));
        assert_eq!(r.literal_froms, vec!["busybox:1".to_string()]);
    }

    #[test]
    fn the_repository_recipes_build_in_order() {
        let p = Project::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfiles")).unwrap();
        let order: Vec<_> = p.recipes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(order, ["base", "docker-host", "podman-host"]);
        assert!(p.get("base").unwrap().parents().is_empty());
        assert_eq!(
            p.get("base").unwrap().from_args.keys().collect::<Vec<_>>(),
            ["BASE_IMAGE"]
        );
        for child in ["docker-host", "podman-host"] {
            assert_eq!(
                p.get(child).unwrap().parents(),
                BTreeSet::from(["base".to_string()])
            );
        }
        let v = p
            .alpine_version()
            .unwrap()
            .expect("a pinned ALPINE_VERSION");
        assert_eq!(v.split('.').count(), 3, "pin major.minor.patch: {v}");
        let only: Vec<_> = p
            .closure(&["podman-host".to_string()])
            .unwrap()
            .into_iter()
            .map(|(r, asked)| (r.name.as_str(), asked))
            .collect();
        assert_eq!(only, [("base", false), ("podman-host", true)]);
    }

    #[test]
    fn base_images_evaluated_as_buildkit_does() {
        let text = "ARG ALPINE_VERSION=3.20.3\nARG BASE_IMAGE=alpine:${ALPINE_VERSION}\nFROM ${BASE_IMAGE} AS build\nFROM build\nFROM scratch\nFROM busybox:1\n";
        let r = parse_recipe("base", Path::new("."), text, &project()).unwrap();
        let args = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(r.base_images(&args(&[])), ["alpine:3.20.3", "busybox:1"]);
        // A passed version reaches the default that uses it.
        assert_eq!(
            r.base_images(&args(&[("ALPINE_VERSION", "3.22.1")])),
            ["alpine:3.22.1", "busybox:1"]
        );
        // scratch and earlier stages, reached through an argument, are no images to pull.
        assert_eq!(
            r.base_images(&args(&[("BASE_IMAGE", "scratch")])),
            ["busybox:1"]
        );
        assert_eq!(
            r.base_images(&args(&[("BASE_IMAGE", "BUILD")])),
            ["busybox:1"]
        );
        // A passed base image wins over the default.
        assert_eq!(
            r.base_images(&args(&[
                ("ALPINE_VERSION", "3.22.1"),
                ("BASE_IMAGE", "local/x:1")
            ])),
            ["local/x:1", "busybox:1"]
        );
    }

    #[test]
    fn undeclared_from_argument() {
        let e = parse_recipe("x", Path::new("."), "FROM ${NOPE}\n", &project()).unwrap_err();
        assert!(e.to_string().contains("no ARG"), "{e}");
    }
}
