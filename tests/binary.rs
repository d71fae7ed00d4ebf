//! The `ecr-image-service` binary itself: configuration errors exit 64 with one line, and a
//! server configured only through the AWS SDK's standard environment serves the seed scenario
//! against the emulator, logs structured spans without any credential, and stops on SIGTERM.

#[allow(dead_code)] // the shared support module; this binary uses part of it
#[path = "api/support/mod.rs"]
mod support;

use support::process::{BINARY, DEADLINE, command, listening_line, sample, scrape, stderr_lines};
use support::{create_repository, moto, requests};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ecr_image_service::pb::PutImageOutcome;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use serde_json::Value;

const SEED: &str = include_str!("fixtures/hello-world.manifest.json");
const SEED_DIGEST: &str = "sha256:8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae";
/// A secret access key that must never appear in any log line.
const SECRET: &str = "e2eSecretKeyThatMustNeverBeLogged0000000";

fn scratch_home() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ecr-image-service-home-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Bad flags, bad env twins and a missing region: exit 64 and exactly one line naming the problem.
#[test]
fn invalid_configuration_exits_64_with_one_line() {
    let home = scratch_home();
    let bad_policy_path = home.join("bad-policy.yaml");
    std::fs::write(&bad_policy_path, "rules: [{id: a, actions: [fly]}]\n").unwrap();
    let bad_policy: &'static str = Box::leak(
        bad_policy_path
            .to_str()
            .unwrap()
            .to_owned()
            .into_boxed_str(),
    );
    /// (what, arguments, environment, what the one line must mention)
    type Case = (
        &'static str,
        Vec<&'static str>,
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "attempts out of range",
            vec!["serve", "--max-attempts", "0"],
            vec![],
            "--max-attempts",
        ),
        (
            "unparseable address",
            vec!["serve", "--listen", "nowhere"],
            vec![],
            "--listen",
        ),
        ("unknown flag", vec!["serve", "--bogus"], vec![], "--bogus"),
        (
            "no worker threads",
            vec!["serve", "--worker-threads", "0"],
            vec![],
            "--worker-threads",
        ),
        (
            "bad endpoint",
            vec!["serve", "--ecr-endpoint-url", "ftp://x"],
            vec![],
            "--ecr-endpoint-url",
        ),
        (
            "env twin",
            vec!["serve"],
            vec![("ECR_IMAGE_SERVICE_ATTEMPT_TIMEOUT", "1m")],
            "--attempt-timeout",
        ),
        ("no region anywhere", vec!["serve"], vec![], "no AWS region"),
        (
            "unknown identity source",
            vec!["serve", "--identity-source", "spiffe-magic"],
            vec![],
            "--identity-source",
        ),
        (
            "invalid policy",
            vec!["serve", "--authz-policy", bad_policy],
            vec![],
            "--authz-policy",
        ),
        (
            "mtls without its files",
            vec!["serve", "--identity-source", "mtls"],
            vec![],
            "--tls-cert",
        ),
        (
            "TLS files without mtls",
            vec!["serve", "--tls-cert", "/x.pem"],
            vec![],
            "--identity-source mtls",
        ),
        (
            "missing policy",
            vec!["serve", "--authz-policy", "/nonexistent/policy.yaml"],
            vec![],
            "--authz-policy",
        ),
    ];
    for (what, args, env, expected) in cases {
        let output = command(&home).args(&args).envs(env).output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{what}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(
            stderr.lines().count(),
            1,
            "{what}: one line, got {stderr:?}"
        );
        assert!(stderr.contains(expected), "{what}: {stderr:?}");
    }
}

/// The binary serving in front of the emulator.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    address: String,
    admin_address: String,
    client: ImageServiceClient<tonic::transport::Channel>,
}

/// Starts the binary configured only through the AWS SDK's standard environment (region,
/// endpoint, static keys), logging JSON, with `args` added; creates `repository` in the
/// emulator and connects a client.
async fn serve_on_moto(args: &[&str], repository: &str) -> Running {
    let moto = moto::endpoint();
    let home = scratch_home();
    let mut child = command(&home)
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_ECR", moto)
        .env("AWS_ACCESS_KEY_ID", "AKIDE2ETESTKEY")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let mut seen = Vec::new();
    let listening = listening_line(&lines, &mut seen);
    let address = listening["address"].as_str().unwrap().to_owned();
    let admin_address = listening["admin_address"].as_str().unwrap().to_owned();
    create_repository(moto, repository, false).await;
    let client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    Running {
        child,
        lines,
        seen,
        address,
        admin_address,
        client,
    }
}

#[tokio::test]
async fn serves_from_the_standard_aws_environment_and_stops_on_sigterm() {
    let Running {
        mut child,
        lines,
        mut seen,
        mut client,
        ..
    } = serve_on_moto(
        &["--log-filter", "debug", "--shutdown-delay", "0s"],
        "binary-e2e",
    )
    .await;
    let put = client
        .put_image(requests::put("binary-e2e", "2019.08", SEED))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.outcome(), PutImageOutcome::Created);
    assert_eq!(
        put.image.unwrap().image_id.unwrap().image_digest,
        SEED_DIGEST
    );
    let get = |tag: &str| requests::get("binary-e2e", tag, "");
    let image = requests::fetch(&mut client, get("2019.08")).await;
    assert_eq!(image.image_manifest, SEED);
    // The caller's W3C trace context: the refusal is logged with its trace ID.
    let mut traced = tonic::Request::new(get("missing"));
    traced.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    client.get_image(traced).await.unwrap_err();

    // SIGTERM: the server drains and exits 0.
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running {DEADLINE:?} after SIGTERM"
        );
        // Yield to the runtime: the client's connection must see the server's GOAWAY.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    seen.extend(lines.try_iter());

    assert!(
        seen.iter().all(|line| !line.contains(SECRET)),
        "the secret access key appeared in the logs"
    );
    let refused = seen
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|json| json["message"] == "request refused")
        .unwrap_or_else(|| panic!("no 'request refused' line: {seen:#?}"));
    // A failure line stands alone at the default level: the request's context is its own.
    assert_eq!(refused["level"], "INFO");
    assert_eq!(refused["reason"], "IMAGE_NOT_FOUND");
    assert_eq!(refused["method"], "GetImage");
    assert_eq!(refused["repository"], "binary-e2e");
    assert_eq!(refused["reference"], "missing");
    assert_eq!(refused["code"], "NotFound");
    assert!(refused["latency_ms"].is_number());
    assert!(refused["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(refused["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let succeeded = seen
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|json| json["message"] == "request succeeded" && json["span"]["method"] == "PutImage")
        .unwrap_or_else(|| panic!("no DEBUG success line for PutImage: {seen:#?}"));
    assert_eq!(succeeded["level"], "DEBUG");
    assert_eq!(succeeded["span"]["digest"], SEED_DIGEST);
}

