"""`ferry image build|import|rm|ls|pull`: named stacks of read-only layers, on hosts ahead of use.

A layer is a directory packed into a deterministic tar, stored once in the `ferry-layers`
object store under its sha256; an image is a name for a stack of them (KV `ferry-images`).
Hosts fetch, verify and unpack a layer the first time they need it, or ahead of time with
`image pull`, and keep it: a migration never carries a layer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import ObjectNotFoundError

from schemas import subjects
from schemas.v1.containers import (
    IMAGE_NAME_PATTERN,
    MAX_LAYERS,
    Image,
    LayerList,
    LayersPulled,
    ListLayers,
    PullLayers,
)
from services import bus, topology
from services.cli.context import (
    connected,
    context_or_none,
    current_context,
    operator_placements,
    say,
)
from services.cli.host_commands import check_host
from services.errors import (
    Conflict,
    FerryError,
    InvalidInput,
    NotFound,
    RuntimeFailure,
    Unavailable,
)
from services.images import oci_import
from services.kvstores import KvHostDirectory, KvImageStore
from services.runtime import layers

PULL_TIMEOUT_S = 600.0
LIST_TIMEOUT_S = 5.0
SHORT = 12


def check_image_name(name: str, field: str) -> str:
    if not re.match(IMAGE_NAME_PATTERN, name):
        raise InvalidInput(
            f"{name!r} is not a valid image name (lowercase letters, digits, '.', '_', '-';"
            " at most 63; starts with a letter or digit)",
            field=field,
        )
    return name


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


async def image_store(nc: NATS) -> KvImageStore:
    js = nc.jetstream()
    await topology.require_topology(js)  # never made here: `ferry bootstrap` does, once
    return KvImageStore(await bus.bucket(js, subjects.IMAGES_BUCKET))


async def find_image(images: KvImageStore, name: str, field: str) -> Image:
    image = await images.get(name)
    if image is None:
        known = ", ".join(i.name for i in await images.all()) or "none"
        raise NotFound(f"no image named {name!r} (known: {known})", field=field)
    return image


async def layer_sizes(nc: NATS, digests: tuple[str, ...]) -> dict[str, int]:
    """Each layer's size in the store; a layer missing there is a broken image."""
    store = await bus.layers(nc.jetstream())
    sizes = {}
    for digest in digests:
        try:
            sizes[digest] = int((await store.get_info(digest)).size or 0)
        except ObjectNotFoundError:
            raise RuntimeFailure(
                f"layer {digest[:SHORT]} is missing from the layer store"
            ) from None
    return sizes


async def upload_layer(nc: NATS, rootfs: Path, field: str) -> tuple[str, int]:
    """Pack `rootfs` and put it in the layer store unless it is there; (digest, tar size)."""
    if not rootfs.is_dir():
        raise InvalidInput(f"{rootfs} is not a directory", field=field)
    with tempfile.TemporaryDirectory(prefix="ferry-layer-") as tmp:
        tar_path = Path(tmp) / "layer.tar"
        digest = await asyncio.to_thread(layers.pack_rootfs, rootfs, tar_path)
        size = await put_layer(nc, tar_path, digest, f"from {rootfs}")
    return digest, size


async def put_layer(nc: NATS, tar_path: Path, digest: str, origin: str) -> int:
    """Put a checked layer tar in the layer store under its digest unless it is there;
    its size."""
    store = await bus.layers(nc.jetstream())
    size = tar_path.stat().st_size
    try:
        await store.get_info(digest)
        say(f"layer {digest[:SHORT]} already in the layer store")
    except ObjectNotFoundError:
        say(f"uploading layer {digest[:SHORT]} ({_mib(size)}) {origin}")
        with tar_path.open("rb") as f:
            await store.put(digest, f)
    return size


def _image_json(image: Image, sizes: dict[str, int]) -> dict[str, Any]:
    return {
        "name": image.name,
        "base": image.base,
        "created_at": image.created_at,
        "source": image.source,
        "layers": [{"digest": d, "size_bytes": sizes[d]} for d in image.layers],
        "size_bytes": sum(sizes[d] for d in image.layers),
    }


# ---- build --------------------------------------------------------------------------------


