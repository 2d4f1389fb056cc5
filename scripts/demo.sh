#!/usr/bin/env bash
# Quick start 1: install napari-coarseseg (core, editable) and run its demo.
#
#   scripts/demo.sh [coarseseg demo options, e.g. --steps 30 --device cpu]
#
# Uses the active virtual environment, else creates (or reuses) .venv in the
# repository root with the system site packages visible. Installs torch only when
# the environment cannot import one (CPU build first, see scripts/_env.sh), then
# `pip install -e .` and `coarseseg demo --out-dir coarseseg-demo`.
# Environment: PYTHON (default python3), COARSESEG_TORCH_INDEX (see _env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh

cs_use_env
cs_ensure_torch
cs_log "installing napari-coarseseg (editable, core only)"
cs_pip install -q -e .

cs_log "running: coarseseg demo --out-dir coarseseg-demo $*"
"$VENV/bin/coarseseg" demo --out-dir coarseseg-demo "$@"

if [ -n "${VIRTUAL_ENV:-}" ]; then
    echo "Installed into your active environment $VENV; outputs in $ROOT/coarseseg-demo."
else
    echo "To use it afterwards: source $VENV/bin/activate  (then e.g. coarseseg --help; pip install -e '.[napari]' for the napari plugin)"
fi
