//! The cache: a [`Registry`] decorator that keeps hot reads off ECR.
//!
//! Two caches, because a tag and a digest age differently:
//! - **digest -> image**: content addressed, so an entry is true forever; it is bounded by the
//!   bytes it holds, not by time. Bytes enter it only after verification (the backend hashes
//!   what ECR returns; a put hashed what it stored), and a hit re-checks nothing.
//! - **tag -> digest**: tags move, so a resolution is served only while it is younger than the
//!   caller's `max_staleness` (default: the tag TTL). This service's own puts overwrite it.
//!
//! Misses are coalesced (identical concurrent reads share one call) and then batched (misses
//! for one repository share one `BatchGetImage`). Errors and not-found are never cached: a
//! repeat of a failing read is coalesced while in flight, and a tag pushed a moment after a
//! miss must be visible at once.
//!
//! Freshness is measured on tokio's clock ([`Instant`]), not moka's, so it is ours to test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;
use tokio::time::Instant;

use super::batch::Batcher;
use super::flight::Flights;
use super::{
    BatchGet, CacheStatus, Fetched, GetImageInput, PutImageInput, PutOutcome, Registry,
    RegistryError, RepositoryKey, StoredImage,
};
use crate::image::{Digest, ImageRef, MediaType, Tag};

/// What a cached image costs beyond its manifest bytes: moka's entry bookkeeping, the key and
/// the [`StoredImage`] fields. An estimate, so that many tiny manifests cannot overrun the
/// budget by their overhead alone.
const ENTRY_OVERHEAD_BYTES: usize = 320;

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
    /// How long the first miss of an idle repository waits for others to batch with.
    pub batch_window: Duration,
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
    pub hits: AtomicU64,
    /// Reads that went upstream (or joined a read that did).
    pub misses: AtomicU64,
    /// Reads answered with a stale resolution because ECR was failing.
    pub stale: AtomicU64,
    /// Images evicted from the digest cache to stay within its budget.
    pub evictions: AtomicU64,
}

/// A [`Registry`] with caching, coalescing and batching in front of `R`.
pub struct CachedRegistry<R> {
    registry: Arc<R>,
    digests: Cache<(RepositoryKey, Digest), StoredImage>,
    tags: Cache<(RepositoryKey, Tag), Resolution>,
    flights: Flights<FlightKey, Result<StoredImage, RegistryError>>,
    batcher: Arc<Batcher<R>>,
    settings: CacheSettings,
    stats: Arc<CacheStats>,
}

impl<R: Registry + BatchGet> CachedRegistry<R> {
    /// A cache in front of `registry`.
    pub fn new(registry: R, settings: CacheSettings) -> Self {
        let registry = Arc::new(registry);
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
                    evictions.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        // Kept as long as either use of a resolution can want it; freshness itself is checked
        // against each request's bound in `lookup`.
        let tags = Cache::builder()
            .max_capacity(settings.tag_cache_entries)
            .time_to_live(settings.tag_ttl.max(settings.stale_if_error))
            .build();
        Self {
            batcher: Arc::new(Batcher::new(Arc::clone(&registry), settings.batch_window)),
            registry,
            digests,
            tags,
            flights: Flights::default(),
            settings,
            stats,
        }
    }

    /// The registry behind the cache.
    pub fn inner(&self) -> &R {
        &self.registry
    }

    /// What the cache has done so far.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Reads that joined an identical read in flight instead of calling upstream.
    pub fn coalesced(&self) -> u64 {
        self.flights.joined()
    }

    /// Bytes the digest cache holds (by its weigher), after pending maintenance.
    pub fn digest_cache_bytes(&self) -> u64 {
        self.digests.run_pending_tasks();
        self.digests.weighted_size()
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
        if !self.digests.contains_key(&key) {
            let untagged = StoredImage {
                tag: None,
                ..image.clone()
            };
            self.digests.insert(key, untagged);
        }
        if let Some(tag) = tag {
            let key = (repository.clone(), tag.clone());
            let newer = self.tags.get(&key).is_none_or(|r| r.resolved_at <= at);
            if newer {
                let resolution = Resolution {
                    digest: image.digest.clone(),
                    resolved_at: at,
                };
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
        let (digest, tag_age) = match reference.tag() {
            None => (reference.digest()?.clone(), None),
            Some(tag) => {
                let resolution = self.tags.get(&(repository.clone(), tag.clone()))?;
                let age = resolution.resolved_at.elapsed();
                let agrees = reference.digest().is_none_or(|d| *d == resolution.digest);
                if age > max_age || !agrees {
                    return None;
                }
                (resolution.digest, Some(age))
            }
        };
        let image = self.digests.get(&(repository.clone(), digest))?;
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

impl<R: Registry + BatchGet> Registry for CachedRegistry<R> {
    async fn put_image(
        &self,
        input: PutImageInput,
    ) -> Result<(StoredImage, PutOutcome), RegistryError> {
        let repository = RepositoryKey {
            registry_id: input.registry_id.clone(),
            repository: input.repository.clone(),
        };
        let started = Instant::now();
        let (image, outcome) = self.registry.put_image(input).await?;
        // Write-through: the bytes were hashed on the way in, and the tag now points at them.
        self.remember(&repository, image.tag.as_ref(), &image, started);
        Ok((image, outcome))
    }

    async fn get_image(&self, input: GetImageInput) -> Result<Fetched, RegistryError> {
        let repository = input.repository_key();
        let max_age = input.max_staleness.unwrap_or(self.settings.tag_ttl);
        if !(max_age.is_zero() && input.reference.tag().is_some())
            && let Some((image, tag_age)) = self.cached(&repository, &input, max_age)
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Fetched {
                image,
                cache: CacheStatus::Hit { tag_age },
            });
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let key = FlightKey {
            repository: repository.clone(),
            reference: input.reference.clone(),
            accepted: input.accepted_media_types.clone(),
        };
        let fetched = self
            .flights
            .run(key, || {
                self.batcher.get(
                    repository.clone(),
                    input.accepted_media_types.clone(),
                    input.reference.clone(),
                )
            })
            .await;
        match fetched {
            Ok(image) => {
                self.remember(&repository, input.reference.tag(), &image, started);
                Ok(Fetched {
                    image,
                    cache: CacheStatus::Miss,
                })
            }
            Err(err) => match self.stale(&repository, &input, &err) {
                Some(stale) => {
                    self.stats.stale.fetch_add(1, Ordering::Relaxed);
                    Ok(stale)
                }
                None => Err(err),
            },
        }
    }
}
