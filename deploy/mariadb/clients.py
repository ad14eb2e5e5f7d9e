"""Real clients of the MariaDB container: sysbench's oltp_read_write, a ledger client (sysbench
running ledger.lua) and mariadb-check, all from Debian's packages, all over TCP from outside.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.mariadb.image import DATABASE, PASSWORD, PORT, USER

LEDGER_SCRIPT = Path(__file__).resolve().parent / "ledger.lua"
TABLES, TABLE_SIZE = 2, 2000
# What oltp_read_write retries by design: four connections on two tables deadlock now and
# then (1213), or wait out a lock (1205, 1020). Any other error ends sysbench with a failure.
RETRIED_BY_DESIGN = "1213,1205,1020"


def _connection(ip: str) -> list[str]:
    return [
        "--db-driver=mysql", f"--mysql-host={ip}", f"--mysql-port={PORT}",
        f"--mysql-user={USER}", f"--mysql-password={PASSWORD}", f"--mysql-db={DATABASE}",
    ]  # fmt: skip


def _client(ip: str) -> list[str]:
    return [f"--host={ip}", f"--port={PORT}", f"--user={USER}", f"--password={PASSWORD}"]


def wait_ready(ip: str, timeout: float = 60.0) -> None:
    """Until the server answers a ping over TCP (it starts in about a second)."""
    deadline = time.monotonic() + timeout
    while True:
        ping = subprocess.run(
            ["mariadb-admin", *_client(ip), "--connect-timeout=2", "ping"],
            capture_output=True, text=True,
        )  # fmt: skip
        if ping.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"MariaDB at {ip}:{PORT} never answered: {ping.stderr.strip()}")
        time.sleep(0.5)


def prepare(ip: str) -> None:
    """sysbench's tables and the ledger's table."""
    for workload in ("oltp_read_write", str(LEDGER_SCRIPT)):
        subprocess.run(
            ["sysbench", workload, *_connection(ip), f"--tables={TABLES}",
             f"--table-size={TABLE_SIZE}", "prepare"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip


@dataclass
class Load:
    oltp: subprocess.Popen[str]
    ledger: subprocess.Popen[str]
    oltp_out: Path
    ledger_out: Path

    def running(self) -> bool:
        return self.oltp.poll() is None and self.ledger.poll() is None


@dataclass(frozen=True)
class LoadResult:
    oltp_status: int
    ledger_status: int
    transactions: int
    retried: int  # deadlocks and lock waits sysbench retried (RETRIED_BY_DESIGN)
    reconnects: int
    max_latency_ms: float
    acked: tuple[int, ...]  # the ledger's inserts the server acknowledged
    oltp_log: str
    ledger_log: str


def start(ip: str, seconds: int, out: Path, threads: int = 4, ledger_rate: int = 20) -> Load:
    """sysbench with `threads` connections and the ledger beside it, for `seconds`."""
    out.mkdir(parents=True, exist_ok=True)
    oltp_out, ledger_out = out / "oltp.log", out / "ledger.log"
    common = [*_connection(ip), f"--time={seconds}", f"--tables={TABLES}"]
    oltp = subprocess.Popen(
        ["sysbench", "oltp_read_write", *common, f"--table-size={TABLE_SIZE}",
         f"--threads={threads}", f"--mysql-ignore-errors={RETRIED_BY_DESIGN}",
         "--report-interval=1", "run"],
        stdout=oltp_out.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ledger = subprocess.Popen(
        ["sysbench", str(LEDGER_SCRIPT), *common, "--threads=1", f"--rate={ledger_rate}", "run"],
        stdout=ledger_out.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return Load(oltp, ledger, oltp_out, ledger_out)


def finish(load: Load, timeout: float) -> LoadResult:
    oltp_status = load.oltp.wait(timeout)
    ledger_status = load.ledger.wait(timeout)
    oltp_log, ledger_log = load.oltp_out.read_text(), load.ledger_out.read_text()
    return LoadResult(
        oltp_status=oltp_status,
        ledger_status=ledger_status,
        transactions=_count(oltp_log, "transactions"),
        retried=_count(oltp_log, "ignored errors"),
        reconnects=_count(oltp_log, "reconnects"),
        max_latency_ms=_max_latency(oltp_log),
        acked=tuple(int(n) for n in re.findall(r"^acked (\d+)$", ledger_log, re.M)),
        oltp_log=oltp_log,
        ledger_log=ledger_log,
    )


def _count(log: str, what: str) -> int:
    found = re.search(rf"^\s*{what}:\s+(\d+)", log, re.M)
    return int(found.group(1)) if found else -1


def _max_latency(log: str) -> float:
    found = re.search(r"^\s*max:\s+([\d.]+)", log, re.M)
    return float(found.group(1)) if found else -1.0


def ledger_rows(ip: str) -> set[int]:
    listed = subprocess.run(
        ["mariadb", *_client(ip), "--batch", "--skip-column-names", DATABASE,
         "--execute=SELECT seq FROM ledger"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {int(line) for line in listed.stdout.split()}


def check_tables(ip: str) -> subprocess.CompletedProcess[str]:
    """mariadb-check over every table of the database (CHECK TABLE, extended)."""
    return subprocess.run(
        ["mariadb-check", *_client(ip), "--extended", "--databases", DATABASE],
        capture_output=True, text=True,
    )  # fmt: skip
