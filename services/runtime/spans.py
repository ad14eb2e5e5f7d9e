"""What the runtime writes on its trace spans: failures with CRIU's words, transfer figures."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from services.errors import RuntimeFailure
from services.runtime.transfer import Sent

tracer = trace.get_tracer("ferry")


def fail(span: trace.Span, failure: RuntimeFailure) -> None:
    """Mark a span failed, with CRIU's own last words as an event."""
    span.set_status(StatusCode.ERROR, failure.reason)
    span.set_attribute("error.type", type(failure).__name__)
    span.set_attribute("ferry.retryable", failure.retryable)
    if failure.log_tail:
        span.add_event("criu.log", {"lines": failure.log_tail.splitlines()[-20:]})


def transferred(span: trace.Span, *sent: Sent) -> None:
    """Bytes on the wire and before compression, entries, time, rate and checksums."""
    wire = sum(x.bytes for x in sent)
    seconds = sum(x.seconds for x in sent)
    span.set_attribute("ferry.bytes", wire)
    span.set_attribute("ferry.raw_bytes", sum(x.raw_bytes or x.bytes for x in sent))
    span.set_attribute("ferry.entries", sum(x.entries for x in sent))
    span.set_attribute("ferry.deleted", sum(x.deleted for x in sent))
    span.set_attribute("ferry.patched", sum(x.patched for x in sent))
    span.set_attribute("ferry.seconds", round(seconds, 4))
    span.set_attribute("ferry.rate_bps", round(wire / max(seconds, 1e-6)))
    span.set_attribute("ferry.sha256", ",".join(x.sha256 for x in sent))
