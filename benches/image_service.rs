//! `cargo bench`: the cache against its limits, on this machine, in one run.
//!
//! Everything runs on loopback and is started here: the moto emulator, the service (cache over
//! the real ECR backend), and a bare tonic server that answers GetImage with the same response
//! bytes and no logic at all. One in-process load generator drives both with the same
//! concurrency, alternating rounds so the machine's drift hits both sides alike. Printed:
//!
//! - limit: RPS and p50/p99 of the bare server vs cached GetImage by tag and by digest;
//! - cold path: uncached GetImage vs the same BatchGetImage made directly with aws-sdk-ecr;
//! - herd: upstream calls for 10,000 concurrent reads of one tag over 100 connections, and 500
//!   of distinct tags;
//! - fair shares: a caller with 40 puts in flight against one putting every 500 ms, on the
//!   default 10/s PutImage budget, counted at a proxy in front of the emulator;
//! - memory: resident memory after 100,000 distinct manifests pass through a 64 MiB cache
//!   (in a child process, so nothing else is in its heap).
//!
//! Every setting is the production default (`EcrSettings`, `CacheSettings` and `ServerSettings`
//! `::default()`), but for the endpoint and region of the emulator: a figure here is what a user
//! running the defaults gets. Set-up data is put straight into the emulator, so no budget paces
//! it. Targets are printed beside the figures; the bench reports, it does not fail.
//!
//! `BENCH_ECR_LATENCY_MS=N` holds every BatchGetImage N ms at a proxy in front of the emulator,
//! for the service and the direct client alike: the cold path against an ECR slower than a
//! loopback emulator, whose 3 ms answers make one gRPC hop (0.2 ms) look like 7%.

#[path = "../tests/api/support/fair_shares.rs"]
mod fair_shares;
/// The recording proxy of the tests (it reads requests with `recorded`'s parser, as
/// `super::recorded`: both sit at this crate's root, as in the tests' support module).
#[allow(dead_code)]
#[path = "../tests/api/support/fault_proxy.rs"]
mod fault_proxy;
#[path = "../tests/api/support/moto.rs"]
mod moto;
#[allow(dead_code)]
#[path = "../tests/api/support/recorded.rs"]
mod recorded;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_ecr::config::{BehaviorVersion, Credentials, Region};
use ecr_image_service::image::{Manifest, RepositoryName};
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::image_service_server::{ImageService, ImageServiceServer};
use ecr_image_service::pb::{
    GetImageRequest, GetImageResponse, ImageIdentifier, PutImageRequest, PutImageResponse,
    ResolveImageRequest, ResolveImageResponse, RetagImageRequest, RetagImageResponse,
};
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::ecr::calls::UpstreamCalls;
use ecr_image_service::registry::ecr::{EcrRegistry, EcrSettings, client_config};
use ecr_image_service::registry::{
    BoxFuture, Fetched, GetImageInput, PutImageInput, PutOutcome, Registry, RegistryError,
    StoredImage,
};
use ecr_image_service::server::{self as server, ServerSettings};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

const SEED: &str = include_str!("../tests/fixtures/hello-world.manifest.json");
const SEED_DIGEST: &str = "sha256:8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae";
const REGION: &str = "us-east-1";
const REPOSITORY: &str = "bench";

/// In-flight requests from the load generator: enough to keep 2 cores busy.
const CONCURRENCY: usize = 32;
/// HTTP/2 connections the load is spread over.
const CONNECTIONS: usize = 4;
/// Length of one measured run, after a warm-up of [`WARM_UP`].
const RUN: Duration = Duration::from_secs(3);
const WARM_UP: Duration = Duration::from_millis(500);
/// Alternating rounds of (bare, by tag, by digest); the median round is reported. Five, not
/// three: this machine drifts by tens of percent within minutes, and a median of three rounds
/// moved a ratio by ±0.1 from one run to the next.
const ROUNDS: usize = 5;
/// Sequential cold reads per side.
const COLD_READS: usize = 300;
/// The memory phase: number of distinct manifests (through the default 64 MiB budget).
const MEMORY_MANIFESTS: usize = 100_000;
/// `BENCH_ONLY=cold` runs the cold path alone (the phase the miss path's changes move).
const ONLY_ENV: &str = "BENCH_ONLY";
/// Milliseconds every BatchGetImage is held at a proxy in front of the emulator (see the
/// module); unset, none and no proxy.
const LATENCY_ENV: &str = "BENCH_ECR_LATENCY_MS";
/// Set in the child process that runs the memory phase.
const MEMORY_PHASE_ENV: &str = "ECR_IMAGE_SERVICE_BENCH_MEMORY_PHASE";

