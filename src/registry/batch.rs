//! Micro-batching: concurrent misses for one repository reach ECR as one `BatchGetImage`.
//!
//! Like a group commit: a miss that finds no call in flight for its repository starts one at
//! once (after the configured window, zero by default, so a lone read waits for nothing); misses
//! that arrive while a call is in flight wait for it and go together in the next call, up to
//! [`MAX_BATCH`] images each. Under load, calls per repository stay near one per ECR round trip
//! however many callers there are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{Instrument, Span};

use super::{BatchGet, BatchInput, RegistryError, RepositoryKey, StoredImage, Upstream};
use crate::deadline;
use crate::image::{ImageRef, MediaType};

/// ECR's limit on image ids per `BatchGetImage` (model shape `ImageIdentifierList`).
pub const MAX_BATCH: usize = 100;

type Reply = oneshot::Sender<Result<StoredImage, RegistryError>>;

/// A caller waiting in a lane: what it wants, where to answer, and until when it waits.
struct Waiter {
    reference: ImageRef,
    reply: Reply,
    deadline: Option<Instant>,
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
                deadline: deadline::current(),
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
                let take = lane.pending.len().min(MAX_BATCH);
                lane.pending.drain(..take).collect()
            };
            self.send(&key, batch).await;
        }
    }

    /// One call for a batch; each caller gets its own image or failure, and a failure of the
    /// whole call (throttling, a missing repository) goes to every caller in it. The call lives
    /// as long as its most patient caller: once every caller's deadline has passed it is
    /// dropped.
    async fn send(&self, key: &LaneKey, batch: Vec<Waiter>) {
        let deadline = batch
            .iter()
            .map(|w| w.deadline)
            .try_fold(None::<Instant>, |latest, d| d.map(|d| latest.max(Some(d))));
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
        let answer = match deadline.flatten() {
            Some(deadline) => tokio::time::timeout_at(deadline, deadline::scope(deadline, call))
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
