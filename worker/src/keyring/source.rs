//! From where a file says an integration's key and API come from to a `Team`: the key (inline,
//! from the environment or a key file), its `Authorization` header, the API base (a region, or
//! `api_url`) and the CA bundle of a `ca_file`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::files::{CaBundle, MAX_KEY_FILE_BYTES, read_ca_bundle, read_checked, resolve};
use super::format::KeySource;
use super::{IntegrationKey, Team};
use crate::support::redact::redact_url;

/// The API base of each `region`: Opsgenie's two, and Jira Service Management operations,
/// which serves the same Alert API v2 (paths, bodies, `GenieKey` keys) below its own prefix.
const REGIONS: [(&str, &str); 3] = [
    ("us", "https://api.opsgenie.com"),
    ("eu", "https://api.eu.opsgenie.com"),
    ("jsm", "https://api.atlassian.com/jsm/ops/integration"),
];

/// Makes the teams of one keyring file. `at`, given to each step, names a field for messages.
pub(super) struct TeamBuilder<'a> {
    /// The keyring file: key and CA files named relatively are found beside it.
    keyring: &'a Path,
    /// Looks up an environment variable.
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Teams naming the same CA file share one bundle (and so one HTTP client).
    bundles: HashMap<PathBuf, Arc<CaBundle>>,
}

impl<'a> TeamBuilder<'a> {
    pub(super) fn new(keyring: &'a Path, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        TeamBuilder {
            keyring,
            env,
            bundles: HashMap::new(),
        }
    }

    /// Reads the key, resolves the API base and reads the CA bundle of `source`, checking
    /// each in that order; the message of the first problem names its field (`at`).
    pub(super) fn team(
        &mut self,
        id: String,
        source: KeySource,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Team, String> {
        let key = self.read_key(&source, at)?;
        let (key, authorization) = checked_key(&key, at)?;
        let (api_base, region) = api_base(source.api_url, source.region.as_deref(), at)?;
        let api = check_api_base(&api_base).map_err(|problem| {
            format!(
                "{}: \"{}\" is not an http(s) URL: {problem}",
                at("api_url"),
                redact_url(&api_base)
            )
        })?;
        let ca = match source.ca_file {
            None => None,
            Some(file) => Some(self.ca_bundle(&file, at)?),
        };
        Ok(Team {
            id,
            authorization,
            key,
            api_base,
            api,
            region,
            ca,
        })
    }

    /// The key as given: inline, from the environment or from a file; exactly one of them.
    fn read_key(&self, source: &KeySource, at: &dyn Fn(&str) -> String) -> Result<String, String> {
        match (
            &source.integration_key,
            &source.integration_key_env,
            &source.integration_key_file,
        ) {
            (Some(key), None, None) => Ok(key.clone()),
            (None, Some(var), None) => (self.env)(var).ok_or_else(|| {
                format!(
                    "{}: environment variable {var} is not set",
                    at("integration_key_env")
                )
            }),
            (None, None, Some(file)) => {
                let key_path = resolve(self.keyring, file);
                read_checked(&key_path, MAX_KEY_FILE_BYTES).map_err(|e| {
                    format!(
                        "{}: cannot read {}: {e}",
                        at("integration_key_file"),
                        key_path.display()
                    )
                })
            }
            _ => Err(format!(
                "{}: set exactly one of integration_key, integration_key_env, integration_key_file",
                at("integration_key")
            )),
        }
    }

    /// The bundle of `file`, read once however many teams name it.
    fn ca_bundle(
        &mut self,
        file: &str,
        at: &dyn Fn(&str) -> String,
    ) -> Result<Arc<CaBundle>, String> {
        let ca_path = resolve(self.keyring, file);
        if let Some(bundle) = self.bundles.get(&ca_path) {
            return Ok(Arc::clone(bundle));
        }
        let bundle = read_ca_bundle(&ca_path)
            .map_err(|e| format!("{}: cannot use {}: {e}", at("ca_file"), ca_path.display()))?;
        let bundle = Arc::new(bundle);
        self.bundles.insert(ca_path, Arc::clone(&bundle));
        Ok(bundle)
    }
}

/// The key, trimmed, and its `Authorization` header (marked sensitive, so that it prints as
/// `Sensitive`), when the key is not empty and a header can carry it.
fn checked_key(
    key: &str,
    at: &dyn Fn(&str) -> String,
) -> Result<(IntegrationKey, reqwest::header::HeaderValue), String> {
    let key = key.trim().to_string();
    if key.is_empty() {
        return Err(format!("{}: the key is empty", at("integration_key")));
    }
    let cannot_carry = || {
        format!(
            "{}: the key has characters a header cannot carry",
            at("integration_key")
        )
    };
    if key.chars().any(|c| c.is_control()) {
        return Err(cannot_carry());
    }
    let mut authorization = reqwest::header::HeaderValue::from_str(&format!("GenieKey {key}"))
        .map_err(|_| cannot_carry())?;
    authorization.set_sensitive(true);
    Ok((IntegrationKey(key), authorization))
}

/// The API base without a trailing `/`, and the region it came from: `api_url` when given,
/// else the region's (`us` by default).
fn api_base(
    api_url: Option<String>,
    region: Option<&str>,
    at: &dyn Fn(&str) -> String,
) -> Result<(String, Option<&'static str>), String> {
    match api_url {
        // An `@` is credentials, which an API base cannot carry, or a password that parses
        // as a host and a port: the key must not go there.
        Some(url) if url.contains('@') => Err(format!(
            "{}: \"{}\" has an `@`: an API base cannot carry credentials",
            at("api_url"),
            redact_url(&url)
        )),
        Some(url) => Ok((url.trim_end_matches('/').to_string(), None)),
        None => {
            let name = region.unwrap_or("us");
            let Some((name, base)) = REGIONS.iter().find(|(n, _)| *n == name) else {
                return Err(format!(
                    "{}: \"{name}\" is not a region ({})",
                    at("region"),
                    REGIONS.map(|(n, _)| n).join(", ")
                ));
            };
            Ok(((*base).to_string(), Some(*name)))
        }
    }
}

/// Why `url` cannot be a team's API base, if it cannot: an absolute `http` or `https` URL
/// with a host, and no query or fragment (requests append their own path and query).
fn check_api_base(url: &str) -> Result<url::Url, String> {
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("the scheme is {:?}", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("it has no host".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("a base URL cannot carry a query or fragment".into());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_base_is_an_absolute_http_url_without_a_query() {
        for (url, ok) in [
            ("https://api.atlassian.com/jsm/ops/integration", true),
            ("http://127.0.0.1:18080", true),
            ("https://gw.corp/opsgenie?token=x", false),
            ("https://gw.corp/#frag", false),
            ("ftp://x", false),
            ("not a url", false),
        ] {
            assert_eq!(check_api_base(url).is_ok(), ok, "{url}");
        }
    }
}
