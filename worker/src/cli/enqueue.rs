//! `opsgenie-worker enqueue`: validate jobs with the same code the worker uses, then publish
//! the valid ones with publisher confirms. A job that is invalid, or that the broker refuses,
//! is reported with where it came from and why; it never stops the others.

use std::io::Read;
use std::path::Path;

use opsgenie_shared::AlertJob;
use serde::de::IgnoredAny;

use crate::broker::{
    self, Publisher, SetupError, Topology, check_names, job_properties, unreachable_broker,
};
use crate::cli::EnqueueArgs;
use crate::cli::Fatal;
use crate::support::init_tls;

/// One job found in the input, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    /// `FILE: line N` or `stdin: line N` (the line the job starts on), for messages.
    pub origin: String,
    pub body: Vec<u8>,
}

/// Splits a file into jobs: one JSON value, or several one after another (JSON lines), each
/// named by the line it starts on. A syntax error ends the file (and is returned): what
/// follows it cannot be told apart.
fn split_file(name: &str, data: &[u8]) -> (Vec<Found>, Option<String>) {
    let mut found = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(data).into_iter::<IgnoredAny>();
    loop {
        let start = stream.byte_offset();
        match stream.next() {
            None => return (found, None),
            Some(Ok(_)) => {
                let end = stream.byte_offset();
                let body = &data[start..end];
                let leading = body.len() - body.trim_ascii_start().len();
                let line = 1 + data[..start + leading]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count();
                found.push(Found {
                    origin: format!("{name}: line {line}"),
                    body: body.trim_ascii().to_vec(),
                });
            }
            Some(Err(error)) => {
                return (found, Some(format!("not JSON: {error}")));
            }
        }
    }
}

/// Standard input: one job per line; blank lines are skipped.
fn split_lines(data: &[u8]) -> Vec<Found> {
    data.split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.trim_ascii().is_empty())
        .map(|(i, line)| Found {
            origin: format!("stdin: line {}", i + 1),
            body: line.trim_ascii().to_vec(),
        })
        .collect()
}

pub use opsgenie_shared::text::printable;

/// A job that did not reach the broker, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotPublished {
    /// Where the job came from (`Found::origin`), or the file that could not be read or
    /// split.
    pub origin: String,
    pub reason: String,
}

impl NotPublished {
    /// The line of the report on standard error.
    fn report(&self) -> String {
        printable(&format!("{}: {}", self.origin, self.reason)).into_owned()
    }
}

/// The last line of `enqueue`, on standard output.
fn summary(published: usize, failed: usize, topology: &Topology) -> String {
    printable(&format!(
        "published {published}, failed {failed} (exchange \"{}\", routing key \"{}\")",
        topology.exchange, topology.routing_key
    ))
    .into_owned()
}