fn main() {
    if let Ok(variant) = std::env::var(MEMORY_PHASE_ENV) {
        return memory_phase(variant == "tagged");
    }
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("NO_PROXY", "127.0.0.1,localhost") };
    // The production subscriber at its default level: spans and their fields cost what they
    // cost in production; successes log nothing at INFO.
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::sink)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
    if std::env::var(ONLY_ENV).is_err() {
        println!();
        println!("{}", memory());
    }
}

/// The production defaults, pointed at the emulator.
fn ecr_settings(endpoint: &str) -> EcrSettings {
    EcrSettings {
        region: Some(REGION.into()),
        endpoint_url: Some(endpoint.into()),
        ..EcrSettings::default()
    }
}

fn sdk_config() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(Credentials::new(
                "testing", "testing", None, None, "bench",
            )),
        )
        .build()
}

async fn serve<S>(service: S) -> Vec<Channel>
where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // The same transport settings as the service's server: TCP_NODELAY above all.
    tokio::spawn(Server::builder().add_service(service).serve_with_incoming(
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
    ));
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        channels.push(channel);
    }
    channels
}

/// The service as `serve` runs it, on the defaults, through the production serve path.
async fn start_service(endpoint: &str) -> (Vec<Channel>, UpstreamCalls, std::net::SocketAddr) {
    let settings = ecr_settings(endpoint);
    let config = client_config(&sdk_config(), &settings);
    let ecr = EcrRegistry::from_config(config, settings.batch_window);
    let calls = ecr.calls().clone();
    let registry = CachedRegistry::new(Arc::new(ecr), CacheSettings::default());
    let bound = server::bind(ServerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerSettings::default()
    })
    .await
    .unwrap();
    let address = bound.address();
    tokio::spawn(bound.serve(Arc::new(registry), std::future::pending()));
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(
            Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    (channels, calls, address)
}

/// The bare server: the same response bytes, no logic.
#[derive(Clone)]
struct Bare(Arc<GetImageResponse>);

#[tonic::async_trait]
impl ImageService for Bare {
    async fn put_image(
        &self,
        _: Request<PutImageRequest>,
    ) -> Result<Response<PutImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn get_image(
        &self,
        _: Request<GetImageRequest>,
    ) -> Result<Response<GetImageResponse>, Status> {
        Ok(Response::new((*self.0).clone()))
    }

    async fn resolve_image(
        &self,
        _: Request<ResolveImageRequest>,
    ) -> Result<Response<ResolveImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn retag_image(
        &self,
        _: Request<RetagImageRequest>,
    ) -> Result<Response<RetagImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn batch_delete_image(
        &self,
        _: Request<ecr_image_service::pb::BatchDeleteImageRequest>,
    ) -> Result<Response<ecr_image_service::pb::BatchDeleteImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn list_images(
        &self,
        _: Request<ecr_image_service::pb::ListImagesRequest>,
    ) -> Result<Response<ecr_image_service::pb::ListImagesResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn describe_images(
        &self,
        _: Request<ecr_image_service::pb::DescribeImagesRequest>,
    ) -> Result<Response<ecr_image_service::pb::DescribeImagesResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    async fn list_referrers(
        &self,
        _: Request<ecr_image_service::pb::ListReferrersRequest>,
    ) -> Result<Response<ecr_image_service::pb::ListReferrersResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    type WatchTagStream = tokio_stream::wrappers::ReceiverStream<
        Result<ecr_image_service::pb::WatchTagResponse, Status>,
    >;

    async fn watch_tag(
        &self,
        _: Request<ecr_image_service::pb::WatchTagRequest>,
    ) -> Result<Response<Self::WatchTagStream>, Status> {
        Err(Status::unimplemented("bare"))
    }
}

fn get(tag: &str, digest: &str) -> GetImageRequest {
    GetImageRequest {
        repository_name: REPOSITORY.into(),
        image_id: Some(ImageIdentifier {
            image_tag: tag.into(),
            image_digest: digest.into(),
        }),
        ..Default::default()
    }
}

