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

from nats.js.errors import APIError

from services import topology
from services.cli.context import connected, current_context, say
from services.errors import InvalidInput


async def _bootstrap(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    async with connected(current_context(args)) as nc:
        try:
            # A cluster that just started needs seconds to elect its leader: wait for it.
            created = await topology.create_topology_when_ready(
                nc.jetstream(), hosts=args.host, replicas=args.replicas, say=say
            )
        except APIError as exc:  # e.g. more replicas than the cluster has servers
            raise InvalidInput(
                f"the bus refused to create with {args.replicas} replicas: {exc.description}",
                field="--replicas",
            ) from exc
    existing = [str(p) for p in topology.every_part() if str(p) not in created]
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
