"""`ferry container run|rm|inspect` and `ferry containers`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from pydantic import ValidationError

from schemas import subjects
from schemas.v1.base import NAME_PATTERN
from schemas.v1.constraints import Constraints
from schemas.v1.containers import (
    MAX_LOG_LINES,
    USER_PATTERN,
    ContainerCreated,
    ContainerList,
    ContainerLogs,
    ContainerRemoved,
    CreateContainer,
    ImageConfig,
    ListContainers,
    ReadLogs,
    RemoveContainer,
    VolumeMount,
)
from schemas.v1.fleet import PlaceContainer, PlacementChoice
from services import bus
from services.cli.context import (
    BusContext,
    connected,
    context_or_none,
    current_context,
    operator_placements,
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
from services.cli.volume_commands import check_volumes_for_run
from services.errors import Conflict, FerryError, InvalidInput, NotFound
from services.fleet_state import ask_placement
from workflows.container_process import (
    OptionError,
    RunOptions,
    capabilities,
    merged_env,
    parse_env_file,
    parse_volume,
    process_for,
)

CREATE_TIMEOUT_S = 180.0
REMOVE_TIMEOUT_S = 60.0
LIST_TIMEOUT_S = 5.0


# CreateContainer's fields, as the options that set them (for errors pydantic finds).
_FLAGS = {
    "args": "CMD", "env": "--env", "user": "--user", "workdir": "--workdir",
    "hostname": "--hostname", "cpus": "--cpus", "capabilities": "--cap-add",
    "shm_mib": "--shm-size", "labels": "--label", "memory_mib": "--memory", "name": "--name",
    "volumes": "--volume",
}  # fmt: skip


def _pairs(entries: list[str], field: str) -> dict[str, str]:
    found = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{entry!r} is not KEY=VALUE", field=field)
        found[key] = value
    return found


def _env_files(paths: list[str]) -> tuple[str, ...]:
    found: list[str] = []
    for name in paths:
        try:
            text = Path(name).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{name} cannot be read: {exc}", field="--env-file") from None
        found += parse_env_file(text, os.environ, name)
    return tuple(found)


def _volumes(entries: list[str]) -> tuple[VolumeMount, ...]:
    mounts = []
    for entry in entries:
        try:
            name, path, readonly = parse_volume(entry)
            mounts.append(VolumeMount(name=name, path=path, readonly=readonly))
        except OptionError as exc:
            raise InvalidInput(exc.reason, field=exc.field) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidInput(
                f"{entry!r}: {first['msg'].removeprefix('Value error, ')}", field="--volume"
            ) from None
    return tuple(mounts)


# The scheduler's and the controller's fields, as the options that set them.
_CONSTRAINT_FLAGS = {
    "zone": "--zone", "host_labels": "--host-label", "anti_affinity": "--anti-affinity",
    "pinned_host": "--pin", "constraints.zone": "--zone", "constraints.host_labels": "--host-label",
    "constraints.pinned_host": "--pin", "host": "--host",
}  # fmt: skip


def _constraints(args: argparse.Namespace, host: str | None) -> Constraints:
    """The constraints the options ask for; `host`: where --pin pins it (once known)."""
    anti = None
    if args.anti_affinity:
        group, _, scope = args.anti_affinity.partition(":")
        if scope not in ("", "host", "zone"):
            raise InvalidInput(
                f"{args.anti_affinity!r}: the scope is host or zone, not {scope!r}",
                field="--anti-affinity",
            )
        anti = {"group": group, "scope": scope or "host"}
    try:
        return Constraints.model_validate(
            {
                "zone": args.zone,
                "host_labels": _pairs(args.host_label, "--host-label"),
                "anti_affinity": anti,
                "pinned_host": host if args.pin else None,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else ""
        raise InvalidInput(
            f"{first['msg']}: {first.get('input')!r}", field=_CONSTRAINT_FLAGS.get(where, where)
        ) from None


async def _placed(nc: NATS, args: argparse.Namespace, constraints: Constraints) -> PlacementChoice:
    """Where the fleet controller puts it (judging only --host if given), room reserved."""
    question = PlaceContainer(
        container=args.name,
        purpose="create",
        memory_mib=args.memory,
        cpus=args.cpus,
        constraints=constraints,
        host=args.host,
    )
    try:
        return await ask_placement(nc, question)
    except FerryError as exc:
        if exc.field in _CONSTRAINT_FLAGS:
            exc.field = _CONSTRAINT_FLAGS[exc.field]
        raise


def _validate_run(args: argparse.Namespace) -> RunOptions:
    """Everything about the request that needs no bus (--host is checked against it; the
    image's config is merged once it is read, and the result validated again as a whole)."""
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
    if args.cpus is not None and not 0 < args.cpus <= 1024:
        raise InvalidInput(f"must be above 0 and at most 1024, not {args.cpus}", field="--cpus")
    if args.user is not None and not re.match(USER_PATTERN, args.user):
        raise InvalidInput(
            f"{args.user!r} is not UID[:GID] or NAME[:GROUP] (letters, digits, '_', '.', '-')",
            field="--user",
        )
    if args.workdir is not None and not args.workdir.startswith("/"):
        raise InvalidInput(f"{args.workdir!r} is not an absolute path", field="--workdir")
    if not 1 <= args.shm_size <= 65536:
        raise InvalidInput(
            f"must be between 1 and 65536 MiB, not {args.shm_size}", field="--shm-size"
        )
    command: list[str] = args.command[1:] if args.command[:1] == ["--"] else args.command
    entrypoint = None if args.entrypoint is None else tuple(filter(None, [args.entrypoint]))
    try:
        env = merged_env(_env_files(args.env_file), args.env)
        options = RunOptions(
            command=tuple(command),
            entrypoint=entrypoint,
            env=env,
            user=args.user,
            workdir=args.workdir,
            labels=_pairs(args.label, "--label"),
            cap_add=tuple(args.cap_add),
            cap_drop=tuple(args.cap_drop),
        )
        capabilities(options.cap_add, options.cap_drop)  # refused now, not after the bus
    except OptionError as exc:
        raise InvalidInput(exc.reason, field=exc.field) from None
    if args.image is None and not command:
        raise InvalidInput("no command given (put it after `--`)", field="CMD")
    _constraints(args, args.host or "h")  # any valid host stands in for the one --pin gets
    # Every option's shape, checked now as the request will be (a command stands in for
    # the image's, which only the bus knows): bad input fails before anything is asked.
    _request(args, replace(options, command=options.command or ("cmd",)), None, ("0" * 64,), None)
    return options


def _request(
    args: argparse.Namespace, options: RunOptions, config: ImageConfig | None,
    stack: tuple[str, ...], from_image: str | None, choice: PlacementChoice | None = None,
) -> CreateContainer:  # fmt: skip
    """The request: the image's run config merged with the options, validated whole."""
    try:
        process = process_for(config, options)
    except OptionError as exc:
        raise InvalidInput(exc.reason, field=exc.field) from None
    try:
        return CreateContainer(
            name=args.name,
            layers=stack,
            image=from_image,
            args=process.args,
            env=process.env,
            memory_mib=args.memory,
            user=process.user,
            workdir=process.workdir,
            hostname=args.hostname,
            cpus=args.cpus,
            capabilities=process.capabilities,
            shm_mib=args.shm_size,
            labels=process.labels,
            volumes=_volumes(args.volume),
            restart=args.restart,
            constraints=_constraints(args, choice.host if choice else None),
            placed=choice.ticket if choice else None,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else ""
        origin = (
            " (from the image)"
            if config is not None and where in ("env", "user", "workdir", "labels")
            else ""
        )
        raise InvalidInput(
            f"{first['msg']}: {first.get('input')!r}{origin}", field=_FLAGS.get(where, where)
        ) from None


async def _run(args: argparse.Namespace) -> ContainerCreated:
    options = _validate_run(args)
    context = current_context(args)
    async with connected(context) as nc:
        if args.host is not None:
            await check_host(nc, args.host)
        placements = await operator_placements(nc.jetstream())
        existing = await placements.get(args.name)
        if existing is not None:
            raise Conflict(
                f"a container named {args.name!r} already exists on {existing[0].host}",
                field="--name",
            )
        config = None
        stack: tuple[str, ...] = ()
        from_image: str | None = None
        if args.image is not None:
            image = await find_image(await image_store(nc), args.image, "--image")
            await layer_sizes(nc, image.layers)  # a broken image fails here, not on the host
            stack, from_image, config = image.layers, image.name, image.config
        choice = await _placed(nc, args, _constraints(args, args.host))
        host = choice.host
        await check_volumes_for_run(nc, args.name, host, _volumes(args.volume))
        if args.image is None:  # a one-layer image without a name
            stack = ((await upload_layer(nc, Path(args.rootfs), "--rootfs"))[0],)
        request = _request(args, options, config, stack, from_image, choice)
        what = f"image {request.image}" if request.image else f"layer {request.layers[0][:12]}"
        why = "" if choice.named_by_operator else f" (scheduler: {'; '.join(choice.reasons)})"
        say(f"starting {args.name} on {host} from {what}{why}")
        return await bus.request(
            nc,
            subjects.host_request(host, subjects.CREATE_CONTAINER),
            request,
            ContainerCreated,
            timeout=CREATE_TIMEOUT_S,
            what=f"create {args.name} on {host}",
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
        placements = await operator_placements(nc.jetstream())
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


FOLLOW_POLL_S = 0.5


def _print_lines(logs: ContainerLogs, timestamps: bool) -> None:
    for line in logs.lines:
        if timestamps and line.at is not None:
            stamp = datetime.fromtimestamp(line.at, UTC).isoformat(timespec="microseconds")
            print(f"{stamp} {line.text}", flush=False)
        else:
            print(line.text, flush=False)
    sys.stdout.flush()


async def _logs(args: argparse.Namespace) -> None:
    if args.tail is not None and not 0 <= args.tail <= MAX_LOG_LINES:
        raise InvalidInput(
            f"must be between 0 and {MAX_LOG_LINES}, not {args.tail}", field="--tail"
        )
    async with connected(current_context(args)) as nc:
        placements = await operator_placements(nc.jetstream())
        cursor: str | None = None
        while True:
            found = await placements.get(args.name)
            if found is None:
                raise NotFound(f"no container named {args.name!r}", field="NAME")
            host = found[0].host  # asked again each time: the log moves with the container
            logs = await bus.request(
                nc,
                subjects.host_request(host, subjects.CONTAINER_LOGS),
                ReadLogs(name=args.name, tail=args.tail if cursor is None else None, after=cursor),
                ContainerLogs,
                timeout=LIST_TIMEOUT_S,
                what=f"read the log of {args.name} on {host}",
            )
            _print_lines(logs, args.timestamps)
            if not args.follow:
                return
            cursor = logs.cursor
            await asyncio.sleep(FOLLOW_POLL_S)


def container_logs(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_logs(args))
    return 0


async def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    async with connected(current_context(args)) as nc:
        placements = await operator_placements(nc.jetstream())
        found = await placements.get(args.name)
    if found is None:
        raise NotFound(f"no container named {args.name!r}", field="NAME")
    placement, revision = found
    shown = placement.model_dump(
        mode="json", exclude={"schema_version", "layers", "image", "args", "memory_mib"}
    )
    shown["revision"] = revision
    shown["spec"]["capabilities"] = list(placement.spec.granted_capabilities)
    return shown


def container_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(_inspect(args)), indent=2))
    return 0


async def _list(context: BusContext) -> list[dict[str, Any]]:
    async with connected(context) as nc:
        placements = await (await operator_placements(nc.jetstream())).all()

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
