use std::time::Duration;

use opsgenie_standin::{AliasStatus, Fault, StandIn, StandInConfig};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(10);

async fn standin(keys: &[&str], record_bodies: bool) -> StandIn {
    StandIn::start(StandInConfig {
        keys: keys.iter().map(|k| k.to_string()).collect(),
        record_bodies,
        ..StandInConfig::default()
    })
    .await
    .expect("stand-in starts")
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    json: Value,
}

async fn post(client: &reqwest::Client, url: String, key: &str, body: &str) -> Answer {
    let response = client
        .post(url)
        .header("Authorization", format!("GenieKey {key}"))
        .header("Content-Type", "application/json")
        .header("User-Agent", "opsgenie-worker/test")
        .body(body.to_owned())
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body read");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
    }
}

async fn create(client: &reqwest::Client, standin: &StandIn, key: &str, body: Value) -> Answer {
    let url = format!("{}/v2/alerts", standin.base_url());
    post(client, url, key, &body.to_string()).await
}

fn request_id(answer: &Answer) -> &str {
    answer.json["requestId"].as_str().expect("a requestId")
}

#[tokio::test]
async fn accepts_a_valid_create_and_records_it() {
    let standin = standin(&["k1"], true).await;
    let client = client();
    let body = json!({"message": "Disk full", "alias": "sentry: 1", "priority": "P2"});
    let answer = create(&client, &standin, "k1", body.clone()).await;

    assert_eq!(answer.status, 202);
    assert_eq!(answer.json["result"], "Request will be processed");
    let id = request_id(&answer);
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let recorded = standin.requests();
    assert_eq!(recorded.len(), 1);
    let r = &recorded[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v2/alerts"));
    assert_eq!(r.authorization.as_deref(), Some("GenieKey k1"));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(r.user_agent.as_deref(), Some("opsgenie-worker/test"));
    assert_eq!(r.json.as_ref(), Some(&body));
    assert_eq!((r.status, r.request_id.as_str()), (202, id));
    assert!(r.received_at_ms > 1_600_000_000_000);
    assert_eq!(standin.delivered(), 1);
}

#[tokio::test]
async fn refuses_wrong_keys_and_bad_bodies() {
    let standin = standin(&["k1"], true).await;
    let client = client();
    let valid = json!({"message": "m"});

    let wrong = create(&client, &standin, "k2", valid.clone()).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json["message"], "Could not authenticate");
    assert!(wrong.json["requestId"].is_string());
    let empty_key = create(&client, &standin, "", valid).await;
    assert_eq!(empty_key.status, 401);

    let long = create(&client, &standin, "k1", json!({"message": "x".repeat(131)})).await;
    assert_eq!(long.status, 422);
    assert!(
        long.json["message"]
            .as_str()
            .is_some_and(|m| m.contains("message"))
    );
    let tags = create(
        &client,
        &standin,
        "k1",
        json!({"message": "m", "tags": vec!["t"; 21]}),
    )
    .await;
    assert_eq!(tags.status, 422);
    assert!(
        tags.json["message"]
            .as_str()
            .is_some_and(|m| m.contains("tags"))
    );

    let url = format!("{}/v2/alerts", standin.base_url());
    assert_eq!(post(&client, url, "k1", "{not json").await.status, 400);

    assert_eq!(standin.delivered(), 0);
    let statuses: Vec<u16> = standin.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 401, 422, 422, 400]);
}

