"""`ferry bootstrap`: create the bus's buckets, streams and layer store, once, on purpose.

No worker, agent or other command creates them: on a bus whose store was lost they refuse
and say so, rather than start over empty and read the emptiness as "nothing runs". After
a loss, `ferry bootstrap` and then `ferry reconcile` rebuild the fleet's state from the
hosts' own records.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from services import bus
from services.cli.context import connected, current_context, say


async def _bootstrap(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    async with connected(current_context(args)) as nc:
        created = await bus.create_topology(nc.jetstream())
    existing = [str(p) for p in bus.topology() if str(p) not in created]
    return created, existing


def bootstrap(args: argparse.Namespace) -> int:
    created, existing = asyncio.run(_bootstrap(args))
    if args.json:
        print(json.dumps({"created": created, "existing": existing}))
        return 0
    for part in created:
        print(f"created {part}")
    if not created:
        say(f"nothing to create: all {len(existing)} buckets and streams exist")
    elif existing:
        say(f"left as they were: {', '.join(existing)}")
    return 0
