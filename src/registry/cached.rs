//! The cache: a [`Registry`] decorator that keeps hot reads off ECR.
//!
//! Two caches, because a tag and a digest age differently:
//! - **digest -> image**: content addressed, so an entry is true forever; it is bounded by the
//!   bytes it holds, not by time. Bytes enter it only after verification (the backend hashes
//!   what ECR returns; a put hashed what it stored), and a hit re-checks nothing.
//! - **tag -> digest**: tags move, so a resolution is served only while it is younger than the
//!   caller's `max_staleness` (default: the tag TTL). This service's own puts overwrite it.
//!
//! It wraps any [`Registry`]: ECR, or the embedded store. Misses are coalesced (identical
//! concurrent reads share one call; how the backend then calls upstream, e.g. ECR's batching,
//! is the backend's business), and the caches are filled inside that shared call, before it
//! ends, so a read arriving as it ends finds the answer rather than starting a second call.
//! Errors and not-found are never cached: a repeat of a failing read is coalesced while in
//! flight, and a tag pushed a moment after a miss must be visible at once.
//!
//! Freshness is measured on tokio's clock ([`Instant`]), not moka's, so it is ours to test.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry as Metrics, Unit};
use tokio::time::Instant;

use super::flight::Flights;
use super::front::Front;
use super::{
    CacheStatus, DeleteImagesInput, DeleteOutcome, DescribeInput, DescribePage, Fetched,
    GetImageInput, ListInput, ListPage, PutImageInput, PutOutcome, Registry, RegistryError,
    RepositoryKey, SharedRegistry, StoredImage, TagBus, TagMove,
};
use crate::domain::image::{Digest, ImageRef, MediaType, Tag, media_types};

/// What a cached image costs beyond its manifest bytes: moka's entry bookkeeping, the key, the
/// [`StoredImage`] fields and the allocator's share. Measured by the benchmark's memory phase
/// (~570 bytes per entry on top of the strings), rounded up, so that the budget is what the
/// cache really holds and many tiny manifests cannot overrun it by their overhead alone.
const ENTRY_OVERHEAD_BYTES: usize = 640;

/// Enough for the hot set of a large fleet: 64 MiB holds ~25,000 typical 2.5 KiB manifests.
/// Entries are immutable and verified, so a bigger budget only trades memory for ECR calls.
pub const DEFAULT_DIGEST_CACHE_BYTES: u64 = 64 << 20;
/// A tag resolution costs ~570 bytes with moka's expiry bookkeeping (measured by the
/// benchmark's memory phase), so 20,000, far more tags than a fleet deploys from at once, hold
/// ~11 MiB.
pub const DEFAULT_TAG_CACHE_ENTRIES: u64 = 20_000;
/// A tag pushed elsewhere becomes visible within 10 s, quicker than a rollout step. It also
/// caps ECR load: 1,000 hot tags on 10 replicas is ~1,000 BatchGetImage/s at worst, half of
/// the account's 2,000/s.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(10);
/// While ECR throttles or fails, a resolution up to 5 minutes old is served, flagged STALE,
/// rather than an error: long enough to ride out a throttling episode. A fresh read
/// (`max_staleness` = 0) never gets a stale answer.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(300);

/// How the cache behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// The digest cache's budget, in bytes of manifests plus per-entry overhead.
    pub digest_cache_bytes: u64,
    /// How many tag resolutions to keep.
    pub tag_cache_entries: u64,
    /// How long a tag resolution is served without asking ECR, unless a request says otherwise.
    pub tag_ttl: Duration,
    /// How old a tag resolution may be and still be served, flagged stale, while ECR is
    /// throttling or unavailable. Zero turns stale-if-error off.
    pub stale_if_error: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            digest_cache_bytes: DEFAULT_DIGEST_CACHE_BYTES,
            tag_cache_entries: DEFAULT_TAG_CACHE_ENTRIES,
            tag_ttl: DEFAULT_TAG_TTL,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
        }
    }
}

/// How long a copy in front of a cache stands at most: a hot key still reaches moka once a
/// second, so its eviction policy keeps seeing it as hot, and an image moka has evicted stays
/// held a second at most.
const FRONT_STANDS: Duration = Duration::from_secs(1);
/// Copies of tag resolutions in front of the tag cache: the tags being read now, which a fleet
/// counts in hundreds. Full, it is emptied and refills (about 2 MB).
const FRONT_TAGS: usize = 10_000;
/// Copies of images in front of the digest cache: as many, and at most 8 MiB of manifests
/// (an eighth of the default digest cache), which is what copies of evicted images can hold
/// beyond the cache's budget, for [`FRONT_STANDS`] at most.
const FRONT_IMAGES: usize = 10_000;
const FRONT_IMAGE_BYTES: usize = 8 << 20;

/// A cache keyed by repository and a tag or digest, and copies in front of it for reads.
#[derive(Clone)]
struct Fronted<X, V> {
    cache: Cache<(RepositoryKey, X), V>,
    front: Arc<Front<(RepositoryKey, X), V>>,
    /// The cache's time to live: a copy never stands past its entry.
    ttl: Duration,
}

/// Tag resolutions.
type Tags = Fronted<Tag, Resolution>;
/// Images by digest.
type Images = Fronted<Digest, StoredImage>;

/// Until when a copy read at `now` stands: [`FRONT_STANDS`] at most, never past the cache's
/// own entry (of time to live `ttl`).
trait Stands {
    fn until(&self, now: Instant, ttl: Duration) -> Instant;
}

