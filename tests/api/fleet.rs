//! Several replicas through a real Redis: tag moves through one replica reach the others at
//! once; a replica that loses its subscription forgets its tag resolutions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ecr_image_service::fleet::Fleet;
use ecr_image_service::pb::CacheStatus;
use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use tonic::transport::Channel;

use crate::support::backend::{ScratchDir, local_settings};
use crate::support::redis::Redis;
use crate::support::requests::{get, put};
use crate::support::{SEED, SEED_DIGEST, digest_of, serve_on_loopback, server_settings};

/// A replica over the shared `store`, linked through `redis` when given.
async fn replica(store: &LocalRegistry, redis: Option<&str>) -> ImageServiceClient<Channel> {
    let cache = CachedRegistry::new(Arc::new(store.clone()), CacheSettings::default());
    let cache = match redis {
        Some(url) => {
            let fleet = Fleet::new(url, "test:local", 1).unwrap();
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
        assert!(
            acknowledged.elapsed() < Duration::from_millis(100),
            "replica B still serves the old digest"
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
    digest(&mut b, "live").await;
    assert_eq!(digest(&mut b, "live").await.1, CacheStatus::Hit);

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
