//! Logs: tracing, as JSON or text, written to standard error by a thread of their own.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::LogFormat;

/// Lines that may wait for standard error before a job that logs has to wait for them. At a
/// few hundred bytes a job's line that is a few MiB, and over two seconds of the fastest
/// drain the worker manages: only a standard error stalled for that long holds jobs up.
const LOG_LINES_QUEUED: usize = 16 * 1024;
/// The writer thread gathers the lines it finds waiting into one `write` of up to this much:
/// a `write` per line cost a tenth of the worker's CPU at a few thousand jobs a second.
const LOG_WRITE_BYTES: usize = 64 * 1024;

/// Keeps the log writer thread; dropping it writes out every line still queued (waiting up to
/// a second). `main` holds it until the process exits, whatever the exit code.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber: `RUST_LOG` filters (default `info`); JSON unless asked for
/// text or writing to a terminal. Logs go to standard error, so `enqueue` and `dead list`
/// keep standard output for their results.
///
/// Lines are written by a thread of their own (tracing-appender), so a slow standard error
/// does not slow jobs down. The writer is not lossy: when `LOG_LINES_QUEUED` lines wait, the
/// next line waits for room rather than being dropped, since a missing line of an alerting
/// tool may be the one an operator needed.
pub fn init_logs(format: Option<LogFormat>) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    // The writer thread flushes whenever it finds no line waiting, so the store batches
    // writes under load and adds no delay when idle.
    let stderr = std::io::BufWriter::with_capacity(LOG_WRITE_BYTES, std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_LINES_QUEUED)
        .thread_name("log-writer")
        .finish(stderr);
    let installed = match format {
        LogFormat::Json => json_subscriber(filter, writer).try_init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .try_init(),
    };
    LogGuard {
        // When a subscriber was installed before (tests), the writer has nothing to write.
        _writer: installed.is_ok().then_some(guard),
    }
}

/// The subscriber of `--log-format json`: one line per event with `timestamp` (RFC 3339, UTC),
/// `level`, the event's fields (`message` among them) as keys of the line itself, `target`,
/// and, for a line written inside a span (a job's), that span's name and fields under `span`.
pub(super) fn json_subscriber<W>(
    filter: EnvFilter,
    writer: W,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .finish()
}
