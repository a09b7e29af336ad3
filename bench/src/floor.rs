//! The HTTP floor: what the worker's HTTP client alone costs per job, with nothing else the
//! worker does (no broker, no Redis, no logs, no metrics, no parsing of jobs).
//!
//! A child process (this binary again, with `--http-floor-child`) builds the worker's own
//! reqwest client (`opsgenie_worker::opsgenie::build_client`), builds every job's create
//! request before it starts counting, and then, on one current-thread runtime as the worker
//! runs, sends them `CONCURRENCY` at a time to the stand-in: the create, and with
//! `--floor-status` the request-status read that a confirmation costs. It prints the CPU it
//! spent sending, read from /proc, and the parent turns it into milliseconds per 1,000 jobs.
//! The worker cannot spend less than this per job and still send through reqwest.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};

/// Requests in flight at once: the worker's default prefetch.
const CONCURRENCY: usize = 64;

/// The figures of one floor run, milliseconds of CPU per 1,000 jobs.
pub struct Floor {
    pub create_only: f64,
    pub create_and_status: f64,
}

/// Runs the child twice (create only, then create and status read) against the stand-in at
/// `base_url` and reads back what each spent.
pub fn measure(bench: &Path, base_url: &str, jobs: usize) -> Result<Floor> {
    let run = |status: bool| -> Result<f64> {
        let mut command = Command::new(bench);
        // The environment is the workers': a proxy they would go through, it goes through too.
        command.args(["--http-floor-child", base_url, "--jobs", &jobs.to_string()]);
        if status {
            command.arg("--floor-status");
        }
        let output = command.output().context("starting the HTTP floor")?;
        if !output.status.success() {
            bail!(
                "the HTTP floor failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let seconds: f64 = text
            .trim()
            .parse()
            .with_context(|| format!("the HTTP floor printed {text:?}"))?;
        Ok(crate::per_1000(seconds, jobs))
    };
    Ok(Floor {
        create_only: run(false)?,
        create_and_status: run(true)?,
    })
}

/// The child: sends `jobs` creates (and status reads with `status`) to `base_url` and prints
/// the CPU seconds this process spent doing so.
pub fn child(base_url: &str, jobs: usize, status: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seconds = runtime.block_on(send_all(base_url, jobs, status))?;
    println!("{seconds}");
    Ok(())
}

async fn send_all(base_url: &str, jobs: usize, status: bool) -> Result<f64> {
    let client = opsgenie_worker::opsgenie::build_client(
        Duration::from_secs(5),
        Duration::from_secs(30),
        &[],
    )?;
    let base = reqwest::Url::parse(base_url)?;
    let authorization = HeaderValue::from_static("GenieKey bench-key");
    let requests = crate::realistic_jobs(jobs, 11)
        .iter()
        .map(|body| {
            let job = opsgenie_shared::AlertJob::parse(body)?;
            let request = opsgenie_shared::build_request(&job);
            Ok((base.join(&request.path)?, bytes::Bytes::from(request.body)))
        })
        .collect::<Result<Vec<_>>>()?;
    let status_base = base.join("/v2/alerts/requests/")?;
    let before = crate::cpu_seconds(std::process::id());
    futures_util::stream::iter(requests)
        .map(|(url, body)| {
            let (client, authorization, status_base) = (&client, &authorization, &status_base);
            async move {
                let answer = client
                    .post(url)
                    .header(AUTHORIZATION, authorization.clone())
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .body(body)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                if status {
                    let accepted: Accepted<'_> = serde_json::from_slice(&answer)?;
                    client
                        .get(status_base.join(accepted.request_id)?)
                        .header(AUTHORIZATION, authorization.clone())
                        .send()
                        .await?
                        // A request asked about this soon may not be processed yet (404):
                        // either answer is read whole, as the worker reads it.
                        .bytes()
                        .await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(crate::cpu_seconds(std::process::id()) - before)
}

#[derive(serde::Deserialize)]
struct Accepted<'a> {
    #[serde(rename = "requestId", borrow)]
    request_id: &'a str,
}
