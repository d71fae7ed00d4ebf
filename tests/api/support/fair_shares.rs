//! The fair-shares scenario of issue 12, shared by `tests/rate_budget.rs` (which asserts its
//! bounds) and the benchmark (which prints its figures): caller A keeps 40 PutImage in flight,
//! caller B puts once every 500 ms, both as Linkerd identities; the proxy in front of the
//! emulator records when each PutImage reaches "ECR".

use std::time::{Duration, Instant};

use ecr_image_service::pb::PutImageRequest;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

use super::fault_proxy::FaultProxy;

/// What the scenario measured.
#[derive(Debug)]
pub struct FairShares {
    /// Caller B's puts that succeeded, and failed.
    pub ok: usize,
    /// Caller B's puts that failed.
    pub failed: usize,
    /// Caller B's slowest put.
    pub slowest: Duration,
    /// PutImage requests that reached the proxy.
    pub sent: usize,
    /// Seconds from the first to the last of them.
    pub span: f64,
    /// The most of them within any one second.
    pub busiest: usize,
}

impl FairShares {
    /// The share of a `rate`-per-second budget ECR saw while demand exceeded it.
    pub fn used(&self, rate: f64) -> f64 {
        self.sent.saturating_sub(1) as f64 / self.span.max(f64::EPSILON) / rate
    }
}

/// The busiest one-second window of `sent`.
pub fn busiest_second(sent: &[Instant]) -> usize {
    sent.iter()
        .map(|start| {
            sent.iter()
                .filter(|t| **t >= *start && **t < *start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn put_as(caller: &str, repository: &str, tag: String) -> tonic::Request<PutImageRequest> {
    let manifest =
        format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","t":"{tag}"}}"#);
    let mut request = tonic::Request::new(PutImageRequest {
        repository_name: repository.into(),
        image_tag: tag,
        image_manifest: manifest,
        ..Default::default()
    });
    let identity = format!("{caller}.ci.serviceaccount.identity.linkerd.cluster.local");
    request
        .metadata_mut()
        .insert("l5d-client-id", identity.parse().unwrap());
    request
}

/// Runs the scenario for `run` against the service on `channel` (identity source `linkerd`),
/// whose ECR is behind `proxy`.
pub async fn run(
    channel: Channel,
    repository: &'static str,
    proxy: &FaultProxy,
    run: Duration,
) -> FairShares {
    let started = Instant::now();
    let busy: Vec<_> = (0..40)
        .map(|worker| {
            let mut client = ImageServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while started.elapsed() < run {
                    let tag = format!("a-{worker}-{n}");
                    let _ = client.put_image(put_as("builder", repository, tag)).await;
                    n += 1;
                }
            })
        })
        .collect();
    let mut client = ImageServiceClient::new(channel);
    let (mut slowest, mut ok, mut failed) = (Duration::ZERO, 0, 0);
    while started.elapsed() < run {
        let asked = Instant::now();
        let tag = format!("b-{ok}-{failed}");
        match client.put_image(put_as("deployer", repository, tag)).await {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep_until((asked + Duration::from_millis(500)).into()).await;
    }
    for worker in busy {
        worker.await.unwrap();
    }
    let sent = proxy.arrivals("PutImage");
    let span = sent.last().zip(sent.first()).map_or(0.0, |(last, first)| {
        last.duration_since(*first).as_secs_f64()
    });
    FairShares {
        ok,
        failed,
        slowest,
        sent: sent.len(),
        span,
        busiest: busiest_second(&sent),
    }
}
