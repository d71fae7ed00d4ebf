//! WatchTag's hub: one poller per repository, one latest-value channel per watched tag, however
//! many watch.
//!
//! - A watched tag has a `tokio::sync::watch` channel holding its latest state: a slow watcher
//!   skips intermediate states rather than queueing them, so no watcher can grow memory.
//! - A repository with watched tags has one poller task: every poll interval (jittered ±10%,
//!   so replicas drift apart) it reads each watched tag fresh, at once, so the ECR backend's
//!   batcher makes them one BatchGetImage per 100 tags, under the rate budget. A poller stops
//!   [`IDLE_GRACE`] after its last watcher left.
//! - With Redis (`--redis-url`, [`SharedPolls`]), one replica at a time polls a repository,
//!   for the tags the whole fleet watches there, and the others' watchers hear its results:
//!   ECR is asked once per repository per interval for the fleet, not per replica.
//! - This replica's writes ([`WatchHub::wrote`]) reach watchers at once, `source: WRITE`.
//! - While reads fail, the state stays and the heartbeats say since when (`stale_since`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::call::CallContext;
use crate::domain::image::{Digest, ImageRef, Tag};
use crate::registry::{
    GetImageInput, Registry, RegistryError, RepositoryKey, SharedRegistry, TagBus, TagMove,
};

/// How often a repository's watched tags are polled: ECR is asked once per repository per
/// interval whatever the number of watchers; a tag moved outside this replica is seen within it.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// A heartbeat this often keeps a quiet stream inside Envoy's 5-minute stream idle timeout
/// and load balancers' 60 s, and tells the watcher the service is still checking.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Watches one replica holds at once: each costs a few KB; 20,000 stay within tens of MiB.
pub const DEFAULT_MAX_WATCHES: usize = 20_000;
/// Half the replica's watches for one caller: a deploy controller watching a tag per workload
/// has room for 10,000 workloads, and one caller never holds the other half. Without an
/// identity source every caller is `anonymous`, one caller: then this is the replica's limit
/// for everyone, so it must fit a rollout's watchers (the binary test's 10,000).
pub const DEFAULT_MAX_WATCHES_PER_CALLER: usize = DEFAULT_MAX_WATCHES / 2;
/// Repositories one caller's watches may span. Each watched repository is one BatchGetImage
/// per poll interval: 2,000 of them every 10 s is 200 calls a second, a ninth of the default
/// BatchGetImage pace, however many repositories a caller names (20,000 distinct ones pinned
/// it at 530-640/s); an organisation's deploys watch far fewer.
pub const DEFAULT_MAX_WATCHED_REPOSITORIES_PER_CALLER: usize = 2_000;
/// Streams end after this long (UNAVAILABLE + RetryInfo), so that watchers re-spread over
/// replicas added since, as max_connection_age does for connections.
pub const MAX_STREAM_AGE: Duration = Duration::from_secs(30 * 60);
/// The caller a repository's poller reads as, in the budgets' fair turns: one caller for all
/// the polls of a replica, beside the requests' callers.
const POLLER_CALLER: &str = "(watch-poller)";
/// A poller outlives its last watcher this long: a reconnecting watcher finds it warm.
const IDLE_GRACE: Duration = Duration::from_secs(30);

/// The hub as a subscriber of the registry stack's tag moves.
struct HubBus(Weak<WatchHub>);

impl TagBus for HubBus {
    fn moved(&self, change: &TagMove<'_>) {
        if let Some(hub) = self.0.upgrade() {
            let digest = change.digest.cloned();
            hub.wrote(change.repository, change.tag, digest, change.media_type);
        }
    }
}

/// Where a state was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A poll or the first read.
    Poll,
    /// A write through this replica.
    Write,
}

/// A tag's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagState {
    /// The digest the tag points at; `None` when it does not exist.
    pub digest: Option<Digest>,
    /// The image's media type.
    pub media_type: String,
    /// When it was observed.
    pub observed_at: SystemTime,
    /// Where it was learnt.
    pub source: Source,
    /// When the tag was last checked.
    pub checked_at: SystemTime,
    /// Since when checking fails.
    pub stale_since: Option<SystemTime>,
}

