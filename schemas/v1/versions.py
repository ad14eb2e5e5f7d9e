"""What software a host runs, as it tells the fleet: so a rolling upgrade can refuse a pair of
hosts that cannot interoperate before anything moves (workflows/compat.py judges a pair)."""

from __future__ import annotations

from pydantic import Field

from schemas.v1.base import Part

# The version of Ferry's messages and transfer protocol this code speaks. Raise it when a
# change cannot be read or followed by the previous release; keep WIRE_MIN_VERSION at the
# oldest version this code still speaks, so one agent upgraded within the range keeps working.
WIRE_VERSION = 1
WIRE_MIN_VERSION = 1

UNKNOWN = "unknown"  # a tool whose version could not be read, or a host that did not say


class HostVersions(Part):
    """The wire versions a host speaks and the Ferry, CRIU, runc and kernel it runs.

    No bounds are enforced here on purpose: a registration is read by every host, and one odd
    value from a newer agent must not make the whole entry unreadable; compat.py says what a
    nonsensical range (wire_min > wire) means."""

    wire: int = Field(description="the newest Ferry wire version this host speaks")
    wire_min: int = Field(description="the oldest Ferry wire version this host still speaks")
    ferry: str = Field(description="the ferry package version")
    criu: str = Field(description="as `criu --version` says, e.g. 4.2.1; or unknown")
    runc: str = Field(description="as `runc --version` says, e.g. 1.1.5+ds1; or unknown")
    kernel: str = Field(description="as `uname -r` says")

    @property
    def wire_range(self) -> str:
        return f"{self.wire_min}..{self.wire}"