async def _build(args: argparse.Namespace) -> dict[str, Any]:
    name = check_image_name(args.name, "--name")
    base_name = check_image_name(args.base, "--base") if args.base else None
    rootfs = Path(args.dir)
    if not rootfs.is_dir():
        raise InvalidInput(f"{args.dir} is not a directory", field="DIR")
    async with connected(current_context(args)) as nc:
        images = await image_store(nc)
        below: tuple[str, ...] = ()
        if base_name is not None:
            below = (await find_image(images, base_name, "--base")).layers
            if len(below) >= MAX_LAYERS:
                raise InvalidInput(
                    f"image {base_name!r} already has {len(below)} layers, the most an image"
                    " may have",
                    field="--base",
                )
        digest, _ = await upload_layer(nc, rootfs, "DIR")
        if digest in below:
            raise InvalidInput(
                f"{rootfs} packs to layer {digest[:SHORT]}, which image {base_name!r} already"
                " holds",
                field="DIR",
            )
        image = Image(name=name, layers=(*below, digest), base=base_name, created_at=time.time())
        await images.put(image)
        sizes = await layer_sizes(nc, image.layers)
    return _image_json(image, sizes)


def image_build(args: argparse.Namespace) -> int:
    built = asyncio.run(_build(args))
    if args.json:
        print(json.dumps(built))
        return 0
    on = f" on {built['base']}" if built["base"] else ""
    say(f"image {built['name']}{on}: {len(built['layers'])} layer(s), {_mib(built['size_bytes'])}")
    for layer in built["layers"]:  # lowest first
        print(layer["digest"])
    return 0


# ---- import -------------------------------------------------------------------------------


async def _import(args: argparse.Namespace) -> dict[str, Any]:
    name = check_image_name(args.name, "--name")
    source = Path(args.path)
    if not source.exists():
        raise InvalidInput(f"{source} does not exist", field="PATH")
    with tempfile.TemporaryDirectory(prefix="ferry-import-") as tmp:
        # Everything is checked and converted before the bus is touched: a bad image
        # changes nothing.
        imported = await asyncio.to_thread(
            oci_import.convert_image, source, args.ref, Path(tmp), say
        )
        async with connected(current_context(args)) as nc:
            images = await image_store(nc)
            for layer in imported.layers:
                await put_layer(
                    nc, layer.path, layer.digest, f"(image layer {layer.diff_id[:SHORT]})"
                )
            image = Image(
                name=name,
                layers=tuple(layer.digest for layer in imported.layers),
                created_at=time.time(),
                config=imported.config,
                source=imported.digest,
            )
            replaced = await images.get(name)
            await images.put(image)
            sizes = await layer_sizes(nc, image.layers)
    if replaced is not None:
        say(f"image {name} replaced (its containers keep the layers they run on)")
    row = _image_json(image, sizes)
    row["config"] = imported.config.model_dump(mode="json")
    row["ref"] = imported.ref
    row["whiteouts"] = sum(layer.whiteouts for layer in imported.layers)
    row["opaque_dirs"] = sum(layer.opaque_dirs for layer in imported.layers)
    return row


def image_import(args: argparse.Namespace) -> int:
    imported = asyncio.run(_import(args))
    if args.json:
        print(json.dumps(imported))
        return 0
    say(
        f"image {imported['name']} ({imported['source'][:19]}, {imported['ref'] or 'untagged'}):"
        f" {len(imported['layers'])} layer(s), {_mib(imported['size_bytes'])},"
        f" {imported['whiteouts']} whiteout(s), {imported['opaque_dirs']} opaque dir(s)"
    )
    for layer in imported["layers"]:
        print(layer["digest"])
    return 0


# ---- rm -----------------------------------------------------------------------------------


async def _rm(args: argparse.Namespace) -> dict[str, Any]:
    name = check_image_name(args.name, "NAME")
    async with connected(current_context(args)) as nc:
        js = nc.jetstream()
        images = await image_store(nc)
        image = await find_image(images, name, "NAME")
        placements = await (await operator_placements(js)).all()
        users = sorted(p.name for p in placements if p.spec.image == name)
        if users:
            raise Conflict(
                f"image {name!r} is used by {', '.join(users)}: remove them first", field="NAME"
            )
        await images.delete(name)
        # A layer leaves the store only when no other image and no container names it;
        # hosts drop their unpacked copies on their own sweeps (services/cleanup/layers.py).
        others = await images.all()
        needed = {d for i in others for d in i.layers} | {
            d for p in placements for d in p.spec.layers
        }
        store = await bus.layers(js)
        removed, kept = [], []
        for digest in image.layers:
            if digest in needed:
                kept.append(digest)
                continue
            with contextlib.suppress(ObjectNotFoundError):
                await store.delete(digest)
            removed.append(digest)
    return {"name": name, "layers_removed": removed, "layers_kept": kept}


def image_rm(args: argparse.Namespace) -> int:
    done = asyncio.run(_rm(args))
    if args.json:
        print(json.dumps(done))
        return 0
    say(
        f"image {done['name']} removed; {len(done['layers_removed'])} layer(s) left the store,"
        f" {len(done['layers_kept'])} kept (other images or containers use them)"
    )
    return 0


# ---- ls -----------------------------------------------------------------------------------


