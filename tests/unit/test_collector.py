"""The leftover collector acts on fencing's decisions: it removes, freezes (runc pause) and
thaws local copies only on evidence, and releases an address reservation only when nobody
holds its owner, confirmed on two sweeps."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from schemas.v1.containers import Placement, RunsContainer
from services.cleanup.__main__ import runs_container
from services.cleanup.collector import FENCED, Collector, PlacementSeen, collect_addresses
from services.config import HostConfig
from services.errors import Conflict
from services.runtime.runc import RuncState
from workflows.fencing import Answer, Record, Rules, Where

RULES = Rules(confirm_after_s=10.0, min_age_s=30.0, orphan_limit=2)


def placement(name: str, host: str, migration_id: str | None = None) -> Placement:
    return Placement(name=name, host=host, ip="10.0.0.100", mac="02:fe:0a:00:00:64",
                     layers=("a" * 64,), args=("/bin/app",), migration_id=migration_id,
                     state="migrating" if migration_id else "running")  # fmt: skip


class Evidence:
    """What the fleet says, set by the test; `asked` records every question to an owner."""

    def __init__(self) -> None:
        self.placements: dict[str, PlacementSeen] = {}
        self.records: dict[str, Record] = {}
        self.answers: dict[tuple[str, str], Answer] = {}
        self.asked: list[tuple[str, str]] = []

    def place(self, name: str, host: str, revision: int = 1, lock: str | None = None) -> None:
        where = Where.HERE if host == "h1" else Where.ELSEWHERE
        self.placements[name] = PlacementSeen(where, placement(name, host, lock), revision)

    async def placement(self, name: str) -> PlacementSeen:
        return self.placements.get(name, PlacementSeen(Where.ABSENT))

    async def migration(self, migration_id: str) -> Record:
        return self.records.get(migration_id, Record.MISSING)

    async def ask(self, host: str, name: str) -> Answer:
        self.asked.append((host, name))
        return self.answers.get((host, name), Answer.SILENT)


class Runc:
    def __init__(self) -> None:
        self.status: dict[str, str] = {}

    async def list(self) -> list[RuncState]:
        return [RuncState(name=n, status=s, pid=1) for n, s in self.status.items()]

    async def pause(self, name: str) -> None:
        self.status[name] = "paused"

    async def resume(self, name: str) -> None:
        self.status[name] = "running"


class Containers:
    """The host's containers: a runc that only keeps statuses, a directory per container."""

    def __init__(self, state_dir: Path) -> None:
        self.config = HostConfig(
            host="h1", address="10.0.0.11", nats_servers=("nats://x:1",),
            subnet=ipaddress.IPv4Network("10.0.0.0/24"), gateway="10.0.0.1",
            ip_pool=(100, 200), state_dir=state_dir,
        )  # fmt: skip
        self.runc = Runc()
        self.discarded: list[str] = []

    def run(self, name: str) -> None:
        (self.config.containers_dir / name).mkdir(parents=True, exist_ok=True)
        self.runc.status[name] = "running"

    async def discard_local(self, name: str) -> None:
        self.discarded.append(name)
        self.runc.status.pop(name, None)
        for path in sorted((self.config.containers_dir / name).glob("*")):
            path.unlink()
        (self.config.containers_dir / name).rmdir()


class Placements:
    def __init__(self) -> None:
        self.updates: list[tuple[Placement, int]] = []
        self.conflict = False

    async def get(self, name: str) -> tuple[Placement, int] | None:
        raise NotImplementedError

    async def claim(self, placement: Placement) -> int:
        raise NotImplementedError

    async def update(self, placement: Placement, revision: int) -> int:
        if self.conflict:
            raise Conflict("changed")
        self.updates.append((placement, revision))
        return revision + 1

    async def remove(self, name: str) -> None:
        raise NotImplementedError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def collector(tmp_path: Path) -> tuple[Collector, Containers, Evidence, Placements, Clock]:
    containers, evidence, placements, clock = (
        Containers(tmp_path), Evidence(), Placements(), Clock()
    )  # fmt: skip
    c = Collector(containers, evidence, placements, RULES, clock=clock)  # type: ignore[arg-type]
    return c, containers, evidence, placements, clock


