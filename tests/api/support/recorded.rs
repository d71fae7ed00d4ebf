//! Recorded ECR: a loopback HTTP server that answers the real `aws-sdk-ecr` with responses in
//! ECR's own wire format (awsJson1_1), for behaviour the emulator cannot produce: ECR-only error
//! codes, throttling, 5xx, failure entries, corrupted bytes. It records every request it gets.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The request ID every recorded response carries, so tests can see it travel to the caller.
pub const REQUEST_ID: &str = "5f3c9a1e-7b2d-4c8e-9f10-0123456789ab";

/// One recorded response.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    delay: Duration,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn ok(body: Value) -> Self {
        Self {
            status: 200,
            content_type: "application/x-amz-json-1.1",
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    /// An ECR error response: `{"__type": code, "message": message}`.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        Self {
            status,
            content_type: "application/x-amz-json-1.1",
            body: serde_json::json!({ "__type": code, "message": message }).to_string(),
            delay: Duration::ZERO,
        }
    }

    /// A bare HTTP status with a text body, as a load balancer in front of ECR might send.
    pub fn bare(status: u16) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: "Service Unavailable".into(),
            delay: Duration::ZERO,
        }
    }

    /// The same reply, sent only after `delay`.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A request as ECR would have received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The operation (`PutImage`), from `X-Amz-Target`.
    pub operation: String,
    /// The JSON body.
    pub body: Value,
    /// When it arrived.
    pub at: std::time::Instant,
}

type Script = HashMap<String, VecDeque<Reply>>;

/// Answers by what was asked: the operation and the JSON body.
type Answerer = dyn Fn(&str, &Value) -> Reply + Send + Sync;

/// A running recorded-ECR server.
pub struct RecordedEcr {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl RecordedEcr {
    /// Serves the scripted replies: per operation, in order, the last one repeating.
    pub async fn start(script: Vec<(&str, Reply)>) -> Self {
        let mut replies = Script::new();
        for (operation, reply) in script {
            replies
                .entry(operation.to_owned())
                .or_default()
                .push_back(reply);
        }
        let replies = Mutex::new(replies);
        Self::answering(move |operation, _| {
            let mut replies = replies.lock().unwrap();
            match replies.get_mut(operation) {
                Some(queue) if queue.len() > 1 => queue.pop_front(),
                Some(queue) => queue.front().cloned(),
                None => None,
            }
            .unwrap_or_else(|| {
                Reply::error(
                    400,
                    "UnrecordedOperation",
                    &format!("no reply for {operation}"),
                )
            })
        })
        .await
    }

    /// Serves what `answer` makes of each request (its operation and JSON body).
    pub async fn answering(reply: impl Fn(&str, &Value) -> Reply + Send + Sync + 'static) -> Self {
        let replies: Arc<Answerer> = Arc::new(reply);
        let received = Arc::new(Mutex::new(Vec::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, replies.clone(), log.clone()));
            }
        });
        Self { endpoint, received }
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// How many requests were received for `operation`.
    pub fn count(&self, operation: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| r.operation == operation)
            .count()
    }
}

async fn answer(mut stream: TcpStream, replies: Arc<Answerer>, log: Arc<Mutex<Vec<Received>>>) {
    let Some(incoming) = read_request(&mut stream).await else {
        return;
    };
    let operation = incoming.operation();
    let body: Value = serde_json::from_slice(&incoming.body).unwrap_or(Value::Null);
    let reply = replies(&operation, &body);
    log.lock().unwrap().push(Received {
        operation,
        body,
        at: std::time::Instant::now(),
    });
    tokio::time::sleep(reply.delay).await;
    let head = format!(
        "HTTP/1.1 {} Recorded\r\ncontent-type: {}\r\nx-amzn-RequestId: {REQUEST_ID}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(reply.body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// One HTTP/1.1 request as read off the socket.
pub struct Incoming {
    /// The request line and headers, byte for byte, for forwarding.
    pub head: Vec<u8>,
    /// The headers, names lower-cased.
    pub headers: HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Incoming {
    /// The operation: ECR's from `X-Amz-Target` (JSON protocol), STS's from the form body's
    /// `Action` (query protocol).
    pub fn operation(&self) -> String {
        if let Some((_, op)) = self
            .headers
            .get("x-amz-target")
            .and_then(|t| t.rsplit_once('.'))
        {
            return op.to_owned();
        }
        form_field(&self.body, "Action").unwrap_or_default()
    }
}

/// Reads one HTTP/1.1 request with a `content-length` body.
pub async fn read_request(stream: &mut TcpStream) -> Option<Incoming> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // A GET (a blob download) has no body.
    let length: usize = match headers.get("content-length") {
        Some(length) => length.parse().ok()?,
        None => 0,
    };
    if headers
        .get("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .ok()?;
    }
    let mut body = buffer[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Incoming {
        head: buffer[..head_end].to_vec(),
        headers,
        body,
    })
}

/// The value of `name` in a form-encoded body (`Action=AssumeRole&RoleSessionName=...`),
/// percent-decoded.
pub fn form_field(body: &[u8], name: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