#[tokio::test]
async fn tracks_alias_state_and_keeps_the_raw_close_path() {
    let standin = standin(&[], true).await;
    let client = client();
    let alias = "incident 7";
    let closing = format!(
        "{}/v2/alerts/incident%207/close?identifierType=alias",
        standin.base_url()
    );

    let stray = post(&client, closing.clone(), "any", r#"{"source":"Sentry"}"#).await;
    assert_eq!(stray.status, 202);
    assert_eq!(standin.alerts()[alias].stray_closes, 1);

    assert_eq!(
        create(
            &client,
            &standin,
            "any",
            json!({"message": "m", "alias": alias})
        )
        .await
        .status,
        202
    );
    assert_eq!(standin.alerts()[alias].status, AliasStatus::Open);

    let close = post(&client, closing, "any", r#"{"source":"Sentry"}"#).await;
    assert_eq!(close.status, 202);
    assert!(close.json["requestId"].is_string());
    let state = &standin.alerts()[alias];
    assert_eq!(state.status, AliasStatus::Closed);
    assert_eq!((state.creates, state.closes, state.stray_closes), (1, 2, 1));

    let recorded = standin.requests();
    let last = recorded.last().expect("close recorded");
    assert_eq!(last.path, "/v2/alerts/incident%207/close");
    assert_eq!(last.query.as_deref(), Some("identifierType=alias"));
    assert_eq!(last.json, Some(json!({"source": "Sentry"})));
}

#[tokio::test]
async fn serves_the_fault_script_in_order() {
    let standin = standin(&[], true).await;
    let client = client();
    standin
        .push_faults(vec![
            Fault::new(503).times(2),
            Fault::new(429).header("Retry-After", "7"),
        ])
        .expect("valid faults");
    assert!(standin.push_faults(vec![Fault::new(42)]).is_err());

    let mut statuses = Vec::new();
    for _ in 0..4 {
        let answer = create(&client, &standin, "k", json!({"message": "m"})).await;
        if answer.status == 429 {
            assert_eq!(answer.headers["retry-after"], "7");
        }
        statuses.push(answer.status);
    }
    assert_eq!(statuses, [503, 503, 429, 202]);
    assert_eq!(standin.delivered(), 1);
    assert_eq!(standin.stats().by_status[&503], 2);
}

#[tokio::test]
async fn admin_endpoints_script_and_report() {
    let standin = standin(&[], false).await;
    let client = client();
    let admin = |path: &str| format!("{}/_standin/{path}", standin.base_url());

    let pushed = client
        .post(admin("faults"))
        .header("Content-Type", "application/json")
        .body(r#"[{"status": 500, "delay_ms": 1}]"#)
        .send()
        .await
        .expect("faults pushed");
    assert_eq!(pushed.status(), 204);
    assert_eq!(
        create(&client, &standin, "k", json!({"message": "m"}))
            .await
            .status,
        500
    );
    assert_eq!(
        create(
            &client,
            &standin,
            "k",
            json!({"message": "m", "alias": "a"})
        )
        .await
        .status,
        202
    );

    let get = |path| {
        let request = client.get(admin(path)).send();
        async move {
            let bytes = request
                .await
                .expect("admin answers")
                .bytes()
                .await
                .expect("body");
            serde_json::from_slice::<Value>(&bytes).expect("JSON")
        }
    };
    let stats = get("stats").await;
    assert_eq!(stats["delivered"], 1);
    assert_eq!(stats["by_status"], json!({"202": 1, "500": 1}));
    assert_eq!(stats["open_aliases"], 1);
    assert_eq!(get("alerts").await["a"]["status"], "open");
    // Bodies are off, so nothing is kept per request.
    assert_eq!(get("requests").await, json!([]));
    let cleared = client
        .delete(admin("requests"))
        .send()
        .await
        .expect("cleared");
    assert_eq!(cleared.status(), 204);
}

#[tokio::test]
async fn wait_for_delivered_returns_once_the_count_is_reached() {
    let standin = standin(&[], true).await;
    let client = client();
    let url = format!("{}/v2/alerts", standin.base_url());
    let sender = tokio::spawn(async move {
        for i in 0..5 {
            post(
                &client,
                url.clone(),
                "k",
                &json!({"message": format!("m{i}")}).to_string(),
            )
            .await;
        }
    });
    assert!(standin.wait_for_delivered(5, DEADLINE).await);
    assert_eq!(standin.delivered(), 5);
    sender.await.expect("sender finished");
    assert!(
        !standin
            .wait_for_delivered(6, Duration::from_millis(20))
            .await
    );
    standin.shutdown().await.expect("clean shutdown");
}