impl TagState {
    /// Whether `other` says something new: another digest, or existence changed.
    pub fn differs(&self, other: &TagState) -> bool {
        self.digest != other.digest
    }
}

/// The settings of the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSettings {
    /// How often each repository is polled.
    pub poll_interval: Duration,
    /// How often a quiet stream gets a heartbeat.
    pub heartbeat_interval: Duration,
    /// Watches at once.
    pub max_watches: usize,
    /// Of those, at most this many for one caller (principal).
    pub max_watches_per_caller: usize,
    /// Distinct repositories one caller's watches may span.
    pub max_watched_repositories_per_caller: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            poll_interval: DEFAULT_POLL_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            max_watches: DEFAULT_MAX_WATCHES,
            max_watches_per_caller: DEFAULT_MAX_WATCHES_PER_CALLER,
            max_watched_repositories_per_caller: DEFAULT_MAX_WATCHED_REPOSITORIES_PER_CALLER,
        }
    }
}

/// A watch refused for a cap: whose, and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchCap {
    /// The replica holds `--max-watches`.
    #[error("this replica holds {0} watches, its limit; retry, another replica may have room")]
    Replica(usize),
    /// The caller holds `--max-watches-per-caller` here.
    #[error("this caller holds {0} watches on this replica, its limit")]
    Caller(usize),
    /// The caller's watches span `--max-watched-repositories-per-caller` repositories here.
    #[error("this caller watches tags in {0} repositories on this replica, its limit")]
    Repositories(usize),
}

/// Why [`WatchHub::watch`] gave no watch.
#[derive(Debug)]
pub enum Refused {
    /// A cap is reached.
    Cap(WatchCap),
    /// The repository does not exist (the first read of the tag said so): a watch on it would
    /// poll ECR for nothing until the stream's end.
    Repository(RegistryError),
}

/// One caller's watches on this replica, for the per-caller caps.
#[derive(Debug, Default)]
struct CallerWatches {
    watches: usize,
    /// Watches per repository; a repository leaves with its last watch.
    repositories: HashMap<RepositoryKey, usize>,
}

type Tags = HashMap<Tag, watch::Sender<Option<TagState>>>;

/// Polling shared by the replicas of a fleet: one polls each repository, all hear.
pub trait SharedPolls: Send + Sync + std::fmt::Debug {
    /// Where other replicas' poll results are to be delivered ([`WatchHub::heard`]).
    fn attach(&self, hub: Weak<WatchHub>);
    /// Registers the `tags` this replica watches in `repository` and says whose turn it is
    /// to poll: `Some(Some(every tag the fleet watches there))` when this replica holds the
    /// repository's lease, `Some(None)` when another does, `None` when unknown (poll alone).
    /// With no tags, a held lease is let go.
    fn poll_turn(
        &self,
        repository: &RepositoryKey,
        tags: Vec<Tag>,
        interval: Duration,
    ) -> BoxFuture<'static, Option<Option<Vec<Tag>>>>;
    /// Tells the other replicas what a poll found.
    fn polled(&self, repository: &RepositoryKey, tag: &Tag, state: &TagState);
}

/// The watched tags of one replica.
pub struct WatchHub {
    registry: SharedRegistry,
    settings: WatchSettings,
    polls: Option<Arc<dyn SharedPolls>>,
    repositories: Mutex<HashMap<RepositoryKey, Tags>>,
    watches: AtomicUsize,
    callers: Mutex<HashMap<Arc<str>, CallerWatches>>,
    /// When another replica's poll result for each repository was last heard.
    heard_from: Mutex<HashMap<RepositoryKey, Instant>>,
    closing: watch::Sender<bool>,
}

/// One watcher's place: counted while it lives.
pub struct Watch {
    /// The tag's states, latest only.
    pub states: watch::Receiver<Option<TagState>>,
    /// Turns true when the server shuts down.
    pub closing: watch::Receiver<bool>,
    _counted: Counted,
}

