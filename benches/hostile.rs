//! The hostile-input benchmark (`cargo bench --bench hostile`): each attack of the hostile-input
//! review, run against the release binary on loopback with its default settings (the embedded
//! store, so that no emulator shares the CPU; the cancelled-callers attack needs an ECR that
//! answers slowly, so it runs on the ECR backend against a recorded ECR answering in 1 s).
//!
//! Each attack runs in a fresh process and reports: the gRPC health Check latency while it runs
//! (a check every 20 ms), the process's peak resident memory (VmHWM), the largest trailer
//! (`grpc-message` plus `grpc-status-details-bin`) an attacker got back, and the longest log
//! line the process wrote. The results are in `docs/benchmark.md`.

/// For its `busiest_second`, the one count of a one-second window the tests use.
#[allow(dead_code)]
#[path = "../tests/api/support/fair_shares.rs"]
mod fair_shares;
/// The recording proxy `fair_shares` names (as `super::fault_proxy`, beside `recorded`).
#[allow(dead_code)]
#[path = "../tests/api/support/fault_proxy.rs"]
mod fault_proxy;
#[allow(dead_code)]
#[path = "../tests/api/support/recorded.rs"]
mod recorded;
#[allow(dead_code)]
#[path = "../tests/api/support/requests.rs"]
mod requests;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::{GetImageRequest, ImageIdentifier, PutImageRequest, RetagImageRequest};
use requests::as_xfcc;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const BINARY: &str = env!("CARGO_BIN_EXE_ecr-image-service");
/// How long each attack runs.
const ATTACK: Duration = Duration::from_secs(6);
/// The image every legitimate call reads.
const SEED: &str = include_str!("../tests/fixtures/hello-world.manifest.json");

/// The binary, started on loopback with its defaults but for the backend's own settings.
struct Service {
    child: Child,
    address: String,
    admin: String,
    longest_line: Arc<AtomicUsize>,
    _dir: Option<std::path::PathBuf>,
}

impl Service {
    fn start(backend: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hostile-bench-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        // `HOSTILE_SERVICE_BIN` attacks another build (the "before" of a change).
        let binary = std::env::var("HOSTILE_SERVICE_BIN").unwrap_or_else(|_| BINARY.to_owned());
        let mut command = Command::new(binary);
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(backend)
            .env_clear()
            .env("HOME", std::env::temp_dir())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if backend.contains(&"local") {
            command.arg("--data-dir").arg(&dir);
        }
        let mut child = command.spawn().expect("start the binary");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let longest_line = Arc::new(AtomicUsize::new(0));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let longest = Arc::clone(&longest_line);
        std::thread::spawn(move || {
            let mut address_tx = Some(address_tx);
            for line in stderr.split(b'\n').map_while(Result::ok) {
                longest.fetch_max(line.len(), Ordering::Relaxed);
                let text = String::from_utf8_lossy(&line);
                if let Some((_, rest)) = text.split_once(" address=")
                    && let Some(tx) = address_tx.take()
                {
                    let address = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let admin = text
                        .split_once(" admin_address=")
                        .and_then(|(_, r)| r.split_whitespace().next())
                        .unwrap_or("")
                        .to_owned();
                    let _ = tx.send((address, admin));
                }
            }
        });
        let (address, admin) = address_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a listening line");
        Self {
            child,
            address,
            admin,
            longest_line,
            _dir: Some(dir),
        }
    }

