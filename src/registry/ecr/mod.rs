//! The ECR backend: the registry seam as `aws-sdk-ecr` calls.
//!
//! - [`client`]: the SDK client's configuration (retries, timeouts, endpoint, budgets);
//! - [`budget`]: the per-operation rate budgets in front of every HTTP request;
//! - [`retry`]: what the SDK must not retry;
//! - [`operations`]: the five ECR operations as SDK calls, BatchGetImage's answers verified;
//! - [`classify`]: ECR's errors and failure codes sorted into [`RegistryError`]s;
//! - [`calls`]: counts of calls and attempts, by an SDK interceptor;
//! - `batch`: concurrent reads of one repository sent as one BatchGetImage;
//! - [`lanes`]: one client per registry (account and region), and attributed write sessions;
//! - [`roles`]: the IAM role sessions the service assumes in other accounts.
//!
//! Retries are the SDK's own (standard mode, bounded by the configured attempts and timeouts):
//! nothing here loops on top of them, so a call costs ECR at most `max_attempts` requests.

mod batch;
mod blobs;
pub mod budget;
pub mod calls;
mod classify;
pub mod client;
pub mod lanes;
mod operations;
mod retry;
pub mod roles;
pub mod slots;

use std::sync::Arc;

use aws_credential_types::provider::SharedCredentialsProvider;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as Metrics;

pub use batch::MAX_BATCH;
pub use client::{
    EcrSettings, UNKNOWN_ACCOUNT, account_of, client_config, client_config_with, load_sdk_config,
};

use self::calls::UpstreamCalls;
use self::lanes::{Lane, Lanes, LanesConfig};
use self::operations::PutAnswer;
use super::{
    BoxFuture, CacheStatus, DeleteFailure, DeleteImagesInput, DeleteOutcome, DescribeInput,
    DescribePage, Fetched, GetImageInput, ListInput, ListPage, PutImageInput, PutOutcome,
    ReferrersInput, ReferrersPage, Registry, RegistryError, RepositoryKey, ScanSummary,
    StoredImage, Upstream,
};
use crate::domain::image::{Digest, ImageRef, RegistryId, Tag};

/// ECR takes at most 100 ids per BatchDeleteImage (`ImageIdentifierList`).
const MAX_IDS_PER_CALL: usize = 100;
/// The failure code of ids never sent to ECR, because an earlier call of the same request
/// failed outright.
const NOT_SENT: &str = "NotAttempted";

/// ImageService's registry, backed by Amazon ECR: reads batched per repository, puts made
/// idempotent, each registry (account and region) through a client of its own.
#[derive(Clone)]
pub struct EcrRegistry {
    /// The service's own registry. Misses for one repository share one BatchGetImage: part of
    /// this backend, not of the cache, since batching is how ECR is called.
    own: Lane,
    /// The registries of the registries file; `None`: only the own one.
    others: Option<Arc<Lanes>>,
    calls: UpstreamCalls,
    sizes: Histogram,
    /// Fetches signature blobs from their presigned URLs; `Err`: why it could not be built.
    blobs: Result<blobs::BlobClient, String>,
}

impl EcrRegistry {
    /// A registry over a client built from `config` (see [`client_config`]), batching reads
    /// per repository after waiting `batch_window` for company.
    pub fn from_config(
        config: aws_sdk_ecr::config::Builder,
        batch_window: std::time::Duration,
    ) -> Self {
        let calls = UpstreamCalls::default();
        let sizes = Histogram::new([1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0]);
        let settings = EcrSettings {
            batch_window,
            ..EcrSettings::default()
        };
        Self {
            own: lanes::lane(config, &settings, calls.clone(), sizes.clone()),
            others: None,
            calls,
            sizes,
            blobs: blobs::BlobClient::new(),
        }
    }

    /// The same registry, also serving the other registries `config` routes to (and
    /// attributing writes, when it says so).
    #[must_use]
    pub fn with_registries(mut self, config: LanesConfig) -> Self {
        self.others = Some(Arc::new(Lanes::new(
            self.sizes.clone(),
            self.calls.clone(),
            config,
        )));
        self
    }

    /// The calls made to ECR so far, every registry's.
    pub fn calls(&self) -> &UpstreamCalls {
        &self.calls
    }

