//! Retry policy on top of the SDK's standard mode: what must not be retried.

use aws_sdk_ecr::error::ProvideErrorMetadata;
use aws_sdk_ecr::operation::batch_get_image::BatchGetImageError;
use aws_sdk_ecr::operation::put_image::PutImageError;
use aws_smithy_runtime_api::client::interceptors::context::InterceptorContext;
use aws_smithy_runtime_api::client::retries::classifiers::{ClassifyRetry, RetryAction};

/// The SDK lists `LimitExceededException` among its throttling codes and retries it. For ECR it
/// is a hard quota (images per repository, tags per image): waiting does not lift it, so a
/// retry only spends the account's rate budget and the caller's deadline. Any classifier's
/// `RetryForbidden` overrides the others' verdicts.
#[derive(Debug, Default)]
pub struct QuotaIsNotThrottling;

impl ClassifyRetry for QuotaIsNotThrottling {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(Err(err)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        let Some(err) = err.as_operation_error() else {
            return RetryAction::NoActionIndicated;
        };
        let code = err
            .downcast_ref::<PutImageError>()
            .and_then(ProvideErrorMetadata::code)
            .or_else(|| {
                err.downcast_ref::<BatchGetImageError>()
                    .and_then(ProvideErrorMetadata::code)
            });
        if code == Some("LimitExceededException") {
            RetryAction::RetryForbidden
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "QuotaIsNotThrottling"
    }
}