    fn local() -> Self {
        Self::start(&["--backend", "local"], &[])
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn peak_resident_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self._dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Health Check latencies while `running` is set.
async fn probe_health(channel: Channel, running: Arc<AtomicBool>) -> Vec<Duration> {
    let mut health = HealthClient::new(channel);
    let mut latencies = Vec::new();
    while running.load(Ordering::Relaxed) {
        let started = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            health.check(HealthCheckRequest::default()),
        )
        .await;
        latencies.push(started.elapsed());
        if !matches!(answer, Ok(Ok(_))) {
            latencies.push(Duration::from_secs(30));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies
}

/// What one attack cost the service.
#[derive(Default)]
struct Report {
    health: Vec<Duration>,
    largest_trailer: usize,
    note: String,
}

fn trailer_bytes(status: &tonic::Status) -> usize {
    status.message().len() + status.details().len()
}

/// Runs `attack` against a fresh service for [`ATTACK`] while health is probed, and prints a
/// row of the results table.
async fn measure<F, Fut>(name: &str, service: Service, attack: F)
where
    F: FnOnce(Arc<Service>, Instant) -> Fut,
    Fut: std::future::Future<Output = Report>,
{
    let service = Arc::new(service);
    let running = Arc::new(AtomicBool::new(true));
    let health = tokio::spawn(probe_health(service.channel().await, Arc::clone(&running)));
    let mut report = attack(Arc::clone(&service), Instant::now() + ATTACK).await;
    running.store(false, Ordering::Relaxed);
    report.health = health.await.unwrap();
    report.health.sort();
    let p99 = report.health[report.health.len() * 99 / 100];
    let max = report.health.last().copied().unwrap_or_default();
    println!(
        "| {name} | {:.1} ms / {:.1} ms | {:.1} MiB | {} B | {} B | {} |",
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        service.peak_resident_mib(),
        report.largest_trailer,
        service.longest_line.load(Ordering::Relaxed),
        report.note
    );
}

fn get(repository: &str, tag: &str) -> GetImageRequest {
    GetImageRequest {
        repository_name: repository.into(),
        image_id: Some(ImageIdentifier {
            image_tag: tag.into(),
            image_digest: String::new(),
        }),
        ..Default::default()
    }
}

fn put(repository: &str, tag: &str, manifest: &str) -> PutImageRequest {
    PutImageRequest {
        repository_name: repository.into(),
        image_tag: tag.into(),
        image_manifest: manifest.into(),
        ..Default::default()
    }
}

/// Calls `request` in a loop from `clients` tasks until `until`; the largest error trailer.
async fn hammer<Fut, Res>(
    channel: Channel,
    clients: usize,
    until: Instant,
    request: impl Fn(ImageServiceClient<Channel>) -> Fut + Clone + Send + 'static,
) -> (usize, usize)
where
    Fut: std::future::Future<Output = Result<Res, tonic::Status>> + Send,
{
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let client = ImageServiceClient::new(channel.clone())
                .max_encoding_message_size(64 << 20)
                .max_decoding_message_size(64 << 20);
            let request = request.clone();
            tokio::spawn(async move {
                let (mut largest, mut sent) = (0, 0);
                while Instant::now() < until {
                    if let Err(status) = request(client.clone()).await {
                        largest = largest.max(trailer_bytes(&status));
                    }
                    sent += 1;
                }
                (largest, sent)
            })
        })
        .collect();
    let mut total = (0, 0);
    for task in tasks {
        let (largest, sent) = task.await.unwrap();
        total = (total.0.max(largest), total.1 + sent);
    }
    total
}

/// [`hammer`] with 2 clients, as a report: the largest trailer, and `{sent} sent, {outcome}`.
async fn flood<Fut, Res>(
    service: Arc<Service>,
    until: Instant,
    outcome: &str,
    request: impl Fn(ImageServiceClient<Channel>) -> Fut + Clone + Send + 'static,
) -> Report
where
    Fut: std::future::Future<Output = Result<Res, tonic::Status>> + Send,
{
    let (largest, sent) = hammer(service.channel().await, 2, until, request).await;
    Report {
        largest_trailer: largest,
        note: format!("{sent} sent, {outcome}"),
        ..Report::default()
    }
}

/// One stream of a GetImage whose 100-byte message never finishes.
async fn dribble(
    sender: &mut h2::client::SendRequest<Bytes>,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = http::Request::post("http://localhost/imageservice.v1.ImageService/GetImage")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    *sender = sender.clone().ready().await.unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0]), false).unwrap();
    (response, body)
}

