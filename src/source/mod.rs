//! Image sources: the first stage of the pipeline. A reference such as
//! `docker-archive:PATH`, `oci:DIR[:REF]` or `oci-archive:PATH[:REF]` becomes an [`Image`]: its
//! config, its layers in order, and a [`BlobStore`] to stream them from.

pub mod blobs;
mod docker_archive;
pub mod layer;
mod oci;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::image::ImageConfiguration;

pub use blobs::BlobStore;
pub use layer::{LayerDesc, LayerReader};

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    DockerArchive {
        path: PathBuf,
        reference: Option<String>,
    },
    Oci {
        dir: PathBuf,
        reference: Option<String>,
    },
    OciArchive {
        path: PathBuf,
        reference: Option<String>,
    },
    Docker {
        name: String,
    },
}

const TRANSPORTS: &str =
    "docker-archive:PATH, oci:DIR[:REF], oci-archive:PATH[:REF], docker:NAME, or an image NAME[:TAG] in the engine";

/// `PATH[:REF]`: the whole string when it names an existing file, else split at the last ':'.
fn split_ref(s: &str) -> (PathBuf, Option<String>) {
    if Path::new(s).exists() {
        return (PathBuf::from(s), None);
    }
    match s.rsplit_once(':') {
        Some((p, r)) if !p.is_empty() && !r.is_empty() && !r.contains('/') => {
            (PathBuf::from(p), Some(r.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

impl SourceRef {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, reference) = split_ref(rest);
            return Ok(Self::DockerArchive { path, reference });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, reference) = split_ref(rest);
            return Ok(Self::OciArchive { path, reference });
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, reference) = split_ref(rest);
            return Ok(Self::Oci { dir, reference });
        }
        if let Some(rest) = s.strip_prefix("docker:") {
            return Ok(Self::Docker {
                name: rest.trim_start_matches("//").to_string(),
            });
        }
        // No transport: guess from what is on disk.
        let p = Path::new(s);
        if p.is_dir() {
            return Ok(Self::Oci {
                dir: p.to_path_buf(),
                reference: None,
            });
        }
        if p.is_file() {
            let store = blobs::TarStore::open(p)?;
            if store.contains("manifest.json") {
                return Ok(Self::DockerArchive {
                    path: p.to_path_buf(),
                    reference: None,
                });
            }
            if store.contains("index.json") {
                return Ok(Self::OciArchive {
                    path: p.to_path_buf(),
                    reference: None,
                });
            }
            bail!("{s} is not an image: it has neither manifest.json (docker save) nor index.json (OCI)");
        }
        // A bare reference (`alpine:3.20`, as `docker run` takes it): the engine's image.
        if !looks_like_path(s) && is_reference(s) {
            return Ok(Self::Docker {
                name: s.to_string(),
            });
        }
        bail!("{s}: no such file or folder, and no transport given (use one of {TRANSPORTS})")
    }
}

/// Whether `s` reads as a path rather than an image reference: it starts at `/`, `.` or `~`,
/// or ends like an image file (`.tar`, `.tar.gz`, `.oci`…).
fn looks_like_path(s: &str) -> bool {
    s.starts_with(['/', '.', '~'])
        || [".tar", ".tar.gz", ".tgz", ".oci", ".zst", ".gz"]
            .iter()
            .any(|e| s.to_ascii_lowercase().ends_with(e))
}

/// Whether `s` is a Docker image reference (distribution's grammar: `[HOST[:PORT]/]PATH[:TAG]
/// [@sha256:HEX]`, path components lowercase).
pub fn is_reference(s: &str) -> bool {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        let comp = "[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*";
        let host = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?";
        let tag = "[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
        regex::Regex::new(&format!(
            "^(?:{host}/)?{comp}(?:/{comp})*(?::{tag})?(?:@sha256:[a-f0-9]{{64}})?$"
        ))
        .expect("reference grammar")
    })
    .is_match(s)
}

