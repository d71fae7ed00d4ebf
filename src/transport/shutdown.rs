//! The process's stop signal.

use tracing::info;

/// Completes on SIGTERM (Kubernetes asks a pod to stop) or SIGINT (Ctrl-C). The server then
/// drains: health turns NOT_SERVING, and traffic still routed here during the endpoint update
/// is served (see [`crate::transport::server::serve`]).
pub async fn signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    info!("shutting down: finishing in-flight requests");
}
