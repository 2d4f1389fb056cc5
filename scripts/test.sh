#!/usr/bin/env bash
# Quick start 2 (and what .ci/run calls): lint and test napari-coarseseg.
#
#   scripts/test.sh [pytest options, e.g. -x -q tests/test_cli.py]
#
# Same environment as scripts/demo.sh (active venv, else .venv), plus: the system
# packages napari's GUI tests need (virtual X server, OpenGL, Qt's X libraries),
# `pip install -e ".[test]"`, `ruff check .`, then pytest (under xvfb-run when
# there is no screen).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh

# napari's GUI tests draw layers, which needs OpenGL (Mesa) and Qt's X libraries;
# without a screen also a virtual X server (QT_QPA_PLATFORM=offscreen is not enough).
# Installed only when missing, and only where apt-get exists (Debian/Ubuntu).
if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
    wanted=(libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4
            libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
            libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1)
    if [ -z "${DISPLAY:-}" ]; then wanted+=(xvfb xauth); fi
    missing=()
    for p in "${wanted[@]}"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
    done
    if [ -z "${DISPLAY:-}" ] && ! command -v xvfb-run >/dev/null; then
        case " ${missing[*]} " in *" xvfb "*) ;; *) missing+=(xvfb) ;; esac
    fi
    if [ "${#missing[@]}" -gt 0 ]; then cs_apt_install "${missing[@]}"; fi
fi

cs_use_env
cs_ensure_torch
cs_log "installing napari-coarseseg with its test tools (editable; the first run takes a few minutes)"
cs_pip install -q -e ".[test]"

cs_log "ruff check ."
"$VPY" -m ruff check . ||
    cs_die "ruff found problems (listed above): fix them (many with 'ruff check --fix .') and rerun"

# pytest exit codes: 0 all passed, 1 failures, 2 interrupted, 3 internal error,
# 4 usage error, 5 no tests collected (a failure here too).
runner=()
if [ -z "${DISPLAY:-}" ]; then
    if command -v xvfb-run >/dev/null; then
        runner=(xvfb-run -a)
    elif [ "$(uname -s)" = Linux ]; then
        cs_log "warning: no screen (\$DISPLAY) and no xvfb-run: the GUI tests will likely fail; install xvfb"
    fi
fi
cs_log "running: ${runner[*]+${runner[*]} }python -m pytest $*"
set +e
${runner[@]+"${runner[@]}"} "$VPY" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then cs_die "pytest collected no tests"; fi
exit "$status"
