//! The ECR backend: the registry seam as `aws-sdk-ecr` calls.
//!
//! - [`client`]: the SDK client's configuration (retries, timeouts, endpoint, budgets);
//! - [`budget`]: the per-operation rate budgets in front of every HTTP request;
//! - [`retry`]: what the SDK must not retry;
//! - [`operations`]: the five ECR operations as SDK calls, BatchGetImage's answers verified;
//! - [`classify`]: ECR's errors and failure codes sorted into [`RegistryError`]s;
//! - [`calls`]: counts of calls and attempts, by an SDK interceptor;
//! - `batch`: concurrent reads of one repository sent as one BatchGetImage.
//!
//! Retries are the SDK's own (standard mode, bounded by the configured attempts and timeouts):
//! nothing here loops on top of them, so a call costs ECR at most `max_attempts` requests.

mod batch;
pub mod budget;
pub mod calls;
mod classify;
pub mod client;
mod operations;
mod retry;
pub mod slots;

use std::sync::Arc;

use prometheus_client::registry::Registry as Metrics;

pub use batch::MAX_BATCH;
pub use client::{
    EcrSettings, UNKNOWN_ACCOUNT, account_of, client_config, client_config_with, load_sdk_config,
};

use self::batch::Batcher;
use self::calls::UpstreamCalls;
use self::operations::{Operations, PutAnswer};
use super::{
    CacheStatus, DeleteFailure, DeleteImagesInput, DeleteOutcome, DescribeInput, DescribePage,
    Fetched, GetImageInput, ListInput, ListPage, PutImageInput, PutOutcome, Registry,
    RegistryError, StoredImage, Upstream,
};
use crate::domain::image::ImageRef;

/// ECR takes at most 100 ids per BatchDeleteImage (`ImageIdentifierList`).
const MAX_IDS_PER_CALL: usize = 100;
/// The failure code of ids never sent to ECR, because an earlier call of the same request
/// failed outright.
const NOT_SENT: &str = "NotAttempted";

/// ImageService's registry, backed by Amazon ECR: reads batched per repository, puts made
/// idempotent.
#[derive(Clone)]
pub struct EcrRegistry {
    operations: Arc<Operations>,
    /// Misses for one repository share one BatchGetImage. Part of this backend, not of the
    /// cache: batching is how ECR is called, and other backends need none.
    batcher: Arc<Batcher<Operations>>,
}

impl EcrRegistry {
    /// A registry over a client built from `config` (see [`client_config`]), batching reads
    /// per repository after waiting `batch_window` for company.
    pub fn from_config(
        config: aws_sdk_ecr::config::Builder,
        batch_window: std::time::Duration,
    ) -> Self {
        let operations = Arc::new(Operations::new(config));
        Self {
            batcher: Arc::new(Batcher::new(Arc::clone(&operations), batch_window)),
            operations,
        }
    }

    /// The calls made to ECR so far.
    pub fn calls(&self) -> &UpstreamCalls {
        self.operations.calls()
    }

    async fn put(&self, input: PutImageInput) -> Result<(StoredImage, PutOutcome), RegistryError> {
        match self.operations.put_image(&input).await? {
            PutAnswer::Stored { registry_id } => {
                Ok((input.into_stored(registry_id), PutOutcome::Created))
            }
            PutAnswer::AlreadyThere(upstream) => self.confirm_existing(input, upstream).await,
        }
    }

    async fn get(&self, input: GetImageInput) -> Result<Fetched, RegistryError> {
        let image = self
            .batcher
            .get(
                input.repository_key(),
                input.accepted_media_types,
                input.reference,
            )
            .await?;
        Ok(Fetched {
            image,
            cache: CacheStatus::Miss,
        })
    }

    /// BatchDeleteImage in calls of at most [`MAX_IDS_PER_CALL`] ids, one after another. Not
    /// atomic: when a later call fails outright, the ids it and the calls after it carried are
    /// reported as failures with the error's reason, and what was deleted before stays listed.
    async fn delete(&self, input: DeleteImagesInput) -> Result<DeleteOutcome, RegistryError> {
        let repository = input.repository_key();
        let mut outcome = DeleteOutcome::default();
        let mut chunks = input.images.chunks(MAX_IDS_PER_CALL);
        while let Some(chunk) = chunks.next() {
            match self.operations.delete_images(&repository, chunk).await {
                Ok(answer) => {
                    outcome.deleted.extend(answer.deleted);
                    outcome.failures.extend(answer.failures);
                }
                Err(err) if outcome.deleted.is_empty() && outcome.failures.is_empty() => {
                    return Err(err);
                }
                Err(err) => {
                    // ECR's own code when it answered, else nothing was sent for these ids.
                    let code = err
                        .upstream()
                        .and_then(|u| u.code.clone())
                        .unwrap_or_else(|| NOT_SENT.to_owned());
                    let rest = chunk.iter().chain(chunks.by_ref().flatten());
                    outcome.failures.extend(rest.map(|image| DeleteFailure {
                        image: Some(image.clone()),
                        code: code.clone(),
                        reason: err.to_string(),
                    }));
                    break;
                }
            }
        }
        Ok(outcome)
    }

    async fn list(&self, input: ListInput) -> Result<ListPage, RegistryError> {
        self.operations.list_images(&input).await
    }

    async fn describe(&self, input: DescribeInput) -> Result<DescribePage, RegistryError> {
        self.operations.describe_images(&input).await
    }

    /// ECR refused a put because the image is already there, in one of two ways: the same
    /// manifest and tag (`ImageAlreadyExistsException`), or an immutable repository's tag
    /// (`ImageTagAlreadyExistsException`), which may point at these very bytes or at others.
    /// A retried put whose first attempt landed ends here too. Only the tag's current digest
    /// tells success from conflict, so look it up rather than trust the exception's name.
    async fn confirm_existing(
        &self,
        input: PutImageInput,
        upstream: Upstream,
    ) -> Result<(StoredImage, PutOutcome), RegistryError> {
        let ours = input.manifest.digest().clone();
        let reference = match &input.tag {
            Some(tag) => ImageRef::new(Some(tag.clone()), None),
            None => ImageRef::new(None, Some(ours.clone())),
        }
        .ok_or_else(|| RegistryError::Other(upstream.clone()))?;
        let found = self
            .get(GetImageInput {
                registry_id: input.registry_id,
                repository: input.repository,
                reference,
                accepted_media_types: Vec::new(),
                max_staleness: None,
            })
            .await?
            .image;
        if found.digest == ours {
            return Ok((found, PutOutcome::AlreadyExisted));
        }
        Err(RegistryError::TagAlreadyExists(Upstream {
            message: format!(
                "tag '{}' in repository '{}' points at {} and the repository does not allow \
                 moving it to {ours}",
                found.tag.as_ref().map(|t| t.as_str()).unwrap_or_default(),
                found.repository,
                found.digest,
            ),
            ..upstream
        }))
    }
}

impl Registry for EcrRegistry {
    boxed_registry_methods!();

    fn register_metrics(&self, metrics: &mut Metrics) {
        self.calls().register_metrics(metrics);
        metrics.register(
            "ecr_batch_size",
            "Distinct images per BatchGetImage call",
            self.batcher.sizes().clone(),
        );
    }
}
