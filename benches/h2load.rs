//! The hot path, measured from outside: h2load (Debian's `nghttp2-client`) against the release
//! binary and against a bare tonic server that answers GetImage with the same response bytes
//! and no logic, in alternating pairs within one run.
//!
//! The server under test is pinned to core 0 and h2load to core 1 (`taskset`), so the load
//! generator never competes with the server it measures. The service runs on its defaults,
//! in front of the moto emulator (only the endpoint and region are set). Each round measures
//! the bare server, then the service by tag, then by digest, for [`RUN`] after [`WARM_UP`].
//! h2load counts a gRPC failure (HTTP 200, error in the trailers) as a success, so the
//! service's own OK count (its `/metrics`) is checked against h2load's count each run.
//!
//! `cargo bench --bench h2load` (needs `h2load` and `taskset` on PATH, and the moto venv that
//! `scripts/test-deps.sh` installs). `H2LOAD_ROUNDS` changes the number of rounds (default 3);
//! `H2LOAD_SERVICE_BIN` measures another build of the binary (the "before" of a change).
//! `H2LOAD_VERIFY=1` runs the service with a `verify:` rule (enforce) over the repository
//! read, the image signed with cosign's tag scheme: every cached read then also looks up its
//! verdict (issue 22's cost on the hot path). The emulator is reached through the test
//! extension that answers the ECR operations it lacks. `H2LOAD_VERIFY=compare` runs two
//! processes of this build in the same rounds, the same policy without and with that rule, and
//! reports verification's cost as the ratio of the two (on / off), round by round, and again
//! with both loaded at once on the shared server core (immune to the machine's drift).
//! `H2LOAD_VERIFY=aa` runs the same comparison between two identical processes without the
//! rule: what it reads when nothing differs. With `H2LOAD_A_BIN` set to another build, A is
//! that build: a before/after pair measured side by side (B/A above 1: this build is cheaper).
//!
//! Runs measured one after the other drift with the machine (the bare server's own rate moves
//! by 20% within minutes here). Each shape therefore also measures the service side by side
//! with the bare server: both loaded at once, sharing the server core, so that their rates'
//! ratio is their cost ratio (an A/A pair reads 0.99-1.00x, spread ±1%). `H2LOAD_ONLY=side`
//! runs only the side-by-side measures.
//!
//! The service runs its defaults (the multi-threaded scheduler, one worker on the one core), the
//! bare server tonic's usual `Runtime::new()`. `H2LOAD_WORKER_THREADS=N` passes
//! `--worker-threads N` to the service, and `H2LOAD_BARE_SCHEDULER=current-thread` runs the
//! bare server on Tokio's single-threaded scheduler, which writes a connection's ready answers
//! together as the service's connections do themselves (`src/transport/http2.rs`).

#[allow(dead_code)]
#[path = "../tests/api/support/ecr_ext.rs"]
mod ecr_ext;
#[allow(dead_code)]
#[path = "../tests/api/support/fault_proxy.rs"]
mod fault_proxy;
#[allow(dead_code)]
#[path = "../tests/api/support/moto.rs"]
mod moto;
#[allow(dead_code)]
#[path = "../tests/api/support/recorded.rs"]
mod recorded;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::image_service_server::{ImageService, ImageServiceServer};
use ecr_image_service::pb::{self, GetImageRequest, GetImageResponse, ImageIdentifier};
use prost::Message;
use tonic::{Request, Response, Status};

/// Measured time of one run.
const RUN: Duration = Duration::from_secs(4);
/// Unmeasured time before it: connections open, caches and allocator warm.
const WARM_UP: Duration = Duration::from_secs(1);
/// Connections × streams per connection.
const SHAPES: [(u32, u32); 2] = [(4, 8), (16, 8)];
const SERVER_CORE: &str = "0";
const LOAD_CORE: &str = "1";
const REPOSITORY: &str = "hot-path";
const TAG: &str = "v1";

fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("--bare") {
        let (address, response) = (args.next().unwrap(), args.next().unwrap());
        bare_server(address.parse().unwrap(), &std::fs::read(response).unwrap());
        return;
    }
    let rounds: usize = std::env::var("H2LOAD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let work = std::env::temp_dir().join(format!("h2load-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mode = std::env::var("H2LOAD_VERIFY").unwrap_or_default();
    let verify = mode == "1" || mode == "compare";
    // `aa`: two identical processes, no verify rule: what the comparison reads when nothing
    // differs (its calibration).
    let compare = mode == "compare" || mode == "aa";
    // Only the side-by-side measures (`H2LOAD_ONLY=side`).
    let side_only = std::env::var("H2LOAD_ONLY").is_ok_and(|o| o == "side");
    let signing = verify.then(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ext = runtime.block_on(ecr_ext::EcrExtension::start(moto::endpoint()));
        let pem: String = key
            .public_key_pem()
            .lines()
            .map(|l| format!("          {l}\n"))
            .collect();
        let rules = "rules:\n  - id: all\n    principals: [anonymous]\n    actions: [read, write]\n    repositories: [\"**\"]\n";
        let on = work.join("policy-verify.yaml");
        std::fs::write(
            &on,
            format!(
                "{rules}verify:\n  - id: hot\n    repositories: [\"{REPOSITORY}\"]\n    mode: enforce\n    keys:\n      - name: bench\n        pem: |\n{pem}"
            ),
        )
        .unwrap();
        let off = work.join("policy.yaml");
        std::fs::write(&off, rules).unwrap();
        (key, ext, off, on)
    });
    // The services measured, each its own process on the server core, measured in turn:
    // one, or (compare) the same build with the same policy but its verify rule, then with it.
    let mut services = Vec::new();
    if compare {
        let off = signing
            .as_ref()
            .map(|(_, ext, off, _)| (ext.endpoint.as_str(), off.as_path()));
        let name = if verify { "verification off" } else { "A" };
        // `aa` with H2LOAD_A_BIN: A is another build (the "before" of a change), side by side
        // with this one.
        let binary = std::env::var_os("H2LOAD_A_BIN")
            .filter(|_| !verify)
            .map_or_else(service_binary, PathBuf::from);
        services.push((name, start_service(binary, off)));
    }
    let name = match (verify, compare) {
        (true, _) => "verification on",
        (false, true) => "B",
        (false, false) => "service",
    };
    let policy = signing
        .as_ref()
        .map(|(_, ext, _, on)| (ext.endpoint.as_str(), on.as_path()));
    services.push((name, start_service(service_binary(), policy)));
    let (_, (_, seeded, _)) = services.last().unwrap();
    let answer = runtime.block_on(seed(*seeded, signing.as_ref().map(|(k, e, _, _)| (k, e))));
    if verify {
        let verdict = answer.verification.as_ref().expect("a verdict");
        assert!(verdict.passed, "{verdict:?}");
    }
    let digest = answer
        .image
        .as_ref()
        .and_then(|i| i.image_id.as_ref())
        .map(|id| id.image_digest.clone())
        .unwrap();
    for (_, (_, grpc, _)) in &services[..services.len() - 1] {
        runtime.block_on(warm(*grpc, &digest));
    }
    let response = work.join("response.bin");
    std::fs::write(&response, answer.encode_to_vec()).unwrap();
    let bare_address = free_address();
    let bare = pinned(
        Command::new(std::env::current_exe().unwrap())
            .arg("--bare")
            .arg(bare_address.to_string())
            .arg(&response),
    );
    wait_listening(bare_address);

    let by_tag = request_file(&work, "tag", TAG, "");
    let by_digest = request_file(&work, "digest", "", &digest);
    println!(
        "h2load pairs: server on core {SERVER_CORE}, h2load on core {LOAD_CORE}, \
         {rounds} alternating rounds of {RUN:?} after {WARM_UP:?}; response {} bytes; {}",
        answer.encoded_len(),
        services
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", then ")
    );
    let lookups = [("by tag", &by_tag), ("by digest", &by_digest)];
    for (connections, streams) in SHAPES {
        // Per round: the bare server's run, then each service's run of each lookup.
        let mut rows: Vec<(Run, Vec<Run>)> = Vec::new();
        for round in 0..if side_only { 0 } else { rounds } {
            let bare_run = h2load(bare_address, &by_tag, connections, streams, &work);
            let mut line = format!(
                "  {connections}x{streams} round {round}: bare {:.0}/s p99 {:.2} ms",
                bare_run.rps, bare_run.p99_ms
            );
            // Services take turns going first, so that neither gains from its place in a round
            // (an A/A run of two identical processes in a fixed order gave the second 0.95-0.99x).
            let mut runs: Vec<Option<Run>> = std::iter::repeat_with(|| None)
                .take(services.len() * lookups.len())
                .collect();
            for s in (0..services.len()).map(|k| (k + round) % services.len()) {
                let (name, (_, grpc, admin)) = &services[s];
                let ok_before = ok_count(*admin);
                let mut sent = 0;
                for (l, (lookup, data)) in lookups.iter().enumerate() {
                    let run = h2load(*grpc, data, connections, streams, &work);
                    line += &format!(
                        " | {name} {lookup} {:.0}/s ({:.3}x) p99 {:.2} ms ({:.2}x)",
                        run.rps,
                        run.rps / bare_run.rps,
                        run.p99_ms,
                        run.p99_ms / bare_run.p99_ms
                    );
                    sent += run.succeeded;
                    runs[s * lookups.len() + l] = Some(run);
                }
                let served = ok_count(*admin) - ok_before;
                assert!(
                    served >= sent,
                    "{name} answered {served} GetImage OK, h2load counted {sent}"
                );
            }
            println!("{line}");
            rows.push((bare_run, runs.into_iter().flatten().collect()));
        }
        let ratio = |i: usize, of: Option<usize>, f: fn(&Run) -> f64| -> Vec<f64> {
            rows.iter()
                .map(|(bare, runs)| f(&runs[i]) / of.map_or_else(|| f(bare), |j| f(&runs[j])))
                .collect()
        };
        for (s, (name, _)) in services.iter().enumerate().filter(|_| !side_only) {
            for (l, (lookup, _)) in lookups.iter().enumerate() {
                let i = s * lookups.len() + l;
                let (rps, p99) = (ratio(i, None, |r| r.rps), ratio(i, None, |r| r.p99_ms));
                println!(
                    "{connections}x{streams} {name} {lookup}: throughput {:.3}x the bare server \
                     (median; spread {:.3}-{:.3}), p99 {:.2}x (median; spread {:.2}-{:.2})",
                    median(&rps),
                    min(&rps),
                    max(&rps),
                    median(&p99),
                    min(&p99),
                    max(&p99)
                );
            }
        }
        let (name, (_, service, _)) = services.last().unwrap();
        for (lookup, data) in lookups {
            let pair = [bare_address, *service];
            let side = side_by_side(pair, data, connections, streams, rounds, &work);
            println!(
                "{connections}x{streams} {name} {lookup}, side by side with the bare server on \
                 the one server core: {:.3}x (median of {rounds}; spread {:.3}-{:.3})",
                median(&side),
                min(&side),
                max(&side)
            );
        }
        if compare {
            for (l, (lookup, data)) in lookups.iter().enumerate() {
                let on = ratio(lookups.len() + l, Some(l), |r| r.rps);
                if !side_only {
                    println!(
                        "{connections}x{streams} {lookup}: {} / {} {:.3}x \
                     (median of the rounds; spread {:.3}-{:.3})",
                        services[1].0,
                        services[0].0,
                        median(&on),
                        min(&on),
                        max(&on)
                    );
                }
                let pair = [services[0].1.1, services[1].1.1];
                let side = side_by_side(pair, data, connections, streams, rounds, &work);
                println!(
                    "{connections}x{streams} {lookup}, side by side on the one server core: \
                     {} / {} {:.3}x (median of {rounds}; spread {:.3}-{:.3})",
                    services[1].0,
                    services[0].0,
                    median(&side),
                    min(&side),
                    max(&side)
                );
            }
        }
    }
    drop(services);
    drop(bare);
    let _ = std::fs::remove_dir_all(&work);
}

