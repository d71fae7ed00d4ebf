//! WatchTag: a poll per repository however many watch, this replica's writes at once, resumed
//! streams without a repeat, and the watch cap.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ecr_image_service::pb::image_service_client::ImageServiceClient;
use ecr_image_service::pb::watch_tag_response::Event;
use ecr_image_service::pb::{TagStateSource, WatchTagRequest, WatchTagResponse};
use ecr_image_service::registry::cached::{CacheSettings, CachedRegistry};
use ecr_image_service::registry::local::LocalRegistry;
use ecr_image_service::server::ServerSettings;
use ecr_image_service::watch::{DEFAULT_POLL_INTERVAL, WatchSettings};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::backend::{Backend, Kind, ScratchDir, local_settings};
use crate::support::requests::{as_xfcc, delete, put};
use crate::support::{
    SEED, SEED_DIGEST, assert_status, cached, serve_on_loopback, server_settings,
};

type Stream = tonic::Streaming<WatchTagResponse>;

fn watch(repository: &str, tag: &str, last_known: &str) -> WatchTagRequest {
    WatchTagRequest {
        repository_name: repository.into(),
        image_tag: tag.into(),
        last_known_digest: last_known.into(),
        ..Default::default()
    }
}

async fn open(client: &mut ImageServiceClient<Channel>, request: WatchTagRequest) -> Stream {
    client.watch_tag(request).await.unwrap().into_inner()
}

/// The next state of `stream` (heartbeats skipped), within `wait`.
async fn next_state(
    stream: &mut Stream,
    wait: Duration,
) -> Option<ecr_image_service::pb::TagState> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .ok()?;
        match message.unwrap()?.event? {
            Event::State(state) => return Some(state),
            Event::Heartbeat(_) => {}
        }
    }
}

fn manifest(n: usize) -> String {
    format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","watch":{n}}}"#)
}

/// 50 watchers of one tag, on the defaults: an image put straight into the emulator (not
/// through this replica) reaches every watcher within one poll interval plus 1 s, exactly
/// once; meanwhile this replica asked ECR once per interval for the repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_watchers_see_an_external_change_once_within_a_poll() {
    let backend = Backend::start(Kind::Ecr).await;
    let repository = backend.repository("watch-external", false).await;
    let (stack, calls) = cached(crate::support::moto::endpoint());
    let address = serve_on_loopback(stack, server_settings()).await;
    let mut client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    client
        .put_image(put(&repository, "live", SEED))
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..50 {
        let mut stream = open(&mut client, watch(&repository, "live", "")).await;
        let first = next_state(&mut stream, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(first.image_id.unwrap().image_digest, SEED_DIGEST);
        streams.push(stream);
    }
    let polls_before = calls.calls("BatchGetImage");
    let changed = manifest(1);
    backend
        .put_behind_the_service(&repository, "live", &changed)
        .await;
    let changed_at = Instant::now();
    let bound = DEFAULT_POLL_INTERVAL + DEFAULT_POLL_INTERVAL / 10 + Duration::from_secs(1);
    for stream in &mut streams {
        let left = bound.saturating_sub(changed_at.elapsed());
        let state = next_state(stream, left)
            .await
            .expect("the change arrives within a poll interval and 1 s");
        assert_eq!(
            state.image_id.clone().unwrap().image_digest,
            crate::support::digest_of(&changed)
        );
        assert_eq!(state.source(), TagStateSource::Poll);
    }
    let seen_after = changed_at.elapsed();
    let polls = calls.calls("BatchGetImage") - polls_before;
    assert!(
        polls <= 2,
        "{polls} BatchGetImage in {seen_after:?} for 50 watchers"
    );
    // Exactly once: nothing more for a moment (the next heartbeat is 30 s away).
    for stream in &mut streams {
        assert!(
            next_state(stream, Duration::from_millis(200))
                .await
                .is_none()
        );
    }
}

/// The embedded store behind the production stack, served with `watch` settings.
async fn local_service(watch: WatchSettings) -> (ImageServiceClient<Channel>, ScratchDir) {
    local_service_with(ServerSettings {
        watch,
        ..server_settings()
    })
    .await
}

/// The embedded store behind the production stack, served with `settings`.
async fn local_service_with(settings: ServerSettings) -> (ImageServiceClient<Channel>, ScratchDir) {
    let dir = ScratchDir::new("watch");
    let store = LocalRegistry::open(&local_settings(&dir.0)).unwrap();
    let stack = CachedRegistry::new(Arc::new(store), CacheSettings::default());
    let address = serve_on_loopback(stack, settings).await;
    let client = ImageServiceClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    (client, dir)
}

