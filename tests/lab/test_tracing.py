"""One trace per migration, across every worker and host, readable with `ferry trace`."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.lab.layout import candidate_subnets
from tests.conftest import new_lab_name
from tests.support.cli import ferry
from tests.support.otlp import Receiver
from tests.support.workload import wait_until_serving

pytestmark = pytest.mark.lab
CONTROLLERS = {"c1", "c2"}  # the lab's fleet controllers: their spans name them as host

BUFFER_MIB = 16
STEPS = [
    "preflight", "prepare_destination", "presync_files", "dump", "transfer", "restore",
    "verify", "commit", "open_network", "clean_source",
]  # fmt: skip


def _free_subnet(lab: str) -> str:
    routes = json.loads(
        subprocess.run(["ip", "-j", "route"], capture_output=True, text=True).stdout
    )
    used = {r.get("dst") for r in routes}
    return str(next(s for s in candidate_subnets(lab) if str(s) not in used))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced_lab(lab_capable: None, receiver: Receiver) -> Iterator[str]:
    """Two hosts exporting OTLP to the test's receiver, with fault injection allowed."""
    name = new_lab_name()
    subnet = _free_subnet(name)
    gateway = subnet.rsplit(".", 1)[0] + ".1"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{gateway}:{receiver.port}"}
    up = ferry(
        name, "lab", "up", "--hosts", "2", "--allow-faults", "--subnet", subnet, env=env,
        timeout=180,
    )  # fmt: skip
    assert up.code == 0, up.stderr
    yield name
    assert ferry(name, "lab", "down", timeout=180).code == 0


@pytest.fixture(scope="module")
def app(traced_lab: str, rootfs: Path) -> str:
    run = ferry(
        traced_lab, "container", "run", "--host", "h1", "--name", "traced", "--rootfs",
        str(rootfs), "--", "/bin/memapp", "7000", str(BUFFER_MIB),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    wait_until_serving(ip)
    return ip


def _spans(lab: str, migration_id: str) -> list[dict[str, Any]]:
    return list(ferry(lab, "trace", migration_id, "--json", check=True).json())


def test_one_trace_links_every_step_on_every_host(traced_lab: str, app: str) -> None:
    moved = ferry(
        traced_lab, "migrate", "traced", "--to", "h2", "--strategy", "stop-and-copy", "--json",
        timeout=300,
    )  # fmt: skip
    assert moved.code == 0, moved.stderr
    record = moved.json()
    spans = _spans(traced_lab, record["id"])
    by_id = {s["span_id"]: s for s in spans}
    assert {s["trace_id"] for s in spans} == {record["trace_id"]}
    roots = [s for s in spans if s["parent_id"] is None]
    assert len(roots) == 1 and roots[0]["name"] == "migration traced"
    root = roots[0]
    assert root["status"] == "ok" and root["attributes"]["ferry.strategy"] == "stop-and-copy"
    for s in spans:
        assert set(s) >= {"trace_id", "span_id", "parent_id", "name", "host", "start", "end",
                          "status", "attributes", "events"}  # fmt: skip
        assert s["status"] in ("ok", "error", "unset")
        assert 1.7e18 < s["start"] <= s["end"], s
        if s is not root:
            assert s["parent_id"] in by_id, f"{s['name']} has a dangling parent"

    steps = {s["name"].removeprefix("step "): s for s in spans if s["name"].startswith("step ")}
    assert sorted(steps) == sorted(STEPS)
    expected_hosts = {s["name"]: s["host"] for s in record["steps"]}
    for name, span in steps.items():
        assert span["parent_id"] == root["span_id"], f"step {name} is not under the root"
        assert span["host"] == expected_hosts[name]
        assert span["attributes"]["ferry.migration_id"] == record["id"]
    # The hosts' spans, and the fleet controller's decision where it goes (c1 or c2).
    placed = [s for s in spans if s["name"] == "fleet.place"]
    assert len(placed) == 1 and placed[0]["host"] in CONTROLLERS, placed
    assert placed[0]["attributes"]["ferry.placement.host"] == record["destination"]
    assert {s["host"] for s in spans} - CONTROLLERS == {"h1", "h2"}

    dump = next(s for s in spans if s["name"] == "criu.dump")
    assert dump["parent_id"] == steps["dump"]["span_id"] and dump["host"] == "h1"
    assert dump["attributes"]["criu.criu_frozen_us"] > 0
    assert dump["attributes"]["criu.pages_written"] >= BUFFER_MIB * 2**20 // 4096
    restore = next(s for s in spans if s["name"] == "criu.restore")
    assert restore["host"] == "h2" and restore["attributes"]["criu.restore_time_us"] > 0
    for child in ("criu.page_server", "fs.sync", "network.hold", "network.cutover"):
        assert any(s["name"] == child for s in spans), child


def test_a_failed_restore_shows_the_step_host_error_criu_log_and_compensation(
    traced_lab: str, app: str
) -> None:
    placed = {c["name"]: c for c in ferry(traced_lab, "containers", "--json", check=True).json()}
    here = placed["traced"]["host"]
    there = "h2" if here == "h1" else "h1"
    failed = ferry(
        traced_lab, "migrate", "traced", "--to", there, "--inject-fault", "restore", "--json",
        timeout=300,
    )  # fmt: skip
    assert failed.code == 1
    record = failed.json()
    assert record["state"] == "rolled_back"

    text = ferry(traced_lab, "trace", record["id"], check=True).stdout
    lines = text.splitlines()
    failing = next(i for i, line in enumerate(lines) if "step restore" in line)
    assert there in lines[failing] and "error" in lines[failing]
    assert "restore of traced failed" in text
    assert "Magic doesn't match for inventory.img" in text, "CRIU's own log line is missing"
    after = "\n".join(lines[failing:])
    for compensation in (
        "stop_destination",
        "resume_source",
        "forget_presync",
        "discard_destination",
    ):
        assert f"compensate {compensation}" in after

    spans = _spans(traced_lab, record["id"])
    step = next(s for s in spans if s["name"] == "step restore")
    assert step["status"] == "error" and step["attributes"]["ferry.retryable"] is False
    criu_restore = next(
        s for s in spans if s["name"] == "criu.restore" and s["parent_id"] == step["span_id"]
    )
    assert any(e["name"] == "criu.log" for e in criu_restore["events"])
    compensations = [s for s in spans if s["name"].startswith("compensate ")]
    assert len(compensations) == 4
    assert all(c["start"] >= step["end"] for c in compensations)

    listed = ferry(traced_lab, "trace", "--failed", "--json", check=True).json()
    mine = next(f for f in listed if f["id"] == record["id"])
    assert (mine["failed_step"], mine["failed_host"]) == ("restore", there)


def test_an_otlp_receiver_gets_the_spans_and_metrics(traced_lab: str, receiver: Receiver) -> None:
    records = ferry(traced_lab, "status", "--json", check=True).json()
    assert records, "the tests above ran migrations"
    wanted = {r["trace_id"] for r in records}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with receiver.received.lock:
            got = {t for t, _, _ in receiver.received.spans}
            names = {n for _, n, _ in receiver.received.spans}
            hosts = {h for _, _, h in receiver.received.spans}
            metrics = set(receiver.received.metrics)
        if wanted <= got and "ferry.migrations" in metrics:
            break
        time.sleep(0.5)
    assert wanted <= got, f"missing traces {wanted - got}"
    assert "migration traced" in names and "criu.dump" in names
    assert hosts - CONTROLLERS == {"h1", "h2"}
    assert {"ferry.migrations", "ferry.migration.freeze", "ferry.migration.bytes"} <= metrics
