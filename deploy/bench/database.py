"""`make bench-db`: what a database's volume costs inside the freeze, changed blocks against
whole files.

MariaDB (the image tests/lab/test_database.py builds) runs with its data directory on a
volume, sysbench's oltp_read_write and the ledger client working on it from outside, and
moves back and forth between two lab hosts by stop-and-copy. The moves alternate between the
two ways a changed file travels after the freeze — `--whole-files` (the baseline, as before
block deltas) and its changed blocks — in the same run, under the same load, several samples
each. Per move: the freeze the clients felt (from the record: frozen until the network
opened), the volume's part of it, and the bytes that part sent. At the end the clients' own
checks: no error, no reconnect, every acknowledged ledger row present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy.bench.run import FERRY, git_revision, machine
from deploy.bench.stats import freeze_window
from deploy.mariadb import clients
from deploy.mariadb.image import build_image

NAME, VOLUME = "db", "dbdata"
MODES = ("whole files", "changed blocks")
MOVE_BUDGET_S = 40  # the load must outlast every move: this much per move, and a margin


def ferry(lab: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY, *args], env={**os.environ, "FERRY_LAB": lab}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def say(text: str) -> None:
    print(f"bench-db: {text}", file=sys.stderr, flush=True)


def _checked(done: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if done.returncode != 0:
        raise SystemExit(f"bench-db: {what} failed: {done.stderr.strip()[-2000:]}")
    return done


def move(lab: str, destination: str, mode: str) -> dict[str, Any]:
    extra = ["--whole-files"] if mode == MODES[0] else []
    done = _checked(
        ferry(lab, "migrate", NAME, "--to", destination, "--strategy", "stop-and-copy",
              *extra, "--json"),
        f"the move to {destination} ({mode})",
    )  # fmt: skip
    record = json.loads(done.stdout)
    if record["state"] != "completed":
        raise SystemExit(f"bench-db: the move ended {record['state']}: {record.get('error')}")
    window = freeze_window(record)
    transfer = record["results"]["transfer"]
    return {
        "mode": mode,
        "to": destination,
        "id": record["id"],
        "freeze_ms": round(window.ms) if window else None,
        "volume_ms": transfer["volume_ms"],
        "volume_bytes": transfer["volume_bytes"],
        "transfer_bytes": transfer["transfer_bytes"],
    }


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def table(rows: list[dict[str, Any]], checks: dict[str, Any]) -> str:
    lines = [
        "MariaDB on a volume, moved by stop-and-copy under sysbench oltp_read_write (4 threads)",
        "and a ledger client; median over the samples (each sample: every mode once).",
        "",
        f"{'after the freeze':<16} {'samples':>7} {'freeze ms':>10} {'volume ms':>10}"
        f" {'volume MB':>10}  freezes (ms)",
    ]
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        freeze, volume_ms = _median(mine, "freeze_ms"), _median(mine, "volume_ms")
        volume_mb = (_median(mine, "volume_bytes") or 0) / 1e6
        lines.append(
            f"{mode:<16} {len(mine):>7} {freeze or 0:>10.0f} {volume_ms or 0:>10.0f}"
            f" {volume_mb:>10.1f}  {[r['freeze_ms'] for r in mine]}"
        )
    lines += ["", "clients: " + ", ".join(f"{k} {v}" for k, v in checks.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.bench.database")
    parser.add_argument("--samples", type=int, default=3, help="moves per mode")
    parser.add_argument("--lab", default=os.environ.get("FERRY_LAB", "benchdb"))
    parser.add_argument("--json", type=Path, default=Path("bench/database.json"))
    parser.add_argument("--table", type=Path, default=Path("bench/database-table.txt"))
    args = parser.parse_args(argv)
    lab = args.lab
    work = Path(tempfile.mkdtemp(prefix="bench-db-"))
    say(f"lab {lab} up, MariaDB image built")
    _checked(ferry(lab, "lab", "up", "--hosts", "2", timeout=300), "lab up")
    try:
        image = build_image(work / "image")
        _checked(ferry(lab, "image", "import", str(image), "--name", "mariadb"), "import")
        run = _checked(
            ferry(lab, "container", "run", "--host", "h1", "--name", NAME, "--image", "mariadb",
                  "--volume", f"{VOLUME}:/var/lib/mysql"),
            "container run",
        )  # fmt: skip
        ip = run.stdout.strip().splitlines()[-1]
        clients.wait_ready(ip)
        clients.prepare(ip)
        moves = 2 * args.samples
        load = clients.start(ip, moves * MOVE_BUDGET_S + 30, work)
        time.sleep(10)  # the load settles: the buffer pool and redo log are busy
        rows, where = [], "h1"
        for sample in range(args.samples):
            order = MODES if sample % 2 == 0 else MODES[::-1]  # alternate which goes first
            for mode in order:
                where = "h2" if where == "h1" else "h1"
                rows.append(move(lab, where, mode))
                say(f"sample {sample + 1}, {mode}: {rows[-1]}")
                time.sleep(3)
        if not load.running():
            raise SystemExit("bench-db: the load ended before the last move")
        result = clients.finish(load, timeout=moves * MOVE_BUDGET_S + 120)
        missing = set(result.acked) - clients.ledger_rows(ip)
        checks = {
            "sysbench_status": result.oltp_status,
            "ledger_status": result.ledger_status,
            "reconnects": result.reconnects,
            "transactions": result.transactions,
            "acked_rows": len(result.acked),
            "acked_rows_missing": len(missing),
            "longest_sysbench_latency_ms": result.max_latency_ms,
        }
        report = {"machine": machine(), "git": git_revision(), "moves": rows, "clients": checks}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        text = table(rows, checks)
        args.table.write_text(text)
        print(text, end="")
        ok = result.oltp_status == 0 and result.ledger_status == 0 and not missing
        return 0 if ok and result.reconnects == 0 else 1
    finally:
        ferry(lab, "lab", "down", timeout=300)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
