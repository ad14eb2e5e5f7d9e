"""The fleet, end to end: four hosts in two zones of different sizes, containers placed by
the scheduler under zone, anti-affinity and capacity rules, a cordoned host, a move without
--to, and the fleet controller's failover and fencing. Every verdict is the test's own,
from `ferry containers` and `ferry hosts` and the sizes it asked for — never Ferry's counts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deploy.lab.lab import controller_pid, ensure_controller
from deploy.lab.layout import LabLayout, read_spec
from schemas import subjects
from schemas.v1.containers import CreateContainer
from schemas.v1.fleet import PlaceContainer, Placed
from services.leases import LEASE_TTL_S
from tests.conftest import new_lab_name
from tests.support.bus import operator_nats
from tests.support.cli import Result, ferry
from tests.support.lab_checks import runc_names

pytestmark = [pytest.mark.lab, pytest.mark.budget(900)]

HOSTS = ("h1", "h2", "h3", "h4")
ZONES = {"h1": "a", "h2": "a", "h3": "b", "h4": "b"}
MEMORY = {"h1": 1024, "h2": 512, "h3": 1024, "h4": 512}
# name -> (memory MiB, zone required, anti-affinity group, its scope)
WANTED: dict[str, tuple[int, str | None, str | None, str]] = {
    "db1": (256, None, "db", "zone"),
    "db2": (256, None, "db", "zone"),
    **{f"web{i}": (128, None, "web", "host") for i in (1, 2, 3)},
    **{f"za{i}": (192, "a", None, "host") for i in (1, 2, 3)},
    # Zone b has only h3 while h4 is cordoned: db, web and these fill it exactly.
    **{f"zb{i}": (160, "b", None, "host") for i in (1, 2, 3, 4)},
}
SWEEP_S = "1"


@pytest.fixture(scope="module")
def fleet_lab(lab_capable: None) -> Iterator[str]:
    name = new_lab_name()
    env = {"FERRY_CONTROLLER_SWEEP_S": SWEEP_S}
    up = ferry(
        name, "lab", "up", "--hosts", "4", "--zones", "a,a,b,b",
        "--sizes", "1024:2,512:1,1024:2,512:1", timeout=300, env=env,
    )  # fmt: skip
    assert up.code == 0, up.stderr
    yield name
    down = ferry(name, "lab", "down", timeout=180)
    assert down.code == 0, down.stderr


@pytest.fixture(scope="module")
def image(fleet_lab: str, rootfs: Path) -> str:
    ferry(fleet_lab, "image", "build", str(rootfs), "--name", "app", check=True)
    return "app"


def run(lab: str, name: str, *options: str) -> Result:
    return ferry(
        lab, "container", "run", "--name", name, "--image", "app", *options,
        "--", "/bin/memapp", "7000", "4", timeout=240,
    )  # fmt: skip


def options_of(name: str) -> list[str]:
    memory, zone, group, scope = WANTED[name]
    found = ["--memory", str(memory)]
    if zone:
        found += ["--zone", zone]
    if group:
        found += ["--anti-affinity", f"{group}:{scope}"]
    return found


def where(lab: str) -> dict[str, str]:
    rows = ferry(lab, "containers", "--json", check=True).json()
    assert all(row["state"] == "running" for row in rows), rows
    return {row["name"]: row["host"] for row in rows}


def hosts(lab: str) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in ferry(lab, "hosts", "--json", check=True).json()}


def fleet(lab: str) -> dict[str, Any]:
    return dict(ferry(lab, "fleet", "--json", check=True).json())


def assert_rules_hold(lab: str, placed: dict[str, str], extra: dict[str, int]) -> None:
    """Every container on a host that satisfies it, by the test's own reading."""
    shown = hosts(lab)
    for host, row in shown.items():  # what the lab was asked to make
        assert row["zone"] == ZONES[host] and row["capacity"]["memory_mib"] == MEMORY[host]
    for name, host in placed.items():
        if name not in WANTED:
            continue
        _, zone, group, scope = WANTED[name]
        if zone:
            assert ZONES[host] == zone, f"{name} needs zone {zone}, runs on {host}"
        if group:
            others = [
                n
                for n, h in placed.items()
                if n != name and WANTED.get(n, (0, 0, None))[2] == group
            ]
            for other in others:
                if scope == "host":
                    assert placed[other] != host, f"{name} and {other} share {host}"
                else:
                    assert ZONES[placed[other]] != ZONES[host], f"{name}, {other} share a zone"
    for host in HOSTS:
        used = sum(
            WANTED[n][0] if n in WANTED else extra[n] for n, h in placed.items() if h == host
        )
        assert used <= MEMORY[host], f"{host}: {used} MiB placed, {MEMORY[host]} declared"