impl Stands for Resolution {
    fn until(&self, now: Instant, ttl: Duration) -> Instant {
        let stands = now + FRONT_STANDS;
        self.resolved_at
            .checked_add(ttl)
            .map_or(stands, |end| end.min(stands))
    }
}

impl Stands for StoredImage {
    /// Content addressed: an image is true as long as the cache holds it.
    fn until(&self, now: Instant, _: Duration) -> Instant {
        now + FRONT_STANDS
    }
}

impl<X, V> Fronted<X, V>
where
    X: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    V: Stands + Clone + Send + Sync + 'static,
{
    /// `cache` (of time to live `ttl`) with `front` before it.
    fn new(
        cache: Cache<(RepositoryKey, X), V>,
        ttl: Duration,
        front: Front<(RepositoryKey, X), V>,
    ) -> Self {
        Self {
            cache,
            front: Arc::new(front),
            ttl,
        }
    }

    /// What the cache holds for `repository`'s `what` (looked up at `now`).
    fn get(&self, repository: &RepositoryKey, what: &X, now: Instant) -> Option<V> {
        let hash = self.front.hash((repository, what));
        let miss = match self
            .front
            .get(hash, |(r, w)| r == repository && w == what, now)
        {
            Ok(value) => return Some(value),
            Err(miss) => miss,
        };
        let key = (repository.clone(), what.clone());
        let value = self.cache.get(&key)?;
        let until = value.until(now, self.ttl);
        self.front.keep(miss, hash, key, value.clone(), until);
        Some(value)
    }

    fn insert(&self, key: (RepositoryKey, X), value: V) {
        let hash = self.front.hash(&key);
        self.cache.insert(key, value);
        self.front.forget(hash);
    }

    fn invalidate(&self, repository: &RepositoryKey, what: &X) {
        self.cache.invalidate(&(repository.clone(), what.clone()));
        self.front.forget(self.front.hash((repository, what)));
    }

    fn invalidate_all(&self) {
        self.cache.invalidate_all();
        self.front.forget_all();
    }
}

/// A tag's resolution to a digest, and when ECR said so.
#[derive(Debug, Clone)]
struct Resolution {
    digest: Digest,
    resolved_at: Instant,
}

/// Identical reads: they may share one upstream call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    repository: RepositoryKey,
    reference: ImageRef,
    accepted: Vec<MediaType>,
}

/// Counters of what the cache did.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads answered from the cache.
    pub hits: Counter,
    /// Reads that went upstream (or joined a read that did).
    pub misses: Counter,
    /// Reads answered with a stale resolution because ECR was failing.
    pub stale: Counter,
    /// Images evicted from the digest cache to stay within its budget.
    pub evictions: Counter,
    /// Bytes the digest cache holds, by its weigher, as of the last write.
    pub bytes: Gauge,
}

/// A [`Registry`] with caching and coalescing in front of another.
pub struct CachedRegistry {
    inner: SharedRegistry,
    digests: Images,
    tags: Tags,
    /// The cached tags of each digest, kept with the tag cache.
    by_digest: Arc<TagsByDigest>,
    flights: Flights<FlightKey, Result<StoredImage, RegistryError>>,
    /// Where this replica's tag moves are told: the fleet, the watch hub.
    buses: RwLock<Vec<Arc<dyn TagBus>>>,
    settings: CacheSettings,
    stats: Arc<CacheStats>,
}

