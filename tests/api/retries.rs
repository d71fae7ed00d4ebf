//! Clients retry the right things without code (issue 23): a grpcio channel configured only
//! with the shipped service config, against the service (the binary, on its defaults but for a
//! concurrency limit of 2) in front of an ECR that takes 150 ms per PutImage, so that most of
//! a burst is shed with UNAVAILABLE `OVERLOADED`, RetryInfo and `grpc-retry-pushback-ms: 100`.
//! Every call succeeds; the server sees the shed attempts come back in waves the pushback
//! apart (without the pushback, the policy's own backoff would bring them back within 0-50 ms,
//! jittered, and the waves would run together); nothing is retried on
//! INVALID_ARGUMENT or PERMISSION_DENIED.

use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::support::fault_proxy::FaultProxy;
use crate::support::process::Served;
use crate::support::process::{sample, scrape};
use crate::support::{create_repository, install, moto, root, unique};

/// Calls sent at once: twice the service's limit. (Three times starves one: the pushback has
/// no jitter, each wave comes back whole, and gRPC caps a policy at five attempts.)
const CALLS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_with_the_service_config_retries_as_the_server_asks() {
    install("python");
    let mut python = Command::new(root().join("target/test-python/bin/python"));
    python.arg(root().join("tests/clients/python/retry_client.py"));
    shed_scenario("python", python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_client_with_the_service_config_retries_as_the_server_asks() {
    install("node");
    let mut node = Command::new("node");
    node.arg(root().join("tests/clients/node/retry_client.js"))
        .env("NODE_PATH", root().join("target/test-node/node_modules"));
    shed_scenario("node", node).await;
}

/// The scenario of the module's comment, run by `client` (its program and script; the
/// endpoint, proto directory, service config, repository and call count are appended).
async fn shed_scenario(name: &str, mut client: Command) {
    let repository = unique("retry/app");
    create_repository(moto::endpoint(), &repository, false).await;
    let proxy =
        FaultProxy::delaying(moto::endpoint(), "PutImage", Duration::from_millis(150)).await;
    let home = std::env::temp_dir().join(format!("retries-{}-{name}", std::process::id()));
    let served = Served::start(
        &home,
        &proxy.endpoint,
        "rules:\n  - id: retry\n    principals: [anonymous]\n    actions: [read, write]\n    repositories: [\"retry/**\"]\n",
        &[
            "--max-concurrent-requests",
            "2",
            "--log-filter",
            "info,ecr_image_service::transport::admission=debug",
        ],
    );
    let (address, admin) = (served.address.clone(), served.admin.clone());
    client
        .arg(&address)
        .arg(root().join("proto"))
        .arg(root().join("proto/imageservice/v1/service_config.json"))
        .arg(&repository)
        .arg(CALLS.to_string())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let run = tokio::task::spawn_blocking(move || client.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{name}: {stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["ok"], CALLS, "{report}");
    assert_eq!(report["invalid"], "INVALID_ARGUMENT");
    assert_eq!(report["denied"], "PERMISSION_DENIED");

    // What the server saw: shed attempts, by time.
    let metrics = scrape(&admin).await;
    let mut shed: Vec<SystemTime> = served
        .lines
        .try_iter()
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .filter(|json| {
            json["fields"]["message"]
                .as_str()
                .or(json["message"].as_str())
                .is_some_and(|m| m.starts_with("request shed"))
        })
        .filter_map(|json| humantime::parse_rfc3339_weak(json["timestamp"].as_str()?).ok())
        .collect();
    shed.sort();
    assert!(
        !shed.is_empty(),
        "nothing was shed: the scenario did not happen"
    );
    // Waves: shed attempts less than 50 ms apart are one wave.
    let mut waves = vec![shed[0]];
    for pair in shed.windows(2) {
        if pair[1].duration_since(pair[0]).unwrap_or_default() > Duration::from_millis(50) {
            waves.push(pair[1]);
        }
    }
    let gaps: Vec<Duration> = waves
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap_or_default())
        .collect();
    eprintln!(
        "{name}: {CALLS} calls, {} attempts shed, in {} waves {gaps:?} apart; {report}",
        shed.len(),
        waves.len()
    );
    assert!(
        waves.len() >= 2,
        "{name}: shed attempts came back within 50 ms of each other: {shed:?}"
    );
    for gap in &gaps {
        assert!(
            *gap >= Duration::from_millis(90),
            "{name}: a retry came {gap:?} after a shed wave: the 100 ms pushback was not honoured"
        );
    }
    // Each refused call reached the service once: no retry on those codes.
    for code in ["INVALID_ARGUMENT", "PERMISSION_DENIED"] {
        let seen = sample(
            &metrics,
            "imageservice_rpc_requests_total",
            &[("method", "PutImage"), ("code", code)],
        );
        assert_eq!(seen, 1.0, "{name}: {code} reached the service {seen} times");
    }
    // At most the policy's attempts per call.
    assert!(
        shed.len() <= CALLS * 4,
        "{name}: {} shed attempts",
        shed.len()
    );
}

/// On the wire, read with a raw HTTP/2 client (the `h2` crate: the header block as the frames
/// carried it, no gRPC library between): an UNAVAILABLE with RetryInfo carries
/// `grpc-retry-pushback-ms` with the same delay (here ECR_RATE_BUDGET_EXHAUSTED: one PutImage
/// every 10 s, the second put refused at once); an INVALID_ARGUMENT carries none.
#[tokio::test]
async fn unavailable_answers_carry_the_pushback_on_the_wire() {
    use crate::support::requests::put;
    use crate::support::{h2_connection, registry, serve_on_loopback, server_settings};
    use tonic_types::StatusExt;
    let repository = unique("pushback");
    create_repository(moto::endpoint(), &repository, false).await;
    let slow = ecr_image_service::registry::ecr::EcrSettings {
        put_image_rate: 0.1,
        ..crate::support::settings()
    };
    let address = serve_on_loopback(registry(moto::endpoint(), slow), server_settings()).await;
    let mut sender = h2_connection(address).await;
    let manifest =
        |n: u32| format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","p":{n}}}"#);
    let first = raw_put(&mut sender, put(&repository, "", &manifest(0))).await;
    assert_eq!(
        first.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0")
    );

    let refused = raw_put(&mut sender, put(&repository, "", &manifest(1))).await;
    let status = tonic::Status::from_header_map(&refused).expect("a grpc-status");
    crate::support::assert_status(
        &status,
        tonic::Code::Unavailable,
        "ECR_RATE_BUDGET_EXHAUSTED",
    );
    let retry = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    let pushback = refused
        .get("grpc-retry-pushback-ms")
        .expect("grpc-retry-pushback-ms");
    assert_eq!(pushback.to_str().unwrap(), retry.as_millis().to_string());

    let invalid = raw_put(&mut sender, put("Bad_Name", "", &manifest(2))).await;
    assert_eq!(
        invalid.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("3")
    );
    assert!(invalid.get("grpc-retry-pushback-ms").is_none());
}

/// One PutImage over a raw HTTP/2 stream (a 1 s `grpc-timeout`); the fields of the answer's
/// header blocks, headers and trailers together, as received. Each is printed (binary fields
/// by length), so `--nocapture` shows the capture.
async fn raw_put(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    message: ecr_image_service::pb::PutImageRequest,
) -> http::HeaderMap {
    use prost::Message;
    let encoded = message.encode_to_vec();
    let mut frame = Vec::with_capacity(5 + encoded.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&encoded);
    let request = http::Request::post("http://localhost/imageservice.v1.ImageService/PutImage")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "1S")
        .body(())
        .unwrap();
    *sender = sender.clone().ready().await.expect("stream capacity");
    let (response, mut body) = sender.send_request(request, false).expect("open a stream");
    body.send_data(frame.into(), true)
        .expect("send the message");
    let response = response.await.expect("an answer");
    let mut fields = response.headers().clone();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("a body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if let Some(trailers) = body.trailers().await.expect("trailers") {
        fields.extend(trailers);
    }
    for (name, value) in &fields {
        if name.as_str().ends_with("-bin") {
            eprintln!("  {name}: <{} bytes>", value.len());
        } else {
            eprintln!("  {name}: {}", value.to_str().unwrap_or("<not text>"));
        }
    }
    eprintln!();
    fields
}
