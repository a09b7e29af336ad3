//! The keyring (SPEC section 4): which Opsgenie integration key and API base URL serve each
//! team. Keys never travel in jobs; they come from this file, the environment or key files.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::opsgenie::Endpoint;

const US_API: &str = "https://api.opsgenie.com";
const EU_API: &str = "https://api.eu.opsgenie.com";

/// An Opsgenie integration key. It prints as `***` in `Debug` and `Display`, so that no log,
/// error or panic message can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct IntegrationKey(String);

impl IntegrationKey {
    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IntegrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for IntegrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One team's Opsgenie integration.
#[derive(Debug, Clone)]
pub struct Team {
    pub id: String,
    pub key: IntegrationKey,
    /// The API base URL without a trailing `/`.
    pub api_base: String,
    /// `api_base`, parsed once: where every request of the team goes.
    pub endpoint: Endpoint,
    /// `GenieKey <key>`, the `Authorization` header, built once; it prints as `***` too.
    pub authorization: IntegrationKey,
}

/// All teams, by id.
#[derive(Debug, Default)]
pub struct Keyring {
    teams: HashMap<String, Arc<Team>>,
    /// The file it was read from, for messages.
    pub source: PathBuf,
}

impl Keyring {
    pub fn team(&self, id: &str) -> Option<&Arc<Team>> {
        self.teams.get(id)
    }

    pub fn len(&self) -> usize {
        self.teams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.teams.is_empty()
    }

    /// Team ids, sorted, for start-up and `check` output.
    pub fn team_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.teams.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// Reads and validates the keyring at `path`, taking keys from the process environment.
    ///
    /// Fails when the file cannot be read, is not valid TOML, or a team is incomplete: no key
    /// source or more than one, an unset or empty key, an unknown region, a bad `api_url`, or
    /// a duplicate id. The error names the file, the line and the field, never a key.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyringError {
            file: path.to_path_buf(),
            line: None,
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// Parses keyring text; `env` looks up an environment variable.
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Keyring, KeyringError> {
        let fail = |span: Option<std::ops::Range<usize>>, message: String| KeyringError {
            file: path.to_path_buf(),
            line: span.map(|s| line_of(text, s.start)),
            message,
        };
        let file: KeyringFile =
            toml::from_str(text).map_err(|e| fail(e.span(), e.message().to_string()))?;
        let mut teams = HashMap::new();
        // Teams on the same API base share one endpoint, and so its kept-alive connections.
        let mut endpoints: HashMap<String, Endpoint> = HashMap::new();
        for (index, entry) in file.team.into_iter().enumerate() {
            let span = Some(entry.id.span());
            let id = entry.id.into_inner();
            let at = |field: &str| {
                if id.is_empty() {
                    format!("team[{index}].{field}")
                } else {
                    format!("team[{index}] (id \"{id}\").{field}")
                }
            };
            if id.is_empty() {
                return Err(fail(span, format!("{}: must not be empty", at("id"))));
            }
            let key = match (
                entry.integration_key,
                entry.integration_key_env,
                entry.integration_key_file,
            ) {
                (Some(key), None, None) => key,
                (None, Some(var), None) => env(&var).ok_or_else(|| {
                    fail(
                        span.clone(),
                        format!(
                            "{}: environment variable {var} is not set",
                            at("integration_key_env")
                        ),
                    )
                })?,
                (None, None, Some(file)) => {
                    let key_path = resolve(path, &file);
                    std::fs::read_to_string(&key_path).map_err(|e| {
                        fail(
                            span.clone(),
                            format!(
                                "{}: cannot read {}: {e}",
                                at("integration_key_file"),
                                key_path.display()
                            ),
                        )
                    })?
                }
                _ => {
                    return Err(fail(
                        span,
                        format!(
                            "{}: set exactly one of integration_key, integration_key_env, integration_key_file",
                            at("integration_key")
                        ),
                    ));
                }
            };
            let key = key.trim().to_string();
            if key.is_empty() {
                return Err(fail(
                    span,
                    format!("{}: the key is empty", at("integration_key")),
                ));
            }
            let api_base = match (entry.api_url, entry.region.as_deref()) {
                (Some(url), _) => url.trim_end_matches('/').to_string(),
                (None, None | Some("us")) => US_API.to_string(),
                (None, Some("eu")) => EU_API.to_string(),
                (None, Some(other)) => {
                    return Err(fail(
                        span,
                        format!("{}: \"{other}\" is not a region (us or eu)", at("region")),
                    ));
                }
            };
            let endpoint = match endpoints.get(&api_base) {
                Some(shared) => shared.clone(),
                None => {
                    let parsed = Endpoint::parse(&api_base).map_err(|e| {
                        fail(
                            span.clone(),
                            format!(
                                "{}: \"{api_base}\" is not an http(s) URL: {e}",
                                at("api_url")
                            ),
                        )
                    })?;
                    endpoints.insert(api_base.clone(), parsed.clone());
                    parsed
                }
            };
            if key.chars().any(|c| c.is_control()) {
                return Err(fail(
                    span,
                    format!(
                        "{}: the key has characters a header cannot carry",
                        at("integration_key")
                    ),
                ));
            }
            let team = Team {
                id: id.clone(),
                authorization: IntegrationKey(format!("GenieKey {key}")),
                key: IntegrationKey(key),
                api_base,
                endpoint,
            };
            if teams.insert(id.clone(), Arc::new(team)).is_some() {
                return Err(fail(span, format!("{}: \"{id}\" appears twice", at("id"))));
            }
        }
        Ok(Keyring {
            teams,
            source: path.to_path_buf(),
        })
    }
}

/// A key file named relatively is found beside the keyring.
fn resolve(keyring: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        keyring.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |s| s.matches('\n').count()) + 1
}