async def test_a_true_orphan_goes_after_two_sweeps_and_its_owners_word(tmp_path: Path) -> None:
    c, containers, evidence, _, clock = collector(tmp_path)
    containers.run("web")
    evidence.place("web", "h2")
    evidence.answers[("h2", "web")] = Answer.RUNS
    first = await c.sweep()
    assert first.containers == [] and evidence.asked == []
    clock.now = 11.0
    second = await c.sweep()
    assert second.containers == ["web"] and evidence.asked == [("h2", "web")]
    assert containers.discarded == ["web"]


async def test_a_silent_owner_gets_a_frozen_copy_thawed_when_placed_here(tmp_path: Path) -> None:
    c, containers, evidence, _, clock = collector(tmp_path)
    containers.run("web")
    evidence.place("web", "h2")
    await c.sweep()
    clock.now = 11.0
    done = await c.sweep()
    assert done.frozen == ["web"] and containers.runc.status["web"] == "paused"
    assert (containers.config.containers_dir / "web" / FENCED).exists()
    assert any("web" in line for line in done.health())
    clock.now = 30.0
    again = await c.sweep()  # still silent: stays frozen, never removed
    assert again.frozen == [] and containers.discarded == []
    evidence.place("web", "h1", revision=2)
    clock.now = 31.0
    done = await c.sweep()
    assert done.thawed == ["web"] and containers.runc.status["web"] == "running"
    assert not (containers.config.containers_dir / "web" / FENCED).exists()


async def test_an_owner_that_does_not_run_it_thaws_the_frozen_copy(tmp_path: Path) -> None:
    c, containers, evidence, _, clock = collector(tmp_path)
    containers.run("web")
    evidence.place("web", "h2")
    await c.sweep()
    clock.now = 11.0
    await c.sweep()
    evidence.answers[("h2", "web")] = Answer.NOT_RUNNING
    clock.now = 22.0
    done = await c.sweep()
    assert done.thawed == ["web"] and containers.runc.status["web"] == "running"
    assert containers.discarded == []


async def test_a_lost_placement_bucket_removes_nothing_in_many_sweeps(tmp_path: Path) -> None:
    c, containers, evidence, _, clock = collector(tmp_path)
    for name in ("a", "b", "c"):
        containers.run(name)
    for sweep in range(40):
        clock.now = sweep * 5.0
        done = await c.sweep()
        assert done.containers == [] and done.frozen == []
    assert containers.discarded == [] and evidence.asked == []
    assert set(containers.runc.status.values()) == {"running"}
    assert len(done.alerts) == 3 and all("no placement" in a for a in done.alerts)


async def test_an_unanswering_placement_bucket_keeps_all_and_says_so(tmp_path: Path) -> None:
    c, containers, evidence, _, clock = collector(tmp_path)
    containers.run("a")
    evidence.place("a", "h2")
    evidence.answers[("h2", "a")] = Answer.RUNS
    await c.sweep()
    evidence.placements["a"] = PlacementSeen(Where.UNAVAILABLE)
    for sweep in range(1, 10):
        clock.now = sweep * 11.0
        done = await c.sweep()
        assert done.containers == [] and done.frozen == []
    assert done.health() == ["placement unavailable for 1 container(s): kept"]
    assert evidence.asked == []


async def test_above_the_limit_nothing_is_removed_and_health_says_why(tmp_path: Path) -> None:
    c, containers, evidence, _, clock = collector(tmp_path)
    for name in ("a", "b", "c"):
        containers.run(name)
        evidence.place(name, "h2")
        evidence.answers[("h2", name)] = Answer.RUNS
    await c.sweep()
    clock.now = 11.0
    done = await c.sweep()
    assert containers.discarded == [] and done.mass_orphaning is not None
    assert done.health()[0].startswith("mass orphaning: 3 containers")


async def test_a_stale_lock_here_is_released_by_compare_and_set(tmp_path: Path) -> None:
    c, containers, evidence, placements, clock = collector(tmp_path)
    containers.run("web")
    evidence.place("web", "h1", revision=5, lock="00000000000000e1")
    evidence.records["00000000000000e1"] = Record.ENDED
    await c.sweep()
    clock.now = 11.0
    done = await c.sweep()
    assert done.locks_released == ["web"]
    ((unlocked, revision),) = placements.updates
    assert revision == 5 and unlocked.migration_id is None and unlocked.state == "running"


async def test_a_live_lock_or_an_unknown_record_is_left_alone(tmp_path: Path) -> None:
    c, containers, evidence, placements, clock = collector(tmp_path)
    containers.run("web")
    evidence.place("web", "h1", revision=5, lock="00000000000000e1")
    for record in (Record.LIVE, Record.UNAVAILABLE):
        evidence.records["00000000000000e1"] = record
        for _ in range(3):
            clock.now += 11.0
            await c.sweep()
    assert placements.updates == []


