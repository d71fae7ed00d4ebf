#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust, pinned, into target/test-venv:
# the moto ECR emulator (tests/requirements.txt). Idempotent and safe to run concurrently;
# re-installs only when the requirements change. Needs python3 (with venv and pip) and access
# to PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${ECR_TEST_VENV:-$root/target/test-venv}"
requirements="$root/tests/requirements.txt"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ -x "$venv/bin/moto_server" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "test-deps: installing the moto emulator into $venv" >&2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --require-virtualenv -r "$requirements"
echo "$want" > "$stamp"
