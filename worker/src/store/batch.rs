//! Calls of concurrent jobs gathered into one Redis round trip: the admission checks and
//! records (`steps.rs`, one script call a batch) and the replication checks
//! (`replication.rs`, one `WAIT` a round). Per job, the Redis client's work was a large share
//! of the worker's CPU; a batch costs one command, one write and one round trip instead.
//!
//! A batch is sent as soon as the one before it is answered, so a lone call waits for nothing.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// What one batch does in Redis.
pub(super) trait Batch: Send + 'static {
    type Call: Send + 'static;
    type Answer: Send + 'static;

    /// Runs `calls` together; answers one per call, in their order, or fails them all.
    fn run(
        &mut self,
        calls: &[Self::Call],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, StoreError>> + Send;
}

/// A call waiting for the next batch, and where its answer goes.
pub(super) struct Waiting<B: Batch> {
    pub(super) call: B::Call,
    pub(super) reply: oneshot::Sender<Result<B::Answer, StoreError>>,
}

/// The inbox of a batching task, started with the first call (which runs on the runtime).
pub(super) struct Batcher<B: Batch> {
    /// Names the task in the error its callers get once it is gone.
    task: &'static str,
    /// The most calls one batch carries; the rest wait for the next.
    most: usize,
    inbox: Arc<OnceLock<mpsc::UnboundedSender<Waiting<B>>>>,
}

impl<B: Batch> Clone for Batcher<B> {
    fn clone(&self) -> Self {
        Batcher {
            task: self.task,
            most: self.most,
            inbox: Arc::clone(&self.inbox),
        }
    }
}

impl<B: Batch> Batcher<B> {
    pub(super) fn new(task: &'static str, most: usize) -> Batcher<B> {
        Batcher {
            task,
            most,
            inbox: Arc::new(OnceLock::new()),
        }
    }

    /// Starts the task, with the batch that `start` makes, unless it runs already.
    pub(super) fn started(&self, start: impl FnOnce() -> B) -> &Self {
        self.inbox.get_or_init(|| {
            let (inbox, waiting) = mpsc::unbounded_channel();
            tokio::spawn(run(start(), self.most, waiting));
            inbox
        });
        self
    }

    /// Runs `call` as part of the next batch. The call is handed over at once and the future
    /// only waits for its answer, which keeps it small: every job holds a few.
    ///
    /// Fails as the batch failed, or when the task is gone (or was never `started`).
    pub(super) fn call(
        &self,
        call: B::Call,
    ) -> impl Future<Output = Result<B::Answer, StoreError>> + use<B> {
        let (reply, answer) = oneshot::channel();
        let handed_over = self
            .inbox
            .get()
            .is_some_and(|inbox| inbox.send(Waiting { call, reply }).is_ok());
        let task = self.task;
        async move {
            if !handed_over {
                return Err(StoreError::TaskGone { task });
            }
            answer.await.map_err(|_| StoreError::TaskGone { task })?
        }
    }
}

/// Runs the calls that are waiting as one batch, answers each, and goes on until every
/// sender is gone.
pub(super) async fn run<B: Batch>(
    mut batch: B,
    most: usize,
    mut waiting: mpsc::UnboundedReceiver<Waiting<B>>,
) {
    let mut calls: Vec<B::Call> = Vec::with_capacity(most);
    let mut replies = Vec::with_capacity(most);
    while let Some(first) = waiting.recv().await {
        calls.push(first.call);
        replies.push(first.reply);
        while calls.len() < most {
            match waiting.try_recv() {
                Ok(next) => {
                    calls.push(next.call);
                    replies.push(next.reply);
                }
                Err(_) => break,
            }
        }
        match batch.run(&calls).await {
            Ok(answers) => {
                for (reply, answer) in replies.drain(..).zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(error) => {
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
        calls.clear();
    }
}