/// Why a keyring could not be loaded. `Display`: `keyring.toml:4: team[0] (id "ops").region: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct KeyringError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    #[serde(default)]
    team: Vec<TeamEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeamEntry {
    id: toml::Spanned<String>,
    integration_key: Option<String>,
    integration_key_env: Option<String>,
    integration_key_file: Option<String>,
    region: Option<String>,
    api_url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Keyring, KeyringError> {
        let env = |name: &str| match name {
            "OG_KEY_BACKEND" => Some("  env-key-123 \n".to_string()),
            "OG_EMPTY" => Some("   ".to_string()),
            _ => None,
        };
        Keyring::parse(Path::new("keyring.toml"), text, &env)
    }

    #[test]
    fn reads_every_key_source_and_region() {
        let dir = std::env::temp_dir().join(format!("keyring-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ops.key"), "file-key-9\n").unwrap();
        let text = r#"
[[team]]
id = "backend"
integration_key_env = "OG_KEY_BACKEND"
region = "eu"

[[team]]
id = "ops"
integration_key_file = "ops.key"

[[team]]
id = "local"
integration_key = "inline"
api_url = "http://127.0.0.1:18080/"
"#;
        let ring = Keyring::parse(&dir.join("keyring.toml"), text, &|n| {
            (n == "OG_KEY_BACKEND").then(|| " env-key-123 ".to_string())
        })
        .unwrap();
        let backend = ring.team("backend").unwrap();
        assert_eq!(backend.key.expose(), "env-key-123");
        assert_eq!(backend.api_base, "https://api.eu.opsgenie.com");
        let ops = ring.team("ops").unwrap();
        assert_eq!(ops.key.expose(), "file-key-9");
        assert_eq!(ops.api_base, "https://api.opsgenie.com");
        let local = ring.team("local").unwrap();
        assert_eq!(local.api_base, "http://127.0.0.1:18080");
        assert_eq!(local.key.expose(), "inline");
        assert_eq!(ring.team_ids(), vec!["backend", "local", "ops"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_line_and_field_and_never_the_key() {
        let cases = [
            (
                "[[team]]\nid = \"a\"\nintegration_key = \"s3cret\"\nintegration_key_env = \"OG_KEY_BACKEND\"\n",
                "keyring.toml:2: team[0] (id \"a\").integration_key: set exactly one",
            ),
            (
                "[[team]]\nid = \"a\"\nintegration_key_env = \"MISSING\"\n",
                "keyring.toml:2: team[0] (id \"a\").integration_key_env: environment variable MISSING is not set",
            ),
            (
                "[[team]]\nid = \"a\"\nintegration_key_env = \"OG_EMPTY\"\n",
                "the key is empty",
            ),
            (
                "\n[[team]]\nid = \"a\"\nintegration_key = \"s3cret\"\nregion = \"ap\"\n",
                "keyring.toml:3: team[0] (id \"a\").region: \"ap\" is not a region",
            ),
            (
                "[[team]]\nid = \"a\"\nintegration_key = \"s3cret\"\napi_url = \"ftp://x\"\n",
                "api_url: \"ftp://x\" is not an http(s) URL",
            ),
            (
                "[[team]]\nid = \"a\"\nintegration_key = \"s3cret\"\n[[team]]\nid = \"a\"\nintegration_key = \"s3cret\"\n",
                "keyring.toml:5: team[1] (id \"a\").id: \"a\" appears twice",
            ),
            (
                "[[team]]\nid = \"a\"\nintegration_kye = \"s3cret\"\n",
                "keyring.toml:3: unknown field `integration_kye`",
            ),
            ("[[team]\n", "keyring.toml:1:"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} does not contain {expected:?}"
            );
            assert!(!err.contains("s3cret"), "{err:?} shows the key");
        }
    }

    #[test]
    fn keys_never_print() {
        let ring = parse("[[team]]\nid = \"a\"\nintegration_key = \"s3cret\"\n").unwrap();
        let team = ring.team("a").unwrap();
        assert_eq!(format!("{}", team.key), "***");
        let debug = format!("{ring:?} {team:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
    }
}
