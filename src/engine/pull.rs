//! Base images, made present before a build: an image the engine lacks is pulled
//! (`POST /images/create`) with the docker CLI's credentials, under an idle limit, so an
//! offline machine gets one clear line naming the image within seconds instead of BuildKit's
//! stack of resolver errors after its own time-outs.

use std::time::Duration;

use anyhow::{anyhow, Result};
use bollard::query_parameters::CreateImageOptionsBuilder;
use futures_util::StreamExt;

use super::Engine;
use crate::progress::Progress;

/// How long a pull may go without a word from the engine before abox gives up on it. A
/// reachable registry answers within a second or two; an unreachable one (no route, a DNS
/// server that never answers) would otherwise hold the build for minutes.
pub const PULL_IDLE: Duration = Duration::from_secs(20);

/// Why a base image could not be had; the caller adds what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("cannot pull {image}: {reason}")]
pub struct PullFailed {
    pub image: String,
    pub reason: String,
}

impl Engine {
    /// Whether the engine holds `image`.
    pub fn has_image(&self, image: &str) -> bool {
        self.block_on(self.docker.inspect_image(image)).is_ok()
    }

    /// Make `image` present: nothing when the engine holds it, else a pull with the
    /// credentials the docker CLI would use. Fails with [`PullFailed`] (the engine's reason on
    /// one line, or "no answer within 20 s") when the registry cannot be reached.
    pub fn ensure_image(&self, image: &str, progress: &Progress) -> Result<()> {
        if self.has_image(image) {
            return Ok(());
        }
        // `name@sha256:…` goes whole as fromImage; `name[:tag]` as fromImage + tag.
        let (repo, tag) = match image.contains('@') {
            true => (image, ""),
            false => super::build::split_tag(image),
        };
        let creds = super::auth::credentials(&super::auth::registry_of(image));
        let task = progress.task(&format!("pulling {image}"), 0);
        let failed = |reason: String| PullFailed {
            image: image.to_string(),
            reason: one_line(&reason),
        };
        let r: std::result::Result<(), PullFailed> = self.block_on(async {
            let mut s = self.docker.create_image(
                Some({
                    let o = CreateImageOptionsBuilder::default().from_image(repo);
                    if tag.is_empty() { o } else { o.tag(tag) }.build()
                }),
                None,
                creds,
            );
            loop {
                if crate::signals::check().is_err() {
                    return Err(failed("interrupted".into()));
                }
                match tokio::time::timeout(PULL_IDLE, s.next()).await {
                    Err(_) => {
                        return Err(failed(format!(
                            "no answer from the registry within {} s",
                            PULL_IDLE.as_secs()
                        )))
                    }
                    Ok(None) => return Ok(()),
                    Ok(Some(Ok(info))) => {
                        if let Some(e) = info.error_detail.and_then(|d| d.message) {
                            return Err(failed(e));
                        }
                    }
                    Ok(Some(Err(e))) => return Err(failed(super::api_error(e).to_string())),
                }
            }
        });
        match r {
            Ok(()) => {
                task.finish("done");
                Ok(())
            }
            Err(e) if e.reason == "interrupted" => Err(anyhow!("interrupted")),
            Err(e) => Err(e.into()),
        }
    }
}

/// The engine's message on one line, without the Go error chain's repetitions.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
