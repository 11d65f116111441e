#!/usr/bin/env bash
# Builds the datamover container images, datamover/datamover-server:<version>,
# datamover/datamover-client:<version> and datamover/datamover-controller:<version>, with
# docker or buildah, without pulling anything.
#
# The binaries are built beforehand (by default `cargo build --release`, or any directory
# given with --bin-dir, e.g. target/debug in the tests). For each image this script
# assembles a root filesystem: the binary in /usr/local/bin, exactly the shared libraries
# `ldd` reports for it plus the dynamic loader, the system CA bundle, and a minimal
# /etc/passwd and /etc/group with the non-root user `datamover` (65532:65532). The
# Containerfile is then `FROM scratch` + `COPY rootfs/ /`: no base image, no package
# manager, no shell.
#
#   images/build.sh [--engine docker|buildah] [--bin-dir DIR] [--version V]
#                   [--only server|client|controller] [--tag-prefix PREFIX]
#                   [--keep-context DIR] [--no-strip]
#
# --tag-prefix (default `datamover/`) is put before `datamover-<name>:<version>`, e.g.
# `registry.example.com/datamover/` to push to a registry.
#
# The copied binary is stripped of debug information (`strip`, when installed) unless
# --no-strip is given.
#
# Prints the built image references on stdout, one per line.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"

engine=""
bin_dir=""
version=""
only=""
prefix="datamover/"
keep=""
strip_bin=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --engine) engine="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --version) version="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --tag-prefix) prefix="$2"; shift 2 ;;
        --keep-context) keep="$2"; shift 2 ;;
        --no-strip) strip_bin=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -z "$engine" ]]; then
    if command -v docker >/dev/null 2>&1; then engine=docker
    elif command -v buildah >/dev/null 2>&1; then engine=buildah
    else echo "build.sh: neither docker nor buildah found: install one or pass --engine" >&2; exit 2
    fi
fi
case "$engine" in
    docker|buildah) ;;
    *) echo "build.sh: --engine must be docker or buildah, not '$engine'" >&2; exit 2 ;;
esac
command -v "$engine" >/dev/null 2>&1 || { echo "build.sh: $engine is not installed" >&2; exit 2; }

# Version, source and licence from the workspace's Cargo.toml ([workspace.package]).
ws_field() {
    sed -n '/^\[workspace.package\]/,/^\[/p' "$repo/Cargo.toml" \
        | sed -n "s/^$1[[:space:]]*=[[:space:]]*\"\\(.*\\)\"/\\1/p" | head -n 1
}
[[ -n "$version" ]] || version="$(ws_field version)"
source_url="$(ws_field repository)"
licence="$(ws_field license)"
revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

if [[ -z "$bin_dir" ]]; then
    echo "build.sh: building release binaries (cargo build --release)" >&2
    (cd "$repo" && cargo build --release --locked -p datamover-server -p datamover-client \
        -p datamover-crd --bins) >&2
    bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
bin_dir="$(cd "$bin_dir" && pwd)"

ca_bundle=""
for c in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
    if [[ -s "$c" ]]; then ca_bundle="$c"; break; fi
done
[[ -n "$ca_bundle" ]] || { echo "build.sh: no CA bundle found (install ca-certificates)" >&2; exit 2; }

work="$(mktemp -d)"
cleanup() { if [[ -n "$keep" ]]; then mkdir -p "$keep" && cp -a "$work/." "$keep/"; fi; rm -rf "$work"; }
trap cleanup EXIT

# Copies a file to the same absolute path under the rootfs, resolving symlinks.
copy_abs() {
    local src="$1" rootfs="$2"
    mkdir -p "$rootfs$(dirname "$src")"
    cp -L "$src" "$rootfs$src"
}

assemble() {
    local name="$1" binary="$2" ctx="$3"
    local rootfs="$ctx/rootfs" owned="$ctx/owned"
    [[ -x "$bin_dir/$binary" ]] || {
        echo "build.sh: $bin_dir/$binary is missing: build it first (cargo build --bins)" >&2; exit 2; }
    mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$owned"
    cp -L "$bin_dir/$binary" "$rootfs/usr/local/bin/$binary"
    if [[ "$strip_bin" == 1 ]] && command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$rootfs/usr/local/bin/$binary"
    fi
    # Shared libraries and the loader, at the paths the binary looks them up.
    local lib
    while read -r lib; do
        [[ -n "$lib" ]] && copy_abs "$lib" "$rootfs"
    done < <(ldd "$bin_dir/$binary" | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}' | sort -u)
    cp -L "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf 'root:x:0:0:root:/root:/sbin/nologin\ndatamover:x:65532:65532:datamover:/home/datamover:/sbin/nologin\n' \
        > "$rootfs/etc/passwd"
    printf 'root:x:0:\ndatamover:x:65532:\n' > "$rootfs/etc/group"
    printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
    chmod 1777 "$rootfs/tmp"
    # Mount points of the spec, present even when nothing is mounted.
    mkdir -p "$rootfs/etc/config" "$rootfs/etc/secrets"
    case "$name" in
        server)
            mkdir -p "$rootfs/etc/client_credentials"
            # Written by the server: owned by the non-root user (still needs a writable
            # mount when the root filesystem is read-only).
            mkdir -p "$owned/etc/server" "$owned/var/lib/datamover" "$owned/var/cache/datamover" \
                "$owned/home/datamover"
            ;;
        client)
            mkdir -p "$rootfs/etc/client-secret" "$owned/home/datamover"
            ;;
        controller)
            # Reads nothing from /etc/config or /etc/secrets: only its service account.
            rmdir "$rootfs/etc/config" "$rootfs/etc/secrets"
            mkdir -p "$owned/home/datamover"
            ;;
    esac
    cp "$here/$name/Containerfile" "$ctx/Containerfile"
}

build() {
    local name="$1" binary="datamover-$1"
    local ref="${prefix}datamover-$name:$version"
    local ctx="$work/$name"
    mkdir -p "$ctx"
    assemble "$name" "$binary" "$ctx"
    local args=(--build-arg "VERSION=$version" --build-arg "SOURCE=$source_url"
        --build-arg "LICENSES=$licence" --build-arg "REVISION=$revision" --build-arg "CREATED=$created"
        -t "$ref" -f "$ctx/Containerfile")
    echo "build.sh: building $ref with $engine from $bin_dir/$binary" >&2
    case "$engine" in
        docker) docker build -q "${args[@]}" "$ctx" >&2 ;;
        buildah) buildah bud --quiet "${args[@]}" "$ctx" >&2 ;;
    esac
    echo "$ref"
}

case "$only" in
    "") build server; build client; build controller ;;
    server|client|controller) build "$only" ;;
    *) echo "build.sh: --only must be server, client or controller, not '$only'" >&2; exit 2 ;;
esac
