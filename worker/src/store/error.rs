//! What can go wrong at the Redis boundary. Every text starts the way the Redis client writes
//! its own errors (`<kind>: <details>`), so that a log line reads the same whichever of the two
//! failed.

/// A call to the store that did not do what was asked. Cloned, because one failed batch or
/// replication round fails every call it carried.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum StoreError {
    /// Redis could not be reached, refused the command, or timed out.
    #[error(transparent)]
    Redis(#[from] fred::error::Error),
    /// A Sentinel `--redis-url` with a host list, which the client would fail on as a bad port.
    #[error(
        "Config Error: name one Sentinel as the host and each other one as `&node=host:port` \
         (a comma-separated host list is not understood)"
    )]
    SentinelHostList,
    /// A `--redis-url` whose scheme is not Redis's.
    #[error(
        "Config Error: scheme \"{0}\" is not one of redis, rediss, redis-sentinel, rediss-sentinel"
    )]
    Scheme(String),
    /// The task that batches calls (`batching`) or replication rounds (`replication`) ended.
    #[error("Canceled: the Redis {task} task is gone")]
    TaskGone { task: &'static str },
    /// The script arguments could not be written; strings and slices never cause it.
    #[error("Unknown Error: cannot write the script arguments: {0}")]
    Arguments(String),
    /// An admission answer this worker does not know: never "go and send" on it.
    #[error("Protocol Error: unexpected admission answer {answer:?}")]
    UnreadableAdmission { answer: String },
    /// A script answered for more or fewer calls than it was given.
    #[error("Protocol Error: {}", script.miscount(*answered, *asked))]
    AnswerCount {
        script: Script,
        answered: usize,
        asked: usize,
    },
    /// The connection changed under a replication round, so its `WAIT` proves nothing.
    #[error("IO Error: the connection to Redis changed during the replication check")]
    ConnectionChanged,
    /// Records the primary should hold and does not: lost in a failover, or written elsewhere.
    #[error(
        "Not Found: {missing} of {asked} records are missing on the Redis primary (lost in a failover?)"
    )]
    MissingRecords { missing: u64, asked: usize },
    /// Fewer replicas than `--redis-replicas` acknowledged a round's write in time.
    #[error(
        "Timeout Error: {acknowledged} of the {required} Redis replicas required acknowledged the write within {within_ms} ms"
    )]
    TooFewReplicas {
        acknowledged: u64,
        required: u32,
        within_ms: u128,
    },
}

/// A script whose answers come one per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Script {
    /// `steps.lua`: one answer per admission check or record.
    Steps,
    /// `confirm_read.lua`: one word saying whether the hash exists, then its fields.
    ConfirmRead,
    /// `confirm_settle.lua`: one answer per settle.
    ConfirmSettle,
}

impl Script {
    fn miscount(self, answered: usize, asked: usize) -> String {
        match self {
            Script::Steps => format!("{answered} answers to {asked} calls"),
            Script::ConfirmRead => {
                format!("{answered} words read for {asked} pending confirmations")
            }
            Script::ConfirmSettle => format!("{answered} answers to {asked} settles"),
        }
    }
}
