"""In-step retries: only for errors that say a retry can help, and bounded."""

from __future__ import annotations

import pytest

from services.errors import InvalidInput, RuntimeFailure
from services.retrying import ATTEMPTS, transient


async def test_a_transient_error_is_retried_until_it_passes() -> None:
    calls = []

    @transient
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise RuntimeFailure("connection reset", retryable=True)
        return "ok"

    assert await flaky() == "ok" and len(calls) == 2


async def test_retries_stop_after_a_bound() -> None:
    calls = []

    @transient
    async def down() -> None:
        calls.append(1)
        raise RuntimeFailure("peer unreachable", retryable=True)

    with pytest.raises(RuntimeFailure):
        await down()
    assert len(calls) == ATTEMPTS


async def test_an_error_a_retry_cannot_fix_is_raised_at_once() -> None:
    calls = []

    @transient
    async def wrong() -> None:
        calls.append(1)
        raise InvalidInput("bad migration id")

    with pytest.raises(InvalidInput):
        await wrong()
    assert len(calls) == 1
