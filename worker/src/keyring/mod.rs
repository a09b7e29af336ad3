//! The keyring (docs/contract.md section 4): which Opsgenie integration key and API base URL serve each
//! team. Keys never travel in jobs; they come from this file, the environment or key files.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::redact_url;

/// The API base of each `region`: Opsgenie's two, and Jira Service Management operations,
/// which serves the same Alert API v2 (paths, bodies, `GenieKey` keys) below its own prefix.
pub const REGIONS: [(&str, &str); 3] = [
    ("us", "https://api.opsgenie.com"),
    ("eu", "https://api.eu.opsgenie.com"),
    ("jsm", "https://api.atlassian.com/jsm/ops/integration"),
];

/// The most a keyring file may hold: thousands of teams fit in far less.
pub const MAX_KEYRING_BYTES: u64 = 1024 * 1024;
/// The most a key file may hold: a key is a few dozen bytes.
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

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

/// One team's Opsgenie integration: data only. The HTTP clients live in `opsgenie::Sender`.
#[derive(Debug, Clone)]
pub struct Team {
    pub id: String,
    pub key: IntegrationKey,
    /// The API base URL without a trailing `/`: an absolute http(s) URL, checked at load. A
    /// path prefix (a gateway's, or JSM's) is kept: requests go to `api_base + path`.
    pub api_base: String,
    /// `api_base`, parsed once at load, so that a request's URL is built without parsing
    /// (and IDNA-checking) the host again.
    pub api: url::Url,
    /// `GenieKey <key>`, the `Authorization` header, built once at load and marked
    /// sensitive (it prints as `Sensitive`), so that no request parses it again.
    pub authorization: reqwest::header::HeaderValue,
    /// The `region` its base came from; `None` when the keyring gave an `api_url`.
    pub region: Option<&'static str>,
    /// Extra CA certificates this team's API is trusted by, beside the system's.
    pub ca: Option<Arc<CaBundle>>,
}

impl Team {
    /// Where its requests go, for `check` and start-up: `region jsm, https://...` or
    /// `api_url https://...`, with any credentials redacted. Never the key.
    pub fn destination(&self) -> String {
        let redacted = redact_url(&self.api_base);
        let base = redacted.trim_end_matches('/');
        match self.region {
            Some(region) => format!("region {region}, {base}"),
            None => format!("api_url {base}"),
        }
    }
}

/// The fleet's heartbeat (docs/contract.md section 6.2): pinged while the fleet is healthy.
#[derive(Debug)]
pub struct Heartbeat {
    /// Its name in Opsgenie / JSM.
    pub name: String,
    /// How often the fleet pings.
    pub interval: Duration,
    /// The integration that pings: its key and API base, as for a team.
    pub team: Arc<Team>,
}

/// The certificates of a team's `ca_file`, read and parsed at load.
pub struct CaBundle {
    /// The file, for messages.
    pub path: PathBuf,
    pub certificates: Vec<reqwest::Certificate>,
    /// SHA-256 of the file: teams with the same bundle share one HTTP client.
    pub digest: [u8; 32],
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("certificates", &self.certificates.len())
            .finish()
    }
}

