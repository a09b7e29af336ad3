//! Prometheus: the recorder every `metrics::` call site records into, and the exporter's
//! settings. The names are in `catalogue`.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How often the samples recorded into a histogram are folded into its buckets.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the Prometheus recorder (once per process) and returns its handle.
///
/// The recorder keeps every sample of a histogram (two per job) in a list of its own until
/// something folds them into the buckets: a scrape of `/metrics`, or an upkeep. Nothing else
/// bounds that list: without an upkeep, a worker nobody scrapes would grow with every job. A
/// thread of its own does the upkeep every `METRICS_UPKEEP_INTERVAL`, whether or not anyone
/// scrapes, and whatever the job runtime is doing.
pub fn init_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = prometheus_builder()?.install_recorder().ok()?;
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(METRICS_UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                        // The folded samples' blocks are freed through crossbeam's epochs:
                        // hand them over and let the epoch move on (a step per flush), so
                        // that they are freed now rather than whenever enough of them have
                        // gathered on this thread, or jobs come again.
                        for _ in 0..3 {
                            crossbeam_epoch::pin().flush();
                        }
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(error = %error, "Cannot start the metrics upkeep; histogram samples are folded only when /metrics is scraped.");
            }
            Some(handle)
        })
        .clone()
}

/// The exporter's settings: histogram buckets (without them a histogram is rendered as a
/// summary, which cannot be aggregated across replicas).
pub(super) fn prometheus_builder() -> Option<PrometheusBuilder> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("duration_seconds".into()),
            &[
                0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )
        .ok()?
        // Opsgenie processes an alert within seconds, slower under load: up to minutes.
        .set_buckets_for_metric(
            Matcher::Full(crate::telemetry::catalogue::CONFIRMATION_LAG.into()),
            &[
                0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ],
        )
        .ok()
}
