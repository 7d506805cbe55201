#!/usr/bin/env bash
# Validates the deployment files without a Docker engine or a cluster:
#   * docker-compose.yml with `docker-compose config -q` (Debian package
#     docker-compose);
#   * every YAML file of the compose file and deploy/ with yamllint;
#   * deploy/k8s against the Kubernetes API schemas with kubernetes-validate
#     (PyPI; bundles the schemas, works offline; KEDA's custom resources have
#     no bundled schema and are checked by the next step);
#   * scripts/validate_deploy.py: what schemas cannot see (every service has
#     a compose service and a Deployment, references resolve, KEDA targets
#     and queues exist, variables are real and documented, the servers are
#     configured to keep what they acknowledged through a host crash, ...),
#     and its self-test: each durability setting, broken in a copy, must be
#     reported.
# Installs what is missing: docker-compose (apt-get), a Python virtualenv
# with yamllint and kubernetes-validate in $DEVFLEET_TOOLS_DIR
# (default .devfleet/tools).
#
# usage: scripts/validate-deploy.sh
set -euo pipefail

cd "$(dirname "$0")/.."
[ $# -eq 0 ] || { sed -n '15p' "$0" | sed 's/^# //' >&2; exit 2; }

tools=${DEVFLEET_TOOLS_DIR:-.devfleet/tools}
tmp=$(mktemp -d /tmp/devfleet-validate.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if ! command -v docker-compose >/dev/null 2>&1; then
  echo "validate-deploy: installing docker-compose" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi

venv=$tools/venv
if ! "$venv/bin/python" -c 'import yaml, kubernetes_validate, yamllint' >/dev/null 2>&1; then
  echo "validate-deploy: installing yamllint and kubernetes-validate into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$tools"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'kubernetes-validate>=1.31' 'yamllint>=1.29' PyYAML
fi

echo "== docker-compose config" >&2
# The compose file reads settings from the environment; validate it with
# the defaults, not whatever this shell happens to have set.
env -u DEVFLEET_GATEWAY_TOKEN -u DEVFLEET_OPENAI_API_KEY docker-compose -f docker-compose.yml config -q
env -u DEVFLEET_GATEWAY_TOKEN -u DEVFLEET_OPENAI_API_KEY docker-compose -f docker-compose.yml config >"$tmp/compose.yml"

echo "== yamllint" >&2
"$venv/bin/yamllint" --strict -d '{extends: default, rules: {line-length: {max: 140}, document-start: disable, truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}}}' \
  docker-compose.yml deploy/

echo "== kubernetes-validate (strict)" >&2
# Exit status 1 on a schema error; custom resources and the kustomization
# only warn (no bundled schema).
"$venv/bin/kubernetes-validate" --strict --quiet --no-warn deploy/k8s/*.yaml

echo "== cross-checks" >&2
"$venv/bin/python" scripts/validate_deploy.py "$tmp/compose.yml"
"$venv/bin/python" scripts/validate_deploy.py --self-test "$tmp/compose.yml"

if command -v kubectl >/dev/null 2>&1; then
  echo "== kubectl kustomize" >&2
  kubectl kustomize deploy/k8s >/dev/null
fi
echo "validate-deploy: ok" >&2
