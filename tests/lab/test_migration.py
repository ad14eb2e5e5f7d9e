"""Stop-and-copy live migration end to end: real CRIU, runc, nats-server and two hosts."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from deploy.lab.layout import HOST_STATE_MOUNT, LabLayout
from schemas.v1.containers import CreateContainer
from services.runtime.bundle import oci_config
from tests.support.bus import request_raw
from tests.support.cli import ferry
from tests.support.lab_checks import assert_nothing_left_on, placements, runc_names
from tests.support.workload import query, query_from_netns, wait_until_serving

pytestmark = pytest.mark.lab

BUFFER_MIB = 32
ARGS = ("/bin/memapp", "7000", str(BUFFER_MIB))
STEPS = [
    "preflight",
    "prepare_destination",
    "presync_files",
    "dump",
    "transfer",
    "restore",
    "verify",
    "commit",
    "open_network",
    "clean_source",
]


def _mgmt_rx_bytes(lab: str, host: str) -> int:
    """Bytes the host sent out of its management link (its Ferry traffic: pages, files),
    read on the root namespace's end of it."""
    return int(
        Path(f"/sys/class/net/{LabLayout(lab).mgmt_link(host)}/statistics/rx_bytes").read_text()
    )


@pytest.fixture(scope="module")
def mover(lab2: str, rootfs: Path) -> str:
    """A container with a random token, a tick counter and a buffer of known bytes."""
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "mover", "--rootfs", str(rootfs),
        "--", *ARGS,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


def assert_config_made_from_the_spec(lab: str, host: str) -> None:
    """The container's config.json on `host` is what bundle.oci_config makes from its spec
    and the host's own paths (not a file that came over the wire), and has no hooks."""
    bundle = LabLayout(lab).state_dir(host) / "containers" / "mover" / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    assert "hooks" not in config
    netns = next(n["path"] for n in config["linux"]["namespaces"] if n["type"] == "network")
    assert netns == f"{HOST_STATE_MOUNT}/netns/mover"  # as the host sees its own state dir
    # What `ferry container run` with no options asks for (layers make no part of the config).
    asked = CreateContainer(name="mover", layers=("0" * 64,), args=ARGS)
    expected = oci_config(
        asked.spec(user=None),
        hostname="mover",
        netns_path=Path(netns),
        cgroups_path=config["linux"]["cgroupsPath"],
        criu_config=Path(config["annotations"]["org.criu.config"]),
    )
    assert config == expected


def test_a_container_moves_h1_h2_h1_with_its_memory(lab2: str, mover: str) -> None:
    ip = mover
    last = wait_until_serving(ip)
    assert last["buffer_ok"] is True
    for source, destination in (("h1", "h2"), ("h2", "h1")):
        sent_before = _mgmt_rx_bytes(lab2, source)
        moved = ferry(
            lab2, "migrate", "mover", "--to", destination, "--strategy", "stop-and-copy",
            "--json", timeout=300,
        )  # fmt: skip
        assert moved.code == 0, moved.stderr
        record = moved.json()
        assert (record["state"], record["source"], record["destination"]) == (
            "completed", source, destination,
        )  # fmt: skip
        assert [s["name"] for s in record["steps"]] == STEPS
        assert all(s["status"] == "done" and s["attempts"] == 1 for s in record["steps"])
        hosts = {s["name"]: s["host"] for s in record["steps"]}
        assert hosts["dump"] == source and hosts["restore"] == destination
        assert record["strategy"] == {"chosen": "stop-and-copy", "reason": "requested"}
        assert len(record["trace_id"]) == 32
        assert record["freeze_ms"] > 0
        assert record["bytes_moved"] >= BUFFER_MIB * 2**20
        # The memory went over the network: the source's management link carried the buffer.
        assert _mgmt_rx_bytes(lab2, source) - sent_before >= BUFFER_MIB * 2**20

        now = query(ip)
        assert now["token"] == last["token"], "a different process answers"
        assert now["buffer_ok"] is True
        assert now["requests"] == last["requests"] + 1
        assert now["ticks"] >= last["ticks"]
        other = "h2" if destination == "h1" else "h1"
        from_other = query_from_netns(f"{lab2}-{other}", ip)
        assert from_other["token"] == last["token"]
        last = from_other

        placed = {c["name"]: c for c in placements(lab2)}["mover"]
        assert (placed["host"], placed["state"], placed["ip"]) == (destination, "running", ip)
        assert "mover" in runc_names(lab2, destination)
        assert_nothing_left_on(lab2, source, "mover")
        assert_config_made_from_the_spec(lab2, destination)

        status = ferry(lab2, "status", record["id"], "--json", check=True).json()
        assert status["state"] == "completed" and status["id"] == record["id"]


