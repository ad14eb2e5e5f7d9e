"""A real database moves under a real benchmark: MariaDB from Debian's packages, built into an
OCI image here (mmdebstrap, umoci), imported, run as its own user with its data directory on
a named volume, moved h1 -> h2 -> h1 while sysbench's oltp_read_write and a ledger client
work on it over TCP from outside. The volume is on exactly one host after each move (seen on
the hosts' disks), and what it cost inside the freeze is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.mariadb import clients
from deploy.mariadb.image import UID, build_image
from tests.support.cli import ferry
from tests.support.lab_checks import runc_pid

pytestmark = pytest.mark.lab

NAME = "db"
VOLUME = "dbdata"
DATADIR = "/var/lib/mysql"
LOAD_S = 45  # long enough for both moves (about 10 s each here) while the clients work


@pytest.fixture(scope="module")
def mariadb_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_image(tmp_path_factory.mktemp("mariadb"))


def _server_uid(lab: str, host: str) -> str:
    status = Path(f"/proc/{runc_pid(lab, host, NAME)}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))


def _holders(lab: str, hosts: tuple[str, ...] = ("h1", "h2")) -> list[str]:
    """The hosts whose disk holds the volume (its data and its volume.json)."""
    root = Path(f"/var/lib/ferry-lab/{lab}/hosts")
    return [h for h in hosts if (root / h / "volumes" / VOLUME / "volume.json").is_file()]


def _volumes(lab: str) -> list[tuple[str, str, list[str]]]:
    """Which volumes `ferry volume ls` shows, where, used by whom (sizes change: it runs)."""
    return [
        (v["name"], v["host"], v["used_by"]) for v in ferry(lab, "volume", "ls", "--json").json()
    ]


def _refused_and_unchanged(lab: str, *argv: str) -> str:
    before = _volumes(lab), _holders(lab)
    done = ferry(lab, *argv)
    assert done.code == 2, (argv, done.code, done.stderr)
    assert (_volumes(lab), _holders(lab)) == before
    return done.stderr


def test_mariadb_moves_there_and_back_under_sysbench_and_loses_no_acknowledged_row(
    lab2: str, mariadb_image: Path, tmp_path: Path
) -> None:
    imported = ferry(lab2, "image", "import", str(mariadb_image), "--name", "mariadb", "--json")
    assert imported.code == 0, imported.stderr
    assert imported.json()["config"]["user"] == "mysql"
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", NAME, "--image", "mariadb",
        "--volume", f"{VOLUME}:{DATADIR}",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    clients.wait_ready(ip)
    assert _server_uid(lab2, "h1") == str(UID), "the server runs as its own user, not root"
    clients.prepare(ip)
    assert _holders(lab2) == ["h1"]
    # The data directory is the volume: the image's, copied in when the volume was made.
    data = Path(f"/var/lib/ferry-lab/{lab2}/hosts/h1/volumes/{VOLUME}/data")
    assert (data / "sbtest").is_dir() and data.stat().st_uid == UID

    # Bad input exits 2 and changes nothing: a volume in use, an unknown one, a path that
    # escapes, a volume another container holds.
    assert "in use by container db" in _refused_and_unchanged(lab2, "volume", "rm", VOLUME)
    assert "no volume named" in _refused_and_unchanged(lab2, "volume", "rm", "nosuch")
    for argv, said in (
        (("--volume", "other:/../etc"), "plain path"),
        (("--volume", f"{VOLUME}:/srv"), "in use by container db"),
    ):
        err = _refused_and_unchanged(
            lab2, "container", "run", "--host", "h2", "--name", "other", "--image", "mariadb",
            *argv,
        )  # fmt: skip
        assert said in err, err
    assert "other" not in ferry(lab2, "containers").stdout

    load = clients.start(ip, LOAD_S, tmp_path)
    records = []
    for destination in ("h2", "h1"):
        moved = ferry(
            lab2, "migrate", NAME, "--to", destination, "--strategy", "stop-and-copy",
            "--json", timeout=300,
        )  # fmt: skip
        assert moved.code == 0, moved.stderr
        records.append(moved.json())
        assert records[-1]["state"] == "completed", records[-1].get("error")
        assert load.running(), "both moves happen while the clients work"
        assert _holders(lab2) == [destination], "the volume is on exactly one host"
        assert _volumes(lab2) == [(VOLUME, destination, [NAME])]
    result = clients.finish(load, timeout=LOAD_S + 60)

    # Any error but a deadlock or lock wait (which it retries by design) stops sysbench.
    assert result.oltp_status == 0, result.oltp_log[-2000:]
    assert "FATAL" not in result.oltp_log + result.ledger_log
    assert result.reconnects == 0, result.oltp_log[-2000:]
    assert result.ledger_status == 0, result.ledger_log[-2000:]
    assert result.transactions > 0 and len(result.acked) > 0
    assert _server_uid(lab2, "h1") == str(UID)
    missing = set(result.acked) - clients.ledger_rows(ip)
    assert not missing, f"acknowledged inserts lost: {sorted(missing)[:20]}"
    checked = clients.check_tables(ip)
    assert checked.returncode == 0, checked.stderr
    verdicts = [line.split()[-1] for line in checked.stdout.splitlines() if line.strip()]
    assert verdicts and all(v == "OK" for v in verdicts), checked.stdout
    shares = [r["results"]["transfer"] for r in records]
    assert all(t["volume_bytes"] > 0 for t in shares), "the database wrote to its volume"
    print(
        f"mariadb: {result.transactions} transactions ({result.retried} deadlocks retried),"
        f" {len(result.acked)} ledger rows,"
        f" longest sysbench latency {result.max_latency_ms} ms,"
        f" freezes {[r['freeze_ms'] for r in records]} ms, of which the volume's delta"
        f" {[t['volume_ms'] for t in shares]} ms ({[t['volume_bytes'] for t in shares]} bytes)"
    )
    assert ferry(lab2, "container", "rm", NAME).code == 0
    assert _holders(lab2) == ["h1"], "a volume outlives its container"
    removed = ferry(lab2, "volume", "rm", VOLUME)
    assert removed.code == 0, removed.stderr
    assert _holders(lab2) == []
