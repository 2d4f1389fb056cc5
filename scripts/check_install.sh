#!/usr/bin/env bash
# Proves that a regular (non-editable) install of napari-coarseseg works on its own:
# in a brand-new virtual environment under a temporary folder (no system site
# packages), install torch (as scripts/_env.sh does) and `pip install` a copy of the
# repository, then, from a temporary working directory (so the source tree cannot
# be imported): check that napari_coarseseg comes from the venv's site-packages, run
# `coarseseg demo --steps 60` and check its outputs, and load both shipped models by
# name. The temporary folder is removed on exit. Environment: PYTHON,
# COARSESEG_TORCH_INDEX (see scripts/_env.sh), TMPDIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh

TMP="$(mktemp -d "${TMPDIR:-/tmp}/coarseseg-check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
unset PYTHONPATH

# Timing: lap NAME records the seconds since the previous lap.
timings=()
t_start=$SECONDS
t_last=$SECONDS
lap() { timings+=("$(printf '%-24s %4d s' "$1" $((SECONDS - t_last)))"); t_last=$SECONDS; }

# 1. A fresh venv, without the system site packages, and torch.
cs_pick_python
VENV="$TMP/venv"
VPY="$VENV/bin/python"
cs_log "creating $VENV with $PY"
cs_make_venv "$VENV"
lap "venv"
cs_ensure_torch
lap "torch"

# 2. pip install (not editable) of a copy of the repository: the files git knows
# (tracked or not ignored, as a clean clone plus uncommitted work), else all but
# caches and environments. Building from a copy keeps build/ and *.egg-info out of
# the source tree, and a stale build/ of the source tree out of the wheel.
mkdir "$TMP/src" "$TMP/work"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            case "$f" in .venv/* | coarseseg-demo/*) continue ;; esac  # ours, if not ignored
            if [ -e "$f" ]; then printf '%s\0' "$f"; fi                  # skip deleted files
        done |
        tar --null -T - -cf - | tar -xf - -C "$TMP/src"
else
    tar --exclude=./.git --exclude=./.venv --exclude=./coarseseg-demo --exclude=./build \
        --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C "$TMP/src"
fi
cs_log "pip install (not editable) from a copy of $ROOT"
cs_pip install -q "$TMP/src"
lap "pip install ."

# 3. Everything below runs from an empty working directory.
cd "$TMP/work"
"$VPY" - <<'PY' || cs_die "the installed package does not import (above): a module missing from setup.cfg's packages?"
import os, sysconfig
import napari_coarseseg
where = os.path.realpath(napari_coarseseg.__file__)
site = os.path.realpath(sysconfig.get_paths()["purelib"])
assert where.startswith(site + os.sep), f"napari_coarseseg imported from {where}, not from {site}"
print(f"napari_coarseseg {napari_coarseseg.__version__} imported from {where}")
PY

cs_log "running: coarseseg demo --out-dir $TMP/demo --steps 60"
"$VENV/bin/coarseseg" demo --out-dir "$TMP/demo" --steps 60 2>&1 | tee "$TMP/demo.log" ||
    cs_die "coarseseg demo failed (above)"
grep -Eq 'Dice on the held-out right half: [0-9]+\.[0-9]+' "$TMP/demo.log" ||
    cs_die "coarseseg demo exited 0 but printed no Dice"
for f in model.safetensors prediction.tif figure.png; do
    [ -s "$TMP/demo/$f" ] || cs_die "coarseseg demo wrote no $f"
done
lap "coarseseg demo --steps 60"

"$VPY" - <<'PY' || cs_die "the shipped models do not load (above): a file missing from setup.cfg's package_data?"
import napari_coarseseg as n
names = n.list_shipped_models()
print("shipped models:", names)
for name in ("dsb2018-nuclei-refineseg", "dsb2018-nuclei-recursive"):
    assert name in names, f"{name} is not shipped"
    n.load_model(name)
    print("loaded", name)
PY
lap "load shipped models"

cd /
rm -rf "$TMP"  # the EXIT trap does it too, but here it is timed (a venv with torch is ~1 GB)
lap "clean up"

echo "check_install: the non-editable install works. Timings:"
printf '  %s\n' "${timings[@]}"
printf '  %-24s %4d s\n' "total" $((SECONDS - t_start))