/// The most a `ca_file` may hold: a CA bundle of a few hundred certificates.
pub const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// All teams, by id.
#[derive(Debug, Default)]
pub struct Keyring {
    teams: HashMap<String, Arc<Team>>,
    /// The `[heartbeat]` table, if any.
    pub heartbeat: Option<Arc<Heartbeat>>,
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
    /// Fails when the file or a key file cannot be read, is not a regular file (a FIFO, a
    /// directory, a device) or is larger than `MAX_KEYRING_BYTES` (`MAX_KEY_FILE_BYTES` for a
    /// key file), is not valid TOML, or a team is incomplete: no key source or more than one,
    /// an unset or empty key, an unknown region, a bad `api_url`, or a duplicate id. The error
    /// names the file, the line and the field, never a key.
    ///
    /// It reads files and may wait on them: call it where blocking is allowed (start-up, or
    /// `load_off_runtime`).
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let text = read_checked(path, MAX_KEYRING_BYTES).map_err(|e| KeyringError {
            file: path.to_path_buf(),
            line: None,
            message: format!("cannot read the keyring: {e}"),
        })?;
        Self::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// `load` on a blocking thread, so that a slow or stuck file system never holds the
    /// runtime (deliveries, `/healthz`, SIGTERM). Gives up after `limit`; the thread may then
    /// linger until its read returns, and is left to it.
    ///
    /// Fails as `load` does, on time-out, and while the thread of an earlier call is still
    /// reading: stuck threads do not pile up, one per SIGHUP.
    pub async fn load_off_runtime(path: PathBuf, limit: Duration) -> Result<Keyring, String> {
        static READING: AtomicBool = AtomicBool::new(false);
        /// Clears `READING` when the load ends, however it ends (or never starts).
        struct Reading;
        impl Drop for Reading {
            fn drop(&mut self) {
                READING.store(false, Ordering::SeqCst);
            }
        }
        if READING.swap(true, Ordering::SeqCst) {
            return Err(
                "an earlier reload is still reading the files; not starting another".into(),
            );
        }
        let reading = Reading;
        off_runtime(
            move || {
                let _reading = reading;
                Keyring::load(&path).map_err(|e| e.to_string())
            },
            limit,
        )
        .await
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
        // Teams naming the same CA file share one bundle (and so one HTTP client).
        let mut bundles: HashMap<PathBuf, Arc<CaBundle>> = HashMap::new();
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
            let source = Source {
                integration_key: entry.integration_key,
                integration_key_env: entry.integration_key_env,
                integration_key_file: entry.integration_key_file,
                region: entry.region,
                api_url: entry.api_url,
                ca_file: entry.ca_file,
            };
            let team = source
                .into_team(id.clone(), &at, path, env, &mut bundles)
                .map_err(|message| fail(span.clone(), message))?;
            if teams.insert(id.clone(), Arc::new(team)).is_some() {
                return Err(fail(span, format!("{}: \"{id}\" appears twice", at("id"))));
            }
        }
        let heartbeat = match file.heartbeat {
            None => None,
            Some(entry) => {
                let span = Some(entry.name.span());
                let name = entry.name.into_inner();
                let at = |field: &str| format!("heartbeat.{field}");
                let heartbeat = heartbeat_settings(&name, entry.interval.as_deref(), &at)
                    .and_then(|interval| {
                        let source = Source {
                            integration_key: entry.integration_key,
                            integration_key_env: entry.integration_key_env,
                            integration_key_file: entry.integration_key_file,
                            region: entry.region,
                            api_url: entry.api_url,
                            ca_file: entry.ca_file,
                        };
                        let team = source.into_team(
                            HEARTBEAT_TEAM_ID.to_string(),
                            &at,
                            path,
                            env,
                            &mut bundles,
                        )?;
                        Ok(Heartbeat {
                            name: name.clone(),
                            interval,
                            team: Arc::new(team),
                        })
                    })
                    .map_err(|message| fail(span, message))?;
                Some(Arc::new(heartbeat))
            }
        };
        Ok(Keyring {
            teams,
            heartbeat,
            source: path.to_path_buf(),
        })
    }
}

/// The name the heartbeat's integration goes by in the sender's messages and cooldowns; no
/// team can clash with it in practice, and none would share its cooldown by accident.
pub const HEARTBEAT_TEAM_ID: &str = "[heartbeat]";
/// The most bytes a heartbeat's name may hold.
pub const MAX_HEARTBEAT_NAME_BYTES: usize = 200;
/// How often the fleet pings without an `interval`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// The heartbeat's name and interval, checked.
fn heartbeat_settings(
    name: &str,
    interval: Option<&str>,
    at: &dyn Fn(&str) -> String,
) -> Result<Duration, String> {
    if name.trim().is_empty() {
        return Err(format!("{}: must not be empty", at("name")));
    }
    if name.len() > MAX_HEARTBEAT_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(format!(
            "{}: must be at most {MAX_HEARTBEAT_NAME_BYTES} bytes without control characters",
            at("name")
        ));
    }
    let Some(interval) = interval else {
        return Ok(DEFAULT_HEARTBEAT_INTERVAL);
    };
    let interval = opsgenie_shared::retry::parse_duration(interval)
        .map_err(|e| format!("{}: \"{interval}\" is not a duration: {e}", at("interval")))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&interval) {
        return Err(format!("{}: must be between 1s and 24h", at("interval")));
    }
    Ok(interval)
}

