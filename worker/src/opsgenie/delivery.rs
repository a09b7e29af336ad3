//! One delivery round: up to `--quick-tries` requests within `--quick-window`, with exponential
//! backoff and jitter between them, waiting out the key's cooldown first. What each answer
//! means is `classify_response`'s to say; the round only sends, waits and counts tries.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use opsgenie_shared::outcome::{classify_response, classify_transport_error};
use opsgenie_shared::retry::RetryPolicy;
use opsgenie_shared::text::{cap_bytes, printable};
use opsgenie_shared::{DeadReason, OpsgenieRequest, Verdict};
use serde::Deserialize;
use tokio::time::Instant;

use crate::keyring::Team;
use crate::opsgenie::client::Warmth;
use crate::opsgenie::{Answer, CallError, Sender, TransportError, excerpt, measured, request_url};
use crate::support::pacing::Pacing;
use crate::support::shutdown::Shutdown;
use crate::telemetry::catalogue;

/// The most bytes of an answer's `requestId` the worker keeps.
const REQUEST_ID_LIMIT_BYTES: usize = 128;

/// The end of one delivery round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RoundResult {
    /// 2xx, or 404 on a close. `status` and `request_id` are Opsgenie's.
    Delivered { status: u16, request_id: String },
    /// A permanent refusal.
    Refused {
        reason: DeadReason,
        status: u16,
        message: String,
    },
    /// Every try failed in a way worth trying again later. `status` is the last answer, if
    /// any; `wait` is how long the server asked us to wait.
    Failed {
        status: Option<u16>,
        wait: Option<Duration>,
        message: String,
    },
}

#[derive(Deserialize)]
struct Accepted {
    #[serde(rename = "requestId", default)]
    request_id: String,
}

/// What one try came to.
struct Tried {
    verdict: Verdict,
    status: Option<u16>,
    request_id: String,
    message: String,
}

/// A round under way.
struct Round<'a> {
    sender: &'a Sender,
    team: &'a Team,
    request: &'a OpsgenieRequest,
    policy: &'a RetryPolicy,
    shutdown: &'a Shutdown,
    client: reqwest::Client,
    url: url::Url,
    /// Shared by every try: a try clones a pointer, not the body.
    body: bytes::Bytes,
    warmth: Option<Arc<Warmth>>,
    /// The end of the quick window.
    deadline: Instant,
    pacing: Pacing,
    /// Tries that may have reached the server.
    tries: u32,
}

impl Sender {
    /// Sends `request` to `team` up to `policy.quick_tries` times within `policy.quick_window`.
    /// Returns early, as `Failed`, when shutdown begins during a wait, so the job can go to a
    /// delay queue instead of holding up the drain.
    pub(crate) async fn deliver(
        &self,
        team: &Team,
        request: &OpsgenieRequest,
        policy: &RetryPolicy,
        shutdown: &Shutdown,
    ) -> RoundResult {
        let deadline = Instant::now() + policy.quick_window;
        let pacing = Pacing::growing(Duration::from_millis(200), policy.quick_window, 3.0, 0.5);
        let client = match self.clients.client_for(team).await {
            Ok(client) => client,
            Err(error) => {
                let message = error.to_string();
                tracing::warn!(team_id = team.id, error = message, "Cannot reach Opsgenie.");
                return RoundResult::Failed {
                    status: None,
                    wait: None,
                    message,
                };
            }
        };
        let mut round = Round {
            sender: self,
            team,
            request,
            policy,
            shutdown,
            client,
            url: request_url(&team.api, &request.path, request.query),
            body: bytes::Bytes::copy_from_slice(&request.body),
            warmth: self.clients.warmth_of(team),
            deadline,
            pacing,
            tries: 0,
        };
        loop {
            if let ControlFlow::Break(end) = round.wait_out_cooldown().await {
                return end;
            }
            let tried = round.try_once().await;
            if let ControlFlow::Break(end) = round.decide(tried).await {
                return end;
            }
        }
    }
}

