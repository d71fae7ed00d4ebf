//! `cargo bench --bench fleet`: replicas sharing ECR's quotas, tag freshness and WatchTag
//! polling through Redis, against the same replicas without it. Printed:
//!
//! - PutImage/s at ECR with 30 puts in flight for 10 s, three replicas as the chart runs them
//!   (`--rate-share 3`): all through one replica without Redis, then with Redis through one and
//!   spread over three, with the busiest one-second window;
//! - the same spread load with Redis killed (`kill -9`) mid-load: each replica's rate without it;
//! - how long a tag moved through replica A takes to read as moved through replica B;
//! - BatchGetImage per poll interval for 2 replicas with a watcher each on one repository.
//!
//! Everything is the binary on its defaults plus `--rate-share 3` (and `--redis-url`), in
//! front of the moto emulator, each replica through a counting proxy of its own; Debian's
//! redis-server on loopback. The bench reports, it does not fail.

#[allow(dead_code)]
#[path = "../tests/api/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::redis::Redis;
use support::replicas::{self, Replica, arrivals, between, put_load, rate, until_mode};
use support::requests::{get, open_watch, put};
use support::{create_repository, digest_of, moto, unique};

/// How long each load runs.
const LOAD: Duration = Duration::from_secs(10);
/// Calls in flight.
const IN_FLIGHT: usize = 30;
/// Callers' deadline: the service's default.
const DEADLINE: Duration = Duration::from_secs(20);

fn main() {
    // SAFETY: set before any thread is started.
    unsafe { std::env::set_var("NO_PROXY", "127.0.0.1,localhost") };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    println!(
        "fleet: 3 replicas, --rate-share 3, PutImage quota 10/s, {IN_FLIGHT} puts in flight for {LOAD:?}"
    );
    let repository = unique("fleet-bench");
    create_repository(moto::endpoint(), &repository, false).await;

    let alone = replicas::start(3, None, &[]).await;
    load(
        "without Redis, all through one replica",
        &alone,
        &alone[..1],
        &repository,
    )
    .await;
    drop(alone);

    let mut redis = Redis::start();
    let fleet = replicas::start(3, Some(&redis.url), &[]).await;
    until_mode(&fleet, "redis", Duration::from_secs(10)).await;
    load(
        "with Redis, all through one replica",
        &fleet,
        &fleet[..1],
        &repository,
    )
    .await;
    load("with Redis, spread over three", &fleet, &fleet, &repository).await;

    // Redis killed mid-load.
    let started = Instant::now();
    let targets: Vec<_> = fleet.iter().map(|r| r.client.clone()).collect();
    let loaded = {
        let repository = repository.clone();
        tokio::spawn(
            async move { put_load(&targets, &repository, IN_FLIGHT, LOAD, DEADLINE).await },
        )
    };
    tokio::time::sleep(LOAD / 3).await;
    redis.kill();
    let killed = Instant::now();
    let outcomes = loaded.await.unwrap();
    let ended = Instant::now();
    let sent = between(&arrivals(&fleet), started, ended);
    println!(
        "  Redis killed {:.1} s into the load: busiest second at ECR {}, slowest call {:.2} s, \
         {} ok, {} refused, {} failed, {} past their deadline",
        (killed - started).as_secs_f64(),
        support::fair_shares::busiest_second(&sent),
        outcomes.slowest.as_secs_f64(),
        outcomes.ok,
        outcomes.refused,
        outcomes.failed,
        outcomes.overdue
    );
    for (n, replica) in fleet.iter().enumerate() {
        let (per_second, busiest) = rate(&replica.proxy.arrivals("PutImage"), killed, ended);
        println!(
            "    replica {n} without Redis: {per_second:.2} PutImage/s (quota / 3 = 3.33), busiest second {busiest}"
        );
    }
    redis.restart();
    let back = until_mode(&fleet, "redis", Duration::from_secs(10)).await;
    println!(
        "  Redis restarted: shared budgets again after {:.0} ms",
        back.as_secs_f64() * 1000.0
    );
    drop(fleet);

    tag_moves(&redis.url, &repository).await;
    watch_polls(&redis.url).await;
}

