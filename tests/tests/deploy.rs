//! The dashboard and the alerting rules of `deploy/` against what a running worker exposes: every
//! `opsgenie_*` metric they name must be in its `/metrics`, so that a renamed metric fails here
//! instead of leaving a blank panel or an alert that can never fire.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;

/// `deploy/` of the repository.
fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .join("deploy")
}

/// Every string of a parsed document, however deep.
fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// The `opsgenie_*` names in `text`: each maximal run of `[a-z0-9_]` that starts with the
/// prefix at a word boundary (so `xopsgenie_a` or `opsgenie-worker` are not names).
fn metric_names(text: &str, out: &mut BTreeSet<String>) {
    let is_name_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_';
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("opsgenie_").map(|i| i + from) {
        let end = bytes[at..]
            .iter()
            .position(|&c| !is_name_char(c))
            .map_or(bytes.len(), |n| at + n);
        if at == 0 || (!is_name_char(bytes[at - 1]) && !bytes[at - 1].is_ascii_uppercase()) {
            out.insert(text[at..end].to_string());
        }
        from = end;
    }
}

/// The metric names the dashboard and the rule files use, with the file each came from.
fn names_used() -> Vec<(String, BTreeSet<String>)> {
    let dir = deploy_dir();
    let mut documents = Vec::new();
    let dashboard = dir.join("grafana/opsgenie-worker.json");
    let text = std::fs::read_to_string(&dashboard).expect("the dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    documents.push((dashboard, parsed));
    let rules_dir = dir.join("prometheus");
    let mut rule_files: Vec<PathBuf> = std::fs::read_dir(&rules_dir)
        .expect("deploy/prometheus")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".rules.yml"))
        .collect();
    rule_files.sort();
    assert!(!rule_files.is_empty(), "no *.rules.yml in {rules_dir:?}");
    for path in rule_files {
        let text = std::fs::read_to_string(&path).expect("a rule file");
        let parsed: serde_json::Value =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path:?} is not YAML: {e}"));
        assert!(
            parsed["groups"].as_array().is_some_and(|g| !g.is_empty()),
            "{path:?} has no rule group"
        );
        documents.push((path, parsed));
    }
    documents
        .into_iter()
        .map(|(path, parsed)| {
            let mut texts = Vec::new();
            strings(&parsed, &mut texts);
            let mut names = BTreeSet::new();
            texts.iter().for_each(|t| metric_names(t, &mut names));
            (path.display().to_string(), names)
        })
        .collect()
}

/// The names of `used` that `scrape` does not expose. A name counts as exposed when the scrape
/// has its `# TYPE` line, or, for `_bucket`, `_sum` and `_count`, the `# TYPE` line of the
/// histogram they belong to.
fn missing(used: &BTreeSet<String>, scrape: &str) -> Vec<String> {
    let typed = |name: &str, kind: Option<&str>| {
        scrape.lines().any(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some("#")
                && words.next() == Some("TYPE")
                && words.next() == Some(name)
                && kind.is_none_or(|k| words.next() == Some(k))
        })
    };
    used.iter()
        .filter(|name| {
            let histogram_part = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix));
            !typed(name, None) && !histogram_part.is_some_and(|base| typed(base, Some("histogram")))
        })
        .cloned()
        .collect()
}

#[test]
fn names_are_read_from_expressions_and_checked_against_type_lines() {
    let mut names = BTreeSet::new();
    metric_names(
        r#"sum(rate(opsgenie_jobs_total{outcome="x"}[5m])) / opsgenie_ready, opsgenie-worker, xopsgenie_no, Xopsgenie_no, histogram_quantile(0.5, opsgenie_delivery_duration_seconds_bucket)"#,
        &mut names,
    );
    let expected: BTreeSet<String> = [
        "opsgenie_jobs_total",
        "opsgenie_ready",
        "opsgenie_delivery_duration_seconds_bucket",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, expected);
    let scrape = "# TYPE opsgenie_jobs_total counter\n# TYPE opsgenie_delivery_duration_seconds histogram\nopsgenie_ready 1\n";
    assert_eq!(missing(&names, scrape), vec!["opsgenie_ready".to_string()]);
    let summary = "# TYPE opsgenie_delivery_duration_seconds summary\n";
    let bucket: BTreeSet<String> = ["opsgenie_delivery_duration_seconds_bucket".to_string()].into();
    assert_eq!(
        missing(&bucket, summary).len(),
        1,
        "a summary has no buckets"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exposed_by_a_running_worker() {
    let used = names_used();
    let all: BTreeSet<String> = used.iter().flat_map(|(_, n)| n.iter().cloned()).collect();
    // What the dashboard and the alerts are about: an extraction that found none of them would
    // make the check below pass on nothing.
    for name in [
        "opsgenie_jobs_total",
        "opsgenie_delivery_duration_seconds_bucket",
        "opsgenie_responses_total",
        "opsgenie_ready",
        "opsgenie_queue_messages",
        "opsgenie_confirmations_total",
        "opsgenie_heartbeat_pings_total",
        "opsgenie_jobs_waiting_cooldown",
    ] {
        assert!(all.contains(name), "{name} is used by none of {used:?}");
    }
    for (file, names) in &used {
        assert!(!names.is_empty(), "{file} names no opsgenie_* metric");
    }

    let env = TestEnv::new("deploy-metrics").await;
    let standin = env.standin().serving("backend", "deploy-key-51c2").await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();
    env.publish_job(&issue_job(&new_uuid(), "backend", 7)).await;
    assert!(
        standin.wait_for_delivered(1, Duration::from_secs(30)).await,
        "the job was not delivered: {}",
        worker.log_tail(20)
    );
    // The delivery is counted and the queue sampled (at once on connecting, then every 15 s).
    let queue_series = format!(r#"opsgenie_queue_messages{{queue="{}"}}"#, env.queue);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (complete, scrape) = loop {
        let scrape = match http_get(port, "/metrics").await {
            Some((200, body)) => body,
            _ => String::new(),
        };
        let complete = scrape.contains(r#"opsgenie_jobs_total{outcome="delivered",reason=""} 1"#)
            && scrape.contains(queue_series.as_str())
            && missing(&all, &scrape).is_empty();
        if complete || tokio::time::Instant::now() > deadline {
            break (complete, scrape);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (file, names) in &used {
        let absent = missing(names, &scrape);
        assert!(
            absent.is_empty(),
            "{file} uses metrics the worker does not expose: {absent:?}\n/metrics:\n{scrape}"
        );
    }
    assert!(complete, "/metrics never showed the delivery:\n{scrape}");
    assert!(scrape.contains("opsgenie_ready 1"), "{scrape}");
    assert!(!scrape.contains("deploy-key-51c2"));
    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
}
