"""Names and paths of everything a lab creates. Pure: no I/O besides reading lab.json."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from services.errors import InvalidInput

LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
DEFAULT_LAB = "ferry"  # the lab when FERRY_LAB is unset
LABS_ROOT = Path("/var/lib/ferry-lab")
LABS_RUN = Path("/run/ferry-lab")
HOST_STATE_MOUNT = Path("/var/lib/ferry")  # where a host sees its own state dir
HOST_ETC_MOUNT = Path("/etc/ferry")  # where a host sees its own config and credentials
FIRST_HOST_OFFSET = 10  # h1 gets .11
CONTAINER_POOL = (100, 250)
MAX_HOSTS = 50
NATS_NODES = 3  # a JetStream cluster that survives the loss of any one node
NATS_CLIENT_PORT = 4222  # as in deploy/nats/nats.conf
NATS_CLUSTER_PORT = 6222
NATS_MONITOR_PORT = 8222
DEFAULT_CONTROLLERS = 2  # fleet controller instances c1, c2: one active, one standing by
MAX_CONTROLLERS = 9
ZONE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")  # what agent.toml's `zone` accepts (non-empty)


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
    def context_file(self) -> Path:
        """The lab's bus context (`ferry --context FILE`), gone with the lab."""
        return self.root / "context.json"

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

    @property
    def router_netns(self) -> str:
        return f"{self.lab}-rt"

    @property
    def gateway_netns(self) -> str:
        """The overlay's gateway: one uplink, so the kernel's VXLAN route cache never goes
        stale when a container's MAC moves between endpoints on different segments."""
        return f"{self.lab}-gw"

    @property
    def core_link(self) -> str:
        """The root namespace's link to the router (segmented labs)."""
        return f"{self.lab}-core"

    def segment_bridge(self, segment: int) -> str:
        return f"{self.lab}-s{segment}"

    # The management network: NATS nodes, hosts' Ferry traffic and the operator (the root
    # namespace). Containers have no route to it and each host drops what they send it.
    @property
    def mgmt_bridge(self) -> str:
        return f"{self.lab}-mg"

    def mgmt_link(self, host: str) -> str:
        """The root-namespace end of a host's management veth (the host's end is `mgmt`)."""
        return f"{self.lab}-{host}m"

    def nats_netns(self, node: int) -> str:
        return f"{self.lab}-n{node}"

    def nats_node_dir(self, node: int) -> Path:
        return self.nats_dir / f"n{node}"

    @property
    def operator_dir(self) -> Path:
        """What the lab's operator holds: every identity's credentials, the auth config."""
        return self.root / "operator"

    @property
    def pki_dir(self) -> Path:
        """The lab's CA and every certificate it signed (what `ferry certs` writes)."""
        return self.operator_dir / "pki"

    @property
    def ca_file(self) -> Path:
        """The lab's CA certificate: what every client of its NATS and every host trusts."""
        return self.pki_dir / "ca.pem"

    def host_etc(self, host: str) -> Path:
        """The host's /etc/ferry (bound there in its mount namespace): config, credentials."""
        return self.state_dir(host) / "etc"

    # The fleet controllers run in the root namespace (as on a machine of their own that
    # reaches the management network), each with a directory like a machine's /etc/ferry.
    @property
    def controllers_dir(self) -> Path:
        return self.root / "controllers"

    def controller_dir(self, name: str) -> Path:
        """Controller `name`'s config, credentials, CA, pid file and log."""
        return self.controllers_dir / name

    def controller_config(self, name: str) -> Path:
        return self.controller_dir(name) / "controller.toml"

    def controller_log(self, name: str) -> Path:
        return self.controller_dir(name) / "controller.log"

    def controller_pid_file(self, name: str) -> Path:
        return self.controller_dir(name) / "controller.pid"


@dataclass(frozen=True)
class HostSize:
    """What a lab host declares it may give containers (agent.toml's [capacity])."""

    memory_mib: int
    cpus: float

    def to_json(self) -> dict[str, int | float]:
        return {"memory_mib": self.memory_mib, "cpus": self.cpus}

    @classmethod
    def from_json(cls, data: dict[str, int | float]) -> HostSize:
        return cls(memory_mib=int(data["memory_mib"]), cpus=float(data["cpus"]))


