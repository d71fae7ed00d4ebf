//! Micro-batching: concurrent misses for one repository reach ECR as one `BatchGetImage`.
//!
//! Like a group commit: a miss that finds no call in flight for its repository starts one at
//! once (after the configured window, zero by default, so a lone read waits for nothing); misses
//! that arrive while a call is in flight wait for it and go together in the next call, up to
//! [`MAX_BATCH`] images each. Under load, calls per repository stay near one per ECR round trip
//! however many callers there are.
//!
//! A batch is one ECR call made for several calls: it runs in a context made for them
//! ([`CallContext::serving`]), so the rate budget charges it to the caller whose miss opened
//! it, and it lasts as long as the most patient of them. When more misses wait than one call
//! takes, each batch is filled in turns across callers, so a caller with one miss waiting is in
//! the next call however many another has queued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;
use tracing::{Instrument, Span};

use crate::domain::call::{self, CallContext};
use crate::domain::image::{ImageRef, MediaType};
use crate::registry::{RegistryError, RepositoryKey, StoredImage, Upstream};

/// ECR's limit on image ids per `BatchGetImage` (model shape `ImageIdentifierList`).
pub const MAX_BATCH: usize = 100;

/// Several images of one repository, fetched in one upstream call.
#[derive(Debug, Clone)]
pub struct BatchInput {
    /// The repository.
    pub repository: RepositoryKey,
    /// What the callers accept (the same for the whole batch).
    pub accepted_media_types: Vec<MediaType>,
    /// The images, each distinct.
    pub references: Vec<ImageRef>,
}

/// A registry that can fetch several images of one repository in one call (ECR's
/// `BatchGetImage` takes up to [`MAX_BATCH`]).
pub trait BatchGet: Send + Sync + 'static {
    /// Fetches every reference in one call. The outer error fails the whole call (throttling,
    /// a missing repository); the inner results are per reference, in the order given.
    fn get_images(
        &self,
        input: BatchInput,
    ) -> impl std::future::Future<
        Output = Result<Vec<Result<StoredImage, RegistryError>>, RegistryError>,
    > + Send;
}

type Reply = oneshot::Sender<Result<StoredImage, RegistryError>>;

/// A caller waiting in a lane: what it wants, where to answer, and the call it is for.
struct Waiter {
    reference: ImageRef,
    reply: Reply,
    call: CallContext,
    /// The caller's span: a batch's ECR call is traced as a child of its oldest caller.
    span: Span,
}

/// Callers that can share a call: same repository, same accepted media types.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LaneKey {
    repository: RepositoryKey,
    accepted: Vec<MediaType>,
}

/// The misses waiting for one repository's next call.
#[derive(Default)]
struct Lane {
    /// A task is sending this lane's calls; new misses only need to queue.
    draining: bool,
    pending: Vec<Waiter>,
}

/// Gathers misses into batches per repository.
pub struct Batcher<R> {
    registry: Arc<R>,
    /// How long the first miss of an idle repository waits for company.
    window: Duration,
    lanes: Mutex<HashMap<LaneKey, Lane>>,
    /// Distinct images per upstream call.
    sizes: Histogram,
}

impl<R: BatchGet> Batcher<R> {
    /// A batcher sending its calls to `registry`.
    pub fn new(registry: Arc<R>, window: Duration) -> Self {
        Self {
            registry,
            window,
            lanes: Mutex::default(),
            sizes: Histogram::new([1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0]),
        }
    }

    /// The same batcher, counting its batch sizes into `sizes` (shared by every registry's
    /// batcher).
    #[must_use]
    pub fn with_sizes(mut self, sizes: Histogram) -> Self {
        self.sizes = sizes;
        self
    }

    /// Distinct images per upstream call.
    pub fn sizes(&self) -> &Histogram {
        &self.sizes
    }