    /// The lane of `registry` (`None`: the service's own).
    fn lane(&self, registry: Option<&RegistryId>) -> Result<Lane, RegistryError> {
        match (registry, &self.others) {
            (None, _) => Ok(self.own.clone()),
            (Some(registry), Some(others)) => others.lane(registry),
            (Some(registry), None) => Err(RegistryError::NotConfigured {
                registry: registry.key(),
            }),
        }
    }

    /// The credentials of the current caller's writes to `registry`, when writes are
    /// attributed.
    fn session(
        &self,
        registry: Option<&RegistryId>,
    ) -> Result<Option<SharedCredentialsProvider>, RegistryError> {
        match &self.others {
            Some(others) => others.session(registry),
            None => Ok(None),
        }
    }

    async fn put(&self, input: PutImageInput) -> Result<(StoredImage, PutOutcome), RegistryError> {
        let lane = self.lane(input.registry_id.as_ref())?;
        let session = self.session(input.registry_id.as_ref())?;
        match lane.operations.put_image(&input, session.as_ref()).await? {
            PutAnswer::Stored { registry_id } => {
                Ok((input.into_stored(registry_id), PutOutcome::Created))
            }
            PutAnswer::AlreadyThere(upstream) => self.confirm_existing(input, upstream).await,
        }
    }

    async fn get(&self, input: GetImageInput) -> Result<Fetched, RegistryError> {
        let image = self
            .lane(input.registry_id.as_ref())?
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
        let lane = self.lane(repository.registry_id.as_ref())?;
        let session = self.session(repository.registry_id.as_ref())?;
        let mut outcome = DeleteOutcome::default();
        let mut chunks = input.images.chunks(MAX_IDS_PER_CALL);
        while let Some(chunk) = chunks.next() {
            match lane
                .operations
                .delete_images(&repository, chunk, session.as_ref())
                .await
            {
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
        let lane = self.lane(input.registry_id.as_ref())?;
        lane.operations.list_images(&input).await
    }

    async fn describe(&self, input: DescribeInput) -> Result<DescribePage, RegistryError> {
        let lane = self.lane(input.listing.registry_id.as_ref())?;
        lane.operations.describe_images(&input).await
    }

    async fn tag_digest(
        &self,
        repository: RepositoryKey,
        tag: Tag,
    ) -> Result<Option<Digest>, RegistryError> {
        let lane = self.lane(repository.registry_id.as_ref())?;
        lane.operations.tag_digest(&repository, &tag).await
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

    fn list_referrers(
        &self,
        input: ReferrersInput,
    ) -> BoxFuture<'_, Result<ReferrersPage, RegistryError>> {
        Box::pin(async move {
            let lane = self.lane(input.repository.registry_id.as_ref())?;
            lane.operations.list_referrers(&input).await
        })
    }

    /// GetDownloadUrlForLayer, then the blob from the URL it gives.
    fn get_blob(
        &self,
        repository: RepositoryKey,
        digest: Digest,
        max_bytes: usize,
    ) -> BoxFuture<'_, Result<Vec<u8>, RegistryError>> {
        Box::pin(async move {
            let lane = self.lane(repository.registry_id.as_ref())?;
            let url = lane.operations.download_url(&repository, &digest).await?;
            let client = self
                .blobs
                .as_ref()
                .map_err(|why| RegistryError::Other(Upstream::message(why.clone())))?;
            client.fetch(&url, &digest, max_bytes).await
        })
    }

    fn scan_summary(
        &self,
        repository: RepositoryKey,
        digest: Digest,
    ) -> BoxFuture<'_, Result<ScanSummary, RegistryError>> {
        Box::pin(async move {
            let lane = self.lane(repository.registry_id.as_ref())?;
            lane.operations.scan_summary(&repository, &digest).await
        })
    }

    fn register_metrics(&self, metrics: &mut Metrics) {
        self.calls().register_metrics(metrics);
        metrics.register(
            "ecr_batch_size",
            "Distinct images per BatchGetImage call",
            self.sizes.clone(),
        );
        if let Some(others) = &self.others {
            others.pace().register_metrics(metrics);
        }
    }
}