impl CachedRegistry {
    /// A cache in front of `inner`.
    pub fn new(inner: SharedRegistry, settings: CacheSettings) -> Self {
        let stats = Arc::new(CacheStats::default());
        let evictions = Arc::clone(&stats);
        let digests = Cache::builder()
            .max_capacity(settings.digest_cache_bytes)
            .weigher(
                |(repository, _): &(RepositoryKey, Digest), image: &StoredImage| {
                    let bytes = image.manifest.len()
                        + repository.repository.as_str().len()
                        + image.media_type.len()
                        + ENTRY_OVERHEAD_BYTES;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                },
            )
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.evictions.inc();
                }
            })
            .build();
        // Kept as long as either use of a resolution can want it; freshness itself is checked
        // against each request's bound in `cached`.
        let ttl = settings.tag_ttl.max(settings.stale_if_error);
        let by_digest = Arc::new(TagsByDigest::default());
        let forget = Arc::clone(&by_digest);
        let tags = Cache::builder()
            .max_capacity(settings.tag_cache_entries)
            .time_to_live(ttl)
            // Every resolution that leaves (replaced, expired, evicted, invalidated) leaves the
            // index: moka tells each exactly once.
            .eviction_listener(
                move |key: Arc<(RepositoryKey, Tag)>, resolution: Resolution, _| {
                    forget.removed(&key.0, &key.1, &resolution.digest);
                },
            )
            .build();
        Self {
            inner,
            digests: Images::new(
                digests,
                Duration::MAX,
                Front::new(FRONT_IMAGES, FRONT_IMAGE_BYTES, |image| {
                    image.manifest.len()
                }),
            ),
            tags: Tags::new(tags, ttl, Front::by_count(FRONT_TAGS)),
            by_digest,
            flights: Flights::default(),
            buses: RwLock::default(),
            settings,
            stats,
        }
    }

    /// The same cache, telling `bus` of every tag a put or delete through it moves (the
    /// fleet's: other replicas drop their resolution at once instead of at its TTL).
    pub fn with_bus(self, bus: Arc<dyn TagBus>) -> Self {
        self.subscribe(bus);
        self
    }

    fn subscribe(&self, bus: Arc<dyn TagBus>) {
        self.buses
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(bus);
    }

    /// Tells every subscriber, through `what`.
    fn tell(&self, what: impl Fn(&dyn TagBus)) {
        for bus in self
            .buses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            what(bus.as_ref());
        }
    }

    /// A handle that drops tag resolutions and images, for what other replicas say they moved
    /// or deleted.
    pub fn tag_invalidator(&self) -> TagInvalidator {
        TagInvalidator {
            tags: self.tags.clone(),
            by_digest: Arc::clone(&self.by_digest),
            digests: self.digests.clone(),
        }
    }

    /// `repository`'s `tag` was deleted here: its resolution goes, and the subscribers hear.
    fn deleted(&self, repository: &RepositoryKey, tag: &Tag) {
        self.tags.invalidate(repository, tag);
        self.tell(|bus| {
            bus.moved(&TagMove {
                repository,
                tag,
                digest: None,
                media_type: "",
            });
        });
    }

    /// What the cache has done so far.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Reads that joined an identical read in flight instead of calling upstream.
    pub fn coalesced(&self) -> u64 {
        self.flights.joined().get()
    }

    /// Bytes the digest cache holds (by its weigher), after pending maintenance.
    pub fn digest_cache_bytes(&self) -> u64 {
        self.digests.cache.run_pending_tasks();
        self.digests.cache.weighted_size()
    }

    /// Records a verified image, and the tag it was read or put under as resolved at `at`,
    /// unless a newer resolution is already there.
    fn remember(
        &self,
        repository: &RepositoryKey,
        tag: Option<&Tag>,
        image: &StoredImage,
        at: Instant,
    ) {
        let key = (repository.clone(), image.digest.clone());
        if !self.digests.cache.contains_key(&key) {
            let untagged = StoredImage {
                tag: None,
                ..image.clone()
            };
            self.digests.insert(key, untagged);
            // moka applies writes lazily; catching up here, on the write path only (a put or
            // a miss, each an ECR round trip already), keeps the gauge true.
            let held = i64::try_from(self.digest_cache_bytes()).unwrap_or(i64::MAX);
            self.stats.bytes.set(held);
        }
        if let Some(tag) = tag {
            let key = (repository.clone(), tag.clone());
            let newer = self
                .tags
                .cache
                .get(&key)
                .is_none_or(|r| r.resolved_at <= at);
            if newer {
                let resolution = Resolution {
                    digest: image.digest.clone(),
                    resolved_at: at,
                };
                self.by_digest.added(repository, tag, &image.digest);
                self.tags.insert(key, resolution);
            }
        }
    }

    /// A cached image for `input`, if its tag resolution (if any) is within `max_age`.
    fn cached(
        &self,
        repository: &RepositoryKey,
        input: &GetImageInput,
        max_age: Duration,
    ) -> Option<(StoredImage, Option<Duration>)> {
        let reference = &input.reference;
        let now = Instant::now();
        let (digest, tag_age) = match reference.tag() {
            None => (reference.digest()?.clone(), None),
            Some(tag) => {
                let resolution = self.tags.get(repository, tag, now)?;
                let age = now.saturating_duration_since(resolution.resolved_at);
                let agrees = reference.digest().is_none_or(|d| *d == resolution.digest);
                if age > max_age || !agrees {
                    return None;
                }
                (resolution.digest, Some(age))
            }
        };
        let image = self.digests.get(repository, &digest, now)?;
        // A narrowed accept list that excludes the stored type is ECR's to answer (by tag it
        // may convert), not ours.
        let accepted = input.accepted_media_types.is_empty()
            || input
                .accepted_media_types
                .iter()
                .any(|m| m.as_str() == image.media_type);
        accepted.then(|| {
            let image = StoredImage {
                tag: reference.tag().cloned(),
                ..image
            };
            (image, tag_age)
        })
    }

    /// On a failure ECR may recover from, an older resolution within the stale-if-error bound.
    fn stale(
        &self,
        repository: &RepositoryKey,
        input: &GetImageInput,
        err: &RegistryError,
    ) -> Option<Fetched> {
        let transient = matches!(
            err,
            RegistryError::Throttled(_) | RegistryError::Unavailable(_) | RegistryError::Timeout(_)
        );
        let fresh_read = input.max_staleness.is_some_and(|d| d.is_zero());
        if !transient || fresh_read || self.settings.stale_if_error.is_zero() {
            return None;
        }
        input.reference.tag()?;
        let (image, tag_age) = self.cached(repository, input, self.settings.stale_if_error)?;
        Some(Fetched {
            image,
            cache: CacheStatus::Stale {
                tag_age: tag_age.unwrap_or_default(),
            },
        })
    }
}

impl CachedRegistry {
    async fn put(&self, input: PutImageInput) -> Result<(StoredImage, PutOutcome), RegistryError> {
        let repository = input.repository_key();
        let started = Instant::now();
        let (image, outcome) = self.inner.put_image(input).await?;
        // Write-through: the bytes were hashed on the way in, and the tag now points at them.
        if let Some(tag) = &image.tag {
            self.tell(|bus| {
                bus.moved(&TagMove {
                    repository: &repository,
                    tag,
                    digest: Some(&image.digest),
                    media_type: &image.media_type,
                });
            });
        }
        self.remember(&repository, image.tag.as_ref(), &image, started);
        Ok((image, outcome))
    }

