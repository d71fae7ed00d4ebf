//! Hostile and careless input: each test reproduces an attack from the hostile-input review on
//! loopback and asserts the bound the service keeps (time, bytes or status).

use std::time::{Duration, Instant};

use ecr_image_service::pb::RetagImageRequest;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

use crate::support::SEED;
use crate::support::backend::{Backend, Kind, ScratchDir, local_settings};
use crate::support::requests::get;
use crate::support::{
    assert_status, moto, registry, serve_on_loopback, serve_with_admin, server_settings, settings,
    start_channel, violated_fields,
};
use ecr_image_service::registry::local::LocalRegistry;

/// What a gRPC status costs on the wire: its message and its binary details (the
/// `grpc-status-details-bin` trailer, before base64).
fn trailer_bytes(status: &tonic::Status) -> (usize, usize) {
    (status.message().len(), status.details().len())
}

/// A RetagImage listing 100,000 target tags (0.8 MB) is refused on its size, before it is
/// decoded (REQUEST_TOO_LARGE); one within the size bound but over the count limit is refused on
/// its count, its tags never parsed. While the large ones arrive back to back, health checks
/// keep answering within their deadline (they took 14.3 s when every tag was parsed and
/// compared with every other; benches/hostile.rs measures how fast they answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_target_list_is_refused_on_its_count() {
    // The service on a runtime of its own (two workers, as on a 2-core pod), so that the
    // attackers' own encoding work does not count against it.
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let address =
                serve_on_loopback(registry(moto::endpoint(), settings()), server_settings()).await;
            address_tx.send(address).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let address = address_rx.recv().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = RetagImageRequest {
        repository_name: "hello-world".into(),
        source_image_id: Some(ecr_image_service::pb::ImageIdentifier {
            image_tag: "v1".into(),
            ..Default::default()
        }),
        target_tags: (0..100_000).map(|n| format!("t{n}")).collect(),
        ..Default::default()
    };
    let mut client =
        ecr_image_service::pb::image_service_client::ImageServiceClient::new(channel.clone());
    let status = client.retag_image(request.clone()).await.unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "REQUEST_TOO_LARGE");
    let mut counted = request.clone();
    counted.target_tags.truncate(5_000);
    let status = client.retag_image(counted).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violated_fields(&status), ["target_tags"]);

    let attack_until = Instant::now() + Duration::from_secs(2);
    let attackers: Vec<_> = (0..2)
        .map(|_| {
            let (mut client, request) = (client.clone(), request.clone());
            tokio::spawn(async move {
                let mut sent = 0;
                while Instant::now() < attack_until {
                    let _ = client.retag_image(request.clone()).await;
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut health = HealthClient::new(channel);
    let mut slowest = Duration::ZERO;
    while Instant::now() < attack_until {
        let asked = Instant::now();
        let mut check = tonic::Request::new(HealthCheckRequest::default());
        check.set_timeout(HEALTH_DEADLINE);
        health
            .check(check)
            .await
            .expect("health answers during the attack, within its deadline");
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sent = 0;
    for attacker in attackers {
        sent += attacker.await.unwrap();
    }
    assert!(sent >= 4, "the attack ran: {sent} requests");
    // The latency itself is a benchmark's figure (benches/hostile.rs), not a test's bound.
    eprintln!("health during the attack: slowest {slowest:?}");
}

/// A health check's deadline during an attack: a kubelet probe's default timeout is 1 s;
/// twice that tells "answers" from "starved" on a loaded 2-core machine.
const HEALTH_DEADLINE: Duration = Duration::from_secs(2);

/// A 2 MB GetImage with a million empty `accepted_media_types` gets one small answer (it is
/// refused on its size before decoding; 30,000 of them, within the size bound, on the list's
/// length), at most ten violations are ever listed, and the message and the details trailer
/// stay under 1 KB and 8 KB (they were 36 MB, with 655 MB of peak memory).
#[tokio::test]
async fn error_answers_are_bounded_whatever_the_request() {
    let channel = start_channel(registry(moto::endpoint(), settings())).await;
    let mut client = ecr_image_service::pb::image_service_client::ImageServiceClient::new(channel);
    let mut flood = get("hello-world", "v1", "");
    flood.accepted_media_types = vec![String::new(); 1_000_000];
    let status = client.get_image(flood.clone()).await.unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "REQUEST_TOO_LARGE");
    let (message, details) = trailer_bytes(&status);
    assert!(
        message < 1024 && details < 8 * 1024,
        "{message} + {details} bytes"
    );
    flood.accepted_media_types.truncate(30_000);
    let status = client.get_image(flood).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violated_fields(&status), ["accepted_media_types"]);
    let (message, details) = trailer_bytes(&status);
    assert!(
        message < 1024 && details < 8 * 1024,
        "{message} + {details} bytes"
    );

    // Within the count limit, many bad entries: ten are listed, the rest counted.
    let mut many = get("Bad Name", "", "sha256:nope");
    many.registry_id = "x".into();
    many.accepted_media_types = (0..100).map(|n| format!("bad {n}")).collect();
    let status = client.get_image(many).await.unwrap_err();
    let listed = status.get_details_bad_request().unwrap().field_violations;
    assert_eq!(listed.len(), 10);
    assert!(status.message().contains("more"), "{}", status.message());
    let (message, details) = trailer_bytes(&status);
    assert!(
        message < 1024 && details < 8 * 1024,
        "{message} + {details} bytes"
    );

    // A declared media type contradicting a megabyte-long `mediaType` in the manifest: the
    // echo of it is cut.
    let long = "x".repeat(1 << 20);
    let mut put = crate::support::requests::put(
        "hello-world",
        "v1",
        &format!(r#"{{"mediaType":"application/{long}","config":{{}},"layers":[]}}"#),
    );
    put.image_manifest_media_type = "application/vnd.oci.image.manifest.v1+json".into();
    let status = client.put_image(put).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "MEDIA_TYPE_MISMATCH");
    let (message, details) = trailer_bytes(&status);
    assert!(
        message < 1024 && details < 8 * 1024,
        "{message} + {details} bytes"
    );
}

/// Tags ECR would refuse (NUL, CR, LF, ESC, an RTL override, a path escape) are refused on both
/// backends with the field named, and nothing is stored: the embedded store used to keep them.
#[tokio::test]
async fn tags_ecr_would_refuse_are_refused_on_both_backends() {
    use crate::support::{SEED, requests::put};
    for kind in [Kind::Ecr, Kind::Local] {
        let backend = Backend::start(kind).await;
        let repository = backend.repository("hostile-tags", false).await;
        let mut client = backend.client.clone();
        for tag in [
            "a\0b",
            "a\rb",
            "a\nFORGED",
            "a\u{1b}[31m",
            "a\u{202e}b",
            "../x",
        ] {
            let status = client
                .put_image(put(&repository, tag, SEED))
                .await
                .unwrap_err();
            assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
            assert_eq!(violated_fields(&status), ["image_tag"], "{kind:?} {tag:?}");
        }
        // Nothing was stored: the image is not there under any name.
        let status = client
            .get_image(get(&repository, "", crate::support::SEED_DIGEST))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{kind:?}: {status:?}");
    }
}

/// Statuses a client can act on: a message over the server's limit is RESOURCE_EXHAUSTED with
/// REQUEST_TOO_LARGE (tonic alone answers OUT_OF_RANGE), and bytes that are not protobuf are
/// INVALID_ARGUMENT naming the decode error (gRPC's INTERNAL reads as a server bug).
#[tokio::test]
async fn oversized_and_undecodable_requests_get_statuses_clients_act_on() {
    let channel = start_channel(registry(moto::endpoint(), settings())).await;
    let mut client =
        ecr_image_service::pb::image_service_client::ImageServiceClient::new(channel.clone())
            .max_encoding_message_size(16 << 20);
    let huge = format!(
        r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","x":"{}"}}"#,
        "x".repeat(5 << 20)
    );
    let status = client
        .put_image(crate::support::requests::put("hello-world", "v1", &huge))
        .await
        .unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "REQUEST_TOO_LARGE");

    // Field 1 of GetImageRequest (a string) sent with wire type 7, which does not exist.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary(
            tonic::Request::new(Garbage(vec![0x0f, 0x01, 0x02])),
            http::uri::PathAndQuery::from_static("/imageservice.v1.ImageService/GetImage"),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violated_fields(&status), ["request"]);
}

/// Bytes sent as a request message as they are.
#[derive(Debug, Clone)]
struct Garbage(Vec<u8>);

/// Encodes [`Garbage`] verbatim; decodes nothing (every answer here is an error).
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Garbage;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Garbage;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Garbage,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut as _;
        dst.put_slice(&item.0);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, _: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        Ok(Some(()))
    }
}

