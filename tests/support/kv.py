"""Looking at Ferry's KV buckets from a test."""

from __future__ import annotations

from nats.js import JetStreamContext


async def last_sequence(js: JetStreamContext, bucket: str) -> int:
    """The sequence of the last write to a bucket (puts, deletes, purges): unchanged means
    nothing at all was written to it."""
    info = await js.stream_info(f"KV_{bucket}")
    return int(info.state.last_seq)
