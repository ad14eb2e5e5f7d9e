"""A move's freeze, forecast before it starts: what the record keeps beside the measured one."""

from __future__ import annotations

from pydantic import Field

from schemas.v1.base import Part


class FreezeForecast(Part):
    """How long the container will be frozen (first frozen instant until the destination's
    network opens), forecast at intake from the container's memory and this host's earlier
    moves, with every input that had to be assumed named."""

    strategy: str
    predicted_ms: int = Field(ge=0)
    fixed_ms: int = Field(ge=0, description="everything in the freeze but the page stream")
    pages_ms: int = Field(ge=0, description="the memory pages that travel inside the freeze")
    memory_bytes: int = Field(ge=0)
    memory_basis: str = Field(description="what memory_bytes is: resident memory, a dirty set…")
    stream_mib_s: float | None = Field(default=None, gt=0)
    basis: str = Field(description="which earlier moves the fixed cost and stream rate came from")
    missing: tuple[str, ...] = Field(
        default=(), description="inputs that were not measured and had to be assumed, and why"
    )
    budget_ms: int | None = Field(
        default=None, description="the request's downtime budget; None: none given, not enforced"
    )

    @property
    def fits(self) -> bool:
        return self.budget_ms is None or self.predicted_ms <= self.budget_ms

    def line(self) -> str:
        """One line for an SRE: the forecast and where it came from."""
        stream = (
            f", pages {self.pages_ms} ms at {self.stream_mib_s:.0f} MiB/s"
            if (self.pages_ms and self.stream_mib_s)
            else ""
        )
        return (
            f"{self.strategy}: {self.predicted_ms} ms (fixed {self.fixed_ms} ms{stream};"
            f" {self.memory_bytes / 2**20:.0f} MiB {self.memory_basis}; {self.basis})"
        )
