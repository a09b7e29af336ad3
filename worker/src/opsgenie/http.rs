//! The bytes under the Opsgenie boundary: a small HTTP/1.1 client that keeps connections
//! alive per endpoint, writes a request in one piece and reads its answer back, usually in
//! one read. A general-purpose client (redirects, proxies, retry and pool layers, a task per
//! connection) cost several times more CPU per alert than the request itself; the Alert API
//! needs none of that: one POST, a small JSON answer, a keep-alive connection.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

/// An answer larger than this is not an Opsgenie answer; it is refused, not buffered.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Idle connections older than this are closed rather than reused: servers and load balancers
/// close theirs after a minute or so, and a request on a closed one is a wasted round trip.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 256;

/// Where requests for one API base go: parsed once, when the keyring is read. Clones share
/// the kept-alive connections, so that a request finds them without a lookup.
#[derive(Clone)]
pub struct Endpoint {
    tls: bool,
    host: String,
    port: u16,
    /// The `Host` header: the host, and the port when it is not the scheme's own.
    authority: String,
    /// The path of the API base without a trailing `/` (usually empty).
    base_path: String,
    /// Idle connections, the most recently used last.
    idle: Arc<Mutex<VecDeque<(Connection, Instant)>>>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.base_path)
    }
}

impl Endpoint {
    /// Fails when `base` is not an absolute http(s) URL with a host, or carries a query, a
    /// fragment or credentials (which would never be sent).
    pub fn parse(base: &str) -> Result<Endpoint, String> {
        let url = url::Url::parse(base).map_err(|e| e.to_string())?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("the scheme is {other}, not http or https")),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("it has no host".into()),
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err("an API base cannot have a query or a fragment".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("an API base cannot carry credentials".into());
        }
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = match url.port() {
            Some(port) => format!("{bracketed}:{port}"),
            None => bracketed,
        };
        Ok(Endpoint {
            tls,
            host,
            port,
            authority,
            base_path: url.path().trim_end_matches('/').to_string(),
            idle: Arc::default(),
        })
    }
}

impl Endpoint {
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<(Connection, Instant)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that is not too old.
    fn checkout(&self) -> Option<Connection> {
        let mut idle = self.idle();
        while let Some((connection, since)) = idle.pop_back() {
            if since.elapsed() < IDLE_TIMEOUT {
                return Some(connection);
            }
        }
        None
    }

    /// Keeps `connection` for the next request, and closes those idle for too long: the
    /// least recently used are at the front, and would otherwise never be looked at again.
    fn checkin(&self, connection: Connection) {
        let mut idle = self.idle();
        while idle
            .front()
            .is_some_and(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((connection, Instant::now()));
        }
    }
}

/// What the client needs of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    /// `X-RateLimit-Period-In-Sec`.
    pub rate_limit_period: Option<String>,
    pub body: Vec<u8>,
}

/// Why a request got no answer. None of them carries a byte of the request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("could not connect: {0}")]
    Connect(io::Error),
    #[error("timed out")]
    Timeout,
    #[error("request failed: {0}")]
    Io(io::Error),
    #[error("the connection closed before an answer")]
    Closed,
    #[error("unreadable answer: {0}")]
    Protocol(String),
    #[error("TLS is not available: {0}")]
    Tls(String),
}

/// The headers of one request besides `Host` and `Content-Length`.
pub struct RequestHead<'a> {
    /// `GenieKey <key>`: written into the request bytes and nowhere else.
    pub authorization: &'a str,
    pub user_agent: &'a str,
}

