//! The metrics and health endpoint under hostile clients: connections that stall in the
//! middle of a request head, heads and bodies too large, more connections than it serves.
//! None of them may silence /healthz, stop deliveries or run the process out of descriptors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use opsgenie_e2e::fixtures::*;
use opsgenie_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// The endpoint's cap on open connections (`MAX_CONNECTIONS` in the worker's telemetry).
const CONNECTION_CAP: usize = 64;
/// The endpoint's time to send a whole request head (`HEADER_READ_TIMEOUT`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a probe may take and still count as answered promptly.
const PROMPT: Duration = Duration::from_secs(2);
/// Half of a request head: a request line and a header, but never the blank line.
const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n";

/// Sends `request` and reads until the server closes; `None` when connecting or writing fails.
async fn exchange(port: u16, request: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(request).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    Some(String::from_utf8_lossy(&raw).into_owned())
}

/// The status of a GET on a connection of its own, or `None` when nothing answered within
/// `PROMPT` (the 2 s of `http_get`).
async fn probe(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).await.map(|(status, _)| status)
}

/// Opens `n` connections that each send half a request head and then say nothing more.
async fn stall(port: u16, n: usize) -> Vec<TcpStream> {
    let mut stalled = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the endpoint");
        // The server may already have closed it to make room; that is its right.
        let _ = stream.write_all(HALF_HEAD).await;
        stalled.push(stream);
    }
    stalled
}

/// The descriptors `pid` has open now.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_silence_neither_health_nor_deliveries() {
    let env = TestEnv::new("hostile-stall").await;
    let standin = env.standin().serving("backend", "hostile-key-1").await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();
    // The open-file limit of the report (512 there), below what the stalled connections
    // would take if each kept a descriptor.
    rlimit::prlimit(
        worker.pid() as i32,
        rlimit::Resource::NOFILE,
        Some((256, 256)),
        None,
    )
    .expect("lower the worker's open-file limit");

    let stalled = stall(port, 300).await;
    for _ in 0..5 {
        assert_eq!(
            probe(port, "/healthz").await,
            Some(200),
            "/healthz did not answer within {PROMPT:?} with 300 stalled connections open"
        );
    }
    let uuid = new_uuid();
    env.publish_job(&spec_issue_job(&uuid, "backend")).await;
    assert!(
        standin.wait_for_delivered(1, Duration::from_secs(20)).await,
        "the job was not delivered while the endpoint was under attack: {}",
        worker.raw_log()
    );
    assert_eq!(probe(port, "/healthz").await, Some(200));
    drop(stalled);

    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_after_the_header_time_out() {
    let env = TestEnv::new("hostile-timeout").await;
    let _standin = env.standin().serving("backend", "hostile-key-2").await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();

    let started = Instant::now();
    let mut half_head = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    half_head.write_all(HALF_HEAD).await.unwrap();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // A kept-alive connection after one answer: it must not stay open for ever either.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0_u8; 512];
    let n = timeout(PROMPT, idle.read(&mut answer))
        .await
        .expect("an answer on the kept-alive connection")
        .expect("read the answer");
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );

    let deadline = HEADER_READ_TIMEOUT + Duration::from_secs(5);
    for (name, stream) in [
        ("half a head", &mut half_head),
        ("nothing", &mut silent),
        ("nothing after an answer", &mut idle),
    ] {
        let mut rest = Vec::new();
        // EOF or a reset: either way the server let go of it.
        let closed = timeout(
            deadline.saturating_sub(started.elapsed()),
            stream.read_to_end(&mut rest),
        )
        .await;
        assert!(
            closed.is_ok(),
            "a connection that sent {name} was still open after {:?}",
            started.elapsed()
        );
        assert!(
            !String::from_utf8_lossy(&rest).contains("200 OK"),
            "a connection that sent {name} was answered: {}",
            String::from_utf8_lossy(&rest)
        );
    }
    // Closed by the time-out, not at once: a slow but honest client has seconds.
    assert!(
        started.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed after only {:?}",
        started.elapsed()
    );
    assert_eq!(probe(port, "/healthz").await, Some(200));

    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_bodies_are_refused_at_once() {
    let env = TestEnv::new("hostile-size").await;
    let _standin = env.standin().serving("backend", "hostile-key-3").await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();

    // 16 KiB of headers: well within what a default HTTP server reads, twice the cap.
    let mut head =
        String::from("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for i in 0..16 {
        head.push_str(&format!("X-Filler-{i}: {}\r\n", "a".repeat(1000)));
    }
    head.push_str("\r\n");
    let answer = timeout(PROMPT, exchange(port, head.as_bytes())).await;
    match answer {
        Err(_) => panic!("an oversized head hung the connection for {PROMPT:?}"),
        // Closed while the head was still being written: refused, not served.
        Ok(None) => {}
        Ok(Some(raw)) => assert!(
            raw.is_empty() || raw.starts_with("HTTP/1.1 431"),
            "an oversized head got: {raw}"
        ),
    }

    let body = timeout(
        PROMPT,
        exchange(
            port,
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 1000000\r\n\r\nxx",
        ),
    )
    .await
    .expect("a request with a large body was not answered at once");
    assert!(
        body.as_deref()
            .is_some_and(|b| b.starts_with("HTTP/1.1 413")),
        "a large body got: {body:?}"
    );
    assert_eq!(probe(port, "/healthz").await, Some(200));

    assert_eq!(
        worker.terminate(Duration::from_secs(30)).await.code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_the_cap_take_no_more_descriptors() {
    let env = TestEnv::new("hostile-fds").await;
    let _standin = env.standin().serving("backend", "hostile-key-4").await;
    let mut worker = env.worker().ready().await;
    let port = worker.metrics_port();
    let pid = worker.pid();
    let before = open_descriptors(pid);
    assert!(before > 0, "cannot read /proc/{pid}/fd");

    // Sample the worker's descriptors for as long as the flood lasts.
    let flooding = Arc::new(AtomicBool::new(true));
    let most = Arc::new(AtomicUsize::new(before));
    let sampler = tokio::spawn({
        let flooding = Arc::clone(&flooding);
        let most = Arc::clone(&most);
        async move {
            while flooding.load(Ordering::Relaxed) {
                most.fetch_max(open_descriptors(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let stalled = stall(port, 4 * CONNECTION_CAP).await;
    // The server accepts in order, so once a probe opened after the flood is answered,
    // every stalled connection has been through the accept loop.
    assert_eq!(probe(port, "/healthz").await, Some(200));
    most.fetch_max(open_descriptors(pid), Ordering::Relaxed);
    let now = open_descriptors(pid);
    flooding.store(false, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let most = most.load(Ordering::Relaxed);

    // The flood did reach the server: it holds about a cap's worth of connections now.
    assert!(
        now >= before + CONNECTION_CAP / 2,
        "{now} descriptors open, {before} before the flood: the flood did not arrive"
    );
    let margin = 8;
    assert!(
        most <= before + CONNECTION_CAP + margin,
        "{most} descriptors open at the worst, {before} before {} connections, cap {CONNECTION_CAP}",
        stalled.len()
    );

    // Stalled connections do not hold the shutdown either.
    assert_eq!(
        worker.terminate(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    drop(stalled);
}
