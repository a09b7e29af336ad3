//! Telemetry: logs (`logs`), Prometheus metrics (`metrics`, their names in `catalogue`), the
//! HTTP endpoints `/metrics`, `/healthz` and `/readyz` (`http`, answering from `health`), and
//! the periodic summary line (`summary`).

pub mod catalogue;
pub mod health;
mod http;
mod logs;
mod metrics;
mod summary;

pub use http::serve;
pub use logs::{LogGuard, init_logs};
pub use metrics::init_metrics;
pub use summary::{JobCounts, spawn_summary};

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::EnvFilter;

    use super::logs::json_subscriber;

    /// The lines written by the JSON subscriber while `emit` runs, parsed back.
    fn json_lines_of(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = json_subscriber(EnvFilter::new("info"), move || out.clone());
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect()
    }

    #[test]
    fn a_json_line_has_the_fields_at_the_top_and_the_span_beside_them() {
        let lines = json_lines_of(|| {
            let error = std::io::Error::other("broken \"pipe\"\n");
            let job = tracing::info_span!("job", notification_uuid = "u-1", team_id = "ops");
            let _entered = job.enter();
            tracing::info!(
                outcome = "delivered",
                status = Some(202u16),
                missing = None::<u16>,
                latency_ms = 3u64,
                delta = -2i64,
                ok = true,
                error = %error,
                "Job finished."
            );
            tracing::debug!("Not at the default level.");
            drop(_entered);
            tracing::warn!(reason = "odd", "Odd {}.", 7);
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        let first = &lines[0];
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "Job finished.");
        assert_eq!(first["outcome"], "delivered");
        assert_eq!(first["status"], 202);
        assert!(first.get("missing").is_none());
        assert_eq!(first["latency_ms"], 3);
        assert_eq!(first["delta"], -2);
        assert_eq!(first["ok"], true);
        assert_eq!(first["error"], "broken \"pipe\"\n");
        assert_eq!(first["target"], "opsgenie_worker::telemetry::tests");
        assert_eq!(first["span"]["name"], "job");
        assert_eq!(first["span"]["notification_uuid"], "u-1");
        assert_eq!(first["span"]["team_id"], "ops");
        let stamp = first["timestamp"].as_str().unwrap();
        assert_eq!((stamp.len(), &stamp[10..11], &stamp[26..]), (27, "T", "Z"));
        let second = &lines[1];
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["message"], "Odd 7.");
        assert_eq!(second["reason"], "odd");
        assert!(second.get("span").is_none());
    }
}
