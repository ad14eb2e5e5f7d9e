# shellcheck shell=bash
# Small helpers shared by the setup scripts (sourced, not run).

log() { printf 'setup: %s\n' "$*"; }

die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}

# run_quiet LABEL CMD...: run CMD with its output in a log file; on failure show the log's tail.
run_quiet() {
    local label=$1 logf rc=0
    shift
    logf=$(mktemp "/tmp/ferry-setup.XXXXXX.log")
    "$@" >"$logf" 2>&1 || rc=$?
    if ((rc != 0)); then
        printf 'setup: %s failed (exit %d); last lines of %s:\n' "$label" "$rc" "$logf" >&2
        tail -n 40 "$logf" | sed 's/^/    /' >&2
        return "$rc"
    fi
    rm -f "$logf"
}

# pkg_installed NAME: the Debian package is installed (not just known or half-configured).
pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# version_ge A B: version A >= version B (Debian version ordering).
version_ge() {
    dpkg --compare-versions "$1" ge "$2"
}

sha256_of() {
    sha256sum "$1" | cut -d' ' -f1
}

# criu_version BIN: prints e.g. 4.2.1; fails when BIN is missing or does not run.
criu_version() {
    [[ -x $1 ]] || return 1
    local v
    v=$("$1" --version 2>/dev/null | awk '/^Version:/ {print $2; exit}')
    [[ -n $v ]] || return 1
    printf '%s\n' "$v"
}
