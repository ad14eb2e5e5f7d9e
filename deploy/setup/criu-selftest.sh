#!/usr/bin/env bash
# CRIU self-test: dump and restore a real process that holds TCP sockets.
#
#   criu-selftest.sh CRIU_BIN DIR
#
# A small Python server runs in a fresh network namespace (`unshare -n`, so nothing of the
# host's network is touched or locked). It listens on 127.0.0.1 and holds one *established*
# TCP connection to itself. Each "ping" on a new connection sends a message over the
# established pair and answers "pong N pair-ok" (N counts pings: it lives in the memory).
# We ping once, `criu dump --tcp-established` it (which kills it), restore it detached with
# `criu restore -d --tcp-established`, and ping again: it must answer "pong 2 pair-ok".
# The images stay in DIR/dump (setup decodes DIR/dump/stats-dump with pycriu later).
set -euo pipefail

CRIU=${1:?usage: criu-selftest.sh CRIU_BIN DIR}
DIR=${2:?usage: criu-selftest.sh CRIU_BIN DIR}
PY=/usr/bin/python3
IMG=$DIR/dump
pid=""

fail() {
    printf 'setup: criu self-test: %s\n' "$*" >&2
    local f
    for f in "$IMG/dump.log" "$IMG/restore.log"; do
        [[ -s $f ]] || continue
        printf 'setup: last lines of %s:\n' "$f" >&2
        grep -E 'Error|error|Warn' "$f" | tail -n 15 | sed 's/^/    /' >&2 || true
        tail -n 5 "$f" | sed 's/^/    /' >&2
    done
    exit 1
}

cleanup() {
    # Only the server this script started (or its restored copy, same PID).
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
}
trap cleanup EXIT

alive() { # not gone and not a zombie
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

ping_server() { # prints the server's answer
    timeout 10 nsenter -t "$pid" -n "$PY" -I -c '
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    s.sendall(b"ping\n")
    print(s.makefile().readline().strip())
' "$port"
}

[[ -x $PY ]] || fail "$PY is missing (apt-get install python3)"
rm -rf "$DIR"
mkdir -p "$IMG"

cat >"$DIR/server.py" <<'EOF'
import os, socket, sys

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(8)
port = srv.getsockname()[1]
a = socket.create_connection(("127.0.0.1", port))  # an established connection, kept open
b, _ = srv.accept()
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write("%d %d\n" % (os.getpid(), port))
os.rename(tmp, sys.argv[1])
count = 0
while True:
    conn, _ = srv.accept()
    try:
        conn.settimeout(5)
        if conn.recv(64).strip() == b"ping":
            count += 1
            msg = b"hello %d" % count
            a.sendall(msg)
            got = b.recv(64)
            conn.sendall(b"pong %d %s\n" % (count, b"pair-ok" if got == msg else b"pair-bad"))
    except OSError:
        pass
    finally:
        conn.close()
EOF

# Detached: own session, no terminal, stdio on /dev/null, lo up in a fresh netns.
# shellcheck disable=SC2016 # $0.. expand in the inner sh
setsid unshare -n -- sh -c 'ip link set lo up && exec "$0" -I "$1" "$2"' \
    "$PY" "$DIR/server.py" "$DIR/server.info" </dev/null >/dev/null 2>&1 &
starter=$!
disown "$starter" # no "Killed" job notice when criu dump kills it; bash still reaps it
for _ in $(seq 100); do
    [[ -s $DIR/server.info ]] && break
    sleep 0.05
done
[[ -s $DIR/server.info ]] || fail "the test server did not start"
read -r pid port <"$DIR/server.info"
[[ $pid == "$starter" ]] || fail "unexpected server pid $pid (started $starter)"

out=$(ping_server) || fail "the test server does not answer before the dump"
[[ $out == "pong 1 pair-ok" ]] || fail "unexpected answer before the dump: '$out'"

timeout 120 "$CRIU" dump -t "$pid" -D "$IMG" --tcp-established -v4 -o dump.log \
    || fail "criu dump -t $pid --tcp-established failed"
for _ in $(seq 100); do # until bash has reaped it: its PID must be free for the restore
    [[ -e /proc/$pid ]] || break
    sleep 0.02
done
[[ -e /proc/$pid ]] && fail "the dumped process $pid is still there ($(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null))"
[[ -s $IMG/stats-dump ]] || fail "criu dump wrote no stats-dump"

timeout 120 "$CRIU" restore -d -D "$IMG" --tcp-established -v4 -o restore.log \
    --pidfile "$DIR/restored.pid" || fail "criu restore -d --tcp-established failed"
[[ $(cat "$DIR/restored.pid") == "$pid" ]] || fail "restored pid $(cat "$DIR/restored.pid") != $pid"
alive "$pid" || fail "the restored process $pid is not running"

out=$(ping_server) || fail "the restored process does not answer"
[[ $out == "pong 2 pair-ok" ]] || fail "unexpected answer after the restore: '$out' (want 'pong 2 pair-ok')"
