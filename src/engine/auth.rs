//! Registry credentials, found the way the docker CLI finds them: `$DOCKER_CONFIG/config.json`
//! (else `~/.docker/config.json`) — `auths`, then `credHelpers`/`credsStore` helpers — through
//! the `docker_credential` crate. Secrets only ever go to the engine; they are never printed
//! or logged (this module logs which registry and which kind of credential, nothing more).

use std::path::PathBuf;

use bollard::auth::DockerCredentials;
use docker_credential::{CredentialRetrievalError, DockerCredential};

/// The registry host of an image reference (`HOST[:PORT]/ns/name:tag`), Docker Hub's key for
/// names without one.
pub fn registry_of(reference: &str) -> String {
    match reference.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_string()
        }
        _ => DOCKER_HUB.to_string(),
    }
}

/// The key the docker CLI stores Docker Hub's credentials under.
pub const DOCKER_HUB: &str = "https://index.docker.io/v1/";

/// Where credentials are looked up, for messages.
pub fn config_path() -> PathBuf {
    super::endpoint::config_dir(&super::endpoint::process_env).join("config.json")
}

/// Credentials for `registry`, or None when none are configured. A helper that fails is a
/// warning, not an error: the push then goes without credentials and the registry decides.
pub fn credentials(registry: &str) -> Option<DockerCredentials> {
    let keys = [
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    for key in &keys {
        match docker_credential::get_credential(key) {
            Ok(c) => {
                log::debug!(
                    "credentials for {registry}: {} from {}",
                    match c {
                        DockerCredential::IdentityToken(_) => "an identity token",
                        DockerCredential::UsernamePassword(..) => "a user name and password",
                    },
                    config_path().display()
                );
                return Some(to_bollard(c, registry));
            }
            Err(CredentialRetrievalError::NoCredentialConfigured)
            | Err(CredentialRetrievalError::ConfigNotFound)
            | Err(CredentialRetrievalError::ConfigReadError) => {}
            Err(e) => {
                // Helper errors can echo what the helper printed; keep only the kind.
                let kind = match e {
                    CredentialRetrievalError::HelperFailure { helper, .. } => {
                        format!("credential helper `{helper}` failed")
                    }
                    other => other.to_string(),
                };
                log::warn!(
                    "credentials for {registry} from {}: {kind}",
                    config_path().display()
                );
                return None;
            }
        }
    }
    log::debug!(
        "no credentials for {registry} in {}",
        config_path().display()
    );
    None
}

fn to_bollard(c: DockerCredential, registry: &str) -> DockerCredentials {
    let serveraddress = Some(registry.to_string());
    match c {
        DockerCredential::IdentityToken(t) => DockerCredentials {
            identitytoken: Some(t),
            serveraddress,
            ..Default::default()
        },
        DockerCredential::UsernamePassword(u, p) => DockerCredentials {
            username: Some(u),
            password: Some(p),
            serveraddress,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries() {
        assert_eq!(registry_of("127.0.0.1:5000/boxes/base:3"), "127.0.0.1:5000");
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(registry_of("ghcr.io/me/base"), "ghcr.io");
        assert_eq!(registry_of("alpine-boxes/base:3"), DOCKER_HUB);
        assert_eq!(registry_of("alpine"), DOCKER_HUB);
    }
}
