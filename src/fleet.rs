//! Several replicas through Redis (`--redis-url`): what one replica learns, the others hear.
//!
//! Today: **shared tag freshness.** A put, retag or delete through any replica publishes the
//! tag it moved on one pub/sub channel; every replica drops its resolution of that tag at once,
//! so a tag moved through replica A reads as moved through replica B within milliseconds, not
//! `--tag-ttl`. When the subscription drops, the replica forgets every tag resolution (it may
//! have missed a move) and resubscribes. digest → manifest stays local: it is immutable.
//!
//! Redis is optional and never in the read path: publishing is fire-and-forget with a short
//! timeout, and a replica whose Redis is down serves as a single replica does.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::image::{RegistryId, RepositoryName, Tag};
use crate::registry::RepositoryKey;
use crate::registry::cached::{TagBus, TagInvalidator};

/// The pub/sub channel of tag moves.
pub const TAG_CHANNEL: &str = "ecr-image-service:tag-moved";
/// A publish that takes longer is dropped: a move is also bounded by the tag TTL, and a write
/// must never wait on Redis.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(50);
/// How long to wait before connecting or subscribing again after a failure.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// One replica's link to the others.
pub struct Fleet {
    client: redis::Client,
    /// This process, so that it ignores its own messages.
    origin: String,
    publisher: Arc<OnceCell<ConnectionManager>>,
}

impl Fleet {
    /// A link through the Redis at `url` (`redis://`, or `unix://` for a socket). Only the URL
    /// is checked here; connections are made in the background and retried.
    pub fn new(url: &str) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let mut origin = [0u8; 8];
        getrandom::fill(&mut origin).map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            client,
            origin: origin.iter().map(|b| format!("{b:02x}")).collect(),
            publisher: Arc::default(),
        }))
    }

    /// Starts listening for other replicas' tag moves, dropping them from `tags`.
    pub fn listen(self: &Arc<Self>, tags: TagInvalidator) {
        let fleet = Arc::clone(self);
        tokio::spawn(async move {
            // Connected ahead of the first move, so that it is not the one that waits for it.
            let _ = fleet
                .publisher
                .get_or_try_init(|| fleet.client.get_connection_manager())
                .await;
            let mut reported = false;
            loop {
                match fleet.subscribe(&tags).await {
                    Ok(()) => reported = false,
                    Err(err) if !reported => {
                        tracing::warn!(error = %err, "Redis: tag moves are not shared until it answers");
                        reported = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        });
    }

    /// One subscription, until it drops; every tag resolution is forgotten then.
    async fn subscribe(&self, tags: &TagInvalidator) -> Result<(), redis::RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(TAG_CHANNEL).await?;
        tracing::info!("Redis: sharing tag moves with the other replicas");
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            if let Some((origin, repository, tag)) = decode(&text)
                && origin != self.origin
            {
                tags.forget(repository, tag);
            }
        }
        tags.forget_all();
        tracing::warn!("Redis: the tag-move subscription dropped; every tag resolution forgotten");
        Ok(())
    }
}

impl TagBus for Fleet {
    fn moved(&self, repository: &RepositoryKey, tag: &Tag) {
        let message = encode(&self.origin, repository, tag);
        let (client, publisher) = (self.client.clone(), Arc::clone(&self.publisher));
        // On a task of its own: a write never waits on Redis.
        tokio::spawn(async move {
            let sent = tokio::time::timeout(PUBLISH_TIMEOUT, async {
                let mut connection = publisher
                    .get_or_try_init(|| client.get_connection_manager())
                    .await?
                    .clone();
                connection.publish::<_, _, ()>(TAG_CHANNEL, message).await
            })
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("Redis: a tag move was not published");
            }
        });
    }
}

/// `origin \n registry \n repository \n tag`: validated names hold no newline.
fn encode(origin: &str, repository: &RepositoryKey, tag: &Tag) -> String {
    let registry = repository.registry_id.as_ref().map_or("", |r| r.as_str());
    format!("{origin}\n{registry}\n{}\n{tag}", repository.repository)
}

fn decode(text: &str) -> Option<(&str, RepositoryKey, Tag)> {
    let mut parts = text.split('\n');
    let origin = parts.next()?;
    let registry = parts.next()?;
    let repository = RepositoryName::parse(parts.next()?).ok()?;
    let tag = Tag::parse(parts.next()?).ok()?;
    let registry_id = match registry {
        "" => None,
        id => Some(RegistryId::parse(id).ok()?),
    };
    Some((
        origin,
        RepositoryKey {
            registry_id,
            repository,
        },
        tag,
    ))
}
