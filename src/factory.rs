//! `abox build`, `abox push` and `abox all`: the project's recipes ([`crate::project`]) built
//! through the engine in dependency order, tagged, pushed, and turned into artifacts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::engine::build::{build, BuildSpec, Built};
use crate::engine::session::SessionConfig;
use crate::engine::Engine;
use crate::export::{self, ExportOptions, Targets};
use crate::progress::Progress;
use crate::project::{Project, Recipe};
use crate::source::SelectOptions;

/// The local prefix images are tagged with when no registry is given.
pub const DEFAULT_PREFIX: &str = "alpine-boxes";

#[derive(Debug, Clone)]
pub struct Options {
    /// The recipes folder.
    pub dir: PathBuf,
    /// Recipes to act on (empty: all).
    pub names: Vec<String>,
    /// `HOST[:PORT]/NAMESPACE`, or the local prefix.
    pub prefix: String,
    pub alpine_version: Option<String>,
    pub base_image: Option<String>,
    pub build_args: Vec<(String, String)>,
    pub no_cache: bool,
    /// Cache sources; `{name}` and `{version}` are replaced per recipe.
    pub cache_from: Vec<String>,
    pub push: bool,
    /// Build secrets and SSH agents served to `RUN --mount=type=secret|ssh`.
    pub session: Arc<SessionConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: PathBuf::from("Dockerfiles"),
            names: Vec::new(),
            prefix: DEFAULT_PREFIX.into(),
            alpine_version: None,
            base_image: None,
            build_args: Vec::new(),
            no_cache: false,
            cache_from: Vec::new(),
            push: false,
            session: Arc::default(),
        }
    }
}

/// Check `--registry`: `HOST[:PORT]/NAMESPACE` or a bare local prefix, no tag, lower case.
pub fn check_prefix(p: &str) -> Result<String> {
    let p = p.trim_end_matches('/');
    let ok = !p.is_empty()
        && p.split('/').all(|c| {
            !c.is_empty()
                && c.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-:".contains(ch))
        })
        && !p.split('/').skip(1).any(|c| c.contains(':'));
    if !ok {
        bail!("--registry {p:?}: expected HOST[:PORT]/NAMESPACE (lower case, no tag), e.g. 127.0.0.1:5000/boxes");
    }
    Ok(p.to_string())
}

/// Whether the prefix names a registry (its first part is a host).
fn has_registry(prefix: &str) -> bool {
    let first = prefix.split('/').next().unwrap_or("");
    prefix.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost")
}

