//! The dashboard's queries against a real Prometheus (Debian's, installed by
//! `scripts/test-deps.sh prometheus`) scraping the service: the binary in front of the
//! emulator, driven through everything the panels show (reads and hits, puts that wait for and
//! are refused a budget slot, shed requests, a watch, policy decisions). Every query of every
//! panel must return data: no panel queries a metric that does not exist.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ecr_image_service::pb::image_service_client::ImageServiceClient;
use serde_json::Value;

use crate::support::fault_proxy::FaultProxy;
use crate::support::process::Served;
use crate::support::requests::{get, open_watch, put};
use crate::support::{create_repository, install, moto, root, unique};

/// Prometheus scrapes this often, so that rates have points within seconds.
const SCRAPE: &str = "1s";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    install("prometheus");
    let repository = unique("dash/app");
    create_repository(moto::endpoint(), &repository, false).await;
    let proxy =
        FaultProxy::delaying(moto::endpoint(), "PutImage", Duration::from_millis(100)).await;
    let home = std::env::temp_dir().join(format!("dashboards-{}", std::process::id()));
    let served = Served::start(
        &home,
        &proxy.endpoint,
        "rules:\n  - id: dash\n    principals: [anonymous]\n    actions: [read, write]\n    repositories: [\"dash/**\"]\n",
        &["--max-concurrent-requests", "4", "--put-image-rate", "2"],
    );
    let (address, admin) = (served.address.clone(), served.admin.clone());

    let prometheus_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = home.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: {SCRAPE}\n  evaluation_interval: {SCRAPE}\nscrape_configs:\n  - job_name: ecr-image-service\n    static_configs:\n      - targets: [\"{admin}\"]\n"
        ),
    )
    .unwrap();
    let prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                home.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let base = format!("127.0.0.1:{prometheus_port}");

    // Traffic through everything the panels show.
    let mut client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    let _watch = open_watch(&client, &repository, "t0").await;
    let puts: Vec<_> = (0..10)
        .map(|n| {
            let mut client = client.clone();
            let manifest =
                format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","d":{n}}}"#);
            let mut request = tonic::Request::new(put(&repository, &format!("t{n}"), &manifest));
            request.set_timeout(Duration::from_millis(1500));
            tokio::spawn(async move { client.put_image(request).await })
        })
        .collect();
    for put in puts {
        let _ = put.await.unwrap();
    }
    for _ in 0..5 {
        let _ = client.get_image(get(&repository, "t0", "")).await;
    }
    let _ = client.get_image(get("other/app", "t0", "")).await;

    // Prometheus has scraped a few times once `up` has three points.
    let started = Instant::now();
    loop {
        let answer = query(&base, "count_over_time(up[1m])").await;
        let points = answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if points >= 3.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Prometheus scraped nothing: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("helm/ecr-image-service/files/dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let answer = query(&base, expr).await;
            let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
            eprintln!(
                "{}: {series} series: {expr}",
                panel["title"].as_str().unwrap()
            );
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            assert!(series > 0, "panel {:?} has no data: {expr}", panel["title"]);
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked} queries");
    drop(prometheus);
}

/// Prometheus's instant query API.
async fn query(base: &str, expr: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Ok(mut stream) = tokio::net::TcpStream::connect(base).await else {
        return Value::Null;
    };
    let request = format!(
        "GET /api/v1/query?query={encoded} HTTP/1.1\r\nHost: {base}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or(Value::Null)
}
