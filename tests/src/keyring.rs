//! The test's `keyring.toml`, as a test edits it: `env.team(..)`, `env.heartbeat(..)`.

use std::path::{Path, PathBuf};

use opsgenie_standin::StandIn;

use crate::{TestEnv, lock};

/// A team of the test's keyring, from `TestEnv::team`; written when `at` or `served_by` names
/// where its API is.
pub struct Team<'e> {
    env: &'e TestEnv,
    entry: TeamEntry,
}

#[derive(Clone)]
struct TeamEntry {
    id: String,
    key: Key,
    api_url: String,
    ca_file: Option<PathBuf>,
}

#[derive(Clone)]
enum Key {
    Inline(String),
    /// `integration_key_file`, relative to the keyring.
    File(String),
}

impl Team<'_> {
    /// The team's `integration_key`.
    pub fn key(mut self, key: &str) -> Self {
        self.entry.key = Key::Inline(key.to_owned());
        self
    }

    /// An `integration_key_file` instead of a key: `name` is read beside the keyring.
    pub fn key_file(mut self, name: &str) -> Self {
        self.entry.key = Key::File(name.to_owned());
        self
    }

    /// The team's `ca_file`: the CA its API's certificate must chain to.
    pub fn ca_file(mut self, path: &Path) -> Self {
        self.entry.ca_file = Some(path.to_owned());
        self
    }

    /// Writes the keyring with this team's API at `api_url` (replacing a team of the same id).
    pub fn at(mut self, api_url: &str) {
        self.entry.api_url = api_url.to_owned();
        self.env.edit_keyring(|k| {
            match k.teams.iter_mut().find(|t| t.id == self.entry.id) {
                Some(team) => *team = self.entry,
                None => k.teams.push(self.entry),
            };
        });
    }

    /// `at` the stand-in's base URL.
    pub fn served_by(self, standin: &StandIn) {
        self.at(&standin.base_url())
    }
}

/// The keyring's `[heartbeat]`, from `TestEnv::heartbeat`; written when `at` or `served_by`
/// names where its API is.
pub struct Heartbeat<'e> {
    env: &'e TestEnv,
    entry: HeartbeatEntry,
}

#[derive(Clone)]
struct HeartbeatEntry {
    name: String,
    key: String,
    api_url: String,
    interval: String,
}

impl Heartbeat<'_> {
    pub fn key(mut self, key: &str) -> Self {
        self.entry.key = key.to_owned();
        self
    }

    /// How often the fleet pings, as the keyring writes it (`"1s"`).
    pub fn every(mut self, interval: &str) -> Self {
        self.entry.interval = interval.to_owned();
        self
    }

    /// Writes the keyring with this heartbeat, pinged at `api_url`.
    pub fn at(mut self, api_url: &str) {
        self.entry.api_url = api_url.to_owned();
        self.env.edit_keyring(|k| k.heartbeat = Some(self.entry));
    }

    pub fn served_by(self, standin: &StandIn) {
        self.at(&standin.base_url())
    }
}

#[derive(Default)]
pub(crate) struct Keyring {
    teams: Vec<TeamEntry>,
    heartbeat: Option<HeartbeatEntry>,
}

impl Keyring {
    fn render(&self) -> String {
        let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let mut text = String::new();
        for t in &self.teams {
            text.push_str(&format!("[[team]]\nid = {}\n", quoted(&t.id)));
            match &t.key {
                Key::Inline(key) => {
                    text.push_str(&format!("integration_key = {}\n", quoted(key)));
                }
                Key::File(name) => {
                    text.push_str(&format!("integration_key_file = {}\n", quoted(name)));
                }
            }
            text.push_str(&format!("api_url = {}\n", quoted(&t.api_url)));
            if let Some(ca_file) = &t.ca_file {
                let ca_file = ca_file.to_str().expect("a UTF-8 temp path");
                text.push_str(&format!("ca_file = {}\n", quoted(ca_file)));
            }
            text.push('\n');
        }
        if let Some(h) = &self.heartbeat {
            text.push_str(&format!(
                "[heartbeat]\nname = {}\nintegration_key = {}\napi_url = {}\ninterval = {}\n",
                quoted(&h.name),
                quoted(&h.key),
                quoted(&h.api_url),
                quoted(&h.interval)
            ));
        }
        text
    }
}

impl TestEnv {
    /// The test's `keyring.toml`, as the team and heartbeat edits have left it.
    pub fn keyring(&self) -> PathBuf {
        self.dir.join("keyring.toml")
    }

    /// Adds (or replaces) team `id` in the keyring: `env.team("backend").key("k").at(url)`.
    pub fn team(&self, id: &str) -> Team<'_> {
        Team {
            env: self,
            entry: TeamEntry {
                id: id.to_owned(),
                key: Key::Inline(String::new()),
                api_url: String::new(),
                ca_file: None,
            },
        }
    }

    /// Gives the keyring a `[heartbeat]` named `name`:
    /// `env.heartbeat(name).key("k").every("1s").at(url)`.
    pub fn heartbeat(&self, name: &str) -> Heartbeat<'_> {
        Heartbeat {
            env: self,
            entry: HeartbeatEntry {
                name: name.to_owned(),
                key: String::new(),
                api_url: String::new(),
                interval: String::new(),
            },
        }
    }

    /// Takes the `[heartbeat]` out of the keyring again.
    pub fn remove_heartbeat(&self) {
        self.edit_keyring(|k| k.heartbeat = None);
    }

    pub(crate) fn edit_keyring(&self, edit: impl FnOnce(&mut Keyring)) {
        let mut keyring = lock(&self.keyring);
        edit(&mut keyring);
        std::fs::write(self.keyring(), keyring.render()).expect("write keyring");
    }
}