/// `SOURCE_DATE_EPOCH` as RFC 3339 UTC, when set.
fn source_date_epoch() -> Option<String> {
    let secs: i64 = std::env::var("SOURCE_DATE_EPOCH")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    chrono::DateTime::from_timestamp(secs, 0).map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

struct Plan {
    project: Project,
    version: Option<String>,
}

impl Plan {
    fn load(opts: &Options) -> Result<Self> {
        let project = Project::load(&opts.dir)?;
        let version = match &opts.alpine_version {
            Some(v) => Some(v.clone()),
            None => project.alpine_version()?,
        };
        Ok(Plan { project, version })
    }

    fn tags(&self, opts: &Options, name: &str) -> Vec<String> {
        let repo = format!("{}/{name}", opts.prefix);
        let mut t = Vec::new();
        if let Some(v) = &self.version {
            t.push(format!("{repo}:{v}"));
        }
        t.push(format!("{repo}:latest"));
        t
    }

    fn spec(&self, opts: &Options, r: &Recipe) -> BuildSpec {
        let mut args: BTreeMap<String, String> = BTreeMap::new();
        if let (Some(v), true) = (&self.version, r.global_args.contains_key("ALPINE_VERSION")) {
            args.insert("ALPINE_VERSION".into(), v.clone());
        }
        for (arg, parent) in &r.from_args {
            match parent {
                Some(p) => {
                    args.insert(arg.clone(), self.tags(opts, p)[0].clone());
                }
                None => {
                    if let Some(b) = &opts.base_image {
                        args.insert(arg.clone(), b.clone());
                    }
                }
            }
        }
        // The OCI `created` label of reproducible builds.
        if let (true, Some(t)) = (r.declared_args.contains("CREATED"), source_date_epoch()) {
            args.insert("CREATED".into(), t);
        }
        for (k, v) in &opts.build_args {
            args.insert(k.clone(), v.clone());
        }
        let version = self.version.clone().unwrap_or_else(|| "latest".into());
        BuildSpec {
            context: r.dir.clone(),
            name: r.name.clone(),
            tags: self.tags(opts, &r.name),
            build_args: args,
            no_cache: opts.no_cache,
            cache_from: opts
                .cache_from
                .iter()
                .map(|c| c.replace("{name}", &r.name).replace("{version}", &version))
                .collect(),
            session: opts.session.clone(),
        }
    }
}

/// Build the asked recipes (and missing parents) in dependency order.
pub fn build_images(engine: &Engine, opts: &Options, progress: &Progress) -> Result<Vec<Built>> {
    let plan = Plan::load(opts)?;
    if opts.base_image.is_some()
        && !plan
            .project
            .recipes
            .iter()
            .any(|r| r.from_args.values().any(|p| p.is_none()))
    {
        bail!("--base-image: no recipe takes its base image from a build argument (ARG X=…, FROM ${{X}})");
    }
    if opts.push && !has_registry(&opts.prefix) {
        bail!("--push needs --registry HOST[:PORT]/NAMESPACE");
    }
    // Every secret file and agent socket is checked before the first build starts.
    opts.session.check()?;
    let mut built = Vec::new();
    for (r, asked) in plan.project.closure(&opts.names)? {
        let spec = plan.spec(opts, r);
        if !asked && engine.inspect(&spec.tags[0]).is_ok() {
            log::debug!("{} exists, not rebuilding the parent", spec.tags[0]);
            continue;
        }
        // Base images from outside the project are pulled first, so an offline machine is told
        // in one line which image it lacks and what to do.
        let parents: Vec<String> = r
            .parents()
            .iter()
            .map(|p| plan.tags(opts, p)[0].clone())
            .collect();
        for image in r.base_images(&spec.build_args) {
            if parents.contains(&image) {
                continue;
            }
            engine.ensure_image(&image, progress).map_err(|e| match e.downcast::<crate::engine::pull::PullFailed>() {
                Ok(p) => anyhow::anyhow!(
                    "cannot pull {}, the base image of recipe {} ({}): offline or no registry access? Build on a local image with --base-image REF (e.g. one made with `docker import`), or run scripts/demo for the offline tour",
                    p.image, r.name, p.reason
                ),
                Err(e) => e,
            })?;
        }
        let task = progress.task(&format!("building {}", r.name), 0);
        let b = build(engine, &spec, progress)?;
        task.finish(&format!("{} steps, {} cached", b.steps, b.cached));
        for t in &b.tags {
            println!("{t} {}", b.id);
        }
        if opts.push {
            for t in &b.tags {
                let d = crate::engine::push::push(engine, t, progress)?;
                println!("{t}@{d}");
            }
        }
        built.push(b);
    }
    Ok(built)
}

/// Push the recipes' images (which must exist).
pub fn push_images(
    engine: &Engine,
    opts: &Options,
    progress: &Progress,
) -> Result<Vec<(String, String)>> {
    if !has_registry(&opts.prefix) {
        bail!("push needs --registry HOST[:PORT]/NAMESPACE (the images are tagged with it when built)");
    }
    let plan = Plan::load(opts)?;
    let names: Vec<&Recipe> = if opts.names.is_empty() {
        plan.project.recipes.iter().collect()
    } else {
        opts.names
            .iter()
            .map(|n| plan.project.get(n))
            .collect::<Result<_>>()?
    };
    let mut out = Vec::new();
    for r in names {
        for t in plan.tags(opts, &r.name) {
            engine.inspect(&t).with_context(|| {
                format!(
                    "{t} is not built: run `abox build {} --registry {}`",
                    r.name, opts.prefix
                )
            })?;
            let d = crate::engine::push::push(engine, &t, progress)?;
            println!("{t}@{d}");
            out.push((t, d));
        }
    }
    Ok(out)
}

/// `abox all`: build every recipe, then write every artifact of each into `<out>/<name>/`:
/// each image is flattened once for all of them; when the disk needs the VM layer, the `-vm`
/// image is flattened once for the disk, and `manifest.json` names it for that artifact.
pub fn all(
    opts: &Options,
    identity: &crate::identity::Sources,
    out: &std::path::Path,
    progress: &Progress,
) -> Result<Vec<PathBuf>> {
    let engine = Arc::new(Engine::connect()?);
    let built = build_images(&engine, opts, progress)?;
    let mut files = Vec::new();
    for b in &built {
        let source = format!("docker:{}", b.tags[0]);
        let out_dir = out.join(&b.name);
        let export = ExportOptions {
            source: source.clone(),
            out_dir: Some(out_dir.clone()),
            single: None,
            name: Some(b.name.clone()),
            targets: Targets {
                wsl: true,
                wsl_package: true,
                lxd: true,
                lxd_split: true,
                // Written with the disk (run_with_disks), not as an export target.
                lxd_vm: false,
                rootfs: false,
            },
            select: SelectOptions::default(),
            identity: identity.clone(),
            ..Default::default()
        };
        use crate::identity::fixup::Flavor;
        let ids = export::Identities::resolve(
            identity,
            &b.name,
            &[Flavor::Disk, Flavor::Wsl, Flavor::WslPackage, Flavor::Lxd],
            progress,
        )?;
        let image = crate::source::open_with(&source, &export.select, Some(&engine))?;
        export::create_out_dir(&out_dir)?;
        crate::output::check_lists(&out_dir)?;
        let targets = export::create_targets(&export, &image, &b.name, &out_dir, &ids)?;
        let disks = if image.architecture() == "amd64" {
            Some(export::DiskSet::create(
                &source,
                &image,
                &b.name,
                &out_dir,
                (true, true),
                &ids,
                progress,
            )?)
        } else {
            progress.note(&format!(
                "{}: no disk written: the image is for {}, abox writes x86-64 disks",
                b.name,
                image.architecture()
            ));
            None
        };
        let plan = crate::flatten::index(&image, progress)?;
        let artifacts =
            export::run_with_disks(&image, &plan, targets, disks, Some(&engine), true, progress)
                .map_err(|e| crate::output::explain_full(e, &out_dir))
                .with_context(|| format!("writing the artifacts of {}", b.name))?;
        files.extend(export::commit(
            &out_dir, &source, &image, artifacts, progress,
        )?);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(
            check_prefix("127.0.0.1:5000/boxes/").unwrap(),
            "127.0.0.1:5000/boxes"
        );
        assert!(check_prefix("Reg/X").is_err());
        assert!(check_prefix("reg/x:tag").is_err());
        assert!(has_registry("127.0.0.1:5000/boxes"));
        assert!(has_registry("ghcr.io/me"));
        assert!(!has_registry("alpine-boxes"));
        assert!(!has_registry("me/boxes"));
    }
}
