"""Plain TCP between two host namespaces: the baseline's image copy and the raw-rate yardstick.

Run inside a host with `nsenter` (never `ip netns exec`, machine facts F9):

    python -m deploy.bench.tcpcopy recv ADDR PORT (--extract DIR | --discard) [--tls CA CERT KEY]
    python -m deploy.bench.tcpcopy send ADDR PORT (--tar DIR | --bytes N) [--tls CA CERT KEY]

`recv` prints `listening` once it accepts connections, takes one connection, and prints a
JSON line {"bytes", "seconds"} after the sender closed. `send` measures from connect until the
receiver confirmed the last byte, and prints the same JSON line. With `--tls` both sides
speak mutual TLS with the host's files, as Ferry's own transfers between hosts do.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from services.tls import TlsFiles

CHUNK = 4 << 20
ACK = b"k"
ACCEPT_TIMEOUT_S = 120.0


def receive(
    address: str, port: int, sink: IO[bytes] | None, tls: TlsFiles | None = None
) -> tuple[int, float]:
    """Serve one connection; write what arrives to `sink` (or drop it). Returns bytes, s."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(1)
        listener.settimeout(ACCEPT_TIMEOUT_S)
        print("listening", flush=True)
        conn, _ = listener.accept()
    if tls is not None:
        conn.settimeout(ACCEPT_TIMEOUT_S)
        conn = tls.server_context().wrap_socket(conn, server_side=True)
    with conn:
        conn.settimeout(None)
        started = time.perf_counter()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        total = 0
        while True:
            n = conn.recv_into(view)
            if n == 0:
                break
            total += n
            if sink is not None:
                sink.write(view[:n])
        if sink is not None:
            sink.flush()
        if isinstance(conn, ssl.SSLSocket):
            conn.unwrap()  # answers the sender's close_notify; the ack goes in the clear
        conn.sendall(ACK)
        return total, time.perf_counter() - started


def send(
    address: str, port: int, source: IO[bytes] | None, count: int, tls: TlsFiles | None = None
) -> tuple[int, float]:
    """Send `source` to its end (or `count` bytes from memory); wait for the receiver's ack."""
    started = time.perf_counter()
    with _connect(address, port, tls) as conn:
        conn.settimeout(None)
        total = 0
        if source is None:
            block = memoryview(bytes(CHUNK))
            while total < count:
                n = min(CHUNK, count - total)
                conn.sendall(block[:n])
                total += n
        else:
            while chunk := source.read(CHUNK):
                conn.sendall(chunk)
                total += len(chunk)
        if isinstance(conn, ssl.SSLSocket):
            conn.unwrap()  # the end of the data: close_notify both ways, then plain TCP
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(1) != ACK:
            raise ConnectionError("the receiver did not confirm the copy")
    return total, time.perf_counter() - started


def _connect(address: str, port: int, tls: TlsFiles | None) -> socket.socket:
    conn = socket.create_connection((address, port), timeout=30)
    if tls is None:
        return conn
    return tls.client_context().wrap_socket(conn)


def _tls(files: list[str] | None) -> TlsFiles | None:
    return TlsFiles(*(Path(f) for f in files)) if files else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    recv = sub.add_parser("recv")
    recv.add_argument("address")
    recv.add_argument("port", type=int)
    recv_what = recv.add_mutually_exclusive_group(required=True)
    recv_what.add_argument("--extract", metavar="DIR", help="untar what arrives into DIR")
    recv_what.add_argument("--discard", action="store_true")
    recv.add_argument("--tls", nargs=3, metavar=("CA", "CERT", "KEY"))
    snd = sub.add_parser("send")
    snd.add_argument("address")
    snd.add_argument("port", type=int)
    snd_what = snd.add_mutually_exclusive_group(required=True)
    snd_what.add_argument("--tar", metavar="DIR", help="send a tar stream of DIR's contents")
    snd_what.add_argument("--bytes", type=int, help="send this many bytes from memory")
    snd.add_argument("--tls", nargs=3, metavar=("CA", "CERT", "KEY"))
    args = parser.parse_args(argv)

    if args.mode == "recv":
        if args.discard:
            total, seconds = receive(args.address, args.port, None, _tls(args.tls))
        else:
            tar = subprocess.Popen(["tar", "-x", "-C", args.extract], stdin=subprocess.PIPE)
            assert tar.stdin is not None
            try:
                total, seconds = receive(args.address, args.port, tar.stdin, _tls(args.tls))
            finally:
                tar.stdin.close()
            if tar.wait() != 0:
                print(f"tar -x exited {tar.returncode}", file=sys.stderr)
                return 1
    elif args.tar:
        tar = subprocess.Popen(["tar", "-c", "-C", args.tar, "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        total, seconds = send(args.address, args.port, tar.stdout, 0, _tls(args.tls))
        if tar.wait() != 0:
            print(f"tar -c exited {tar.returncode}", file=sys.stderr)
            return 1
    else:
        total, seconds = send(args.address, args.port, None, args.bytes, _tls(args.tls))
    print(json.dumps({"bytes": total, "seconds": round(seconds, 6)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
