//! The command line (docs/contract.md section 9): every flag, its environment variable and its default.

pub mod check;
pub mod dead;
pub mod enqueue;
mod fatal;

pub use fatal::Fatal;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use opsgenie_shared::retry::{RetryPolicy, parse_duration};

#[derive(Debug, Parser)]
#[command(
    name = "opsgenie-worker",
    version,
    about = "Turns alert jobs from RabbitMQ into Opsgenie alerts, with retries, dead letters and a Redis record of every delivery.",
    after_help = "Every flag can also be set by the environment variable shown beside it.",
    // A flag given twice takes its last value, so wrappers can append overrides.
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses `argv` (the program's name first) and notes what only the way a value was
    /// given can tell: whether `enqueue` was told a queue.
    pub fn parse_args<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
        let matches = Cli::command().try_get_matches_from(argv)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        if let (Command::Enqueue(args), Some(("enqueue", sub))) =
            (&mut cli.command, matches.subcommand())
        {
            args.declare_queues = matches!(
                sub.value_source("queue"),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
        }
        Ok(cli)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume jobs and deliver them to Opsgenie until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// Validate jobs and publish them (with publisher confirms) from files, or from standard
    /// input one JSON per line.
    Enqueue(EnqueueArgs),
    /// Show or replay the dead-letter queue.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Load the keyring and reach the broker and Redis; exit 2 with the reason on failure.
    Check(CheckArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// Print dead letters with their reason, message, status, attempts and age; they stay in
    /// the queue.
    List {
        #[command(flatten)]
        broker: BrokerArgs,
        /// How many to show at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Move dead letters back to the work queue (with a fresh attempt count).
    Replay {
        #[command(flatten)]
        broker: BrokerArgs,
        /// How many to move at most (default: all that are there now).
        #[arg(long)]
        limit: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// Where jobs come from: the broker and the names of docs/contract.md section 8.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL (amqp:// or amqps://). Default: the local broker as guest,
    /// amqp://guest:***@127.0.0.1:5672/%2f.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub amqp_url: String,
    /// The direct exchange producers publish to.
    #[arg(long, env = "WORKER_EXCHANGE", default_value = "opsgenie")]
    pub exchange: String,
    /// The work queue; its delay queues are NAME.retry.* and its dead-letter queue NAME.dead.
    #[arg(long, env = "WORKER_QUEUE", default_value = "opsgenie.alerts")]
    pub queue: String,
    /// The routing key that binds the work queue to the exchange.
    #[arg(long, env = "WORKER_ROUTING_KEY", default_value = "alert")]
    pub routing_key: String,
    /// The type of the work, delay and dead-letter queues (quorum for a RabbitMQ cluster).
    #[arg(long, env = "WORKER_QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,
    /// The delays of the retry queues, shortest first.
    #[arg(long, env = "WORKER_RETRY_DELAYS", default_value = "5s,30s,2m,10m,30m", value_parser = parse_delays)]
    pub retry_delays: Delays,
}

/// Where deliveries are recorded.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL (redis://, rediss:// or redis-sentinel://).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,
    /// The prefix of every Redis key the worker writes.
    #[arg(long, env = "REDIS_PREFIX", default_value = "opsgenie:")]
    pub redis_prefix: String,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// The keyring: which integration key and API URL serve each team. SIGHUP reloads it.
    #[arg(long, env = "OPSGENIE_KEYRING", default_value = "keyring.toml")]
    pub keyring: PathBuf,
    /// Jobs taken from the broker and processed at once (basic.qos prefetch).
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Address of /metrics, /healthz and /readyz, or `off`.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Log format: json or text (default: text on a terminal, json otherwise).
    #[arg(long, env = "LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Approximate length the deliveries stream is trimmed to.
    #[arg(long, env = "STREAM_MAXLEN", default_value_t = 1_000_000)]
    pub stream_maxlen: u64,
    /// Seconds a delivered notification_uuid is remembered, so that a redelivery is not sent again.
    #[arg(long, env = "DEDUPE_TTL", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub dedupe_ttl: u64,
    /// Replicas of the Redis primary that must hold a delivery's record (Redis `WAIT`) before
    /// the job is acked; fewer within a second is a failed write, tried again. 0: the
    /// primary's answer suffices (a failover may then lose the latest records).
    #[arg(long, env = "REDIS_REPLICAS", default_value_t = 0)]
    pub redis_replicas: u32,
    /// Attempts at one message that were started and never finished (the worker died or
    /// was cut off in the middle) before it is dead-lettered as poison instead of being
    /// tried again. Counted in Redis for redelivered messages only.
    #[arg(long, env = "POISON_AFTER", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub poison_after: u32,
    /// Delivery rounds before a job is dead-lettered as exhausted.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Age (since the job was first seen) past which it is dead-lettered as exhausted.
    #[arg(long, env = "MAX_AGE", default_value = "24h", value_parser = parse_duration_arg)]
    pub max_age: Duration,
    /// HTTP tries in one round before the job goes to a delay queue.
    #[arg(long, env = "QUICK_TRIES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub quick_tries: u32,
    /// Time one round's tries may take, waits included.
    #[arg(long, env = "QUICK_WINDOW", default_value = "10s", value_parser = parse_duration_arg)]
    pub quick_window: Duration,
    /// Time-out of one HTTP request to Opsgenie.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration_arg)]
    pub request_timeout: Duration,
    /// Time jobs in flight may take to finish after SIGTERM before they are returned to the queue.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration_arg)]
    pub drain_timeout: Duration,
    /// Threads that run jobs. One carries thousands of jobs a second; to use more cores,
    /// prefer more replicas.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
    /// How often a summary line (delivered, retried, dead-lettered, in flight) is logged.
    #[arg(long, env = "SUMMARY_INTERVAL", default_value = "60s", value_parser = parse_duration_arg)]
    pub summary_interval: Duration,
    /// Confirm each delivery: ask Opsgenie whether the request it accepted (202) became an
    /// alert, dead-letter it as failed_async when it did not. `off` stops at the 202.
    #[arg(long, env = "CONFIRM", value_enum, default_value = "on")]
    pub confirm: Switch,
    /// How long after its delivery a request may stay unprocessed before it is
    /// dead-lettered as unconfirmed.
    #[arg(long, env = "CONFIRM_WITHIN", default_value = "15m", value_parser = parse_duration_arg)]
    pub confirm_within: Duration,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl RunArgs {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            max_age: self.max_age,
            delays: self.broker.retry_delays.0.clone(),
            quick_tries: self.quick_tries,
            quick_window: self.quick_window,
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Declares only the exchange, and publishes with `mandatory`: a job no queue is bound to receive is an error. Given --queue (or WORKER_QUEUE), it also declares that work queue and its retry and dead-letter queues, with the worker's arguments."
)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Files with one job each (or several, one JSON per line); none: standard input, one per line.
    pub files: Vec<PathBuf>,
    /// Whether `--queue` (or its variable) was given: only then are the work queue and its
    /// retry and dead-letter queues declared. Set by `parse`.
    #[arg(skip)]
    pub declare_queues: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// The keyring to load.
    #[arg(long, env = "OPSGENIE_KEYRING", default_value = "keyring.toml")]
    pub keyring: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    On(SocketAddr),
}

/// The retry delays, shortest first, never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delays(pub Vec<Duration>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::On)
        .map_err(|_| format!("\"{s}\" is not host:port (for example 127.0.0.1:9464) or off"))
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|why| {
        format!("\"{s}\" is not a duration such as 500ms, 10s, 2m, 1h 30m or 24h ({why})")
    })
}

fn parse_delays(s: &str) -> Result<Delays, String> {
    let delays = s
        .split(',')
        .map(|d| parse_duration_arg(d.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if delays.is_empty() || delays.iter().any(Duration::is_zero) {
        return Err("give at least one delay, each above zero".into());
    }
    if delays.windows(2).any(|w| w[0] >= w[1]) {
        return Err("the delays must grow, shortest first".into());
    }
    Ok(Delays(delays))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_flags_read_what_humantime_reads() {
        let secs = Duration::from_secs;
        assert_eq!(parse_duration_arg("5s"), Ok(secs(5)));
        assert_eq!(parse_duration_arg("2m"), Ok(secs(120)));
        assert_eq!(parse_duration_arg("1h 30m"), Ok(secs(5400)));
        assert_eq!(parse_duration_arg("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration_arg("24h"), Ok(secs(86_400)));
        let error = parse_duration_arg("soon").unwrap_err();
        assert!(
            error.starts_with("\"soon\" is not a duration such as 500ms"),
            "{error}"
        );
        let cli = Cli::try_parse_from(["opsgenie-worker", "run", "--max-age", "1h 30m"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.max_age, secs(5400));
        assert_eq!(
            parse_delays("5s, 1m 30s, 1h").unwrap(),
            Delays(vec![secs(5), secs(90), secs(3600)])
        );
    }

    #[test]
    fn delays_must_grow() {
        assert_eq!(
            parse_delays("1s, 2m").unwrap(),
            Delays(vec![Duration::from_secs(1), Duration::from_secs(120)])
        );
        assert!(parse_delays("2m,1s").is_err());
        assert!(parse_delays("0s").is_err());
        assert!(parse_delays("x").is_err());
    }

    #[test]
    fn enqueue_declares_queues_only_when_told_a_queue() {
        let declares = |argv: &[&str]| match Cli::parse_args(argv).unwrap().command {
            Command::Enqueue(args) => args.declare_queues,
            _ => panic!("not enqueue"),
        };
        assert!(!declares(&[
            "opsgenie-worker",
            "enqueue",
            "--exchange",
            "x"
        ]));
        assert!(declares(&[
            "opsgenie-worker",
            "enqueue",
            "--exchange",
            "x",
            "--queue",
            "opsgenie.alerts"
        ]));
    }

    #[test]
    fn defaults_follow_the_spec() {
        let cli = Cli::try_parse_from(["opsgenie-worker", "run"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.prefetch, 64);
        assert_eq!(run.broker.exchange, "opsgenie");
        assert_eq!(run.broker.queue, "opsgenie.alerts");
        assert_eq!(run.redis.redis_prefix, "opsgenie:");
        assert_eq!(
            run.metrics_addr,
            MetricsAddr::On("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(run.retry_policy(), RetryPolicy::default());
        assert_eq!(run.dedupe_ttl, 86_400);
        assert_eq!(run.redis_replicas, 0);
        assert_eq!(run.stream_maxlen, 1_000_000);
        assert_eq!(run.drain_timeout, Duration::from_secs(30));
    }
}