impl Round<'_> {
    /// Waits while the key cools down after a 429. Ends the round when the cooldown outlasts
    /// the quick window, or shutdown comes first.
    async fn wait_out_cooldown(&self) -> ControlFlow<RoundResult> {
        let Some(until) = self.sender.cooldowns.until(&self.team.id) else {
            return ControlFlow::Continue(());
        };
        if until > self.deadline {
            return ControlFlow::Break(RoundResult::Failed {
                status: Some(429),
                wait: Some(until - Instant::now()),
                message: CallError::CoolingDown(Duration::ZERO).to_string(),
            });
        }
        let _waiting = catalogue::WaitingForCooldown::start();
        if !self.shutdown.sleep_until(until).await {
            return ControlFlow::Break(interrupted());
        }
        ControlFlow::Continue(())
    }

    /// Sends the request once and reads what the answer means.
    async fn try_once(&mut self) -> Tried {
        let started = std::time::Instant::now();
        let answer = self
            .sender
            .clients
            .send_warm(
                self.warmth.as_deref(),
                &self.client,
                &self.url,
                &self.team.authorization,
                &self.body,
            )
            .await;
        // A request that never reached the server (no connection could be made) is not
        // a try; anything else may have been received, and counts.
        if !matches!(&answer, Err(e) if e.is_connect()) {
            self.tries += 1;
        }
        let tried = match answer {
            Ok(answer) => self.read(answer),
            Err(error) => {
                let message = TransportError::request(self.team, error).to_string();
                tracing::warn!(
                    team_id = self.team.id,
                    error = message,
                    "A request to Opsgenie failed."
                );
                Tried {
                    verdict: classify_transport_error(),
                    status: None,
                    request_id: String::new(),
                    message,
                }
            }
        };
        measured(started, tried.status);
        tried
    }

    /// An answer's verdict, with Opsgenie's request id or the start of its error.
    fn read(&self, answer: Answer) -> Tried {
        let status = answer.status;
        let verdict = classify_response(
            self.request.action,
            status,
            answer.retry_after.as_deref(),
            answer.rate_limit_period.as_deref(),
        );
        // Opsgenie's ids are uuids; an answer is not trusted to keep them short,
        // since the id goes into a log line and the stream.
        let request_id = serde_json::from_slice::<Accepted>(&answer.body)
            .map(|a| printable(&cap_bytes(&a.request_id, REQUEST_ID_LIMIT_BYTES)).into_owned())
            .unwrap_or_default();
        let message = match verdict {
            Verdict::Delivered | Verdict::NothingToClose => String::new(),
            _ => format!(
                "Opsgenie answered {status}: {}",
                excerpt(&answer.body, self.team.key.expose())
            ),
        };
        Tried {
            verdict,
            status: Some(status),
            request_id,
            message,
        }
    }

    /// Ends the round on a verdict that decides it, or when no try or time is left; otherwise
    /// waits for the next try (the cooldown first, after a 429).
    async fn decide(&mut self, tried: Tried) -> ControlFlow<RoundResult> {
        let Tried {
            verdict,
            status,
            request_id,
            message,
        } = tried;
        let (wait, rate_limited) = match verdict {
            Verdict::Delivered | Verdict::NothingToClose => {
                if verdict == Verdict::NothingToClose {
                    tracing::info!(
                        alias = self.request.alias.as_deref(),
                        "Nothing open to close; counted as delivered."
                    );
                }
                return ControlFlow::Break(RoundResult::Delivered {
                    status: status.unwrap_or(0),
                    request_id,
                });
            }
            Verdict::DeadLetter(reason) => {
                return ControlFlow::Break(RoundResult::Refused {
                    reason,
                    status: status.unwrap_or(0),
                    message,
                });
            }
            Verdict::Retry { wait, rate_limited } => (wait, rate_limited),
        };
        let pause = wait.unwrap_or_else(|| self.pacing.next_pause());
        if rate_limited {
            self.sender.cooldowns.rate_limited(&self.team.id, pause);
        }
        let resume = Instant::now() + pause;
        let failed = RoundResult::Failed {
            status,
            wait,
            message,
        };
        if self.tries >= self.policy.quick_tries || resume > self.deadline {
            return ControlFlow::Break(failed);
        }
        tracing::debug!(
            status,
            retry_in_ms = pause.as_millis() as u64,
            "Request failed; trying again."
        );
        metrics::counter!(catalogue::RETRIES, "kind" => "quick").increment(1);
        if !self.shutdown.sleep_until(resume).await {
            return ControlFlow::Break(failed);
        }
        ControlFlow::Continue(())
    }
}

fn interrupted() -> RoundResult {
    RoundResult::Failed {
        status: None,
        wait: None,
        message: "shutting down".into(),
    }
}