    async fn get(&self, input: GetImageInput) -> Result<Fetched, RegistryError> {
        let repository = input.repository_key();
        let max_age = input.max_staleness.unwrap_or(self.settings.tag_ttl);
        if !(max_age.is_zero() && input.reference.tag().is_some())
            && let Some((image, tag_age)) = self.cached(&repository, &input, max_age)
        {
            self.stats.hits.inc();
            return Ok(Fetched {
                image,
                cache: CacheStatus::Hit { tag_age },
            });
        }
        self.stats.misses.inc();
        let key = FlightKey {
            repository: repository.clone(),
            reference: input.reference.clone(),
            accepted: input.accepted_media_types.clone(),
        };
        let fetched = self
            .flights
            .run(key, || async {
                let started = Instant::now();
                let image = self.inner.get_image(input.clone()).await?.image;
                // Inside the shared call: the caches hold the answer before the flight ends.
                self.remember(&repository, input.reference.tag(), &image, started);
                Ok(image)
            })
            .await;
        match fetched {
            Ok(image) => Ok(Fetched {
                image,
                cache: CacheStatus::Miss,
            }),
            Err(err) => match self.stale(&repository, &input, &err) {
                Some(stale) => {
                    self.stats.stale.inc();
                    Ok(stale)
                }
                None => Err(err),
            },
        }
    }
}

impl CachedRegistry {
    /// Deletes, indexes this replica knows of first (so their children are no longer
    /// referenced when their turn comes), then forgets what was deleted: a digest deleted is
    /// NOT_FOUND at once, never a cached hit.
    async fn delete(&self, mut input: DeleteImagesInput) -> Result<DeleteOutcome, RegistryError> {
        let repository = input.repository_key();
        let is_known_index = |reference: &ImageRef| {
            reference.digest().is_some_and(|digest| {
                self.digests
                    .cache
                    .get(&(repository.clone(), digest.clone()))
                    .is_some_and(|image| media_types::is_index(&image.media_type))
            })
        };
        // A stable sort: the order asked is kept within indexes and within the rest.
        input
            .images
            .sort_by_key(|reference| !is_known_index(reference));
        let by_digest: HashSet<Digest> = input
            .images
            .iter()
            .filter(|r| r.tag().is_none())
            .filter_map(|r| r.digest().cloned())
            .collect();
        let outcome = self.inner.delete_images(input).await?;
        // Deleted by digest, an image took every tag on it along: gathered first, so that the
        // tag cache is walked once per delete, not once per digest (1,000 digests over 20,000
        // cached tags took 6 s of a worker's time).
        let mut gone_by_digest = HashSet::new();
        for deleted in &outcome.deleted {
            if let Some(tag) = &deleted.tag {
                self.deleted(&repository, tag);
            }
            if let Some(digest) = &deleted.digest {
                self.digests.invalidate(&repository, digest);
                self.tell(|bus| bus.digest_deleted(&repository, digest));
                if by_digest.contains(digest) {
                    gone_by_digest.insert(digest.clone());
                }
            }
        }
        if !gone_by_digest.is_empty() {
            let stale =
                tags_resolving_to(&self.tags, &self.by_digest, &repository, &gone_by_digest);
            for tag in stale {
                self.deleted(&repository, &tag);
            }
        }
        Ok(outcome)
    }
}

impl CachedRegistry {
    /// Listings are never cached (they are what changes); each is a distinct upstream call.
    async fn list(&self, input: ListInput) -> Result<ListPage, RegistryError> {
        self.inner.list_images(input).await
    }

    async fn describe(&self, input: DescribeInput) -> Result<DescribePage, RegistryError> {
        self.inner.describe_images(input).await
    }

    /// Asked of the registry: the cache's resolution may be stale, and this is a record.
    async fn tag_digest(
        &self,
        repository: RepositoryKey,
        tag: Tag,
    ) -> Result<Option<Digest>, RegistryError> {
        self.inner.tag_digest(repository, tag).await
    }
}

/// Which cached tags resolve to each digest, so that a digest deleted drops its tags in
/// O(its tags), not a walk of the whole tag cache (1,000 digests over 20,000 cached tags took
/// 6 s of a worker's time walked once per digest). Counts, not sets: a tag resolved again to
/// the same digest is added before its old resolution's removal is told, and both are counted.
#[derive(Debug, Default)]
struct TagsByDigest(Mutex<HashMap<(RepositoryKey, Digest), HashMap<Tag, u32>>>);

impl TagsByDigest {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(RepositoryKey, Digest), HashMap<Tag, u32>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `tag` of `repository` now resolves to `digest` in the tag cache.
    fn added(&self, repository: &RepositoryKey, tag: &Tag, digest: &Digest) {
        *self
            .lock()
            .entry((repository.clone(), digest.clone()))
            .or_default()
            .entry(tag.clone())
            .or_default() += 1;
    }

