"""A host's configuration, read from the environment (set by the lab; a real deployment's
service unit, still to come, would set the same variables)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from services.errors import InvalidInput


def _require(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise InvalidInput(f"environment variable {name} is not set", field=name)
    return value


@dataclass(frozen=True)
class HostConfig:
    """What one host's agent and workers need to know about their host."""

    host: str
    address: str
    nats_url: str
    subnet: ipaddress.IPv4Network
    gateway: str
    ip_pool: tuple[int, int]
    state_dir: Path = Path("/var/lib/ferry")
    bridge: str = "br0"
    cgroup_parent: str = "/ferry"
    transfer_port: int = 7441
    watchdog_interval_s: float = 2.0
    collector_interval_s: float = 30.0
    collector_min_age_s: float = 60.0
    # Fencing: the same placement seen on two sweeps this far apart before acting on it; more
    # would-be orphans than the limit in one sweep is taken for a lost store (nothing done).
    collector_confirm_s: float = 60.0
    orphan_limit: int = 3
    owner_answer_timeout_s: float = 2.0

    @classmethod
    def from_env(cls) -> HostConfig:
        first, _, last = os.environ.get("FERRY_IP_POOL", "100-250").partition("-")
        return cls(
            host=_require("FERRY_HOST"),
            address=_require("FERRY_HOST_ADDRESS"),
            nats_url=_require("FERRY_NATS_URL"),
            subnet=ipaddress.IPv4Network(_require("FERRY_DC_SUBNET")),
            gateway=_require("FERRY_DC_GATEWAY"),
            ip_pool=(int(first), int(last)),
            state_dir=Path(os.environ.get("FERRY_STATE_DIR", "/var/lib/ferry")),
            bridge=os.environ.get("FERRY_BRIDGE", "br0"),
            cgroup_parent=os.environ.get("FERRY_CGROUP_PARENT", "/ferry"),
            transfer_port=int(os.environ.get("FERRY_TRANSFER_PORT", "7441")),
            watchdog_interval_s=float(os.environ.get("FERRY_WATCHDOG_INTERVAL_S", "2")),
            collector_interval_s=float(os.environ.get("FERRY_COLLECTOR_INTERVAL_S", "30")),
            collector_min_age_s=float(os.environ.get("FERRY_COLLECTOR_MIN_AGE_S", "60")),
            collector_confirm_s=float(os.environ.get("FERRY_COLLECTOR_CONFIRM_S", "60")),
            orphan_limit=int(os.environ.get("FERRY_ORPHAN_LIMIT", "3")),
            owner_answer_timeout_s=float(os.environ.get("FERRY_OWNER_ANSWER_TIMEOUT_S", "2")),
        )

    @property
    def runc_root(self) -> Path:
        return self.state_dir / "runc"

    @property
    def layers_dir(self) -> Path:
        return self.state_dir / "layers"

    @property
    def containers_dir(self) -> Path:
        return self.state_dir / "containers"

    @property
    def netns_dir(self) -> Path:
        return self.state_dir / "netns"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    def pool_addresses(self) -> list[str]:
        """Candidate container addresses, in allocation order."""
        base = int(self.subnet.network_address)
        return [
            str(ipaddress.IPv4Address(base + i))
            for i in range(self.ip_pool[0], self.ip_pool[1] + 1)
        ]