async def live_hosts(nc: NATS) -> tuple[list[str], list[str]]:
    """(every registered host, the live ones)."""
    js = nc.jetstream()
    directory = KvHostDirectory(
        await bus.bucket(js, subjects.REGISTRY_BUCKET), await bus.bucket(js, subjects.HOSTS_BUCKET)
    )
    known = await directory.known_hosts()
    alive = [h for h in known if await directory.alive(h)]
    return known, alive


async def _held_by(nc: NATS, host: str) -> set[str] | None:
    try:
        listed = await bus.request(
            nc,
            subjects.host_request(host, subjects.LIST_LAYERS),
            ListLayers(),
            LayerList,
            timeout=LIST_TIMEOUT_S,
            what=f"list layers on {host}",
        )
    except FerryError as exc:
        say(f"warning: {exc.reason}")
        return None
    return {layer.digest for layer in listed.layers}


def _present(image: Image, held: set[str] | None) -> list[str] | None:
    """The image's layers a host holds; None when the host could not be asked."""
    return None if held is None else [d for d in image.layers if d in held]


async def _ls(args: argparse.Namespace) -> list[dict[str, Any]]:
    context = context_or_none(args)
    if context is None:
        return []
    async with connected(context) as nc:
        all_images = await (await image_store(nc)).all()
        known, alive = await live_hosts(nc)
        held = dict(
            zip(alive, await asyncio.gather(*(_held_by(nc, h) for h in alive)), strict=True)
        )
        rows = []
        for image in all_images:
            try:
                sizes = await layer_sizes(nc, image.layers)
            except RuntimeFailure as exc:
                say(f"warning: image {image.name}: {exc.reason}")
                sizes = {d: 0 for d in image.layers}
            row = _image_json(image, sizes)
            row["hosts"] = {host: _present(image, held.get(host)) for host in known}
            rows.append(row)
    return rows


def image_ls(args: argparse.Namespace) -> int:
    rows = asyncio.run(_ls(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    hosts = sorted({h for row in rows for h in row["hosts"]})
    print(f"{'IMAGE':<20} {'LAYERS':<27} {'SIZE':>10}  " + " ".join(f"{h:<6}" for h in hosts))
    for row in rows:
        digests = [layer["digest"][:SHORT] for layer in row["layers"]]
        shown = ",".join(digests) if len(digests) <= 2 else f"{digests[-1]} (+{len(digests) - 1})"
        per_host = []
        for h in hosts:
            present = row["hosts"][h]
            per_host.append("down  " if present is None else f"{len(present)}/{len(digests):<4}")
        print(f"{row['name']:<20} {shown:<27} {_mib(row['size_bytes']):>10}  " + " ".join(per_host))
    return 0


# ---- pull ---------------------------------------------------------------------------------


async def _pull_one(nc: NATS, host: str, image: Image) -> tuple[str, LayersPulled | FerryError]:
    try:
        pulled = await bus.request(
            nc,
            subjects.host_request(host, subjects.PULL_LAYERS),
            PullLayers(layers=image.layers, image=image.name),
            LayersPulled,
            timeout=PULL_TIMEOUT_S,
            what=f"pull {image.name} on {host}",
        )
    except FerryError as exc:
        return host, exc
    return host, pulled


async def _pull(args: argparse.Namespace) -> list[tuple[str, LayersPulled | FerryError]]:
    name = check_image_name(args.name, "NAME")
    async with connected(current_context(args)) as nc:
        if args.host is not None:
            await check_host(nc, args.host)
        image = await find_image(await image_store(nc), name, "NAME")
        await layer_sizes(nc, image.layers)  # every layer is in the store
        if args.host is not None:
            targets = [args.host]
        else:
            targets = (await live_hosts(nc))[1]
            if not targets:
                raise Unavailable("no live host to pull onto")
        say(f"pulling {name} ({len(image.layers)} layer(s)) onto {', '.join(targets)}")
        return list(await asyncio.gather(*(_pull_one(nc, h, image) for h in targets)))


def image_pull(args: argparse.Namespace) -> int:
    """Exit 0 when every host has every layer, 1 when any host failed (each one says why)."""
    results = asyncio.run(_pull(args))
    rows: list[dict[str, Any]] = []
    for host, result in results:
        if isinstance(result, FerryError):
            say(f"ferry: {host}: {result.reason}")
            rows.append({"host": host, "error": result.detail().model_dump(mode="json")})
            continue
        say(
            f"{host}: {len(result.fetched)} layer(s) fetched and verified"
            f" ({_mib(result.bytes_fetched)}), {len(result.present)} already there"
        )
        rows.append(result.model_dump(mode="json", exclude={"schema_version"}))
    if args.json:
        print(json.dumps(rows))
    return 1 if any("error" in row for row in rows) else 0
