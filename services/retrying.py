"""Retries inside a step, for errors that say a retry can help (a reset connection, a
bus hiccup). Bounded and short: the saga's own retry policy and JetStream redelivery sit
above this, so each layer stays small. Every retry shows as an event on the current span."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from opentelemetry import trace
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from services.errors import FerryError

log = logging.getLogger("ferry.retry")

P = ParamSpec("P")
T = TypeVar("T")

ATTEMPTS = 3


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, FerryError) and exc.retryable


def _note(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("attempt %d failed (%s); retrying", state.attempt_number, error)
    trace.get_current_span().add_event(
        "retry", {"attempt": state.attempt_number, "error": str(error)}
    )


def transient(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Retry `func` a few times on retryable Ferry errors, with a short exponential wait."""

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            before_sleep=_note,
            reraise=True,
        ):
            with attempt:
                return await func(*args, **kwargs)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    wrapper.__name__ = getattr(func, "__name__", "transient")
    wrapper.__doc__ = func.__doc__
    return wrapper