async def test_bad_requests_get_a_precise_error_and_change_nothing(lab2: str, mover: str) -> None:
    before = placements(lab2)
    migrations_before = ferry(lab2, "status", "--json", check=True).json()
    here = {c["name"]: c for c in before}["mover"]["host"]
    valid = {"schema_version": 1, "container": "mover", "destination": "h2"}
    cases: list[tuple[bytes, str]] = [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (json.dumps({"destination": "h2"}).encode(), "container"),
        (json.dumps({**valid, "destination": 5}).encode(), "destination"),
        (json.dumps({**valid, "schema_version": 2}).encode(), "schema_version"),
        (json.dumps({**valid, "container": "nosuch"}).encode(), "container"),
        (json.dumps({**valid, "destination": "h9"}).encode(), "destination"),
        (json.dumps({**valid, "destination": here}).encode(), "destination"),
        (json.dumps({**valid, "strategy": "pre-copy"}).encode(), "strategy"),
        (json.dumps({**valid, "downtime_budget_ms": 0}).encode(), "downtime_budget_ms"),
        (json.dumps({**valid, "bandwidth_limit_mib_s": -1}).encode(), "bandwidth_limit_mib_s"),
        (json.dumps({**valid, "strategy": "teleport"}).encode(), "strategy"),
        (json.dumps({**valid, "source": "h9" if here != "h9" else "h8"}).encode(), "source"),
    ]
    for payload, field in cases:
        reply = await request_raw(lab2, payload)
        assert "id" not in reply, (payload, reply)
        assert reply["error"]["field"] == field, (payload, reply)
        assert reply["error"]["reason"], payload
    assert placements(lab2) == before
    assert ferry(lab2, "status", "--json", check=True).json() == migrations_before


def test_cli_rejections_exit_2_with_a_json_error(lab2: str, mover: str) -> None:
    unknown = ferry(lab2, "migrate", "nosuch", "--to", "h2", "--json")
    assert unknown.code == 2
    assert unknown.json()["error"]["field"] == "container"
    assert len(unknown.stderr.strip().splitlines()) >= 1
    unavailable = ferry(lab2, "migrate", "mover", "--to", "h2", "--strategy", "pre-copy")
    assert unavailable.code == 2 and "mem_dirty_track" in unavailable.stderr
    assert ferry(lab2, "status", "nosuchid", "--json").code == 2


async def test_a_second_migration_of_a_moving_container_is_rejected(lab2: str, mover: str) -> None:
    here = {c["name"]: c for c in placements(lab2)}["mover"]["host"]
    there = "h2" if here == "h1" else "h1"
    request = {"schema_version": 1, "container": "mover", "destination": there}
    first = await request_raw(lab2, json.dumps(request).encode())
    assert "id" in first, first
    second = await request_raw(lab2, json.dumps(request).encode())
    assert second["error"]["field"] == "container"
    assert first["id"] in second["error"]["reason"]
    removing = ferry(lab2, "container", "rm", "mover")
    assert removing.code == 2, "a moving container must not be removed"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        record = ferry(lab2, "status", first["id"], "--json", check=True).json()
        if record["state"] != "running":
            break
        time.sleep(0.3)
    assert record["state"] == "completed", record
    assert {c["name"]: c for c in placements(lab2)}["mover"]["host"] == there
    assert query(mover)["buffer_ok"] is True


async def test_a_requester_asks_and_follows_its_move_and_may_do_nothing_else(
    lab2: str, mover: str
) -> None:
    """On the lab's real cluster: the requester identity publishes a request on its own
    subject, follows the events to the end and reads the record, which names it; an
    anonymous client is refused at the door; a host's credentials cannot read another
    host's commands."""
    import asyncio

    from nats.errors import Error as NatsError

    from deploy.lab.lab import LAB_REQUESTER
    from deploy.lab.layout import LabLayout
    from services import identities
    from services.identity_files import creds_path
    from tests.support.bus import connect_as, requester_nats

    here = {c["name"]: c for c in placements(lab2)}["mover"]["host"]
    there = "h2" if here == "h1" else "h1"
    nc = await requester_nats(lab2)
    try:
        js = nc.jetstream()
        request = {"schema_version": 1, "container": "mover", "destination": there}
        asked = await nc.request(
            f"ferry.v1.migrations.request.requester-{LAB_REQUESTER}",
            json.dumps(request).encode(),
            timeout=30,
        )
        accepted = json.loads(asked.data)
        assert "id" in accepted, accepted
        sub = await js.subscribe(
            f"ferry.v1.events.{accepted['id']}", ordered_consumer=True, stream="FERRY_EVENTS"
        )
        kinds = []
        deadline = time.monotonic() + 120
        while "finished" not in kinds and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError, NatsError):
                event = json.loads((await sub.next_msg(timeout=5)).data)
                kinds.append(event.get("type"))
        assert "finished" in kinds, kinds
        record = json.loads(
            (await (await js.key_value("ferry-migrations")).get(accepted["id"])).value
        )
        assert record["state"] == "completed", record
        assert record["requested_by"] == f"requester-{LAB_REQUESTER}"
    finally:
        await nc.close()

    with pytest.raises(NatsError):  # no credentials: refused at the door
        await asyncio.wait_for(connect_as(lab2, None, allow_reconnect=False), 10)

    violations: list[str] = []

    async def seen(exc: Exception) -> None:
        violations.append(str(exc))

    h1 = creds_path(LabLayout(lab2).operator_dir, identities.host("h1"))
    host = await connect_as(lab2, h1, error_cb=seen)
    try:
        theirs = await host.jetstream(timeout=2).pull_subscribe_bind(
            durable="cmd-h2-source", stream="FERRY_COMMANDS"
        )
        with contextlib.suppress(Exception):
            await theirs.fetch(1, timeout=2)
        await asyncio.sleep(0.5)
        assert any("permissions violation" in v.lower() for v in violations), violations
    finally:
        await host.close()
