"""An operator declares a host dead: kept in its registry entry by compare-and-set, refused for a
host that still heartbeats; sagas and `ferry recover` then act on it (real nats-server)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from schemas.v1.hosts import DeadDeclaration
from services.errors import Conflict, NotFound
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from services.saga.dead_hosts import dead_host_decision
from services.watchdog import GRACE_S, Watchdog
from tests.support import records
from tests.support.cli import FERRY
from tests.support.commands import published_commands, step_of
from workflows.definitions import DEFINITIONS
from workflows.saga import current


def declaration(reason: str = "its disks burned") -> DeadDeclaration:
    return DeadDeclaration(reason=reason, declared_at=time.time())


async def ferry(nats_url: str, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """The real `ferry` command against this test's server (no lab, no context file)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FERRY_LAB", "FERRY_CONTEXT")}
    env |= {"FERRY_NATS_URL": nats_url, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = await asyncio.create_subprocess_exec(
        str(FERRY), *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_a_declaration_is_kept_in_the_registry_entry_with_what_was_there(
    js: JetStreamContext, hosts: KvHostDirectory
) -> None:
    await records.put_host(js, "h1")
    await records.put_host(js, "h2", alive=False, features=("lazy_pages",))
    declared = await hosts.declare_dead("h2", declaration())
    assert declared.declared_dead is not None and not declared.declared_dead.forced
    stored = await hosts.registered("h2")
    assert stored is not None and stored.features == ("lazy_pages",)
    assert stored.declared_dead == declared.declared_dead
    assert await hosts.known_hosts() == ["h1", "h2"], "a dead host stays known"
    assert list(await hosts.declared_dead()) == ["h2"]
    again = await hosts.declare_dead("h2", declaration("another story"))
    assert again.declared_dead is not None
    assert again.declared_dead.reason == "its disks burned", "the first words are kept"


async def test_a_host_that_still_heartbeats_is_refused_unless_forced(
    js: JetStreamContext, hosts: KvHostDirectory
) -> None:
    await records.put_host(js, "h2")
    with pytest.raises(Conflict, match="still sends heartbeats") as refused:
        await hosts.declare_dead("h2", declaration())
    assert refused.value.field == "host"
    assert await hosts.declared_dead() == {}
    forced = await hosts.declare_dead("h2", declaration(), force=True)
    assert forced.declared_dead is not None and forced.declared_dead.forced


async def test_an_unknown_host_is_not_found_and_names_the_known_ones(
    js: JetStreamContext, hosts: KvHostDirectory
) -> None:
    await records.put_host(js, "h1")
    with pytest.raises(NotFound, match=r"unknown host 'h9' \(known: h1\)"):
        await hosts.declare_dead("h9", declaration())


async def test_an_agent_registering_again_meanwhile_is_read_again_not_overwritten(
    js: JetStreamContext, hosts: KvHostDirectory, monkeypatch: pytest.MonkeyPatch
) -> None:
    await records.put_host(js, "h2", alive=False)
    checked = 0
    real_alive = hosts.alive

    async def agent_registers_between_read_and_write(host: str) -> bool:
        nonlocal checked
        checked += 1
        if checked == 1:  # the agent writes its registration after our read
            await records.put_host(js, "h2", alive=False, features=("late",))
        return await real_alive(host)

    monkeypatch.setattr(hosts, "alive", agent_registers_between_read_and_write)
    declared = await hosts.declare_dead("h2", declaration())
    assert checked == 2, "the write on a stale revision failed and it read again"
    assert declared.features == ("late",) and declared.declared_dead is not None


async def test_a_compensation_on_a_dead_host_is_skipped_by_compare_and_set(
    js: JetStreamContext, hosts: KvHostDirectory, migrations: KvMigrationStore
) -> None:
    await records.put_host(js, "h1")
    await records.put_host(js, "h2", alive=False)
    definition = DEFINITIONS["post-copy"]
    since = time.time()
    restored = records.running_at("restore", since=since, strategy="post-copy")
    stopping = restored.model_copy(
        update={
            "state": "compensating",
            "steps": (
                *restored.steps[:-1],
                restored.steps[-1].model_copy(update={"status": "failed"}),
                records.step("stop_destination", "h2", role="destination", kind="compensation"),
            ),
        }
    )
    await migrations.create(stopping)
    assert await dead_host_decision(js, migrations, definition, stopping) is None, "not dead yet"
    await hosts.declare_dead("h2", declaration())
    decision = await dead_host_decision(js, migrations, definition, stopping)
    assert decision is not None
    entry = current(decision.record)
    assert entry is not None and (entry.name, entry.host) == ("resume_source", "h1")
    found = await migrations.get(stopping.id)
    assert found is not None and found[0] == decision.record, "written by compare-and-set"
    assert await dead_host_decision(js, migrations, definition, stopping) is None, "stale: no-op"


async def test_ferry_hosts_declare_dead_and_what_ferry_hosts_then_shows(
    js: JetStreamContext, nats_url: str, tmp_path: Path
) -> None:
    await records.put_host(js, "h1")
    await records.put_host(js, "h2", alive=False)
    code, _, err = await ferry(nats_url, tmp_path, "hosts", "declare-dead", "h1", "--reason", "x")
    assert code == 2 and "h1's agent still sends heartbeats" in err
    code, _, err = await ferry(nats_url, tmp_path, "hosts", "declare-dead", "h9", "--reason", "x")
    assert code == 2 and "unknown host 'h9' (known: h1, h2)" in err
    code, _, err = await ferry(nats_url, tmp_path, "hosts", "declare-dead", "h2", "--reason", " ")
    assert code == 2 and err.strip().startswith("ferry: --reason: say why")
    code, out, err = await ferry(
        nats_url, tmp_path, "hosts", "declare-dead", "h2", "--reason", "PSU fire", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["declared_dead"]["reason"] == "PSU fire"
    code, out, _ = await ferry(nats_url, tmp_path, "hosts", "--json")
    rows: dict[str, Any] = {row["name"]: row for row in json.loads(out)}
    assert rows["h2"]["declared_dead"]["reason"] == "PSU fire"
    assert rows["h2"]["health"] == "down"
    assert "declared_dead" not in rows["h1"], "the row keeps its old shape"
    code, out, _ = await ferry(nats_url, tmp_path, "hosts")
    assert "! declared dead by an operator: PSU fire" in out


async def test_ferry_recover_moves_the_placement_back_and_starts_the_source_resuming(
    js: JetStreamContext,
    nats_url: str,
    tmp_path: Path,
    hosts: KvHostDirectory,
    migrations: KvMigrationStore,
    placements: KvPlacementStore,
) -> None:
    await records.put_host(js, "h1")
    await records.put_host(js, "h2", alive=False)
    record = records.running_at("open_network", since=time.time(), strategy="post-copy")
    await migrations.create(record)
    await records.put_placement(
        js, records.placement(host="h2", state="migrating", migration_id=record.id)
    )
    code, _, err = await ferry(nats_url, tmp_path, "recover", record.id)
    assert code == 2 and "h2 is not declared dead" in err
    await hosts.declare_dead("h2", declaration())
    code, out, err = await ferry(nats_url, tmp_path, "recover", record.id, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["possible"] and not plan["applied"]
    assert "run resume_source on h1" in plan["actions"]
    still = await placements.get("web")
    assert still is not None and still[0].host == "h2", "a dry run changes nothing"

    code, out, err = await ferry(nats_url, tmp_path, "recover", record.id)
    assert code == 0, err
    moved = await placements.get("web")
    assert moved is not None
    assert (moved[0].host, moved[0].migration_id) == ("h1", record.id)
    found = await migrations.get(record.id)
    assert found is not None
    entry = current(found[0])
    assert entry is not None and (entry.name, entry.host) == ("resume_source", "h1")
    queued = [step_of(c) for c in await published_commands(js, "h1", "source")]
    assert (record.id, "resume_source", "compensation", 1) in queued
    code, _, err = await ferry(nats_url, tmp_path, "recover", record.id)
    assert code == 2 and "under way" in err, "a second recover refuses: the source is at it"


async def test_ferry_recover_of_stop_and_copy_says_nothing_comes_back_and_changes_nothing(
    js: JetStreamContext,
    nats_url: str,
    tmp_path: Path,
    hosts: KvHostDirectory,
    migrations: KvMigrationStore,
    placements: KvPlacementStore,
) -> None:
    await records.put_host(js, "h2", alive=False)
    record = records.running_at("open_network", since=time.time())
    await migrations.create(record)
    await records.put_placement(
        js, records.placement(host="h2", state="migrating", migration_id=record.id)
    )
    await hosts.declare_dead("h2", declaration())
    code, _, err = await ferry(nats_url, tmp_path, "recover", record.id)
    assert code == 1 and "its only copy was on h2, declared dead by an operator" in err
    found = await migrations.get(record.id)
    assert found is not None and found[0] == record
    unmoved = await placements.get("web")
    assert unmoved is not None and unmoved[0].host == "h2"
    assert await published_commands(js, "h1", "source") == []


async def test_the_watchdog_moves_past_a_compensation_nobody_takes_on_a_dead_host(
    js: JetStreamContext, hosts: KvHostDirectory, migrations: KvMigrationStore
) -> None:
    await records.put_host(js, "h1")
    await records.put_host(js, "h2", alive=False)
    await hosts.declare_dead("h2", declaration())
    restored = records.running_at("restore", since=1.0, strategy="post-copy")
    stopping = restored.model_copy(
        update={
            "state": "compensating",
            "steps": (
                *restored.steps[:-1],
                restored.steps[-1].model_copy(update={"status": "failed"}),
                records.step("stop_destination", "h2", role="destination", kind="compensation"),
            ),
        }
    )
    await migrations.create(stopping)
    now = [1000.0]
    watchdog = Watchdog(js, migrations, clock=lambda: now[0])
    assert await watchdog.sweep() == 0  # first sight: its own clock starts
    now[0] += DEFINITIONS["post-copy"].action("stop_destination", "compensation").timeout_s
    now[0] += GRACE_S + 1
    assert await watchdog.sweep() == 1
    found = await migrations.get(stopping.id)
    assert found is not None
    compensations = [(s.name, s.status, s.host) for s in found[0].steps if s.kind == "compensation"]
    assert compensations == [
        ("stop_destination", "skipped", "h2"),
        ("resume_source", "running", "h1"),
    ]
    queued = [step_of(c) for c in await published_commands(js, "h1", "source")]
    assert queued == [(stopping.id, "resume_source", "compensation", 1)]
    assert await published_commands(js, "h2", "destination") == [], "nothing sent to the dead"
