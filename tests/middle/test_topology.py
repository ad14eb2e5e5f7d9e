"""The topology is made once, by an operator's bootstrap: a worker or the CLI that finds it
missing refuses and says why, and never creates it (a lost store must not come back empty)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nats.js.api import KeyValueConfig

from schemas import subjects
from schemas.v2.ledger import LedgerReport, ReadLedger
from services import bus, topology
from services.errors import TopologyMissing, Unavailable
from tests.support.cli import FERRY, Result
from tests.support.natsserver import NatsServer

WORKER_READY_S = 20.0


def ferry_on(url: str, *args: str) -> Result:
    env = {k: v for k, v in os.environ.items() if k not in ("FERRY_LAB", "FERRY_CONTEXT")}
    env |= {"FERRY_NATS_URL": url, "XDG_CONFIG_HOME": "/nonexistent"}
    done = subprocess.run(
        [str(FERRY), *args], capture_output=True, text=True, timeout=60, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)


async def stream_names(url: str) -> list[str]:
    nc = await bus.connect(url, name="test")
    try:
        return sorted([s.config.name or "" for s in await nc.jetstream().streams_info()])
    finally:
        await bus.close(nc)


async def test_a_missing_topology_is_named_part_by_part(nats_server: NatsServer) -> None:
    nc = await bus.connect(nats_server.url, name="test")
    js = nc.jetstream()
    try:
        with pytest.raises(TopologyMissing) as refused:
            await topology.require_topology(js)
        assert len(refused.value.missing) == len(topology.every_part())
        assert "bucket ferry-placement" in refused.value.reason
        assert "stream FERRY_COMMANDS" in refused.value.reason
        assert "ferry bootstrap" in refused.value.reason
        assert await js.streams_info() == [], "asking created nothing"

        # A bucket made by hand with another history is left as it is.
        await js.create_key_value(config=KeyValueConfig(bucket=subjects.PLACEMENT_BUCKET))
        created = await topology.create_topology(js)
        assert "bucket ferry-placement" not in created
        assert len(created) == len(topology.every_part()) - 1
        assert (await js.key_value(subjects.PLACEMENT_BUCKET))._js is not None
        info = await js.stream_info(f"KV_{subjects.PLACEMENT_BUCKET}")
        assert info.config.max_msgs_per_subject == 1
        await topology.require_topology(js)
        assert await topology.create_topology(js) == []
    finally:
        await bus.close(nc)


async def test_no_answer_is_unavailable_not_missing(nats_server: NatsServer) -> None:
    nc = await bus.connect(nats_server.url, name="test")
    try:
        nats_server.stop()
        with pytest.raises(Unavailable) as unknown:
            await topology.missing_parts(nc.jetstream(), timeout=1.0)
        assert not isinstance(unknown.value, TopologyMissing)
    finally:
        await bus.close(nc)


def test_the_cli_refuses_and_bootstrap_creates_it(nats_server: NatsServer) -> None:
    listing = ferry_on(nats_server.url, "image", "ls")
    assert listing.code == 1
    assert "ferry bootstrap" in listing.stderr and "ferry-images" in listing.stderr
    assert asyncio.run(stream_names(nats_server.url)) == [], "the CLI created nothing"

    # Three copies (the default) on one server: refused, naming the flag, nothing made.
    refused = ferry_on(nats_server.url, "bootstrap", "--json")
    assert refused.code == 2 and "--replicas" in refused.stdout + refused.stderr, refused
    assert asyncio.run(stream_names(nats_server.url)) == []
    made = ferry_on(nats_server.url, "bootstrap", "--replicas", "1", "--json")
    assert made.code == 0, made.stderr
    assert len(made.json()["created"]) == len(topology.every_part())
    assert ferry_on(nats_server.url, "image", "ls").code == 0
    again = ferry_on(nats_server.url, "bootstrap", "--json")
    assert again.json() == {"created": [], "existing": [str(p) for p in topology.every_part()]}


def _log_says(log: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return True
        time.sleep(0.2)
    return False


async def test_a_worker_waits_for_the_bootstrap_then_serves_its_ledger(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    log = tmp_path / "source.log"
    env = os.environ | {
        "FERRY_HOST": "h1",
        "FERRY_HOST_ADDRESS": "127.0.0.1",
        "FERRY_NATS_URL": nats_server.url,
        "FERRY_DC_SUBNET": "10.250.0.0/24",
        "FERRY_DC_GATEWAY": "10.250.0.1",
        "FERRY_STATE_DIR": str(tmp_path / "state"),
        "FERRY_TRANSFER_PORT": "0",
    }
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.source"], stdout=out, stderr=out, env=env
        )
    try:
        said = await asyncio.to_thread(_log_says, log, "ferry bootstrap", WORKER_READY_S)
        assert said, log.read_text()
        assert "waiting: the bus lacks" in log.read_text()
        await asyncio.sleep(1.0)
        assert await stream_names(nats_server.url) == [], "the worker created nothing"
        assert worker.poll() is None, "it waits rather than exit"

        made = ferry_on(nats_server.url, "bootstrap", "--replicas", "1", "--host", "h1")
        assert made.code == 0, made
        assert await asyncio.to_thread(_log_says, log, "source worker ready", WORKER_READY_S)
        nc = await bus.connect(nats_server.url, name="test")
        try:
            report = await bus.request(
                nc, subjects.host_request("h1", subjects.HOST_LEDGER), ReadLedger(),
                LedgerReport, timeout=10, what="h1's ledger",
            )  # fmt: skip
        finally:
            await bus.close(nc)
        assert (report.host, report.containers, report.migrations) == ("h1", (), ())
    finally:
        worker.terminate()
        worker.wait(timeout=10)


async def test_bootstrap_waits_for_a_bus_that_does_not_answer_yet(
    nats_server: NatsServer,
) -> None:
    """A cluster that just started answers nothing until it has a leader: the bootstrap
    waits and says so, and creates everything once the bus answers (CI saw it give up)."""
    nc = await bus.connect(nats_server.url, name="test")
    said: list[str] = []
    try:
        nats_server.stop()

        async def answer_later() -> None:
            await asyncio.sleep(3.0)
            await asyncio.to_thread(nats_server.restart)

        comes_back = asyncio.create_task(answer_later())
        created = await topology.create_topology_when_ready(
            nc.jetstream(), wait_s=60.0, say=said.append
        )
        await comes_back
        assert len(created) == len(topology.every_part())
        assert any("waiting for JetStream" in line for line in said), said
    finally:
        await bus.close(nc)