/// An image ready to be flattened.
pub struct Image {
    /// The reference as the user gave it.
    pub reference: String,
    /// Short name used for output files (`<name>.rootfs.tar.gz`).
    pub name: String,
    /// The tag the image was chosen by, when it has one (`3.23` of `alpine:3.23`).
    pub tag: Option<String>,
    /// Manifest digest (OCI) or config digest (docker-archive, where it is the image ID).
    pub digest: String,
    pub config_digest: String,
    pub config: ImageConfiguration,
    pub layers: Vec<LayerDesc>,
    pub blobs: Blobs,
}

/// How an image's blobs can be read.
pub enum Blobs {
    /// Any blob, any number of times, in any order (files, folders).
    Store(Box<dyn BlobStore>),
    /// Only as one flattened tar of the whole tree, front to back (the engine's container
    /// export); flattening reads it once and spools it.
    Export(Box<dyn crate::flatten::export::ExportSource>),
}

impl Image {
    /// Open a layer's uncompressed tar stream. With `verify`, its digests are checked when it
    /// is read to the end ([`LayerReader::finish`]).
    pub fn open_layer(
        &self,
        i: usize,
        counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
        verify: bool,
    ) -> Result<LayerReader<'static>> {
        let d = &self.layers[i];
        let store = match &self.blobs {
            Blobs::Store(s) => s,
            Blobs::Export(_) => bail!("internal: random access to an exported image"),
        };
        LayerReader::open(store.open(&d.key)?, d, counter, verify)
    }

    /// The name of the image's default output folder: its name, with the tag unless that is
    /// `latest` (`alpine:3.23` → `alpine-3.23`), so two tags of one image never share a folder.
    pub fn folder_name(&self) -> String {
        match self.tag.as_deref() {
            Some(t) if t != "latest" => sanitize(&format!("{}-{t}", self.name)),
            _ => self.name.clone(),
        }
    }

    pub fn architecture(&self) -> String {
        self.config.architecture().to_string()
    }

    /// `os/arch[/variant]` from the image's config.
    pub fn platform(&self) -> String {
        let mut s = format!("{}/{}", self.config.os(), self.config.architecture());
        if let Some(v) = self.config.variant() {
            s.push('/');
            s.push_str(v);
        }
        s
    }

    pub fn summary(&self) -> crate::output::ImageSummary {
        crate::output::ImageSummary {
            name: self.name.clone(),
            digest: self.digest.clone(),
            config_digest: self.config_digest.clone(),
            architecture: self.architecture(),
            layers: self.layers.len(),
        }
    }
}

/// Options that choose among several images in one source.
#[derive(Debug, Clone)]
pub struct SelectOptions {
    /// `os/arch[/variant]`, as OCI image indexes name platforms.
    pub platform: String,
    /// The user asked for `platform`: an image of another platform is an error (else a
    /// single-platform image is taken whatever its platform).
    pub required: bool,
}

/// The platform picked from a multi-platform image when none is asked for.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";

impl Default for SelectOptions {
    fn default() -> Self {
        Self::new(None)
    }
}

impl SelectOptions {
    /// `platform` as given by the user (`--platform`), or None for the default.
    pub fn new(platform: Option<String>) -> Self {
        Self {
            required: platform.is_some(),
            platform: platform.unwrap_or_else(|| DEFAULT_PLATFORM.into()),
        }
    }
}

/// A platform as containerd normalizes it: lowercase, no trailing `/`, the default variant
/// made explicit where an architecture has one (`arm64` → `arm64/v8`, `arm` → `arm/v7`) and
/// dropped where it means nothing (`amd64/v1` → `amd64`).
fn normalize_platform(p: &str) -> String {
    let p = p.trim().trim_end_matches('/').to_ascii_lowercase();
    let parts: Vec<&str> = p.split('/').collect();
    match parts.as_slice() {
        [os, "arm64"] | [os, "aarch64"] => format!("{os}/arm64/v8"),
        [os, "aarch64", v] => format!("{os}/arm64/{v}"),
        [os, "arm"] => format!("{os}/arm/v7"),
        [os, "amd64", "v1"] | [os, "x86_64"] | [os, "x86_64", "v1"] => format!("{os}/amd64"),
        _ => p.clone(),
    }
}

