//! `opsgenie-worker enqueue`: validate jobs with the same code the worker uses, then publish
//! the valid ones with publisher confirms. An invalid job is reported with its field path and
//! never published.

use std::io::Read;
use std::path::Path;

use opsgenie_shared::AlertJob;
use serde::de::IgnoredAny;

use crate::amqp::{self, Publisher, Topology, job_properties};
use crate::config::{EnqueueArgs, redact_error, redact_url};
use crate::{Fatal, init_tls};

/// One job found in the input, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `FILE`, `FILE: job N` or `stdin: line N`, for messages.
    pub origin: String,
    pub body: Vec<u8>,
}

/// Splits a file into jobs: one JSON value, or several one after another (JSON lines).
/// A syntax error ends the file: what follows it cannot be told apart.
pub fn split_file(name: &str, data: &[u8]) -> (Vec<Found>, Option<String>) {
    let mut found = Vec::new();
    let mut stream = serde_json::Deserializer::from_slice(data).into_iter::<IgnoredAny>();
    loop {
        let start = stream.byte_offset();
        match stream.next() {
            None => return (found, None),
            Some(Ok(_)) => {
                let end = stream.byte_offset();
                found.push(Found {
                    origin: format!("{name}: job {}", found.len() + 1),
                    body: data[start..end].trim_ascii().to_vec(),
                });
            }
            Some(Err(error)) => {
                return (found, Some(format!("{name}: not JSON: {error}")));
            }
        }
    }
}

/// Standard input: one job per line; blank lines are skipped.
pub fn split_lines(data: &[u8]) -> Vec<Found> {
    data.split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.trim_ascii().is_empty())
        .map(|(i, line)| Found {
            origin: format!("stdin: line {}", i + 1),
            body: line.trim_ascii().to_vec(),
        })
        .collect()
}

/// Fails when a file cannot be read, the broker cannot be reached, a publish is not
/// confirmed, or any job was invalid (after publishing the valid ones).
pub async fn enqueue(args: EnqueueArgs) -> Result<(), Fatal> {
    init_tls();
    let mut found = Vec::new();
    let mut problems = Vec::new();
    if args.files.is_empty() {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .map_err(|e| Fatal::Other(format!("cannot read standard input: {e}")))?;
        found = split_lines(&data);
    } else {
        for file in &args.files {
            let data = std::fs::read(file)
                .map_err(|e| Fatal::Other(format!("{}: {e}", file.display())))?;
            let (jobs, problem) = split_file(&display(file), &data);
            found.extend(jobs);
            problems.extend(problem);
        }
    }
    let mut valid = Vec::new();
    for job in found {
        match AlertJob::parse(&job.body) {
            Ok(parsed) => valid.push((parsed.notification_uuid, job.body)),
            Err(error) => problems.push(format!("{}: {error}", job.origin)),
        }
    }
    for problem in &problems {
        eprintln!("invalid: {problem}");
    }
    let topology = Topology::new(&args.broker);
    if !valid.is_empty() {
        let connection = amqp::connect(&args.broker.amqp_url, "opsgenie-worker enqueue")
            .await
            .map_err(|e| unreachable_broker(&args.broker.amqp_url, &e))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Fatal::Other(e.to_string()))?;
        // Declared here too, so that a job published before any worker ever ran is kept.
        topology
            .declare(&channel)
            .await
            .map_err(|e| Fatal::Other(format!("cannot declare the queues: {e}")))?;
        let publisher = Publisher::new(&connection)
            .await
            .map_err(|e| Fatal::Other(e.to_string()))?;
        let publishes = valid.iter().map(|(uuid, body)| {
            publisher.publish(
                &topology.exchange,
                &topology.routing_key,
                body,
                job_properties(uuid),
            )
        });
        let results = futures_util::future::join_all(publishes).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        let _ = connection.close(200, "done".into()).await;
        if let Some(Err(error)) = results.into_iter().find(Result::is_err) {
            return Err(Fatal::Other(format!(
                "{failed} of {} jobs were not confirmed by the broker: {error}",
                valid.len()
            )));
        }
    }
    println!(
        "Published {} job{} to exchange \"{}\" with routing key \"{}\"; {} invalid.",
        valid.len(),
        if valid.len() == 1 { "" } else { "s" },
        topology.exchange,
        topology.routing_key,
        problems.len()
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Fatal::Other(format!(
            "{} invalid job{} not published",
            problems.len(),
            if problems.len() == 1 {
                " was"
            } else {
                "s were"
            }
        )))
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// lapin quotes a URL it cannot parse in its error: that goes through `redact_error` too.
pub(crate) fn unreachable_broker(url: &str, error: &lapin::Error) -> Fatal {
    Fatal::Other(format!(
        "cannot reach RabbitMQ at {}: {}",
        redact_url(url),
        redact_error(&error.to_string(), url)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_holds_one_pretty_job_or_json_lines() {
        let (jobs, problem) = split_file("a.json", b"{\n \"a\": 1\n}\n");
        assert_eq!(problem, None);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].body, b"{\n \"a\": 1\n}");
        let (jobs, problem) = split_file("b.jsonl", b"{\"a\":1}\n{\"a\":2}\n[1]\n");
        assert_eq!(problem, None);
        assert_eq!(
            jobs.iter().map(|j| j.origin.as_str()).collect::<Vec<_>>(),
            ["b.jsonl: job 1", "b.jsonl: job 2", "b.jsonl: job 3"]
        );
        let (jobs, problem) = split_file("c.json", b"{\"a\":1}\n{oops");
        assert_eq!(jobs.len(), 1);
        assert!(problem.unwrap().starts_with("c.json: not JSON"));
    }

    #[test]
    fn standard_input_is_one_job_per_line() {
        let jobs = split_lines(b"{\"a\":1}\n\n  \nnot json\n");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].origin, "stdin: line 4");
        assert_eq!(jobs[1].body, b"not json");
    }
}
