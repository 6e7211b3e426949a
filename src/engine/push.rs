//! Pushing built images to a registry, with the docker CLI's credentials ([`super::auth`]).

use anyhow::{anyhow, bail, Result};
use bollard::query_parameters::PushImageOptionsBuilder;
use futures_util::StreamExt;

use super::auth::{config_path, credentials, registry_of};
use super::build::split_tag;
use super::Engine;
use crate::progress::Progress;

/// Push `reference` (`HOST[:PORT]/ns/name:tag`); returns the manifest digest the registry
/// stored.
pub fn push(engine: &Engine, reference: &str, progress: &Progress) -> Result<String> {
    let registry = registry_of(reference);
    let (repo, tag) = split_tag(reference);
    let creds = credentials(&registry);
    let had_creds = creds.is_some();
    let task = progress.task(&format!("pushing {reference}"), 0);
    let mut digest = None;
    let mut error = None;
    engine.block_on(async {
        let mut s = engine.docker.push_image(
            repo,
            Some(PushImageOptionsBuilder::default().tag(tag).build()),
            creds,
        );
        while let Some(item) = s.next().await {
            if crate::signals::check().is_err() {
                error = Some("interrupted".to_string());
                break;
            }
            match item {
                Ok(info) => {
                    if let Some(d) = info.error_detail.and_then(|d| d.message) {
                        error = Some(d);
                        break;
                    }
                    if let Some(st) = info.status {
                        // "<tag>: digest: sha256:… size: N"
                        if let Some(rest) = st.split("digest: ").nth(1) {
                            digest = rest.split_whitespace().next().map(str::to_string);
                        }
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error: e }) => {
                    error = Some(e);
                    break;
                }
                Err(e) => {
                    error = Some(super::api_error(e).to_string());
                    break;
                }
            }
        }
    });
    if let Some(e) = error {
        if e == "interrupted" {
            bail!("interrupted");
        }
        return Err(explain(&e, reference, &registry, had_creds));
    }
    let digest = digest.ok_or_else(|| {
        anyhow!("pushing {reference}: the engine did not report the pushed digest")
    })?;
    task.finish(&digest);
    Ok(digest)
}

/// A refused push says which registry refused and where credentials come from.
fn explain(msg: &str, reference: &str, registry: &str, had_creds: bool) -> anyhow::Error {
    let m = msg.to_ascii_lowercase();
    let auth = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "401",
        "denied",
    ]
    .iter()
    .any(|k| m.contains(k));
    if !auth {
        return anyhow!("pushing {reference} to {registry}: {msg}");
    }
    let have = if had_creds {
        "the credentials found there were refused"
    } else {
        "none were found there for this registry"
    };
    anyhow!(
        "the registry {registry} refused the push of {reference} (401 unauthorized: {msg}).\n\
         abox reads credentials the way the docker CLI does, from {} (auths, credHelpers, \
         credsStore; set DOCKER_CONFIG to use another folder) — {have}. Run `docker login {registry}`.",
        config_path().display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_push_message() {
        let e = explain(
            "unauthorized: authentication required",
            "r:5000/a/b:1",
            "r:5000",
            false,
        )
        .to_string();
        assert!(e.contains("r:5000 refused the push"), "{e}");
        assert!(e.contains("config.json"), "{e}");
        assert!(e.contains("docker login r:5000"), "{e}");
        let e = explain("connection refused", "r:5000/a/b:1", "r:5000", false).to_string();
        assert!(!e.contains("refused the push"), "{e}");
    }
}