/// This replica's puts, retags and deletes reach watchers at once (`source: WRITE`), long
/// before the next poll; a reconnect with the digest already known starts with a heartbeat.
#[tokio::test]
async fn own_writes_reach_watchers_at_once_and_resuming_does_not_repeat() {
    let (mut client, _dir) = local_service(WatchSettings::default()).await;
    client
        .put_image(put("team/app", "live", SEED))
        .await
        .unwrap();
    let mut stream = open(&mut client, watch("team/app", "live", "")).await;
    let first = next_state(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(first.exists);

    let moved = manifest(2);
    client
        .put_image(put("team/app", "live", &moved))
        .await
        .unwrap();
    let state = next_state(&mut stream, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(state.source(), TagStateSource::Write);
    assert_eq!(
        state.image_id.clone().unwrap().image_digest,
        crate::support::digest_of(&moved)
    );

    client
        .batch_delete_image(delete("team/app", &[("live", "")]))
        .await
        .unwrap();
    let gone = next_state(&mut stream, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(!gone.exists);

    client
        .put_image(put("team/app", "live", SEED))
        .await
        .unwrap();
    let mut resumed = open(&mut client, watch("team/app", "live", SEED_DIGEST)).await;
    let first = tokio::time::timeout(Duration::from_secs(5), resumed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(first.event, Some(Event::Heartbeat(_))),
        "the known digest is not repeated: {first:?}"
    );
}

/// Past `max_watches` (2 here), a new watch is RESOURCE_EXHAUSTED; a watch that ends frees
/// its place.
#[tokio::test]
async fn the_watch_cap_refuses_more_and_frees_on_leave() {
    let (mut client, _dir) = local_service(WatchSettings {
        max_watches: 2,
        ..WatchSettings::default()
    })
    .await;
    client
        .put_image(put("team/app", "live", SEED))
        .await
        .unwrap();
    let first = open(&mut client, watch("team/app", "live", "")).await;
    let _second = open(&mut client, watch("team/app", "live", "")).await;
    let status = client
        .watch_tag(watch("team/app", "live", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "TOO_MANY_WATCHES");
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client.watch_tag(watch("team/app", "live", "")).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(Instant::now() < deadline, "the place was never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Issue 20, finding 1: one caller gets its share of the replica's watches, not all of them.
/// With 2 watches and 2 repositories per caller (of 10 for the replica): A's third watch is
/// refused, and so is a watch in a third repository once A's watches span two, the message
/// saying which cap; B still opens watches; a watch A ends frees its place.
#[tokio::test]
async fn one_caller_gets_its_share_of_the_watches() {
    let (mut client, _dir) = local_service_with(ServerSettings {
        identity_source: ecr_image_service::identity::IdentitySource::IstioXfcc,
        watch: WatchSettings {
            max_watches: 10,
            max_watches_per_caller: 2,
            max_watched_repositories_per_caller: 1,
            ..WatchSettings::default()
        },
        ..server_settings()
    })
    .await;
    for repository in ["team/one", "team/two"] {
        let request = as_xfcc("a", put(repository, "live", SEED));
        client.put_image(request).await.unwrap();
    }
    let first = client
        .watch_tag(as_xfcc("a", watch("team/one", "live", "")))
        .await
        .unwrap();
    let status = client
        .watch_tag(as_xfcc("a", watch("team/two", "live", "")))
        .await
        .unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "TOO_MANY_WATCHES");
    assert!(status.message().contains("1 repositories"), "{status:?}");
    let _second = client
        .watch_tag(as_xfcc("a", watch("team/one", "live", "")))
        .await
        .unwrap();
    let status = client
        .watch_tag(as_xfcc("a", watch("team/one", "live", "")))
        .await
        .unwrap_err();
    assert_status(&status, Code::ResourceExhausted, "TOO_MANY_WATCHES");
    assert!(
        status.message().contains("this caller holds 2 watches"),
        "{status:?}"
    );
    let _b = client
        .watch_tag(as_xfcc("b", watch("team/two", "live", "")))
        .await
        .unwrap();
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(status) = client
        .watch_tag(as_xfcc("a", watch("team/one", "live", "")))
        .await
    {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(Instant::now() < deadline, "A's place was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 20, finding 1: a watch on a repository that does not exist is NOT_FOUND at once,
/// instead of a stream that polls ECR for nothing for 30 minutes; a missing tag in a
/// repository that exists is still watched (deploy systems wait for a tag to appear).
#[tokio::test]
async fn a_watch_on_a_missing_repository_is_not_found() {
    let (mut client, _dir) = local_service(WatchSettings::default()).await;
    let status = client
        .watch_tag(watch("team/nowhere", "live", ""))
        .await
        .unwrap_err();
    assert_status(&status, Code::NotFound, "REPOSITORY_NOT_FOUND");
    client
        .put_image(put("team/app", "live", SEED))
        .await
        .unwrap();
    let mut stream = open(&mut client, watch("team/app", "later", "")).await;
    let first = next_state(&mut stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(!first.exists, "{first:?}");
}
