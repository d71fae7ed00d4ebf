//! The polyglot promise, proven with real clients: a Python client (grpcio, stubs generated
//! from `proto/` by grpcio-tools at test time) and a Node.js client (@grpc/grpc-js with
//! @grpc/proto-loader) each run the seed scenario against the service on both backends and
//! read the `ErrorInfo` of a failure. Their packages are pinned and installed by
//! `scripts/test-deps.sh python node`.

use std::process::Command;

use serde_json::Value;

use crate::on_both_backends;
use crate::support::backend::Backend;
use crate::support::{SEED_DIGEST, install, root};

on_both_backends!(
    python_client_runs_the_seed_scenario,
    node_client_runs_the_seed_scenario
);

/// Runs a client program against `backend` in a repository of its own; its one JSON line.
async fn run_client(backend: &Backend, program: Command, name: &str) -> Value {
    let repository = backend.repository(name, false).await;
    let mut program = program;
    program
        .arg(backend.address.to_string())
        .arg(root().join("proto"))
        .arg(root().join("tests/fixtures/hello-world.manifest.json"))
        .arg(&repository)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let output = tokio::task::spawn_blocking(move || program.output())
        .await
        .unwrap()
        .expect("run the client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{name} failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{name} printed {stdout:?}: {e}"))
}

/// What every client must have seen: the seed's digest, the backend's account, and the
/// service's ErrorInfo on the failure.
fn assert_saw_the_seed(report: &Value, backend: &Backend) {
    assert_eq!(report["digest"], SEED_DIGEST);
    assert_eq!(report["registryId"], backend.registry_id());
    assert_eq!(report["failure"]["reason"], "IMAGE_NOT_FOUND");
    assert_eq!(report["failure"]["domain"], "ecr-image-service");
}

async fn python_client_runs_the_seed_scenario(backend: Backend) {
    install("python");
    let mut python = Command::new(root().join("target/test-python/bin/python"));
    python.arg(root().join("tests/clients/python/seed_client.py"));
    let report = run_client(&backend, python, "python-client").await;
    assert_eq!(report["client"], "python");
    assert_saw_the_seed(&report, &backend);
}

async fn node_client_runs_the_seed_scenario(backend: Backend) {
    install("node");
    let mut node = Command::new("node");
    node.arg(root().join("tests/clients/node/seed_client.js"))
        .env("NODE_PATH", root().join("target/test-node/node_modules"));
    let report = run_client(&backend, node, "node-client").await;
    assert_eq!(report["client"], "node");
    assert_saw_the_seed(&report, &backend);
}
