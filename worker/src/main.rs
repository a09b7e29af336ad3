use std::process::ExitCode;

use opsgenie_worker::cli::{Cli, Command, DeadCommand, check, dead, enqueue};
use opsgenie_worker::support::shutdown::{Shutdown, on_signals};
use opsgenie_worker::{Fatal, run, telemetry};

// Per job the worker allocates and frees many buffers and one large task; mimalloc's
// thread-local free lists serve that pattern for about a tenth less CPU than the system
// allocator (measured with the benchmark, docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let (log_format, threads) = match &cli.command {
        Command::Run(args) => (args.log_format, args.worker_threads),
        _ => (None, 1),
    };
    // Held to the end of `main` on every path: dropping it writes out the queued log lines.
    let logs = telemetry::init_logs(log_format);
    // One thread by default: a job is mostly waiting on sockets, and keeping every task on
    // one thread saves the cross-thread wake-ups that otherwise cost more than the work.
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(usize::from(threads));
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("opsgenie-worker: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let (trigger, shutdown) = Shutdown::new();
                on_signals(trigger)
                    .map_err(|e| Fatal::Other(format!("cannot listen for signals: {e}")))?;
                run(*args, shutdown).await
            }
            Command::Enqueue(args) => enqueue::enqueue(args).await,
            Command::Dead(DeadCommand::List { broker, limit }) => dead::list(broker, limit).await,
            Command::Dead(DeadCommand::Replay { broker, limit }) => {
                dead::replay(broker, limit).await
            }
            Command::Check(args) => check::check(args).await,
        }
    });
    // Background tasks (the Redis client's reconnects) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The last log lines go out before the fatal message, in the order they happened.
    drop(logs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            eprintln!("opsgenie-worker: {fatal}");
            ExitCode::from(fatal.exit_code())
        }
    }
}
