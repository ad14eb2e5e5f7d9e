"""Compare-and-set, written once: read the latest value, decide, write it if nobody wrote
in between, and on a race read again. Serves the runner, intake, the watchdog and every
placement change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from schemas.v2.migrations import MigrationRecord
from services.errors import Conflict, NotFound
from workflows.saga import Decision

CAS_ATTEMPTS = 20

T = TypeVar("T")
R = TypeVar("R")


class Versioned(Protocol[T]):
    """A store whose values carry a revision, and whose writes name the one they replace."""

    async def get(self, key: str, /) -> tuple[T, int] | None: ...

    async def update(self, value: T, revision: int, /) -> int: ...


async def compare_and_set(
    store: Versioned[T],
    key: str,
    decide: Callable[[T], tuple[T | None, R]],
    *,
    attempts: int = CAS_ATTEMPTS,
) -> R:
    """`decide` sees the latest value and returns (the value to write or None, an answer);
    the answer of the decision that was written (or needed no write) comes back.

    NotFound if the key is absent — the caller decides what an absent value means, which
    is never "nothing to do" by default. Conflict if the value kept changing.
    """
    for _ in range(attempts):
        found = await store.get(key)
        if found is None:
            raise NotFound(f"{key!r} is not in the store", field="id")
        value, revision = found
        new, answer = decide(value)
        if new is None:
            return answer
        try:
            await store.update(new, revision)
        except Conflict:
            continue
        return answer
    raise Conflict(f"{key!r} kept changing under us ({attempts} attempts)")


async def transition(
    migrations: Versioned[MigrationRecord],
    migration_id: str,
    decide: Callable[[MigrationRecord], Decision | None],
) -> Decision | None:
    """Apply a saga transition to the latest record. None if `decide` saw nothing to do."""

    def step(record: MigrationRecord) -> tuple[MigrationRecord | None, Decision | None]:
        decision = decide(record)
        if decision is None or not decision.changed:
            return None, decision
        return decision.record, decision

    return await compare_and_set(migrations, migration_id, step)