/// Puts through `targets` for [`LOAD`]; prints ECR's rate past the first second.
async fn load(name: &str, fleet: &[Replica], targets: &[Replica], repository: &str) {
    let clients: Vec<_> = targets.iter().map(|r| r.client.clone()).collect();
    let started = Instant::now();
    let outcomes = put_load(&clients, repository, IN_FLIGHT, LOAD, DEADLINE).await;
    let ended = Instant::now();
    let sent = between(&arrivals(fleet), started, ended);
    let (per_second, _) = rate(&sent, started + Duration::from_secs(1), ended);
    println!(
        "  {name}: {per_second:.2} PutImage/s at ECR, busiest second {}; {} ok, {} refused, \
         slowest call {:.2} s",
        support::fair_shares::busiest_second(&sent),
        outcomes.ok,
        outcomes.refused,
        outcomes.slowest.as_secs_f64()
    );
}

/// Tag moves through A read through B: 20 moves with Redis, one without.
async fn tag_moves(redis: &str, repository: &str) {
    for shared in [true, false] {
        let fleet = replicas::start(2, shared.then_some(redis), &[]).await;
        if shared {
            until_mode(&fleet, "redis", Duration::from_secs(10)).await;
        }
        let (mut a, mut b) = (fleet[0].client.clone(), fleet[1].client.clone());
        let mut took = Vec::new();
        for n in 0..if shared { 20 } else { 1 } {
            let tag = format!("moved-{shared}-{n}");
            let before =
                format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","m":{n}}}"#);
            let after = format!(
                r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","m":{n},"moved":1}}"#
            );
            a.put_image(put(repository, &tag, &before)).await.unwrap();
            b.get_image(get(repository, &tag, "")).await.unwrap();
            a.put_image(put(repository, &tag, &after)).await.unwrap();
            let moved = Instant::now();
            loop {
                let image = b
                    .get_image(get(repository, &tag, ""))
                    .await
                    .unwrap()
                    .into_inner();
                if image.image.and_then(|i| i.image_id).map(|i| i.image_digest)
                    == Some(digest_of(&after))
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            took.push(moved.elapsed());
        }
        took.sort();
        let name = if shared {
            "with Redis"
        } else {
            "without Redis (--tag-ttl 10 s)"
        };
        println!(
            "  tag moved through A, read as moved through B {name}: median {:.1} ms, max {:.1} ms ({} moves)",
            took[took.len() / 2].as_secs_f64() * 1000.0,
            took[took.len() - 1].as_secs_f64() * 1000.0,
            took.len()
        );
    }
}

/// BatchGetImage per poll interval (the default 10 s) for 2 replicas with a watcher each.
async fn watch_polls(redis: &str) {
    let interval = ecr_image_service::watch::DEFAULT_POLL_INTERVAL;
    for shared in [false, true] {
        let repository = unique("fleet-watch");
        create_repository(moto::endpoint(), &repository, false).await;
        let fleet = replicas::start(2, shared.then_some(redis), &[]).await;
        if shared {
            until_mode(&fleet, "redis", Duration::from_secs(10)).await;
        }
        fleet[0]
            .client
            .clone()
            .put_image(put(&repository, "live", support::SEED))
            .await
            .unwrap();
        let mut streams = Vec::new();
        for replica in &fleet {
            let mut stream = open_watch(&replica.client, &repository, "live").await;
            stream.message().await.unwrap();
            streams.push(stream);
        }
        let calls = || -> usize {
            fleet
                .iter()
                .map(|r| r.proxy.arrivals("BatchGetImage").len())
                .sum()
        };
        // Two intervals to settle, then three counted.
        tokio::time::sleep(interval * 2).await;
        let before = calls();
        tokio::time::sleep(interval * 3).await;
        let counted = calls() - before;
        println!(
            "  2 replicas watching 1 repository {}: {:.2} BatchGetImage per {interval:?} poll interval",
            if shared {
                "with Redis"
            } else {
                "without Redis"
            },
            counted as f64 / 3.0
        );
    }
}
