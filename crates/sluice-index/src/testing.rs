//! Test support behind the `testing` feature, for this and other crates' tests:
//! - `Osmem`: a real OpenSearch-compatible server (`osmem-server`, in-memory, from the PyPI
//!   package of that name, installed into `.venv` by `scripts/install-test-tools` or named by
//!   `SLUICE_OSMEM`), on a free port, killed on drop.
//! - `FaultProxy`: an HTTP proxy in front of it that injects the failures a real cluster
//!   produces: bulk items answered 429 (withheld from the server, so they really were not
//!   written), whole requests answered with an error status, and outages (the port closes and
//!   open connections are cut).

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::watch;

/// A running osmem-server.
pub struct Osmem {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Osmem {
    /// The binary: `SLUICE_OSMEM`, else the workspace's `.venv/bin/osmem-server`.
    pub fn binary() -> String {
        std::env::var("SLUICE_OSMEM").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/osmem-server").to_string()
        })
    }

    /// Starts a server and waits until it listens. Panics (it is for tests) when it cannot.
    pub fn start() -> Osmem {
        let binary = Osmem::binary();
        assert!(
            std::path::Path::new(&binary).exists(),
            "no osmem-server at {binary}: run ./scripts/test (it installs it), or set SLUICE_OSMEM"
        );
        let addr = free_addr();
        let child = Command::new(&binary)
            .args(["-addr", &addr.to_string(), "-no-stdin-watch"])
            .args(["-parent-pid", &std::process::id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start osmem-server");
        wait_listening(addr, "osmem-server");
        Osmem {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for Osmem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The faults a `FaultProxy` injects now.
#[derive(Default)]
struct Faults {
    /// Bulk items to answer with a status instead of forwarding.
    items: Mutex<Option<ItemFault>>,
    /// Whole requests to answer with a status: (status, how many more).
    requests: Mutex<Option<(u16, u64)>>,
    /// Bulk items withheld and answered with the fault status so far.
    withheld: AtomicU64,
    /// Bulk items seen while an item fault was on.
    items_seen: AtomicU64,
    /// Requests forwarded or answered.
    requests_seen: AtomicU64,
    /// How long to hold each `_bulk` request before forwarding it (none when `None`).
    bulk_delay: Mutex<Option<Duration>>,
    /// `_bulk` requests held so far, and those of them forwarded after their delay.
    bulks_held: AtomicU64,
    bulks_released: AtomicU64,
    down: AtomicBool,
}

#[derive(Clone, Copy)]
struct ItemFault {
    status: u16,
    /// Every `every`-th bulk item through the proxy (counted across requests, so an item sent
    /// again is not necessarily failed again).
    every: usize,
    /// Items left to fail; the fault ends at 0.
    remaining: u64,
}

/// An HTTP proxy in front of a search server that injects faults. It runs on a thread (and
/// runtime) of its own, so it keeps serving while a test blocks, in sync and async tests alike.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`: the URL to give sluice.
    pub url: String,
    addr: SocketAddr,
    faults: Arc<Faults>,
    control: tokio::sync::mpsc::UnboundedSender<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Control {
    /// Listen (again) and serve; answers once listening.
    Up(std::sync::mpsc::Sender<()>),
    /// Close the listener and cut every connection; answers once done.
    Down(std::sync::mpsc::Sender<()>),
    Stop,
}

impl FaultProxy {
    /// A proxy forwarding to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let addr = free_addr();
        let faults: Arc<Faults> = Arc::default();
        let (control, mut commands) = tokio::sync::mpsc::unbounded_channel();
        let upstream = upstream.trim_end_matches('/').to_string();
        let state = faults.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                runtime.block_on(async move {
                    let client = reqwest::Client::new();
                    let mut cut: Option<watch::Sender<bool>> = None;
                    while let Some(command) = commands.recv().await {
                        match command {
                            Control::Up(done) => {
                                if cut.is_none() {
                                    let (tx, rx) = watch::channel(false);
                                    let listener = listen(addr);
                                    tokio::spawn(accept(
                                        listener,
                                        rx,
                                        state.clone(),
                                        upstream.clone(),
                                        client.clone(),
                                    ));
                                    cut = Some(tx);
                                }
                                let _ = done.send(());
                            }
                            Control::Down(done) => {
                                if let Some(cut) = cut.take() {
                                    let _ = cut.send(true);
                                    // Let the accept loop and connections see it.
                                    tokio::task::yield_now().await;
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                                let _ = done.send(());
                            }
                            Control::Stop => return,
                        }
                    }
                });
            })
            .expect("proxy thread");
        let proxy = FaultProxy {
            url: format!("http://{addr}"),
            addr,
            faults,
            control,
            thread: Some(thread),
        };
        proxy.command(Control::Up);
        wait_listening(addr, "the fault proxy");
        proxy
    }

    fn command(&self, make: impl FnOnce(std::sync::mpsc::Sender<()>) -> Control) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.control.send(make(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Answers `status` for every `every`-th bulk item (withholding them from the server),
    /// `count` items in all.
    pub fn fail_items(&self, status: u16, every: usize, count: u64) {
        if let Ok(mut items) = self.faults.items.lock() {
            *items = Some(ItemFault {
                status,
                every: every.max(1),
                remaining: count,
            });
        }
    }

    /// Answers `status` to the next `count` requests of any kind.
    pub fn fail_requests(&self, status: u16, count: u64) {
        if let Ok(mut requests) = self.faults.requests.lock() {
            *requests = Some((status, count));
        }
    }

    /// Holds every `_bulk` request for `delay` before forwarding it (`None`: forward at once).
    /// A held request is forwarded after its delay even if its client gave up or was stopped
    /// meanwhile: a write on its way, like one in a slow network or a paused node's socket.
    pub fn delay_bulks(&self, delay: Option<Duration>) {
        if let Ok(mut d) = self.faults.bulk_delay.lock() {
            *d = delay;
        }
    }

    /// `_bulk` requests held so far, and how many of them were forwarded.
    pub fn bulks_held(&self) -> (u64, u64) {
        (
            self.faults.bulks_held.load(Ordering::SeqCst),
            self.faults.bulks_released.load(Ordering::SeqCst),
        )
    }

    /// Bulk items withheld and failed so far.
    pub fn withheld(&self) -> u64 {
        self.faults.withheld.load(Ordering::Relaxed)
    }

    /// Requests seen so far.
    pub fn requests(&self) -> u64 {
        self.faults.requests_seen.load(Ordering::Relaxed)
    }

    /// An outage: the port closes and every open connection is cut.
    pub fn go_down(&self) {
        self.faults.down.store(true, Ordering::SeqCst);
        self.command(Control::Down);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(self.addr).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The end of an outage: the same port listens again.
    pub fn come_back(&self) {
        self.faults.down.store(false, Ordering::SeqCst);
        self.command(Control::Up);
        wait_listening(self.addr, "the fault proxy");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A listener on `addr`, reusable right after an earlier one on it closed.
fn listen(addr: SocketAddr) -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind the proxy port");
    socket.listen(1024).expect("listen")
}

async fn accept(
    listener: tokio::net::TcpListener,
    cut_rx: watch::Receiver<bool>,
    faults: Arc<Faults>,
    upstream: String,
    client: reqwest::Client,
) {
    let mut cut = cut_rx.clone();
    loop {
        let stream = tokio::select! {
            _ = cut.wait_for(|c| *c) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (faults, upstream, client) = (faults.clone(), upstream.clone(), client.clone());
        let mut cut = cut_rx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                handle(request, faults.clone(), upstream.clone(), client.clone())
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cut.wait_for(|c| *c) => {}
                _ = connection => {}
            }
        });
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: u16, body: Vec<u8>) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn handle(
    request: Request<Incoming>,
    faults: Arc<Faults>,
    upstream: String,
    client: reqwest::Client,
) -> Result<Answer, std::convert::Infallible> {
    faults.requests_seen.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(answer(400, e.to_string().into_bytes())),
    };
    let injected = faults.requests.lock().ok().and_then(|mut r| match *r {
        Some((status, n)) if n > 0 => {
            *r = (n > 1).then_some((status, n - 1));
            Some(status)
        }
        _ => None,
    });
    if let Some(status) = injected {
        let body = json!({"error": {"type": "injected_fault", "reason": "the fault proxy answered this request"}, "status": status});
        return Ok(answer(status, body.to_string().into_bytes()));
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let delay = faults.bulk_delay.lock().ok().and_then(|d| *d);
    if let Some(delay) = delay.filter(|_| parts.uri.path().ends_with("/_bulk")) {
        faults.bulks_held.fetch_add(1, Ordering::SeqCst);
        // Forwarded from a task of its own, so it lands even if the client hangs up.
        let (method, headers, url) = (
            parts.method.clone(),
            parts.headers.clone(),
            format!("{upstream}{path}"),
        );
        let (client, faults, body) = (client.clone(), faults.clone(), body.clone());
        let forwarded = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut outgoing = client.request(method, url);
            for (name, value) in &headers {
                if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
                    outgoing = outgoing.header(name, value);
                }
            }
            let result = match outgoing.body(body).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    response
                        .bytes()
                        .await
                        .map(|b| (status, b.to_vec()))
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            faults.bulks_released.fetch_add(1, Ordering::SeqCst);
            result
        });
        return Ok(match forwarded.await {
            Ok(Ok((status, bytes))) => answer(status, bytes),
            Ok(Err(e)) => answer(502, e.into_bytes()),
            Err(e) => answer(502, e.to_string().into_bytes()),
        });
    }
    let item_fault = faults.items.lock().ok().and_then(|f| *f);
    let (forward, withheld) = match item_fault {
        Some(fault) if parts.uri.path().ends_with("/_bulk") => withhold(&faults, &body, fault),
        _ => (body, Vec::new()),
    };
    let forwarded = if withheld.is_empty() || !forward.is_empty() {
        let mut outgoing = client.request(parts.method.clone(), format!("{upstream}{path}"));
        for (name, value) in &parts.headers {
            if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
                outgoing = outgoing.header(name, value);
            }
        }
        match outgoing.body(forward).send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Ok(bytes) => Some((status, bytes)),
                    Err(e) => return Ok(answer(502, e.to_string().into_bytes())),
                }
            }
            Err(e) => return Ok(answer(502, e.to_string().into_bytes())),
        }
    } else {
        None
    };
    if withheld.is_empty() {
        let (status, bytes) = forwarded.unwrap_or((502, Bytes::new()));
        return Ok(answer(status, bytes.to_vec()));
    }
    // Put the withheld items' failures back in their places.
    let mut items: Vec<Value> = match &forwarded {
        Some((200, bytes)) => serde_json::from_slice::<Value>(bytes)
            .ok()
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default(),
        Some((status, bytes)) => return Ok(answer(*status, bytes.to_vec())),
        None => Vec::new(),
    };
    for (position, op, status) in withheld {
        let failure = json!({op: {"status": status, "error": {
            "type": "es_rejected_execution_exception",
            "reason": "rejected by the fault proxy",
        }}});
        items.insert(position.min(items.len()), failure);
    }
    let body = json!({"took": 1, "errors": true, "items": items});
    Ok(answer(200, body.to_string().into_bytes()))
}

/// Splits a bulk body into what to forward and the items withheld: (position, action, status).
fn withhold(faults: &Faults, body: &[u8], fault: ItemFault) -> (Bytes, Vec<(usize, String, u16)>) {
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let mut forward = Vec::with_capacity(body.len());
    let mut withheld = Vec::new();
    let mut remaining = fault.remaining;
    for (position, pair) in lines.chunks(2).enumerate() {
        let op = serde_json::from_slice::<Value>(pair[0])
            .ok()
            .and_then(|v| v.as_object().and_then(|m| m.keys().next().cloned()))
            .unwrap_or_else(|| "index".into());
        let n = faults.items_seen.fetch_add(1, Ordering::Relaxed);
        if remaining > 0 && n.is_multiple_of(fault.every as u64) {
            remaining -= 1;
            withheld.push((position, op, fault.status));
            continue;
        }
        for line in pair {
            forward.extend_from_slice(line);
            forward.push(b'\n');
        }
    }
    faults
        .withheld
        .fetch_add(withheld.len() as u64, Ordering::Relaxed);
    if let Ok(mut items) = faults.items.lock() {
        *items = (remaining > 0).then_some(ItemFault { remaining, ..fault });
    }
    (Bytes::from(forward), withheld)
}
