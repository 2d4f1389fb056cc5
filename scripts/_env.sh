# shellcheck shell=bash
# Shared set-up of scripts/demo.sh, scripts/test.sh and scripts/check_install.sh.
# Source it (do not run it) after `set -euo pipefail`. It defines:
#   ROOT            the repository root (the folder above scripts/)
#   cs_log / cs_die messages on stderr, prefixed with the calling script's name
#   cs_apt_install  apt-get install, through sudo when not root
#   cs_pick_python  sets PY: ${PYTHON:-python3}, checked to be Python >= 3.10
#   cs_make_venv    creates a virtual environment; installs python3-venv if missing
#   cs_use_env      sets VENV and VPY: the active venv, else ROOT/.venv (created or reused)
#   cs_ensure_torch installs torch into VPY's environment only when `import torch` fails
#   cs_pip          pip of VPY's environment

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CS_NAME="$(basename "$0")"

cs_log() { printf '[%s] %s\n' "$CS_NAME" "$*" >&2; }
cs_die() { printf '%s: error: %s\n' "$CS_NAME" "$*" >&2; exit 1; }

# apt-get install PACKAGES..., as root or through sudo; apt-get update first.
cs_apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null ||
            cs_die "installing $* needs root: run 'apt-get install $*' as root, then rerun"
        sudo=(sudo)
    fi
    cs_log "installing system packages: $*"
    ${sudo[@]+"${sudo[@]}"} apt-get update -qq
    # env: sudo would drop DEBIAN_FRONTEND if it were set in front of it.
    ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# PY: the Python that creates the environment; napari-coarseseg needs >= 3.10.
cs_pick_python() {
    PY="${PYTHON:-python3}"
    command -v "$PY" >/dev/null ||
        cs_die "no '$PY' found: install Python >= 3.10 or set PYTHON=/path/to/python3"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        cs_die "napari-coarseseg needs Python >= 3.10, but $PY is $("$PY" -c 'import sys; print(sys.version.split()[0])'); set PYTHON to a newer one (e.g. PYTHON=python3.12)"
}

# cs_make_venv DIR [venv options]: python -m venv, with --clear (DIR is ours: either
# missing or unusable). Debian/Ubuntu ship the venv module and ensurepip in a separate
# package (python3-venv); when that is what is missing, install it with apt-get and retry.
cs_make_venv() {
    local dir="$1" log pkg prefix ver
    shift
    log="$(mktemp)"
    if "$PY" -m venv --clear "$@" "$dir" >"$log" 2>&1; then rm -f "$log"; return 0; fi
    if ! grep -q -i -e 'ensurepip' -e 'No module named venv' "$log"; then
        cat "$log" >&2; rm -f "$log"
        cs_die "'$PY -m venv $dir' failed (output above)"
    fi
    rm -f "$log"
    # python3-venv for the distribution's default python3, python3.X-venv for another one.
    ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    pkg="python$ver-venv"
    if [ "$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$ver" ]; then
        pkg="python3-venv"
    fi
    # apt-get only helps a Python that apt-get installed (prefix /usr).
    prefix="$("$PY" -c 'import sys; print(sys.base_prefix)')"
    if [ "$prefix" != /usr ]; then
        cs_die "$PY (installed in $prefix) cannot create virtual environments (no venv module or ensurepip): repair that Python or choose another one with PYTHON=..."
    fi
    if ! command -v apt-get >/dev/null; then
        cs_die "$PY cannot create virtual environments (no venv module or ensurepip): install the package '$pkg' (or your distribution's equivalent), then rerun"
    fi
    cs_log "$PY lacks the venv module or ensurepip: installing $pkg"
    cs_apt_install "$pkg"
    "$PY" -m venv --clear "$@" "$dir" ||
        cs_die "'$PY -m venv $dir' still fails after installing $pkg"
}

# VENV and VPY: the active virtual environment when $VIRTUAL_ENV is set, else
# ROOT/.venv, reused when it works, otherwise (re)created with the system site
# packages visible, so that a torch the user already has (e.g. a CUDA build) is kept.
cs_use_env() {
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        VENV="$VIRTUAL_ENV"
        VPY="$VENV/bin/python"
        [ -x "$VPY" ] || cs_die "VIRTUAL_ENV=$VENV has no bin/python: activate a working environment or unset VIRTUAL_ENV"
        "$VPY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
            cs_die "the active environment $VENV has Python < 3.10; napari-coarseseg needs >= 3.10"
        "$VPY" -m pip --version >/dev/null 2>&1 ||
            cs_die "the active environment $VENV has no pip: run '$VPY -m ensurepip' and rerun"
        cs_log "using the active environment $VENV"
        return 0
    fi
    cs_pick_python
    VENV="$ROOT/.venv"
    VPY="$VENV/bin/python"
    if "$VPY" -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
        cs_log "reusing $VENV (Python $("$VPY" -c 'import sys; print(sys.version.split()[0])'); delete it to start afresh)"
    else
        cs_log "creating $VENV with $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])')), system site packages visible"
        cs_make_venv "$VENV" --system-site-packages
    fi
}

cs_pip() { "$VPY" -m pip "$@"; }

# torch only when the environment cannot import one: first the CPU build from the
# PyTorch index (COARSESEG_TORCH_INDEX overrides the URL; set it empty to skip this
# step), with short timeouts and no retries so that an unreachable index fails fast;
# then torch==2.13.0 from the default index (PyPI), the version CI pins.
cs_ensure_torch() {
    local info nolinks status index="${COARSESEG_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
    if info="$("$VPY" -c 'import torch; print(torch.__version__, "from", torch.__file__.rsplit("/", 2)[0], "with CUDA" if torch.cuda.is_available() else "without CUDA")' 2>/dev/null)"; then
        cs_log "torch $info already importable: using it"
        return 0
    fi
    if [ -n "$index" ]; then
        cs_log "torch missing: installing the CPU build from $index"
        # Only that index: extra indexes or find-links of the pip configuration could
        # offer a (CUDA) torch of their own. pip ignores empty PIP_* variables, hence
        # the index again as the extra one, and an empty folder as the links.
        nolinks="$(mktemp -d)"
        status=0
        PIP_EXTRA_INDEX_URL="$index" PIP_FIND_LINKS="$nolinks" \
            cs_pip install --timeout 10 --retries 0 --index-url "$index" torch || status=$?
        rmdir "$nolinks"
        if [ "$status" -eq 0 ]; then return 0; fi
        cs_log "could not install torch from $index: falling back to torch==2.13.0 from the default index"
    else
        cs_log "torch missing: installing torch==2.13.0 from the default index"
    fi
    cs_pip install torch==2.13.0
}
