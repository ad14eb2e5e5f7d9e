"""The root span a worker records for a migration uses the ids intake reserved."""

from __future__ import annotations

from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.tracecontext import new_traceparent
from services.tracing import PresetIds, parse_traceparent, reserved_ids, span_document


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=PresetIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_reserved_ids_make_the_root_and_children_link_up() -> None:
    provider, exporter = _provider()
    tracer = provider.get_tracer("test")
    trace_id_hex, traceparent = new_traceparent()
    trace_id, root_id = parse_traceparent(traceparent)

    # A worker's step span, child of the reserved root (parent taken from the header).
    with tracer.start_as_current_span(
        "step dump", context=propagate.extract({"traceparent": traceparent})
    ):
        pass
    # Later, another worker records the root itself.
    with reserved_ids(trace_id, root_id):
        root = tracer.start_span("migration web", start_time=1)
    root.end(end_time=2)
    with tracer.start_as_current_span("unrelated"):
        pass

    docs = {d["name"]: d for d in map(span_document, exporter.get_finished_spans())}
    assert docs["migration web"]["span_id"] == f"{root_id:016x}"
    assert docs["migration web"]["trace_id"] == trace_id_hex
    assert docs["migration web"]["parent_id"] is None
    assert docs["step dump"]["parent_id"] == f"{root_id:016x}"
    assert docs["step dump"]["trace_id"] == trace_id_hex
    # The reservation is used once: later spans get fresh ids.
    assert docs["unrelated"]["trace_id"] != trace_id_hex
