"""The shared-state protocols of services.stores, backed by NATS JetStream KV and Object Store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.v1.containers import Image, Placement
from schemas.v1.hosts import DeadDeclaration, HostRegistration
from schemas.v2.migrations import MigrationRecord, read_record
from services.errors import Conflict, NotFound, Unavailable, Untrusted, described
from workflows import placement_chain

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
            # After NATS restarts, consumer creation can fail for minutes while the rest of
            # the API answers (make chaos saw 3 minutes of BadRequestError): a placement
            # waited that long to be unlocked. The stream can still say its subjects.
            try:
                return await _keys_without_consumer(kv)
            except (NatsError, TimeoutError, Unavailable) as fallback:
                if attempt == KEYS_ATTEMPTS:
                    raise Unavailable(
                        f"cannot list the keys of a bucket: {described(exc)}; "
                        f"without a consumer: {described(fallback)}"
                    ) from exc
        await asyncio.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


# nats-server lists at most this many subjects in one stream info answer (JSMaxSubjectDetails).
STREAM_INFO_SUBJECTS_MAX = 100_000


async def _keys_without_consumer(kv: KeyValue) -> list[str]:
    """A bucket's live keys from its stream's subject counts, each read back by a direct get:
    a subject whose latest message is a delete or purge marker is not a key. nats-py keeps
    the bucket's stream and subject prefix private; they are its stable layout."""
    stream: str = kv._stream
    prefix: str = kv._pre
    info = await kv._js.stream_info(stream, subjects_filter=f"{prefix}>")
    counts = info.state.subjects or {}
    if len(counts) >= STREAM_INFO_SUBJECTS_MAX:
        raise Unavailable(f"{stream} has too many keys to list without a consumer")
    keys = []
    for subject in sorted(counts):
        key = subject.removeprefix(prefix)
        if await _entry(kv, key) is not None:
            keys.append(key)
    return keys


