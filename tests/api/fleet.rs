//! Several replicas through a real Redis: tag moves through one replica reach the others at
//! once; a replica that loses its subscription forgets its tag resolutions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ecr_image_service::fleet::{self, Fleet};
use ecr_image_service::pb::CacheStatus;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use tonic::transport::Channel;

use crate::support::backend::{ScratchDir, local_settings};
use crate::support::certs::Ca;
use crate::support::redis::Redis;
use crate::support::requests::{get, put};
use crate::support::{SEED, SEED_DIGEST, digest_of, serve_on_loopback, server_settings};

/// A replica over the shared `store`, linked through `redis` when given.
async fn replica(store: &LocalRegistry, redis: Option<&str>) -> ImageServiceClient<Channel> {
    replica_of(store, redis.map(|url| fleet::client(url, None).unwrap())).await
}

/// A replica over the shared `store`, linked through the Redis `client` when given.
async fn replica_of(
    store: &LocalRegistry,
    redis: Option<redis::Client>,
) -> ImageServiceClient<Channel> {
    let cache = CachedRegistry::new(Arc::new(store.clone()), CacheSettings::default());
    let cache = match redis {
        Some(client) => {
            let fleet = Fleet::with_client(client, "test:local", 1).unwrap();
            fleet.listen(cache.tag_invalidator());
            cache.with_bus(fleet)
        }
        None => cache,
    };
    let address = serve_on_loopback(cache, server_settings()).await;
    ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap()
}

