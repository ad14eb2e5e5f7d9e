"""A NATS node SIGKILLed in the middle of a migration: the cluster elects new leaders and
the migration ends, completed or rolled back, with exactly one copy running where the
placement says, its memory intact and nothing left behind.

One lab for the module, one container moved back and forth; each case is one `make chaos`
nats-kill cell (deploy/chaos_nats.py chooses the node from the nodes' /jsz reports as the
dump starts; post-copy's dump is so short that the kill lands in its restore), judged
from outside exactly as `make chaos` judges it: runc, the cgroups and the copy's own
loopback for where it runs, the placement read raw from the bucket, an
independent inventory for leftovers. The node is started again before the next case.
Here each of the four choices is killed once, strategies alternating; `make chaos` runs all
eight.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.chaos import STRATEGIES, Cell, Victim, run_cell
from deploy.chaos import ferry as chaos_ferry
from deploy.chaos_nats import TARGETS
from tests.conftest import new_lab_name

pytestmark = pytest.mark.lab

KILL_AT = "dump"  # mid-migration: the lock is taken, the source not yet frozen for good
EVERY_CASE = [(target, STRATEGIES[i % len(STRATEGIES)]) for i, target in enumerate(TARGETS)]
# `make test` kills the meta leader, whose loss stalls every API call; the command stream's
# and the placement bucket's leaders and a follower, each with both strategies, are
# `make chaos`'s eight `nats-kill` cells (its budget is not make test's).
CASES = EVERY_CASE[:1]
# Most cases take 5-25 s. Past this limit the migration is stuck.
CASE_LIMIT_S = 120.0


def keep_logs(lab: str, into: Path) -> None:
    """The workers' and the NATS nodes' logs, kept: `lab down` removes the lab's files."""
    root = Path(f"/var/lib/ferry-lab/{lab}")
    for log in [*root.glob("hosts/*/log/*.log"), *root.glob("nats/n*/nats.log")]:
        kept = into / log.relative_to(root)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, kept)
    print(f"lab {lab}'s logs kept in {into}", file=sys.stderr)


@pytest.fixture(scope="module")
def victim(lab_capable: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Victim]:
    """Two hosts, the 3-node cluster, and the chaos harness's container on h1."""
    moved = Victim(new_lab_name())
    try:
        moved.up()
        yield moved
    finally:
        keep_logs(moved.lab, tmp_path_factory.mktemp("lab-logs"))
        chaos_ferry(moved.lab, "lab", "down", check=False, timeout=180)


@pytest.mark.parametrize(("target", "strategy"), CASES, ids=[f"{t}-{s}" for t, s in CASES])
def test_a_nats_node_killed_mid_migration(victim: Victim, target: str, strategy: str) -> None:
    assert victim.tap is not None
    source = victim.source()
    assert source is not None, "the container is not where its placement says"
    destination = "h2" if source == "h1" else "h1"
    cell = Cell("nats-kill", KILL_AT, "before", target, strategy)

    outcome = run_cell(victim.lab, victim.tap, cell, source, destination, victim.ip, victim.memory)
    print(
        f"{cell.label} {outcome.direction} ({outcome.migration_id}):"
        f" {outcome.state} in {outcome.seconds} s;"
        f" {outcome.evidence}",
        file=sys.stderr,
    )

    assert outcome.fired, (outcome.evidence, outcome.error)
    assert outcome.state in ("completed", "rolled_back"), (outcome.state, outcome.error)
    assert not outcome.ran_twice, outcome.twice_glimpses
    assert outcome.running_now == 1 and outcome.memory_intact, outcome.seen
    seen = outcome.seen
    ended_on = destination if outcome.state == "completed" else source
    assert seen["placement_host"] == ended_on and seen["runnable"] == [ended_on], seen
    assert seen["placement_state"] == "running", "the placement's lock was not released"
    assert outcome.leftovers == []
    assert outcome.verdict == "ok", outcome.problems
    assert outcome.seconds < CASE_LIMIT_S
