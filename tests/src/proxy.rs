//! An egress proxy for the transport tests: what a platform team puts between the worker and
//! the internet, so that a test can see whether the worker went through it.
//!
//! `CONNECT host:port` opens a tunnel (`HTTP/1.1 200 Connection established`, then bytes both
//! ways untouched, TLS included). A plain-HTTP request in absolute form (`GET http://host/...`)
//! is forwarded to its host in origin form; whatever else the client sends on that connection
//! is relayed to the same host as it is. Request heads are read with httparse.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Larger than any request head a worker sends; a client that sends more is refused.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A running proxy; stops accepting and ends every tunnel when dropped.
pub struct ConnectProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    tunnels: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    /// `host:port` of every tunnel or forward asked for, in order, reached or not.
    targets: Mutex<Vec<String>>,
}

/// Ends every relayed connection when the proxy is dropped (the value changes).
type Stop = watch::Receiver<()>;

impl ConnectProxy {
    /// Listens on 127.0.0.1 at a free port.
    ///
    /// Fails when no local port can be bound.
    pub async fn start() -> io::Result<ConnectProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ProxyState::default());
        let (stop_tx, stop) = watch::channel(());
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state), stop, stop_tx));
        Ok(ConnectProxy {
            addr,
            state,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`: the value for `HTTPS_PROXY` or `http_proxy`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// CONNECT tunnels opened to their target.
    pub fn tunnels(&self) -> u64 {
        self.state.tunnels.load(Ordering::SeqCst)
    }

    /// Plain-HTTP connections forwarded (counted at their first absolute-form request).
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Requests answered with an error: unreadable, not a proxy request, target unreachable.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Every `host:port` asked for, in order.
    pub fn targets(&self) -> Vec<String> {
        self.state
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Anything at all came through the proxy.
    pub fn saw_anything(&self) -> bool {
        self.tunnels() + self.forwarded() + self.refused() > 0
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops the stop sender, which ends every relay.
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<ProxyState>,
    stop: Stop,
    _stop_tx: watch::Sender<()>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (state, mut stop) = (Arc::clone(&state), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_client(client, &state) => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// What the client asked the proxy for.
#[derive(Debug, PartialEq, Eq)]
enum ProxyRequest {
    /// `CONNECT authority`: a tunnel to `target`.
    Connect { target: String },
    /// An absolute-form request: `head` is the request rewritten in origin form for `target`.
    Forward { target: String, head: Vec<u8> },
}

/// Why a request head cannot be served, with the status the client gets.
#[derive(Debug, PartialEq, Eq)]
struct Refusal(u16, &'static str);

/// What a complete request head asks the proxy to do.
fn interpret(request: &httparse::Request<'_, '_>) -> Result<ProxyRequest, Refusal> {
    let method = request.method.ok_or(Refusal(400, "Bad Request"))?;
    let path = request.path.ok_or(Refusal(400, "Bad Request"))?;
    if method.eq_ignore_ascii_case("CONNECT") {
        // Authority form only: `host:port`, with the port.
        let valid = path
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        return if valid {
            Ok(ProxyRequest::Connect {
                target: path.to_owned(),
            })
        } else {
            Err(Refusal(400, "Bad Request"))
        };
    }
    let rest = path
        .strip_prefix("http://")
        .ok_or(Refusal(400, "Bad Request"))?;
    let (authority, origin) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(Refusal(400, "Bad Request"));
    }
    let target = if authority.rsplit_once(':').is_some_and(|(_, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']')
    }) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let mut head = format!(
        "{method} {origin} HTTP/1.{}\r\n",
        request.version.unwrap_or(1)
    )
    .into_bytes();
    for header in request.headers.iter() {
        // Meant for the proxy, not the server.
        if header.name.to_ascii_lowercase().starts_with("proxy-") {
            continue;
        }
        head.extend_from_slice(header.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(header.value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Ok(ProxyRequest::Forward { target, head })
}

/// Reads one request head; returns what it asks for and the bytes read after it.
async fn read_head(client: &mut TcpStream) -> Result<(ProxyRequest, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|_| Refusal(400, "Bad Request"))?;
        if n == 0 {
            return Err(Refusal(400, "Bad Request"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let wanted = interpret(&request)?;
                return Ok((wanted, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) => {
                return Err(Refusal(431, "Request Header Fields Too Large"));
            }
            Err(_) => return Err(Refusal(400, "Bad Request")),
        }
    }
}

async fn refuse(client: &mut TcpStream, state: &ProxyState, Refusal(status, reason): Refusal) {
    state.refused.fetch_add(1, Ordering::SeqCst);
    let answer =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = client.write_all(answer.as_bytes()).await;
    let _ = client.shutdown().await;
}

async fn serve_client(mut client: TcpStream, state: &ProxyState) {
    let _ = client.set_nodelay(true);
    let (wanted, early) = match read_head(&mut client).await {
        Ok(read) => read,
        Err(refusal) => return refuse(&mut client, state, refusal).await,
    };
    let target = match &wanted {
        ProxyRequest::Connect { target } | ProxyRequest::Forward { target, .. } => target.clone(),
    };
    state
        .targets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(target.clone());
    let Ok(mut server) = TcpStream::connect(target.as_str()).await else {
        return refuse(&mut client, state, Refusal(502, "Bad Gateway")).await;
    };
    let _ = server.set_nodelay(true);
    match wanted {
        ProxyRequest::Connect { .. } => {
            state.tunnels.fetch_add(1, Ordering::SeqCst);
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
        }
        ProxyRequest::Forward { head, .. } => {
            state.forwarded.fetch_add(1, Ordering::SeqCst);
            if server.write_all(&head).await.is_err() {
                return;
            }
        }
    }
    // A client may send its first bytes (a TLS ClientHello, a request body) with the head.
    if !early.is_empty() && server.write_all(&early).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<ProxyRequest, Refusal> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        assert!(matches!(
            request.parse(raw.as_bytes()),
            Ok(httparse::Status::Complete(_))
        ));
        interpret(&request)
    }

    #[test]
    fn interprets_connect_and_absolute_form_requests() {
        assert_eq!(
            parse("CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n"),
            Ok(ProxyRequest::Connect {
                target: "127.0.0.1:443".into()
            })
        );
        assert_eq!(
            parse("CONNECT localhost HTTP/1.1\r\n\r\n"),
            Err(Refusal(400, "Bad Request"))
        );
        assert_eq!(
            parse(
                "POST http://127.0.0.1:8080/v2/alerts?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
                 Proxy-Authorization: Basic eA==\r\nContent-Length: 2\r\n\r\n"
            ),
            Ok(ProxyRequest::Forward {
                target: "127.0.0.1:8080".into(),
                head: b"POST /v2/alerts?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 2\r\n\r\n"
                    .to_vec()
            })
        );
        assert!(matches!(
            parse("GET http://example.test HTTP/1.1\r\n\r\n"),
            Ok(ProxyRequest::Forward { target, head })
                if target == "example.test:80" && head.starts_with(b"GET / HTTP/1.1\r\n")
        ));
        // An origin-form request is for a server, not a proxy.
        assert_eq!(
            parse("GET /v2/alerts HTTP/1.1\r\n\r\n"),
            Err(Refusal(400, "Bad Request"))
        );
    }

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn read_until_blank_line(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read");
            assert_eq!(n, 1, "closed early: {}", String::from_utf8_lossy(&head));
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    #[tokio::test]
    async fn tunnels_bytes_both_ways_after_connect() {
        let target = echo_server().await;
        let proxy = ConnectProxy::start().await.expect("proxy");
        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        client
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let head = read_until_blank_line(&mut client).await;
        assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
        client
            .write_all(b"\x16\x03\x01 not http")
            .await
            .expect("write");
        let mut echoed = [0u8; 12];
        client.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"\x16\x03\x01 not http");
        assert_eq!(proxy.tunnels(), 1);
        assert_eq!(proxy.forwarded(), 0);
        assert_eq!(proxy.targets(), [target.to_string()]);
    }

    #[tokio::test]
    async fn refuses_unreachable_targets_and_non_proxy_requests() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let proxy = ConnectProxy::start().await.expect("proxy");
        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        client
            .write_all(format!("CONNECT {closed} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let head = read_until_blank_line(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 502 "), "{head}");

        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        client
            .write_all(b"GET /v2/alerts HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let head = read_until_blank_line(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        assert_eq!((proxy.tunnels(), proxy.refused()), (0, 2));
        assert_eq!(proxy.targets(), [closed.to_string()]);
        assert!(proxy.saw_anything());
    }

    #[tokio::test]
    async fn forwards_absolute_form_http_to_the_server() {
        let standin = crate::StandIn::start(crate::StandInConfig::default())
            .await
            .expect("stand-in");
        let proxy = ConnectProxy::start().await.expect("proxy");
        assert!(!proxy.saw_anything());
        let mut client = TcpStream::connect(proxy.addr()).await.expect("connect");
        let body = r#"{"message":"through the proxy"}"#;
        let request = format!(
            "POST {}/v2/alerts HTTP/1.1\r\nHost: {}\r\nAuthorization: GenieKey k\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            standin.base_url(),
            standin.addr(),
            body.len()
        );
        client.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 202 "), "{answer}");
        assert_eq!(proxy.forwarded(), 1);
        assert_eq!(proxy.targets(), [standin.addr().to_string()]);
        let recorded = standin.requests();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].path, "/v2/alerts");
        assert_eq!(
            recorded[0].json,
            Some(serde_json::json!({"message": "through the proxy"}))
        );
    }

    /// What the worker's client will do: reqwest through the proxy, https by CONNECT to a
    /// TLS stand-in of a private CA, plain http in absolute form.
    #[tokio::test]
    async fn carries_reqwest_https_and_http_to_the_stand_in() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = crate::LocalPki::generate().expect("pki");
        let tls = crate::StandIn::start(crate::StandInConfig {
            tls: Some(pki.server.clone()),
            ..crate::StandInConfig::default()
        })
        .await
        .expect("TLS stand-in");
        let plain = crate::StandIn::start(crate::StandInConfig::default())
            .await
            .expect("stand-in");
        let proxy = ConnectProxy::start().await.expect("proxy");
        let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA");
        let client = reqwest::Client::builder()
            .tls_certs_only([ca])
            .proxy(reqwest::Proxy::all(proxy.url()).expect("proxy URL"))
            .build()
            .expect("client");
        for standin in [&tls, &plain] {
            let answer = client
                .post(format!("{}/v2/alerts", standin.base_url()))
                .header("Authorization", "GenieKey k")
                .body(r#"{"message":"m"}"#)
                .send()
                .await
                .expect("answered");
            assert_eq!(answer.status(), 202);
        }
        assert_eq!((proxy.tunnels(), proxy.forwarded()), (1, 1));
        assert_eq!(
            proxy.targets(),
            [tls.addr().to_string(), plain.addr().to_string()]
        );
        assert_eq!(tls.requests()[0].http_version, "HTTP/2.0");
        assert_eq!(plain.requests()[0].http_version, "HTTP/1.1");
    }
}
