//! The stand-in's transport: TLS with HTTP/2 or HTTP/1.1 by ALPN, connection accounting, and
//! the connection-level faults (idle drop without close_notify, hang-up after reading).

use std::sync::Arc;
use std::time::Duration;

use opsgenie_standin::{Fault, LocalPki, StandIn, StandInConfig};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn start(config: StandInConfig) -> StandIn {
    StandIn::start(config).await.expect("stand-in starts")
}

/// A client that trusts only `ca_pem`, and never a proxy of the machine's.
fn tls_client(ca_pem: &str, http1_only: bool) -> reqwest::Client {
    provider();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM");
    let builder = reqwest::Client::builder().tls_certs_only([ca]).no_proxy();
    let builder = if http1_only {
        builder.http1_only()
    } else {
        builder
    };
    builder.build().expect("client")
}

async fn create(client: &reqwest::Client, standin: &StandIn, i: usize) -> u16 {
    post(client, &standin.base_url(), i).await
}

async fn post(client: &reqwest::Client, base_url: &str, i: usize) -> u16 {
    client
        .post(format!("{base_url}/v2/alerts"))
        .header("Authorization", "GenieKey k")
        .header("Content-Type", "application/json")
        .body(json!({"message": format!("m{i}")}).to_string())
        .send()
        .await
        .expect("request sent")
        .status()
        .as_u16()
}

fn raw_create() -> Vec<u8> {
    let body = r#"{"message":"m"}"#;
    format!(
        "POST /v2/alerts HTTP/1.1\r\nHost: localhost\r\nAuthorization: GenieKey k\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn tls_negotiates_http2_and_multiplexes_on_one_connection() {
    let pki = LocalPki::generate().expect("pki");
    let standin = start(StandInConfig {
        tls: Some(pki.server.clone()),
        ..StandInConfig::default()
    })
    .await;
    assert!(standin.base_url().starts_with("https://127.0.0.1:"));
    let client = tls_client(&pki.ca_pem, false);
    // One request first, so the connection exists before the concurrent ones look for it.
    assert_eq!(create(&client, &standin, 0).await, 202);
    let mut sends = tokio::task::JoinSet::new();
    for i in 1..20 {
        let (client, url) = (client.clone(), standin.base_url());
        sends.spawn(async move { post(&client, &url, i).await });
    }
    let statuses = sends.join_all().await;
    assert!(statuses.iter().all(|&s| s == 202), "{statuses:?}");

    let requests = standin.requests();
    assert_eq!(requests.len(), 20);
    assert!(requests.iter().all(|r| r.http_version == "HTTP/2.0"));
    assert!(requests.iter().all(|r| r.connection_id == 1));
    assert_eq!(standin.stats().connections, 1);

    // The same server speaks HTTP/1.1 to a client that offers only that.
    let http1 = tls_client(&pki.ca_pem, true);
    assert_eq!(create(&http1, &standin, 20).await, 202);
    let last = standin.requests().pop().expect("recorded");
    assert_eq!(last.http_version, "HTTP/1.1");
    assert_eq!(last.connection_id, 2);
    assert_eq!(standin.stats().connections, 2);
    standin.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn plain_http_records_http1_and_counts_connections() {
    let standin = start(StandInConfig::default()).await;
    provider();
    let client = plain_client();
    for i in 0..3 {
        assert_eq!(create(&client, &standin, i).await, 202);
    }
    let requests = standin.requests();
    assert!(requests.iter().all(|r| r.http_version == "HTTP/1.1"));
    // Sequential requests reuse the kept-alive connection.
    assert!(
        requests.iter().all(|r| r.connection_id == 1),
        "{requests:?}"
    );
    assert_eq!(standin.stats().connections, 1);
    assert_eq!(standin.stats().closed_connections, 0);
}

#[tokio::test]
async fn an_idle_tls_connection_is_dropped_without_close_notify() {
    provider();
    let pki = LocalPki::generate().expect("pki");
    let standin = start(StandInConfig {
        tls: Some(pki.server.clone()),
        idle_drop: Some(Duration::from_millis(200)),
        ..StandInConfig::default()
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA PEM");
    roots.add(ca).expect("CA accepted");
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(standin.addr()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    tls.write_all(&raw_create()).await.expect("request written");

    // The answer comes, then, with nothing in flight, the connection goes: a read ends in an
    // error because no close_notify came before the TCP close.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut answer))
        .await
        .expect("the connection was dropped in time");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");
    let error = read.expect_err("an unclean close");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");
    assert!(
        standin
            .wait_until(DEADLINE, |s| s.stats().closed_connections == 1)
            .await
    );
    let stats = standin.stats();
    assert_eq!((stats.idle_drops, stats.received), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn a_busy_connection_is_not_dropped_as_idle() {
    let standin = start(StandInConfig {
        idle_drop: Some(Duration::from_millis(150)),
        ..StandInConfig::default()
    })
    .await;
    // Each answer takes longer than the idle limit: in flight is not idle.
    standin
        .push_faults(vec![Fault::new(202).delay(Duration::from_millis(400))])
        .expect("fault");
    let mut tcp = TcpStream::connect(standin.addr()).await.expect("connect");
    tcp.write_all(&raw_create()).await.expect("request written");
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(DEADLINE, tcp.read(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 202"));
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut rest))
        .await
        .expect("then dropped as idle")
        .expect("a plain close");
    assert_eq!(standin.stats().idle_drops, 1);
}

#[tokio::test]
async fn a_hang_up_reads_the_request_and_closes_without_answering() {
    let standin = start(StandInConfig::default()).await;
    standin.push_faults(vec![Fault::hang_up()]).expect("fault");
    assert!(
        standin
            .push_faults(vec![Fault::hang_up().times(0)])
            .is_err()
    );

    let mut tcp = TcpStream::connect(standin.addr()).await.expect("connect");
    tcp.write_all(&raw_create()).await.expect("request written");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    // A close (or a reset) with not one byte of answer.
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    drop(read);
    let stats = standin.stats();
    assert_eq!(
        (stats.received, stats.hang_ups, stats.delivered),
        (1, 1, 0),
        "{stats:?}"
    );
    let recorded = standin.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].status, 0);
    assert_eq!(recorded[0].json, Some(json!({"message": "m"})));

    // The script is spent: the next request is answered.
    provider();
    let client = plain_client();
    assert_eq!(create(&client, &standin, 1).await, 202);
    assert!(
        standin
            .wait_until(DEADLINE, |s| s.stats().closed_connections >= 1)
            .await
    );
}

#[tokio::test]
async fn a_hang_up_can_be_scripted_over_the_admin_api() {
    let standin = start(StandInConfig::default()).await;
    provider();
    let client = plain_client();
    let pushed = client
        .post(format!("{}/_standin/faults", standin.base_url()))
        .header("Content-Type", "application/json")
        .body(r#"[{"hang_up": true}]"#)
        .send()
        .await
        .expect("faults pushed");
    assert_eq!(pushed.status(), 204);
    assert_eq!(standin.stats().pending_faults, 1);
    let sent = client
        .post(format!("{}/v2/alerts", standin.base_url()))
        .header("Authorization", "GenieKey k")
        .body(r#"{"message":"m"}"#)
        .send()
        .await;
    assert!(sent.is_err(), "answered: {sent:?}");
    assert_eq!(standin.stats().hang_ups, 1);
}

/// A client for the stand-in over plain http, whatever proxy the environment names.
fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}
