#!/usr/bin/env bash
# Install checkov into its own venv (.venv/tools/checkov) from pinned requirements.
# It cannot share .venv: it would downgrade boto3 and packaging below what kfp/kserve need.
# Used by `make scan` and by tests/test_k8s_scan.py (which skips when checkov is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
TOOL=.venv/tools/checkov
REQ=manifests/checkov-requirements.txt
if [ -x "$TOOL/bin/checkov" ] && cmp -s "$REQ" "$TOOL/.requirements"; then
  exit 0
fi
"$PYTHON" -m venv "$TOOL"
"$TOOL/bin/pip" install --quiet --disable-pip-version-check -r "$REQ"
cp "$REQ" "$TOOL/.requirements"
"$TOOL/bin/checkov" --version