/// Reads every input, reports each job that cannot be published (invalid, or refused by the
/// broker) with where it came from and why, and publishes all the others.
///
/// Fails when a flag names something the broker cannot take, the broker cannot be reached,
/// or any job (or input file) was not published, after publishing the others.
pub async fn enqueue(args: EnqueueArgs) -> Result<(), Fatal> {
    init_tls();
    let topology = Topology::new(&args.broker);
    check_names(&args.broker, &topology)?;
    // In the order of the input, so that the report reads like it.
    let mut valid = Vec::new();
    let mut failed = Vec::new();
    if args.files.is_empty() {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .map_err(|e| Fatal::Other(format!("cannot read standard input: {e}")))?;
        validate(split_lines(&data), &mut valid, &mut failed);
    } else {
        for file in &args.files {
            match std::fs::read(file) {
                Ok(data) => {
                    let (jobs, problem) = split_file(&display(file), &data);
                    validate(jobs, &mut valid, &mut failed);
                    failed.extend(problem.map(|reason| NotPublished {
                        origin: display(file),
                        reason,
                    }));
                }
                Err(error) => failed.push(NotPublished {
                    origin: display(file),
                    reason: format!("cannot read the file: {error}"),
                }),
            }
        }
    }
    for problem in &failed {
        eprintln!("{}", problem.report());
    }
    let mut published = 0;
    if !valid.is_empty() {
        let connection = broker::connect(&args.broker.amqp_url, "opsgenie-worker enqueue")
            .await
            .map_err(|e| unreachable_broker(&args.broker.amqp_url, &e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Fatal::Other(printable(&e.to_string()).into_owned()))?;
        // A producer touches only what it is told: the exchange it publishes to, and the
        // worker's queues only when it names them (`--queue`), so that a job published before
        // any worker ever ran is kept. It never creates a queue nobody consumes.
        let declared = if args.declare_queues {
            topology.declare(&channel).await
        } else {
            topology.declare_exchange(&channel).await
        };
        declared.map_err(SetupError::Declare)?;
        let publisher = Publisher::new(&connection)
            .await
            .map_err(|e| Fatal::Other(printable(&e.to_string()).into_owned()))?;
        let publishes = valid.iter().map(|(job, uuid)| {
            publisher.publish(
                &topology.exchange,
                &topology.routing_key,
                &job.body,
                job_properties(uuid),
            )
        });
        let results = futures_util::future::join_all(publishes).await;
        let _ = connection.close(200, "done".into()).await;
        for ((job, _), result) in valid.into_iter().zip(results) {
            match result {
                Ok(()) => published += 1,
                Err(error) => {
                    let problem = NotPublished {
                        origin: job.origin,
                        reason: format!("not published: {error}"),
                    };
                    eprintln!("{}", problem.report());
                    failed.push(problem);
                }
            }
        }
    }
    println!("{}", summary(published, failed.len(), &topology));
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Fatal::Other(format!(
            "{} input{} not published, each named above",
            failed.len(),
            if failed.len() == 1 { " was" } else { "s were" }
        )))
    }
}