/// A watch's place in the replica's and its caller's counts, given back when dropped.
struct Counted {
    hub: Arc<WatchHub>,
    caller: Arc<str>,
    repository: RepositoryKey,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.hub.watches.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::process().watches_open.dec();
        let mut callers = self
            .hub
            .callers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(mine) = callers.get_mut(&self.caller) {
            mine.watches = mine.watches.saturating_sub(1);
            if let Some(n) = mine.repositories.get_mut(&self.repository) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    mine.repositories.remove(&self.repository);
                }
            }
            if mine.watches == 0 {
                callers.remove(&self.caller);
            }
        }
    }
}

impl WatchHub {
    /// A hub reading from `registry`, polling in turn with the fleet's other replicas through
    /// `polls` when given.
    pub fn shared(
        registry: SharedRegistry,
        settings: WatchSettings,
        polls: Option<Arc<dyn SharedPolls>>,
    ) -> Arc<Self> {
        let hub = Arc::new(Self {
            registry,
            settings,
            polls,
            repositories: Mutex::default(),
            watches: AtomicUsize::new(0),
            callers: Mutex::default(),
            heard_from: Mutex::default(),
            closing: watch::channel(false).0,
        });
        if let Some(polls) = &hub.polls {
            polls.attach(Arc::downgrade(&hub));
        }
        hub
    }

    /// Another replica polled `tag`: its watchers here hear the result.
    pub fn heard(&self, repository: &RepositoryKey, tag: &Tag, state: TagState) {
        self.heard_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(repository.clone(), Instant::now());
        self.publish(repository, tag, Some(state));
    }

    /// Whether the replica holding `repository`'s poll lease has said nothing of it for two
    /// poll intervals (since `since`, when this replica started waiting for it): then the lease
    /// is held by a replica that does not poll (stuck, or a key written by someone else), and
    /// this replica polls for its own watchers rather than leave them without news or
    /// staleness for as long as the lease is renewed.
    fn holder_silent(&self, repository: &RepositoryKey, since: Instant) -> bool {
        let heard = self
            .heard_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(repository)
            .copied()
            .unwrap_or(since)
            .max(since);
        heard.elapsed() > self.settings.poll_interval * 2 + self.settings.poll_interval / 5
    }

    /// The hub's settings.
    pub fn settings(&self) -> WatchSettings {
        self.settings
    }

    /// Ends every watch (the server is shutting down).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A place in the counts for `caller`'s watch in `repository`, or the cap that refuses it.
    fn count(
        self: &Arc<Self>,
        caller: Arc<str>,
        repository: &RepositoryKey,
    ) -> Result<Counted, WatchCap> {
        let settings = &self.settings;
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = callers.entry(Arc::clone(&caller)).or_default();
        let refused = if mine.watches >= settings.max_watches_per_caller {
            Some(WatchCap::Caller(settings.max_watches_per_caller))
        } else if !mine.repositories.contains_key(repository)
            && mine.repositories.len() >= settings.max_watched_repositories_per_caller
        {
            Some(WatchCap::Repositories(
                settings.max_watched_repositories_per_caller,
            ))
        } else if self.watches.fetch_add(1, Ordering::Relaxed) >= settings.max_watches {
            self.watches.fetch_sub(1, Ordering::Relaxed);
            Some(WatchCap::Replica(settings.max_watches))
        } else {
            crate::metrics::process().watches_open.inc();
            None
        };
        if let Some(cap) = refused {
            if mine.watches == 0 {
                callers.remove(&caller);
            }
            return Err(cap);
        }
        mine.watches += 1;
        *mine.repositories.entry(repository.clone()).or_default() += 1;
        Ok(Counted {
            hub: Arc::clone(self),
            caller,
            repository: repository.clone(),
        })
    }