/// SIGTERM under load: health turns NOT_SERVING while requests are still served for the
/// shutdown delay; then new connections are refused; every request the service accepted is
/// answered successfully; the process exits 0 within delay + grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_without_failing_accepted_requests() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_types::StatusExt;

    let (delay, grace) = (Duration::from_secs(1), Duration::from_secs(5));
    let Running {
        mut child,
        mut client,
        address,
        ..
    } = serve_on_moto(
        &["--shutdown-delay", "1s", "--shutdown-grace", "5s"],
        "drain",
    )
    .await;
    client
        .put_image(requests::put("drain", "v1", SEED))
        .await
        .unwrap();

    // Load: fresh reads, each a real ECR call, until the service stops answering.
    let stop_at = Instant::now() + Duration::from_secs(15);
    let loops: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while Instant::now() < stop_at {
                    let mut fresh = requests::get("drain", "v1", "");
                    fresh.max_staleness = Some(prost_types::Duration::default());
                    let outcome = client.get_image(fresh).await.map(|_| Instant::now());
                    let failed = outcome.is_err();
                    outcomes.push(outcome);
                    if failed {
                        break;
                    }
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let mut health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let check = HealthCheckRequest {
        service: "imageservice.v1.ImageService".into(),
    };
    let status = loop {
        let status = health
            .check(check.clone())
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == ServingStatus::NotServing || signalled.elapsed() > delay {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        status,
        ServingStatus::NotServing,
        "NOT_SERVING while draining"
    );
    assert!(
        signalled.elapsed() < delay,
        "health changed before connections were refused"
    );

    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < delay + grace + Duration::from_secs(1),
            "no exit in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    assert!(exit.success(), "exit after SIGTERM: {exit}");

    let (mut served, mut served_after_signal, mut refused) = (0, 0, 0);
    for outcomes in loops {
        for outcome in outcomes.await.unwrap() {
            match outcome {
                Ok(at) => {
                    served += 1;
                    served_after_signal += usize::from(at > signalled);
                }
                // Not accepted: the transport refused it; the service never saw it, so it
                // carries none of the service's error details.
                Err(status) => {
                    assert!(
                        status.get_error_details_vec().is_empty(),
                        "an accepted request failed: {status:?}"
                    );
                    refused += 1;
                }
            }
        }
    }
    assert!(
        served_after_signal > 0,
        "requests were still served during the delay"
    );
    eprintln!(
        "drain: {served} served ({served_after_signal} after SIGTERM), {refused} refused by the \
         transport, exit 0 after {took:?} (delay {delay:?}, grace {grace:?})"
    );
}

/// A closed log pipe (a log collector that died) does not take the service down: requests that
/// log are still served and SIGTERM still ends in exit 0.
#[tokio::test]
async fn a_closed_log_pipe_does_not_crash_the_service() {
    let Running {
        mut child,
        lines,
        mut client,
        ..
    } = serve_on_moto(&["--shutdown-delay", "0s"], "closed-logs").await;
    drop(lines); // the reader thread ends at the next line, closing the pipe
    for _ in 0..3 {
        // Each refusal logs a line at INFO into the closed pipe.
        let status = client
            .get_image(requests::get("closed-logs", "missing", ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit with a closed log pipe: {status}");
}

/// `/metrics` moves as requests are served: RPCs by method and code with latencies, ECR calls
/// by operation, cache hits and misses and bytes, batch sizes.
#[tokio::test]
async fn metrics_count_what_happens() {
    let Running {
        mut child,
        lines: _logs_keep_the_pipe_open,
        mut client,
        admin_address,
        ..
    } = serve_on_moto(&["--shutdown-delay", "0s"], "metrics").await;
    let before = scrape(&admin_address).await;
    assert_eq!(
        sample(
            &before,
            "imageservice_rpc_requests_total",
            &[("method", "PutImage")]
        ),
        0.0
    );
    // No ECR call yet: reachability is unknown, not "unreachable".
    assert!(
        !before
            .samples
            .iter()
            .any(|s| s.metric == "imageservice_ecr_reachable"),
        "ecr_reachable before any ECR call"
    );

    client
        .put_image(requests::put("metrics", "v1", SEED))
        .await
        .unwrap();
    for _ in 0..2 {
        client
            .get_image(requests::get("metrics", "v1", ""))
            .await
            .unwrap();
    }
    client
        .get_image(requests::get("metrics", "missing", ""))
        .await
        .unwrap_err();

    let after = scrape(&admin_address).await;
    let rpcs = |method, code| {
        sample(
            &after,
            "imageservice_rpc_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(rpcs("PutImage", "OK"), 1.0);
    assert_eq!(rpcs("GetImage", "OK"), 2.0);
    assert_eq!(rpcs("GetImage", "NOT_FOUND"), 1.0);
    assert_eq!(
        sample(
            &after,
            "imageservice_rpc_duration_seconds_count",
            &[("method", "GetImage")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &after,
            "imageservice_ecr_calls_total",
            &[("operation", "PutImage")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "imageservice_ecr_attempts_total",
            &[("operation", "PutImage"), ("outcome", "ok")]
        ),
        1.0
    );
    // The put wrote through: both reads of v1 were hits; only the missing tag went to ECR.
    assert_eq!(sample(&after, "imageservice_cache_hits_total", &[]), 2.0);
    assert_eq!(sample(&after, "imageservice_cache_misses_total", &[]), 1.0);
    assert_eq!(
        sample(
            &after,
            "imageservice_ecr_calls_total",
            &[("operation", "BatchGetImage")]
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "imageservice_ecr_batch_size_count", &[]),
        1.0
    );
    assert!(sample(&after, "imageservice_cache_bytes", &[]) > 2461.0);
    assert_eq!(sample(&after, "imageservice_rpc_in_flight", &[]), 0.0);
    assert_eq!(sample(&after, "imageservice_ecr_reachable", &[]), 1.0);

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + DEADLINE;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `health-check` (what the chart's `helm test` pod runs) exits 0 on SERVING, 3 on an unknown
/// service and while draining, and 2 when nothing answers.
#[tokio::test]
async fn health_check_subcommand_reports_serving_draining_and_gone() {
    let Running {
        mut child, address, ..
    } = serve_on_moto(&["--shutdown-delay", "3s"], "health-check").await;
    let home = scratch_home();
    let check = |service: &str| {
        command(&home)
            .args(["health-check", "--endpoint", &format!("http://{address}")])
            .args(["--service", service, "--timeout", "5s"])
            .output()
            .unwrap()
    };
    let code = |service: &str| check(service).status.code();
    assert_eq!(code("imageservice.v1.ImageService"), Some(0));
    assert_eq!(code(""), Some(0), "the server as a whole");
    let unknown = check("no.such.Service");
    assert_eq!(unknown.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("SERVICE_UNKNOWN"));

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + DEADLINE;
    while code("imageservice.v1.ImageService") != Some(3) {
        assert!(Instant::now() < deadline, "never NOT_SERVING after SIGTERM");
    }
    let draining = check("imageservice.v1.ImageService");
    assert!(String::from_utf8_lossy(&draining.stderr).contains("NOT_SERVING"));
    // Waited for off the runtime, so the (dropped) client's connection can see the GOAWAY
    // and close instead of holding the drain open for the whole grace period.
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success());
    assert_eq!(
        code("imageservice.v1.ImageService"),
        Some(2),
        "nothing listening"
    );
}

/// A stand-in OpenTelemetry collector: the OTLP/gRPC TraceService, keeping every span.
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::trace::v1::Span;
    use tonic::{Request, Response, Status};

    #[derive(Clone, Default)]
    pub struct Collector(Arc<Mutex<Vec<Span>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            let spans = request
                .into_inner()
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            self.0.lock().unwrap().extend(spans);
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }

    impl Collector {
        /// Serves the collector on a free loopback port; its address.
        pub async fn start(&self) -> std::net::SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let service = TraceServiceServer::new(self.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            address
        }

        pub fn spans(&self) -> Vec<Span> {
            self.0.lock().unwrap().clone()
        }
    }
}

/// With `--otlp-endpoint`, each RPC and each ECR call is exported as a span: the RPC continues
/// the caller's `traceparent`, the ECR call is its child and carries ECR's request ID. The
/// last spans are flushed on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_continues_the_callers_trace_with_rpc_and_ecr_spans() {
    otlp_export(&[]).await;
}

/// The same with one worker (`--worker-threads 1`): the flush at SIGTERM needs the runtime
/// driven while it sends, which the exit path must not block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_flushes_with_one_worker_too() {
    otlp_export(&["--worker-threads", "1"]).await;
}

async fn otlp_export(args: &[&str]) {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Attribute;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CALLER_SPAN: &str = "00f067aa0ba902b7";
    let repository = support::unique("otlp");
    let collector = collector::Collector::default();
    let otlp = collector.start().await;
    let otlp_endpoint = format!("http://{otlp}");
    let Running {
        mut child,
        mut client,
        ..
    } = serve_on_moto(
        &[
            &["--otlp-endpoint", &otlp_endpoint, "--shutdown-delay", "0s"],
            args,
        ]
        .concat(),
        &repository,
    )
    .await;
    client
        .put_image(requests::put(&repository, "v1", SEED))
        .await
        .unwrap();
    let mut fresh = requests::get(&repository, "v1", "");
    fresh.max_staleness = Some(prost_types::Duration::default());
    let mut traced = tonic::Request::new(fresh);
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    client.get_image(traced).await.unwrap();

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "exit after SIGTERM: {exit}");

    let spans = collector.spans();
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let named = |name: &str, kind: SpanKind, trace: Option<&str>| {
        spans
            .iter()
            .find(|s| {
                s.name == name
                    && s.kind == kind as i32
                    && trace.is_none_or(|t| hex(&s.trace_id) == t)
            })
            .unwrap_or_else(|| {
                let seen: Vec<_> = spans.iter().map(|s| (&s.name, s.kind)).collect();
                panic!("no {kind:?} span {name} in trace {trace:?}: {seen:?}")
            })
    };
    let rpc = named("GetImage", SpanKind::Server, Some(TRACE));
    assert_eq!(
        hex(&rpc.parent_span_id),
        CALLER_SPAN,
        "continues the caller's span"
    );
    let ecr = named("BatchGetImage", SpanKind::Client, Some(TRACE));
    assert_eq!(
        ecr.parent_span_id, rpc.span_id,
        "the ECR call is the RPC's child"
    );
    let request_id = ecr
        .attributes
        .iter()
        .find(|a| a.key == "aws.request_id")
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .unwrap_or_else(|| panic!("no aws.request_id on {ecr:?}"));
    assert!(matches!(request_id, Attribute::StringValue(id) if !id.is_empty()));
    // The put, with no caller trace, is a trace of its own with its ECR call inside.
    let put = named("PutImage", SpanKind::Server, None);
    let put_call = named("PutImage", SpanKind::Client, None);
    assert_eq!(put_call.trace_id, put.trace_id);
    assert_ne!(hex(&put.trace_id), TRACE);
}

/// The binary on the embedded store in `data_dir`, logging JSON; its address once listening.
fn serve_local(data_dir: &std::path::Path, args: &[&str]) -> (Child, String) {
    let home = scratch_home();
    let mut child = command(&home)
        .args(["serve", "--backend", "local", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--shutdown-delay", "0s"])
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let listening = listening_line(&lines, &mut Vec::new());
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, listening["address"].as_str().unwrap().to_owned())
}

/// `kill -9` in the middle of a stream of puts loses none that were acknowledged: after a
/// restart on the same directory every acknowledged manifest is there, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_store_keeps_every_acknowledged_put_across_kill_9() {
    let data_dir = scratch_home().join("kill-9-store");
    let _ = std::fs::remove_dir_all(&data_dir);
    let (mut child, address) = serve_local(&data_dir, &[]);
    let client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    // Four writers put distinct manifests until the process dies under them.
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for n in 0.. {
                    let manifest = format!(
                        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{SEED_DIGEST}","size":{n}}},"layers":[],"annotations":{{"writer":"{writer}"}}}}"#
                    );
                    let tag = format!("w{writer}-{n}");
                    match client
                        .put_image(requests::put("durable", &tag, &manifest))
                        .await
                    {
                        Ok(_) => acknowledged.push((tag, manifest)),
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    // Let some puts land, then kill without warning.
    let started = Instant::now();
    loop {
        let landed = client
            .clone()
            .resolve_image(ecr_image_service::pb::ResolveImageRequest {
                repository_name: "durable".into(),
                image_id: Some(ecr_image_service::pb::ImageIdentifier {
                    image_tag: "w0-20".into(),
                    image_digest: String::new(),
                }),
                ..Default::default()
            })
            .await
            .is_ok();
        if landed {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "no puts landed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(acknowledged.len() > 20, "only {} puts", acknowledged.len());

    let (mut restarted, address) = serve_local(&data_dir, &[]);
    let mut client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    for (tag, manifest) in &acknowledged {
        let image = requests::fetch(&mut client, requests::get("durable", tag, "")).await;
        assert_eq!(&image.image_manifest, manifest, "{tag} after kill -9");
    }
    eprintln!(
        "kill -9: {} acknowledged puts, all present after restart",
        acknowledged.len()
    );
    restarted.kill().unwrap();
    restarted.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// The README's first `sh` block containing `needle`, as one line (continuations joined), with
/// `cargo run --release --` standing for the binary.
fn readme_command(needle: &str) -> String {
    let readme = include_str!("../README.md");
    let block = readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains(needle))
        .unwrap_or_else(|| panic!("no sh block with {needle:?} in the README"));
    let command = block.replace("\\\n", " ");
    let line = command
        .lines()
        .find(|line| line.contains(needle))
        .expect("the command line");
    line.replace("cargo run --release --", BINARY)
}

/// The README's two first-five-minutes commands, copied from the README: the run command
/// serves on the embedded store, and the `put-image` example prints the AWS CLI's output shape
/// (`put-image.expected-output.json`) with the seed's digest.
#[tokio::test]
async fn the_readme_run_command_and_put_image_example_work_as_written() {
    let data_dir = scratch_home().join("readme-store");
    let _ = std::fs::remove_dir_all(&data_dir);
    // Only the address (a free port, not 50051) and the data directory are adapted.
    let serve = readme_command("serve --backend local")
        .replace("127.0.0.1:50051", "127.0.0.1:0")
        .replace("./data", &data_dir.display().to_string());
    let home = scratch_home();
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!("exec {serve} --admin-listen 127.0.0.1:0 --log-format json"),
        ])
        .env_clear()
        .env("HOME", &home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let listening = listening_line(&lines, &mut Vec::new());
    assert_eq!(listening["backend"], "local");
    let address = listening["address"].as_str().unwrap().to_owned();

    let put = readme_command("put-image --repository-name hello-world");
    let output = Command::new("sh")
        .args(["-c", &put])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("ECR_IMAGE_SERVICE_ENDPOINT", format!("http://{address}"))
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        output.status.success(),
        "{put}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let expected: Value =
        serde_json::from_str(include_str!("fixtures/put-image.expected-output.json")).unwrap();
    assert_eq!(
        shape(&printed),
        shape(&expected),
        "the AWS CLI's output shape"
    );
    assert_eq!(
        printed["image"]["imageId"]["imageDigest"],
        "sha256:8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae"
    );
    let mut without_account = printed.clone();
    without_account["image"]["registryId"] = expected["image"]["registryId"].clone();
    assert_eq!(
        without_account, expected,
        "all but the account, value for value"
    );
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A JSON value's keys, recursively, with the values left out.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), shape(v))).collect(),
        _ => Value::Null,
    }
}

/// The client subcommands against a running service: AWS CLI flags and output, exact bytes
/// with `--output manifest`, per-target retag results, the offline digest, and one exit code
/// per class of failure.
#[test]
fn cli_subcommands_print_aws_cli_json_and_exit_per_error_class() {
    let data_dir = scratch_home().join("cli-store");
    let _ = std::fs::remove_dir_all(&data_dir);
    let (mut server, address) = serve_local(&data_dir, &["--immutable-repositories", "frozen"]);
    let home = scratch_home();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let seed = format!("file://{fixtures}/hello-world.manifest.json");
    let doc_form = format!("file://{fixtures}/hello-world.manifest.doc-form.json");
    let run = |args: &[&str]| {
        command(&home)
            .args(args)
            .env("ECR_IMAGE_SERVICE_ENDPOINT", format!("http://{address}"))
            .stdout(Stdio::piped())
            .output()
            .unwrap()
    };
    let json = |output: &std::process::Output| -> Value {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let repo = ["--repository-name", "frozen"];

    let put = json(&run(&[
        &["put-image"][..],
        &repo,
        &["--image-tag", "v1", "--image-manifest", &seed],
    ]
    .concat()));
    assert_eq!(put["image"]["imageId"]["imageDigest"], SEED_DIGEST);
    let put_doc = json(&run(&[
        &["put-image"][..],
        &repo,
        &["--image-tag", "doc", "--image-manifest", &doc_form],
    ]
    .concat()));
    let doc_digest = put_doc["image"]["imageId"]["imageDigest"].clone();

    // Exact bytes out, whatever the shell would do to JSON.
    let manifest = run(&[
        &["get-image"][..],
        &repo,
        &["--image-tag", "v1", "--output", "manifest"],
    ]
    .concat());
    assert!(manifest.status.success());
    assert_eq!(manifest.stdout, SEED.as_bytes());
    let got = json(&run(&[
        &["get-image"][..],
        &repo,
        &["--image-digest", SEED_DIGEST],
    ]
    .concat()));
    assert_eq!(got["image"]["imageManifest"], SEED);
    assert_eq!(
        got["image"]["imageManifestMediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let resolved = json(&run(&[
        &["resolve-image"][..],
        &repo,
        &["--image-tag", "v1"],
    ]
    .concat()));
    assert_eq!(resolved["imageId"]["imageDigest"], SEED_DIGEST);
    assert_eq!(resolved["imageManifestSize"], SEED.len());

    // A retag with one conflicting target: every result printed, exit code of the conflict.
    let retag = run(&[
        &["retag-image"][..],
        &repo,
        &["--image-tag", "v1", "--target-tags", "latest", "doc"],
    ]
    .concat());
    assert_eq!(retag.status.code(), Some(4), "ALREADY_EXISTS");
    let printed: Value = serde_json::from_slice(&retag.stdout).unwrap();
    assert_eq!(printed["results"][0]["outcome"], "CREATED");
    assert_eq!(
        printed["results"][1]["failure"]["reason"],
        "TAG_ALREADY_EXISTS"
    );
    assert_ne!(doc_digest, SEED_DIGEST);

    // list-images pages for itself; --max-items cuts it with a NextToken that continues it.
    let listed = json(&run(&[&["list-images"][..], &repo].concat()));
    let all = listed["imageIds"].as_array().unwrap().len();
    assert!(all >= 3, "{listed}");
    assert!(listed.get("NextToken").is_none());
    let first = json(&run(&[
        &["list-images"][..],
        &repo,
        &["--max-items", "1", "--page-size", "2"],
    ]
    .concat()));
    assert_eq!(first["imageIds"].as_array().unwrap().len(), 1);
    let next = first["NextToken"].as_str().expect("a NextToken").to_owned();
    let rest = json(&run(&[
        &["list-images"][..],
        &repo,
        &["--starting-token", &next, "--page-size", "2"],
    ]
    .concat()));
    assert_eq!(rest["imageIds"].as_array().unwrap().len(), all - 1);
    let described = json(&run(&[
        &["describe-images"][..],
        &repo,
        &["--image-ids", "imageTag=v1"],
    ]
    .concat()));
    assert_eq!(described["imageDetails"][0]["imageDigest"], SEED_DIGEST);
    assert!(described["imageDetails"][0]["imagePushedAt"].is_string());

    // batch-delete-image with the AWS CLI's shorthand ids: deleted and failed ids, exit 0.
    let deleted = json(&run(&[
        &["batch-delete-image"][..],
        &repo,
        &["--image-ids", "imageTag=latest", "imageTag=never-there"],
    ]
    .concat()));
    assert_eq!(deleted["imageIds"][0]["imageTag"], "latest");
    assert_eq!(deleted["imageIds"][0]["imageDigest"], SEED_DIGEST);
    assert_eq!(deleted["failures"][0]["failureCode"], "ImageNotFound");
    assert_eq!(deleted["failures"][0]["imageId"]["imageTag"], "never-there");

    // Offline digest: no service needed.
    let digest = command(&home)
        .args(["digest", &seed])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(digest.stdout).unwrap().trim(),
        SEED_DIGEST
    );

    // One exit code per class, with code and reason on stderr.
    let cases: [(&str, Vec<&str>, i32, &str); 5] = [
        (
            "not found",
            [&["get-image"][..], &repo, &["--image-tag", "nope"]].concat(),
            3,
            "NOT_FOUND (IMAGE_NOT_FOUND)",
        ),
        (
            "invalid",
            vec!["get-image", "--repository-name", "Bad", "--image-tag", "x"],
            65,
            "INVALID_ARGUMENT (INVALID_FIELD)",
        ),
        (
            "no input",
            [
                &["put-image"][..],
                &repo,
                &["--image-manifest", "file:///nonexistent.json"],
            ]
            .concat(),
            66,
            "cannot read",
        ),
        (
            "usage",
            vec!["get-image", "--image-tag", "x"],
            64,
            "--repository-name",
        ),
        (
            "unreachable",
            vec![
                "get-image",
                "--repository-name",
                "r",
                "--image-tag",
                "x",
                "--endpoint",
                "http://127.0.0.1:1",
            ],
            2,
            "cannot reach",
        ),
    ];
    for (what, args, code, says) in cases {
        let output = run(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{what}: {stderr}");
        assert!(stderr.contains(says), "{what}: {stderr}");
    }
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A failure is one readable line: ECR's code, request ID and attempt count as fields of their
/// own, never the SDK's raw response (headers, body, extension types). A throttled call and a
/// not-found call, against recorded ECR in the default text format, each log a line under
/// 512 bytes with no header dump.
#[tokio::test]
async fn failure_lines_are_short_and_hold_no_raw_response() {
    use support::recorded::{REQUEST_ID, RecordedEcr, Reply};
    let not_found = Reply::ok(serde_json::json!({
        "images": [],
        "failures": [{
            "imageId": {"imageTag": "gone"},
            "failureCode": "ImageNotFound",
            "failureReason": "Requested image not found",
        }],
    }));
    let throttled = || Reply::error(400, "ThrottlingException", "Rate exceeded");
    // Three attempts (the default) throttled, then not-found for every later call.
    let ecr = RecordedEcr::start(vec![
        ("BatchGetImage", throttled()),
        ("BatchGetImage", throttled()),
        ("BatchGetImage", throttled()),
        ("BatchGetImage", not_found),
    ])
    .await;
    let home = scratch_home();
    let mut child = command(&home)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--stale-if-error", "0s"])
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_ECR", &ecr.endpoint)
        .env("AWS_ACCESS_KEY_ID", "AKIDE2ETESTKEY")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let deadline = Instant::now() + DEADLINE;
    let mut client = text_listening_client(&lines, deadline).await;
    for (tag, code) in [
        ("busy", tonic::Code::Unavailable),
        ("gone", tonic::Code::NotFound),
    ] {
        let status = client
            .get_image(requests::get("hello-world", tag, ""))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    let mut failures = Vec::new();
    while failures.len() < 2 {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("two failure lines, got {failures:#?}"));
        if line.contains("request failed") || line.contains("request refused") {
            failures.push(line);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for line in &failures {
        assert!(line.len() < 512, "{} bytes: {line}", line.len());
        for dump in [
            "x-amzn",
            "content-type",
            "SdkBody",
            "headers",
            "HttpResponse",
            "Extensions",
        ] {
            assert!(!line.contains(dump), "{dump} in {line}");
        }
        assert!(
            line.contains(&format!("ecr_request_id=\"{REQUEST_ID}\""))
                || line.contains(&format!("ecr_request_id={REQUEST_ID}")),
            "{line}"
        );
    }
    assert!(failures[0].contains("ECR_THROTTLED"), "{}", failures[0]);
    assert!(
        failures[0].contains("ThrottlingException"),
        "{}",
        failures[0]
    );
    assert!(failures[0].contains("attempts=3"), "{}", failures[0]);
    assert!(failures[1].contains("IMAGE_NOT_FOUND"), "{}", failures[1]);
    assert!(failures[1].contains("ImageNotFound"), "{}", failures[1]);
    assert_eq!(ecr.count("BatchGetImage"), 4);
}

/// Request values cannot forge or swell log lines: a tag carrying a newline and a fake log line,
/// and a 4 MB repository name, each leave exactly one line, under 4 KB, in the default text
/// format (the forged line used to stand on a line of its own, and the name made a 4 MB line).
#[tokio::test]
async fn request_values_cannot_forge_or_swell_log_lines() {
    let data_dir = scratch_home().join("log-injection-store");
    let _ = std::fs::remove_dir_all(&data_dir);
    let home = scratch_home();
    let mut child = command(&home)
        .args(["serve", "--backend", "local", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let deadline = Instant::now() + DEADLINE;
    let mut client = text_listening_client(&lines, deadline).await;
    let forged = "v1\n2026-12-01T00:00:00.000000Z ERROR ecr_image_service: FORGED";
    let _ = client
        .put_image(requests::put("hello-world", forged, SEED))
        .await
        .unwrap_err();
    let huge = "a".repeat(4 << 20);
    let _ = client
        .put_image(requests::put(&huge, "v1", "{}"))
        .await
        .unwrap_err();
    let mut refused = Vec::new();
    let mut all = Vec::new();
    while refused.len() < 2 {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("two refusal lines, got {all:#?}"));
        if line.contains("request refused") {
            refused.push(line.clone());
        }
        all.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    for line in &all {
        assert!(line.len() < 4096, "a {}-byte line", line.len());
        assert!(
            !line.starts_with("2026-12-01T00:00:00.000000Z"),
            "a forged line: {line}"
        );
    }
    assert!(
        refused[0].contains("FORGED"),
        "the value is logged, escaped: {}",
        refused[0]
    );
}

/// Waits for the text-format `listening` line on `lines` and connects a client to its address.
async fn text_listening_client(
    lines: &mpsc::Receiver<String>,
    deadline: Instant,
) -> ImageServiceClient<tonic::transport::Channel> {
    let address = loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a listening line");
        if let Some((_, rest)) = line.split_once(" address=") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap()
}

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// With its file-descriptor limit reached, the accept loop used to spin at 100% CPU. Now it
/// backs off (5 ms doubling to 1 s) and logs a handful of lines; once the idle connections are
/// closed at the handshake timeout, it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_descriptor_table_does_not_spin_the_accept_loop() {
    use std::os::unix::process::CommandExt;
    let home = scratch_home();
    let data_dir = home.join(format!("emfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut command = command(&home);
    command
        .args(["serve", "--backend", "local", "--data-dir"])
        .arg(&data_dir)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--shutdown-delay", "0s"]);
    // A descriptor table of 64: the runtime, the store and the listeners take about 20.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = command.spawn().unwrap();
    let lines = stderr_lines(&mut child);
    let mut seen = Vec::new();
    let address = listening_line(&lines, &mut seen)["address"]
        .as_str()
        .unwrap()
        .to_owned();

    let idle: Vec<_> = (0..100)
        .map(|_| std::net::TcpStream::connect(&address).unwrap())
        .collect();
    // Over two seconds with the table full, a spinning loop would use about two CPU seconds.
    let before = cpu_seconds(child.id());
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(2) {
        tokio::task::yield_now().await;
        std::thread::park_timeout(Duration::from_millis(50));
    }
    let used = cpu_seconds(child.id()) - before;
    assert!(
        used < 0.5,
        "{used:.2} CPU seconds in 2 s with the table full"
    );
    drop(idle);

    // The idle connections are closed at the handshake timeout; then it serves again.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let served = async {
            let mut client = ImageServiceClient::connect(format!("http://{address}")).await?;
            let status = client
                .get_image(requests::get("nowhere", "v1", ""))
                .await
                .unwrap_err();
            Ok::<_, tonic::transport::Error>(status.code())
        };
        match served.await {
            Ok(code) => {
                assert_eq!(code, tonic::Code::NotFound);
                break;
            }
            Err(err) => assert!(Instant::now() < deadline, "never served again: {err}"),
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
    let warnings: Vec<String> = lines
        .try_iter()
        .chain(seen)
        .filter(|l| l.contains("cannot accept connections"))
        .collect();
    assert!(
        !warnings.is_empty() && warnings.len() <= 12,
        "accept errors are logged, a handful of times: {}",
        warnings.len()
    );
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// A memory figure of `/proc/PID/status` (`VmRSS`, resident; `VmHWM`, its peak), in bytes.
fn memory_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    kib * 1024
}

/// The process's resident memory, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    memory_bytes(pid, "VmRSS")
}

/// `count` GetImage calls for distinct tags (so that none coalesce), each cancelled by its
/// client after 50 ms, 200 at a time on a connection of their own: under the 256 streams a
/// connection may hold, so none waits in the client to be reset before the server has seen it
/// (the server answers many such resets with GOAWAY, as a rapid-reset defence).
async fn cancelled_calls(address: &str, repository: &str, round: usize, count: usize) {
    for wave in 0..count / 200 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let calls: Vec<_> = (0..200)
            .map(|n| {
                let mut client = ImageServiceClient::new(channel.clone());
                let tag = format!("r{round}-w{wave}-n{n}");
                let request = requests::get(repository, &tag, "");
                tokio::spawn(async move {
                    let call = client.get_image(request);
                    tokio::time::timeout(Duration::from_millis(50), call).await
                })
            })
            .collect();
        for call in calls {
            match call.await.unwrap() {
                // Cancelled by the client, as meant.
                Err(_) => {}
                // The connection went away under the client (a loaded server answers a burst of
                // resets with GOAWAY): not served either, which is all this needs.
                Ok(Err(status))
                    if status.code() == tonic::Code::Unknown && is_transport(&status) => {}
                Ok(answer) => panic!("the call was answered, not cancelled: {answer:?}"),
            }
        }
    }
}

/// Whether `status` is the client's own report of a broken connection, not an answer.
fn is_transport(status: &tonic::Status) -> bool {
    status.message() == "transport error"
}

/// Client-cancelled calls used to leave their single-flight entries behind: 6,000 of them (ECR
/// answering in 1 s) took resident memory from 15 MB to 188 MB for good. After 10,000 cancelled
/// calls, the release of their entries (a drop guard) brings memory back to within 16 MiB of
/// its level before them (measured: +6 to +7 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_callers_leave_no_memory_behind() {
    use support::recorded::{RecordedEcr, Reply};
    let ecr = RecordedEcr::start(vec![(
        "BatchGetImage",
        Reply::ok(serde_json::json!({"images": [], "failures": []})).after(Duration::from_secs(1)),
    )])
    .await;
    let repository = support::unique("cancelled");
    let running = serve_on_moto(&["--ecr-endpoint-url", &ecr.endpoint], &repository).await;
    let pid = running.child.id();
    // One wave first: the first calls build what a process builds once (the SDK's client and
    // connection pool, the runtime's workers, the metrics), about 8 MiB that is not left behind
    // by cancelled calls but would be counted as if it were (the whole suite's load once pushed
    // it over the bound).
    let cold = resident_bytes(pid);
    cancelled_calls(&running.address, &repository, 1, 200).await;
    let before = resident_bytes(pid);
    cancelled_calls(&running.address, &repository, 0, 10_000).await;
    let during = resident_bytes(pid);
    assert!(ecr.count("BatchGetImage") > 0, "the calls reached ECR");

    // ECR's answers land within a second of the last call; poll until memory is back.
    let bound = before + (16 << 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = resident_bytes(pid);
    while after > bound && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = resident_bytes(pid);
    }
    eprintln!(
        "resident memory: at start {} MiB, after one wave {} MiB, right after 10,000 cancelled \
         calls {} MiB, then {} MiB",
        cold >> 20,
        before >> 20,
        during >> 20,
        after >> 20
    );
    assert!(
        after <= bound,
        "resident memory {} MiB, more than 16 MiB over the {} MiB before",
        after >> 20,
        before >> 20
    );
    let mut child = running.child;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.wait().unwrap();
}

/// 50 concurrent legal 4 MiB puts used to peak at 293 MiB, over the chart's 256 Mi limit. The
/// request-bytes budget (32 MiB by default, sized for that limit) holds the peak under it; the
/// puts past the budget are shed with UNAVAILABLE + RetryInfo, and every answer is one of the
/// two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_puts_stay_inside_the_charts_memory_limit() {
    let data_dir = scratch_home().join(format!("large-puts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let (mut child, address) = serve_local(&data_dir, &[]);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":1}},"layers":[],"annotations":{{"p":"{}"}}}}"#,
        "0".repeat(64),
        "x".repeat((4 << 20) - 400)
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let puts: Vec<_> = (0..50)
        .map(|n| {
            let mut client = ImageServiceClient::new(channel.clone())
                .max_encoding_message_size(8 << 20)
                .max_decoding_message_size(8 << 20);
            let request = requests::put("large-puts", &format!("t{n}"), &manifest);
            tokio::spawn(async move { client.put_image(request).await })
        })
        .collect();
    let (mut stored, mut shed) = (0, 0);
    for put in puts {
        match put.await.unwrap() {
            Ok(_) => stored += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                shed += 1;
            }
        }
    }
    let peak_kib = memory_bytes(child.id(), "VmHWM") >> 10;
    eprintln!(
        "50 concurrent 4 MiB puts: {stored} stored, {shed} shed, peak {} MiB",
        peak_kib >> 10
    );
    assert!(stored > 0, "some puts are stored");
    assert!(
        peak_kib < 256 * 1024,
        "peak resident memory {} MiB, over the chart's 256 Mi",
        peak_kib >> 10
    );
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// `policy check` names the rule that allows a request and exits 0, says none does and exits
/// 6, and refuses an invalid policy with 64.
#[test]
fn policy_check_prints_the_allowing_rule_and_exits_per_decision() {
    let home = scratch_home();
    let policy = home.join("audit-policy.yaml");
    std::fs::write(
        &policy,
        "rules:\n  - id: ci-team-a\n    principals: [\"spiffe://cluster.local/ns/ci/sa/builder\"]\n    actions: [read, write]\n    repositories: [\"team-a/**\"]\n",
    )
    .unwrap();
    let check = |principal: &str, action: &str, repository: &str, file: &std::path::Path| {
        command(&home)
            .stdout(Stdio::piped())
            .args(["policy", "check", "--authz-policy"])
            .arg(file)
            .args(["--principal", principal, "--action", action])
            .args(["--repository", repository])
            .output()
            .unwrap()
    };
    let builder = "spiffe://cluster.local/ns/ci/sa/builder";
    let allowed = check(builder, "write", "team-a/app/api", &policy);
    assert_eq!(allowed.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&allowed.stdout).contains("rule ci-team-a"));
    let denied = check(builder, "delete", "team-a/app", &policy);
    assert_eq!(denied.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&denied.stdout).contains("no rule allows it"));
    let other = check(
        "spiffe://cluster.local/ns/x/sa/y",
        "read",
        "team-a/app",
        &policy,
    );
    assert_eq!(other.status.code(), Some(6));

    let broken = home.join("broken-policy.yaml");
    std::fs::write(&broken, "rules: [{id: a}]\n").unwrap();
    assert_eq!(
        check(builder, "read", "team-a/app", &broken).status.code(),
        Some(64)
    );
}

/// A rollout's herd, on the defaults: 10,000 concurrent GetImage calls for one cold tag, over
/// 100 HTTP/2 connections, make exactly one BatchGetImage (ECR answering in 300 ms), all 10,000
/// succeed, and resident memory grows by at most 64 MiB. (With a request-count limit of 512,
/// 362 of 1,000 such calls used to be shed though all waited on one ECR call.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_ten_thousand_on_one_cold_tag_is_one_ecr_call() {
    use support::recorded::{RecordedEcr, Reply};
    let repository = support::unique("herd");
    let image = serde_json::json!({
        "registryId": "123456789012",
        "repositoryName": repository,
        "imageId": {"imageTag": "v1", "imageDigest": SEED_DIGEST},
        "imageManifest": SEED,
        "imageManifestMediaType": "application/vnd.docker.distribution.manifest.v2+json",
    });
    let ecr = RecordedEcr::start(vec![(
        "BatchGetImage",
        Reply::ok(serde_json::json!({"images": [image], "failures": []}))
            .after(Duration::from_millis(300)),
    )])
    .await;
    let running = serve_on_moto(&["--ecr-endpoint-url", &ecr.endpoint], &repository).await;
    let pid = running.child.id();
    let mut channels = Vec::new();
    for _ in 0..100 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{}", running.address))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let before = resident_bytes(pid);
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..10_000)
        .map(|n| {
            let mut client = ImageServiceClient::new(channels[n % 100].clone());
            let request = requests::get(&repository, "v1", "");
            tokio::spawn(async move { client.get_image(request).await })
        })
        .collect();
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(answer) => assert_eq!(answer.into_inner().image.unwrap().image_manifest, SEED),
            Err(status) => *failures.entry(format!("{:?}", status.code())).or_default() += 1,
        }
    }
    let took = started.elapsed();
    let peak = memory_bytes(pid, "VmHWM");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "herd ({took:?}): 10,000 calls, failures {failures:?}, BatchGetImage calls {}, resident {} MiB before, peak {} MiB (+{} MiB)",
        ecr.count("BatchGetImage"),
        before >> 20,
        peak >> 20,
        growth >> 20
    );
    assert!(failures.is_empty(), "every call succeeds: {failures:?}");
    assert_eq!(
        ecr.count("BatchGetImage"),
        1,
        "one ECR call for the herd, which took {took:?}"
    );
    assert!(growth <= 64 << 20, "memory grew by {} MiB", growth >> 20);
    let mut child = running.child;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.wait().unwrap();
}

