#!/bin/sh
# Install Debian's chromium (for the viewer's browser tests) and the Mesa EGL
# libraries VTK renders with off-screen.  Idempotent: does nothing when
# /usr/bin/chromium and the libraries are already there.  Needs root (CI runs
# as root) only when something is missing.
set -eu

CHROMIUM=/usr/bin/chromium
EGL_PACKAGES="libegl1 libegl-mesa0 libgl1-mesa-dri"

missing=""
for pkg in $EGL_PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
if [ ! -x "$CHROMIUM" ]; then
    missing="$missing chromium"
fi

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser.sh: missing packages:$missing; run this script as root (or: sudo apt-get install -y$missing)" >&2
    exit 1
fi

echo "install-browser.sh: installing$missing with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
if [ ! -x "$CHROMIUM" ]; then
    echo "install-browser.sh: $CHROMIUM still missing after apt-get install" >&2
    exit 1
fi