    /// A watch of `tag` for `caller`, or why not: a cap (the replica's, the caller's watches,
    /// the caller's repositories), or a repository that does not exist. The tag's first state
    /// is read at once when no other watcher has it yet; the repository's poller starts with
    /// the first watch.
    pub async fn watch(
        self: &Arc<Self>,
        caller: Arc<str>,
        repository: RepositoryKey,
        tag: Tag,
    ) -> Result<Watch, Refused> {
        let counted = self.count(caller, &repository).map_err(Refused::Cap)?;
        let (states, fresh, start_poller) = {
            let mut repositories = self
                .repositories
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let start_poller = !repositories.contains_key(&repository);
            let tags = repositories.entry(repository.clone()).or_default();
            let fresh = !tags.contains_key(&tag);
            let sender = tags
                .entry(tag.clone())
                .or_insert_with(|| watch::channel(None).0);
            (sender.subscribe(), fresh, start_poller)
        };
        if start_poller {
            // The poller works for every watcher of the repository, not for the request that
            // started it: its own context, with no deadline, its reads charged as the poller's.
            let poller = CallContext::background(POLLER_CALLER);
            tokio::spawn(poller.scope(Arc::clone(self).poll(repository.clone())));
        }
        if fresh {
            let (state, missing) = self.first_read(&repository, &tag).await;
            if let Some(missing) = missing {
                drop(states);
                self.forget_unwatched(&repository, &tag);
                return Err(Refused::Repository(missing));
            }
            self.publish(&repository, &tag, state);
        }
        Ok(Watch {
            states,
            closing: self.closing.subscribe(),
            _counted: counted,
        })
    }

    /// The first read of a tag: its state, and the error when the repository does not exist.
    async fn first_read(
        &self,
        repository: &RepositoryKey,
        tag: &Tag,
    ) -> (Option<TagState>, Option<RegistryError>) {
        match self.fetch(repository, tag).await {
            Err(err @ RegistryError::RepositoryNotFound(_)) => (None, Some(err)),
            read => (Self::state_of(read, None), None),
        }
    }

    /// Drops `tag`'s channel if nobody watches it (a refused first watcher), and the
    /// repository's entry with its last tag: its poller then stops at its next turn.
    fn forget_unwatched(&self, repository: &RepositoryKey, tag: &Tag) {
        let mut repositories = self
            .repositories
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(tags) = repositories.get_mut(repository) {
            if tags.get(tag).is_some_and(|s| s.receiver_count() == 0) {
                tags.remove(tag);
            }
            if tags.is_empty() {
                repositories.remove(repository);
            }
        }
    }

    /// Hears of every tag this replica moves (put, retag, delete), through the registry
    /// stack's one path for them; held weakly, the stack does not keep the hub alive.
    pub fn subscribe_to(self: &Arc<Self>, registry: &dyn Registry) {
        registry.subscribe_moves(Arc::new(HubBus(Arc::downgrade(self))));
    }

    /// This replica wrote `tag`: it now points at `digest` (`None`: deleted).
    fn wrote(
        &self,
        repository: &RepositoryKey,
        tag: &Tag,
        digest: Option<Digest>,
        media_type: &str,
    ) {
        let now = SystemTime::now();
        let state = TagState {
            digest,
            media_type: media_type.to_owned(),
            observed_at: now,
            source: Source::Write,
            checked_at: now,
            stale_since: None,
        };
        self.publish(repository, tag, Some(state));
    }

    /// Sets `tag`'s state if it is watched: watchers wake only when it says something new,
    /// else (or when the check failed) the check time and staleness are updated quietly.
    fn publish(&self, repository: &RepositoryKey, tag: &Tag, state: Option<TagState>) {
        let Some(state) = state else { return };
        let repositories = self
            .repositories
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = repositories.get(repository).and_then(|tags| tags.get(tag)) else {
            return;
        };
        sender.send_if_modified(|current| match current {
            // A failed check never replaces what is known: a poller elsewhere that could not
            // read a tag it had no state for reports it as absent, and stale.
            Some(old) if state.stale_since.is_some() || !old.differs(&state) => {
                old.checked_at = state.checked_at;
                old.stale_since = state.stale_since;
                false
            }
            _ => {
                *current = Some(state);
                true
            }
        });
    }

