"""Leases kept fresh by a live holder and judged by the server's clock, never by comparing
two hosts' clocks.

One bucket with a bucket-level TTL (nats-py has per-key TTLs only on create): the holder
creates its key, renews it by compare-and-set well inside the TTL, and deletes it with its
last revision when done. A holder that stops renewing is aged out by the server, which then
writes a limit marker (`Nats-Marker-Reason: MaxAge`) in the key's place: that marker, and
only that marker, says "expired". An absent key says "never held (or long gone)", an absent
bucket says "unavailable": neither is evidence that a holder died.

Generic over the payload (a versioned pydantic message), so a step's lease and a fleet
controller's lease use the same helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, TypeVar

from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, NoStreamResponseError
from nats.js.errors import NotFoundError as JsNotFound
from pydantic import BaseModel, ValidationError

from schemas import subjects
from services.errors import Conflict, TopologyMissing, Unavailable, described

log = logging.getLogger("ferry.leases")

LEASE_TTL_S = 15.0  # a holder renews well inside this; the server expires what it stops renewing
RENEWALS_PER_TTL = 3  # renew every TTL/3: two renewals may be lost before the lease expires


def leases_bucket_config(bucket: str, ttl_s: float) -> KeyValueConfig:
    """A leases bucket: one value per key, aged out after `ttl_s` with a marker that lives as
    long again (so a watcher sweeping more often than that sees every expiry)."""
    return KeyValueConfig(
        bucket=bucket,
        history=1,
        ttl=ttl_s,
        storage=StorageType.FILE,
        limit_marker_ttl=ttl_s,
    )


# A bucket-level TTL renewed by compare-and-set (nats-py has per-key TTLs only on create);
# limit markers make the server say "expired" (Nats-Marker-Reason: MaxAge) instead of a
# key that is merely absent.
LEASES_BUCKET_CONFIG = leases_bucket_config(subjects.LEASES_BUCKET, LEASE_TTL_S)

MARKER_REASON = "Nats-Marker-Reason"  # set by the server on the markers it writes itself
EXPIRED_REASON = "MaxAge"
KV_OPERATION = "KV-Operation"
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's "not the revision you named"
STREAM_NOT_FOUND = 10059

P = TypeVar("P", bound=BaseModel)
T = TypeVar("T")

LeaseState = Literal["held", "expired", "released", "never_held", "unavailable"]


@dataclass(frozen=True)
class LeaseRead(Generic[P]):
    """What the bucket says about one key now.

    held: a holder wrote `payload` at `revision` and the server has not aged it out.
    expired: the server aged the last write out (its MaxAge marker is at `revision`).
    released: its holder deleted it (a tombstone at `revision`).
    never_held: no trace at all (also a key whose marker itself aged out: not "expired").
    unavailable: the bucket is missing or the bus did not answer; nothing is known.
    """

    state: LeaseState
    payload: P | None = None
    revision: int = 0
    reason: str = ""


class LeaseLost(Conflict):
    """The lease is no longer ours (someone else wrote it, or it expired): stop the work."""


class Leases(Generic[P]):
    """One leases bucket whose values are `model` messages."""

    def __init__(
        self,
        js: JetStreamContext,
        model: type[P],
        *,
        bucket: str = subjects.LEASES_BUCKET,
        ttl_s: float = LEASE_TTL_S,
    ) -> None:
        self.js = js
        self.model = model
        self.bucket = bucket
        self.ttl_s = ttl_s
        self.stream = f"KV_{bucket}"

    @classmethod
    async def open(
        cls, js: JetStreamContext, model: type[P], bucket: str = subjects.LEASES_BUCKET
    ) -> Leases[P]:
        """The bucket as it was made: holders renew inside the TTL it really has."""
        try:
            info = await js.stream_info(f"KV_{bucket}")
        except JsNotFound as exc:
            raise TopologyMissing(
                f"no bucket {bucket} (bootstrap creates it)", missing=(bucket,)
            ) from exc
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot read bucket {bucket}: {described(exc)}") from exc
        return cls(js, model, bucket=bucket, ttl_s=info.config.max_age or LEASE_TTL_S)

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def read(self, key: str) -> LeaseRead[P]:
        """The key's state, read straight from the stream: nats-py's KV get hands back the
        server's MaxAge marker as an ordinary empty value."""
        try:
            msg = await self.js.get_msg(self.stream, subject=self._subject(key))
        except JsNotFound as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                return LeaseRead("unavailable", reason=f"no bucket {self.bucket}")
            return LeaseRead("never_held")
        except (NatsError, TimeoutError) as exc:
            return LeaseRead("unavailable", reason=f"cannot read lease {key}: {described(exc)}")
        headers = msg.headers or {}
        revision = int(msg.seq or 0)
        marker = headers.get(MARKER_REASON)
        if marker == EXPIRED_REASON:
            return LeaseRead("expired", revision=revision, reason="aged out by the server")
        if marker is not None or headers.get(KV_OPERATION) in ("DEL", "PURGE"):
            return LeaseRead("released", revision=revision, reason=marker or "deleted")
        try:
            payload = self.model.model_validate_json(msg.data or b"")
        except ValidationError as exc:
            # Someone holds it, in a form this version cannot read: still held.
            return LeaseRead("held", revision=revision, reason=f"unreadable payload: {exc}")
        return LeaseRead("held", payload, revision)

    async def _write(self, key: str, data: bytes, last: int, headers: dict[str, str]) -> int:
        try:
            ack = await self.js.publish(
                self._subject(key), data, headers={**headers, EXPECTED_LAST: str(last)}
            )
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise LeaseLost(f"lease {key} changed under us (expected revision {last})") from exc
            raise Unavailable(f"cannot write lease {key}: {exc}") from exc
        except (NoRespondersError, NoStreamResponseError) as exc:
            raise TopologyMissing(
                f"no bucket {self.bucket} (bootstrap creates it)", missing=(self.bucket,)
            ) from exc
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot write lease {key}: {described(exc)}") from exc
        return int(ack.seq)

    async def acquire(
        self,
        key: str,
        payload: P,
        *,
        take_over: Callable[[P], bool] | None = None,
        take_expired: bool = False,
    ) -> int:
        """Take the lease (its revision), if nobody holds it. An expired lease is not taken
        unless `take_expired` (a successor that is itself the judge of expiry, such as a
        standby controller): otherwise whoever judges expiry (a watchdog) acts on it, and
        must not find it held again. `take_over` may allow taking a held lease from a
        holder known to be gone."""
        found = await self.read(key)
        if found.state == "unavailable":
            if found.reason.startswith("no bucket"):
                raise TopologyMissing(found.reason, missing=(self.bucket,))
            raise Unavailable(found.reason)
        if found.state == "expired" and not take_expired:
            raise Conflict(f"lease {key} expired: its holder was given up")
        taken_over = (
            take_over is not None and found.payload is not None and take_over(found.payload)
        )
        if found.state == "held" and not taken_over:
            raise Conflict(f"lease {key} is held by {found.payload or 'another holder'}")
        # never_held: revision 0; released or taken over: the revision we saw (CAS).
        try:
            return await self._write(key, payload.model_dump_json().encode(), found.revision, {})
        except LeaseLost as exc:
            raise Conflict(f"lease {key} was taken meanwhile") from exc

    async def renew(self, key: str, payload: P, revision: int) -> int:
        """Keep the lease fresh, carrying `payload`; LeaseLost if it is no longer ours."""
        return await self._write(key, payload.model_dump_json().encode(), revision, {})

    async def release(self, key: str, revision: int) -> None:
        """Give the lease up (a tombstone, written only over our own last revision)."""
        await self._write(key, b"", revision, {KV_OPERATION: "DEL"})

    def hold(
        self,
        key: str,
        payload: P,
        *,
        take_over: Callable[[P], bool] | None = None,
        renew_for_s: float | None = None,
        take_expired: bool = False,
    ) -> Held[P]:
        """`async with leases.hold(key, payload) as held:` — acquired on entry, renewed while
        the body runs (at most `renew_for_s`: a holder stuck past its own deadline must not
        keep the lease forever), released on exit."""
        return Held(
            self,
            key,
            payload,
            take_over=take_over,
            renew_for_s=renew_for_s,
            take_expired=take_expired,
        )


