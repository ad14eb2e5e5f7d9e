"""OpenTelemetry for every Ferry process: one trace per migration, spans over NATS.

Spans go to OTLP (http/protobuf) when OTEL_EXPORTER_OTLP_ENDPOINT is set, following the
OTel environment conventions, and always into the JetStream stream FERRY_SPANS, so
`ferry trace ID` needs no extra server and no shared filesystem.

The migration's root span starts at intake and is ended by whichever worker finishes the
saga. A span cannot cross processes, so intake only reserves its ids (they travel as the
parent in every command's `traceparent`), and the finishing worker records the root span
with those ids and the migration's real start time.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from nats.js import JetStreamContext
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import StatusCode

from schemas import subjects

log = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 5.0
_preset: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "ferry_preset_ids", default=None
)


class PresetIds(IdGenerator):
    """Random ids, except for a span whose ids were reserved earlier (the migration root)."""

    def __init__(self) -> None:
        self.random = RandomIdGenerator()

    def generate_trace_id(self) -> int:
        preset = _preset.get()
        return preset[0] if preset else self.random.generate_trace_id()

    def generate_span_id(self) -> int:
        preset = _preset.get()
        if preset:
            _preset.set(None)
            return preset[1]
        return self.random.generate_span_id()


@contextlib.contextmanager
def reserved_ids(trace_id: int, span_id: int) -> Iterator[None]:
    token = _preset.set((trace_id, span_id))
    try:
        yield
    finally:
        _preset.reset(token)


def span_document(span: ReadableSpan) -> dict[str, Any]:
    """A span as `ferry trace --json` prints it: ids in hex, times in Unix epoch ns."""
    ctx = span.get_span_context()
    assert ctx is not None
    status = {StatusCode.OK: "ok", StatusCode.ERROR: "error"}.get(span.status.status_code, "unset")
    attributes = dict(span.attributes or {})
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "host": attributes.get("ferry.host") or span.resource.attributes.get("host.name"),
        "start": span.start_time,
        "end": span.end_time,
        "status": status,
        "status_message": span.status.description,
        "attributes": {
            k: v if isinstance(v, str | int | float | bool) else list(v)  # type: ignore[arg-type]
            for k, v in attributes.items()
        },
        "events": [
            {"name": e.name, "time": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
    }


class NatsSpanExporter(SpanExporter):
    """Publishes finished spans into FERRY_SPANS, on the worker's own event loop."""

    def __init__(self, js: JetStreamContext, loop: asyncio.AbstractEventLoop) -> None:
        self.js = js
        self.loop = loop

    async def _publish(self, spans: Sequence[ReadableSpan]) -> None:
        for span in spans:
            doc = span_document(span)
            await self.js.publish(
                subjects.span_subject(doc["trace_id"]),
                json.dumps(doc).encode(),
                stream=subjects.SPANS_STREAM,
            )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.loop.is_closed():
            return SpanExportResult.FAILURE
        future = asyncio.run_coroutine_threadsafe(self._publish(spans), self.loop)
        try:
            future.result(EXPORT_TIMEOUT_S)
        except Exception as exc:
            log.warning("spans not published: %s", exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class Telemetry:
    """The process's tracer and meter, and how to flush them."""

    def __init__(self, service: str, host: str) -> None:
        self.resource = Resource.create(
            {"service.name": service, "host.name": host, "service.namespace": "ferry"}
        )
        self.provider = TracerProvider(resource=self.resource, id_generator=PresetIds())
        self.otlp = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        if self.otlp:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500)
            )
        trace.set_tracer_provider(self.provider)
        self.meter_provider = self._meters()
        metrics.set_meter_provider(self.meter_provider)
        self.tracer = trace.get_tracer("ferry")
        meter = metrics.get_meter("ferry")
        self.outcomes = meter.create_counter(
            "ferry.migrations", unit="{migration}", description="Migrations by outcome"
        )
        self.freeze = meter.create_histogram(
            "ferry.migration.freeze", unit="ms", description="Source freeze to destination running"
        )
        self.duration = meter.create_histogram(
            "ferry.migration.duration", unit="ms", description="Request to end of the saga"
        )
        self.bytes = meter.create_counter(
            "ferry.migration.bytes", unit="By", description="Bytes moved between hosts"
        )

    def _meters(self) -> MeterProvider:
        if not self.otlp:
            return MeterProvider(resource=self.resource)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=5000)
        return MeterProvider(resource=self.resource, metric_readers=[reader])

    def publish_spans_on(self, js: JetStreamContext) -> None:
        exporter = NatsSpanExporter(js, asyncio.get_running_loop())
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=200, export_timeout_millis=5000)
        )

    async def flush(self) -> None:
        """Export what is queued; runs the SDK's blocking flush off the event loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.provider.force_flush, 5000)
        await loop.run_in_executor(None, self.meter_provider.force_flush, 5000)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.provider.shutdown()
        with contextlib.suppress(Exception):
            self.meter_provider.shutdown()


_telemetry: Telemetry | None = None


def setup(service: str, host: str) -> Telemetry:
    global _telemetry
    if _telemetry is None:
        _telemetry = Telemetry(service, host)
    return _telemetry


def tracer() -> trace.Tracer:
    return trace.get_tracer("ferry")


def parse_traceparent(traceparent: str) -> tuple[int, int]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def emit_root_span(telemetry: Telemetry, record: Any) -> None:
    """Record the migration's root span, start to end, with the ids intake reserved."""
    trace_id, span_id = parse_traceparent(record.traceparent)
    attributes = {
        "ferry.migration_id": record.id,
        "ferry.container": record.container,
        "ferry.source": record.source,
        "ferry.destination": record.destination,
        "ferry.strategy": record.strategy.chosen,
        "ferry.strategy_reason": record.strategy.reason,
        "ferry.state": record.state,
        "ferry.committed": record.committed,
        "ferry.bytes_moved": record.bytes_moved,
    }
    if record.freeze_ms is not None:
        attributes["ferry.freeze_ms"] = record.freeze_ms
    opened = record.results.open_network
    if opened is not None:
        attributes["ferry.frozen_to_open_ms"] = opened.frozen_to_open_ms
    if record.forecast is not None:
        # Forecast and outcome side by side: how good the forecast was is in the trace.
        attributes["ferry.forecast_ms"] = record.forecast.predicted_ms
        attributes["ferry.forecast"] = record.forecast.line()
        if opened is not None and opened.frozen_to_open_ms:
            attributes["ferry.forecast_ratio"] = round(
                record.forecast.predicted_ms / opened.frozen_to_open_ms, 2
            )
    root_context = otel_context.Context()  # no parent: this is the trace's root
    with reserved_ids(trace_id, span_id):
        span = telemetry.tracer.start_span(
            f"migration {record.container}",
            context=root_context,
            attributes=attributes,
            start_time=int(record.created_at * 1e9),
        )
    if record.state == "completed":
        span.set_status(StatusCode.OK)
    else:
        span.set_status(StatusCode.ERROR, record.error or record.state)
    span.end(end_time=int(time.time() * 1e9))
    outcome = {"outcome": record.state, "strategy": record.strategy.chosen}
    telemetry.outcomes.add(1, outcome)
    telemetry.duration.record((time.time() - record.created_at) * 1000, outcome)
    telemetry.bytes.add(record.bytes_moved, outcome)
    if record.freeze_ms is not None:
        telemetry.freeze.record(record.freeze_ms, outcome)