async fn run() {
    println!(
        "| attack (default settings) | health p99 / max | peak RSS | largest trailer | longest log line | notes |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    if std::env::var(ONLY_ENV).as_deref() == Ok("round2") {
        return round_two().await;
    }

    // Idle reference: nothing but the health probe.
    measure(
        "none (reference)",
        Service::local(),
        |_, until| async move {
            tokio::time::sleep_until(until.into()).await;
            Report::default()
        },
    )
    .await;

    // Finding 1: RetagImage with 100,000 targets (0.8 MB), two clients in a loop.
    measure(
        "RetagImage, 100,000 targets, 2 clients",
        Service::local(),
        |service, until| async move {
            let request = RetagImageRequest {
                repository_name: "bench".into(),
                source_image_id: Some(ImageIdentifier {
                    image_tag: "v1".into(),
                    image_digest: String::new(),
                }),
                target_tags: (0..100_000).map(|n| format!("t{n}")).collect(),
                ..Default::default()
            };
            flood(service, until, "each REQUEST_TOO_LARGE", move |mut c| {
                let request = request.clone();
                async move { c.retag_image(request).await.map(drop) }
            })
            .await
        },
    )
    .await;

    // Finding 2: GetImage just under its 64 KiB size limit, all empty accepted_media_types.
    measure(
        "GetImage, 30,000 empty media types, 2 clients",
        Service::local(),
        |service, until| async move {
            let mut request = get("bench", "v1");
            request.accepted_media_types = vec![String::new(); 30_000];
            flood(
                service,
                until,
                "INVALID_FIELD (10 violations listed)",
                move |mut c| {
                    let request = request.clone();
                    async move { c.get_image(request).await.map(drop) }
                },
            )
            .await
        },
    )
    .await;

    // Finding 3: two connections of 256 streams, one byte of a 100-byte body each, while a
    // legitimate client reads.
    measure(
        "slow bodies, 2 × 256 streams, + legitimate reads",
        Service::local(),
        |service, until| async move {
            let mut held = Vec::new();
            let mut largest = 0;
            let mut legit = ImageServiceClient::new(service.channel().await);
            let _ = legit.put_image(put("bench", "v1", SEED)).await;
            let (mut ok, mut failed) = (0, 0);
            while Instant::now() < until {
                if held.len() < 512 {
                    for _ in 0..2 {
                        let tcp = tokio::net::TcpStream::connect(&service.address)
                            .await
                            .unwrap();
                        let (mut sender, connection) = h2::client::handshake(tcp).await.unwrap();
                        tokio::spawn(connection);
                        for _ in 0..256 {
                            held.push(dribble(&mut sender).await);
                        }
                    }
                }
                match legit.get_image(get("bench", "v1")).await {
                    Ok(_) => ok += 1,
                    Err(status) => {
                        largest = largest.max(trailer_bytes(&status));
                        failed += 1;
                    }
                }
            }
            Report {
                largest_trailer: largest,
                note: format!("legitimate GetImage: {ok} OK, {failed} failed"),
                ..Report::default()
            }
        },
    )
    .await;

    // Finding 4: 10,000 client-cancelled GetImage calls, ECR answering in 1 s.
    let ecr = recorded::RecordedEcr::start(vec![(
        "BatchGetImage",
        recorded::Reply::ok(serde_json::json!({"images": [], "failures": []}))
            .after(Duration::from_secs(1)),
    )])
    .await;
    let service = Service::start(&["--ecr-endpoint-url", &ecr.endpoint], &ECR_ENV);
    measure(
        "10,000 cancelled GetImage (ECR answers in 1 s)",
        service,
        |service, _| async move {
            let pid = service.child.id();
            let resident = || {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.split_whitespace().next())
                            .and_then(|v| v.parse::<f64>().ok())
                    })
                    .unwrap_or(0.0)
                    / 1024.0
            };
            let before = resident();
            for wave in 0..50 {
                let channel = service.channel().await;
                let calls: Vec<_> = (0..200)
                    .map(|n| {
                        let mut client = ImageServiceClient::new(channel.clone());
                        let request = get("bench", &format!("w{wave}-n{n}"));
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                Duration::from_millis(50),
                                client.get_image(request),
                            )
                            .await;
                        })
                    })
                    .collect();
                for call in calls {
                    let _ = call.await;
                }
            }
            let during = resident();
            tokio::time::sleep(Duration::from_secs(3)).await;
            Report {
                note: format!(
                    "RSS before {before:.1} MiB, right after {during:.1} MiB, 3 s later {:.1} MiB",
                    resident()
                ),
                ..Report::default()
            }
        },
    )
    .await;

    // Finding 5: a forged line in a tag, and a 4 MB repository name in a put.
    measure(
        "log injection: newline tag, 4 MB repository name",
        Service::local(),
        |service, until| async move {
            let forged = "v1\n2026-12-01T00:00:00Z ERROR ecr_image_service: FORGED".to_owned();
            let huge = "a".repeat(4 << 20);
            flood(
                service,
                until,
                "each a GetImage and a PutImage",
                move |mut c| {
                    let (forged, huge) = (forged.clone(), huge.clone());
                    async move {
                        let first = c.get_image(get("bench", &forged)).await.map(drop);
                        let second = c.put_image(put(&huge, "v1", SEED)).await.map(drop);
                        first.and(second)
                    }
                },
            )
            .await
        },
    )
    .await;

    // Finding 6: 300 idle TCP connections to each port.
    measure(
        "300 idle connections to each port",
        Service::local(),
        |service, until| async move {
            use tokio::io::AsyncReadExt;
            let mut idle = Vec::new();
            for address in [&service.address, &service.admin] {
                for _ in 0..300 {
                    idle.push(
                        tokio::net::TcpStream::connect(address.as_str())
                            .await
                            .unwrap(),
                    );
                }
            }
            let started = Instant::now();
            let closed = Arc::new(Mutex::new(Duration::ZERO));
            let waits: Vec<_> = idle
                .into_iter()
                .map(|mut connection| {
                    let closed = Arc::clone(&closed);
                    tokio::spawn(async move {
                        let mut sink = Vec::new();
                        let _ = tokio::time::timeout(
                            Duration::from_secs(60),
                            connection.read_to_end(&mut sink),
                        )
                        .await;
                        let mut last = closed.lock().unwrap();
                        *last = (*last).max(started.elapsed());
                    })
                })
                .collect();
            for wait in waits {
                let _ = wait.await;
            }
            tokio::time::sleep_until(until.into()).await;
            let last = *closed.lock().unwrap();
            Report {
                note: format!(
                    "all 600 closed by the server after {:.1} s",
                    last.as_secs_f64()
                ),
                ..Report::default()
            }
        },
    )
    .await;

    // Finding 8: a 5 MiB PutImage message.
    measure(
        "PutImage of 5 MiB, 2 clients",
        Service::local(),
        |service, until| async move {
            let huge = format!(
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","x":"{}"}}"#,
                "x".repeat(5 << 20)
            );
            flood(service, until, "each REQUEST_TOO_LARGE", move |mut c| {
                let huge = huge.clone();
                async move { c.put_image(put("bench", "v1", &huge)).await.map(drop) }
            })
            .await
        },
    )
    .await;

    // Finding 10: 50 concurrent legal 4 MiB puts, over and over.
    measure("50 concurrent legal 4 MiB PutImage", Service::local(), |service, until| async move {
        let pad = 4 * 1024 * 1024 - 200;
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":1}},"layers":[],"annotations":{{"p":"{}"}}}}"#,
            "0".repeat(64),
            "x".repeat(pad - 200)
        );
        let channel = service.channel().await;
        let stored = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&stored);
        let (largest, sent) = hammer(channel, 50, until, move |mut c| {
            let (manifest, counted) = (manifest.clone(), Arc::clone(&counted));
            async move {
                let answer = c.put_image(put("bench", "big", &manifest)).await.map(drop);
                if answer.is_ok() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                answer
            }
        })
        .await;
        Report {
            largest_trailer: largest,
            note: format!(
                "{sent} sent, {} stored, the rest shed (OVERLOADED, RetryInfo)",
                stored.load(Ordering::Relaxed)
            ),
            ..Report::default()
        }
    })
    .await;
}