def test_twelve_containers_at_once_land_where_their_rules_allow(fleet_lab: str, image: str) -> None:
    cordon = ferry(fleet_lab, "cordon", "h4", "--reason", "disk swap")
    assert cordon.code == 0, cordon.stderr
    assert fleet(fleet_lab)["cordoned"]["h4"]["reason"] == "disk swap"
    with ThreadPoolExecutor(max_workers=len(WANTED)) as pool:
        results = dict(
            zip(WANTED, pool.map(lambda n: run(fleet_lab, n, *options_of(n)), WANTED), strict=True)
        )
    for name, result in results.items():
        assert result.code == 0, f"{name}: {result.stderr}"
    placed = where(fleet_lab)
    assert set(placed) == set(WANTED)
    assert "h4" not in placed.values(), "a cordoned host got a container"
    assert_rules_hold(fleet_lab, placed, {})
    # Zone b is full (h3 exactly, h4 cordoned): one more is refused, host by host.
    refused = run(fleet_lab, "extra", "--memory", "64", "--zone", "b")
    assert refused.code == 2, refused.stderr
    assert "no host fits" in refused.stderr and "cordoned" in refused.stderr
    assert "h3" in refused.stderr and "memory" in refused.stderr
    assert where(fleet_lab) == placed
    for host in HOSTS:  # runc agrees: each exactly once, where the placement says
        for name in runc_names(fleet_lab, host):
            assert placed[name] == host


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (("--zone", "nowhere"), "--zone"),
        (("--host-label", "disk=ssd"), "--host-label"),
        (("--host", "h1", "--zone", "b"), "--host"),
        (("--anti-affinity", "web:rack"), "--anti-affinity"),
        (("--host", "h1", "--pin", "--zone", "b"), "constraints"),  # they contradict
    ],
)
def test_bad_constraints_exit_2_naming_the_field(
    fleet_lab: str, image: str, options: tuple[str, ...], field: str
) -> None:
    before = where(fleet_lab)
    refused = run(fleet_lab, "bad", "--memory", "16", *options)
    assert refused.code == 2, refused.stderr
    assert field in refused.stderr, refused.stderr
    assert where(fleet_lab) == before


def test_a_move_without_to_goes_where_the_rules_say(fleet_lab: str, image: str) -> None:
    placed = where(fleet_lab)
    assert placed["zb1"] == "h3"
    # h4 still cordoned: zone b has nowhere else to go.
    nowhere = ferry(fleet_lab, "migrate", "zb1", timeout=120)
    assert nowhere.code == 2 and "cordoned" in nowhere.stderr, nowhere.stderr
    assert ferry(fleet_lab, "uncordon", "h4").code == 0
    moved = ferry(fleet_lab, "migrate", "zb1", "--json", timeout=300)
    assert moved.code == 0, moved.stderr
    record = moved.json()
    assert record["state"] == "completed" and record["destination"] == "h4"
    assert record["placement"]["host"] == "h4" and record["placement"]["reasons"]
    assert not record["placement"]["named_by_operator"]
    after = where(fleet_lab)
    assert after["zb1"] == "h4"
    # The trace holds the controller's decision, with every host's verdict.
    spans = ferry(fleet_lab, "trace", record["id"], "--json", check=True).json()
    placed = [s for s in spans if s["name"] == "fleet.place"]
    assert placed and placed[0]["attributes"]["ferry.placement.host"] == "h4", spans
    assert any("h3" in line for line in placed[0]["attributes"]["ferry.placement.considered"])
    # A named destination is judged by the same rules: the other db is in zone b.
    db_in_a = next(n for n in ("db1", "db2") if ZONES[after[n]] == "a")
    refused = ferry(fleet_lab, "migrate", db_in_a, "--to", "h4", timeout=120)
    assert refused.code == 2 and "db" in refused.stderr, refused.stderr
    assert where(fleet_lab) == after
    assert_rules_hold(fleet_lab, after, {})


def _active(lab: str) -> dict[str, Any]:
    controller = fleet(lab)["controller"]
    assert controller is not None and controller["active"], controller
    return dict(controller)


def _wait_for_another(lab: str, instance: str, limit_s: float) -> tuple[dict[str, Any], float]:
    began = time.monotonic()
    while time.monotonic() - began < limit_s:
        shown = fleet(lab)["controller"]
        if shown is not None and shown["active"] and shown["instance"] != instance:
            return shown, time.monotonic() - began
        time.sleep(0.5)
    raise AssertionError(f"no controller took over from {instance} within {limit_s:.0f}s")