async def _entry(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    """A key's entry, or None if the key is absent. A bus that does not answer (restarting,
    cut off) is Unavailable — a retry may succeed — never "absent"."""
    try:
        return await kv.get(key)
    except KeyNotFoundError:
        return None
    except (NatsError, TimeoutError) as exc:
        raise Unavailable(f"cannot read {key!r} from the bus: {described(exc)}") from exc


EXPECTED_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
KV_OPERATION = "KV-Operation"
WRONG_LAST_SEQUENCE = 10071  # JetStream's "wrong last sequence": the compare-and-set lost
NO_MESSAGE = 10037
PLACEMENT_CAS_ATTEMPTS = 3


class KvPlacementStore:
    """Placements written under their author's name, read with the author checked.

    `author` is the host this store writes for (the bus refuses any other host's keys), or
    `OPERATOR_AUTHOR`. A container's truth is the latest entry over all authors' keys; its
    revision is that entry's stream sequence, and every write is a compare-and-set on it
    across all authors (`workflows/placement_chain.py` says who may change what).
    """

    def __init__(self, kv: KeyValue, *, author: str) -> None:
        self.kv = kv
        self.author = author
        self.stream = f"KV_{subjects.PLACEMENT_BUCKET}"

    @property
    def _js(self) -> JetStreamContext:
        return self.kv._js

    async def get(self, name: str) -> tuple[Placement, int] | None:
        latest = await self._latest(name)
        if latest is None:
            return None
        entry = _entry_of(latest)
        previous = None
        if entry.follows:
            before = await self._at(entry.follows)
            if before is None:
                raise Untrusted(
                    f"placement of {name!r}: the entry {latest.seq} follows"
                    f" ({entry.follows}) is gone; its author cannot be checked"
                )
            previous = _entry_of(before)
        refusal = placement_chain.judge(name, entry, previous)
        if refusal is not None:
            raise Untrusted(f"placement of {name!r} is not trusted: {refusal}")
        if entry.placement is None:
            return None
        return entry.placement, int(latest.seq or 0)

    async def claim(self, placement: Placement) -> int:
        follows = 0
        for _ in range(PLACEMENT_CAS_ATTEMPTS):
            try:
                return await self._write(placement.name, placement.to_bytes(), follows)
            except Conflict:
                latest = await self._latest(placement.name)
                if latest is None or _entry_of(latest).placement is not None:
                    current = await self.get(placement.name)
                    where = f" on {current[0].host}" if current else ""
                    raise Conflict(
                        f"a container named {placement.name!r} already exists{where}",
                        field="name",
                    ) from None
                follows = int(latest.seq or 0)  # removed before: a new one may follow
        raise Conflict(f"placement of {placement.name!r} kept changing", field="name")

    async def update(self, placement: Placement, revision: int) -> int:
        try:
            return await self._write(placement.name, placement.to_bytes(), revision)
        except Conflict as exc:
            raise Conflict(
                f"placement of {placement.name!r} changed concurrently"
                f" (expected revision {revision})"
            ) from exc

    async def remove(self, name: str) -> None:
        """Removed by compare-and-set over what is there now; already removed is fine."""
        for _ in range(PLACEMENT_CAS_ATTEMPTS):
            latest = await self._latest(name)
            if latest is None or _entry_of(latest).placement is None:
                return
            try:
                await self._write(name, b"", int(latest.seq or 0), removal=True)
                return
            except Conflict:
                continue
        raise Conflict(f"placement of {name!r} kept changing; not removed")

    async def all(self) -> list[Placement]:
        names = {subjects.placement_key_parts(key)[1] for key in await _keys(self.kv)}
        found = []
        for name in sorted(names):
            got = await self.get(name)
            if got is not None:
                found.append(got[0])
        return found

    async def _write(self, name: str, payload: bytes, follows: int, removal: bool = False) -> int:
        headers = {
            EXPECTED_SEQUENCE: str(follows),
            EXPECTED_SUBJECT: subjects.placement_subjects(name),
        }
        if removal:
            headers[KV_OPERATION] = "DEL"
        try:
            ack = await self._js.publish(
                subjects.placement_subject(self.author, name), payload, headers=headers
            )
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise Conflict(f"placement of {name!r} changed concurrently") from exc
            raise Unavailable(f"cannot write the placement of {name!r}: {described(exc)}") from exc
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot write the placement of {name!r}: {described(exc)}") from exc
        return int(ack.seq)

    async def _latest(self, name: str) -> RawStreamMsg | None:
        return await self._read(name, subject=subjects.placement_subjects(name))

    async def _at(self, seq: int) -> RawStreamMsg | None:
        return await self._read(f"entry {seq}", seq=seq)

    async def _read(
        self, what: str, *, subject: str | None = None, seq: int | None = None
    ) -> RawStreamMsg | None:
        """One entry, or None if there is none. A bucket that is missing or does not answer
        is Unavailable — never "absent"."""
        try:
            return await self._js.get_msg(self.stream, seq=seq, subject=subject)
        except NotFoundError as exc:
            if exc.err_code == NO_MESSAGE:
                return None
            raise Unavailable(f"cannot read the placement of {what}: {exc.description}") from exc
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot read the placement of {what}: {described(exc)}") from exc


def _entry_of(msg: RawStreamMsg) -> placement_chain.Entry:
    key = (msg.subject or "").removeprefix(f"$KV.{subjects.PLACEMENT_BUCKET}.")
    author, name = subjects.placement_key_parts(key)
    headers = msg.headers or {}
    # A compare-and-set over every author's entries of this container, or none at all.
    spans_all = headers.get(EXPECTED_SUBJECT) == subjects.placement_subjects(name)
    expected = headers.get(EXPECTED_SEQUENCE, "")
    follows = int(expected) if spans_all and expected.isdigit() else None
    placement = None
    if headers.get(KV_OPERATION) not in ("DEL", "PURGE") and msg.data:
        try:
            placement = Placement.from_bytes(msg.data)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise Untrusted(f"placement of {name!r} by {author} is unreadable: {exc}") from exc
    return placement_chain.Entry(author=author, placement=placement, follows=follows)


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
            raise Unavailable(f"fetching layer {digest[:12]} failed: {described(exc)}") from exc


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

    async def delete(self, name: str) -> None:
        await self.kv.delete(name)

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
                raise Unavailable(
                    f"cannot write {host!r}'s registration: {described(exc)}"
                ) from exc
            return declared
        raise Conflict(f"the registration of {host!r} kept changing; try again", field="host")
