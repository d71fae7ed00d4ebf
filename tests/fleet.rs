//! Service processes sharing ECR's quotas and WatchTag polling through a real Redis, in a test
//! binary of its own: cargo runs test binaries one after another, and the tests here take turns
//! ([`ALONE`]), so no other test competes for the 2 cores while arrival times at the proxies are
//! measured. Figures are printed by `cargo bench --bench fleet`; these tests hold the bounds.

#[allow(dead_code)]
#[path = "api/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use ecr_image_service::pb::WatchTagResponse;
use ecr_image_service::pb::watch_tag_response::Event;
use support::redis::Redis;
use support::replicas::{
    self, arrivals, arrivals_in, between, put_load, put_load_in, rate, until_mode,
};
use support::requests::open_watch;
use support::{MOTO_ACCOUNT, admin, admin_in, create_repository, digest_of, moto, unique};
use tonic::Streaming;

/// Held by each test for its whole run: the tests measure rates at ECR, and two fleets on CI's
/// two cores at once measured each other (one saw 8.46 PutImage/s where alone it sees 8.98).
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A caller's deadline in these scenarios.
const DEADLINE: Duration = Duration::from_secs(10);
/// PutImage's quota (ECR's default, the service's default).
const QUOTA: f64 = 10.0;
/// Hang, kill and restart Redis this many times.
const CHAOS_ROUNDS: usize = 2;

/// All the load through one of three replicas (`--rate-share 3`, as the chart sets it): with
/// Redis the replica uses the fleet's whole PutImage quota, where alone it would have a third;
/// ECR never sees more than 10 in any one-second window. Then the same load spread over all
/// three: the same bound, the same rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_whole_quota_through_redis() {
    let _alone = ALONE.lock().await;
    let redis = Redis::start();
    let repository = unique("fleet");
    create_repository(moto::endpoint(), &repository, false).await;
    let fleet = replicas::start(3, Some(&redis.url), &[]).await;
    until_mode(&fleet, "redis", Duration::from_secs(10)).await;

    for (scenario, targets) in [
        ("one replica", vec![fleet[0].client.clone()]),
        (
            "three replicas",
            fleet.iter().map(|r| r.client.clone()).collect(),
        ),
    ] {
        let started = Instant::now();
        let outcomes = put_load(&targets, &repository, 30, Duration::from_secs(6), DEADLINE).await;
        let ended = Instant::now();
        let sent = between(&arrivals(&fleet), started, ended);
        // The first second fills the queue; from then on demand exceeds the quota.
        let (per_second, busiest) = rate(&sent, started + Duration::from_secs(1), ended);
        eprintln!(
            "{scenario}: {per_second:.2} PutImage/s at ECR, busiest second {busiest}; {outcomes:?}"
        );
        assert!(
            fair(&sent) <= 10,
            "{scenario}: {} PutImage within one second",
            fair(&sent)
        );
        assert!(
            per_second >= 0.75 * QUOTA,
            "{scenario}: only {per_second:.2} PutImage/s; alone a replica has {:.2}",
            QUOTA / 3.0
        );
        assert_eq!(
            outcomes.overdue, 0,
            "{scenario}: calls outlived their deadline"
        );
        assert_eq!(outcomes.failed, 0, "{scenario}: {outcomes:?}");
    }
}

/// A replica without Redis (`--rate-share 3`) with 30 puts queued through it, callers on the
/// default deadline: it sends its whole share (3.33/s, paced at 3.0/s), no call is refused or
/// fails, and no attempt is retried. Queued calls used to fail unsent after 5 s (the SDK's
/// attempt timeout and its upload stall detection both counted the wait for a slot), be retried
/// at the back of the queue and run out of time: 2.0/s, 113 of 127 refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_a_replica_sends_its_whole_share_to_a_queue() {
    let _alone = ALONE.lock().await;
    let repository = unique("alone");
    create_repository(moto::endpoint(), &repository, false).await;
    let alone = replicas::start(1, None, &[]).await;
    let deadline = ecr_image_service::server::DEFAULT_DEADLINE;
    let started = Instant::now();
    let outcomes = put_load(
        &[alone[0].client.clone()],
        &repository,
        30,
        Duration::from_secs(8),
        deadline,
    )
    .await;
    let ended = Instant::now();
    let sent = between(&arrivals(&alone), started, ended);
    let (per_second, busiest) = rate(&sent, started + Duration::from_secs(1), ended);
    eprintln!("alone: {per_second:.2} PutImage/s at ECR, busiest second {busiest}; {outcomes:?}");
    let retried = alone[0]
        .proxy
        .seen()
        .iter()
        .filter(|seen| seen.attempt > 1)
        .count();
    assert_eq!(retried, 0, "queued attempts failed and were retried");
    assert!(
        per_second >= 0.9 * 3.0,
        "{per_second:.2} PutImage/s of a 3.0/s share"
    );
    assert!(busiest <= 4, "{busiest} PutImage within one second");
    assert_eq!((outcomes.refused, outcomes.failed), (0, 0), "{outcomes:?}");
}

