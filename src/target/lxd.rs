//! LXD / Incus images. Unified: one `<name>.lxd.tar.gz` with `metadata.yaml` at its root,
//! `templates/` and `rootfs/`. Split: `<name>.lxd-meta.tar.gz` (metadata + templates, the first
//! argument of `lxc image import`) and `<name>.lxd-rootfs.squashfs`, made by streaming the
//! rootfs tar into `tar2sqfs` (squashfs-tools-ng) — nothing is unpacked on disk. OpenRC images
//! get the container set-up of the official Alpine images ([`openrc::LXD`]).

use std::collections::{BTreeMap, HashSet};
use std::io::BufWriter;
use std::path::Path;
use std::process::Command;

use anyhow::Result;

use super::openrc::{self, OpenRc};
use super::{
    os_release, os_release_get, Action, EntryOut, Extra, Fixup, Out, TarDest, TarFileTarget,
    TarStream, Target,
};
use crate::cmd::PipedChild;
use crate::flatten::Facts;
use crate::identity::fixup::{Flavor, Identified, IdentityFixup};
use crate::output::{hash_file, Artifact, PendingFile};
use crate::tarfmt::{Meta, TarWriter};

#[derive(Clone, Debug, Default)]
pub struct LxdOptions {
    pub name: String,
    /// OCI architecture (`amd64`).
    pub architecture: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// A virtual-machine image: `requirements.secureboot: "false"` (its loader is unsigned).
    pub vm: bool,
    /// The first-boot identity written into the rootfs; with a hostname, LXD's hostname and
    /// hosts templates are left out (they would replace it with the instance name).
    pub identity: Option<std::sync::Arc<crate::identity::Identity>>,
}

impl LxdOptions {
    fn fixed_hostname(&self) -> bool {
        self.identity.as_ref().is_some_and(|i| i.hostname.is_some())
    }
}

/// LXD names architectures the kernel's way.
pub fn lxd_arch(oci: &str) -> &str {
    match oci {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "arm" => "armv7l",
        "386" => "i686",
        other => other,
    }
}