    /// A fresh read of `tag`: its state, or (on a failure other than not-found) the previous
    /// state marked stale; `None` when there is nothing to say yet.
    async fn read(
        &self,
        repository: &RepositoryKey,
        tag: &Tag,
        previous: Option<TagState>,
    ) -> Option<TagState> {
        let read = self.fetch(repository, tag).await;
        Self::state_of(read, previous)
    }

    /// A fresh read of `tag` from the registry.
    async fn fetch(
        &self,
        repository: &RepositoryKey,
        tag: &Tag,
    ) -> Result<crate::registry::Fetched, RegistryError> {
        self.registry
            .get_image(GetImageInput {
                registry_id: repository.registry_id.clone(),
                repository: repository.repository.clone(),
                reference: ImageRef::by_tag(tag.clone()),
                accepted_media_types: Vec::new(),
                max_staleness: Some(Duration::ZERO),
            })
            .await
    }

    /// What a read says of a tag's state (see [`read`](Self::read)).
    fn state_of(
        read: Result<crate::registry::Fetched, RegistryError>,
        previous: Option<TagState>,
    ) -> Option<TagState> {
        let now = SystemTime::now();
        let found = match read {
            Ok(fetched) => Some((Some(fetched.image.digest), fetched.image.media_type)),
            Err(RegistryError::ImageNotFound(_) | RegistryError::RepositoryNotFound(_)) => {
                Some((None, String::new()))
            }
            Err(_) => None,
        };
        match (found, previous) {
            (Some((digest, media_type)), _) => Some(TagState {
                digest,
                media_type,
                observed_at: now,
                source: Source::Poll,
                checked_at: now,
                stale_since: None,
            }),
            (None, Some(previous)) => Some(TagState {
                stale_since: previous.stale_since.or(Some(now)),
                ..previous
            }),
            (None, None) => Some(TagState {
                digest: None,
                media_type: String::new(),
                observed_at: now,
                source: Source::Poll,
                checked_at: now,
                stale_since: Some(now),
            }),
        }
    }

    /// Polls `repository`'s watched tags until none has had a watcher for [`IDLE_GRACE`]; in a
    /// fleet, only in the turns this replica holds the lease, for the fleet's watched tags.
    async fn poll(self: Arc<Self>, repository: RepositoryKey) {
        let mut idle_since: Option<Instant> = None;
        // Since when another replica has held the lease, turn after turn.
        let mut waiting: Option<Instant> = None;
        let _forget = ForgetHeard(&self, &repository);
        // The first turn anywhere in one interval: pollers started together (a rollout's
        // watchers, or 20,000 opened in 14 s) spread over the interval instead of polling in
        // waves; each tag's first state was read when it was first watched.
        let mut pause = self
            .settings
            .poll_interval
            .mul_f64(0.1 + crate::domain::random::unit());
        loop {
            tokio::time::sleep(pause).await;
            pause = jittered(self.settings.poll_interval);
            let watched = {
                let mut repositories = self
                    .repositories
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let Some(tags) = repositories.get_mut(&repository) else {
                    return;
                };
                tags.retain(|_, sender| sender.receiver_count() > 0);
                if tags.is_empty() {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    let gone = since.elapsed() >= IDLE_GRACE;
                    if gone {
                        repositories.remove(&repository);
                    }
                    Err(gone)
                } else {
                    idle_since = None;
                    Ok(tags
                        .iter()
                        .map(|(tag, sender)| (tag.clone(), sender.borrow().clone()))
                        .collect::<Vec<_>>())
                }
            };
            let mut watched = match watched {
                Ok(watched) => watched,
                Err(gone) => {
                    // Nothing watched here: another replica may poll for its own watchers.
                    self.poll_turn(&repository, &[]).await;
                    if gone {
                        return;
                    }
                    continue;
                }
            };
            let leader = match self.poll_turn(&repository, &watched).await {
                // Another replica polls this turn; its results arrive through `heard`.
                Some(None)
                    if !self
                        .holder_silent(&repository, *waiting.get_or_insert_with(Instant::now)) =>
                {
                    continue;
                }
                // ... unless it has said nothing for too long: polled here, for these watchers.
                Some(None) => false,
                Some(Some(fleet)) => {
                    waiting = None;
                    for tag in fleet {
                        if !watched.iter().any(|(own, _)| *own == tag) {
                            watched.push((tag, None));
                        }
                    }
                    true
                }
                None => {
                    waiting = None;
                    false
                }
            };
            // All at once: the batcher makes them one BatchGetImage per 100 tags.
            let reads = watched.into_iter().map(|(tag, previous)| {
                let hub = Arc::clone(&self);
                let repository = repository.clone();
                async move {
                    let state = hub.read(&repository, &tag, previous).await;
                    if let (true, Some(polls), Some(state)) = (leader, &hub.polls, &state) {
                        polls.polled(&repository, &tag, state);
                    }
                    hub.publish(&repository, &tag, state);
                }
            });
            futures_util::future::join_all(reads).await;
        }
    }

