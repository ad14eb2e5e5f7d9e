"""Names and paths of everything a lab creates. Pure: no I/O besides reading lab.json."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

from services.errors import InvalidInput

LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
LABS_ROOT = Path("/var/lib/ferry-lab")
LABS_RUN = Path("/run/ferry-lab")
HOST_STATE_MOUNT = Path("/var/lib/ferry")  # where a host sees its own state dir
FIRST_HOST_OFFSET = 10  # h1 gets .11
CONTAINER_POOL = (100, 250)
MAX_HOSTS = 50


def validate_lab_name(name: str) -> str:
    if not LAB_NAME.match(name):
        raise InvalidInput(
            f"lab name {name!r} must be 1-8 lowercase letters or digits, starting with a letter"
            " (it prefixes interface names, which the kernel caps at 15 bytes)",
            field="FERRY_LAB",
        )
    return name


def lab_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def candidate_subnets(name: str) -> list[ipaddress.IPv4Network]:
    """Datacenter subnets to try for this lab, its own first: labs side by side rarely clash."""
    h = lab_hash(name)
    start = h % (50 * 256)
    return [
        ipaddress.IPv4Network(f"10.{200 + (i // 256)}.{i % 256}.0/24")
        for i in ((start + k) % (50 * 256) for k in range(50 * 256))
    ]


def candidate_ports(name: str) -> list[int]:
    start = lab_hash(name) % 2000
    return [14222 + (start + k) % 2000 for k in range(2000)]


@dataclass(frozen=True)
class LabLayout:
    """Every name and path of one lab, derived from its name."""

    lab: str

    @property
    def root(self) -> Path:
        return LABS_ROOT / self.lab

    @property
    def run(self) -> Path:
        return LABS_RUN / self.lab

    @property
    def lab_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def lock_file(self) -> Path:
        return LABS_RUN / f"{self.lab}.lock"

    @property
    def bridge(self) -> str:
        return f"{self.lab}-dc"

    @property
    def mnt_dir(self) -> Path:
        return self.run / "mnt"

    @property
    def nats_dir(self) -> Path:
        return self.root / "nats"

    @property
    def cgroup_name(self) -> str:
        return f"ferry-{self.lab}"

    def netns(self, host: str) -> str:
        return f"{self.lab}-{host}"

    def netns_path(self, host: str) -> Path:
        return Path("/run/netns") / self.netns(host)

    def uplink(self, host: str) -> str:
        """The root-namespace end of the host's uplink veth (the host's end is `uplink`)."""
        return f"{self.lab}-{host}"

    def state_dir(self, host: str) -> Path:
        return self.root / "hosts" / host

    def mntns_path(self, host: str) -> Path:
        return self.mnt_dir / host

    def runc_root(self, host: str) -> Path:
        return self.state_dir(host) / "runc"

    def cgroup_parent(self, host: str) -> str:
        return f"/{self.cgroup_name}/{host}"


@dataclass(frozen=True)
class LabSpec:
    """What `lab up` decided, persisted in lab.json so every later command agrees."""

    lab: str
    hosts: tuple[str, ...]
    subnet: ipaddress.IPv4Network
    nats_port: int
    allow_faults: bool = False

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def nats_url(self) -> str:
        return f"nats://{self.gateway}:{self.nats_port}"

    def address(self, host: str) -> str:
        index = self.hosts.index(host) + 1
        return str(self.subnet.network_address + FIRST_HOST_OFFSET + index)

    def bridge_mac(self) -> str:
        b = self.subnet.network_address.packed
        return f"02:fa:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}:01"

    def host_bridge_mac(self, host: str) -> str:
        b = self.subnet.network_address.packed
        return f"02:fb:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}:{self.hosts.index(host) + 1:02x}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "lab": self.lab,
                "hosts": list(self.hosts),
                "subnet": str(self.subnet),
                "nats_port": self.nats_port,
                "allow_faults": self.allow_faults,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> LabSpec:
        data = json.loads(text)
        return cls(
            lab=data["lab"],
            hosts=tuple(data["hosts"]),
            subnet=ipaddress.IPv4Network(data["subnet"]),
            nats_port=int(data["nats_port"]),
            allow_faults=bool(data.get("allow_faults", False)),
        )


def host_names(count: int) -> tuple[str, ...]:
    return tuple(f"h{i}" for i in range(1, count + 1))


def read_spec(layout: LabLayout) -> LabSpec | None:
    try:
        return LabSpec.from_json(layout.lab_file.read_text())
    except FileNotFoundError:
        return None