def _entries(text: str, count: int, option: str) -> list[str]:
    """`text`'s comma-separated entries, cycled over `count` hosts."""
    entries = [e.strip() for e in text.split(",")]
    for i, entry in enumerate(entries, 1):
        if not entry:
            raise InvalidInput(f"entry {i} of {text!r} is empty", field=option)
    if len(entries) > count:
        raise InvalidInput(
            f"{len(entries)} entries ({text!r}) for {count} host(s); give at most one per host",
            field=option,
        )
    return [entries[i % len(entries)] for i in range(count)]


def parse_zones(text: str | None, count: int) -> tuple[str, ...]:
    """`--zones a,a,b,b`: one zone per host in order, cycled if fewer; none: no zones."""
    if text is None:
        return ()
    zones = _entries(text, count, "--zones")
    for zone in zones:
        if not ZONE.match(zone):
            raise InvalidInput(
                f"zone {zone!r} must be 1-63 letters, digits, '.', '_' or '-'", field="--zones"
            )
    return tuple(zones)


def parse_size(entry: str) -> HostSize:
    """One `MEMORY_MIB:CPUS` entry of `--sizes`, e.g. `2048:2` or `512:0.5`."""
    memory, sep, cpus = entry.partition(":")
    why = f"size {entry!r} must be MEMORY_MIB:CPUS, e.g. 2048:2"
    if not sep:
        raise InvalidInput(why, field="--sizes")
    try:
        memory_mib, cpu_count = int(memory), float(cpus)
    except ValueError:
        raise InvalidInput(why, field="--sizes") from None
    if memory_mib < 1:
        raise InvalidInput(f"size {entry!r}: memory must be at least 1 MiB", field="--sizes")
    if not math.isfinite(cpu_count) or cpu_count <= 0:
        raise InvalidInput(f"size {entry!r}: CPUs must be more than 0", field="--sizes")
    return HostSize(memory_mib, cpu_count)


def parse_sizes(text: str | None, count: int) -> tuple[HostSize, ...]:
    """`--sizes 2048:2,1024:1`: each host's MEMORY_MIB:CPUS, cycled; none: not declared."""
    if text is None:
        return ()
    return tuple(parse_size(entry) for entry in _entries(text, count, "--sizes"))


def controller_names_for(count: int) -> tuple[str, ...]:
    return tuple(f"c{i}" for i in range(1, count + 1))