    /// A resolution of `tag` to `digest` left the tag cache.
    fn removed(&self, repository: &RepositoryKey, tag: &Tag, digest: &Digest) {
        let mut index = self.lock();
        let key = (repository.clone(), digest.clone());
        let Some(tags) = index.get_mut(&key) else {
            return;
        };
        if let Some(count) = tags.get_mut(tag) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                tags.remove(tag);
            }
        }
        if tags.is_empty() {
            index.remove(&key);
        }
    }

    /// The tags that may resolve to `digest` in `repository`.
    fn tags(&self, repository: &RepositoryKey, digest: &Digest) -> Vec<Tag> {
        self.lock()
            .get(&(repository.clone(), digest.clone()))
            .map(|tags| tags.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// The tags of `repository` whose cached resolution is one of the digests `gone`: the index's
/// tags of each, checked against the cache.
fn tags_resolving_to<'a>(
    tags: &Tags,
    by_digest: &TagsByDigest,
    repository: &RepositoryKey,
    gone: impl IntoIterator<Item = &'a Digest>,
) -> Vec<Tag> {
    gone.into_iter()
        .flat_map(|digest| {
            by_digest
                .tags(repository, digest)
                .into_iter()
                .filter(move |tag| {
                    tags.cache
                        .get(&(repository.clone(), tag.clone()))
                        .is_some_and(|r| r.digest == *digest)
                })
        })
        .collect()
}

/// Drops tag resolutions of one cache, for the tag moves other replicas report.
#[derive(Clone)]
pub struct TagInvalidator {
    tags: Tags,
    by_digest: Arc<TagsByDigest>,
    digests: Images,
}

impl TagInvalidator {
    /// Another replica moved `tag`: the next read of it asks the registry.
    pub fn forget(&self, repository: RepositoryKey, tag: Tag) {
        self.tags.invalidate(&repository, &tag);
    }

    /// Another replica deleted `digest`: it is no longer served from here, nor are the tags
    /// that resolved to it.
    pub fn forget_digest(&self, repository: RepositoryKey, digest: Digest) {
        for tag in tags_resolving_to(&self.tags, &self.by_digest, &repository, [&digest]) {
            self.tags.invalidate(&repository, &tag);
        }
        self.digests.invalidate(&repository, &digest);
    }

    /// Tag moves may have been missed (the channel dropped): every resolution is suspect.
    pub fn forget_all(&self) {
        self.tags.invalidate_all();
    }
}

impl Registry for CachedRegistry {
    boxed_registry_methods!();

    // Signature material and scans are not cached here: the verifier keeps its verdicts.
    fn list_referrers(
        &self,
        input: crate::registry::ReferrersInput,
    ) -> crate::registry::BoxFuture<'_, Result<crate::registry::ReferrersPage, RegistryError>> {
        self.inner.list_referrers(input)
    }

    fn get_blob(
        &self,
        repository: RepositoryKey,
        digest: Digest,
        max_bytes: usize,
    ) -> crate::registry::BoxFuture<'_, Result<Vec<u8>, RegistryError>> {
        self.inner.get_blob(repository, digest, max_bytes)
    }

    fn scan_summary(
        &self,
        repository: RepositoryKey,
        digest: Digest,
    ) -> crate::registry::BoxFuture<'_, Result<crate::registry::ScanSummary, RegistryError>> {
        self.inner.scan_summary(repository, digest)
    }

    fn subscribe_moves(&self, bus: Arc<dyn TagBus>) {
        self.subscribe(bus);
    }

    /// The cache's metrics (hits, misses, stale answers, evictions, bytes held, coalesced
    /// reads), then those of the registry below it.
    fn register_metrics(&self, registry: &mut Metrics) {
        let stats = &self.stats;
        registry.register(
            "cache_hits",
            "Reads answered from the cache",
            stats.hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Reads that went to ECR or joined a read that did",
            stats.misses.clone(),
        );
        registry.register(
            "cache_stale",
            "Reads answered with a stale tag resolution while ECR was failing",
            stats.stale.clone(),
        );
        registry.register(
            "cache_evictions",
            "Images evicted from the digest cache to stay within its byte budget",
            stats.evictions.clone(),
        );
        registry.register_with_unit(
            "cache",
            "Bytes held by the digest cache, by its weigher",
            Unit::Bytes,
            stats.bytes.clone(),
        );
        registry.register(
            "cache_coalesced",
            "Reads that joined an identical ECR read in flight",
            self.flights.joined().clone(),
        );
        self.inner.register_metrics(registry);
    }
}

#[cfg(test)]
mod tests {
    //! The cache's rules, deterministic: an in-memory registry behind the seam, and tokio's
    //! paused clock for every age. (The real SDK and ECR's wire format are exercised through
    //! the server in `tests/api/cache.rs`.)

    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::domain::image::{Manifest, RepositoryName};
    use crate::registry::{BoxFuture, PutImageInput, Upstream};

    /// An in-memory registry that counts its calls and can be told to fail.
    #[derive(Default)]
    struct Memory {
        images: Mutex<HashMap<String, StoredImage>>,
        /// Reads that reached this registry.
        reads: AtomicUsize,
        failure: Mutex<Option<RegistryError>>,
        latency: Duration,
        puts: AtomicUsize,
    }

    impl Memory {
        fn with_latency(latency: Duration) -> Self {
            Self {
                latency,
                ..Self::default()
            }
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }

        fn fail_with(&self, err: Option<RegistryError>) {
            *self.failure.lock().unwrap() = err;
        }

        fn store(&self, image: &StoredImage) {
            let mut images = self.images.lock().unwrap();
            images.insert(image.digest.to_string(), image.clone());
            if let Some(tag) = &image.tag {
                images.insert(tag.to_string(), image.clone());
            }
        }
    }