/// One stream of a GetImage whose 100-byte message is never finished: its headers and one byte
/// of body, then nothing. `grpc_timeout` is sent as `grpc-timeout` when given.
async fn dribble(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    grpc_timeout: Option<&str>,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let mut request = http::Request::post("http://localhost/imageservice.v1.ImageService/GetImage")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = grpc_timeout {
        request = request.header("grpc-timeout", timeout);
    }
    *sender = sender.clone().ready().await.expect("stream capacity");
    let (response, mut body) = sender
        .send_request(request.body(()).unwrap(), false)
        .expect("open a stream");
    // The gRPC prefix says 100 bytes are coming; only its first byte ever arrives.
    body.send_data(bytes::Bytes::from_static(&[0]), false)
        .expect("send one byte");
    (response, body)
}

/// The status of a trailers-only answer (every refusal before work is one).
async fn status_of(response: h2::client::ResponseFuture) -> tonic::Status {
    let response = response.await.expect("an answer");
    tonic::Status::from_header_map(response.headers()).expect("a trailers-only status")
}

/// Two connections of 256 streams, each holding one byte of a 100-byte message, used to hold
/// every request slot (UNAVAILABLE for legitimate calls for 32 s). Admission is now decided when
/// a body has arrived: while they dribble, legitimate calls on another connection succeed, and
/// each dribbling stream is answered DEADLINE_EXCEEDED (REQUEST_BODY_TIMEOUT) once the
/// header-to-body timeout has passed. A dribbling call whose own deadline is shorter gets
/// DEADLINE_EXCEEDED at that deadline: the deadline covers receiving the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_hold_no_request_slot() {
    let backend = Backend::start(Kind::Local).await;
    let repository = backend.repository("slow-bodies", false).await;
    backend.put(&repository, "v1", SEED).await;

    let attack_started = Instant::now();
    let mut dribbling = Vec::new();
    for _ in 0..2 {
        let mut sender = crate::support::h2_connection(backend.address).await;
        for _ in 0..256 {
            dribbling.push(dribble(&mut sender, None).await);
        }
    }
    let mut short_deadline = crate::support::h2_connection(backend.address).await;
    let (short, _held) = dribble(&mut short_deadline, Some("1S")).await;

    let mut client = backend.client.clone();
    let mut served = 0;
    while attack_started.elapsed() < Duration::from_secs(2) {
        client
            .get_image(get(&repository, "v1", ""))
            .await
            .expect("a legitimate call is served while bodies dribble");
        served += 1;
    }
    assert!(served > 0);

    let status = status_of(short).await;
    assert_status(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    assert!(
        attack_started.elapsed() < server_settings().request_body_timeout,
        "the caller's 1 s deadline ended the wait, not the body timeout"
    );
    for (response, _body) in dribbling {
        let status = status_of(response).await;
        assert_status(&status, Code::DeadlineExceeded, "REQUEST_BODY_TIMEOUT");
    }
    let waited = attack_started.elapsed();
    assert!(
        waited >= server_settings().request_body_timeout
            && waited < server_settings().request_body_timeout + Duration::from_secs(5),
        "answered after {waited:?}"
    );
}