@dataclass(frozen=True)
class LabSpec:
    """What `lab up` decided, persisted in lab.json so every later command agrees."""

    lab: str
    hosts: tuple[str, ...]
    subnet: ipaddress.IPv4Network
    nats_port: int
    mgmt_subnet: ipaddress.IPv4Network
    allow_faults: bool = False
    # Transfers between hosts and CRIU's page streams in the clear (NATS keeps its TLS):
    # only to measure what encryption costs (make bench).
    plain_transfers: bool = False
    # Segmented labs: each segment is its own routed network; containers keep their
    # addresses on `subnet`, carried between hosts by a VXLAN overlay.
    segment_subnets: tuple[ipaddress.IPv4Network, ...] = ()
    core_subnet: ipaddress.IPv4Network | None = None
    # Per host, in the order of `hosts` (empty: none declared, as in labs made before).
    zones: tuple[str, ...] = ()
    sizes: tuple[HostSize, ...] = ()
    # The fleet controller instances the lab runs (a lab.json without them: none).
    controllers: tuple[str, ...] = ()

    def zone_of(self, host: str) -> str:
        """The host's zone; "" when the lab declared none."""
        return self.zones[self.hosts.index(host)] if self.zones else ""

    def size_of(self, host: str) -> HostSize | None:
        """The host's declared capacity; None when the lab declared none."""
        return self.sizes[self.hosts.index(host)] if self.sizes else None

    @property
    def segments(self) -> int:
        return max(1, len(self.segment_subnets))

    @property
    def segmented(self) -> bool:
        return self.segments > 1

    @property
    def gateway(self) -> str:
        """The containers' default gateway (the router's overlay address when segmented)."""
        return str(self.subnet.network_address + 1)

    @property
    def operator_address(self) -> str:
        """The root namespace's address on the management network."""
        return str(self.mgmt_subnet.network_address + 1)

    @property
    def nats_nodes(self) -> tuple[int, ...]:
        return tuple(range(1, NATS_NODES + 1))

    def nats_address(self, node: int) -> str:
        return str(self.mgmt_subnet.network_address + 1 + node)

    @property
    def nats_urls(self) -> tuple[str, ...]:
        return tuple(f"nats://{self.nats_address(n)}:{self.nats_port}" for n in self.nats_nodes)

    def mgmt_address(self, host: str) -> str:
        """Where other hosts reach this one: transfers, page servers, its NATS connection."""
        index = self.hosts.index(host) + 1
        return str(self.mgmt_subnet.network_address + FIRST_HOST_OFFSET + index)

    @property
    def core_address(self) -> str:
        """The root namespace's end of the link to the router (segmented labs)."""
        assert self.core_subnet is not None
        return str(self.core_subnet.network_address + 1)

    @property
    def router_core_address(self) -> str:
        assert self.core_subnet is not None
        return str(self.core_subnet.network_address + 2)

    @property
    def router_gw_address(self) -> str:
        """Router end of the router-gateway link (the core /24's second /30)."""
        assert self.core_subnet is not None
        return str(self.core_subnet.network_address + 5)

    @property
    def vtep_gateway_address(self) -> str:
        assert self.core_subnet is not None
        return str(self.core_subnet.network_address + 6)

    @property
    def vni(self) -> int:
        return 1000 + lab_hash(self.lab) % 10000

    def segment_of(self, host: str) -> int:
        """Hosts are spread over the segments in turn: h1 -> 1, h2 -> 2, …"""
        return self.hosts.index(host) % self.segments + 1

    def segment_gateway(self, segment: int) -> str:
        return str(self.segment_subnets[segment - 1].network_address + 1)

    def address(self, host: str) -> str:
        index = self.hosts.index(host) + 1
        if self.segmented:
            net = self.segment_subnets[self.segment_of(host) - 1]
            return str(net.network_address + FIRST_HOST_OFFSET + index)
        return str(self.subnet.network_address + FIRST_HOST_OFFSET + index)

    def host_gateway(self, host: str) -> str:
        return self.segment_gateway(self.segment_of(host)) if self.segmented else self.gateway

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
                "mgmt_subnet": str(self.mgmt_subnet),
                "allow_faults": self.allow_faults,
                "plain_transfers": self.plain_transfers,
                "segment_subnets": [str(s) for s in self.segment_subnets],
                "core_subnet": str(self.core_subnet) if self.core_subnet else None,
                "zones": list(self.zones),
                "sizes": [size.to_json() for size in self.sizes],
                "controllers": list(self.controllers),
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
            mgmt_subnet=ipaddress.IPv4Network(data["mgmt_subnet"]),
            allow_faults=bool(data.get("allow_faults", False)),
            plain_transfers=bool(data.get("plain_transfers", False)),
            segment_subnets=tuple(
                ipaddress.IPv4Network(s) for s in data.get("segment_subnets") or []
            ),
            core_subnet=ipaddress.IPv4Network(data["core_subnet"])
            if data.get("core_subnet")
            else None,
            zones=tuple(data.get("zones") or ()),
            sizes=tuple(HostSize.from_json(s) for s in data.get("sizes") or ()),
            controllers=tuple(data.get("controllers") or ()),
        )


def host_names(count: int) -> tuple[str, ...]:
    return tuple(f"h{i}" for i in range(1, count + 1))


def read_spec(layout: LabLayout) -> LabSpec | None:
    try:
        return LabSpec.from_json(layout.lab_file.read_text())
    except FileNotFoundError:
        return None
