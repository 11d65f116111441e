#!/usr/bin/env bash
# Validates Kubernetes manifests offline: built-in kinds against the Kubernetes schemas
# (kubernetes-validate, strict), custom resources against the CRDs given with --crd.
#   scripts/validate-manifests.sh [--k8s-version 1.33] [--crd FILE]... PATH...
# Creates (once) and reuses a Python venv under ${XDG_CACHE_HOME:-$HOME/.cache}/datamover.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
KUBERNETES_VALIDATE_VERSION=1.33.1
venv="${XDG_CACHE_HOME:-$HOME/.cache}/datamover/venv"
stamp="$venv/.kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
if [[ ! -e "$stamp" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    touch "$stamp"
fi
exec "$venv/bin/python" "$here/validate_manifests.py" "$@"