/// `metadata.yaml` (LXD's image format: `architecture`, `creation_date`, `properties`,
/// `requirements`, `templates`), serialised with serde. Properties come from the image's
/// os-release (`ID`, `VERSION_ID`, else `/etc/alpine-release`; `PRETTY_NAME`).
pub fn metadata_yaml(opts: &LxdOptions, facts: &Facts) -> String {
    #[derive(serde::Serialize)]
    struct Metadata<'a> {
        architecture: &'a str,
        creation_date: u64,
        properties: Properties,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        requirements: BTreeMap<&'static str, &'static str>,
        templates: BTreeMap<String, TemplateYaml>,
    }
    #[derive(serde::Serialize)]
    struct Properties {
        architecture: String,
        os: String,
        release: String,
        variant: String,
        description: String,
        serial: String,
    }
    #[derive(serde::Serialize)]
    struct TemplateYaml {
        when: [&'static str; 2],
        template: &'static str,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        properties: BTreeMap<&'static str, &'static str>,
    }
    let rel = facts
        .text("etc/os-release")
        .or_else(|| facts.text("usr/lib/os-release"))
        .map(os_release)
        .unwrap_or_default();
    let os = os_release_get(&rel, "ID").unwrap_or("linux");
    let release = os_release_get(&rel, "VERSION_ID")
        .map(str::to_string)
        .or_else(|| {
            facts
                .text("etc/alpine-release")
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let pretty = os_release_get(&rel, "PRETTY_NAME").unwrap_or(os);
    let serial = chrono::DateTime::from_timestamp(opts.created as i64, 0)
        .map(|d| d.format("%Y%m%d_%H%M").to_string())
        .unwrap_or_default();
    let arch = lxd_arch(&opts.architecture);
    let m = Metadata {
        architecture: arch,
        creation_date: opts.created,
        properties: Properties {
            architecture: arch.to_string(),
            os: os.to_string(),
            release,
            variant: opts.name.clone(),
            description: format!("{pretty} ({}, {serial})", opts.name),
            serial,
        },
        requirements: if opts.vm {
            BTreeMap::from([("secureboot", "false")])
        } else {
            BTreeMap::new()
        },
        templates: templates(opts)
            .into_iter()
            .map(|t| {
                let properties = t.default.map(|d| ("default", d)).into_iter().collect();
                let y = TemplateYaml {
                    when: ["create", "copy"],
                    template: t.name,
                    properties,
                };
                (t.path, y)
            })
            .collect(),
    };
    let body = serde_yaml_ng::to_string(&m).expect("metadata serialises");
    format!("# Written by alpine-boxes.\n{body}")
}

/// One LXD template: the file it writes in the instance at create and copy, its name under
/// `templates/`, its content (pongo2, LXD's template language).
struct Template {
    path: String,
    name: &'static str,
    content: String,
    /// `properties.default` (pongo2 string literals cannot hold a newline).
    default: Option<&'static str>,
}

/// The user and vendor data an instance gets when its config gives none.
const EMPTY_CLOUD_CONFIG: &str = "#cloud-config\n{}\n";

const HOSTNAME_TPL: &str = "{{ container.name }}\n";
const HOSTS_TPL: &str = "127.0.0.1   localhost\n\
127.0.1.1   {{ container.name }}\n\
::1         localhost ip6-localhost ip6-loopback\n\
ff02::1     ip6-allnodes\n\
ff02::2     ip6-allrouters\n";

/// The NoCloud seed from the instance's config, as distrobuilder's `cloud` variants write it:
/// `cloud-init.user-data` (or the older `user.user-data`), `cloud-init.vendor-data`,
/// `cloud-init.network-config` (or `user.network-config`; default: DHCP on eth0, enp5s0 in a
/// VM), meta-data from the instance name (the `--hostname` when given).
const CLOUD_META_TPL: &str = "instance-id: {{ container.name }}\nlocal-hostname: {{ container.name }}\n{{ config_get(\"user.meta-data\", \"\") }}\n";
const CLOUD_USER_TPL: &str = "{{ config_get(\"cloud-init.user-data\", config_get(\"user.user-data\", properties.default)) }}\n";
const CLOUD_VENDOR_TPL: &str = "{{ config_get(\"cloud-init.vendor-data\", config_get(\"user.vendor-data\", properties.default)) }}\n";
const CLOUD_NETWORK_TPL: &str =
    "{% if config_get(\"cloud-init.network-config\", config_get(\"user.network-config\", \"\")) == \"\" %}version: 1\n\
config:\n\
\x20 - type: physical\n\
\x20   name: {% if instance.type == \"virtual-machine\" %}enp5s0{% else %}eth0{% endif %}\n\
\x20   subnets:\n\
\x20     - type: dhcp\n\
\x20       control: auto\n\
{% else %}{{ config_get(\"cloud-init.network-config\", config_get(\"user.network-config\", \"\")) }}{% endif %}\n";
/// Marks tiny-cloud's NoCloud data as loaded: tiny-cloud then reads the files the templates
/// wrote in its folder instead of looking for a `cidata` volume (tiny-cloud's nocloud/imds).
const LOADED_TPL: &str = "";

/// The templates an image carries: the hostname and hosts (unless the identity fixes the
/// hostname), and with `--cloud-init` the NoCloud seed in cloud-init's folder and in
/// tiny-cloud's (`/var/lib/cloud`).
fn templates(opts: &LxdOptions) -> Vec<Template> {
    let mut v = Vec::new();
    let t = |path: &str, name, content: &str| Template {
        path: path.to_string(),
        name,
        content: content.to_string(),
        default: (content == CLOUD_USER_TPL || content == CLOUD_VENDOR_TPL)
            .then_some(EMPTY_CLOUD_CONFIG),
    };
    // With --hostname the seed names that host, not the instance (tiny-cloud and cloud-init
    // set the hostname from it). The name is checked (letters, digits, '-', '.'): no template
    // syntax can be in it.
    let meta = match opts.identity.as_ref().and_then(|i| i.hostname.as_deref()) {
        Some(h) => CLOUD_META_TPL.replace(
            "local-hostname: {{ container.name }}",
            &format!("local-hostname: {h}"),
        ),
        None => CLOUD_META_TPL.to_string(),
    };
    if !opts.fixed_hostname() {
        v.push(t("/etc/hostname", "hostname.tpl", HOSTNAME_TPL));
        v.push(t("/etc/hosts", "hosts.tpl", HOSTS_TPL));
    }
    if opts.identity.as_ref().is_some_and(|i| i.cloud_init) {
        for dir in ["/var/lib/cloud/seed/nocloud-net", "/var/lib/cloud"] {
            let tiny = dir == "/var/lib/cloud";
            let p = |f: &str| format!("{dir}/{f}");
            v.push(t(&p("meta-data"), "cloud-init-meta.tpl", &meta));
            v.push(t(&p("user-data"), "cloud-init-user.tpl", CLOUD_USER_TPL));
            v.push(t(
                &p("network-config"),
                "cloud-init-network.tpl",
                CLOUD_NETWORK_TPL,
            ));
            if tiny {
                v.push(t(
                    &p(".nocloud_loaded"),
                    "tiny-cloud-loaded.tpl",
                    LOADED_TPL,
                ));
            } else {
                v.push(t(
                    &p("vendor-data"),
                    "cloud-init-vendor.tpl",
                    CLOUD_VENDOR_TPL,
                ));
            }
        }
    }
    v
}

/// metadata.yaml and the templates, at the archive root.
fn meta_entries(opts: &LxdOptions, facts: &Facts) -> Vec<Extra> {
    let t = opts.created;
    let mut v = vec![
        Extra::file(
            "metadata.yaml",
            0o644,
            metadata_yaml(opts, facts).into_bytes(),
            t,
        ),
        Extra::dir("templates", t),
    ];
    let mut written = std::collections::HashSet::new();
    for tpl in templates(opts) {
        if written.insert(tpl.name) {
            v.push(Extra::file(
                &format!("templates/{}", tpl.name),
                0o644,
                tpl.content.into_bytes(),
                t,
            ));
        }
    }
    v
}

/// The metadata half of an LXD/Incus virtual-machine image, `<name>.lxd-vm-meta.tar.gz`
/// (metadata.yaml + templates; the other half is the UEFI disk `<name>.lxd-vm.qcow2`, written
/// by the disk target). Written once the image's facts are known; it takes no entries.
pub fn create_vm_meta(out_dir: &Path, opts: &LxdOptions) -> Result<Box<dyn Target>> {
    let file = PendingFile::create(&out_dir.join(format!("{}.lxd-vm-meta.tar.gz", opts.name)))?;
    Ok(Box::new(VmMeta {
        opts: LxdOptions {
            vm: true,
            ..opts.clone()
        },
        file,
        hash: None,
    }))
}

struct VmMeta {
    opts: LxdOptions,
    file: PendingFile,
    hash: Option<(String, u64)>,
}

impl Target for VmMeta {
    fn start(&mut self, plan: &crate::flatten::Plan) -> Result<()> {
        let mut out = Out::gzip(&mut self.file)?;
        {
            let mut tar = TarWriter::new(&mut out);
            for e in meta_entries(&self.opts, &plan.facts) {
                tar.entry(&e.path, &e.meta, &e.data)?;
            }
            tar.finish()?;
        }
        self.hash = out.close()?;
        Ok(())
    }
    fn begin(&mut self, _path: &str, _meta: &Meta) -> Result<()> {
        Ok(())
    }
    fn data(&mut self, _buf: &[u8]) -> Result<()> {
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<Vec<Artifact>> {
        let (sha256, size) = self.hash.expect("metadata written at start");
        Ok(vec![Artifact {
            kind: "lxd-vm-meta",
            file: self.file,
            sha256,
            size,
            image: None,
        }])
    }
}

/// Container fix-ups that apply to every LXD image.
pub struct LxdFixup {
    opts: LxdOptions,
    /// Put metadata and templates in front (unified image only).
    with_meta: bool,
    facts: Facts,
    openrc: OpenRc,
}

impl Fixup for LxdFixup {
    fn start_with(&mut self, plan: &crate::flatten::Plan, facts: &Facts) -> Result<()> {
        self.facts = facts.clone();
        self.openrc.start(facts, Some(plan.tree()));
        Ok(())
    }
    fn prologue(&mut self) -> Result<Vec<Extra>> {
        Ok(if self.with_meta {
            meta_entries(&self.opts, &self.facts)
        } else {
            Vec::new()
        })
    }
    fn action(&mut self, path: &str, meta: &Meta) -> Action {
        if path == ".dockerenv" {
            return Action::Drop;
        }
        self.openrc.action(path, meta).unwrap_or(Action::Keep)
    }
    fn rewrite(&mut self, path: &str, data: Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.openrc.rewrite(path, &data).unwrap_or(data))
    }
    fn epilogue(&mut self, _seen_dirs: &HashSet<String>) -> Result<Vec<Extra>> {
        Ok(self.openrc.extras(self.opts.created))
    }
}

/// The LXD fix-ups, with the identity over them when there is one.
fn fixup(opts: &LxdOptions, with_meta: bool) -> Identified<LxdFixup> {
    let inner = LxdFixup {
        opts: opts.clone(),
        with_meta,
        facts: Facts::default(),
        openrc: OpenRc::new(&openrc::LXD),
    };
    let id = opts
        .identity
        .clone()
        .map(|i| IdentityFixup::new(i, Flavor::Lxd, opts.created));
    Identified::new(inner, id)
}

/// The unified LXD/Incus image, `<name>.lxd.tar.gz` by default.
pub fn create_unified(dest: &TarDest, opts: &LxdOptions) -> Result<Box<dyn Target>> {
    let fixup = fixup(opts, true);
    Ok(Box::new(TarFileTarget::create(
        "lxd", dest, true, "rootfs/", fixup,
    )?))
}

/// The split image: a metadata tarball written at start, and the squashfs fed as we go.
pub struct SplitTarget {
    opts: LxdOptions,
    meta_file: PendingFile,
    /// sha256 and size of the metadata tarball, hashed as it was written.
    meta_hash: Option<(String, u64)>,
    squash_file: PendingFile,
    child: Option<PipedChild>,
    stream: Option<TarStream<Identified<LxdFixup>>>,
}

pub fn create_split(out_dir: &Path, opts: &LxdOptions) -> Result<Box<dyn Target>> {
    let meta_file = PendingFile::create(&out_dir.join(format!("{}.lxd-meta.tar.gz", opts.name)))?;
    let squash_file =
        PendingFile::create(&out_dir.join(format!("{}.lxd-rootfs.squashfs", opts.name)))?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut child = PipedChild::spawn(
        Command::new("tar2sqfs")
            .args(["--quiet", "--force", "--no-skip", "--compressor", "xz"])
            .args(["--num-jobs", &threads.to_string()])
            .args([
                "--defaults",
                &format!("uid=0,gid=0,mode=0755,mtime={}", opts.created),
            ])
            .arg(squash_file.tmp_path()),
    )?;
    let stdin = child.take_stdin().expect("fresh child has stdin");
    let fixup = fixup(opts, false);
    let stream = TarStream::new(
        Out::Pipe(BufWriter::with_capacity(1 << 20, stdin)),
        "",
        fixup,
    );
    Ok(Box::new(SplitTarget {
        opts: opts.clone(),
        meta_file,
        meta_hash: None,
        squash_file,
        child: Some(child),
        stream: Some(stream),
    }))
}

impl SplitTarget {
    fn stream(&mut self) -> &mut TarStream<Identified<LxdFixup>> {
        self.stream.as_mut().expect("stream open until finish")
    }
    /// A write into the pipe failed: the child's stderr says why.
    fn piped(&mut self, r: Result<()>) -> Result<()> {
        r.map_err(|e| match self.child.take() {
            Some(c) => {
                let io = e
                    .downcast_ref::<std::io::Error>()
                    .map(|i| std::io::Error::new(i.kind(), i.to_string()))
                    .unwrap_or_else(|| std::io::Error::other(e.to_string()));
                c.broken(io)
            }
            None => e,
        })
    }
}

impl Target for SplitTarget {
    fn start(&mut self, plan: &crate::flatten::Plan) -> Result<()> {
        let facts = &plan.facts;
        let mut out = Out::gzip(&mut self.meta_file)?;
        {
            let mut tar = TarWriter::new(&mut out);
            for e in meta_entries(&self.opts, facts) {
                tar.entry(&e.path, &e.meta, &e.data)?;
            }
            tar.finish()?;
        }
        self.meta_hash = out.close()?;
        let r = self.stream().start(plan);
        self.piped(r)
    }
    fn begin(&mut self, path: &str, meta: &Meta) -> Result<()> {
        let r = self.stream().begin(path, meta);
        self.piped(r)
    }
    fn data(&mut self, buf: &[u8]) -> Result<()> {
        let r = self.stream().data(buf);
        self.piped(r)
    }
    fn end(&mut self) -> Result<()> {
        let r = self.stream().end();
        self.piped(r)
    }
    fn finish(mut self: Box<Self>) -> Result<Vec<Artifact>> {
        let stream = self.stream.take().expect("stream open until finish");
        let r = stream.finish().and_then(|o| o.close()).map(|_| ());
        self.piped(r)?;
        self.child.take().expect("child until finish").wait()?;
        let (ms, ml) = self
            .meta_hash
            .take()
            .expect("gzip output is hashed as written");
        let (ss, sl) = hash_file(self.squash_file.tmp_path())?;
        let this = *self;
        Ok(vec![
            Artifact {
                kind: "lxd-meta",
                file: this.meta_file,
                sha256: ms,
                size: ml,
                image: None,
            },
            Artifact {
                kind: "lxd-rootfs",
                file: this.squash_file,
                sha256: ss,
                size: sl,
                image: None,
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_has_required_fields_and_os_release_properties() {
        let mut facts = Facts::default();
        facts.files.insert(
            "etc/os-release".into(),
            b"ID=alpine\nVERSION_ID=3.20.3\nPRETTY_NAME=\"Alpine Linux v3.20\"\n".to_vec(),
        );
        let opts = LxdOptions {
            name: "base".into(),
            architecture: "amd64".into(),
            created: 1704164645,
            vm: false,
            identity: None,
        };
        let y = metadata_yaml(&opts, &facts);
        assert!(y.starts_with("# Written by alpine-boxes.\n"), "{y}");
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&y).unwrap();
        assert_eq!(v["architecture"], "x86_64");
        assert_eq!(v["creation_date"], 1704164645);
        let p = &v["properties"];
        assert_eq!(p["os"], "alpine");
        assert_eq!(p["release"], "3.20.3", "a string, not a number");
        assert_eq!(p["serial"], "20240102_0304");
        assert_eq!(p["description"], "Alpine Linux v3.20 (base, 20240102_0304)");
        assert_eq!(v["templates"]["/etc/hosts"]["template"], "hosts.tpl");
        assert_eq!(v["templates"]["/etc/hosts"]["when"][1], "copy");
        assert!(v.get("requirements").is_none(), "{y}");
        let vm = metadata_yaml(&LxdOptions { vm: true, ..opts }, &facts);
        // Valid YAML, as LXD reads it; secureboot the string LXD compares.
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&vm).unwrap();
        assert_eq!(v["requirements"]["secureboot"], "false");
    }
}
