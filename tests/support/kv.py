"""Looking at Ferry's KV buckets from a test, and living with one known flaw of listing them.

KEYS_RACE: nats-py's KeyValue.keys() sometimes answers "no keys" (NoKeysError) for a bucket
that has keys — its end-of-initial-values marker can overtake the values themselves, more
often on a loaded machine — and services.kvstores passes that on as an empty list. Tests
whose subject is not listing ask again when an answer is empty although the bucket is
known to hold something (`listed`); test_kvstores keeps the flaw itself in view.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sized
from typing import TypeVar

from nats.js import JetStreamContext

KEYS_RACE = (
    "nats-py KeyValue.keys() can report an empty bucket while it has keys (its end marker"
    " overtakes the values); services.kvstores turns that into an empty listing"
)
LIST_TRIES = 3

SizedT = TypeVar("SizedT", bound=Sized)


async def listed(call: Callable[[], Awaitable[SizedT]]) -> SizedT:
    """A listing of a bucket the test knows is not empty: asked again (up to 3 times) while
    the answer is empty (KEYS_RACE). A wrong non-empty answer is returned as it is."""
    answer = await call()
    for _ in range(LIST_TRIES - 1):
        if len(answer):
            break
        answer = await call()
    return answer


async def last_sequence(js: JetStreamContext, bucket: str) -> int:
    """The sequence of the last write to a bucket (puts, deletes, purges): unchanged means
    nothing at all was written to it."""
    info = await js.stream_info(f"KV_{bucket}")
    return int(info.state.last_seq)