/// `HOSTILE_ONLY=round2` runs the attacks of the second review alone.
const ONLY_ENV: &str = "HOSTILE_ONLY";
/// The legitimate caller's repository in the round-two attacks; every other one is missing.
const LEGIT_REPOSITORY: &str = "legit";
/// The identity source of the round-two attacks: one caller must be told from another.
const XFCC: &str = "istio-xfcc";

/// The ECR backend's credentials and region, for a recorded ECR on loopback.
const ECR_ENV: [(&str, &str); 4] = [
    ("AWS_REGION", "us-east-1"),
    ("AWS_ACCESS_KEY_ID", "AKIDBENCHKEY"),
    (
        "AWS_SECRET_ACCESS_KEY",
        "benchSecretKey000000000000000000000000000",
    ),
    ("NO_PROXY", "127.0.0.1,localhost"),
];

/// The binary on the ECR backend in front of [`one_repository_ecr`] serving the seed image,
/// callers told apart by XFCC.
async fn two_callers_service() -> (Arc<recorded::RecordedEcr>, Service) {
    two_callers_service_of(SEED.to_owned(), DOCKER_MANIFEST).await
}

/// [`two_callers_service`], the repository's image `manifest` of `media_type`.
async fn two_callers_service_of(
    manifest: String,
    media_type: &'static str,
) -> (Arc<recorded::RecordedEcr>, Service) {
    let ecr = Arc::new(one_repository_ecr(manifest, media_type).await);
    let service = Service::start(
        &[
            "--ecr-endpoint-url",
            &ecr.endpoint,
            "--identity-source",
            XFCC,
        ],
        &ECR_ENV,
    );
    (ecr, service)
}