    /// Whose turn it is to poll `repository` (see [`SharedPolls::poll_turn`]); alone, always
    /// this replica's, for its own tags.
    async fn poll_turn(
        &self,
        repository: &RepositoryKey,
        watched: &[(Tag, Option<TagState>)],
    ) -> Option<Option<Vec<Tag>>> {
        let Some(polls) = &self.polls else {
            return Some(Some(Vec::new()));
        };
        let tags = watched.iter().map(|(tag, _)| tag.clone()).collect();
        polls
            .poll_turn(repository, tags, self.settings.poll_interval)
            .await
    }
}

/// Forgets when a repository's poll results were last heard, with its poller.
struct ForgetHeard<'a>(&'a WatchHub, &'a RepositoryKey);

impl Drop for ForgetHeard<'_> {
    fn drop(&mut self) {
        self.0
            .heard_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.1);
    }
}

/// `interval` ±10%, so that replicas started together do not poll in step.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * crate::domain::random::unit())
}

/// What a WatchTag stream yields.
pub type WatchStream = std::pin::Pin<
    Box<
        dyn futures_util::Stream<Item = Result<crate::api::pb::WatchTagResponse, tonic::Status>>
            + Send,
    >,
>;

/// A watcher's position in its stream.
struct Watching {
    watch: Watch,
    tag: Tag,
    /// The digest last sent (`Some(None)`: "does not exist" was sent).
    sent: Option<Option<Digest>>,
    /// The digest the watcher said it knew, until the first message is sent.
    last_known: Option<Digest>,
    beats: tokio::time::Interval,
    ends_at: Instant,
    first: bool,
    ended: bool,
}

/// The stream a watcher reads: the first state (or a heartbeat when it is the digest the
/// watcher already knows), then changes, heartbeats, and an end with UNAVAILABLE at
/// [`MAX_STREAM_AGE`] or shutdown. No task and no queue per watcher: the stream is polled by
/// the connection as it can send, and a slow watcher reads the latest state when it is ready,
/// skipping those in between.
pub fn stream(
    watch: Watch,
    tag: Tag,
    last_known: Option<Digest>,
    heartbeat: Duration,
    still_allowed: impl Fn() -> Result<(), crate::api::error::Error> + Send + Sync + 'static,
    judge: Option<Judge>,
) -> WatchStream {
    let now = Instant::now();
    let watching = Watching {
        watch,
        tag,
        sent: None,
        last_known,
        beats: tokio::time::interval_at(now + heartbeat, heartbeat),
        ends_at: now + MAX_STREAM_AGE,
        first: true,
        ended: false,
    };
    // Authorization is checked again before each message: a policy change that takes the
    // caller's read away ends its open watches at their next event (PERMISSION_DENIED), rather
    // than at their 30-minute age limit.
    let still_allowed = Arc::new(still_allowed);
    Box::pin(futures_util::stream::unfold(watching, move |mut w| {
        let still_allowed = Arc::clone(&still_allowed);
        let judge = judge.clone();
        async move {
            if w.ended {
                return None;
            }
            let mut message = w.next().await.and_then(|m| still_allowed().map(|()| m));
            if let (Ok(found), Some(judge)) = (&mut message, &judge)
                && let Err(err) = judged(found, judge).await
            {
                message = Err(err);
            }
            w.ended = message.is_err();
            Some((message.map_err(tonic::Status::from), w))
        }
    }))
}

