//! The fleet scenario of issue 14, shared by `tests/fleet.rs` (which asserts its bounds)
//! and the fleet benchmark (which prints its figures): three service processes, as the chart
//! runs them (defaults plus `--rate-share 3`, and `--redis-url` when given), in front of one
//! emulator, each through a fault proxy of its own, so that ECR's arrivals are known per
//! replica; callers keep PutImage calls in flight through one replica or all.

use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ecr_image_service::pb::image_service_client::ImageServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use super::fair_shares::busiest_second;
use super::fault_proxy::{Fault, FaultProxy};
use super::moto;
use super::process::{command, listening_line, sample, scrape, stderr_lines};
use super::requests::put;

/// A secret access key the replicas sign with.
const SECRET: &str = "fleetSecretKeyThatMustNeverBeLogged00000";
/// A refused caller waits what RetryInfo says, but never longer than this.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// One service process.
pub struct Replica {
    child: Child,
    /// Its stderr lines, kept flowing so the pipe never fills.
    _lines: mpsc::Receiver<String>,
    /// Its gRPC client.
    pub client: ImageServiceClient<Channel>,
    /// `127.0.0.1:PORT` of its admin port.
    pub admin: String,
    /// The proxy between it and the emulator.
    pub proxy: FaultProxy,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `count` replicas sharing `redis` when given, each with `args` added.
pub async fn start(count: usize, redis: Option<&str>, args: &[&str]) -> Vec<Replica> {
    start_with(count, redis, args, &[]).await
}

/// [`start`] with `env` added to each replica's environment; `--rate-share 3` unless `args`
/// set another.
pub async fn start_with(
    count: usize,
    redis: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Vec<Replica> {
    let share: &[&str] = if args.contains(&"--rate-share") {
        &[]
    } else {
        &["--rate-share", "3"]
    };
    let home = std::env::temp_dir().join(format!("ecr-image-service-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let mut replicas = Vec::new();
    for _ in 0..count {
        let proxy = FaultProxy::start(moto::endpoint(), |_, _| Fault::Forward).await;
        let mut child = command(&home)
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(share)
            .args(redis.map(|url| ["--redis-url", url]).into_iter().flatten())
            .args(args)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL_ECR", &proxy.endpoint)
            .env("AWS_ACCESS_KEY_ID", "AKIDFLEETTESTKEY")
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        let lines = stderr_lines(&mut child);
        let listening = listening_line(&lines, &mut Vec::new());
        let address = listening["address"].as_str().unwrap().to_owned();
        let admin = listening["admin_address"].as_str().unwrap().to_owned();
        let client = ImageServiceClient::connect(format!("http://{address}"))
            .await
            .unwrap();
        replicas.push(Replica {
            child,
            _lines: lines,
            client,
            admin,
            proxy,
        });
    }
    replicas
}

/// Waits until every replica's budgets are in `mode` (`redis` or `local`); how long it took.
pub async fn until_mode(replicas: &[Replica], mode: &str, within: Duration) -> Duration {
    let started = Instant::now();
    for replica in replicas {
        loop {
            let metrics = scrape(&replica.admin).await;
            if sample(&metrics, "imageservice_ecr_budget_mode", &[("mode", mode)]) == 1.0 {
                break;
            }
            assert!(
                started.elapsed() < within,
                "the budgets were not in {mode} mode within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    started.elapsed()
}

/// What callers saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcomes {
    /// Stored.
    pub ok: usize,
    /// Refused with UNAVAILABLE (no budget slot before the deadline).
    pub refused: usize,
    /// Failed otherwise (DEADLINE_EXCEEDED included).
    pub failed: usize,
    /// Calls that took longer than their deadline plus 500 ms: none should.
    pub overdue: usize,
    /// The slowest call.
    pub slowest: Duration,
}

/// Keeps `in_flight` PutImage calls going for `duration`, spread round robin over `targets`,
/// each call with `deadline`; a refused caller waits as RetryInfo says (at most a second).
pub async fn put_load(
    targets: &[ImageServiceClient<Channel>],
    repository: &str,
    in_flight: usize,
    duration: Duration,
    deadline: Duration,
) -> Outcomes {
    put_load_in(targets, "", repository, in_flight, duration, deadline).await
}

/// [`put_load`] into the registry of account `registry_id` ("" for the service's own).
pub async fn put_load_in(
    targets: &[ImageServiceClient<Channel>],
    registry_id: &str,
    repository: &str,
    in_flight: usize,
    duration: Duration,
    deadline: Duration,
) -> Outcomes {
    let until = Instant::now() + duration;
    let callers: Vec<_> = (0..in_flight)
        .map(|caller| {
            let mut client = targets[caller % targets.len()].clone();
            let repository = repository.to_owned();
            let registry_id = registry_id.to_owned();
            tokio::spawn(async move {
                let mut outcomes = Outcomes::default();
                let mut n = 0;
                while Instant::now() < until {
                    n += 1;
                    let manifest = format!(
                        r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","caller":{caller},"n":{n}}}"#
                    );
                    let mut message = put(&repository, &format!("c{caller}-{n}"), &manifest);
                    message.registry_id.clone_from(&registry_id);
                    let mut request = tonic::Request::new(message);
                    request.set_timeout(deadline);
                    let started = Instant::now();
                    let answer = client.put_image(request).await;
                    let took = started.elapsed();
                    outcomes.slowest = outcomes.slowest.max(took);
                    if took > deadline + Duration::from_millis(500) {
                        outcomes.overdue += 1;
                    }
                    match answer {
                        Ok(_) => outcomes.ok += 1,
                        Err(status) if status.code() == Code::Unavailable => {
                            outcomes.refused += 1;
                            let wait = status
                                .get_details_retry_info()
                                .and_then(|info| info.retry_delay)
                                .unwrap_or(MAX_BACKOFF);
                            tokio::time::sleep(wait.min(MAX_BACKOFF)).await;
                        }
                        Err(_) => outcomes.failed += 1,
                    }
                }
                outcomes
            })
        })
        .collect();
    let mut total = Outcomes::default();
    for caller in callers {
        let o = caller.await.unwrap();
        total.ok += o.ok;
        total.refused += o.refused;
        total.failed += o.failed;
        total.overdue += o.overdue;
        total.slowest = total.slowest.max(o.slowest);
    }
    total
}

/// PutImage requests that reached ECR from every replica, in order.
pub fn arrivals(replicas: &[Replica]) -> Vec<Instant> {
    let mut all: Vec<Instant> = replicas
        .iter()
        .flat_map(|replica| replica.proxy.arrivals("PutImage"))
        .collect();
    all.sort();
    all
}

/// PutImage requests for account `registry_id` ("" for the service's own, sent without one)
/// that reached ECR from every replica, in order.
pub fn arrivals_in(replicas: &[Replica], registry_id: &str) -> Vec<Instant> {
    let mut all: Vec<Instant> = replicas
        .iter()
        .flat_map(|replica| replica.proxy.seen())
        .filter(|seen| seen.operation == "PutImage")
        .filter(|seen| {
            let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
            body["registryId"].as_str().unwrap_or_default() == registry_id
        })
        .map(|seen| seen.at)
        .collect();
    all.sort();
    all
}

/// Of `sent`, those within `[from, to)`.
pub fn between(sent: &[Instant], from: Instant, to: Instant) -> Vec<Instant> {
    sent.iter()
        .copied()
        .filter(|at| *at >= from && *at < to)
        .collect()
}

/// Requests per second in `[from, to)`, and the busiest one-second window there.
pub fn rate(sent: &[Instant], from: Instant, to: Instant) -> (f64, usize) {
    let within = between(sent, from, to);
    let seconds = (to - from).as_secs_f64();
    (within.len() as f64 / seconds, busiest_second(&within))
}