/// Another account of the organisation, in the registries file.
const ACCOUNT_B: &str = "111122223333";

/// Two accounts under load at once, 30 PutImage in flight to each for 10 s: each account's ECR
/// sees at least 8.5/s and at most 10 in any second, because each (account, region) has its own
/// budgets; first one replica on its own, then two sharing Redis (the budgets' keys per
/// account). A burst to one account never takes the other's slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_each_have_their_own_quota() {
    let _alone = ALONE.lock().await;
    let redis = Redis::start();
    let repository = unique("accounts");
    create_repository(moto::endpoint(), &repository, false).await;
    admin_in(ACCOUNT_B)
        .await
        .create_repository()
        .repository_name(&repository)
        .send()
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("accounts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("registries.yaml");
    std::fs::write(
        &file,
        format!(
            "registries:\n  - account: \"{ACCOUNT_B}\"\n    roleArn: arn:aws:iam::{ACCOUNT_B}:role/ecr-image-service\n  - account: \"{MOTO_ACCOUNT}\"\n"
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let env = [
        ("AWS_ENDPOINT_URL_STS", moto::endpoint()),
        ("AWS_ACCOUNT_ID", MOTO_ACCOUNT),
    ];
    for (scenario, replicas, redis) in [
        ("one replica", 1, None),
        ("two replicas and Redis", 2, Some(redis.url.as_str())),
    ] {
        let share = replicas.to_string();
        let args = ["--registries", file, "--rate-share", &share];
        let fleet = replicas::start_with(replicas, redis, &args, &env).await;
        if redis.is_some() {
            until_mode(&fleet, "redis", Duration::from_secs(10)).await;
        }
        let targets: Vec<_> = fleet.iter().map(|r| r.client.clone()).collect();
        let started = Instant::now();
        let load = |account: &'static str| {
            let (targets, repository) = (targets.clone(), repository.clone());
            tokio::spawn(async move {
                put_load_in(
                    &targets,
                    account,
                    &repository,
                    30,
                    Duration::from_secs(10),
                    DEADLINE,
                )
                .await
            })
        };
        let (own, other) = (load(""), load(ACCOUNT_B));
        let (own, other) = (own.await.unwrap(), other.await.unwrap());
        let ended = Instant::now();
        for (account, outcomes, id) in [(MOTO_ACCOUNT, own, ""), (ACCOUNT_B, other, ACCOUNT_B)] {
            let sent = between(&arrivals_in(&fleet, id), started, ended);
            // The first second fills the queue; from then on demand exceeds the quota.
            let (per_second, busiest) = rate(&sent, started + Duration::from_secs(1), ended);
            eprintln!(
                "{scenario}, account {account}: {per_second:.2} PutImage/s at ECR, busiest \
                 second {busiest}; {outcomes:?}"
            );
            assert!(
                busiest <= 10,
                "{scenario}, {account}: {busiest} PutImage in one second"
            );
            assert!(
                per_second >= 8.5,
                "{scenario}, {account}: only {per_second:.2} PutImage/s"
            );
            assert_eq!(outcomes.overdue, 0, "{scenario}, {account}: {outcomes:?}");
            assert_eq!(outcomes.failed, 0, "{scenario}, {account}: {outcomes:?}");
        }
    }
}

fn fair(sent: &[Instant]) -> usize {
    support::fair_shares::busiest_second(sent)
}

/// Chaos on a bounded loop ([`CHAOS_ROUNDS`]), under load spread over three replicas: Redis
/// hangs (`kill -STOP`), then is gone (`kill -9`), then restarts empty. Every call completes or is refused within its
/// deadline; ECR never sees more than 10 PutImage in any second; while Redis is out each
/// replica sends at most its third of the quota; shared mode comes back after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_degrade_to_a_share_and_come_back_when_redis_fails() {
    let _alone = ALONE.lock().await;
    let mut redis = Redis::start();
    let repository = unique("chaos");
    create_repository(moto::endpoint(), &repository, false).await;
    let fleet = replicas::start(3, Some(&redis.url), &[]).await;
    until_mode(&fleet, "redis", Duration::from_secs(10)).await;
    let targets: Vec<_> = fleet.iter().map(|r| r.client.clone()).collect();
    let load = {
        let repository = repository.clone();
        tokio::spawn(async move {
            put_load(&targets, &repository, 30, Duration::from_secs(17), DEADLINE).await
        })
    };
    // The phases are the scenario's clock, not waits for readiness.
    let phase = Duration::from_secs(2);
    let mut degraded = Vec::new();
    for round in 0..CHAOS_ROUNDS {
        tokio::time::sleep(phase).await;
        redis.stop();
        let hung = Instant::now();
        let noticed = until_mode(&fleet, "local", Duration::from_secs(3)).await;
        tokio::time::sleep(phase.saturating_sub(noticed)).await;
        redis.kill();
        tokio::time::sleep(phase).await;
        redis.restart();
        let restarted = Instant::now();
        let back = until_mode(&fleet, "redis", Duration::from_secs(10)).await;
        eprintln!(
            "chaos round {round}: every replica local {noticed:?} after the hang, shared again \
             {back:?} after the restart"
        );
        // Degraded from the moment every replica noticed until Redis was back.
        degraded.push((hung + noticed, restarted));
    }
    let outcomes = load.await.unwrap();
    eprintln!("chaos: {outcomes:?}");
    assert_eq!(outcomes.overdue, 0, "calls outlived their deadline");
    let sent = arrivals(&fleet);
    eprintln!("chaos: busiest second at ECR {}", fair(&sent));
    assert!(
        fair(&sent) <= 10,
        "{} PutImage within one second",
        fair(&sent)
    );
    for (from, to) in degraded {
        for (n, replica) in fleet.iter().enumerate() {
            let own = replica.proxy.arrivals("PutImage");
            let (per_second, busiest) = rate(&own, from, to);
            eprintln!(
                "replica {n} without Redis: {per_second:.2} PutImage/s, busiest second {busiest}"
            );
            assert!(
                per_second <= QUOTA / 3.0 && busiest <= 4,
                "replica {n} sent {per_second:.2}/s (busiest second {busiest}) without Redis"
            );
        }
    }
}