/// The second server's throughput over the first's, `rounds` times, with both loaded at once:
/// one h2load each, started together, the two servers sharing the server core. The kernel
/// splits the core between them fairly, so each one's rate is its share over its cost per
/// request, and whatever slows the machine slows both: the ratio is their cost ratio, without
/// the drift between runs that turns measured one after the other.
fn side_by_side(
    [first, second]: [SocketAddr; 2],
    data: &Path,
    connections: u32,
    streams: u32,
    rounds: usize,
    work: &Path,
) -> Vec<f64> {
    (0..rounds)
        .map(|_| {
            let logs = [work.join("first.log"), work.join("second.log")];
            let children = [
                spawn_h2load(first, data, connections, streams, &logs[0]),
                spawn_h2load(second, data, connections, streams, &logs[1]),
            ];
            let [a, b] = children;
            let (a, b) = (finish_h2load(a, &logs[0]), finish_h2load(b, &logs[1]));
            b.rps / a.rps
        })
        .collect()
}

/// One h2load run's figures.
struct Run {
    rps: f64,
    p99_ms: f64,
    succeeded: u64,
}

fn h2load(target: SocketAddr, data: &Path, connections: u32, streams: u32, work: &Path) -> Run {
    let log = work.join("requests.log");
    let child = spawn_h2load(target, data, connections, streams, &log);
    finish_h2load(child, &log)
}

