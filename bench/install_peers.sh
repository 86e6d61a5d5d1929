#!/bin/sh
# Installs the benchmark peers it can; a peer that cannot be installed is reported
# and skipped (the benchmarks print "not installed" for it), never an error.
#
#   cwebp  Debian package "webp": as root, apt-get install; otherwise
#          apt-get download + dpkg -x into $PEERS (bench/.peers); compare.py then
#          runs $PEERS/usr/bin/cwebp with LD_LIBRARY_PATH=$PEERS/usr/lib/<triplet>.
#   sharp  npm install --prefix $PEERS sharp@$SHARP_VERSION (prebuilt binaries).
#   webp   the PyPI wheel "webp" (a cffi binding with its own libwebp), pip-installed
#          with $PYTHON into $PEERS/python (cffi beside it; numpy and Pillow come
#          from the venv), outside the project's venv: only
#          encoder_speed.py uses it, to time another build of libwebp.
#
# Environment: PEERS (default bench/.peers next to this script), SHARP_VERSION
# (default 0.34), WEBP_WHEEL_VERSION (default 0.4.0), PYTHON (default python3), AS_ROOT=0 to take the unprivileged path even as root.
set -u

here=$(cd "$(dirname "$0")" && pwd)
PEERS=${PEERS:-$here/.peers}
SHARP_VERSION=${SHARP_VERSION:-0.34}
WEBP_WHEEL_VERSION=${WEBP_WHEEL_VERSION:-0.4.0}
PYTHON=${PYTHON:-python3}
if [ "${AS_ROOT:-}" = 0 ]; then root=0; elif [ "$(id -u)" = 0 ]; then root=1; else root=0; fi
mkdir -p "$PEERS"

install_cwebp_root() {
    apt-get install -y -q webp >/dev/null 2>&1 && return 0
    # A fresh machine may have no package lists yet.
    apt-get update -q >/dev/null 2>&1 && apt-get install -y -q webp >/dev/null 2>&1
}

install_cwebp_local() {
    # cwebp plus the libraries a minimal system may lack; the rest (libc, libjpeg,
    # libpng, libtiff, libgif) are assumed present.
    debs="$PEERS/debs"
    mkdir -p "$debs"
    (cd "$debs" && for pkg in webp libwebp7 libwebpdemux2 libwebpmux3 libsharpyuv0; do
        apt-get download "$pkg" >/dev/null 2>&1 || true
    done)
    ls "$debs"/webp_*.deb >/dev/null 2>&1 || return 1
    for deb in "$debs"/*.deb; do dpkg -x "$deb" "$PEERS" || return 1; done
    LD_LIBRARY_PATH=$(ls -d "$PEERS"/usr/lib/*-linux-gnu 2>/dev/null | tr '\n' ':') \
        "$PEERS/usr/bin/cwebp" -version >/dev/null 2>&1
}

if [ -x "$PEERS/usr/bin/cwebp" ] || { [ "$root" = 1 ] && command -v cwebp >/dev/null 2>&1; }; then
    echo "cwebp: already installed"
elif [ "$root" = 1 ] && install_cwebp_root; then
    echo "cwebp: installed with apt-get ($(cwebp -version))"
elif install_cwebp_local; then
    echo "cwebp: unpacked into $PEERS/usr/bin"
elif command -v cwebp >/dev/null 2>&1; then
    echo "cwebp: using $(command -v cwebp)"
else
    echo "cwebp: not installed (apt-get could not provide the webp package)"
fi

if [ -d "$PEERS/node_modules/sharp" ]; then
    echo "sharp: already installed"
elif ! command -v npm >/dev/null 2>&1; then
    echo "sharp: not installed (no npm)"
elif npm install --prefix "$PEERS" --no-audit --no-fund --loglevel=error \
        "sharp@$SHARP_VERSION" >/dev/null 2>&1; then
    echo "sharp: installed into $PEERS/node_modules"
else
    echo "sharp: not installed (npm install sharp@$SHARP_VERSION failed)"
fi

if [ -d "$PEERS/python/webp" ]; then
    echo "webp wheel: already installed"
# --no-deps: its numpy and Pillow come from the venv; only cffi's runtime is new.
elif "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --target "$PEERS/python" \
        "webp==$WEBP_WHEEL_VERSION" cffi >/dev/null 2>&1; then
    echo "webp wheel: installed into $PEERS/python"
else
    echo "webp wheel: not installed (pip install webp==$WEBP_WHEEL_VERSION failed)"
fi
exit 0