/// The seed image's media type.
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// An OCI index's media type.
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An OCI index of `children` distinct images, each for `platform(n)` when given.
fn index(children: usize, platform: impl Fn(usize) -> Option<serde_json::Value>) -> String {
    let manifests: Vec<serde_json::Value> = (0..children)
        .map(|n| {
            let mut entry = serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{n:064x}"),
                "size": 1,
            });
            if let Some(platform) = platform(n) {
                entry["platform"] = platform;
            }
            entry
        })
        .collect();
    serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
        .to_string()
}

/// An ECR that knows one repository, [`LEGIT_REPOSITORY`], holding `manifest` under every
/// tag; any other repository does not exist.
async fn one_repository_ecr(manifest: String, media_type: &'static str) -> recorded::RecordedEcr {
    let digest = ecr_image_service::image::Manifest::parse(manifest.clone(), None)
        .unwrap()
        .digest()
        .to_string();
    recorded::RecordedEcr::answering(move |operation, body| {
        let repository = body["repositoryName"].as_str().unwrap_or_default();
        if repository != LEGIT_REPOSITORY {
            return recorded::Reply::error(
                400,
                "RepositoryNotFoundException",
                &format!("The repository with name '{repository}' does not exist"),
            );
        }
        match operation {
            "BatchGetImage" => {
                let images: Vec<serde_json::Value> = body["imageIds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|id| {
                        serde_json::json!({
                            "registryId": "123456789012",
                            "repositoryName": LEGIT_REPOSITORY,
                            "imageId": {"imageDigest": digest, "imageTag": id["imageTag"]},
                            "imageManifest": manifest,
                            "imageManifestMediaType": media_type,
                        })
                    })
                    .collect();
                recorded::Reply::ok(serde_json::json!({"images": images, "failures": []}))
            }
            _ => recorded::Reply::ok(serde_json::json!({"imageIds": []})),
        }
    })
    .await
}

