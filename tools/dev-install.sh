#!/usr/bin/env bash
# Rebuild and (re)install the package in editable mode into the dev venv.
# Serialised with flock so that parallel developers never run two builds in one build dir.
# Usage: tools/dev-install.sh [extra pip args]; NEUROADDA_ENABLE_CUDA defaults to OFF here (fast).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-/work/venv/bin/python}
export NEUROADDA_ENABLE_CUDA=${NEUROADDA_ENABLE_CUDA:-OFF}
exec flock /tmp/neuroadda-build.lock "$PY" -m pip install --no-build-isolation --no-deps -q \
  -Cbuild-dir=build/dev-$NEUROADDA_ENABLE_CUDA -e . "$@"
