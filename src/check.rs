//! `abox check`: is the pinned Alpine version behind? Reads Alpine's `latest-releases.yaml` of
//! the pin's branch (`v3.22`) and of `latest-stable`, and compares versions.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Where Alpine publishes its releases.
pub const DEFAULT_MIRROR: &str = "https://dl-cdn.alpinelinux.org/alpine";

/// A dotted version, compared number by number (`3.22.10` after `3.22.9`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(Vec<u64>);

impl Version {
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Result<Vec<u64>, _> = s.trim().split('.').map(str::parse).collect();
        match parts {
            Ok(p) if p.len() >= 2 => Ok(Self(p)),
            _ => bail!("{s:?} is not an Alpine version like 3.22.2"),
        }
    }

    /// `v3.22`: the branch folder on the mirror.
    pub fn branch(&self) -> String {
        format!("v{}.{}", self.0[0], self.0[1])
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&s.join("."))
    }
}

#[derive(Deserialize)]
struct Release {
    version: String,
}

/// The newest version a `latest-releases.yaml` lists.
pub fn newest_in(yaml: &str, url: &str) -> Result<Version> {
    let releases: Vec<Release> = serde_yaml_ng::from_str(yaml).with_context(|| {
        format!("{url} is not a list of releases (malformed latest-releases.yaml)")
    })?;
    releases
        .iter()
        .map(|r| Version::parse(&r.version))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("{url}: a release has a malformed version"))?
        .into_iter()
        .max()
        .with_context(|| format!("{url} lists no release"))
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub pinned: Version,
    /// Newest release of the pin's branch.
    pub branch_newest: Version,
    /// Newest stable release.
    pub stable_newest: Version,
}

impl Drift {
    pub fn behind(&self) -> bool {
        self.pinned < self.branch_newest || self.pinned < self.stable_newest
    }

    /// One line per finding.
    pub fn report(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.pinned < self.branch_newest {
            v.push(format!(
                "warning: Alpine {} is pinned but {} is out on {} (a patch release: update ARG ALPINE_VERSION)",
                self.pinned,
                self.branch_newest,
                self.pinned.branch()
            ));
        }
        if self.stable_newest.branch() != self.pinned.branch() && self.pinned < self.stable_newest {
            v.push(format!(
                "warning: the newest stable Alpine is {} ({}); the pin is on {}",
                self.stable_newest,
                self.stable_newest.branch(),
                self.pinned.branch()
            ));
        }
        if v.is_empty() {
            v.push(format!(
                "Alpine {} is up to date (newest on {}: {}, newest stable: {})",
                self.pinned,
                self.pinned.branch(),
                self.branch_newest,
                self.stable_newest
            ));
        }
        v
    }
}

fn fetch(agent: &ureq::Agent, url: &str) -> Result<String> {
    log::debug!("GET {url}");
    let mut resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => anyhow::anyhow!("{url} answered HTTP {code}"),
        e => anyhow::anyhow!(
            "cannot fetch {url}: {e} (offline? set --mirror to a reachable Alpine mirror)"
        ),
    })?;
    resp.body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .with_context(|| format!("reading {url}"))
}

/// Fetch both release lists from `mirror` and compare with `pinned`.
pub fn check(pinned: &str, mirror: &str, arch: &str) -> Result<Drift> {
    let pinned = Version::parse(pinned)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mirror = mirror.trim_end_matches('/');
    let url = |branch: &str| format!("{mirror}/{branch}/releases/{arch}/latest-releases.yaml");
    let b = url(&pinned.branch());
    let branch_newest = newest_in(&fetch(&agent, &b)?, &b)?;
    let s = url("latest-stable");
    let stable_newest = newest_in(&fetch(&agent, &s)?, &s)?;
    Ok(Drift {
        pinned,
        branch_newest,
        stable_newest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_numbers() {
        let a = Version::parse("3.22.9").unwrap();
        let b = Version::parse("3.22.10").unwrap();
        assert!(a < b);
        assert_eq!(b.branch(), "v3.22");
        assert_eq!(b.to_string(), "3.22.10");
        assert!(Version::parse("edge").is_err());
        assert!(Version::parse("3").is_err());
    }

    #[test]
    fn newest_of_a_release_list() {
        let y = "---\n- title: Standard\n  branch: v3.22\n  version: 3.22.1\n  flavor: alpine-standard\n- title: Virtual\n  branch: v3.22\n  version: 3.22.2\n  flavor: alpine-virt\n";
        assert_eq!(newest_in(y, "u").unwrap().to_string(), "3.22.2");
        assert!(
            format!("{:#}", newest_in("<html>404</html>", "u").unwrap_err()).contains("malformed")
        );
        assert!(newest_in("[]", "u").is_err());
    }
}
