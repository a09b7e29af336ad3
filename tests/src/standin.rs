//! Opsgenie stand-ins as a test starts them (`StandInBuilder`, from `TestEnv::standin`).

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;

use opsgenie_standin::{LocalPki, StandIn, StandInConfig};

use crate::TestEnv;

/// A stand-in to start, and the teams of the test's keyring it serves; awaiting it starts it.
///
/// ```ignore
/// let standin = env.standin().serving("backend", "key-a").delay(ms(20)).await;
/// let standin = env.standin().tls().serving(TEAM, KEY).await;
/// ```
pub struct StandInBuilder<'e> {
    env: &'e TestEnv,
    config: StandInConfig,
    teams: Vec<(String, String)>,
    tls: bool,
}

impl<'e> StandInBuilder<'e> {
    pub(crate) fn new(env: &'e TestEnv) -> Self {
        StandInBuilder {
            env,
            config: StandInConfig::default(),
            teams: Vec::new(),
            tls: false,
        }
    }

    /// Accepts `key` (a stand-in that accepts none accepts any non-empty key).
    pub fn accepts(mut self, key: &str) -> Self {
        self.config.keys.push(key.to_owned());
        self
    }

    /// Accepts `key`, and once started is the API of `team`, with that key, in the keyring
    /// (trusted through the team's `ca_file` when it serves TLS).
    pub fn serving(mut self, team: &str, key: &str) -> Self {
        self.teams.push((team.to_owned(), key.to_owned()));
        self.accepts(key)
    }

    /// Waits `delay` before every answer of the Opsgenie API.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.config.delay = Some(delay);
        self
    }

    /// Counts a request as processed (for the confirmations) only `delay` after its 202.
    pub fn processing_delay(mut self, delay: Duration) -> Self {
        self.config.processing_delay = delay;
        self
    }

    /// Drops a connection that has had no request in flight for `after`.
    pub fn idle_drop(mut self, after: Duration) -> Self {
        self.config.idle_drop = Some(after);
        self
    }

    /// Serves https with a certificate of a fresh private CA, which no trust store holds.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    async fn start(mut self) -> StandIn {
        let mut ca_file = None;
        if self.tls {
            let pki = LocalPki::generate().expect("a private CA");
            self.config.tls = Some(pki.server);
            let path = self.env.new_file("ca", "pem");
            std::fs::write(&path, &pki.ca_pem).expect("write the CA");
            ca_file = Some(path);
        }
        let standin = StandIn::start(self.config)
            .await
            .expect("start the stand-in");
        for (team, key) in &self.teams {
            let mut entry = self.env.team(team).key(key);
            if let Some(ca_file) = &ca_file {
                entry = entry.ca_file(ca_file);
            }
            entry.served_by(&standin);
        }
        standin
    }
}

impl<'e> IntoFuture for StandInBuilder<'e> {
    type Output = StandIn;
    type IntoFuture = Pin<Box<dyn Future<Output = StandIn> + 'e>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}