/// Where an integration's key and API come from, as written in the file.
struct Source {
    integration_key: Option<String>,
    integration_key_env: Option<String>,
    integration_key_file: Option<String>,
    region: Option<String>,
    api_url: Option<String>,
    ca_file: Option<String>,
}

impl Source {
    /// Reads the key (inline, from the environment or a file), resolves the API base (a
    /// region, or `api_url`) and reads the CA bundle. `at` names a field for messages.
    fn into_team(
        self,
        id: String,
        at: &dyn Fn(&str) -> String,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        bundles: &mut HashMap<PathBuf, Arc<CaBundle>>,
    ) -> Result<Team, String> {
        let key = match (
            self.integration_key,
            self.integration_key_env,
            self.integration_key_file,
        ) {
            (Some(key), None, None) => key,
            (None, Some(var), None) => env(&var).ok_or_else(|| {
                format!(
                    "{}: environment variable {var} is not set",
                    at("integration_key_env")
                )
            })?,
            (None, None, Some(file)) => {
                let key_path = resolve(path, &file);
                read_checked(&key_path, MAX_KEY_FILE_BYTES).map_err(|e| {
                    format!(
                        "{}: cannot read {}: {e}",
                        at("integration_key_file"),
                        key_path.display()
                    )
                })?
            }
            _ => {
                return Err(format!(
                    "{}: set exactly one of integration_key, integration_key_env, integration_key_file",
                    at("integration_key")
                ));
            }
        };
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err(format!("{}: the key is empty", at("integration_key")));
        }
        if key.chars().any(|c| c.is_control()) {
            return Err(format!(
                "{}: the key has characters a header cannot carry",
                at("integration_key")
            ));
        }
        let mut authorization = reqwest::header::HeaderValue::from_str(&format!("GenieKey {key}"))
            .map_err(|_| {
                format!(
                    "{}: the key has characters a header cannot carry",
                    at("integration_key")
                )
            })?;
        authorization.set_sensitive(true);
        let (api_base, region) = match (self.api_url, self.region.as_deref()) {
            // An `@` is credentials, which an API base cannot carry, or a password that
            // parses as a host and a port: the key must not go there.
            (Some(url), _) if url.contains('@') => {
                return Err(format!(
                    "{}: \"{}\" has an `@`: an API base cannot carry credentials",
                    at("api_url"),
                    redact_url(&url)
                ));
            }
            (Some(url), _) => (url.trim_end_matches('/').to_string(), None),
            (None, region) => {
                let name = region.unwrap_or("us");
                let Some((name, base)) = REGIONS.iter().find(|(n, _)| *n == name) else {
                    return Err(format!(
                        "{}: \"{name}\" is not a region ({})",
                        at("region"),
                        REGIONS.map(|(n, _)| n).join(", ")
                    ));
                };
                ((*base).to_string(), Some(*name))
            }
        };
        let api = check_api_base(&api_base).map_err(|problem| {
            format!(
                "{}: \"{}\" is not an http(s) URL: {problem}",
                at("api_url"),
                redact_url(&api_base)
            )
        })?;
        let ca = match self.ca_file {
            None => None,
            Some(file) => {
                let ca_path = resolve(path, &file);
                match bundles.get(&ca_path) {
                    Some(bundle) => Some(Arc::clone(bundle)),
                    None => {
                        let bundle = read_ca_bundle(&ca_path).map_err(|e| {
                            format!("{}: cannot use {}: {e}", at("ca_file"), ca_path.display())
                        })?;
                        let bundle = Arc::new(bundle);
                        bundles.insert(ca_path, Arc::clone(&bundle));
                        Some(bundle)
                    }
                }
            }
        };
        Ok(Team {
            id,
            authorization,
            key: IntegrationKey(key),
            api_base,
            api,
            region,
            ca,
        })
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

/// Reads and parses a PEM bundle of CA certificates.
fn read_ca_bundle(path: &Path) -> Result<CaBundle, String> {
    use sha2::Digest;
    let text = read_checked(path, MAX_CA_FILE_BYTES)?;
    let certificates = reqwest::Certificate::from_pem_bundle(text.as_bytes())
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certificates.is_empty() {
        return Err("it holds no PEM certificate".into());
    }
    Ok(CaBundle {
        path: path.to_path_buf(),
        certificates,
        digest: sha2::Sha256::digest(text.as_bytes()).into(),
    })
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

/// Reads the file at `path` as text when it is a regular file of at most `cap` bytes.
///
/// Opened with `O_NONBLOCK`, so that a FIFO cannot hold `open(2)` until a writer comes, and
/// checked on the opened file (`fstat`), so that the file checked is the file read; then read
/// through `take(cap + 1)`, so that a file growing after the check, or one whose size the
/// kernel does not know, still costs at most `cap + 1` bytes.
///
/// Fails, with a sentence on what the file is (the caller names it), when it cannot be
/// opened, is not a regular file, is larger than `cap`, or is not UTF-8.
fn read_checked(path: &Path, cap: u64) -> Result<String, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect it: {e}"))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a named pipe (FIFO)"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a plain file"
        };
        return Err(format!(
            "it is {what}, not a regular file; refusing to read it"
        ));
    }
    let too_large = || {
        format!(
            "it is larger than {} KiB, the most it may hold; refusing to read it",
            cap / 1024
        )
    };
    if meta.len() > cap {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(cap + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if data.len() as u64 > cap {
        return Err(too_large());
    }
    String::from_utf8(data).map_err(|_| "it is not UTF-8 text".to_string())
}

/// Runs `load` on a blocking thread and waits for it at most `limit`.
async fn off_runtime<T: Send + 'static>(
    load: impl FnOnce() -> Result<T, String> + Send + 'static,
    limit: Duration,
) -> Result<T, String> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(load)).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(format!("the reload stopped: {join}")),
        Err(_) => Err(format!(
            "reading the files took longer than {limit:?}; a file may be on a stuck file system"
        )),
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
    heartbeat: Option<HeartbeatEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatEntry {
    name: toml::Spanned<String>,
    integration_key: Option<String>,
    integration_key_env: Option<String>,
    integration_key_file: Option<String>,
    region: Option<String>,
    api_url: Option<String>,
    ca_file: Option<String>,
    interval: Option<String>,
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
    ca_file: Option<String>,
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
    fn each_region_maps_to_its_api_and_api_url_overrides_it() {
        let ring = parse(
            "[[team]]\nid = \"us\"\nintegration_key = \"k\"\n\
             [[team]]\nid = \"default\"\nintegration_key = \"k\"\n\
             [[team]]\nid = \"eu\"\nintegration_key = \"k\"\nregion = \"eu\"\n\
             [[team]]\nid = \"jsm\"\nintegration_key = \"k\"\nregion = \"jsm\"\n\
             [[team]]\nid = \"gw\"\nintegration_key = \"k\"\nregion = \"jsm\"\n\
             api_url = \"http://127.0.0.1:18080/jsm/ops/integration/\"\n",
        )
        .unwrap();
        let cases = [
            (
                "us",
                "https://api.opsgenie.com",
                "region us, https://api.opsgenie.com",
            ),
            (
                "default",
                "https://api.opsgenie.com",
                "region us, https://api.opsgenie.com",
            ),
            (
                "eu",
                "https://api.eu.opsgenie.com",
                "region eu, https://api.eu.opsgenie.com",
            ),
            (
                "jsm",
                "https://api.atlassian.com/jsm/ops/integration",
                "region jsm, https://api.atlassian.com/jsm/ops/integration",
            ),
            (
                "gw",
                "http://127.0.0.1:18080/jsm/ops/integration",
                "api_url http://127.0.0.1:18080/jsm/ops/integration",
            ),
        ];
        for (id, base, destination) in cases {
            let team = ring.team(id).unwrap();
            assert_eq!(team.api_base, base, "{id}");
            assert_eq!(
                team.api.path().trim_end_matches('/'),
                url::Url::parse(base).unwrap().path().trim_end_matches('/')
            );
            assert_eq!(team.destination(), destination, "{id}");
        }
        let error = parse("[[team]]\nid = \"a\"\nintegration_key = \"k\"\nregion = \"JSM\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"JSM\" is not a region (us, eu, jsm)"),
            "{error}"
        );
    }

    #[test]
    fn a_heartbeat_reads_its_key_like_a_team_and_checks_name_and_interval() {
        let ring = parse(
            "[heartbeat]\nname = \"pager pipeline\"\nintegration_key_env = \"OG_KEY_BACKEND\"\n\
             region = \"jsm\"\ninterval = \"30s\"\n",
        )
        .unwrap();
        let heartbeat = ring.heartbeat.as_ref().expect("a heartbeat");
        assert_eq!(heartbeat.name, "pager pipeline");
        assert_eq!(heartbeat.interval, Duration::from_secs(30));
        assert_eq!(heartbeat.team.key.expose(), "env-key-123");
        assert_eq!(
            heartbeat.team.api_base,
            "https://api.atlassian.com/jsm/ops/integration"
        );
        assert!(!format!("{heartbeat:?}").contains("env-key-123"));
        let default = parse("[heartbeat]\nname = \"hb\"\nintegration_key = \"k\"\n").unwrap();
        assert_eq!(
            default.heartbeat.unwrap().interval,
            DEFAULT_HEARTBEAT_INTERVAL
        );
        assert!(
            parse("[[team]]\nid = \"a\"\nintegration_key = \"k\"\n")
                .unwrap()
                .heartbeat
                .is_none()
        );
        let cases = [
            (
                "name = \"\"\nintegration_key = \"s3cret\"\n",
                "heartbeat.name: must not be empty",
            ),
            (
                "name = \"hb\"\n",
                "heartbeat.integration_key: set exactly one",
            ),
            (
                "name = \"hb\"\nintegration_key_env = \"MISSING\"\n",
                "heartbeat.integration_key_env: environment variable MISSING",
            ),
            (
                "name = \"hb\"\nintegration_key = \"s3cret\"\ninterval = \"soon\"\n",
                "heartbeat.interval: \"soon\" is not a duration",
            ),
            (
                "name = \"hb\"\nintegration_key = \"s3cret\"\ninterval = \"100ms\"\n",
                "heartbeat.interval: must be between 1s and 24h",
            ),
            (
                "name = \"hb\"\nintegration_key = \"s3cret\"\nregion = \"ap\"\n",
                "heartbeat.region: \"ap\" is not a region",
            ),
            (
                "name = \"hb\"\nintegration_key = \"s3cret\"\nintervall = \"1s\"\n",
                "unknown field `intervall`",
            ),
        ];
        for (body, expected) in cases {
            let error = parse(&format!("[heartbeat]\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(expected),
                "{error:?} does not contain {expected:?}"
            );
            assert!(!error.contains("s3cret"), "{error}");
        }
        let long = format!(
            "[heartbeat]\nname = \"{}\"\nintegration_key = \"k\"\n",
            "h".repeat(201)
        );
        assert!(
            parse(&long)
                .unwrap_err()
                .to_string()
                .contains("at most 200 bytes")
        );
    }

    #[test]
    fn a_ca_file_is_read_parsed_and_shared_by_the_teams_that_name_it() {
        let dir = std::env::temp_dir().join(format!("keyring-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["corp-ca".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("not.pem"), "no certificate here\n").unwrap();
        let text = |file: &str| {
            format!(
                "[[team]]\nid = \"a\"\nintegration_key = \"k\"\napi_url = \"https://og.corp\"\nca_file = \"{file}\"\n\
                 [[team]]\nid = \"b\"\nintegration_key = \"k\"\nca_file = \"{file}\"\n\
                 [[team]]\nid = \"c\"\nintegration_key = \"k\"\n"
            )
        };
        let none = |_: &str| None;
        let ring = Keyring::parse(&dir.join("keyring.toml"), &text("ca.pem"), &none).unwrap();
        let (a, b) = (ring.team("a").unwrap(), ring.team("b").unwrap());
        let bundle = a.ca.as_ref().expect("team a has a bundle");
        assert_eq!(bundle.certificates.len(), 1);
        assert!(Arc::ptr_eq(bundle, b.ca.as_ref().unwrap()));
        assert!(ring.team("c").unwrap().ca.is_none());
        for (file, expected) in [
            ("not.pem", "ca_file: cannot use"),
            ("missing.pem", "ca_file: cannot use"),
        ] {
            let error = Keyring::parse(&dir.join("keyring.toml"), &text(file), &none)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected) && error.contains(file), "{error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
                "api_url: \"ftp://x/\" is not an http(s) URL",
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

    /// A directory of its own for one test, removed by the test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "keyring-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    /// Runs `f` on a thread of its own and fails the test, instead of hanging it, when `f`
    /// blocks.
    fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("reading the file blocked")
    }

    #[test]
    fn key_files_must_be_small_regular_files() {
        let dir = scratch("key-files");
        mkfifo(&dir.join("fifo.key"));
        std::fs::create_dir(dir.join("dir.key")).unwrap();
        std::fs::write(dir.join("big.key"), vec![b'k'; 65 * 1024]).unwrap();
        std::fs::write(dir.join("edge.key"), vec![b'k'; 64 * 1024]).unwrap();
        std::fs::write(dir.join("ok.key"), "file-key-9\n").unwrap();
        std::fs::write(dir.join("latin1.key"), b"k\xe9y").unwrap();
        let cases = [
            (
                "fifo.key",
                Err("is a named pipe (FIFO), not a regular file"),
            ),
            ("dir.key", Err("is a directory, not a regular file")),
            ("/dev/zero", Err("is a device, not a regular file")),
            ("big.key", Err("is larger than 64 KiB")),
            ("missing.key", Err("cannot open it")),
            ("latin1.key", Err("is not UTF-8 text")),
            ("edge.key", Ok(64 * 1024)),
            ("ok.key", Ok("file-key-9".len())),
        ];
        for (file, expected) in cases {
            let text = format!("[[team]]\nid = \"ops\"\nintegration_key_file = \"{file}\"\n");
            let keyring = dir.join("keyring.toml");
            let result = within_5s(move || Keyring::parse(&keyring, &text, &|_| None));
            match (result, expected) {
                (Ok(ring), Ok(len)) => {
                    let key = ring.team("ops").unwrap().key.expose().to_string();
                    assert_eq!(key.len(), len, "{file}");
                    if file == "ok.key" {
                        assert_eq!(key, "file-key-9");
                    }
                }
                (Err(error), Err(expected)) => {
                    let error = error.to_string();
                    assert!(
                        error.contains(expected)
                            && error.contains(file)
                            && error.contains("integration_key_file"),
                        "{file}: {error}"
                    );
                }
                (result, expected) => panic!("{file}: {result:?}, expected {expected:?}"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_keyring_file_is_checked_the_same_way() {
        let dir = scratch("keyring-file");
        let fifo = dir.join("fifo.toml");
        mkfifo(&fifo);
        let error = within_5s(move || Keyring::load(&fifo)).unwrap_err();
        assert!(error.to_string().contains("named pipe (FIFO)"), "{error}");
        let error = Keyring::load(&dir).unwrap_err();
        assert!(error.to_string().contains("a directory"), "{error}");
        // Sparse: a size the kernel reports, and nothing read.
        let huge = dir.join("huge.toml");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let error = Keyring::load(&huge).unwrap_err().to_string();
        assert!(error.contains("larger than 1024 KiB"), "{error}");
        let good = dir.join("good.toml");
        std::fs::write(&good, "[[team]]\nid = \"a\"\nintegration_key = \"k\"\n").unwrap();
        assert_eq!(Keyring::load(&good).unwrap().team_ids(), vec!["a"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_api_url_never_shows_its_credentials_or_tokens() {
        for api_url in [
            "https://ops:Pw1s3cr3t@gw.example",
            "https://ops:Pw1/s3cr3t@gw.example",
            "https://ops:4711/Pw1s3cr3t@gw.example",
            "https://gw.example/?token=Pw1s3cr3t",
            "https://gw.example/#Pw1s3cr3t",
            "ftp://gw.example/?token=Pw1s3cr3t",
        ] {
            let text =
                format!("[[team]]\nid = \"a\"\nintegration_key = \"k\"\napi_url = \"{api_url}\"\n");
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.contains("api_url"), "{error}");
            assert!(
                !error.contains("s3cr3t") && !error.contains("4711"),
                "{api_url}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn a_stuck_load_gives_up_without_holding_the_runtime() {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let started = std::time::Instant::now();
        let result = off_runtime(
            move || {
                let _ = stuck.recv();
                Ok(())
            },
            Duration::from_millis(200),
        )
        .await;
        let error = result.unwrap_err();
        assert!(error.contains("longer than"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let _ = release.send(());
        assert_eq!(
            off_runtime(|| Ok(7), Duration::from_secs(5)).await,
            Ok::<_, String>(7)
        );
    }
}