/// Parses each job: a valid one joins `valid` with its `notification_uuid`, an invalid one
/// `failed` with its field path.
fn validate(jobs: Vec<Found>, valid: &mut Vec<(Found, String)>, failed: &mut Vec<NotPublished>) {
    for job in jobs {
        match AlertJob::parse(&job.body) {
            Ok(parsed) => valid.push((job, parsed.notification_uuid)),
            Err(error) => failed.push(NotPublished {
                origin: job.origin,
                reason: format!("invalid job: {error}"),
            }),
        }
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn a_file_holds_one_pretty_job_or_json_lines_each_named_by_its_line() {
        let (jobs, problem) = split_file("a.json", b"\n\n{\n \"a\": 1\n}\n");
        assert_eq!(problem, None);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].body, b"{\n \"a\": 1\n}");
        assert_eq!(jobs[0].origin, "a.json: line 3");
        let (jobs, problem) = split_file("b.jsonl", b"{\"a\":1}\n{\"a\":2}\n\n[1]\n");
        assert_eq!(problem, None);
        assert_eq!(
            jobs.iter().map(|j| j.origin.as_str()).collect::<Vec<_>>(),
            ["b.jsonl: line 1", "b.jsonl: line 2", "b.jsonl: line 4"]
        );
        let (jobs, problem) = split_file("c.json", b"{\"a\":1}\n{oops");
        assert_eq!(jobs.len(), 1);
        let problem = problem.expect("a syntax error");
        assert!(problem.starts_with("not JSON"), "{problem}");
        assert!(problem.contains("line 2"), "{problem}");
    }

    #[test]
    fn standard_input_is_one_job_per_line() {
        let jobs = split_lines(b"{\"a\":1}\n\n  \nnot json\n");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].origin, "stdin: line 4");
        assert_eq!(jobs[1].body, b"not json");
    }

    #[test]
    fn printable_escapes_control_characters_and_backslashes_only() {
        for (text, shown) in [
            ("backend", "backend"),
            ("a\nb", "a\\nb"),
            ("a\r\nb\tc", "a\\r\\nb\\tc"),
            ("\x1b[2J\x1b]0;owned\x07", "\\u{1b}[2J\\u{1b}]0;owned\\u{7}"),
            ("nul\0 del\x7f csi\u{9b}", "nul\\0 del\\u{7f} csi\\u{9b}"),
            ("a literal \\n", "a literal \\\\n"),
            ("team \"ops\" can't", "team \"ops\" can't"),
            ("équipe 日本 😀 e\u{301}", "équipe 日本 😀 e\u{301}"),
        ] {
            let out = printable(text);
            assert_eq!(out, shown, "{text:?}");
            assert!(!out.chars().any(char::is_control), "{out:?}");
        }
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn a_reported_job_is_one_line_whatever_it_carries() {
        let problem = NotPublished {
            origin: "jobs\n.jsonl: line 2".into(),
            reason: "invalid job: kind: unknown variant `\x1b[31mred`".into(),
        };
        assert_eq!(
            problem.report(),
            "jobs\\n.jsonl: line 2: invalid job: kind: unknown variant `\\u{1b}[31mred`"
        );
    }

    /// The 255-byte limit of an AMQP short string, on both sides, and a uuid the schema allows
    /// (100 characters) that is far over it.
    #[test]
    fn the_message_id_is_the_uuid_when_it_fits_and_its_hash_otherwise() {
        let ascii = "3f1c9a2e-5d7b-4e1a-9c2f-0b8d6e4a1f37";
        let fits = format!("{}abc", "𝄞".repeat(63));
        let over = "𝄞".repeat(64);
        let schema_max = "𝄞".repeat(100);
        assert_eq!((fits.len(), over.len(), schema_max.len()), (255, 256, 400));
        for uuid in [ascii, fits.as_str()] {
            let properties = job_properties(uuid);
            assert_eq!(
                properties.message_id().as_ref().map(|m| m.as_str()),
                Some(uuid)
            );
        }
        // Worked out independently: printf '𝄞%.0s' $(seq 100) | sha256sum
        assert_eq!(
            job_properties(&schema_max)
                .message_id()
                .as_ref()
                .map(|m| m.as_str()),
            Some("sha256:46fe957c14463e126a3339e9b3b2774b33f358ea1bdfc8134df7611eed1cdc9d")
        );
        let hashed = broker::job_message_id(&over);
        assert_eq!(hashed, broker::job_message_id(&over), "stable");
        assert_ne!(hashed, broker::job_message_id(&schema_max));
        assert_eq!(hashed.as_str().len(), 71);
    }

    fn enqueue_args(flags: &[&str]) -> EnqueueArgs {
        let argv = ["opsgenie-worker", "enqueue"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("flags").command {
            Command::Enqueue(args) => args,
            _ => unreachable!("an enqueue command line"),
        }
    }

    #[test]
    fn a_name_the_broker_cannot_take_is_bad_configuration_not_a_panic() {
        let long = "q".repeat(251);
        let vhost_url = format!("amqp://guest:guest@127.0.0.1:5672/{}", "v".repeat(256));
        let cases: [(&[&str], Option<&str>); 6] = [
            (&[], None),
            (&["--queue", &long[..244]], None),
            (
                &["--exchange", &"e".repeat(256)],
                Some("--exchange is 256 bytes"),
            ),
            (
                &["--routing-key", &"k".repeat(300)],
                Some("--routing-key is 300 bytes"),
            ),
            // The dead-letter queue, `NAME.dead`, is the one over.
            (&["--queue", &long], Some("the queue name is 256 bytes")),
            (&["--amqp-url", &vhost_url], Some("virtual host")),
        ];
        for (flags, expected) in cases {
            let args = enqueue_args(flags);
            let result =
                check_names(&args.broker, &Topology::new(&args.broker)).map_err(Fatal::from);
            match (result, expected) {
                (Ok(()), None) => {}
                (Err(Fatal::Config(message)), Some(expected)) => {
                    assert!(message.contains(expected), "{message}");
                }
                (other, _) => panic!("{flags:?}: {other:?}"),
            }
        }
    }
}
