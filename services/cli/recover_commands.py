"""`ferry recover ID [--dry-run] [--json]`: a migration whose destination an operator declared
dead (`ferry hosts declare-dead`), after its commit.

The judgement is workflows/dead_hosts.py's: post-copy's source still holds its stopped copy
until clean_source, so the placement moves back to it here, by compare-and-set (the dead
destination cannot run `uncommit`), and the saga falls back to it with the dead host's
actions skipped; for stop-and-copy the only copy was on the dead host, and this says so and
changes nothing. Before the commit, a way back that ran out of attempts on the dead host
goes on past it. With --dry-run it only shows what it would do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import TYPE_CHECKING

from schemas import subjects
from schemas.v1.containers import Placement
from schemas.v2.migrations import MigrationRecord
from services import bus, topology
from services.cli.context import connected, current_context, operator_placements, say
from services.errors import Conflict, InvalidInput, NotFound, RuntimeFailure, Unavailable
from services.kvstores import KvMigrationStore, KvPlacementStore
from services.saga.dead_hosts import declared_dead
from services.saga.publish import publish_decision
from services.saga.transitions import compare_and_set, transition
from workflows.dead_hosts import NotRecoverable, Recovery, placement_back, recover
from workflows.definitions import DEFINITIONS
from workflows.saga import Decision

if TYPE_CHECKING:
    from services.cli.parsing import Subcommands


def register(sub: Subcommands) -> None:
    recovering = sub.add_parser(
        "recover", help="bring back a migration's container whose destination was declared dead"
    )
    recovering.add_argument("id", metavar="ID")
    recovering.add_argument("--dry-run", action="store_true", help="only show what it would do")
    recovering.add_argument("--json", action="store_true")
    recovering.set_defaults(run=recover_command)


async def _move_placement_back(placements: KvPlacementStore, record: MigrationRecord) -> None:
    def back(placement: Placement) -> tuple[Placement | None, None]:
        try:
            return placement_back(placement, record), None
        except ValueError as exc:
            raise Conflict(str(exc), field="ID") from None

    try:
        await compare_and_set(placements, record.container, back)
    except NotFound:
        # Unknown, not "nowhere": nothing is moved on a guess (a lost store: reconcile first).
        raise Unavailable(
            f"the placement of {record.container} is missing: cannot move it back"
            " (after a lost store, `ferry reconcile` first)"
        ) from None


async def _recover(args: argparse.Namespace) -> tuple[Recovery, bool]:
    async with connected(current_context(args)) as nc:
        js = nc.jetstream()
        await topology.require_topology(js)
        migrations = KvMigrationStore(await bus.bucket(js, subjects.MIGRATIONS_BUCKET))
        placements = await operator_placements(js)
        found = await migrations.get(args.id)
        if found is None:
            raise NotFound(f"no migration {args.id!r}", field="ID")
        record = found[0]
        try:
            recovery = recover(
                DEFINITIONS[record.chosen], record, await declared_dead(js), time.time()
            )
        except NotRecoverable as exc:
            raise InvalidInput(str(exc), field="ID") from None
        if not recovery.possible or args.dry_run:
            return recovery, False
        if recovery.moves_placement:
            # First: resume_source runs only where the placement names the source.
            await _move_placement_back(placements, record)
        planned = recovery.decision
        assert planned is not None

        def fall_back(latest: MigrationRecord) -> Decision | None:
            return planned if latest == record else None

        decision = await transition(migrations, record.id, fall_back)
        if decision is None:
            raise Conflict(
                f"migration {record.id} changed meanwhile: run `ferry recover {record.id}` again"
                " (the placement already names its source)",
                field="ID",
            )
        await publish_decision(js, decision, host=None)  # the operator's: every host's
        return recovery, True


def recover_command(args: argparse.Namespace) -> int:
    """Exit 0 when the fallback was started (or would be, with --dry-run), 1 when nothing can
    come back, 2 when there is nothing for it to do (not declared dead, not committed, over)."""
    recovery, applied = asyncio.run(_recover(args))
    if args.json:
        document = {
            "id": args.id,
            "possible": recovery.possible,
            "reason": recovery.reason,
            "actions": list(recovery.actions),
            "applied": applied,
        }
        print(json.dumps(document))
    else:
        print(recovery.reason)
        for action in recovery.actions:
            print(f"  {action}")
        if recovery.possible:
            say("started: follow it with `ferry status " + args.id + "`" if applied
                else "nothing changed (--dry-run)")  # fmt: skip
    if not recovery.possible:
        if args.json:
            return 1
        raise RuntimeFailure(f"nothing changed: {recovery.reason}")
    return 0
