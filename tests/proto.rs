//! Proto hygiene with buf (the pinned `@bufbuild/buf` from tests/clients/node): lint with
//! STANDARD and COMMENTS (`buf.yaml`), and no breaking change against the last released proto,
//! kept byte for byte in `tests/fixtures/released-proto/`.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The proto as released in the newest version; a release adds a directory here.
const LAST_RELEASE: &str = "tests/fixtures/released-proto/v0.1.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn buf(args: &[&str]) -> Output {
    let status = Command::new(root().join("scripts/test-deps.sh"))
        .arg("node")
        .status()
        .expect("run scripts/test-deps.sh");
    assert!(status.success(), "scripts/test-deps.sh node: {status}");
    Command::new(root().join("target/test-node/node_modules/.bin/buf"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run buf")
}

fn assert_clean(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn buf_lint_passes_standard_and_comments() {
    assert_clean("buf lint", &buf(&["lint"]));
}

#[test]
fn no_breaking_change_against_the_last_release() {
    assert_clean(
        "buf breaking",
        &buf(&["breaking", "proto", "--against", LAST_RELEASE]),
    );
}