/// Puts `manifest` as `repository:tag` straight into the emulator, behind the service.
async fn put_in_ecr(repository: &str, tag: &str, manifest: &str) {
    admin(moto::endpoint())
        .put_image()
        .repository_name(repository)
        .image_tag(tag)
        .image_manifest(manifest)
        .image_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
        .image_digest(digest_of(manifest))
        .send()
        .await
        .expect("put into the emulator");
}

/// The digest of the next state a WatchTag stream sends (heartbeats skipped), within `within`.
async fn next_digest(stream: &mut Streaming<WatchTagResponse>, within: Duration) -> Option<String> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(until, stream.message())
            .await
            .ok()?
            .ok()??;
        if let Some(Event::State(state)) = message.event {
            return Some(state.image_id.unwrap_or_default().image_digest);
        }
    }
}

/// Two replicas, a watcher on each, one repository: one replica polls for the fleet, so ECR
/// sees one BatchGetImage per poll interval, not one per replica; a tag moved behind the
/// service reaches both watchers, the one on the replica that did not poll through Redis.
/// (`--watch-poll-interval 1s` here, for a short test; the default is 10 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_polls_a_watched_repository_for_the_fleet() {
    let _alone = ALONE.lock().await;
    let redis = Redis::start();
    let repository = unique("watched");
    create_repository(moto::endpoint(), &repository, false).await;
    let first = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","watched":1}"#;
    put_in_ecr(&repository, "live", first).await;
    let fleet = replicas::start(2, Some(&redis.url), &["--watch-poll-interval", "1s"]).await;
    until_mode(&fleet, "redis", Duration::from_secs(10)).await;
    let mut streams = Vec::new();
    for replica in &fleet {
        let mut stream = open_watch(&replica.client, &repository, "live").await;
        let digest = next_digest(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(digest.as_deref(), Some(digest_of(first).as_str()));
        streams.push(stream);
    }
    let polls = || -> usize {
        fleet
            .iter()
            .map(|r| r.proxy.arrivals("BatchGetImage").len())
            .sum()
    };
    // Two intervals for the lease to settle, then five intervals counted. The window is
    // measured, not assumed: on a loaded machine it may run long, and polls come late, never
    // early, so the bound is on polls per interval that actually passed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, counting) = (polls(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let counted = polls() - before;
    let intervals = counting.elapsed().as_secs_f64();
    eprintln!(
        "2 replicas watching 1 repository: {counted} BatchGetImage in {intervals:.1} poll intervals"
    );
    // One poller for both: at most one poll per interval (and one more at the window's edge),
    // where a replica each would make two per interval.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let most = intervals.ceil() as usize + 1;
    assert!(
        (1..=most).contains(&counted),
        "{counted} BatchGetImage in {intervals:.1} intervals of 2 replicas watching one repository"
    );

    let moved = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","watched":2}"#;
    put_in_ecr(&repository, "live", moved).await;
    for stream in &mut streams {
        let digest = next_digest(stream, Duration::from_secs(3)).await;
        assert_eq!(digest.as_deref(), Some(digest_of(moved).as_str()));
    }
}
