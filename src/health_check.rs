//! The client side of gRPC health checking, for `ecr-image-service health-check`: the image
//! has no shell and no `grpc_health_probe`, so the binary asks for itself (e.g. in `helm test`).

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Why a health check did not come back SERVING; each is its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    /// The endpoint is not a usable URL.
    #[error("invalid endpoint {endpoint:?}: {source}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What the URL parser said.
        source: tonic::transport::Error,
    },
    /// No answer: nothing listening, or slower than the timeout.
    #[error("no answer from {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint asked.
        endpoint: String,
        /// The transport error or status that stood for the answer.
        reason: String,
    },
    /// The server answered with a status other than SERVING.
    #[error("{service:?} is {status}")]
    NotServing {
        /// The service asked about.
        service: String,
        /// Its reported status, e.g. `NOT_SERVING`.
        status: &'static str,
    },
}

/// Asks `endpoint` for the status of `service` and succeeds only on SERVING.
pub async fn check(
    endpoint: &str,
    service: &str,
    timeout: Duration,
) -> Result<(), HealthCheckError> {
    let unreachable = |reason: String| HealthCheckError::Unreachable {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let channel = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|source| HealthCheckError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|err| unreachable(crate::api::error::with_sources(&err)))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await;
    let status = match answer {
        Ok(response) => {
            ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown)
        }
        // The health service's answer for a name it does not know.
        Err(status) if status.code() == tonic::Code::NotFound => ServingStatus::ServiceUnknown,
        Err(status) => {
            return Err(unreachable(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            )));
        }
    };
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(HealthCheckError::NotServing {
            service: service.to_owned(),
            status: status.as_str_name(),
        })
    }
}
