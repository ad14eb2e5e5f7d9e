"""Plain TCP between two host namespaces: the baseline's image copy and the raw-rate yardstick.

Run inside a host with `nsenter` (never `ip netns exec`, machine facts F9):

    python -m deploy.bench.tcpcopy recv ADDR PORT (--extract DIR | --discard)
    python -m deploy.bench.tcpcopy send ADDR PORT (--tar DIR | --bytes N)

`recv` prints `listening` once it accepts connections, takes one connection, and prints a
JSON line {"bytes", "seconds"} after the sender closed. `send` measures from connect until the
receiver confirmed the last byte, and prints the same JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from typing import IO

CHUNK = 4 << 20
ACK = b"k"
ACCEPT_TIMEOUT_S = 120.0


def receive(address: str, port: int, sink: IO[bytes] | None) -> tuple[int, float]:
    """Serve one connection; write what arrives to `sink` (or drop it). Returns bytes, s."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(1)
        listener.settimeout(ACCEPT_TIMEOUT_S)
        print("listening", flush=True)
        conn, _ = listener.accept()
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
        conn.sendall(ACK)
        return total, time.perf_counter() - started


def send(address: str, port: int, source: IO[bytes] | None, count: int) -> tuple[int, float]:
    """Send `source` to its end (or `count` bytes from memory); wait for the receiver's ack."""
    started = time.perf_counter()
    with socket.create_connection((address, port), timeout=30) as conn:
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
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(1) != ACK:
            raise ConnectionError("the receiver did not confirm the copy")
    return total, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    recv = sub.add_parser("recv")
    recv.add_argument("address")
    recv.add_argument("port", type=int)
    recv_what = recv.add_mutually_exclusive_group(required=True)
    recv_what.add_argument("--extract", metavar="DIR", help="untar what arrives into DIR")
    recv_what.add_argument("--discard", action="store_true")
    snd = sub.add_parser("send")
    snd.add_argument("address")
    snd.add_argument("port", type=int)
    snd_what = snd.add_mutually_exclusive_group(required=True)
    snd_what.add_argument("--tar", metavar="DIR", help="send a tar stream of DIR's contents")
    snd_what.add_argument("--bytes", type=int, help="send this many bytes from memory")
    args = parser.parse_args(argv)

    if args.mode == "recv":
        if args.discard:
            total, seconds = receive(args.address, args.port, None)
        else:
            tar = subprocess.Popen(["tar", "-x", "-C", args.extract], stdin=subprocess.PIPE)
            assert tar.stdin is not None
            try:
                total, seconds = receive(args.address, args.port, tar.stdin)
            finally:
                tar.stdin.close()
            if tar.wait() != 0:
                print(f"tar -x exited {tar.returncode}", file=sys.stderr)
                return 1
    elif args.tar:
        tar = subprocess.Popen(["tar", "-c", "-C", args.tar, "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        total, seconds = send(args.address, args.port, tar.stdout, 0)
        if tar.wait() != 0:
            print(f"tar -c exited {tar.returncode}", file=sys.stderr)
            return 1
    else:
        total, seconds = send(args.address, args.port, None, args.bytes)
    print(json.dumps({"bytes": total, "seconds": round(seconds, 6)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
