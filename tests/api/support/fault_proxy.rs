//! A fault proxy between the service and the emulator, speaking ECR's JSON protocol: per
//! operation (`X-Amz-Target`) and per attempt (`amz-sdk-request: attempt=N`) it forwards the
//! request, or answers as a failing ECR would: throttling, a server error, a bare 503, a slow
//! answer, or an answer lost after the request was applied upstream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::recorded::{REQUEST_ID, read_request};

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass it to the emulator and its answer back.
    Forward,
    /// 400 `ThrottlingException: Rate exceeded`, as ECR throttles.
    Throttle,
    /// 500 `ServerException`.
    ServerError,
    /// A bare 503 with a text body, as a load balancer might answer.
    Bare503,
    /// Forward, but only after this long.
    Delay(Duration),
    /// Forward, let the emulator apply it, then close the connection without answering.
    ForwardThenDrop,
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The operation.
    pub operation: String,
    /// The SDK's attempt number for its call (1 for a first attempt).
    pub attempt: u32,
    /// When it arrived (the proxy's own clock: `std`, as it runs on a runtime of its own).
    pub at: Instant,
    /// What the proxy did.
    pub fault: Fault,
    /// The `authorization` header: which credentials signed it.
    pub authorization: String,
    /// The request body.
    pub body: Vec<u8>,
    /// The emulator's answer, whole (status line, headers, body); empty when not forwarded.
    pub answer: Vec<u8>,
}

impl Seen {
    /// The access key id that signed the request (SigV4's `Credential=AKID/...`).
    pub fn access_key(&self) -> &str {
        self.authorization
            .split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
    }
}

type Plan = dyn Fn(&str, u32) -> Fault + Send + Sync;

/// A running fault proxy.
pub struct FaultProxy {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FaultProxy {
    /// Proxies to `upstream` (the emulator's endpoint), deciding each request's fate with
    /// `plan(operation, attempt)`.
    pub async fn start(
        upstream: &str,
        plan: impl Fn(&str, u32) -> Fault + Send + Sync + 'static,
    ) -> Self {
        let upstream: SocketAddr = upstream.trim_start_matches("http://").parse().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let plan: Arc<Plan> = Arc::new(plan);
        let log = Arc::clone(&seen);
        // On a thread and runtime of its own: arrival times are when requests reach the
        // proxy, as ECR would see them, not when a runtime busy with the service under test
        // gets round to reading them. The thread ends with the test binary.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(handle(
                        stream,
                        upstream,
                        Arc::clone(&plan),
                        Arc::clone(&log),
                    ));
                }
            });
        });
        Self { endpoint, seen }
    }

    /// Proxies to `upstream`, holding every request for `operation` `delay` (an ECR that is
    /// slow to answer it).
    pub async fn delaying(upstream: &str, operation: &'static str, delay: Duration) -> Self {
        Self::start(upstream, move |asked, _| {
            if asked == operation {
                Fault::Delay(delay)
            } else {
                Fault::Forward
            }
        })
        .await
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// When each request for `operation` arrived, in order.
    pub fn arrivals(&self, operation: &str) -> Vec<Instant> {
        let mut at: Vec<Instant> = self
            .seen()
            .iter()
            .filter(|s| s.operation == operation)
            .map(|s| s.at)
            .collect();
        at.sort();
        at
    }

    /// How many requests for `operation` arrived.
    pub fn count(&self, operation: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.operation == operation)
            .count()
    }
}

async fn handle(
    mut client: TcpStream,
    upstream: SocketAddr,
    plan: Arc<Plan>,
    log: Arc<Mutex<Vec<Seen>>>,
) {
    let Some(request) = read_request(&mut client).await else {
        return;
    };
    let operation = request.operation();
    let attempt = request
        .headers
        .get("amz-sdk-request")
        .and_then(|v| v.split(';').find_map(|p| p.trim().strip_prefix("attempt=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let fault = plan(&operation, attempt);
    let at = Instant::now();
    let authorization = request
        .headers
        .get("authorization")
        .cloned()
        .unwrap_or_default();
    // Logged on arrival (tests watch for requests still held), its answer added when it comes.
    let index = {
        let mut log = log.lock().unwrap();
        log.push(Seen {
            operation,
            attempt,
            at,
            fault,
            authorization,
            body: request.body.clone(),
            answer: Vec::new(),
        });
        log.len() - 1
    };
    let error = |status: u16, code: &str, message: &str| {
        let body = serde_json::json!({ "__type": code, "message": message }).to_string();
        respond(status, "application/x-amz-json-1.1", body)
    };
    let answer = match fault {
        Fault::Throttle => error(400, "ThrottlingException", "Rate exceeded"),
        Fault::ServerError => error(500, "ServerException", "Internal error"),
        Fault::Bare503 => respond(503, "text/plain", "Service Unavailable".into()),
        Fault::Delay(delay) => {
            tokio::time::sleep(delay).await;
            forward(upstream, &request.head, &request.body).await
        }
        Fault::Forward => forward(upstream, &request.head, &request.body).await,
        Fault::ForwardThenDrop => {
            let _ = forward(upstream, &request.head, &request.body).await;
            return;
        }
    };
    log.lock().unwrap()[index].answer = answer.clone();
    let _ = client.write_all(&answer).await;
    let _ = client.shutdown().await;
}

fn respond(status: u16, content_type: &str, body: String) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} Fault\r\ncontent-type: {content_type}\r\nx-amzn-RequestId: \
         {REQUEST_ID}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends the request to the emulator and returns its whole answer (it closes the connection
/// after every response).
pub async fn forward(upstream: SocketAddr, head: &[u8], body: &[u8]) -> Vec<u8> {
    let mut answer = Vec::new();
    if let Ok(mut stream) = TcpStream::connect(upstream).await {
        let _ = stream.write_all(head).await;
        let _ = stream.write_all(body).await;
        let _ = stream.read_to_end(&mut answer).await;
    }
    answer
}