/// Whether the platform `have` (`os/arch[/variant]`, from an image's config or index) is
/// `want`, both normalized as containerd does (`linux/arm64` is `linux/arm64/v8`); a variant
/// left out of `want` matches any (`linux/amd64` takes `linux/amd64/v3`).
pub fn platform_is(have: &str, want: &str) -> bool {
    let (have, want) = (normalize_platform(have), normalize_platform(want));
    have == want || have.starts_with(&format!("{want}/"))
}

pub fn open(reference: &str, opts: &SelectOptions) -> Result<Image> {
    open_with(reference, opts, None)
}

/// [`open`], reusing a connection to the engine for `docker:` references.
pub fn open_with(
    reference: &str,
    opts: &SelectOptions,
    engine: Option<&std::sync::Arc<crate::engine::Engine>>,
) -> Result<Image> {
    let r = SourceRef::parse(reference)?;
    let mut img = match &r {
        SourceRef::DockerArchive { path, reference } => {
            require_file(path)?;
            docker_archive::open(path, reference.as_deref())
        }
        SourceRef::Oci { dir, reference } => {
            if !dir.is_dir() {
                bail!("{}: no such OCI layout folder", dir.display());
            }
            let store = blobs::DirStore::new(dir);
            oci::open(Box::new(store), dir, reference.as_deref(), opts)
        }
        SourceRef::OciArchive { path, reference } => {
            require_file(path)?;
            let store = blobs::TarStore::open(path)?;
            oci::open(Box::new(store), path, reference.as_deref(), opts)
        }
        SourceRef::Docker { name } => {
            let engine = match engine {
                Some(e) => e.clone(),
                None => std::sync::Arc::new(crate::engine::Engine::connect()?),
            };
            crate::engine::export::open(engine, name)
        }
    }
    .with_context(|| format!("reading image {reference}"))?;
    img.reference = reference.to_string();
    if opts.required {
        let have = img.platform();
        if !platform_is(&have, &opts.platform) {
            bail!(
                "{reference} is a {have} image, not {}: abox does not convert between \
                 platforms; build or pull the image for {} (docker build --platform), or leave \
                 out --platform",
                opts.platform,
                opts.platform
            );
        }
    }
    Ok(img)
}

fn require_file(p: &Path) -> Result<()> {
    if !p.is_file() {
        bail!("{}: no such file", p.display());
    }
    Ok(())
}

/// A name safe for file names: the last path component of a repository, without tag or digest.
pub fn short_name(reference: &str) -> String {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    let no_tag = last.split(':').next().unwrap_or(last);
    sanitize(no_tag)
}

/// The repository of a reference, without tag or digest (`host:5000/a/b:1` → `host:5000/a/b`).
pub fn repository_of(reference: &str) -> String {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    match no_digest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo.to_string(),
        _ => no_digest.to_string(),
    }
}

/// The tag of a reference (`alpine:3.23` → `3.23`, `host:5000/a/b:1` → `1`), None without one
/// (`alpine`, `alpine@sha256:…`).
pub fn tag_of(reference: &str) -> Option<String> {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split_once(':')
        .map(|(_, t)| t.to_string())
        .filter(|t| !t.is_empty())
}

/// Name from a file or folder: `alpine.tar` → `alpine`.
pub fn name_from_path(p: &Path) -> String {
    let stem = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem
        .strip_suffix(".tar")
        .or_else(|| stem.strip_suffix(".oci"))
        .unwrap_or(&stem);
    sanitize(stem)
}

fn sanitize(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches(|c| c == '.' || c == '-').to_string();
    if s.is_empty() {
        "image".into()
    } else {
        s
    }
}

/// Read and check a small JSON blob against its digest.
pub(crate) fn read_verified(
    store: &dyn BlobStore,
    key: &str,
    digest: Option<&str>,
) -> Result<Vec<u8>> {
    use sha2::Digest;
    let buf = store.read_small(key, blobs::MAX_JSON)?;
    if let Some(d) = digest {
        let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&buf)));
        if actual != d {
            bail!("{key}: digest mismatch: expected {d}, got {actual} — the image is corrupt");
        }
    }
    Ok(buf)
}