def test_the_standby_takes_over_a_killed_controller_within_its_lease(
    fleet_lab: str, image: str
) -> None:
    layout = LabLayout(fleet_lab)
    active = _active(fleet_lab)
    assert controller_pid(layout, active["instance"]) == active["pid"]
    os.kill(active["pid"], signal.SIGKILL)
    successor, took_s = _wait_for_another(fleet_lab, active["instance"], LEASE_TTL_S + 15)
    assert took_s <= LEASE_TTL_S + 3, f"took over after {took_s:.1f}s"
    assert successor["term"] > active["term"]
    started = run(fleet_lab, "after-kill", "--memory", "32")
    assert started.code == 0, started.stderr
    spec = read_spec(layout)
    assert spec is not None
    ensure_controller(layout, spec, active["instance"], lambda line: None)


async def _ask_directly(lab: str, instance: str, asks: list[tuple[str, bytes]]) -> list[Any]:
    """Publish to one instance's own subjects and collect whatever comes back."""
    nc = await operator_nats(lab)
    try:
        inbox = nc.new_inbox()
        replies: list[Any] = []

        async def keep(msg: Any) -> None:
            replies.append(json.loads(msg.data))

        sub = await nc.subscribe(inbox + ".*", cb=keep)
        for i, (subject, data) in enumerate(asks):
            await nc.publish(subjects.controller_subject(instance, subject), data,
                             reply=f"{inbox}.{i}")  # fmt: skip
        await nc.flush()
        return [sub, nc, replies]
    except BaseException:
        await nc.close()
        raise


async def _place_ghost(lab: str, instance: str) -> Placed:
    nc = await operator_nats(lab)
    try:
        ask = PlaceContainer(container="ghost", purpose="create", memory_mib=16)
        msg = await nc.request(
            subjects.controller_subject(instance, subjects.FLEET_PLACE), ask.to_bytes(), timeout=15
        )
        return Placed.model_validate_json(msg.data)
    finally:
        await nc.close()


async def _create_with(lab: str, ticket_host: str, create: CreateContainer) -> dict[str, Any]:
    nc = await operator_nats(lab)
    try:
        msg = await nc.request(
            subjects.host_request(ticket_host, subjects.CREATE_CONTAINER),
            create.to_bytes(),
            timeout=60,
        )
        return dict(json.loads(msg.data))
    finally:
        await nc.close()


def test_a_controller_stopped_past_its_lease_gets_nothing_done(fleet_lab: str, image: str) -> None:
    """The active one decides (a ticket), is SIGSTOPped past its lease, the other takes
    over; SIGCONTed, it is asked to place and to cordon on its own subjects: everything it
    answers is a refusal, nothing it did is in the fleet, and its old ticket is refused
    by the host it names."""
    layout = LabLayout(fleet_lab)
    before = where(fleet_lab)
    old = _active(fleet_lab)
    app = next(i for i in ferry(fleet_lab, "image", "ls", "--json", check=True).json()
               if i["name"] == "app")  # fmt: skip
    layers = tuple(layer["digest"] for layer in app["layers"])
    ticket = asyncio.run(_place_ghost(fleet_lab, old["instance"])).choice.ticket
    assert ticket.term == old["term"]
    os.kill(old["pid"], signal.SIGSTOP)
    try:
        _wait_for_another(fleet_lab, old["instance"], LEASE_TTL_S + 15)
        stale_asks = [
            (subjects.FLEET_PLACE,
             PlaceContainer(container="ghost2", purpose="create", memory_mib=16).to_bytes()),
            (subjects.FLEET_CORDON, json.dumps({"host": "h2", "reason": "stale"}).encode()),
        ]  # fmt: skip

        async def stale_round() -> list[Any]:
            sub, nc, replies = await _ask_directly(fleet_lab, old["instance"], stale_asks)
            os.kill(old["pid"], signal.SIGCONT)
            await asyncio.sleep(8)  # it wakes, reads what waited for it, renews, loses
            await sub.unsubscribe()
            await nc.close()
            return list(replies)

        replies = asyncio.run(stale_round())
    finally:
        os.kill(old["pid"], signal.SIGCONT)
    for reply in replies:
        assert "error" in reply, f"a stale controller got something done: {reply}"
    shown = fleet(fleet_lab)
    assert "h2" not in shown["cordoned"]
    assert shown["controller"]["instance"] != old["instance"]
    for row in hosts(fleet_lab).values():
        assert "ghost2" not in row["reserved"]["containers"]
    create = CreateContainer(name="ghost", layers=layers, args=("/bin/memapp", "7000", "4"),
                             memory_mib=16, placed=ticket)  # fmt: skip
    answer = asyncio.run(_create_with(fleet_lab, ticket.host, create))
    assert answer.get("error", {}).get("kind") == "conflict", answer
    assert f"term {old['term']}" in answer["error"]["reason"]
    assert where(fleet_lab) == before
    assert controller_pid(layout, old["instance"]) == old["pid"], "it stands by, alive"
    for host in HOSTS:
        for name in runc_names(fleet_lab, host):
            assert before[name] == host