/// Connects, sends and reads; the connections themselves are kept by their `Endpoint`.
pub struct HttpClient {
    /// Built on the first https request: reading the system's CA certificates is wasted on a
    /// worker that only talks to a local endpoint.
    tls: OnceLock<Result<TlsConnector, String>>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl HttpClient {
    pub fn new(connect_timeout: Duration, request_timeout: Duration) -> HttpClient {
        HttpClient {
            tls: OnceLock::new(),
            connect_timeout,
            request_timeout,
        }
    }

    /// POSTs `body` as JSON to `path` (and `query`, without `?`) below `endpoint`, within the
    /// request time-out, on a kept-alive connection when there is one.
    ///
    /// Fails when no connection can be made, the time-out passes, or the answer cannot be
    /// read; an error status is an `Answer`, not an error.
    pub async fn post(
        &self,
        endpoint: &Endpoint,
        path: &str,
        query: &str,
        head: &RequestHead<'_>,
        body: &[u8],
    ) -> Result<Answer, HttpError> {
        let request = encode_post(endpoint, path, query, head, body);
        let exchange = async {
            loop {
                let (mut connection, reused) = match endpoint.checkout() {
                    Some(connection) => (connection, true),
                    None => (self.connect(endpoint).await?, false),
                };
                match connection.exchange(&request).await {
                    Ok((answer, keep_alive)) => {
                        if keep_alive {
                            endpoint.checkin(connection);
                        }
                        return Ok(answer);
                    }
                    // A kept-alive connection the server had already closed: the request
                    // never reached it. The others kept with it are likely closed too.
                    Err(HttpError::Closed) if reused => endpoint.idle().clear(),
                    Err(error) => return Err(error),
                }
            }
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout)?
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Connection, HttpError> {
        let connect = async {
            let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
                .await
                .map_err(HttpError::Connect)?;
            tcp.set_nodelay(true).map_err(HttpError::Connect)?;
            if !endpoint.tls {
                return Ok(Io::Plain(tcp));
            }
            let tls = self
                .tls
                .get_or_init(tls_connector)
                .as_ref()
                .map_err(|e| HttpError::Tls(e.clone()))?;
            let name = ServerName::try_from(endpoint.host.clone())
                .map_err(|e| HttpError::Tls(e.to_string()))?;
            let stream = tls.connect(name, tcp).await.map_err(HttpError::Connect)?;
            Ok(Io::Tls(Box::new(stream)))
        };
        let io = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| HttpError::Connect(io::ErrorKind::TimedOut.into()))??;
        Ok(Connection {
            io,
            buf: Vec::with_capacity(4096),
        })
    }
}

fn tls_connector() -> Result<TlsConnector, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("no CA certificates found on this system".into());
    }
    // The provider named here, not the process default, so that no caller has to have
    // installed one first.
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The whole request, head and body, in one buffer: one write.
fn encode_post(
    endpoint: &Endpoint,
    path: &str,
    query: &str,
    head: &RequestHead<'_>,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + path.len() + body.len());
    let mut put = |s: &str| out.extend_from_slice(s.as_bytes());
    put("POST ");
    put(&endpoint.base_path);
    put(path);
    if !query.is_empty() {
        put("?");
        put(query);
    }
    put(" HTTP/1.1\r\nHost: ");
    put(&endpoint.authority);
    put("\r\nAuthorization: ");
    put(head.authorization);
    put("\r\nUser-Agent: ");
    put(head.user_agent);
    put("\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: ");
    put(itoa::Buffer::new().format(body.len()));
    put("\r\n\r\n");
    out.extend_from_slice(body);
    out
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One kept-alive connection and the buffer its answers are read into.
struct Connection {
    io: Io,
    buf: Vec<u8>,
}

impl Connection {
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.io {
            Io::Plain(s) => s.write_all(bytes).await,
            Io::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// Reads what is there into the buffer; 0 at the end of the stream.
    async fn read_more(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(4096);
        }
        match &mut self.io {
            Io::Plain(s) => s.read_buf(&mut self.buf).await,
            Io::Tls(s) => s.read_buf(&mut self.buf).await,
        }
    }

    /// Sends one request and reads its answer. Also says whether the connection may carry
    /// another request.
    async fn exchange(&mut self, request: &[u8]) -> Result<(Answer, bool), HttpError> {
        self.buf.clear();
        if let Err(error) = self.write(request).await {
            return Err(match error.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => HttpError::Closed,
                _ => HttpError::Io(error),
            });
        }
        let mut start = 0;
        let head = loop {
            match parse_head(&self.buf[start..])? {
                Some(head) if (100..200).contains(&head.status) => start += head.len,
                Some(head) => break head,
                None => {
                    if self.buf.len() > MAX_ANSWER_BYTES {
                        return Err(HttpError::Protocol("the answer's head is too large".into()));
                    }
                    match self.read_more().await {
                        Ok(0) if self.buf.is_empty() => return Err(HttpError::Closed),
                        Ok(0) => {
                            return Err(HttpError::Protocol(
                                "the connection closed within the answer's head".into(),
                            ));
                        }
                        Ok(_) => {}
                        Err(error) if self.buf.is_empty() => {
                            return Err(match error.kind() {
                                io::ErrorKind::ConnectionReset
                                | io::ErrorKind::ConnectionAborted => HttpError::Closed,
                                _ => HttpError::Io(error),
                            });
                        }
                        Err(error) => return Err(HttpError::Io(error)),
                    }
                }
            }
        };
        let body_start = start + head.len;
        let (body, used) = match head.framing {
            Framing::Empty => (Vec::new(), body_start),
            Framing::Length(n) => {
                if n > MAX_ANSWER_BYTES {
                    return Err(HttpError::Protocol(format!("an answer of {n} bytes")));
                }
                while self.buf.len() < body_start + n {
                    if self.read_more().await.map_err(HttpError::Io)? == 0 {
                        return Err(HttpError::Protocol(
                            "the connection closed within the answer".into(),
                        ));
                    }
                }
                (
                    self.buf[body_start..body_start + n].to_vec(),
                    body_start + n,
                )
            }
            Framing::Chunked => loop {
                match decode_chunked(&self.buf[body_start..])? {
                    Some((body, len)) => break (body, body_start + len),
                    None => {
                        if self.buf.len() > MAX_ANSWER_BYTES {
                            return Err(HttpError::Protocol("the answer is too large".into()));
                        }
                        if self.read_more().await.map_err(HttpError::Io)? == 0 {
                            return Err(HttpError::Protocol(
                                "the connection closed within the answer".into(),
                            ));
                        }
                    }
                }
            },
            Framing::UntilClose => {
                while self.read_more().await.map_err(HttpError::Io)? > 0 {
                    if self.buf.len() > MAX_ANSWER_BYTES {
                        return Err(HttpError::Protocol("the answer is too large".into()));
                    }
                }
                (self.buf[body_start..].to_vec(), self.buf.len())
            }
        };
        // Bytes past the answer were never asked for: do not read the next answer from them.
        let keep_alive = head.keep_alive && used == self.buf.len();
        Ok((
            Answer {
                status: head.status,
                retry_after: head.retry_after,
                rate_limit_period: head.rate_limit_period,
                body,
            },
            keep_alive,
        ))
    }
}