/// The binary on a fresh embedded store of its own: the process, its address, a client, and
/// the store's directory (for the test to remove).
async fn local_service(
    name: &str,
) -> (
    Child,
    String,
    ImageServiceClient<tonic::transport::Channel>,
    std::path::PathBuf,
) {
    let data_dir = scratch_home().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let (child, address) = serve_local(&data_dir, &[]);
    let client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    (child, address, client, data_dir)
}

/// Opens a WatchTag stream and reads its first message.
async fn open_watch(
    client: &mut ImageServiceClient<tonic::transport::Channel>,
    repository: &str,
    tag: &str,
) -> tonic::Streaming<ecr_image_service::pb::WatchTagResponse> {
    let mut stream = client
        .watch_tag(ecr_image_service::pb::WatchTagRequest {
            repository_name: repository.into(),
            image_tag: tag.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first message");
    assert!(first.event.is_some());
    stream
}

/// SIGTERM with 20 open watches: every watch ends with UNAVAILABLE (WATCH_ENDED, with
/// RetryInfo) at once, and the process exits 0 within the drain (here with the harness's
/// `--shutdown-delay 0s`; the watches end before the delay either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_watch_and_the_process_exits_in_time() {
    let (mut child, _, mut client, data_dir) = local_service("watch-sigterm").await;
    client
        .put_image(requests::put("team/app", "live", SEED))
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(open_watch(&mut client, "team/app", "live").await);
    }
    let signalled = Instant::now();
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    for stream in &mut streams {
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the watch ends at once");
        let status = ended.expect_err("it ends with a status");
        support::assert_status(&status, tonic::Code::Unavailable, "WATCH_ENDED");
        assert!(tonic_types::StatusExt::get_details_retry_info(&status).is_some());
    }
    let grace = ecr_image_service::server::DEFAULT_SHUTDOWN_GRACE;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(signalled.elapsed() < grace, "still running after the grace");
        std::thread::park_timeout(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    eprintln!(
        "20 watches ended and the process exited 0 in {:?}",
        signalled.elapsed()
    );
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// 10,000 watchers over 100 tags of one repository (100 HTTP/2 connections) keep resident
/// memory within 64 MiB of the idle service, and one poller serves them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watchers_stay_within_64_mib() {
    let (mut child, address, mut client, data_dir) = local_service("watch-memory").await;
    for n in 0..100 {
        client
            .put_image(requests::put("team/app", &format!("t{n}"), SEED))
            .await
            .unwrap();
    }
    let before = resident_bytes(child.id());
    let openers: Vec<_> = (0..100)
        .map(|connection| {
            let address = address.clone();
            tokio::spawn(async move {
                let mut client = ImageServiceClient::connect(format!("http://{address}"))
                    .await
                    .unwrap();
                let mut streams = Vec::new();
                for n in 0..100 {
                    let tag = format!("t{}", (connection + n) % 100);
                    streams.push(open_watch(&mut client, "team/app", &tag).await);
                }
                streams
            })
        })
        .collect();
    let mut streams = Vec::new();
    for opener in openers {
        streams.extend(opener.await.unwrap());
    }
    assert_eq!(streams.len(), 10_000);
    let after = resident_bytes(child.id());
    let growth = after.saturating_sub(before);
    eprintln!(
        "10,000 watches: resident {} MiB idle, {} MiB with them (+{} MiB)",
        before >> 20,
        after >> 20,
        growth >> 20
    );
    assert!(
        growth <= 64 << 20,
        "watches grew memory by {} MiB",
        growth >> 20
    );
    drop(streams);
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// `watch-tag` prints the tag's state as one JSON line, then waits for more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_tag_prints_one_json_line_per_event() {
    let (mut server, address, mut client, data_dir) = local_service("watch-cli").await;
    client
        .put_image(requests::put("team/app", "live", SEED))
        .await
        .unwrap();
    let home = scratch_home();
    let mut watcher = command(&home)
        .args([
            "watch-tag",
            "--repository-name",
            "team/app",
            "--image-tag",
            "live",
        ])
        .env("ECR_IMAGE_SERVICE_ENDPOINT", format!("http://{address}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (line_tx, line_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = line_rx.recv_timeout(DEADLINE).expect("a first event");
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["event"], "state");
    assert_eq!(event["imageId"]["imageDigest"], SEED_DIGEST);
    assert_eq!(event["exists"], true);
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
}