    impl Memory {
        async fn read(&self, input: GetImageInput) -> Result<Fetched, RegistryError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.latency).await;
            if let Some(err) = self.failure.lock().unwrap().clone() {
                return Err(err);
            }
            let reference = &input.reference;
            let key = reference
                .tag()
                .map_or_else(|| reference.to_string(), ToString::to_string);
            let image = self.images.lock().unwrap().get(&key).cloned();
            let image = image
                .ok_or_else(|| RegistryError::ImageNotFound(Upstream::message("no such image")))?;
            Ok(Fetched {
                image: StoredImage {
                    tag: reference.tag().cloned(),
                    ..image
                },
                cache: CacheStatus::Miss,
            })
        }
    }

    impl Registry for Memory {
        fn put_image(
            &self,
            input: PutImageInput,
        ) -> BoxFuture<'_, Result<(StoredImage, PutOutcome), RegistryError>> {
            self.puts.fetch_add(1, Ordering::SeqCst);
            let image = input.into_stored("123456789012".into());
            self.store(&image);
            Box::pin(async move { Ok((image, PutOutcome::Created)) })
        }

        fn get_image(&self, input: GetImageInput) -> BoxFuture<'_, Result<Fetched, RegistryError>> {
            Box::pin(self.read(input))
        }
    }

    const TTL: Duration = Duration::from_secs(10);
    const STALE_IF_ERROR: Duration = Duration::from_secs(300);

    fn settings() -> CacheSettings {
        CacheSettings {
            digest_cache_bytes: 1 << 20,
            tag_cache_entries: 1000,
            tag_ttl: TTL,
            stale_if_error: STALE_IF_ERROR,
        }
    }

    fn repo() -> RepositoryName {
        RepositoryName::parse("hello-world").unwrap()
    }

    fn manifest(n: usize) -> Manifest {
        let text =
            format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","n":{n}}}"#);
        Manifest::parse(text, None).unwrap()
    }

    fn image(tag: &str, n: usize) -> StoredImage {
        let manifest = manifest(n);
        StoredImage {
            registry_id: "123456789012".into(),
            repository: repo(),
            digest: manifest.digest().clone(),
            tag: Some(Tag::parse(tag).unwrap()),
            media_type: manifest.media_type().to_string(),
            manifest: manifest.into_text().into(),
        }
    }

    fn by_tag(tag: &str, max_staleness: Option<Duration>) -> GetImageInput {
        GetImageInput {
            registry_id: None,
            repository: repo(),
            reference: ImageRef::new(Some(Tag::parse(tag).unwrap()), None).unwrap(),
            accepted_media_types: Vec::new(),
            max_staleness,
        }
    }

    fn by_digest(digest: &Digest) -> GetImageInput {
        GetImageInput {
            reference: ImageRef::new(None, Some(digest.clone())).unwrap(),
            ..by_tag("unused", None)
        }
    }

    /// A cache over `memory`, and a handle on `memory` to count its reads.
    fn cache_with(memory: Memory, settings: CacheSettings) -> (CachedRegistry, Arc<Memory>) {
        let memory = Arc::new(memory);
        (CachedRegistry::new(memory.clone(), settings), memory)
    }

    /// A tag resolution is served until the TTL passes, then asked of the registry again;
    /// a digest read is served from cache whatever its age.
    #[tokio::test(start_paused = true)]
    async fn tag_resolutions_expire_digests_do_not() {
        let memory = Memory::default();
        let v1 = image("v1", 1);
        memory.store(&v1);
        let (cache, memory) = cache_with(memory, settings());

        assert_eq!(
            cache.get_image(by_tag("v1", None)).await.unwrap().cache,
            CacheStatus::Miss
        );
        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        let hit = cache.get_image(by_tag("v1", None)).await.unwrap();
        assert_eq!(
            hit.cache,
            CacheStatus::Hit {
                tag_age: Some(TTL - Duration::from_secs(1))
            }
        );
        assert_eq!(hit.image.manifest, v1.manifest);
        assert_eq!(memory.reads(), 1);

        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            cache.get_image(by_tag("v1", None)).await.unwrap().cache,
            CacheStatus::Miss
        );
        assert_eq!(memory.reads(), 2);

        tokio::time::advance(Duration::from_secs(3600)).await;
        let by_digest = cache.get_image(by_digest(&v1.digest)).await.unwrap();
        assert_eq!(by_digest.cache, CacheStatus::Hit { tag_age: None });
        assert_eq!(memory.reads(), 2);
    }

    /// Issue 20, finding 10: the index of tags by digest follows the tag cache through
    /// re-resolutions to the same digest, moves to another and invalidations, so that a digest
    /// deleted elsewhere drops exactly the tags resolving to it (looked up, not walked for).
    #[test]
    fn a_deleted_digest_drops_exactly_its_tags() {
        let (cache, _) = cache_with(Memory::default(), settings());
        let key = RepositoryKey {
            registry_id: None,
            repository: repo(),
        };
        let (one, two) = (image("a", 1), image("a", 2));
        let at = Instant::now();
        let tag = |t: &str| Tag::parse(t).unwrap();
        // a -> one, twice (the second replaces the first); b -> one; c -> two; d -> one, then
        // moved to two; e -> one, then invalidated.
        cache.remember(&key, Some(&tag("a")), &one, at);
        cache.remember(&key, Some(&tag("a")), &one, at);
        cache.remember(&key, Some(&tag("b")), &one, at);
        cache.remember(&key, Some(&tag("c")), &two, at);
        cache.remember(&key, Some(&tag("d")), &one, at);
        cache.remember(&key, Some(&tag("d")), &two, at);
        cache.remember(&key, Some(&tag("e")), &one, at);
        cache.tags.invalidate(&key, &tag("e"));
        cache.tags.cache.run_pending_tasks();
        let mut of_one = cache.by_digest.tags(&key, &one.digest);
        of_one.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        assert_eq!(of_one, vec![tag("a"), tag("b")], "the index of digest one");
        cache
            .tag_invalidator()
            .forget_digest(key.clone(), one.digest.clone());
        for (t, cached) in [("a", false), ("b", false), ("c", true), ("d", true)] {
            assert_eq!(
                cache.tags.cache.contains_key(&(key.clone(), tag(t))),
                cached,
                "tag {t}"
            );
        }
        cache.tags.cache.run_pending_tasks();
        assert!(cache.by_digest.tags(&key, &one.digest).is_empty());
    }

    /// Hits are answered from copies in front of the caches; a tag another replica moved, a
    /// digest deleted elsewhere, or every tag at once after missed news, is never answered
    /// from a copy.
    #[tokio::test(start_paused = true)]
    async fn the_front_never_answers_what_the_cache_dropped() {
        let memory = Memory::default();
        let v1 = image("v1", 1);
        memory.store(&v1);
        let (cache, memory) = cache_with(memory, settings());
        let key = RepositoryKey {
            registry_id: None,
            repository: repo(),
        };
        let invalidator = cache.tag_invalidator();
        let status = |read: Result<Fetched, RegistryError>| read.unwrap().cache;
        let hit = CacheStatus::Hit {
            tag_age: Some(Duration::ZERO),
        };
        let mut reads = 0;
        for forget in [
            Box::new(|| invalidator.forget(key.clone(), Tag::parse("v1").unwrap()))
                as Box<dyn Fn()>,
            Box::new(|| invalidator.forget_all()),
            Box::new(|| invalidator.forget_digest(key.clone(), v1.digest.clone())),
        ] {
            assert_eq!(
                status(cache.get_image(by_tag("v1", None)).await),
                CacheStatus::Miss
            );
            reads += 1;
            // The first hit fills the fronts, the second is answered from them.
            for _ in 0..2 {
                assert_eq!(status(cache.get_image(by_tag("v1", None)).await), hit);
                let by_digest = status(cache.get_image(by_digest(&v1.digest)).await);
                assert_eq!(by_digest, CacheStatus::Hit { tag_age: None });
            }
            let v1_tag = Tag::parse("v1").unwrap();
            let in_front = cache.tags.front.get(
                cache.tags.front.hash((&key, &v1_tag)),
                |(r, t)| *r == key && *t == v1_tag,
                Instant::now(),
            );
            assert_eq!(in_front.map(|r| r.digest).ok(), Some(v1.digest.clone()));
            assert_eq!(memory.reads(), reads);
            forget();
        }
        let by_digest = status(cache.get_image(by_digest(&v1.digest)).await);
        assert_eq!(
            by_digest,
            CacheStatus::Miss,
            "a deleted digest is asked again"
        );
        assert_eq!(
            status(cache.get_image(by_tag("v1", None)).await),
            CacheStatus::Miss
        );
    }

    /// A request's max_staleness overrides the TTL both ways; zero is a fresh read.
    #[tokio::test(start_paused = true)]
    async fn requests_choose_their_staleness() {
        let memory = Memory::default();
        memory.store(&image("v1", 1));
        let (cache, memory) = cache_with(memory, settings());
        cache.get_image(by_tag("v1", None)).await.unwrap();

        let fresh = cache
            .get_image(by_tag("v1", Some(Duration::ZERO)))
            .await
            .unwrap();
        assert_eq!(fresh.cache, CacheStatus::Miss);
        tokio::time::advance(Duration::from_secs(3)).await;
        let strict = cache
            .get_image(by_tag("v1", Some(Duration::from_secs(2))))
            .await
            .unwrap();
        assert_eq!(strict.cache, CacheStatus::Miss);
        tokio::time::advance(Duration::from_secs(60)).await;
        let relaxed = cache
            .get_image(by_tag("v1", Some(Duration::from_secs(120))))
            .await
            .unwrap();
        assert_eq!(
            relaxed.cache,
            CacheStatus::Hit {
                tag_age: Some(Duration::from_secs(60))
            }
        );
        assert_eq!(memory.reads(), 3);
    }

    /// A put fills both caches: the next read by tag or digest makes no registry call, and a
    /// put that moves a tag is seen at once.
    #[tokio::test(start_paused = true)]
    async fn puts_write_through() {
        let (cache, memory) = cache_with(Memory::default(), settings());
        for n in [1, 2] {
            let (put, _) = cache
                .put_image(PutImageInput {
                    registry_id: None,
                    repository: repo(),
                    manifest: manifest(n),
                    tag: Some(Tag::parse("latest").unwrap()),
                })
                .await
                .unwrap();
            let read = cache.get_image(by_tag("latest", None)).await.unwrap();
            assert!(matches!(read.cache, CacheStatus::Hit { .. }));
            assert_eq!(read.image.digest, put.digest);
            let read = cache.get_image(by_digest(&put.digest)).await.unwrap();
            assert_eq!(read.image.manifest, put.manifest);
        }
        assert!(memory.reads() == 0, "no read reached the registry");
    }

    /// The digest cache holds no more than its byte budget, evicting to stay within it.
    #[tokio::test]
    async fn the_digest_cache_is_bounded_by_bytes() {
        let budget = 16 * 1024;
        let (cache, _) = cache_with(
            Memory::default(),
            CacheSettings {
                digest_cache_bytes: budget,
                ..settings()
            },
        );
        let padding = "x".repeat(1000);
        for n in 0..200 {
            let text = format!(r#"{{"mediaType":"a/b","n":{n},"p":"{padding}"}}"#);
            cache
                .put_image(PutImageInput {
                    registry_id: None,
                    repository: repo(),
                    manifest: Manifest::parse(text, None).unwrap(),
                    tag: None,
                })
                .await
                .unwrap();
        }
        let held = cache.digest_cache_bytes();
        assert!(held <= budget, "{held} bytes held, budget {budget}");
        assert!(held > budget / 2, "the budget is used, not wasted: {held}");
        assert!(cache.stats().evictions.get() > 100);
    }

    /// Concurrent reads of one tag make one registry call; every caller gets the image.
    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_coalesce() {
        let memory = Memory::with_latency(Duration::from_millis(50));
        let v1 = image("v1", 1);
        memory.store(&v1);
        let (cache, memory) = cache_with(memory, settings());
        let cache = Arc::new(cache);
        let readers: Vec<_> = (0..100)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get_image(by_tag("v1", None)).await })
            })
            .collect();
        for reader in readers {
            assert_eq!(reader.await.unwrap().unwrap().image.digest, v1.digest);
        }
        assert_eq!(memory.reads(), 1);
        assert_eq!(cache.coalesced(), 99);
    }

    /// The window of issue 12: the flight's entry used to leave the map before the caches were
    /// filled, so a request arriving in between found neither and made a second call. On the
    /// paused clock, at the very instant the entry leaves, a request's cache lookup finds the
    /// answer; a request started right then is a HIT, and the registry saw one call.
    #[tokio::test(start_paused = true)]
    async fn a_request_in_the_gap_after_a_flight_finds_the_cache_filled() {
        let memory = Memory::with_latency(Duration::from_millis(50));
        let v1 = image("v1", 1);
        memory.store(&v1);
        let (cache, memory) = cache_with(memory, settings());
        let cache = Arc::new(cache);
        let found_in_gap = Arc::new(Mutex::new(Vec::new()));
        let (weak, found) = (Arc::downgrade(&cache), Arc::clone(&found_in_gap));
        let (gap_tx, gap_rx) = std::sync::mpsc::channel();
        cache
            .flights
            .on_leave(super::super::flight::LeaveHook(Box::new(move || {
                if let Some(cache) = weak.upgrade() {
                    let input = by_tag("v1", None);
                    let hit = cache.cached(&input.repository_key(), &input, TTL).is_some();
                    found.lock().unwrap().push(hit);
                    // A whole request, started in the gap.
                    let _ = gap_tx.send(tokio::spawn(async move { cache.get_image(input).await }));
                }
            })));
        let first = cache.get_image(by_tag("v1", None)).await.unwrap();
        assert_eq!(first.cache, CacheStatus::Miss);
        assert_eq!(*found_in_gap.lock().unwrap(), [true]);
        let in_gap = gap_rx.recv().unwrap().await.unwrap().unwrap();
        assert!(
            matches!(in_gap.cache, CacheStatus::Hit { .. }),
            "{:?}",
            in_gap.cache
        );
        assert_eq!(memory.reads(), 1);
    }

    /// While the registry throttles or fails, a resolution within the stale-if-error bound is
    /// served flagged stale; past the bound, for fresh reads, and for other errors, the error
    /// stands. Errors are never cached.
    #[tokio::test(start_paused = true)]
    async fn stale_if_error_is_bounded() {
        let memory = Memory::default();
        memory.store(&image("v1", 1));
        let (cache, memory) = cache_with(memory, settings());
        cache.get_image(by_tag("v1", None)).await.unwrap();

        tokio::time::advance(TTL * 2).await;
        memory.fail_with(Some(RegistryError::Throttled(Upstream::message(
            "Rate exceeded",
        ))));
        let stale = cache.get_image(by_tag("v1", None)).await.unwrap();
        assert_eq!(stale.cache, CacheStatus::Stale { tag_age: TTL * 2 });
        let fresh = cache.get_image(by_tag("v1", Some(Duration::ZERO))).await;
        assert!(matches!(fresh, Err(RegistryError::Throttled(_))));

        memory.fail_with(Some(RegistryError::RepositoryNotFound(Upstream::message(
            "gone",
        ))));
        let gone = cache.get_image(by_tag("v1", None)).await;
        assert!(matches!(gone, Err(RegistryError::RepositoryNotFound(_))));

        tokio::time::advance(STALE_IF_ERROR).await;
        memory.fail_with(Some(RegistryError::Unavailable(Upstream::message("5xx"))));
        let too_old = cache.get_image(by_tag("v1", None)).await;
        assert!(matches!(too_old, Err(RegistryError::Unavailable(_))));

        memory.fail_with(None);
        let recovered = cache.get_image(by_tag("v1", None)).await.unwrap();
        assert_eq!(recovered.cache, CacheStatus::Miss);
    }

    /// A narrowed accept list that excludes the cached type goes to the registry, which may
    /// convert by tag.
    #[tokio::test(start_paused = true)]
    async fn narrowed_media_types_bypass_a_mismatching_entry() {
        let memory = Memory::default();
        memory.store(&image("v1", 1));
        let (cache, memory) = cache_with(memory, settings());
        cache.get_image(by_tag("v1", None)).await.unwrap();
        assert_eq!(memory.reads(), 1);
        let mut narrowed = by_tag("v1", None);
        narrowed.accepted_media_types =
            vec![MediaType::parse(crate::domain::image::media_types::DOCKER_MANIFEST_V2).unwrap()];
        assert_eq!(
            cache.get_image(narrowed).await.unwrap().cache,
            CacheStatus::Miss
        );
        assert_eq!(memory.reads(), 2);
    }
}
