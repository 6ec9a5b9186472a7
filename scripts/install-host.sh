#!/usr/bin/env bash
# Prepare a Debian 12 host for hvtsm: system packages, the libvirt daemons and a
# virtualenv with hvtsm installed in editable mode. Run as root. Idempotent: a re-run
# on a ready host skips apt and pip and takes a few seconds.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/install-host.sh [--dev] [--help]

Prepares a Debian 12 host for hvtsm (run as root):
  1. installs the Debian packages hvtsm needs (skipped when all are installed)
  2. starts libvirtd and virtlogd (directly when PID 1 is not systemd)
  3. creates a virtualenv and installs hvtsm into it with `pip install -e`

Options:
  --dev     also install the dev extras (pytest, ruff, psycopg) and, when no
            PostgreSQL `initdb` is found, Debian's `postgresql` server package
  --help    show this help

Environment:
  HVTSM_VENV   virtualenv path (default: <repo>/.venv)
  PYTHON       interpreter that creates the virtualenv (default: python3, >= 3.11)
EOF
}

DEV=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install-host.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVTSM_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
STEP="start"
LOG="$(mktemp /tmp/hvtsm-install.XXXXXX.log)"

on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "install-host.sh: FAILED at step '$STEP' (exit $rc)" >&2
        if [ -s "$LOG" ]; then
            echo "---- last lines of $LOG ----" >&2
            tail -n 40 "$LOG" >&2
        fi
    else
        rm -f "$LOG"
    fi
}
trap on_exit EXIT

step() {
    STEP="$1"
    echo "== $1"
}

if [ "$(id -u)" -ne 0 ]; then
    echo "install-host.sh: must run as root (apt, libvirtd)" >&2
    exit 1
fi

# ---------------------------------------------------------------- Debian packages
# python3-dev/python3-venv matter only when PYTHON is Debian's own python3; they
# are small and always listed so a Debian-python host works without a second run.
PACKAGES=(
    libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils
    libvirt-dev pkg-config gcc python3-dev python3-venv
    linux-image-amd64 busybox-static iproute2 nftables genisoimage
)

have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

# the monitor's benign corpus builds and runs code the way developers do
[ "$DEV" -eq 1 ] && PACKAGES+=(make git sqlite3 tar)

if [ "$DEV" -eq 1 ] && ! have_initdb; then
    PACKAGES+=(postgresql)
fi

MISSING=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    [ "$status" = "installed" ] || MISSING+=("$pkg")
done

if [ "${#MISSING[@]}" -eq 0 ]; then
    echo "== Debian packages: all ${#PACKAGES[@]} already installed"
else
    step "installing Debian packages: ${MISSING[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -qq -o DPkg::Lock::Timeout=300 update >>"$LOG" 2>&1
    apt-get -y -qq -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold \
        install "${MISSING[@]}" >>"$LOG" 2>&1
fi

# ---------------------------------------------------------------- libvirt daemons
if [ -d /run/systemd/system ]; then
    step "starting libvirtd and virtlogd (systemd)"
    systemctl enable --now virtlogd libvirtd >>"$LOG" 2>&1 ||
        echo "   warning: systemctl enable --now virtlogd libvirtd failed (see journalctl)" >&2
else
    step "starting libvirtd and virtlogd (no systemd)"
    # The daemons detach themselves; their early errors land in the step log.
    pgrep -x virtlogd >/dev/null || virtlogd -d </dev/null >>"$LOG" 2>&1
    pgrep -x libvirtd >/dev/null || libvirtd -d </dev/null >>"$LOG" 2>&1
fi

STEP="waiting for qemu:///system"
deadline=$((SECONDS + 20))
until virsh -c qemu:///system version >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "install-host.sh: libvirtd did not answer on qemu:///system within 20 s" >&2
        virsh -c qemu:///system version >&2 || true
        exit 1
    fi
    sleep 0.5
done

# ---------------------------------------------------------------- virtualenv
step "virtualenv at $VENV"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install-host.sh: python interpreter '$PYTHON' not found (set PYTHON)" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install-host.sh: $PYTHON is $("$PYTHON" -V 2>&1); hvtsm needs Python >= 3.11" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c 'pass' >/dev/null 2>&1; then
    # Missing, or broken (e.g. the interpreter it was made from is gone): (re)create.
    "$PYTHON" -m venv --clear "$VENV"
fi

# The stamp records what was installed; with a matching stamp and working imports
# the pip step is skipped so a re-run stays fast.
STAMP_FILE="$VENV/.hvtsm-install-stamp"
STAMP="$(
    {
        echo "dev=$DEV repo=$REPO"
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
        cat "$REPO/pyproject.toml"
    } | sha256sum | cut -d' ' -f1
)"

venv_ready() {
    [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP" ] || return 1
    local mods="hvtsm, libvirt, lxml, apscheduler, sqlmodel"
    [ "$DEV" -eq 1 ] && mods="$mods, pytest, psycopg"
    # Run from / so that the repo's own directory is not what gets imported.
    (cd / && "$VENV/bin/python" - "$REPO" >/dev/null 2>&1 <<EOF
import os, sys
import $mods
repo = os.path.realpath(sys.argv[1])
sys.exit(not os.path.realpath(hvtsm.__file__).startswith(repo + os.sep))
EOF
    ) || return 1
    [ "$DEV" -eq 0 ] || [ -x "$VENV/bin/ruff" ]
}

if venv_ready; then
    echo "== python packages: up to date"
else
    target="$REPO"
    [ "$DEV" -eq 1 ] && target="$REPO[dev]"
    step "pip install -e $target (libvirt-python compiles on first install)"
    rm -f "$STAMP_FILE"
    "$VENV/bin/python" -m pip install -qq --disable-pip-version-check -e "$target"
    echo "$STAMP" >"$STAMP_FILE"
fi

STEP="done"
echo "== host ready: $("$VENV/bin/python" -V 2>&1) in $VENV"