/// 300 idle TCP connections to the gRPC port and 300 to the admin port were all still open
/// after 40 s. Each is now closed once the handshake timeout (5 s) passes without a byte, while
/// a real client connecting meanwhile is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_on_both_ports() {
    use tokio::io::AsyncReadExt;
    let dir = ScratchDir::new("idle-connections");
    let store = LocalRegistry::open(&local_settings(&dir.0)).expect("open the store");
    let (grpc, admin) = serve_with_admin(store, server_settings()).await;
    let started = Instant::now();
    let mut idle = Vec::new();
    for address in [grpc, admin] {
        for _ in 0..300 {
            idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
    }
    let mut client = ecr_image_service::pb::image_service_client::ImageServiceClient::connect(
        format!("http://{grpc}"),
    )
    .await
    .unwrap();
    let status = client
        .get_image(get("nowhere", "v1", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "REPOSITORY_NOT_FOUND");

    for mut connection in idle {
        // The gRPC server sends its HTTP/2 SETTINGS first; then the connection must end.
        let mut sent = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), connection.read_to_end(&mut sent))
            .await
            .expect("an idle connection is closed");
        assert!(
            sent.len() < 100,
            "{} bytes sent to an idle client",
            sent.len()
        );
        drop(read);
    }
    let closed_after = started.elapsed();
    assert!(
        closed_after >= ecr_image_service::server::HANDSHAKE_TIMEOUT,
        "closed after {closed_after:?}, before the handshake timeout"
    );
}
