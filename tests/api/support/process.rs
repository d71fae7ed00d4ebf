//! The `ecr-image-service` binary as a process: a clean environment, its stderr lines, its
//! `listening` line, and its `/metrics`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary cargo built for this test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_ecr-image-service");
/// Start-up includes loading the AWS configuration; generous for a loaded CI machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A command with a clean environment and an empty `HOME` (so no AWS profile): nothing from the
/// host's AWS set-up leaks in, and the SDK never reaches for the instance metadata service (a
/// non-loopback address).
pub fn command(home: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Collects the child's stderr lines as they come.
pub fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for the `listening` line.
pub fn listening_line(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no 'listening' line within {DEADLINE:?}: {seen:#?}"));
        seen.push(line.clone());
        if let Ok(json) = serde_json::from_str::<Value>(&line)
            && json["message"] == "listening"
        {
            return json;
        }
    }
}

/// `GET /metrics` from the admin port, parsed by a Prometheus text-format parser.
pub async fn scrape(admin: &str) -> prometheus_parse::Scrape {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text")
    );
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include all of `labels` (0 when absent).
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The binary serving on loopback ports in front of the ECR at `ecr_endpoint`, with JSON logs,
/// the authorization policy `policy` (written into `home`) and `args` added.
pub struct Served {
    /// The process; killed on drop.
    pub child: Child,
    /// Its stderr lines, as they come.
    pub lines: mpsc::Receiver<String>,
    /// `127.0.0.1:PORT` of its gRPC listener.
    pub address: String,
    /// `127.0.0.1:PORT` of its admin listener.
    pub admin: String,
}

impl Served {
    /// Starts it and waits for its `listening` line.
    pub fn start(home: &std::path::Path, ecr_endpoint: &str, policy: &str, args: &[&str]) -> Self {
        std::fs::create_dir_all(home).unwrap();
        let policy_file = home.join("policy.yaml");
        std::fs::write(&policy_file, policy).unwrap();
        let mut child = command(home)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "json"])
            .arg("--authz-policy")
            .arg(&policy_file)
            .args(args)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL_ECR", ecr_endpoint)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .spawn()
            .unwrap();
        let lines = stderr_lines(&mut child);
        let listening = listening_line(&lines, &mut Vec::new());
        Self {
            address: listening["address"].as_str().unwrap().to_owned(),
            admin: listening["admin_address"].as_str().unwrap().to_owned(),
            child,
            lines,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
