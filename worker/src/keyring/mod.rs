//! The keyring (docs/contract.md section 4): which Opsgenie integration key and API base URL serve each
//! team. Keys never travel in jobs; they come from this file, the environment or key files.
//!
//! `format` is the file's TOML shape, `source` turns a table's key source into a `Team`,
//! `files` reads key and CA files safely, and `heartbeat` checks the `[heartbeat]` table.

mod files;
mod format;
mod heartbeat;
mod source;

pub use files::CaBundle;
pub use heartbeat::Heartbeat;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::redact::redact_url;
use files::{MAX_KEYRING_BYTES, read_checked};
use format::{HeartbeatEntry, KeyringFile, TeamEntry};
use heartbeat::{HEARTBEAT_TEAM_ID, heartbeat_interval};
use source::TeamBuilder;

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

/// All teams, by id.
#[derive(Debug, Default)]
pub struct Keyring {
    teams: HashMap<String, Arc<Team>>,
    /// The `[heartbeat]` table, if any.
    pub heartbeat: Option<Arc<Heartbeat>>,
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
    /// reading: stuck threads do not pile up, one per SIGHUP. The error is only logged, so it
    /// is its text.
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
    pub(crate) fn parse(
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
        let mut builder = TeamBuilder::new(path, env);
        let teams = read_teams(file.team, &mut builder, &fail)?;
        let heartbeat = match file.heartbeat {
            None => None,
            Some(entry) => {
                let span = Some(entry.name.span());
                let heartbeat =
                    read_heartbeat(entry, &mut builder).map_err(|message| fail(span, message))?;
                Some(Arc::new(heartbeat))
            }
        };
        Ok(Keyring { teams, heartbeat })
    }
}

/// The `[[team]]` tables, by id; `fail` names the file and the line of a problem.
fn read_teams(
    entries: Vec<TeamEntry>,
    builder: &mut TeamBuilder<'_>,
    fail: &dyn Fn(Option<std::ops::Range<usize>>, String) -> KeyringError,
) -> Result<HashMap<String, Arc<Team>>, KeyringError> {
    let mut teams = HashMap::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let (id, source) = entry.into_parts();
        let span = Some(id.span());
        let id = id.into_inner();
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
        let team = builder
            .team(id.clone(), source, &at)
            .map_err(|message| fail(span.clone(), message))?;
        if teams.insert(id.clone(), Arc::new(team)).is_some() {
            return Err(fail(span, format!("{}: \"{id}\" appears twice", at("id"))));
        }
    }
    Ok(teams)
}

/// The `[heartbeat]` table: its name and interval, checked, and its integration, read like a
/// team's.
fn read_heartbeat(
    entry: HeartbeatEntry,
    builder: &mut TeamBuilder<'_>,
) -> Result<Heartbeat, String> {
    let (name, interval, source) = entry.into_parts();
    let name = name.into_inner();
    let at = |field: &str| format!("heartbeat.{field}");
    let interval = heartbeat_interval(&name, interval.as_deref(), &at)?;
    let team = builder.team(HEARTBEAT_TEAM_ID.to_string(), source, &at)?;
    Ok(Heartbeat {
        name,
        interval,
        team: Arc::new(team),
    })
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
    file: PathBuf,
    line: Option<usize>,
    message: String,
}

#[cfg(test)]
mod tests {
    use super::heartbeat::DEFAULT_HEARTBEAT_INTERVAL;
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
