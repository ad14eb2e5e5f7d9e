"""`ferry container run|rm` and `ferry containers`."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any

from schemas import subjects
from schemas.v1.base import NAME_PATTERN
from schemas.v1.containers import (
    ContainerCreated,
    ContainerList,
    ContainerRemoved,
    CreateContainer,
    ListContainers,
    RemoveContainer,
)
from services import bus
from services.cli.context import (
    BusContext,
    connected,
    context_or_none,
    current_context,
    say,
)
from services.cli.host_commands import check_host
from services.cli.image_commands import (
    check_image_name,
    find_image,
    image_store,
    layer_sizes,
    upload_layer,
)
from services.errors import Conflict, FerryError, InvalidInput, NotFound
from services.kvstores import KvPlacementStore
from workflows.placement_chain import OPERATOR_AUTHOR

CREATE_TIMEOUT_S = 180.0
REMOVE_TIMEOUT_S = 60.0
LIST_TIMEOUT_S = 5.0


def _validate_run(args: argparse.Namespace) -> list[str]:
    """Everything about the request that needs no bus (--host is checked against it)."""
    if not re.match(NAME_PATTERN, args.name):
        raise InvalidInput(
            f"{args.name!r} is not a valid name (lowercase letters, digits, '.', '_', '-';"
            " at most 63; starts with a letter or digit)",
            field="--name",
        )
    if args.rootfs is not None and not Path(args.rootfs).is_dir():
        raise InvalidInput(f"{args.rootfs} is not a directory", field="--rootfs")
    if args.image is not None:
        check_image_name(args.image, "--image")
    if args.memory is not None and not 4 <= args.memory <= 65536:
        raise InvalidInput(f"must be between 4 and 65536 MiB, not {args.memory}", field="--memory")
    command: list[str] = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise InvalidInput("no command given (put it after `--`)", field="CMD")
    return command


async def _run(args: argparse.Namespace) -> ContainerCreated:
    context = current_context(args)
    command = _validate_run(args)
    async with connected(context) as nc:
        await check_host(nc, args.host)
        placements = KvPlacementStore(
            await bus.bucket(nc.jetstream(), subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
        )
        existing = await placements.get(args.name)
        if existing is not None:
            raise Conflict(
                f"a container named {args.name!r} already exists on {existing[0].host}",
                field="--name",
            )
        if args.image is not None:
            image = await find_image(await image_store(nc), args.image, "--image")
            await layer_sizes(nc, image.layers)  # a broken image fails here, not on the host
            stack, from_image = image.layers, image.name
        else:  # a one-layer image without a name
            stack, from_image = ((await upload_layer(nc, Path(args.rootfs), "--rootfs"))[0],), None
        request = CreateContainer(
            name=args.name,
            layers=stack,
            image=from_image,
            args=tuple(command),
            memory_mib=args.memory,
        )
        what = f"image {from_image}" if from_image else f"layer {stack[0][:12]}"
        say(f"starting {args.name} on {args.host} from {what}")
        return await bus.request(
            nc,
            subjects.host_request(args.host, subjects.CREATE_CONTAINER),
            request,
            ContainerCreated,
            timeout=CREATE_TIMEOUT_S,
            what=f"create {args.name} on {args.host}",
        )


def container_run(args: argparse.Namespace) -> int:
    created = asyncio.run(_run(args))
    if args.json:
        print(created.model_dump_json())
    else:
        say(f"{created.name} runs on {created.host} (pid {created.pid}, mac {created.mac})")
        print(created.ip)
    return 0


async def _rm(args: argparse.Namespace) -> ContainerRemoved:
    async with connected(current_context(args)) as nc:
        placements = KvPlacementStore(
            await bus.bucket(nc.jetstream(), subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
        )
        found = await placements.get(args.name)
        if found is None:
            raise NotFound(f"no container named {args.name!r}", field="NAME")
        host = found[0].host
        say(f"removing {args.name} from {host}")
        return await bus.request(
            nc,
            subjects.host_request(host, subjects.REMOVE_CONTAINER),
            RemoveContainer(name=args.name),
            ContainerRemoved,
            timeout=REMOVE_TIMEOUT_S,
            what=f"remove {args.name} from {host}",
        )


def container_rm(args: argparse.Namespace) -> int:
    removed = asyncio.run(_rm(args))
    if args.json:
        print(removed.model_dump_json())
    else:
        say(f"{removed.name} removed from {removed.host}")
    return 0


async def _list(context: BusContext) -> list[dict[str, Any]]:
    async with connected(context) as nc:
        placements = await KvPlacementStore(
            await bus.bucket(nc.jetstream(), subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
        ).all()

        async def ask(host: str) -> ContainerList | None:
            try:
                return await bus.request(
                    nc,
                    subjects.host_request(host, subjects.LIST_CONTAINERS),
                    ListContainers(),
                    ContainerList,
                    timeout=LIST_TIMEOUT_S,
                    what=f"list containers on {host}",
                )
            except FerryError as exc:
                say(f"warning: {exc.reason}")
                return None

        hosts = sorted({p.host for p in placements})
        answers = dict(zip(hosts, await asyncio.gather(*(ask(h) for h in hosts)), strict=True))
    rows = []
    for p in sorted(placements, key=lambda p: p.name):
        answer = answers.get(p.host)
        state = "unknown"
        if answer is not None:
            state = next((c.state for c in answer.containers if c.name == p.name), "missing")
        rows.append({"name": p.name, "host": p.host, "ip": p.ip, "state": state})
    return rows


def containers(args: argparse.Namespace) -> int:
    context = context_or_none(args)
    rows = [] if context is None else asyncio.run(_list(context))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':<20} {'HOST':<6} {'IP':<15} STATE")
    for row in rows:
        print(f"{row['name']:<20} {row['host']:<6} {row['ip']:<15} {row['state']}")
    return 0