/// Caller B reads a fresh tag (`max_staleness` 0: a call to ECR each) every 20 ms until
/// `until`: OK count, total, p50 and p99.
async fn legitimate_reads(channel: Channel, until: Instant) -> (usize, usize, Duration, Duration) {
    let mut client = ImageServiceClient::new(channel);
    let (mut ok, mut latencies) = (0, Vec::new());
    while Instant::now() < until {
        let mut request = get(LEGIT_REPOSITORY, "v1");
        request.max_staleness = Some(prost_types::Duration::default());
        let mut request = as_xfcc("b", request);
        request.set_timeout(Duration::from_secs(5));
        let started = Instant::now();
        if client.get_image(request).await.is_ok() {
            ok += 1;
        }
        latencies.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    let at = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    (ok, latencies.len(), at(50), at(99))
}

/// The busiest one-second window of `operation` at the recorded ECR.
fn busiest_second(ecr: &recorded::RecordedEcr, operation: &str) -> usize {
    let times: Vec<Instant> = ecr
        .received()
        .into_iter()
        .filter(|r| r.operation == operation)
        .map(|r| r.at)
        .collect();
    fair_shares::busiest_second(&times)
}

/// The second review's attacks on upstream slots and watches (issue 20, finding 1): one caller
/// (A) attacks while another (B) reads fresh, on the ECR backend with the defaults but for
/// `--identity-source istio-xfcc` (without an identity every caller is one).
async fn round_two() {
    // 20,000 WatchTag, each on a repository of its own that does not exist.
    let (ecr, service) = two_callers_service().await;
    let counted = Arc::clone(&ecr);
    measure(
        "one caller's 20,000 WatchTag on distinct missing repositories (XFCC)",
        service,
        |service, until| async move {
            let attack_until = Instant::now() + Duration::from_secs(30);
            let next = Arc::new(AtomicUsize::new(0));
            let refused = Arc::new(AtomicUsize::new(0));
            let mut attackers = Vec::new();
            for _ in 0..10 {
                let channel = service.channel().await;
                for _ in 0..20 {
                    let (next, refused) = (Arc::clone(&next), Arc::clone(&refused));
                    let mut client = ImageServiceClient::new(channel.clone());
                    attackers.push(tokio::spawn(async move {
                        let mut open = Vec::new();
                        loop {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            if n >= 20_000 || Instant::now() > attack_until {
                                return open;
                            }
                            let request = ecr_image_service::pb::WatchTagRequest {
                                repository_name: format!("missing-{n}"),
                                image_tag: "live".into(),
                                ..Default::default()
                            };
                            match client.watch_tag(as_xfcc("a", request)).await {
                                Ok(stream) => open.push(stream),
                                Err(_) => {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }));
                }
            }
            let legit = legitimate_reads(service.channel().await, until).await;
            let mut open = 0;
            for attacker in attackers {
                open += attacker.await.unwrap().len();
            }
            let (ok, total, p50, p99) = legit;
            Report {
                note: format!(
                    "A: {} watches asked, {open} opened, {} refused; B's fresh GetImage: {ok}/{total} \
                     OK, p50 {:.1} ms, p99 {:.1} ms; BatchGetImage at ECR: busiest second {} \
                     (budget 2,000/s)",
                    next.load(Ordering::Relaxed).min(20_000),
                    refused.load(Ordering::Relaxed),
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3,
                    busiest_second(&counted, "BatchGetImage"),
                ),
                ..Report::default()
            }
        },
    )
    .await;

    // 600 ListImages of a missing repository held by one caller, 120 s deadlines.
    let (ecr, service) = two_callers_service().await;
    let counted = Arc::clone(&ecr);
    measure(
        "one caller's 600 held ListImages, 120 s deadlines (XFCC)",
        service,
        |service, until| async move {
            let channel = service.channel().await;
            let held: Vec<_> = (0..600)
                .map(|_| {
                    let mut client = ImageServiceClient::new(channel.clone());
                    tokio::spawn(async move {
                        let mut request = as_xfcc(
                            "a",
                            ecr_image_service::pb::ListImagesRequest {
                                repository_name: "missing".into(),
                                ..Default::default()
                            },
                        );
                        request.set_timeout(Duration::from_secs(120));
                        client.list_images(request).await
                    })
                })
                .collect();
            let (ok, total, p50, p99) = legitimate_reads(service.channel().await, until).await;
            let mut b = ImageServiceClient::new(service.channel().await);
            let mut listing = as_xfcc(
                "b",
                ecr_image_service::pb::ListImagesRequest {
                    repository_name: LEGIT_REPOSITORY.into(),
                    ..Default::default()
                },
            );
            listing.set_timeout(Duration::from_secs(5));
            let asked = Instant::now();
            let b_listing = b.list_images(listing).await;
            let b_listing_took = asked.elapsed();
            for call in &held {
                call.abort();
            }
            Report {
                note: format!(
                    "B's fresh GetImage: {ok}/{total} OK, p50 {:.1} ms, p99 {:.1} ms; B's \
                     ListImages: {} in {:.0} ms; A's ListImages at ECR so far: {}; BatchGetImage \
                     busiest second {} (budget 2,000/s)",
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3,
                    if b_listing.is_ok() { "OK" } else { "failed" },
                    b_listing_took.as_secs_f64() * 1e3,
                    counted.count("ListImages"),
                    busiest_second(&counted, "BatchGetImage"),
                ),
                ..Report::default()
            }
        },
    )
    .await;

    // Finding 4: PutImage of a 4 MiB index, its children checked at ECR 100 a call.
    let (ecr, service) = two_callers_service().await;
    let counted = Arc::clone(&ecr);
    let children = 27_000;
    let huge = index(children, |_| None);
    measure(
        "PutImage of a 3.9 MiB index (27,000 children), 2 clients",
        service,
        |service, until| async move {
            let bytes = huge.len();
            let mut first = ImageServiceClient::new(service.channel().await)
                .max_encoding_message_size(64 << 20);
            let refused = first
                .put_image(as_xfcc("a", put(LEGIT_REPOSITORY, "huge", &huge)))
                .await
                .err()
                .map(|status| status.message().to_owned())
                .unwrap_or_else(|| "stored".to_owned());
            let mut report = flood(service, until, "refused", move |mut c| {
                let huge = huge.clone();
                async move {
                    c.put_image(as_xfcc("a", put(LEGIT_REPOSITORY, "huge", &huge)))
                        .await
                        .map(drop)
                }
            })
            .await;
            report.note = format!(
                "{} ({bytes} bytes, {children} children): \"{refused}\"; ECR calls: {} \
                 BatchGetImage, {} PutImage",
                report.note,
                counted.count("BatchGetImage"),
                counted.count("PutImage")
            );
            report
        },
    )
    .await;

    // Finding 10: deletes by digest while the tag cache holds 20,000 resolutions.
    let service = Service::local();
    let channel = service.channel().await;
    let manifest = |n: usize| {
        format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","d":{n}}}"#)
    };
    let digests: Vec<String> = (0..1000)
        .map(|n| {
            ecr_image_service::image::Manifest::parse(manifest(n), None)
                .unwrap()
                .digest()
                .to_string()
        })
        .collect();
    // 1,000 images, 20 tags each, put through the service: the puts write the resolutions
    // through to the tag cache.
    let putters: Vec<_> = (0..20)
        .map(|worker| {
            let mut client = ImageServiceClient::new(channel.clone());
            tokio::spawn(async move {
                for n in (worker..20_000).step_by(20) {
                    let request = put("bench", &format!("t{n}"), &manifest(n % 1000));
                    client.put_image(request).await.unwrap();
                }
            })
        })
        .collect();
    for putter in putters {
        putter.await.unwrap();
    }
    let mut reader = ImageServiceClient::new(channel.clone());
    reader.put_image(put("bench", "other", SEED)).await.unwrap();
    measure(
        "two deletes of 500 digests each, 20,000 tags cached, + a cached read",
        service,
        |_, until| async move {
            let deletes: Vec<_> = digests
                .chunks(500)
                .map(|chunk| {
                    let ids: Vec<(&str, &str)> = chunk.iter().map(|d| ("", d.as_str())).collect();
                    let request = requests::delete("bench", &ids);
                    let mut client = ImageServiceClient::new(channel.clone());
                    tokio::spawn(async move { client.batch_delete_image(request).await })
                })
                .collect();
            let mut slowest = Duration::ZERO;
            let mut reads = 0;
            while Instant::now() < until {
                let started = Instant::now();
                reader.get_image(get("bench", "other")).await.unwrap();
                slowest = slowest.max(started.elapsed());
                reads += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut deleted = 0;
            for delete in deletes {
                deleted += delete.await.unwrap().unwrap().into_inner().image_ids.len();
            }
            Report {
                note: format!(
                    "{deleted} ids deleted; an unrelated cached GetImage meanwhile: {reads} \
                     reads, slowest {:.1} ms",
                    slowest.as_secs_f64() * 1e3
                ),
                ..Report::default()
            }
        },
    )
    .await;

    // Finding 9: GetImage for a platform missing from a 20,753-entry index, from ECR.
    let entries = 20_753;
    let platform =
        |n: usize| Some(serde_json::json!({"os": "linux", "architecture": format!("a{n}")}));
    let (_ecr, service) = two_callers_service_of(index(entries, platform), OCI_INDEX).await;
    measure(
        "GetImage for a platform missing from a 20,753-entry index, 2 clients",
        service,
        |service, until| async move {
            flood(
                service,
                until,
                "PLATFORM_NOT_FOUND each",
                move |mut c| async move {
                    let mut request = get(LEGIT_REPOSITORY, "multi");
                    request.platform = Some(ecr_image_service::pb::Platform {
                        os: "plan9".into(),
                        architecture: "mips".into(),
                        ..Default::default()
                    });
                    c.get_image(as_xfcc("b", request)).await.map(drop)
                },
            )
            .await
        },
    )
    .await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}