/// Judges a digest a stream is about to announce: the verification policy's verdict on it, and
/// whether enforce mode refuses it; `None` when no rule covers it now.
pub type Judge = Arc<
    dyn Fn(
            Digest,
        ) -> BoxFuture<
            'static,
            Result<Option<(crate::api::pb::Verification, bool)>, crate::api::error::Error>,
        > + Send
        + Sync,
>;

/// Adds `judge`'s verdict to a state message about a digest. A verdict that cannot be reached
/// (the registry failing) ends the stream: announcing an unverified digest in enforce mode is
/// what must never happen, and the client reconnects.
async fn judged(
    message: &mut crate::api::pb::WatchTagResponse,
    judge: &Judge,
) -> Result<(), crate::api::error::Error> {
    let Some(crate::api::pb::watch_tag_response::Event::State(state)) = &mut message.event else {
        return Ok(());
    };
    let Some(digest) = state
        .image_id
        .as_ref()
        .and_then(|id| Digest::parse(&id.image_digest).ok())
    else {
        return Ok(());
    };
    if let Some((verification, refused)) = judge(digest).await? {
        state.verification = Some(verification);
        state.refused = refused;
    }
    Ok(())
}

impl Watching {
    /// The next message to send.
    async fn next(&mut self) -> Result<crate::api::pb::WatchTagResponse, crate::api::error::Error> {
        if self.first {
            self.first = false;
            let state = self.watch.states.borrow_and_update().clone();
            if let Some(state) = state {
                self.sent = Some(state.digest.clone());
                let known = self.last_known.take();
                return Ok(if known.is_some() && state.digest == known {
                    beat(&state)
                } else {
                    state_message(&self.tag, &state)
                });
            }
        }
        loop {
            tokio::select! {
                changed = self.watch.states.changed() => {
                    if changed.is_err() {
                        return Err(crate::api::error::Error::WatchEnded { why: "the watch was dropped" });
                    }
                    let state = self.watch.states.borrow_and_update().clone();
                    if let Some(state) = state
                        && self.sent.as_ref() != Some(&state.digest)
                    {
                        self.sent = Some(state.digest.clone());
                        return Ok(state_message(&self.tag, &state));
                    }
                }
                _ = self.beats.tick() => {
                    let state = self.watch.states.borrow().clone();
                    if let Some(state) = state {
                        return Ok(beat(&state));
                    }
                }
                () = tokio::time::sleep_until(self.ends_at) => {
                    return Err(crate::api::error::Error::WatchEnded {
                        why: "the stream reached its age limit",
                    });
                }
                _ = self.watch.closing.wait_for(|closing| *closing) => {
                    return Err(crate::api::error::Error::WatchEnded {
                        why: "the server is shutting down",
                    });
                }
            }
        }
    }
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

fn state_message(tag: &Tag, state: &TagState) -> crate::api::pb::WatchTagResponse {
    use crate::api::pb;
    pb::WatchTagResponse {
        event: Some(pb::watch_tag_response::Event::State(pb::TagState {
            image_id: Some(pb::ImageIdentifier {
                image_tag: tag.to_string(),
                image_digest: state
                    .digest
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            }),
            image_manifest_media_type: state.media_type.clone(),
            exists: state.digest.is_some(),
            observed_at: Some(timestamp(state.observed_at)),
            source: match state.source {
                Source::Poll => pb::TagStateSource::Poll,
                Source::Write => pb::TagStateSource::Write,
            }
            .into(),
            verification: None,
            refused: false,
        })),
    }
}

fn beat(state: &TagState) -> crate::api::pb::WatchTagResponse {
    use crate::api::pb;
    pb::WatchTagResponse {
        event: Some(pb::watch_tag_response::Event::Heartbeat(pb::Heartbeat {
            checked_at: Some(timestamp(state.checked_at)),
            stale_since: state.stale_since.map(timestamp),
        })),
    }
}
