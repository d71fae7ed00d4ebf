//! The one file-reload loop: the authorization policy and the TLS files are looked at every
//! [`RELOAD_INTERVAL`]; a change is applied by the owner's `reload`, and a failure is logged once
//! until it changes (an unreadable file would otherwise fail every second), while the previous
//! version stays in force.

use std::time::Duration;

/// How often files are looked at: a change applies within about a second (Kubernetes itself
/// takes up to a minute to update a mounted ConfigMap or Secret). Reading a few small files once
/// a second costs nothing measurable.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Calls `reload` every [`RELOAD_INTERVAL`] until the process ends. `reload` applies a change
/// (and says so in its own words), or answers why it could not, which is logged as `what` not
/// reloaded.
pub async fn every_interval(what: &'static str, mut reload: impl FnMut() -> Result<bool, String>) {
    let mut reported = None;
    loop {
        tokio::time::sleep(RELOAD_INTERVAL).await;
        let reloads = &crate::metrics::process().file_reloads;
        match reload() {
            Ok(changed) => {
                if changed {
                    reloads
                        .get_or_create(&[("file", what), ("result", "applied")])
                        .inc();
                }
                reported = None;
            }
            Err(err) if reported.as_ref() != Some(&err) => {
                reloads
                    .get_or_create(&[("file", what), ("result", "invalid")])
                    .inc();
                tracing::error!(error = %err, "{what} not reloaded: keeping the previous version");
                reported = Some(err);
            }
            Err(_) => {
                reloads
                    .get_or_create(&[("file", what), ("result", "invalid")])
                    .inc();
            }
        }
    }
}

/// A reloaded file's text; the error names the file.
pub fn read(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}
