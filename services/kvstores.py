"""The shared-state protocols of services.stores, backed by NATS JetStream KV and Object Store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.v1.containers import Image, Placement
from schemas.v1.hosts import DeadDeclaration, HostRegistration
from schemas.v2.migrations import MigrationRecord, read_record
from services.errors import Conflict, NotFound, Unavailable

KEYS_ATTEMPTS = 3


async def _keys(kv: KeyValue) -> list[str]:
    """A bucket's keys; none when it is empty (nats-py raises NoKeysError for that).

    Listing keys runs a short-lived consumer that can time out while the bus is busy or
    restarting: try again, then say so — an empty answer would read as "nothing there".
    nats-py can also say "no keys" for a bucket that has some (its end-of-values marker can
    overtake the values on a loaded machine): that answer is believed only when the
    bucket's stream holds no message at all, or when asking again keeps giving it.
    """
    for attempt in range(1, KEYS_ATTEMPTS + 1):
        try:
            return list(await kv.keys())
        except NoKeysError:
            if attempt == KEYS_ATTEMPTS or (await kv.status()).values == 0:
                return []
        except (NatsError, TimeoutError) as exc:
            if attempt == KEYS_ATTEMPTS:
                raise Unavailable(f"cannot list the keys of a bucket: {exc!r}") from exc
        await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


async def _entry(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    """A key's entry, or None if the key is absent. A bus that does not answer (restarting,
    cut off) is Unavailable — a retry may succeed — never "absent"."""
    try:
        return await kv.get(key)
    except KeyNotFoundError:
        return None
    except (NatsError, TimeoutError) as exc:
        raise Unavailable(f"cannot read {key!r} from the bus: {exc!r}") from exc


class KvPlacementStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, name: str) -> tuple[Placement, int] | None:
        entry = await _entry(self.kv, name)
        if entry is None or not entry.value:
            return None
        return Placement.from_bytes(entry.value), int(entry.revision or 0)

    async def claim(self, placement: Placement) -> int:
        try:
            return int(await self.kv.create(placement.name, placement.to_bytes()))
        except KeyWrongLastSequenceError as exc:
            current = await self.get(placement.name)
            where = f" on {current[0].host}" if current else ""
            raise Conflict(
                f"a container named {placement.name!r} already exists{where}", field="name"
            ) from exc

    async def update(self, placement: Placement, revision: int) -> int:
        try:
            return int(await self.kv.update(placement.name, placement.to_bytes(), last=revision))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(
                f"placement of {placement.name!r} changed concurrently"
                f" (expected revision {revision})"
            ) from exc

    async def remove(self, name: str) -> None:
        await self.kv.delete(name)

    async def all(self) -> list[Placement]:
        keys = await _keys(self.kv)
        found = []
        for key in keys:
            got = await self.get(key)
            if got is not None:
                found.append(got[0])
        return found


class KvAddressPool:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def allocate(self, owner: str, candidates: list[str]) -> str:
        for ip in candidates:
            try:
                await self.kv.create(subjects.ip_key(ip), owner.encode())
            except KeyWrongLastSequenceError:
                continue
            return ip
        raise Unavailable(f"no free address left in the pool ({len(candidates)} in all)")

    async def owners(self) -> dict[str, str]:
        keys = await _keys(self.kv)
        found = {}
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                found[key.replace("-", ".")] = entry.value.decode()
        return found

    async def release(self, ip: str, owner: str) -> None:
        key = subjects.ip_key(ip)
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return
        if entry.value == owner.encode():
            await self.kv.delete(key, last=entry.revision)


class ObjectStoreLayers:
    """Layers as hosts fetch them: the JetStream object store, one object per sha256."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def fetch(self, digest: str, into: Path) -> None:
        try:
            store = await self.js.object_store(subjects.LAYERS_STORE)
            with into.open("wb") as f:
                # writeinto streams chunks to disk; without it nats-py's get is quadratic.
                await store.get(digest, writeinto=f)
        except ObjectNotFoundError as exc:
            raise NotFound(f"layer {digest[:12]} is not in the layer store", field="layer") from exc
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"fetching layer {digest[:12]} failed: {exc!r}") from exc