    fn lanes(&self) -> MutexGuard<'_, HashMap<LaneKey, Lane>> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches one image, in whatever batch it lands in.
    pub async fn get(
        self: &Arc<Self>,
        repository: RepositoryKey,
        accepted: Vec<MediaType>,
        reference: ImageRef,
    ) -> Result<StoredImage, RegistryError> {
        let key = LaneKey {
            repository,
            accepted,
        };
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut lanes = self.lanes();
            let lane = lanes.entry(key.clone()).or_default();
            lane.pending.push(Waiter {
                reference,
                reply,
                call: call::current().unwrap_or_else(|| CallContext::background("")),
                span: Span::current(),
            });
            !std::mem::replace(&mut lane.draining, true)
        };
        if start {
            // Its own task: the calls must go on even if this caller gives up.
            tokio::spawn(Arc::clone(self).drain(key));
        }
        answer.await.unwrap_or_else(|_| {
            Err(RegistryError::Other(Upstream::message(
                "the batched registry call ended without an answer",
            )))
        })
    }

    /// Sends the lane's pending misses, a batch at a time, until none are left.
    async fn drain(self: Arc<Self>, key: LaneKey) {
        if !self.window.is_zero() {
            tokio::time::sleep(self.window).await;
        }
        loop {
            let batch: Vec<Waiter> = {
                let mut lanes = self.lanes();
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                if lane.pending.is_empty() {
                    lanes.remove(&key);
                    return;
                }
                take_in_turns(&mut lane.pending, MAX_BATCH)
            };
            self.send(&key, batch).await;
        }
    }

    /// One call for a batch; each caller gets its own image or failure, and a failure of the
    /// whole call (throttling, a missing repository) goes to every caller in it. The call lives
    /// as long as its most patient caller: once every caller's deadline has passed it is
    /// dropped.
    async fn send(&self, key: &LaneKey, batch: Vec<Waiter>) {
        let Some(serving) = CallContext::serving(batch.iter().map(|w| &w.call)) else {
            return;
        };
        let deadline = serving.deadline();
        let parent = batch.first().map_or_else(Span::none, |w| w.span.clone());
        let mut references: Vec<ImageRef> = Vec::with_capacity(batch.len());
        let mut replies: Vec<Vec<Reply>> = Vec::with_capacity(batch.len());
        for Waiter {
            reference, reply, ..
        } in batch
        {
            match references.iter().position(|r| *r == reference) {
                Some(i) => replies[i].push(reply),
                None => {
                    references.push(reference);
                    replies.push(vec![reply]);
                }
            }
        }
        #[allow(clippy::cast_precision_loss)] // at most MAX_BATCH
        self.sizes.observe(references.len() as f64);
        let input = BatchInput {
            repository: key.repository.clone(),
            accepted_media_types: key.accepted.clone(),
            references,
        };
        let call = self.registry.get_images(input).instrument(parent);
        let call = serving.scope(call);
        let answer = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, call)
                .await
                .unwrap_or_else(|_| {
                    Err(RegistryError::Timeout(Upstream::message(
                        "every caller's deadline passed before ECR answered",
                    )))
                }),
            None => call.await,
        };
        match answer {
            Ok(results) => {
                for (result, replies) in results.into_iter().zip(replies) {
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                }
            }
            Err(err) => {
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Takes up to `max` waiters out of `pending` (in arrival order), in turns across callers: each
/// caller's first waiter, then each one's second, and so on. What is left keeps its order.
fn take_in_turns(pending: &mut Vec<Waiter>, max: usize) -> Vec<Waiter> {
    if pending.len() <= max {
        return std::mem::take(pending);
    }
    // Each waiter's place in its own caller's queue: the turn it is served in.
    let mut seen: HashMap<std::sync::Arc<str>, usize> = HashMap::new();
    let turns: Vec<usize> = pending
        .iter()
        .map(|w| {
            let n = seen.entry(w.call.caller_key()).or_default();
            *n += 1;
            *n
        })
        .collect();
    let mut order: Vec<usize> = (0..pending.len()).collect();
    // Stable: within a turn, callers keep the order their first misses arrived in.
    order.sort_by_key(|&i| turns[i]);
    let mut chosen = vec![false; pending.len()];
    for &i in order.iter().take(max) {
        chosen[i] = true;
    }
    let mut taken = Vec::with_capacity(max);
    let mut left = Vec::with_capacity(pending.len() - max);
    for (waiter, chosen) in std::mem::take(pending).into_iter().zip(chosen) {
        if chosen {
            taken.push(waiter);
        } else {
            left.push(waiter);
        }
    }
    *pending = left;
    taken
}

#[cfg(test)]
mod tests {
    //! The batcher on tokio's paused clock, over an in-memory `BatchGet` that records the size
    //! of each call. (The real BatchGetImage is exercised through the server in `tests/`.)

    use super::*;
    use crate::domain::image::{RepositoryName, Tag};

    /// Tags `t0`..`t149` exist; each call takes 50 ms, so misses queue behind it.
    #[derive(Default)]
    struct Recorded {
        calls: Mutex<Vec<usize>>,
    }

    impl BatchGet for Recorded {
        async fn get_images(
            &self,
            input: BatchInput,
        ) -> Result<Vec<Result<StoredImage, RegistryError>>, RegistryError> {
            self.calls.lock().unwrap().push(input.references.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(input
                .references
                .iter()
                .map(|r| {
                    let tag = r.tag().map(|t| t.as_str().to_owned()).unwrap_or_default();
                    let n: usize = tag.trim_start_matches('t').parse().unwrap_or(usize::MAX);
                    if n >= 150 {
                        return Err(RegistryError::ImageNotFound(Upstream::message("absent")));
                    }
                    let manifest = format!("{{\"n\":{n}}}");
                    Ok(StoredImage {
                        registry_id: "123456789012".into(),
                        repository: RepositoryName::parse("repo").unwrap(),
                        digest: crate::domain::image::Digest::of(manifest.as_bytes()),
                        tag: r.tag().cloned(),
                        manifest: manifest.into(),
                        media_type: String::new(),
                    })
                })
                .collect())
        }
    }

    /// A batch is filled in turns across callers: with 150 of A's misses waiting before one of
    /// B's, B's is in the first call, and what is left keeps its order.
    #[test]
    fn batches_are_filled_in_turns_across_callers() {
        let waiter = |caller: &str, n: usize| Waiter {
            reference: ImageRef::new(Some(Tag::parse(&format!("t{n}")).unwrap()), None).unwrap(),
            reply: oneshot::channel().0,
            call: CallContext::background_of(caller),
            span: Span::none(),
        };
        let mut pending: Vec<Waiter> = (0..150).map(|n| waiter("a", n)).collect();
        pending.push(waiter("b", 150));
        let taken = take_in_turns(&mut pending, MAX_BATCH);
        let tag = |w: &Waiter| w.reference.tag().unwrap().as_str().to_owned();
        assert_eq!(taken.len(), MAX_BATCH);
        let tags: Vec<String> = taken.iter().map(tag).collect();
        let mut expected: Vec<String> = (0..99).map(|n| format!("t{n}")).collect();
        expected.push("t150".into());
        assert_eq!(tags, expected, "B's one miss is in the first call");
        assert_eq!(pending.len(), 51);
        assert_eq!(tag(&pending[0]), "t99");
        assert_eq!(tag(&pending[50]), "t149");
        let rest = take_in_turns(&mut pending, MAX_BATCH);
        assert_eq!(rest.len(), 51);
        assert!(pending.is_empty());
    }

    /// Concurrent misses for distinct tags share calls of at most [`MAX_BATCH`], and each
    /// caller gets its own image or its own failure.
    #[tokio::test(start_paused = true)]
    async fn misses_are_batched_and_fanned_out() {
        let recorded = Arc::new(Recorded::default());
        let batcher = Arc::new(Batcher::new(Arc::clone(&recorded), Duration::ZERO));
        let repository = RepositoryKey {
            registry_id: None,
            repository: RepositoryName::parse("repo").unwrap(),
        };
        let readers: Vec<_> = (0..200)
            .map(|n| {
                let (batcher, repository) = (Arc::clone(&batcher), repository.clone());
                let tag = Tag::parse(&format!("t{n}")).unwrap();
                let reference = ImageRef::new(Some(tag), None).unwrap();
                tokio::spawn(
                    async move { (n, batcher.get(repository, Vec::new(), reference).await) },
                )
            })
            .collect();
        for reader in readers {
            let (n, result) = reader.await.unwrap();
            match result {
                Ok(image) => {
                    assert!(n < 150);
                    assert_eq!(image.tag.unwrap().as_str(), format!("t{n}"));
                    assert_eq!(&*image.manifest, format!("{{\"n\":{n}}}"));
                }
                Err(err) => {
                    assert!(n >= 150, "t{n} exists");
                    assert!(matches!(err, RegistryError::ImageNotFound(_)));
                }
            }
        }
        let calls = recorded.calls.lock().unwrap().clone();
        assert_eq!(calls.iter().sum::<usize>(), 200);
        assert!(calls.iter().all(|&b| b <= MAX_BATCH), "{calls:?}");
        assert!(calls.len() <= 4, "{calls:?}");
    }
}