/// A fleet of account 123456789012 in eu-west-1 (share 3) on the Redis at `url`, listening for
/// a cache over a store in `dir`, once its first heartbeat has answered.
async fn shared_fleet(url: &str, dir: &ScratchDir) -> Arc<Fleet> {
    use ecr_image_service::registry::ecr::budget::SharedSlots;
    let fleet = Fleet::new(url, "123456789012:eu-west-1", 3).unwrap();
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let cache = CachedRegistry::new(Arc::new(store), CacheSettings::default());
    fleet.listen(cache.tag_invalidator());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.is_shared() {
        assert!(Instant::now() < deadline, "the heartbeat never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fleet
}

async fn digest(client: &mut ImageServiceClient<Channel>, tag: &str) -> (String, CacheStatus) {
    let answer = client
        .get_image(get("team/app", tag, ""))
        .await
        .unwrap()
        .into_inner();
    let status = answer.cache_status();
    (answer.image.unwrap().image_id.unwrap().image_digest, status)
}

/// Waits until replica B's subscription is up: a move through A reaches it.
async fn until_linked(a: &mut ImageServiceClient<Channel>, b: &mut ImageServiceClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        let probe = format!("probe-{n}");
        a.put_image(put("team/app", &probe, SEED)).await.unwrap();
        digest(b, &probe).await;
        let moved =
            format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","p":{n}}}"#);
        a.put_image(put("team/app", &probe, &moved)).await.unwrap();
        let wait = Instant::now() + Duration::from_millis(200);
        while Instant::now() < wait {
            if digest(b, &probe).await.0 == digest_of(&moved) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(Instant::now() < deadline, "the replicas never linked");
    }
}

/// A tag moved through replica A reads as moved through replica B within 100 ms; replica C,
/// without Redis, keeps serving its cached resolution (up to `--tag-ttl`, 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_moved_through_one_replica_is_moved_on_the_others_at_once() {
    let redis = Redis::start();
    let dir = ScratchDir::new("fleet");
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let mut a = replica(&store, Some(&redis.url)).await;
    let mut b = replica(&store, Some(&redis.url)).await;
    let mut c = replica(&store, None).await;
    until_linked(&mut a, &mut b).await;

    a.put_image(put("team/app", "live", SEED)).await.unwrap();
    for replica in [&mut b, &mut c] {
        digest(replica, "live").await;
        assert_eq!(
            digest(replica, "live").await,
            (SEED_DIGEST.to_owned(), CacheStatus::Hit)
        );
    }
    let moved = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","moved":1}"#;
    a.put_image(put("team/app", "live", moved)).await.unwrap();
    let acknowledged = Instant::now();
    loop {
        if digest(&mut b, "live").await.0 == digest_of(moved) {
            break;
        }
        // An outcome with a deadline: how fast is the fleet benchmark's figure.
        assert!(
            acknowledged.elapsed() < Duration::from_secs(10),
            "replica B never served the moved digest"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "moved through A, read as moved through B after {:?}",
        acknowledged.elapsed()
    );
    assert_eq!(
        digest(&mut c, "live").await,
        (SEED_DIGEST.to_owned(), CacheStatus::Hit),
        "without Redis, C serves its cached resolution until the TTL"
    );
}

/// When the subscription drops (Redis killed), the replica forgets its tag resolutions, which
/// may have missed a move: the next read asks the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_forgets_every_tag_resolution() {
    let mut redis = Redis::start();
    let dir = ScratchDir::new("fleet-lost");
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let mut a = replica(&store, Some(&redis.url)).await;
    let mut b = replica(&store, Some(&redis.url)).await;
    until_linked(&mut a, &mut b).await;
    a.put_image(put("team/app", "live", SEED)).await.unwrap();
    // B caches it; the put's own move message may land after B's first read and drop it once.
    let cached = Instant::now() + Duration::from_secs(2);
    while digest(&mut b, "live").await.1 != CacheStatus::Hit {
        assert!(
            Instant::now() < cached,
            "B never served the tag from its cache"
        );
    }

    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, status) = digest(&mut b, "live").await;
        if status == CacheStatus::Miss {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resolutions were never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reads work without Redis, as on a single replica.
    assert_eq!(digest(&mut b, "live").await.0, SEED_DIGEST);
}

/// `rediss://` with a private CA (`--redis-ca-file`): the replicas link over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_link_through_redis_over_tls() {
    let dir = ScratchDir::new("fleet-tls");
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["localhost"], &[]);
    let (cert_file, key_file) = (dir.0.join("redis.pem"), dir.0.join("redis.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let redis = Redis::start_tls(&cert_file, &key_file);
    assert!(redis.url.starts_with("rediss://"));
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let client = || fleet::client(&redis.url, Some(ca.pem.as_bytes())).unwrap();
    let mut a = replica_of(&store, Some(client())).await;
    let mut b = replica_of(&store, Some(client())).await;
    until_linked(&mut a, &mut b).await;
}

/// `unix:///path`: the replicas link through a Redis on a unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_link_through_redis_on_a_unix_socket() {
    let dir = ScratchDir::new("fleet-unix");
    let redis = Redis::start_unix(&dir.0.join("redis.sock"));
    assert!(redis.url.starts_with("unix:///"));
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let mut a = replica(&store, Some(&redis.url)).await;
    let mut b = replica(&store, Some(&redis.url)).await;
    until_linked(&mut a, &mut b).await;
}