class Held(Generic[P]):
    """A lease in hand: renewed in the background; `lost` is set once it is no longer ours."""

    def __init__(
        self,
        leases: Leases[P],
        key: str,
        payload: P,
        *,
        take_over: Callable[[P], bool] | None,
        renew_for_s: float | None,
        take_expired: bool = False,
    ) -> None:
        self.leases = leases
        self.key = key
        self.payload = payload
        self.revision = 0
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._take_over = take_over
        self._renew_for_s = renew_for_s
        self._take_expired = take_expired
        self._writing = asyncio.Lock()  # a renewal now and the background one never overlap
        self._renewing: asyncio.Task[None] | None = None
        self._attempted: list[P] = [payload]  # the payloads of our latest writes

    def update(self, payload: P) -> None:
        """The payload the next renewal carries (progress is not worth a write of its own)."""
        self.payload = payload

    async def renew_now(self, payload: P) -> int:
        """Write `payload` now (it says something readers must see at once); LeaseLost if the
        lease is no longer ours."""
        async with self._writing:
            self.payload = payload
            self._attempted = [*self._attempted[-1:], payload]
            self.revision = await self.leases.renew(self.key, payload, self.revision)
            return self.revision

    async def __aenter__(self) -> Held[P]:
        self.revision = await self.leases.acquire(
            self.key, self.payload, take_over=self._take_over, take_expired=self._take_expired
        )
        self._renewing = asyncio.create_task(self._renew())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        if self.lost.is_set():
            return
        try:
            try:
                await self.leases.release(self.key, self.revision)
            except Conflict:
                if not await self._adopt_own_write():
                    raise
                await self.leases.release(self.key, self.revision)
        except (Unavailable, Conflict) as err:  # the server ages it out anyway
            log.warning("lease %s not released: %s", self.key, err.reason)

    async def _adopt_own_write(self) -> bool:
        """After a compare-and-set refused for a revision we do not know: was the newer
        revision our own renewal, whose answer was lost (a timeout on a busy bus)? Then the
        lease is still ours and we carry on from it; anything else is someone else's."""
        try:
            found = await self.leases.read(self.key)
        except Unavailable:
            return False
        if found.state != "held" or found.payload not in self._attempted:
            return False
        log.warning("lease %s: a renewal that timed out had landed; going on", self.key)
        self.revision = found.revision
        return True

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        log.warning("lease %s lost: %s", self.key, reason)

    async def _renew(self) -> None:
        every = self.leases.ttl_s / RENEWALS_PER_TTL
        began = last_ok = time.monotonic()
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            if self._renew_for_s is not None and now - began > self._renew_for_s:
                log.warning("lease %s: past its holder's deadline, no longer renewed", self.key)
                return
            try:
                async with self._writing:
                    self._attempted = [*self._attempted[-1:], self.payload]
                    self.revision = await self.leases.renew(self.key, self.payload, self.revision)
                last_ok = time.monotonic()
            except LeaseLost as exc:
                if await self._adopt_own_write():
                    last_ok = time.monotonic()
                    continue
                self._lose(exc.reason)
                return
            except Unavailable as exc:
                # Our own clock since the last renewal the server confirmed: past the TTL,
                # the server has aged it out (its clock runs at the same rate as ours).
                if time.monotonic() - last_ok >= self.leases.ttl_s:
                    self._lose(f"not renewed for {self.leases.ttl_s:.0f}s: {exc.reason}")
                    return

    async def guard(self, work: Awaitable[T]) -> T:
        """`work`'s result; cancelled (its processes with it) if the lease is lost first."""
        task = asyncio.ensure_future(work)
        watch = asyncio.create_task(self.lost.wait())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise LeaseLost(f"lease {self.key} lost: {self.lost_reason}")
        return task.result()