class KvImageStore:
    """Images by name (KV ferry-images); a rebuild replaces the name's record."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, name: str) -> Image | None:
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            return None
        return Image.from_bytes(entry.value) if entry.value else None

    async def put(self, image: Image) -> None:
        await self.kv.put(image.name, image.to_bytes())

    async def all(self) -> list[Image]:
        found = []
        for key in await _keys(self.kv):
            image = await self.get(key)
            if image is not None:
                found.append(image)
        return sorted(found, key=lambda i: i.name)


class KvMigrationStore:
    """Migration records; every write is compare-and-set on the entry's revision."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, migration_id: str) -> tuple[MigrationRecord, int] | None:
        entry = await _entry(self.kv, migration_id)
        if entry is None or not entry.value:
            return None
        # Any supported version: a record written by an older Ferry is upcast on read.
        return read_record(entry.value), int(entry.revision or 0)

    async def create(self, record: MigrationRecord) -> int:
        try:
            return int(await self.kv.create(record.id, record.to_bytes()))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(f"migration {record.id} already exists") from exc

    async def update(self, record: MigrationRecord, revision: int) -> int:
        try:
            return int(await self.kv.update(record.id, record.to_bytes(), last=revision))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(f"migration {record.id} changed concurrently") from exc

    async def is_live(self, migration_id: str) -> bool | None:
        found = await self.get(migration_id)
        if found is None:
            return None
        return found[0].state in ("running", "compensating")

    async def all(self) -> list[MigrationRecord]:
        keys = await _keys(self.kv)
        records = []
        for key in keys:
            got = await self.get(key)
            if got is not None:
                records.append(got[0])
        return sorted(records, key=lambda r: r.created_at)


class KvHostDirectory:
    """Which hosts exist (registry) and which are alive (heartbeats)."""

    def __init__(self, registry: KeyValue, heartbeats: KeyValue) -> None:
        self.registry = registry
        self.heartbeats = heartbeats

    async def registered(self, host: str) -> HostRegistration | None:
        entry = await _entry(self.registry, host)
        if entry is None or not entry.value:
            return None
        return HostRegistration.from_bytes(entry.value)

    async def address_of(self, host: str) -> str:
        registration = await self.registered(host)
        if registration is None:
            raise NotFound(f"unknown host {host!r}", field="host")
        return registration.address

    async def known_hosts(self) -> list[str]:
        return sorted(await _keys(self.registry))

    async def alive(self, host: str) -> bool:
        try:
            beat = await self.heartbeats.get(host)
        except KeyNotFoundError:
            return False
        return bool(beat.value)

    async def declared_dead(self) -> dict[str, DeadDeclaration]:
        """The hosts an operator declared dead, and what they said."""
        found = {}
        for host in await self.known_hosts():
            registration = await self.registered(host)
            if registration is not None and registration.declared_dead is not None:
                found[host] = registration.declared_dead
        return found

    async def declare_dead(
        self, host: str, declaration: DeadDeclaration, *, force: bool = False
    ) -> HostRegistration:
        """Record an operator's declaration in the host's registry entry (compare-and-set: an
        agent registering again meanwhile is read again, never overwritten). A host whose agent
        still heartbeats is refused unless `force`. Declaring twice keeps the first words."""
        for _ in range(KEYS_ATTEMPTS):
            entry = await _entry(self.registry, host)
            if entry is None or not entry.value:
                known = ", ".join(await self.known_hosts()) or "none"
                raise NotFound(f"unknown host {host!r} (known: {known})", field="host")
            registration = HostRegistration.from_bytes(entry.value)
            if registration.declared_dead is not None:
                return registration
            live = await self.alive(host)
            if live and not force:
                raise Conflict(
                    f"{host}'s agent still sends heartbeats: a live host is not dead"
                    " (stop it first, or --force if you know its containers and disks are gone)",
                    field="host",
                )
            declared = registration.model_copy(
                update={"declared_dead": declaration.model_copy(update={"forced": live})}
            )
            try:
                await self.registry.update(host, declared.to_bytes(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            except (NatsError, TimeoutError) as exc:
                raise Unavailable(f"cannot write {host!r}'s registration: {exc!r}") from exc
            return declared
        raise Conflict(f"the registration of {host!r} kept changing; try again", field="host")