/// Check that the config lists one diff_id per layer.
pub(crate) fn diff_ids(config: &ImageConfiguration, layers: usize) -> Result<Vec<String>> {
    let ids = config.rootfs().diff_ids().clone();
    if ids.len() != layers {
        bail!(
            "the config lists {} layer diff_ids but the manifest has {layers} layers",
            ids.len()
        );
    }
    for id in &ids {
        if !id.starts_with("sha256:") || id.len() != 71 {
            bail!("unsupported diff_id {id:?} (only sha256 is supported)");
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_transports() {
        assert_eq!(
            SourceRef::parse("oci:/x/layout:v1").unwrap(),
            SourceRef::Oci {
                dir: "/x/layout".into(),
                reference: Some("v1".into())
            }
        );
        assert_eq!(
            SourceRef::parse("docker-archive:/tmp/a.tar").unwrap(),
            SourceRef::DockerArchive {
                path: "/tmp/a.tar".into(),
                reference: None
            }
        );
        assert_eq!(
            SourceRef::parse("docker:alpine-boxes/base:3.20").unwrap(),
            SourceRef::Docker {
                name: "alpine-boxes/base:3.20".into()
            }
        );
        assert!(SourceRef::parse("/definitely/not/here").is_err());
    }

    #[test]
    fn short_names() {
        for (input, want) in [
            ("alpine-boxes/base:3.20.3", "base"),
            ("localhost:5000/x/docker-host:latest", "docker-host"),
            ("busybox", "busybox"),
            ("reg/img@sha256:abc", "img"),
            ("we!rd name", "we-rd-name"),
        ] {
            assert_eq!(short_name(input), want, "{input}");
        }
        assert_eq!(name_from_path(Path::new("/a/alpine.tar")), "alpine");
    }

    #[test]
    fn platforms_compare_as_containerd_normalizes_them() {
        for (have, want) in [
            ("linux/arm64", "linux/arm64/v8"),
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/arm64", "linux/arm64/"),
            ("linux/amd64", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/amd64/v1", "linux/amd64"),
        ] {
            assert!(platform_is(have, want), "{have} is {want}");
        }
        for (have, want) in [
            ("linux/arm64", "linux/amd64"),
            ("linux/arm/v6", "linux/arm/v7"),
            ("linux/arm", "linux/arm/v6"),
            ("linux/amd64", "linux/amd64/v3"),
        ] {
            assert!(!platform_is(have, want), "{have} is not {want}");
        }
    }

    #[test]
    fn repositories_and_tags() {
        for (r, repo, tag) in [
            ("alpine", "alpine", None),
            ("alpine:3.20", "alpine", Some("3.20")),
            ("host:5000/a/b:1", "host:5000/a/b", Some("1")),
            ("host:5000/a/b", "host:5000/a/b", None),
            ("a/b@sha256:00", "a/b", None),
        ] {
            assert_eq!(repository_of(r), repo, "{r}");
            assert_eq!(tag_of(r).as_deref(), tag, "{r}");
        }
    }

    #[test]
    fn bare_references() {
        for r in [
            "alpine",
            "alpine:3.20",
            "alpine-boxes/base:3.20.3",
            "127.0.0.1:5000/boxes/base:1",
            "localhost/x_y__z/a-b:latest",
            &format!("reg.example/img@sha256:{}", "a".repeat(64)),
        ] {
            assert!(is_reference(r) && !looks_like_path(r), "{r}");
            assert!(
                matches!(SourceRef::parse(r), Ok(SourceRef::Docker { .. })),
                "{r}"
            );
        }
        for r in [
            "Alpine",
            "a b",
            "alpine:",
            ":3.20",
            "x//y",
            "-x",
            "img@sha256:abc",
        ] {
            assert!(!is_reference(r), "{r}");
        }
        for p in ["./alpine", "/tmp/alpine", "alpine.tar", "build.oci", "~/x"] {
            assert!(looks_like_path(p), "{p}");
            let e = SourceRef::parse(p)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("no such file or folder"), "{p}: {e}");
        }
    }
}