/// How the answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// Bytes of the head, blank line included.
    len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
    retry_after: Option<String>,
    rate_limit_period: Option<String>,
}

/// The answer's head, once all of it is in `buf`.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    // Opsgenie answers with about a dozen headers; room for many more only when needed.
    let mut few = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut few);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => interpret(&response, len).map(Some),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            let mut many = vec![httparse::EMPTY_HEADER; 512];
            let mut response = httparse::Response::new(&mut many);
            match response.parse(buf) {
                Ok(httparse::Status::Complete(len)) => interpret(&response, len).map(Some),
                Ok(httparse::Status::Partial) => Ok(None),
                Err(error) => Err(HttpError::Protocol(error.to_string())),
            }
        }
        Err(error) => Err(HttpError::Protocol(error.to_string())),
    }
}

/// What a complete head of `len` bytes says.
fn interpret(response: &httparse::Response<'_, '_>, len: usize) -> Result<Head, HttpError> {
    let status = response.code.unwrap_or(0);
    let mut keep_alive = response.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    let mut retry_after = None;
    let mut rate_limit_period = None;
    let text = |v: &[u8]| String::from_utf8_lossy(v).trim().to_string();
    for header in response.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| HttpError::Protocol("a Content-Length that is no number".into()))?;
            if length.is_some_and(|m| m != n) {
                return Err(HttpError::Protocol("two Content-Lengths".into()));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = text(header.value)
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            let value = text(header.value);
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("retry-after") {
            retry_after = Some(text(header.value));
        } else if name.eq_ignore_ascii_case("x-ratelimit-period-in-sec") {
            rate_limit_period = Some(text(header.value));
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Head {
        len,
        status,
        framing,
        keep_alive,
        retry_after,
        rate_limit_period,
    })
}

