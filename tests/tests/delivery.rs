//! The delivery pipeline end to end: a job on RabbitMQ becomes exactly the Opsgenie request of
//! SPEC section 5, one stream entry, one log line, and an empty queue.

use std::time::Duration;

use opsgenie_e2e::*;
use serde_json::{Value, json};

fn issue_job(uuid: &str, team: &str) -> Value {
    json!({"version":1,"kind":"issue_alert","notification_uuid":uuid,
     "team_id":team,"priority":"P2",
     "organization":{"id":1,"slug":"acme","url":"https://acme.sentry.io"},
     "project":{"id":7,"slug":"api","name":"API"},
     "group":{"id":1234,"title":"ZeroDivisionError: division by zero","culprit":"app.views.divide","logger":"","level":"error"},
     "event":{"event_id":"9fe1b6f0","message":"","title":"ZeroDivisionError: division by zero","release":"api@1.4.2",
              "tags":[["level","error"],["environment","prod"]]},
     "rules":[{"id":17,"label":"Errors in prod"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_alert_becomes_the_spec_request_and_one_stream_entry() {
    let env = TestEnv::new("issue").await;
    let standin = StandIn::start(StandInConfig {
        keys: vec!["key-a".into()],
        ..StandInConfig::default()
    })
    .await
    .unwrap();
    let keyring = env.write_keyring(&[TeamSpec {
        id: "backend",
        key: "key-a",
        api_url: &standin.base_url(),
    }]);
    let mut worker = env.spawn_worker(&keyring, &[]);
    let uuid = uuid::Uuid::new_v4().to_string();
    env.publish(issue_job(&uuid, "backend").to_string().as_bytes())
        .await;
    assert!(
        standin.wait_for_delivered(1, Duration::from_secs(20)).await,
        "{}",
        worker.raw_log()
    );
    let requests = standin.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.path, "/v2/alerts");
    assert_eq!(r.query, None);
    assert_eq!(r.authorization.as_deref(), Some("GenieKey key-a"));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert!(
        r.user_agent
            .as_deref()
            .unwrap_or("")
            .starts_with("opsgenie-worker/")
    );
    let expected = json!({
        "message": "ZeroDivisionError: division by zero",
        "alias": "sentry: 1234",
        "entity": "app.views.divide",
        "source": "Sentry",
        "priority": "P2",
        "tags": ["level:error", "environment:prod"],
        "details": {
            "Sentry ID": "1234",
            "Sentry Group": "ZeroDivisionError: division by zero",
            "Project ID": "api",
            "Project Name": "API",
            "Logger": "",
            "Level": "error",
            "Issue URL": format!("https://acme.sentry.io/organizations/acme/issues/1234/?referrer=opsgenie&notification_uuid={uuid}"),
            "Triggering Rules": "Errors in prod",
            "Triggering Rule URLs": "https://acme.sentry.io/organizations/acme/alerts/rules/api/17/details/",
            "Release": "api@1.4.2"
        }
    });
    assert_eq!(r.json.as_ref(), Some(&expected));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            env.stream().await.len() == 1
        })
        .await,
        "no stream entry"
    );
    let entry = &env.stream().await[0];
    for (field, value) in [
        ("notification_uuid", uuid.as_str()),
        ("kind", "issue_alert"),
        ("action", "create"),
        ("team_id", "backend"),
        ("alias", "sentry: 1234"),
        ("organization_id", "1"),
        ("project_slug", "api"),
        ("group_id", "1234"),
        ("rule_ids", "17"),
        ("status", "202"),
        ("request_id", r.request_id.as_str()),
        ("attempts", "1"),
    ] {
        assert_eq!(
            entry.get(field).map(String::as_str),
            Some(value),
            "field {field}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            worker.job_lines().len() == 1
        })
        .await
    );
    let line = &worker.job_lines()[0];
    assert_eq!(line["outcome"], "delivered");
    assert_eq!(line["notification_uuid"], uuid.as_str());
    assert_eq!(line["status"], 202);
    assert_eq!(env.queue_len(&env.queue).await, 0);
    let status = worker.terminate(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        !worker.raw_log().contains("key-a"),
        "the key appears in the log"
    );
    env.cleanup().await;
}
