//! The HTTPS server skeleton of the test servers (the Flotta edge API, the fake Kubernetes
//! API): rustls over std threads, one thread per connection, HTTP/1.1 with keep-alive. The
//! server brings its TLS configuration (which client certificates it asks for) and a handler
//! that turns a request into a response; this module does the rest: accept loop, handshake,
//! client-certificate capture, request parsing, response writing and a shutdown that joins
//! every thread.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rcgen::{DistinguishedName, DnType};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;

/// ring, also installed as the process default (the agent's code under test relies on one).
pub fn tls_provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate subject from `(type, value)` pairs.
pub fn distinguished_name(pairs: &[(DnType, &str)]) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    for (t, v) in pairs {
        d.push(t.clone(), *v);
    }
    d
}

/// What the skeleton accepts before it gives up on a client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// One parsed HTTP/1.1 request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// As sent: path and query, not decoded.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Bytes of the request line and headers.
    pub head_len: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The target's path (not decoded).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The target's query parameters, percent-decoded.
    pub fn query(&self) -> BTreeMap<String, String> {
        let q = self.target.split_once('?').map_or("", |(_, q)| q);
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }
}

/// `%XX` and `+` of a URL component decoded (invalid escapes are kept as they are).
pub fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP/1.1 response; `Content-Length` is always sent.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// No body, no `Content-Type`.
    pub fn new(status: u16) -> Response {
        Response {
            status,
            content_type: None,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `v` as `application/json`.
    pub fn json(status: u16, v: &impl serde::Serialize) -> Response {
        Response::new(status).with_body(
            "application/json",
            serde_json::to_vec(v).unwrap_or_default(),
        )
    }

    pub fn with_body(mut self, content_type: &str, body: Vec<u8>) -> Response {
        self.content_type = Some(content_type.to_string());
        self.body = body;
        self
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Status line and headers, as written.
    pub fn head(&self) -> String {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Length: {}\r\n",
            self.status,
            reason_phrase(self.status),
            self.body.len()
        );
        if let Some(ct) = &self.content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        head
    }

    /// Bytes on the wire (head and body).
    pub fn wire_len(&self) -> usize {
        self.head().len() + self.body.len()
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        208 => "Already Reported",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        409 => "Conflict",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The client of a connection, as the handler sees it.
pub struct Client<'a> {
    /// The certificate chain it presented (empty when it presented none).
    pub certificates: &'a [CertificateDer<'static>],
    stop: &'a AtomicBool,
}

impl Client<'_> {
    /// The server is shutting down: a handler that waits on purpose should stop waiting.
    pub fn server_stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Answers one request; `None` drops the connection without an answer (a network fault).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, client: &Client<'_>, request: &Request) -> Option<Response>;
}

impl<F> Handler for F
where
    F: Fn(&Client<'_>, &Request) -> Option<Response> + Send + Sync + 'static,
{
    fn handle(&self, client: &Client<'_>, request: &Request) -> Option<Response> {
        self(client, request)
    }
}

struct Shared {
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    handler: Box<dyn Handler>,
    stop: AtomicBool,
    handshake_failures: AtomicUsize,
    connections: AtomicUsize,
}

/// Open connections: a socket clone to shut down on stop, and the thread serving it.
type Connections = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// A running server on 127.0.0.1 (a port of its own); stops on drop.
pub struct HttpsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    conns: Connections,
}

impl HttpsServer {
    pub fn start(
        tls: Arc<rustls::ServerConfig>,
        limits: Limits,
        handler: impl Handler,
    ) -> HttpsServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            tls,
            limits,
            handler: Box::new(handler),
            stop: AtomicBool::new(false),
            handshake_failures: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        });
        let conns: Connections = Arc::default();
        let accept = {
            let (shared, conns) = (shared.clone(), conns.clone());
            std::thread::Builder::new()
                .name("https-test-accept".into())
                .spawn(move || accept_loop(&listener, &shared, &conns))
                .expect("spawn the accept thread")
        };
        HttpsServer {
            addr,
            shared,
            accept: Some(accept),
            conns,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Handshakes that failed (e.g. a client without a required certificate).
    pub fn handshake_failures(&self) -> usize {
        self.shared.handshake_failures.load(Ordering::SeqCst)
    }

    /// Connections with a completed handshake.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting, closes every connection, joins every thread. Idempotent.
    pub fn shutdown(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wakes the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (s, _) in &conns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, conns: &Connections) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let shared = shared.clone();
        let h = std::thread::spawn(move || serve_connection(&shared, stream));
        let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
        c.retain(|(_, h)| !h.is_finished());
        c.push((clone, h));
    }
}

type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn serve_connection(shared: &Shared, tcp: TcpStream) {
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    let Ok(conn) = rustls::ServerConnection::new(shared.tls.clone()) else {
        return;
    };
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // The handshake first, so that the client's certificate is known to every request.
    while stream.conn.is_handshaking() {
        if stream.conn.complete_io(&mut stream.sock).is_err() {
            shared.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let certificates: Vec<CertificateDer<'static>> = stream
        .conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let client = Client {
        certificates: &certificates,
        stop: &shared.stop,
    };
    let mut reader = BufReader::new(stream);
    while let Ok(Some(req)) = read_request(&mut reader, &shared.limits) {
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let Some(resp) = shared.handler.handle(&client, &req) else {
            // A dead socket, no close_notify.
            let _ = reader.get_mut().sock.shutdown(Shutdown::Both);
            return;
        };
        if write_response(reader.get_mut(), &resp).is_err() || close {
            break;
        }
    }
    // The accept loop keeps a clone of the socket for shutdown(): close it explicitly,
    // dropping this half would not end the TCP connection.
    let stream = reader.get_mut();
    stream.conn.send_close_notify();
    let _ = stream.conn.complete_io(&mut stream.sock);
    let _ = stream.sock.shutdown(Shutdown::Both);
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// `Ok(None)`: the client closed the connection.
fn read_request(r: &mut BufReader<TlsStream>, limits: &Limits) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(invalid("bad request line"));
    };
    let (method, target) = (method.to_owned(), target.to_owned());
    let mut headers = Vec::new();
    let mut header_bytes = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        header_bytes += h.len();
        if header_bytes > limits.max_header_bytes {
            return Err(invalid("headers too large"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
        head_len: line.len() + header_bytes,
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| invalid("bad chunk size"))?;
            if req.body.len() + n > limits.max_body_bytes {
                return Err(invalid("body too large"));
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            req.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = req.header("content-length") {
        let n: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
        if n > limits.max_body_bytes {
            return Err(invalid("body too large"));
        }
        req.body = vec![0; n];
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

fn write_response(w: &mut TlsStream, resp: &Response) -> io::Result<()> {
    w.write_all(resp.head().as_bytes())?;
    w.write_all(&resp.body)?;
    w.flush()
}