/// Every key of an account shares one Redis Cluster slot (`{<account>:<region>}`): on a
/// cluster, where a script's keys must share a slot, the budget and poll-lease scripts work,
/// and the same two keys without the hash tag are refused with CROSSSLOT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_of_an_account_share_one_cluster_slot() {
    use ecr_image_service::image::{RepositoryName, Tag};
    use ecr_image_service::registry::RepositoryKey;
    use ecr_image_service::registry::ecr::budget::{SharedSlots, Slot};
    use ecr_image_service::watch::SharedPolls;

    let dir = ScratchDir::new("fleet-cluster");
    let redis = Redis::start_cluster(&dir.0);
    let fleet = shared_fleet(&redis.url, &dir).await;
    let interval = Duration::from_secs(1);
    assert_eq!(
        fleet.take("PutImage", interval, 1, Duration::ZERO).await,
        Slot::Granted {
            count: 1,
            first_in: Duration::ZERO
        }
    );
    assert!(matches!(
        fleet.take("PutImage", interval, 1, Duration::ZERO).await,
        Slot::NotBefore(wait) if wait > Duration::from_millis(900)
    ));
    // Several slots a round trip: those due within the horizon, the first where the schedule
    // stands (a second from now), an interval apart.
    assert!(matches!(
        fleet.take("PutImage", interval, 10, Duration::from_millis(2500)).await,
        Slot::Granted { count: 2, first_in } if first_in > Duration::from_millis(900)
    ));
    // The schedule is booked 3 s ahead: the next slot is due within the horizon in 0.5 s.
    assert!(matches!(
        fleet.take("PutImage", interval, 10, Duration::from_millis(2500)).await,
        Slot::NotBefore(wait)
            if wait > Duration::from_millis(400) && wait <= Duration::from_millis(500)
    ));
    let repository = RepositoryKey {
        registry_id: None,
        repository: RepositoryName::parse("team/app").unwrap(),
    };
    let tag = Tag::parse("live").unwrap();
    assert_eq!(
        fleet
            .poll_turn(&repository, vec![tag.clone()], interval)
            .await,
        Some(Some(vec![tag]))
    );

    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let untagged: Result<(), _> = redis::cmd("EVAL")
        .arg("return redis.call('GET', KEYS[1])")
        .arg(2)
        .arg("ecr-image-service:poller:team/app")
        .arg("ecr-image-service:watched:team/app")
        .query_async(&mut connection)
        .await;
    let refused = untagged.unwrap_err().to_string();
    assert!(refused.to_lowercase().contains("crossslot"), "{refused}");
}

