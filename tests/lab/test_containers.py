"""Real runc containers on the lab's hosts: isolated, addressable, removable without a trace."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import ferry
from tests.support.inventory import host_links, host_mounts
from tests.support.workload import query, query_from_netns, wait_until_serving

pytestmark = pytest.mark.lab


def _runc_state(lab: str, host: str, name: str) -> dict[str, Any]:
    root = f"/var/lib/ferry-lab/{lab}/hosts/{host}/runc"
    out = subprocess.run(["runc", "--root", root, "state", name], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _in_container_netns(pid: int, *argv: str) -> Any:
    out = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", *argv],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_a_container_keeps_its_state_in_memory_and_answers_everywhere(
    lab2: str, rootfs: Path
) -> None:
    run = ferry(
        lab2,
        "container",
        "run",
        "--host",
        "h1",
        "--name",
        "mem",
        "--rootfs",
        str(rootfs),
        "--memory",
        "64",
        "--",
        "/bin/memapp",
        "7000",
        "8",
    )
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]

    first = wait_until_serving(ip)
    assert first["pid"] == 1, "the workload must be PID 1 of its own PID namespace"
    assert first["buffer_ok"] is True and first["buffer_mib"] == 8
    time.sleep(0.5)
    from_h2 = query_from_netns(f"{lab2}-h2", ip)
    assert from_h2["token"] == first["token"]
    assert from_h2["ticks"] > first["ticks"]
    assert from_h2["requests"] == first["requests"] + 1

    listed = ferry(lab2, "containers", "--json", check=True).json()
    assert {"name": "mem", "host": "h1", "ip": ip, "state": "running"} in listed

    state = _runc_state(lab2, "h1", "mem")
    assert state["status"] == "running"
    pid = state["pid"]
    links = {link["ifname"]: link for link in _in_container_netns(pid, "link", "show")}
    assert "UP" in links["lo"]["flags"] and "UP" in links["eth0"]["flags"]
    routes = _in_container_netns(pid, "route", "show")
    assert any(r["dst"] == "default" for r in routes)
    for ns in ("pid", "uts", "ipc", "mnt", "net"):
        ours = Path(f"/proc/self/ns/{ns}").stat().st_ino
        assert Path(f"/proc/{pid}/ns/{ns}").stat().st_ino != ours, f"{ns} namespace is shared"
    # The host's end of the veth lives inside the host's namespace, not the root one.
    assert any(link.startswith("vf") for link in host_links(lab2, "h1"))
    # stdio is what CRIU can dump: stdin /dev/null, stdout and stderr one pipe, whose
    # reader is the host's logger (no host file, no socket).
    assert Path(f"/proc/{pid}/fd/0").resolve() == Path("/dev/null")
    pipe = os.readlink(f"/proc/{pid}/fd/1")
    assert pipe.startswith("pipe:[") and os.readlink(f"/proc/{pid}/fd/2") == pipe

    rm = ferry(lab2, "container", "rm", "mem")
    assert rm.code == 0, rm.stderr
    assert all(c["name"] != "mem" for c in ferry(lab2, "containers", "--json", check=True).json())
    runc_list = subprocess.run(
        ["runc", "--root", f"/var/lib/ferry-lab/{lab2}/hosts/h1/runc", "list", "-q"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "mem" not in runc_list
    assert not any(link.startswith("vf") for link in host_links(lab2, "h1"))
    assert not [m for m in host_mounts(lab2, "h1") if "/containers/mem" in m or "/netns/mem" in m]
    assert not (Path(f"/var/lib/ferry-lab/{lab2}/hosts/h1/containers/mem")).exists()
    with pytest.raises(OSError):
        query(ip, timeout=1.0)


def test_bad_arguments_exit_2_and_change_nothing(lab2: str, rootfs: Path, tmp_path: Path) -> None:
    keep = ferry(
        lab2,
        "container",
        "run",
        "--host",
        "h2",
        "--name",
        "keep",
        "--rootfs",
        str(rootfs),
        "--",
        "/bin/memapp",
        "7000",
    )
    assert keep.code == 0, keep.stderr
    before = ferry(lab2, "containers", "--json", check=True).json()
    state_before = sorted(
        p.name for p in Path(f"/var/lib/ferry-lab/{lab2}/hosts").glob("*/containers/*")
    )

    run = ["container", "run", "--rootfs", str(rootfs)]
    cases = {
        "--host": [*run, "--host", "h9", "--name", "x", "--", "/bin/memapp", "7000"],
        "--name": [*run, "--host", "h1", "--name", "keep", "--", "/bin/memapp", "7000"],
        "--rootfs": [
            "container",
            "run",
            "--host",
            "h1",
            "--name",
            "x",
            "--rootfs",
            str(tmp_path / "missing"),
            "--",
            "/bin/memapp",
        ],
        "CMD": [*run, "--host", "h1", "--name", "x", "--"],
        "--memory": [*run, "--host", "h1", "--name", "x", "--memory", "zero", "--", "/bin/sh"],
        "NAME": ["container", "rm", "nosuch"],
    }
    for argument, argv in cases.items():
        got = ferry(lab2, *argv)
        assert got.code == 2, (argument, got.stderr)
        lines = got.stderr.strip().splitlines()
        assert len(lines) == 1 and argument in lines[0], (argument, got.stderr)
    bad_name = ferry(lab2, *run, "--host", "h1", "--name", "Bad Name!", "--", "/bin/sh")
    assert bad_name.code == 2 and "--name" in bad_name.stderr

    assert ferry(lab2, "containers", "--json", check=True).json() == before
    state_after = sorted(
        p.name for p in Path(f"/var/lib/ferry-lab/{lab2}/hosts").glob("*/containers/*")
    )
    assert state_after == state_before
    assert ferry(lab2, "container", "rm", "keep").code == 0


def test_criu_can_checkpoint_a_lab_container(lab2: str, rootfs: Path) -> None:
    """The container is built for migration: CRIU dumps it (stdio, netns, mounts all pass)."""
    run = ferry(
        lab2,
        "container",
        "run",
        "--host",
        "h2",
        "--name",
        "dumpable",
        "--rootfs",
        str(rootfs),
        "--",
        "/bin/memapp",
        "7000",
        "4",
    )
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    before = wait_until_serving(ip)
    on_h2 = [
        "nsenter",
        f"--net=/run/netns/{lab2}-h2",
        f"--mount=/run/ferry-lab/{lab2}/mnt/h2",
        "--",
    ]
    images = "/var/lib/ferry/test-checkpoint"
    subprocess.run([*on_h2, "mkdir", "-p", images], check=True)
    dump = subprocess.run(
        [
            *on_h2,
            "runc",
            "--root",
            "/var/lib/ferry/runc",
            "--criu",
            "/usr/local/sbin/criu",
            "checkpoint",
            "--leave-running",
            "--image-path",
            images,
            "--work-path",
            images,
            "dumpable",
        ],
        capture_output=True,
        text=True,
    )
    dump_log = Path(f"/var/lib/ferry-lab/{lab2}/hosts/h2/test-checkpoint/dump.log")
    assert dump.returncode == 0, dump_log.read_text()[-2000:]
    assert "Dumping finished successfully" in dump_log.read_text()
    after = query(ip)
    assert after["token"] == before["token"] and after["buffer_ok"] is True
    subprocess.run([*on_h2, "rm", "-rf", images], check=True)
    assert ferry(lab2, "container", "rm", "dumpable").code == 0


# Each turn writes one line to stdout and one to stderr: both reach the one log, in order.
TICKER = 'i=0; while :; do echo "tick $i"; echo "err $i" >&2; i=$((i+1)); sleep 0.05; done'
CHATTY = "while :; do echo 'chatter 0123456789012345678901234567890123456789'; done"
LOG_SWEEPS = 100  # polls of the log, LOG_POLL_S apart, for lines to appear
LOG_POLL_S = 0.1


def _log(lab: str, name: str, *flags: str) -> list[str]:
    done = ferry(lab, "container", "logs", name, *flags)
    assert done.code == 0, done.stderr
    return done.stdout.splitlines()


def _ticks(lines: list[str]) -> int:
    """How many whole turns the log holds, checking that they are all there, in order."""
    expected = [f"{kind} {i}" for i in range(len(lines) // 2) for kind in ("tick", "err")]
    assert lines[: len(expected)] == expected, lines[:10]
    return len(expected) // 2


def _wait_ticks(lab: str, name: str, at_least: int) -> int:
    for _ in range(LOG_SWEEPS):
        ticks = _ticks(_log(lab, name))
        if ticks >= at_least:
            return ticks
        time.sleep(LOG_POLL_S)
    raise AssertionError(f"{name}'s log never reached {at_least} turns")


def test_the_log_holds_lines_from_before_and_after_a_move_in_order(lab2: str, rootfs: Path) -> None:
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "ticker", "--rootfs", str(rootfs),
        "--", "/bin/sh", "-c", TICKER,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    before = _wait_ticks(lab2, "ticker", 20)
    moved = ferry(lab2, "migrate", "ticker", "--to", "h2", "--json", timeout=300)
    assert moved.code == 0 and moved.json()["state"] == "completed", moved.stderr
    after = _wait_ticks(lab2, "ticker", before + 20)  # read from h2 now: one log
    assert after > before + 20
    h2_log = Path(f"/var/lib/ferry-lab/{lab2}/hosts/h2/containers/ticker/log/current")
    assert h2_log.is_file(), "the log lives where the container runs"
    assert not Path(f"/var/lib/ferry-lab/{lab2}/hosts/h1/containers/ticker").exists()
    tail = _log(lab2, "ticker", "--tail", "4")
    assert len(tail) == 4 and tail[0].startswith("tick ") and tail[1].startswith("err ")
    stamped = _log(lab2, "ticker", "--tail", "1", "--timestamps")[0]
    stamp, _, text = stamped.partition(" ")
    assert (
        stamp.startswith("20") and stamp.endswith("+00:00") and text.split()[0] in ("tick", "err")
    )
    assert ferry(lab2, "container", "rm", "ticker").code == 0


def test_a_chatty_container_s_log_stays_within_its_cap(lab2: str, rootfs: Path) -> None:
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "chatty", "--rootfs", str(rootfs),
        "--", "/bin/sh", "-c", CHATTY,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    log_dir = Path(f"/var/lib/ferry-lab/{lab2}/hosts/h1/containers/chatty/log")
    cap_files, cap_bytes = 4, 1 << 20  # the hosts' defaults (log_files, log_file_bytes)
    for _ in range(LOG_SWEEPS * 3):  # until it rotated past its cap: old files removed
        rotated = sorted(p.name for p in log_dir.glob("@*"))
        if len(rotated) >= cap_files - 1 and (log_dir / "current").stat().st_size > 0:
            break
        time.sleep(LOG_POLL_S)
    time.sleep(1.0)  # one more second of chatter past the cap
    files = [p for p in log_dir.iterdir() if p.name == "current" or p.name.startswith("@")]
    assert len(files) <= cap_files
    assert all(p.stat().st_size <= cap_bytes for p in files)
    tail = _log(lab2, "chatty", "--tail", "3")
    assert tail == ["chatter 0123456789012345678901234567890123456789"] * 3
    assert ferry(lab2, "container", "rm", "chatty").code == 0
