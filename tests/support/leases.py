"""Watching a lease change state, for tests that wait for the server to age one out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.leases import Leases, LeaseState

TEST_TTL_S = 1.5  # short enough to see expiry quickly; the server's TTL granularity is ~1 s


async def until_state(
    leases: Leases[Any], key: str, state: LeaseState, *, within_s: float
) -> list[LeaseState]:
    """Every state `key` was read in (polling), up to and including `state`."""
    seen: list[LeaseState] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        now = (await leases.read(key)).state
        if not seen or seen[-1] != now:
            seen.append(now)
        if now == state:
            return seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} never became {state} within {within_s}s: {seen}")