/// h2load started on the load core against `target`, its per-request log in `log`.
fn spawn_h2load(
    target: SocketAddr,
    data: &Path,
    connections: u32,
    streams: u32,
    log: &Path,
) -> Child {
    Command::new("taskset")
        .args(["-c", LOAD_CORE, "h2load"])
        .args(["-D", &RUN.as_secs().to_string()])
        .args(["--warm-up-time", &WARM_UP.as_secs().to_string()])
        .args(["-c", &connections.to_string(), "-m", &streams.to_string()])
        .arg("--data")
        .arg(data)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("--log-file")
        .arg(log)
        .arg(format!(
            "http://{target}/imageservice.v1.ImageService/GetImage"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("h2load (Debian's nghttp2-client) and taskset on PATH")
}

/// The figures of a finished h2load run.
fn finish_h2load(child: Child, log: &Path) -> Run {
    let output = child.wait_with_output().expect("h2load's output");
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no throughput in h2load's output:\n{text}"));
    let succeeded = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" succeeded")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    // The log: one line a request, `start \t status \t microseconds`.
    let mut micros: Vec<u64> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    micros.sort_unstable();
    let p99 = micros
        .get(micros.len().saturating_mul(99) / 100)
        .copied()
        .unwrap_or(0);
    Run {
        rps,
        #[allow(clippy::cast_precision_loss)]
        p99_ms: p99 as f64 / 1000.0,
        succeeded,
    }
}

/// A gRPC request body for h2load: the 5-byte prefix and the encoded GetImageRequest.
fn request_file(work: &Path, name: &str, tag: &str, digest: &str) -> PathBuf {
    let message = GetImageRequest {
        repository_name: REPOSITORY.into(),
        image_id: Some(ImageIdentifier {
            image_tag: tag.into(),
            image_digest: digest.into(),
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    let path = work.join(format!("{name}.bin"));
    std::fs::write(&path, framed).unwrap();
    path
}

/// The release binary on its defaults, pinned to the server core, in front of moto: the
/// process, its gRPC address and its admin address.
fn start_service(
    binary: PathBuf,
    verify: Option<(&str, &Path)>,
) -> (Guard, SocketAddr, SocketAddr) {
    let (grpc, admin) = (free_address(), free_address());
    let endpoint = verify.map_or(moto::endpoint(), |(endpoint, _)| endpoint);
    let policy = verify
        .map(|(_, policy)| vec!["--authz-policy".to_owned(), policy.display().to_string()])
        .unwrap_or_default();
    let child = pinned(
        Command::new(binary)
            .arg("serve")
            .args(["--region", "us-east-1"])
            .args(["--ecr-endpoint-url", endpoint])
            .args(policy)
            .args(
                std::env::var("H2LOAD_WORKER_THREADS")
                    .map(|n| vec!["--worker-threads".to_owned(), n])
                    .unwrap_or_default(),
            )
            .args(["--listen", &grpc.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_PROXY", "127.0.0.1,localhost"),
    );
    wait_listening(grpc);
    (child, grpc, admin)
}

/// The binary under test: `H2LOAD_SERVICE_BIN` (an earlier build, for a before/after pair),
/// else this build's.
fn service_binary() -> PathBuf {
    std::env::var_os("H2LOAD_SERVICE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_ecr-image-service")),
        PathBuf::from,
    )
}

/// Creates the repository, puts the seed manifest through the service, and reads it once
/// by tag and once by digest, so both are cached: the cached answer by tag.
async fn seed(
    grpc: SocketAddr,
    signing: Option<(&rcgen::KeyPair, &ecr_ext::EcrExtension)>,
) -> GetImageResponse {
    let mut client = ImageServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hello-world.manifest.json"),
    )
    .unwrap();
    let config = aws_sdk_ecr::Config::builder()
        .behavior_version(aws_sdk_ecr::config::BehaviorVersion::latest())
        .region(aws_sdk_ecr::config::Region::new("us-east-1"))
        .endpoint_url(moto::endpoint())
        .credentials_provider(aws_sdk_ecr::config::Credentials::new(
            "testing", "testing", None, None, "bench",
        ))
        .build();
    let _ = aws_sdk_ecr::Client::from_conf(config)
        .create_repository()
        .repository_name(REPOSITORY)
        .send()
        .await;
    let put = client
        .put_image(pb::PutImageRequest {
            repository_name: REPOSITORY.into(),
            image_tag: TAG.into(),
            image_manifest: manifest,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let digest = put.image.unwrap().image_id.unwrap().image_digest;
    let get = |tag: &str, digest: &str| GetImageRequest {
        repository_name: REPOSITORY.into(),
        image_id: Some(ImageIdentifier {
            image_tag: tag.into(),
            image_digest: digest.into(),
        }),
        ..Default::default()
    };
    if let Some((key, ext)) = signing {
        sign(key, ext, &digest).await;
    }
    warm(grpc, &digest).await;
    client.get_image(get(TAG, "")).await.unwrap().into_inner()
}

/// Reads the seeded image once by digest and twice by tag through `grpc`, so both are cached
/// there (the seeding service, or another measured beside it).
async fn warm(grpc: SocketAddr, digest: &str) {
    let mut client = ImageServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    for (tag, digest) in [("", digest), (TAG, ""), (TAG, "")] {
        client
            .get_image(GetImageRequest {
                repository_name: REPOSITORY.into(),
                image_id: Some(ImageIdentifier {
                    image_tag: tag.into(),
                    image_digest: digest.into(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// Signs `digest` with `key` in cosign's tag scheme (payload blob kept by the extension).
async fn sign(key: &rcgen::KeyPair, ext: &ecr_ext::EcrExtension, digest: &str) {
    use base64::Engine as _;
    use rcgen::SigningKey as _;
    let payload = format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"bench/{REPOSITORY}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#
    );
    let signature =
        base64::engine::general_purpose::STANDARD.encode(key.sign(payload.as_bytes()).unwrap());
    let blob = ext.add_blob(payload.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[{{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"{blob}","size":{},"annotations":{{"dev.cosignproject.cosign/signature":"{signature}"}}}}]}}"#,
        "2".repeat(64),
        payload.len()
    );
    use sha2::Digest as _;
    let manifest_digest = format!("sha256:{:x}", sha2::Sha256::digest(manifest.as_bytes()));
    let config = aws_sdk_ecr::Config::builder()
        .behavior_version(aws_sdk_ecr::config::BehaviorVersion::latest())
        .region(aws_sdk_ecr::config::Region::new("us-east-1"))
        .endpoint_url(&ext.endpoint)
        .credentials_provider(aws_sdk_ecr::config::Credentials::new(
            "testing", "testing", None, None, "bench",
        ))
        .build();
    aws_sdk_ecr::Client::from_conf(config)
        .put_image()
        .repository_name(REPOSITORY)
        .image_tag(format!(
            "sha256-{}.sig",
            digest.trim_start_matches("sha256:")
        ))
        .image_manifest(manifest)
        .image_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
        .image_digest(manifest_digest)
        .send()
        .await
        .unwrap();
}

/// GetImage answered OK so far, from the service's own counter.
fn ok_count(admin: SocketAddr) -> u64 {
    let mut stream = TcpStream::connect(admin).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("imageservice_rpc_requests_total")
                && l.contains("method=\"GetImage\"")
                && l.contains("code=\"OK\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|n| n as u64)
        .sum()
}

/// The bare server: the same response bytes, decoded once; a clone per call, no logic. On
/// tonic's usual runtime (`Runtime::new()`, multi-threaded), or with
/// `H2LOAD_BARE_SCHEDULER=current-thread` on the single-threaded scheduler (see the module).
fn bare_server(address: SocketAddr, response: &[u8]) {
    let template = GetImageResponse::decode(response).unwrap();
    let runtime = if std::env::var("H2LOAD_BARE_SCHEDULER").is_ok_and(|s| s == "current-thread") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Runtime::new().unwrap()
    };
    runtime.block_on(async move {
        tonic::transport::Server::builder()
            .add_service(ImageServiceServer::new(Bare(Arc::new(template))))
            .serve(address)
            .await
            .unwrap();
    });
}

struct Bare(Arc<GetImageResponse>);

#[tonic::async_trait]
impl ImageService for Bare {
    async fn get_image(
        &self,
        _: Request<GetImageRequest>,
    ) -> Result<Response<GetImageResponse>, Status> {
        Ok(Response::new((*self.0).clone()))
    }
    async fn put_image(
        &self,
        _: Request<pb::PutImageRequest>,
    ) -> Result<Response<pb::PutImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn resolve_image(
        &self,
        _: Request<pb::ResolveImageRequest>,
    ) -> Result<Response<pb::ResolveImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn retag_image(
        &self,
        _: Request<pb::RetagImageRequest>,
    ) -> Result<Response<pb::RetagImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn batch_delete_image(
        &self,
        _: Request<pb::BatchDeleteImageRequest>,
    ) -> Result<Response<pb::BatchDeleteImageResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_images(
        &self,
        _: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn describe_images(
        &self,
        _: Request<pb::DescribeImagesRequest>,
    ) -> Result<Response<pb::DescribeImagesResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_referrers(
        &self,
        _: Request<pb::ListReferrersRequest>,
    ) -> Result<Response<pb::ListReferrersResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    type WatchTagStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchTagResponse, Status>> + Send>,
    >;
    async fn watch_tag(
        &self,
        _: Request<pb::WatchTagRequest>,
    ) -> Result<Response<Self::WatchTagStream>, Status> {
        Err(Status::unimplemented("bare"))
    }
}

/// A child process that is killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `command` pinned to the server core.
fn pinned(command: &mut Command) -> Guard {
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(ToOwned::to_owned).collect();
    let envs: Vec<_> = command
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    let child = Command::new("taskset")
        .args(["-c", SERVER_CORE])
        .arg(program)
        .args(args)
        .envs(envs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("taskset on PATH");
    Guard(child)
}

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls until something listens on `address`, for at most 60 s.
fn wait_listening(address: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {address}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
