#!/usr/bin/env bash
# Build the project's images with buildah: no Docker daemon, no registry (docs/images.md).
#
#   images/buildah.sh base                       # the local base image, made once and cached
#   images/buildah.sh build ROLE REF DOCKERFILE  # one image from its unchanged Dockerfile (makes the base first)
#   images/buildah.sh push REF                   # push a built image to the registry its name says
#
# `make images BUILDER=buildah` calls `build` for each role with the names bincounter/images.py gives.
# Needs root, buildah and debootstrap (Debian: `apt-get install buildah debootstrap`).
#
# What differs from a production `docker build` (which uses the Dockerfiles' defaults):
# - BASE_IMAGE is a Debian bookworm minbase made here by debootstrap, with Debian's python3 (3.11.2)
#   instead of python:3.11.14-slim-bookworm, which cannot be pulled without a registry;
# - with BUILDAH_TORCH_FROM_PYPI=1 (the default), the pipeline and server images take torch from
#   PyPI (the CUDA build of the same version) because the CPU wheel index cannot be reached.
#   BUILDAH_TORCH_FROM_PYPI=0 builds them exactly as production does, from the CPU index.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Storage: overlay shares each layer between images and containers; where overlay mounts are not
# allowed (some containers), BUILDAH_STORAGE_DRIVER=vfs works, but it copies every layer in full
# (the trainer then needs tens of GB). image-smoke.sh uses the same variable.
STORAGE_DRIVER=${BUILDAH_STORAGE_DRIVER:-overlay}
# The base: made here from debootstrap (localhost/...), or pulled when a registry can be reached.
BASE=${BUILDAH_BASE:-localhost/bincounter-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The Debian packages python:3.11-slim-bookworm has and the Dockerfiles use, on top of minbase:
#   python3            the interpreter (Debian's 3.11; the official image builds 3.11.14 into /usr/local)
#   python3-venv       `python -m venv /opt/venv` needs ensurepip
#   python3-pip        the deps stage runs `pip install uv==...` with the base's pip
#   python-is-python3  the Dockerfiles call `python`; Debian only names it python3
#   ca-certificates    TLS to the package indexes (pip, uv, apt)
#   netbase            /etc/services and /etc/protocols, which Python's socket module looks up
# apt, passwd (useradd/groupadd) and the rest the Dockerfiles run are already in minbase.
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,netbase
TORCH_FROM_PYPI=${BUILDAH_TORCH_FROM_PYPI:-1}
EXTRA_CA_DIR=${BUILDAH_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}

buildah_() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

die() { echo "images/buildah.sh: $*" >&2; exit 1; }

need() {
    command -v "$1" >/dev/null || die "$1 is not installed (Debian: apt-get install buildah debootstrap)"
}

base() {
    need buildah
    if buildah_ inspect --type image "$BASE" >/dev/null 2>&1; then
        echo "base image $BASE exists (cached; 'buildah --storage-driver $STORAGE_DRIVER rmi $BASE' remakes it)"
        return
    fi
    case $BASE in
        localhost/*) ;;  # made here, below
        *) buildah_ pull "$BASE"; return ;;  # e.g. BUILDAH_BASE=docker.io/library/python:3.11.14-slim-bookworm
    esac
    need debootstrap
    [ "$(id -u)" = 0 ] || die "debootstrap needs root"
    local tmp
    tmp=$(mktemp -d /var/tmp/bincounter-base.XXXXXX)
    # Removed when base returns; the trap then unsets itself (a RETURN trap would fire for every later function).
    trap 'rm -rf "$tmp"; trap - RETURN' RETURN
    echo "debootstrap: bookworm minbase + $BASE_PACKAGES"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$tmp/rootfs" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 \
        || { tail -20 "$tmp/debootstrap.log"; die "debootstrap failed (log above)"; }
    local r=$tmp/rootfs
    # The official image's Python is its own build in /usr/local, which pip may install into; Debian
    # marks its system Python as externally managed (PEP 668), which would stop `pip install uv`.
    rm -f "$r"/usr/lib/python3*/EXTERNALLY-MANAGED
    # The same apt sources as debian:bookworm-slim (the official image's base), so the Dockerfiles'
    # `apt-get install tini=...` sees the same versions; no package lists or caches in the layer.
    rm -f "$r/etc/apt/sources.list"
    cat >"$r/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # A machine whose egress passes a TLS-intercepting proxy trusts that proxy's CA (in
    # /usr/local/share/ca-certificates); without it pip and uv cannot reach PyPI from the build. The
    # local base trusts it too, and SSL_CERT_FILE points uv (which has its own roots) at the system bundle.
    local extra_ca
    extra_ca=$(find "$EXTRA_CA_DIR" -maxdepth 1 -name '*.crt' 2>/dev/null | sort)
    if [ -n "$extra_ca" ]; then
        echo "trusting this machine's extra CA certificates: $(echo $extra_ca | tr '\n' ' ')"
        mkdir -p "$r/usr/local/share/ca-certificates"
        cp $extra_ca "$r/usr/local/share/ca-certificates/"
        chroot "$r" update-ca-certificates >/dev/null
    fi
    # debian:bookworm-slim's apt settings: no package caches or downloaded .debs left behind by an
    # `apt-get install` (without them the Dockerfiles' tini layer keeps ~80 MB of /var/cache/apt).
    cat >"$r/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$r/etc/apt/apt.conf.d/docker-no-languages"
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/log/* "$r"/tmp/* "$r"/root/.cache
    find "$r/usr/lib" -name __pycache__ -type d -prune -exec rm -rf {} +
    # Device nodes come from the runtime, not the image.
    tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -C "$r" -cf "$tmp/rootfs.tar" .
    local ctr
    ctr=$(buildah_ from scratch)
    buildah_ add "$ctr" "$tmp/rootfs.tar" / >/dev/null
    buildah_ config --env LANG=C.UTF-8 --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --cmd python3 \
        --label org.opencontainers.image.description="Debian bookworm minbase + $BASE_PACKAGES (images/buildah.sh)" \
        "$ctr"
    buildah_ commit --rm "$ctr" "$BASE" >/dev/null
    echo "made base image $BASE"
}

build() {
    local role=$1 ref=$2 dockerfile=$3
    base
    local args=(--build-arg "BASE_IMAGE=$BASE")
    if [ "$TORCH_FROM_PYPI" = 1 ] && grep -q '^ARG TORCH_INDEX_URL=' "$ROOT/$dockerfile"; then
        args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg TORCH_LOCAL_VERSION=)
    fi
    echo "buildah bud: $role -> $ref (${args[*]})"
    # --layers keeps each instruction's layer (the size table in docs/images.md reads them) and the
    # build cache; the RUN --mount cache (uv's) lives outside the layers, as with BuildKit.
    (cd "$ROOT" && buildah_ bud --isolation chroot --layers --pull=never "${args[@]}" \
        --file "$dockerfile" --tag "$ref" .)
    # The deps stage's layers hold a second copy of the virtual environment (GBs for torch); the final
    # image has its own. Drop the untagged stage images unless the build cache is wanted.
    if [ "${BUILDAH_KEEP_CACHE:-0}" != 1 ]; then
        # One pass removes only the images without children; the stage images form a chain.
        for _ in 1 2 3 4 5; do
            [ -n "$(buildah_ rmi --prune 2>/dev/null)" ] || break
        done
    fi
    buildah_ images "$ref"
}

case ${1:-} in
    base) base ;;
    build) [ $# -eq 4 ] || die "usage: $0 build ROLE REF DOCKERFILE"; build "$2" "$3" "$4" ;;
    push) [ $# -eq 2 ] || die "usage: $0 push REF"; buildah_ push "$2" "docker://$2" ;;
    *) die "usage: $0 base | build ROLE REF DOCKERFILE | push REF" ;;
esac