/// Issue 20, finding 5: a digest deleted through replica A is no longer served from replica
/// B's cache (it used to stay a HIT there indefinitely: only tag moves were published), and
/// the tags that resolved to it go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_deleted_through_one_replica_leaves_every_cache() {
    let redis = Redis::start();
    let dir = ScratchDir::new("fleet-delete");
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let mut a = replica(&store, Some(&redis.url)).await;
    let mut b = replica(&store, Some(&redis.url)).await;
    until_linked(&mut a, &mut b).await;
    a.put_image(put("team/app", "doomed", SEED)).await.unwrap();
    for _ in 0..2 {
        b.get_image(get("team/app", "", SEED_DIGEST)).await.unwrap();
    }
    let cached = b.get_image(get("team/app", "", SEED_DIGEST)).await.unwrap();
    assert_eq!(cached.into_inner().cache_status(), CacheStatus::Hit);
    a.batch_delete_image(crate::support::requests::delete(
        "team/app",
        &[("", SEED_DIGEST)],
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.get_image(get("team/app", "", SEED_DIGEST)).await {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            _ => assert!(
                Instant::now() < deadline,
                "B still serves the deleted digest"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 20, finding 11 (part): what Redis holds is input, not truth. A budget key set far in
/// the future (by anyone who can write to Redis) used to refuse every call ("retry after
/// 9,999,999 s"); now it is an implausible answer, and the replica paces itself locally.
/// 20,000 fake live replicas are not believed either: the configured share stands in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_redis_values_degrade_to_local_pacing() {
    use ecr_image_service::registry::ecr::budget::{SharedSlots, Slot};

    let redis = Redis::start();
    let dir = ScratchDir::new("fleet-forged");
    let fleet = shared_fleet(&redis.url, &dir).await;
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let key = "ecr-image-service:{123456789012:eu-west-1}:budget:PutImage";
    let far: u64 = 9_999_999_000_000 * 1000;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(far.to_string())
        .query_async(&mut connection)
        .await
        .unwrap();
    let interval = Duration::from_millis(100);
    // Not NotBefore(9,999,999 s): the replica degrades to pacing itself at quota ÷ N.
    assert_eq!(
        fleet.take("PutImage", interval, 1, Duration::ZERO).await,
        Slot::Unavailable
    );

    // Beats far in the future (ms of Redis's clock), so that no heartbeat ages them out.
    let members: Vec<(f64, String)> = (0..20_000).map(|n| (9e15, format!("fake-{n}"))).collect();
    let _: () = redis::cmd("ZADD")
        .arg("ecr-image-service:{123456789012:eu-west-1}:replicas")
        .arg(
            members
                .iter()
                .flat_map(|(s, m)| [s.to_string(), m.clone()])
                .collect::<Vec<_>>(),
        )
        .query_async(&mut connection)
        .await
        .unwrap();
    // Alone, the replica counted itself; the next heartbeat counts the fakes too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.replicas() == 1 {
        assert!(
            Instant::now() < deadline,
            "no heartbeat counted the fake replicas"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fleet.replicas(), 3, "20,000 fake replicas are not believed");
}

/// Issue 20, finding 11: what a Redis writer forges about watches costs little and blinds no
/// watcher. 20,000 fake watched tags in a repository are not all polled (1,000 at most: 10
/// BatchGetImage a poll); a poll lease held by a replica that never polls (a key written with
/// a long TTL) is ignored after two silent intervals, and this replica's watcher sees a tag
/// moved outside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_watch_keys_cost_little_and_blind_no_watcher() {
    use ecr_image_service::image::{Manifest, RepositoryName, Tag};
    use ecr_image_service::registry::{PutImageInput, Registry, RepositoryKey};
    use ecr_image_service::watch::{SharedPolls, WatchHub, WatchSettings};

    let redis = Redis::start();
    let dir = ScratchDir::new("fleet-forged-watch");
    let fleet = shared_fleet(&redis.url, &dir).await;
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let scope = "ecr-image-service:{123456789012:eu-west-1}";
    let fakes: Vec<String> = (0..20_000)
        .flat_map(|n| ["9e15".to_owned(), format!("fake-{n}")])
        .collect();
    let _: () = redis::cmd("ZADD")
        .arg(format!("{scope}:watched:team/fakes"))
        .arg(fakes)
        .query_async(&mut connection)
        .await
        .unwrap();
    let fakes = RepositoryKey {
        registry_id: None,
        repository: RepositoryName::parse("team/fakes").unwrap(),
    };
    let live = Tag::parse("live").unwrap();
    let turn = fleet
        .poll_turn(&fakes, vec![live.clone()], Duration::from_secs(10))
        .await;
    let polled = turn
        .flatten()
        .expect("this replica holds the free lease")
        .len();
    assert!(polled <= 1000, "{polled} tags to poll");

    // The lease of team/app, squatted.
    let _: () = redis::cmd("SET")
        .arg(format!("{scope}:poller:team/app"))
        .arg("squatter")
        .arg("PX")
        .arg(600_000)
        .query_async(&mut connection)
        .await
        .unwrap();
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let put = |n: u32| PutImageInput {
        registry_id: None,
        repository: RepositoryName::parse("team/app").unwrap(),
        manifest: Manifest::parse(
            format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","n":{n}}}"#),
            None,
        )
        .unwrap(),
        tag: Some(live.clone()),
    };
    store.put_image(put(1)).await.unwrap();
    let interval = Duration::from_millis(200);
    let hub = WatchHub::shared(
        Arc::new(store.clone()),
        WatchSettings {
            poll_interval: interval,
            ..WatchSettings::default()
        },
        Some(fleet),
    );
    let app = RepositoryKey {
        registry_id: None,
        repository: RepositoryName::parse("team/app").unwrap(),
    };
    let mut watch = hub
        .watch(Arc::from("watcher"), app, live.clone())
        .await
        .unwrap();
    let first = watch.states.borrow_and_update().clone().unwrap().digest;
    let moved = store.put_image(put(2)).await.unwrap().0.digest;
    assert_ne!(first, Some(moved.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = watch.states.borrow_and_update().clone().unwrap().digest;
        if seen.as_ref() == Some(&moved) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watcher never saw the move under a squatted lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