async def test_a_migration_dir_goes_only_on_an_ended_record_seen_twice(tmp_path: Path) -> None:
    c, _, evidence, _, clock = collector(tmp_path)
    migrations = tmp_path / "migrations"
    for mid in ("ended", "missing", "unknown", "live"):
        (migrations / mid).mkdir(parents=True)
    evidence.records.update(ended=Record.ENDED, unknown=Record.UNAVAILABLE, live=Record.LIVE)
    assert (await c.sweep()).migrations == []
    removed = []
    for _ in range(10):
        clock.now += 11.0
        removed += (await c.sweep()).migrations
    assert removed == ["ended"]
    assert sorted(p.name for p in migrations.iterdir()) == ["live", "missing", "unknown"]


class Ledger:
    def __init__(self, owners: dict[str, str]) -> None:
        self.held = dict(owners)

    async def owners(self) -> dict[str, str]:
        return dict(self.held)

    async def release(self, ip: str, owner: str) -> None:
        if self.held.get(ip) == owner:
            del self.held[ip]


async def test_an_orphan_address_is_released_on_the_second_sweep_only() -> None:
    ledger = Ledger({"10.0.0.100": "web", "10.0.0.101": "gone"})
    evidence = Evidence()
    evidence.place("web", "h1")
    for host in ("h1", "h2"):
        evidence.answers[(host, "gone")] = Answer.NOT_RUNNING
    released, suspects = await collect_addresses(ledger, evidence, set(), ["h1", "h2"])
    assert released == [] and suspects == {"10.0.0.101"}
    released, suspects = await collect_addresses(ledger, evidence, suspects, ["h1", "h2"])
    assert released == ["10.0.0.101"] and suspects == set()
    assert ledger.held == {"10.0.0.100": "web"}


async def test_an_address_whose_owner_appears_in_between_is_kept() -> None:
    ledger = Ledger({"10.0.0.102": "new"})
    evidence = Evidence()
    evidence.answers[("h1", "new")] = Answer.NOT_RUNNING
    _, suspects = await collect_addresses(ledger, evidence, set(), ["h1"])
    evidence.place("new", "h1")  # the create finished its claim meanwhile
    released, suspects = await collect_addresses(ledger, evidence, suspects, ["h1"])
    assert released == [] and ledger.held == {"10.0.0.102": "new"}


async def test_an_address_is_kept_while_a_host_runs_its_owner_or_is_silent() -> None:
    ledger = Ledger({"10.0.0.103": "web"})
    evidence = Evidence()  # no placement: the bucket was lost and made again, empty
    evidence.answers[("h1", "web")] = Answer.NOT_RUNNING
    evidence.answers[("h2", "web")] = Answer.RUNS
    suspects: set[str] = set()
    for hosts in (["h1", "h2"], ["h1", "h3"], []):  # h3 is silent; no hosts known
        for _ in range(3):
            released, suspects = await collect_addresses(ledger, evidence, suspects, hosts)
            assert released == []
    assert ledger.held == {"10.0.0.103": "web"}


async def test_more_unplaced_addresses_than_the_limit_releases_none() -> None:
    ledger = Ledger({f"10.0.0.{i}": f"c{i}" for i in range(110, 114)})
    evidence = Evidence()
    for i in range(110, 114):
        evidence.answers[("h1", f"c{i}")] = Answer.NOT_RUNNING
    suspects: set[str] = set()
    for _ in range(3):
        released, suspects = await collect_addresses(ledger, evidence, suspects, ["h1"], limit=3)
        assert released == []
    assert len(ledger.held) == 4


class StateRunc:
    def __init__(self, states: dict[str, str]) -> None:
        self.states = states

    async def state(self, name: str) -> RuncState | None:
        status = self.states.get(name)
        return None if status is None else RuncState(name=name, status=status, pid=1)


async def test_a_host_answers_from_runcs_own_state() -> None:
    runc = StateRunc({"a": "running", "b": "paused", "c": "stopped", "d": "created"})
    said = {
        name: (await runs_container(runc, "h2", RunsContainer(name=name))).state  # type: ignore[arg-type]
        for name in ("a", "b", "c", "d", "e")
    }
    assert said == {"a": "running", "b": "paused", "c": "stopped", "d": "stopped", "e": "absent"}
