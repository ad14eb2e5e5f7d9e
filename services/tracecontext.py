"""W3C trace context for migrations: one trace id per migration, carried in NATS headers."""

from __future__ import annotations

import secrets

from opentelemetry import propagate


def new_traceparent() -> tuple[str, str]:
    """A fresh (trace_id, traceparent) for a migration that starts here."""
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


def headers_for(traceparent: str) -> dict[str, str]:
    """Headers that continue the migration's trace; the current span's context wins if any."""
    headers = {"traceparent": traceparent} if traceparent else {}
    propagate.inject(headers)
    return headers
