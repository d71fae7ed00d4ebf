#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it on a clean clone: formatting, lints, the pinned
# ECR emulator, Helm and nginx (scripts/test-deps.sh), then every unit and integration test.
# Needs Rust, python3, npm and apt-get (run as root or with sudo); nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
# The AWS SDK honours HTTP(S)_PROXY even for loopback: keep test traffic on this machine.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"

scripts/test-deps.sh
cargo fmt --all --check
cargo clippy --locked --all-targets -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