/// A chunked body, once all of it is in `buf`: the body and the bytes it took.
fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HttpError> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (data_at, size) = match httparse::parse_chunk_size(&buf[at..]) {
            Ok(httparse::Status::Complete((n, size))) => (at + n, size as usize),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(HttpError::Protocol("a broken chunk size".into())),
        };
        if size == 0 {
            // Trailers, if any, then the blank line that ends the body.
            let mut line_at = data_at;
            loop {
                let Some(end) = buf[line_at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some((body, line_at + 2)));
                }
                line_at += end + 2;
            }
        }
        if size > MAX_ANSWER_BYTES || body.len() + size > MAX_ANSWER_BYTES {
            return Err(HttpError::Protocol("the answer is too large".into()));
        }
        if buf.len() < data_at + size + 2 {
            return Ok(None);
        }
        if &buf[data_at + size..data_at + size + 2] != b"\r\n" {
            return Err(HttpError::Protocol("a chunk without its line end".into()));
        }
        body.extend_from_slice(&buf[data_at..data_at + size]);
        at = data_at + size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_parsed_once_with_their_host_header() {
        let e = Endpoint::parse("https://api.eu.opsgenie.com").unwrap();
        assert_eq!(
            (
                e.tls,
                e.host.as_str(),
                e.port,
                e.authority.as_str(),
                e.base_path.as_str()
            ),
            (true, "api.eu.opsgenie.com", 443, "api.eu.opsgenie.com", "")
        );
        let e = Endpoint::parse("http://127.0.0.1:18080/").unwrap();
        assert_eq!(
            (e.tls, e.port, e.authority.as_str(), e.base_path.as_str()),
            (false, 18080, "127.0.0.1:18080", "")
        );
        let e = Endpoint::parse("https://proxy.internal:8443/opsgenie/").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.base_path.as_str()),
            ("proxy.internal:8443", "/opsgenie")
        );
        let e = Endpoint::parse("http://[::1]:9000").unwrap();
        assert_eq!(
            (e.host.as_str(), e.authority.as_str()),
            ("::1", "[::1]:9000")
        );
        for bad in [
            "ftp://x",
            "api.opsgenie.com",
            "https://user:pw@api.opsgenie.com",
            "https://api.opsgenie.com/?a=b",
            "http://",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_request_is_one_buffer_with_its_length() {
        let e = Endpoint::parse("http://127.0.0.1:18080/base").unwrap();
        let head = RequestHead {
            authorization: "GenieKey k",
            user_agent: "ua/1",
        };
        let bytes = encode_post(
            &e,
            "/v2/alerts/a%20b/close",
            "identifierType=alias",
            &head,
            b"{}",
        );
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "POST /base/v2/alerts/a%20b/close?identifierType=alias HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\
             Authorization: GenieKey k\r\nUser-Agent: ua/1\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn heads_say_how_the_body_ends_and_whether_to_keep_the_connection() {
        let head = |s: &str| parse_head(s.as_bytes()).unwrap().unwrap();
        let h = head("HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(
            (h.status, h.framing, h.keep_alive, h.len),
            (202, Framing::Length(5), true, 44)
        );
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n",
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        let h = head("HTTP/1.0 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = head(
            "HTTP/1.1 429 Too Many\r\nretry-after: 7 \r\nX-RateLimit-Period-In-Sec: 60\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(h.retry_after.as_deref(), Some("7"));
        assert_eq!(h.rate_limit_period.as_deref(), Some("60"));
        assert_eq!(
            head("HTTP/1.1 204 No Content\r\n\r\n").framing,
            Framing::Empty
        );
        let crowded: String = (0..100).map(|i| format!("X-Proxy-{i}: yes\r\n")).collect();
        let h = head(&format!(
            "HTTP/1.1 202 Accepted\r\n{crowded}Content-Length: 2\r\n\r\n{{}}"
        ));
        assert_eq!((h.status, h.framing), (202, Framing::Length(2)));
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_are_joined_once_complete() {
        let whole = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(
            decode_chunked(whole).unwrap(),
            Some((b"hello world".to_vec(), whole.len()))
        );
        for cut in 0..whole.len() {
            assert_eq!(decode_chunked(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(decode_chunked(b"zz\r\n").is_err());
        assert!(decode_chunked(b"2\r\nabX\r\n").is_err());
    }

    /// A server that answers each connection's requests from a script, each answer written
    /// in the pieces given, to drive the client through keep-alive, a closed idle connection
    /// and an answer that arrives in parts.
    type Script = Vec<Vec<&'static [&'static [u8]]>>;

    async fn scripted_server(
        script: Script,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answers in script {
                let (mut socket, _) = listener.accept().await.unwrap();
                for pieces in answers {
                    let mut request = vec![0u8; 4096];
                    let n = socket.read(&mut request).await.unwrap();
                    seen.push(request[..n].to_vec());
                    for piece in pieces {
                        socket.write_all(piece).await.unwrap();
                        socket.flush().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                }
                // Dropped: the connection closes.
            }
            seen
        });
        (addr, server)
    }

    #[tokio::test]
    async fn keeps_the_connection_and_reconnects_when_the_server_closed_it() {
        let (addr, server) = scripted_server(vec![
            vec![
                &[b"HTTP/1.1 202 Accepted\r\nContent-Length: 17\r\n\r\n{\"requestId\":\"1\"}"],
                &[
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-",
                    b"Encoding: chunked\r\n\r\n3\r\nab",
                    b"c\r\n0\r\n\r\n",
                ],
            ],
            vec![&[b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n"]],
        ])
        .await;
        let client = HttpClient::new(Duration::from_secs(2), Duration::from_secs(5));
        let endpoint = Endpoint::parse(&format!("http://{addr}")).unwrap();
        let head = RequestHead {
            authorization: "GenieKey k",
            user_agent: "t",
        };
        let a = client
            .post(&endpoint, "/v2/alerts", "", &head, b"{}")
            .await
            .unwrap();
        assert_eq!(
            (a.status, a.body.as_slice()),
            (202, &b"{\"requestId\":\"1\"}"[..])
        );
        let b = client
            .post(&endpoint, "/v2/alerts", "", &head, b"{}")
            .await
            .unwrap();
        assert_eq!((b.status, b.body.as_slice()), (200, &b"abc"[..]));
        // The first connection is closed by now; the client finds out and connects again.
        let c = client
            .post(&endpoint, "/v2/alerts", "", &head, b"{}")
            .await
            .unwrap();
        assert_eq!((c.status, c.retry_after.as_deref()), (503, Some("2")));
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 3, "one request per answer");
        assert!(
            seen.iter()
                .all(|r| r.starts_with(b"POST /v2/alerts HTTP/1.1\r\n"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_shared_by_clones_and_closed_when_old() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connection = || async {
            Connection {
                io: Io::Plain(TcpStream::connect(addr).await.unwrap()),
                buf: Vec::new(),
            }
        };
        let endpoint = Endpoint::parse(&format!("http://{addr}")).unwrap();
        let other = endpoint.clone();
        endpoint.checkin(connection().await);
        assert!(other.checkout().is_some(), "a clone finds the connection");
        assert!(other.checkout().is_none());
        endpoint.checkin(connection().await);
        tokio::time::advance(IDLE_TIMEOUT).await;
        // Checking a fresh one in closes the one idle for too long.
        endpoint.checkin(connection().await);
        assert_eq!(endpoint.idle().len(), 1);
        assert!(other.checkout().is_some());
        assert!(other.checkout().is_none());
    }

    #[tokio::test]
    async fn https_reads_the_system_roots_and_fails_a_handshake_cleanly() {
        // Something that is no TLS server: the handshake must fail as a connect error, with
        // the system's CA certificates loaded on the way.
        let (addr, _server) = scripted_server(vec![vec![&[b"HTTP/1.1 400 Bad\r\n\r\n"]]]).await;
        let client = HttpClient::new(Duration::from_secs(2), Duration::from_secs(5));
        let endpoint = Endpoint::parse(&format!("https://localhost:{}", addr.port())).unwrap();
        let head = RequestHead {
            authorization: "GenieKey k",
            user_agent: "t",
        };
        let error = client.post(&endpoint, "/v2/alerts", "", &head, b"{}").await;
        assert!(matches!(error, Err(HttpError::Connect(_))), "{error:?}");
        assert!(matches!(client.tls.get(), Some(Ok(_))));
    }

    #[tokio::test]
    async fn a_silent_server_is_a_time_out_and_a_closed_port_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = HttpClient::new(Duration::from_secs(2), Duration::from_millis(200));
        let head = RequestHead {
            authorization: "GenieKey k",
            user_agent: "t",
        };
        let endpoint = Endpoint::parse(&format!("http://{addr}")).unwrap();
        let error = client.post(&endpoint, "/v2/alerts", "", &head, b"{}").await;
        assert!(matches!(error, Err(HttpError::Timeout)), "{error:?}");
        drop(listener);
        let error = client.post(&endpoint, "/v2/alerts", "", &head, b"{}").await;
        assert!(matches!(error, Err(HttpError::Connect(_))), "{error:?}");
    }
}
