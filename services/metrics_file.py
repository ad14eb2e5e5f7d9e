"""Metrics for an operator without a collector: one JSON line per export, in a file that
stays bounded.

Every process of a host (the agent, its four workers) appends to the same file, so each
write and each rotation happens under an exclusive lock on a sidecar file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

log = logging.getLogger("ferry.metrics")

MAX_BYTES = 4 * 1024 * 1024  # past this the file becomes <name>.1 (one kept): ≤ 8 MiB in all


class JsonLinesMetricExporter(MetricExporter):
    """Appends each export as one JSON object on one line; rotates past `max_bytes`."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES) -> None:
        super().__init__()  # cumulative: every line holds the totals so far, no sums needed
        self.path = path
        self.max_bytes = max_bytes
        self.lock_path = path.with_name(path.name + ".lock")

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if not _has_points(metrics_data):
            return MetricExportResult.SUCCESS  # a process with nothing measured yet
        document = {"exported_at_ns": time.time_ns(), **json.loads(metrics_data.to_json(None))}
        line = (json.dumps(document, separators=(",", ":")) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock_path.open("ab") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._rotate_if_full(len(line))
                with self.path.open("ab") as out:
                    out.write(line)
        except OSError as exc:
            log.warning("metrics not written to %s: %s", self.path, exc)
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def _rotate_if_full(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size and size + incoming > self.max_bytes:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True  # every export is written before it returns

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def _has_points(data: MetricsData) -> bool:
    return any(
        metric.data.data_points
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )
