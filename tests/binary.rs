//! The `ecr-image-service` binary itself: configuration errors exit 64 with one line, and a
//! server configured only through the AWS SDK's standard environment serves the seed scenario
//! against the emulator, logs structured spans without any credential, and stops on SIGTERM.

#[path = "api/support/moto.rs"]
mod moto;
#[path = "api/support/requests.rs"]
mod requests;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ecr_image_service::pb::PutImageOutcome;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_ecr-image-service");
const SEED: &str = include_str!("fixtures/hello-world.manifest.json");
const SEED_DIGEST: &str = "sha256:8ece96b74f87652876199d83bd107d0435a196133af383ac54cb82b6cc5283ae";
/// A secret access key that must never appear in any log line.
const SECRET: &str = "e2eSecretKeyThatMustNeverBeLogged0000000";
/// Start-up includes loading the AWS configuration; generous for a loaded CI machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// A command with a clean environment and an empty `HOME` (so no AWS profile): nothing from the
/// host's AWS set-up leaks in, and the SDK never reaches for the instance metadata service (a
/// non-loopback address).
fn command(home: &std::path::Path) -> Command {
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

fn scratch_home() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ecr-image-service-home-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Bad flags, bad env twins and a missing region: exit 64 and exactly one line naming the problem.
#[test]
fn invalid_configuration_exits_64_with_one_line() {
    let home = scratch_home();
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

/// Collects the child's stderr lines as they come.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
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

/// Waits for the `listening` line and returns the address it names.
fn listening_address(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) -> String {
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
            return json["address"].as_str().unwrap().to_owned();
        }
    }
}

#[tokio::test]
async fn serves_from_the_standard_aws_environment_and_stops_on_sigterm() {
    let moto = moto::endpoint();
    let home = scratch_home();
    let mut child = command(&home)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-filter",
            "debug",
        ])
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_ECR", moto)
        .env("AWS_ACCESS_KEY_ID", "AKIDE2ETESTKEY")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let mut seen = Vec::new();
    let address = listening_address(&lines, &mut seen);

    let admin = aws_sdk_ecr::Client::from_conf(
        aws_sdk_ecr::Config::builder()
            .behavior_version(aws_sdk_ecr::config::BehaviorVersion::latest())
            .region(aws_sdk_ecr::config::Region::new("us-east-1"))
            .endpoint_url(moto)
            .credentials_provider(aws_sdk_ecr::config::Credentials::new(
                "a", "b", None, None, "t",
            ))
            .build(),
    );
    admin
        .create_repository()
        .repository_name("binary-e2e")
        .send()
        .await
        .unwrap();

    let mut client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
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
    client.get_image(get("missing")).await.unwrap_err();

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
    assert_eq!(refused["level"], "INFO");
    assert_eq!(refused["reason"], "IMAGE_NOT_FOUND");
    assert_eq!(refused["span"]["method"], "GetImage");
    assert_eq!(refused["span"]["repository"], "binary-e2e");
    assert_eq!(refused["span"]["reference"], "missing");
    assert_eq!(refused["span"]["code"], "NotFound");
    assert!(refused["span"]["latency_ms"].is_number());
    let succeeded = seen
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|json| json["message"] == "request succeeded" && json["span"]["method"] == "PutImage")
        .unwrap_or_else(|| panic!("no DEBUG success line for PutImage: {seen:#?}"));
    assert_eq!(succeeded["level"], "DEBUG");
    assert_eq!(succeeded["span"]["digest"], SEED_DIGEST);
}