/// What one load run measured.
struct Load {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// `CONCURRENCY` loops sending `request` for `run`, spread over the channels.
async fn drive(channels: &[Channel], request: &GetImageRequest, run: Duration) -> Load {
    let started = Instant::now();
    let deadline = started + run;
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|i| {
            let mut client = ImageServiceClient::new(channels[i % channels.len()].clone());
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(100_000);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let response = client.get_image(request.clone()).await;
                    latencies.push(sent.elapsed());
                    assert!(response.is_ok(), "{response:?}");
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Load {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
    }
}

fn median_by<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    runs.swap_remove(runs.len() / 2)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

async fn run() {
    let moto = moto::endpoint();
    let admin = aws_sdk_ecr::Client::from_conf(
        aws_sdk_ecr::config::Builder::from(&sdk_config())
            .endpoint_url(moto)
            .build(),
    );
    admin
        .create_repository()
        .repository_name(REPOSITORY)
        .send()
        .await
        .unwrap();
    // Kept alive for the run: the proxy serves while it is held.
    let slow = match std::env::var(LATENCY_ENV)
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        Some(ms) => Some(
            fault_proxy::FaultProxy::delaying(moto, "BatchGetImage", Duration::from_millis(ms))
                .await,
        ),
        None => None,
    };
    let upstream = slow.as_ref().map_or(moto, |proxy| proxy.endpoint.as_str());
    let (service, calls, address) = start_service(upstream).await;
    let mut client = ImageServiceClient::new(service[0].clone());
    client
        .put_image(PutImageRequest {
            repository_name: REPOSITORY.into(),
            image_tag: "2019.08".into(),
            image_manifest: SEED.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let template = client
        .get_image(get("2019.08", ""))
        .await
        .unwrap()
        .into_inner();
    let bare = serve(ImageServiceServer::new(Bare(Arc::new(template)))).await;
    let bare_channels = bare.clone();
    if std::env::var(ONLY_ENV).as_deref() == Ok("cold") {
        return cold_path(upstream, &admin, &service, &bare_channels).await;
    }

    // Limit.
    let by_tag = get("2019.08", "");
    let by_digest = get("", SEED_DIGEST);
    for (channels, request) in [
        (&bare, &by_tag),
        (&service, &by_tag),
        (&service, &by_digest),
    ] {
        drive(channels, request, WARM_UP).await;
    }
    let upstream_before = calls.calls("BatchGetImage");
    let (mut bares, mut tags, mut digests) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        bares.push(drive(&bare, &by_tag, RUN).await);
        tags.push(drive(&service, &by_tag, RUN).await);
        digests.push(drive(&service, &by_digest, RUN).await);
    }
    let upstream_during = calls.calls("BatchGetImage") - upstream_before;
    let ratios: Vec<(f64, f64, f64, f64)> = (0..ROUNDS)
        .map(|i| {
            (
                tags[i].rps / bares[i].rps,
                tags[i].p99.as_secs_f64() / bares[i].p99.as_secs_f64(),
                digests[i].rps / bares[i].rps,
                digests[i].p99.as_secs_f64() / bares[i].p99.as_secs_f64(),
            )
        })
        .collect();
    let tag_rps_ratio = median_by(ratios.iter().map(|r| r.0).collect(), |x| *x);
    let tag_p99_ratio = median_by(ratios.iter().map(|r| r.1).collect(), |x| *x);
    let digest_rps_ratio = median_by(ratios.iter().map(|r| r.2).collect(), |x| *x);
    let digest_p99_ratio = median_by(ratios.iter().map(|r| r.3).collect(), |x| *x);
    let bare = median_by(bares, |l| l.rps);
    let tag = median_by(tags, |l| l.rps);
    let digest = median_by(digests, |l| l.rps);
    println!(
        "limit: {CONCURRENCY} concurrent GetImage over {CONNECTIONS} HTTP/2 connections, \
         {ROUNDS} alternating rounds of {RUN:?}, median round"
    );
    println!("| scenario | requests/s | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    for (name, load) in [
        ("bare tonic server (same bytes)", &bare),
        ("GetImage by tag, cached", &tag),
        ("GetImage by digest, cached", &digest),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs |",
            load.rps,
            load.p50.as_secs_f64() * 1e6,
            load.p99.as_secs_f64() * 1e6
        );
    }
    println!(
        "by tag: {tag_rps_ratio:.2}x bare RPS (target >= 0.9: {}), p99 {tag_p99_ratio:.2}x \
         (target <= 1.5: {})",
        verdict(tag_rps_ratio >= 0.9),
        verdict(tag_p99_ratio <= 1.5)
    );
    println!(
        "by digest: {digest_rps_ratio:.2}x bare RPS (target >= 0.9: {}), p99 \
         {digest_p99_ratio:.2}x (target <= 1.5: {})",
        verdict(digest_rps_ratio >= 0.9),
        verdict(digest_p99_ratio <= 1.5)
    );
    println!("upstream BatchGetImage calls during the cached runs: {upstream_during}");

    cold_path(upstream, &admin, &service, &bare_channels).await;
    herd(&admin, &service, &calls, address).await;
    fair_shares(moto, &admin).await;
}

/// Sequential reads of uncached tags through the service vs the same BatchGetImage made
/// directly, alternating, each reading a distinct tag it has never read.
/// `upstream`: where the service's ECR is (the emulator, or a proxy that holds its answers).
async fn cold_path(
    upstream: &str,
    admin: &aws_sdk_ecr::Client,
    service: &[Channel],
    bare: &[Channel],
) {
    for n in 0..COLD_READS * 2 {
        admin
            .put_image()
            .repository_name(REPOSITORY)
            .image_manifest(format!(
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","cold":{n}}}"#
            ))
            .image_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
            .image_digest(
                Manifest::parse(
                    format!(
                        r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","cold":{n}}}"#
                    ),
                    None,
                )
                .unwrap()
                .digest()
                .to_string(),
            )
            .image_tag(format!("cold-{n}"))
            .send()
            .await
            .unwrap();
    }
    let direct = aws_sdk_ecr::Client::from_conf(
        client_config(&sdk_config(), &ecr_settings(upstream)).build(),
    );
    let mut client = ImageServiceClient::new(service[0].clone());
    let mut bare_client = ImageServiceClient::new(bare[0].clone());
    let (mut via_service, mut via_sdk) = (Vec::new(), Vec::new());
    let (mut cached, mut bare_trips) = (Vec::new(), Vec::new());
    for n in 0..COLD_READS {
        let sent = Instant::now();
        client
            .get_image(get(&format!("cold-{}", 2 * n), ""))
            .await
            .unwrap();
        via_service.push(sent.elapsed());
        // The same read again, now a hit: what the gRPC round trip alone costs.
        let sent = Instant::now();
        client
            .get_image(get(&format!("cold-{}", 2 * n), ""))
            .await
            .unwrap();
        cached.push(sent.elapsed());
        let sent = Instant::now();
        bare_client
            .get_image(get(&format!("cold-{}", 2 * n), ""))
            .await
            .unwrap();
        bare_trips.push(sent.elapsed());
        let sent = Instant::now();
        direct
            .batch_get_image()
            .repository_name(REPOSITORY)
            .image_ids(
                aws_sdk_ecr::types::ImageIdentifier::builder()
                    .image_tag(format!("cold-{}", 2 * n + 1))
                    .build(),
            )
            .set_accepted_media_types(Some(
                ecr_image_service::image::media_types::ALL_MANIFESTS
                    .map(str::to_owned)
                    .to_vec(),
            ))
            .send()
            .await
            .unwrap();
        via_sdk.push(sent.elapsed());
    }
    via_service.sort_unstable();
    via_sdk.sort_unstable();
    cached.sort_unstable();
    bare_trips.sort_unstable();
    let (service_p50, sdk_p50) = (percentile(&via_service, 50), percentile(&via_sdk, 50));
    let overhead = service_p50.as_secs_f64() / sdk_p50.as_secs_f64() - 1.0;
    // What a gRPC hop costs any tonic server here: the rest is the service's own work.
    let hop = percentile(&bare_trips, 50);
    let own = (service_p50.as_secs_f64() - hop.as_secs_f64()) / sdk_p50.as_secs_f64() - 1.0;
    println!();
    println!(
        "cold path ({COLD_READS} sequential uncached reads each, alternating): GetImage p50 \
         {:.2} ms vs direct aws-sdk-ecr BatchGetImage p50 {:.2} ms: overhead {:+.1}% \
         (target <= 5%: {}); the same reads cached: p50 {:.3} ms; the bare server's answer \
         (a gRPC hop alone): p50 {:.3} ms; the service's own overhead (minus that hop): {:+.1}%",
        service_p50.as_secs_f64() * 1e3,
        sdk_p50.as_secs_f64() * 1e3,
        overhead * 100.0,
        verdict(overhead <= 0.05),
        percentile(&cached, 50).as_secs_f64() * 1e3,
        hop.as_secs_f64() * 1e3,
        own * 100.0,
    );
}

/// Concurrent cold reads: one tag by 1,000 callers, then 500 distinct tags.
/// A rollout's herd: this many concurrent GetImage calls of one cold tag, over
/// [`HERD_CONNECTIONS`] HTTP/2 connections of their own.
const HERD_CALLS: usize = 10_000;
/// Connections the herd arrives over: 100 pods' sidecars, say.
const HERD_CONNECTIONS: usize = 100;

async fn herd(
    admin: &aws_sdk_ecr::Client,
    service: &[Channel],
    calls: &UpstreamCalls,
    address: std::net::SocketAddr,
) {
    let manifest = |n: usize| {
        format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","herd":{n}}}"#)
    };
    for n in 0..=500 {
        admin
            .put_image()
            .repository_name(REPOSITORY)
            .image_manifest(manifest(n))
            .image_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
            .image_digest(
                Manifest::parse(manifest(n), None)
                    .unwrap()
                    .digest()
                    .to_string(),
            )
            .image_tag(format!("herd-{n}"))
            .send()
            .await
            .unwrap();
    }
    let mut herd_channels = Vec::new();
    for _ in 0..HERD_CONNECTIONS {
        herd_channels.push(
            Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let before = calls.calls("BatchGetImage");
    let callers: Vec<_> = (0..HERD_CALLS)
        .map(|i| {
            let mut client = ImageServiceClient::new(herd_channels[i % HERD_CONNECTIONS].clone());
            tokio::spawn(async move { client.get_image(get("herd-500", "")).await })
        })
        .collect();
    let (mut correct, mut refused) = (0, Vec::new());
    for caller in callers {
        match caller.await.unwrap() {
            Ok(response) => {
                let image = response.into_inner().image.unwrap();
                correct += usize::from(image.image_manifest == manifest(500));
            }
            Err(status) => refused.push(status.code()),
        }
    }
    let one_tag = calls.calls("BatchGetImage") - before;
    println!(
        "herd: {HERD_CALLS} concurrent GetImage of one uncached tag over {HERD_CONNECTIONS} \
         connections -> {one_tag} BatchGetImage (target exactly 1: {}), {correct}/{HERD_CALLS} \
         answered correctly (target all: {}), {} refused {:?}",
        verdict(one_tag == 1),
        verdict(correct == HERD_CALLS),
        refused.len(),
        refused.first()
    );

    let before = calls.calls("BatchGetImage");
    let callers: Vec<_> = (0..500)
        .map(|n| {
            let mut client = ImageServiceClient::new(service[n % service.len()].clone());
            tokio::spawn(async move { (n, client.get_image(get(&format!("herd-{n}"), "")).await) })
        })
        .collect();
    let (mut correct, mut refused) = (0, 0);
    for caller in callers {
        let (n, result) = caller.await.unwrap();
        match result {
            Ok(response) => {
                let image = response.into_inner().image.unwrap();
                correct += usize::from(image.image_manifest == manifest(n));
            }
            Err(_) => refused += 1,
        }
    }
    let distinct = calls.calls("BatchGetImage") - before;
    println!(
        "herd: 500 concurrent GetImage of 500 distinct uncached tags -> {distinct} \
         BatchGetImage (target <= 10: {}), {correct}/500 answered correctly (target 500: {}), \
         {refused} refused",
        verdict(distinct <= 10),
        verdict(correct == 500)
    );
}

/// How long the fair-shares phase drives its two callers.
const FAIR_SHARES_RUN: Duration = Duration::from_secs(6);

/// The issue-12 scenario on the default PutImage budget (10/s): caller A keeps 40 puts in
/// flight, caller B puts once every 500 ms; a proxy in front of the emulator records when each
/// PutImage reaches "ECR".
async fn fair_shares(moto: &str, admin: &aws_sdk_ecr::Client) {
    use fault_proxy::{Fault, FaultProxy};
    let repository = "fair-shares";
    admin
        .create_repository()
        .repository_name(repository)
        .send()
        .await
        .unwrap();
    let proxy = FaultProxy::start(moto, |_, _| Fault::Forward).await;
    let settings = ecr_settings(&proxy.endpoint);
    let ecr = EcrRegistry::from_config(
        client_config(&sdk_config(), &settings),
        settings.batch_window,
    );
    let registry = CachedRegistry::new(Arc::new(ecr), CacheSettings::default());
    let bound = server::bind(ServerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        identity_source: ecr_image_service::identity::IdentitySource::Linkerd,
        ..ServerSettings::default()
    })
    .await
    .unwrap();
    let address = bound.address();
    tokio::spawn(bound.serve(Arc::new(registry), std::future::pending()));
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let shares = fair_shares::run(channel, repository, &proxy, FAIR_SHARES_RUN).await;
    let used = shares.used(10.0);
    println!(
        "fair shares (PutImage budget 10/s): caller B {} OK, {} failed, slowest {:.0} ms \
         (target all OK, <= 1500 ms: {}); ECR saw {} PutImage over {:.1} s = {:.0}% of the \
         budget (target >= 85%: {}), busiest second {} (target <= 10: {})",
        shares.ok,
        shares.failed,
        shares.slowest.as_secs_f64() * 1e3,
        verdict(shares.failed == 0 && shares.slowest <= Duration::from_millis(1500)),
        shares.sent,
        shares.span,
        used * 100.0,
        verdict(used >= 0.85),
        shares.busiest,
        verdict(shares.busiest <= 10)
    );
}

/// Runs the memory phase in child processes, untagged then tagged, and returns the reports.
fn memory() -> String {
    ["untagged", "tagged"]
        .map(|variant| {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .env(MEMORY_PHASE_ENV, variant)
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        })
        .join("\n")
}

/// A registry that accepts every put and holds nothing: the cache is what is measured.
struct Sink;

impl Registry for Sink {
    fn put_image(
        &self,
        input: PutImageInput,
    ) -> BoxFuture<'_, Result<(StoredImage, PutOutcome), RegistryError>> {
        let stored = input.into_stored("123456789012".into());
        Box::pin(async move { Ok((stored, PutOutcome::Created)) })
    }

    fn get_image(&self, _: GetImageInput) -> BoxFuture<'_, Result<Fetched, RegistryError>> {
        unreachable!("the memory phase only puts")
    }
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Puts 100,000 distinct seed-sized manifests through the write-through path of a cache with
/// its default 64 MiB budget and reports resident memory. Untagged, only the digest cache fills (the
/// budget under test); tagged, the tag cache also fills with 100,000 resolutions (bounded by
/// entry count, not by the byte budget).
fn memory_phase(tagged: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let before = resident_bytes();
    let cache = CachedRegistry::new(Arc::new(Sink), CacheSettings::default());
    let budget = CacheSettings::default().digest_cache_bytes;
    let repository = RepositoryName::parse(REPOSITORY).unwrap();
    runtime.block_on(async {
        for n in 0..MEMORY_MANIFESTS {
            // The seed with one digest changed: 2,461 bytes, each distinct.
            let text = SEED.replacen("cea5fe77", &format!("{n:08x}"), 1);
            let input = PutImageInput {
                registry_id: None,
                repository: repository.clone(),
                manifest: Manifest::parse(text, None).unwrap(),
                tag: tagged
                    .then(|| ecr_image_service::image::Tag::parse(&format!("m{n}")).unwrap()),
            };
            cache.put_image(input).await.unwrap();
        }
    });
    let held = cache.digest_cache_bytes();
    let after = resident_bytes();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "memory ({}): {MEMORY_MANIFESTS} distinct {}-byte manifests through a {:.0} MiB \
         cache: the cache holds {:.1} MiB by its weigher; resident {:.1} MiB before, {:.1} MiB \
         after (target <= budget + 64 MiB = {:.0} MiB: {})",
        if tagged {
            "tagged puts"
        } else {
            "untagged puts"
        },
        SEED.len(),
        mib(budget),
        mib(held),
        mib(before),
        mib(after),
        mib(budget + (64 << 20)),
        verdict(after <= budget + (64 << 20))
    );
}
