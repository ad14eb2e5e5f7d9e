"""A host's configuration: a TOML file, overridden by FERRY_* environment variables.

`HostConfig.load(path)` reads `path`, else the file named by $FERRY_CONFIG, else no file;
a variable that is set beats the file, which beats the defaults. The lab sets only
variables; a real host has /etc/ferry/agent.toml (deploy/systemd/agent.toml.example):

    host = "h1"                  # FERRY_HOST; the name on the bus: [a-z][a-z0-9-]*
    zone = "az1"                 # FERRY_ZONE (default "")
    region = "eu-west"           # FERRY_REGION (default "")
    cloud = "onprem"             # FERRY_CLOUD (default "")
    address = "10.0.0.11"        # FERRY_HOST_ADDRESS; where other hosts reach this one
    state_dir = "/var/lib/ferry" # FERRY_STATE_DIR (runc state, layers, logs, markers)
    cgroup_parent = "/ferry"     # FERRY_CGROUP_PARENT; containers' cgroups go under it
    transfer_port = 7441         # FERRY_TRANSFER_PORT
    [labels]                     # FERRY_LABELS="disk=ssd,gpu=a100" (added to the file's)
    disk = "ssd"
    [capacity]                   # declared, not measured; absent: unknown
    memory_mib = 16384           # FERRY_CAPACITY_MEMORY_MIB
    cpus = 8                     # FERRY_CAPACITY_CPUS
    [bus]
    servers = ["nats://10.9.0.1:4222", "nats://10.9.0.2:4222"]  # FERRY_NATS_URL=a,b
    creds = "/etc/ferry/h1.creds"  # FERRY_NATS_CREDS; this identity's secret (0600)
    ca = "/etc/ferry/ca.pem"       # FERRY_NATS_CA; optional, for tls:// servers
    [tls]                        # mutual TLS between hosts (transfers, CRIU's page streams)
    ca = "/etc/ferry/ca.pem"       # FERRY_TLS_CA; the fleet CA
    cert = "/etc/ferry/h1.pem"     # FERRY_TLS_CERT; CN = the host's name, IP SAN = address
    key = "/etc/ferry/h1.key"      # FERRY_TLS_KEY (0600)
    [network]                    # the containers' datacenter network
    subnet = "10.1.0.0/24"       # FERRY_DC_SUBNET
    gateway = "10.1.0.1"         # FERRY_DC_GATEWAY
    ip_pool = "100-250"          # FERRY_IP_POOL; host numbers in the subnet
    bridge = "br0"               # FERRY_BRIDGE

Tuning keys, top level, rarely changed: watchdog_interval_s, collector_interval_s,
collector_min_age_s, collector_confirm_s, orphan_limit, owner_answer_timeout_s, and a
container log's cap: log_file_bytes per file, log_files files, current included (each also
FERRY_<KEY upper-cased>). Paths must be absolute. Any error — a missing or unknown key, a
wrong type, an unreadable file — is an `InvalidInput` naming the file (or variable), the
key and why. Which key maps to which attribute: services/config_layout.py.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from schemas.v1.base import HOST_PATTERN
from schemas.v1.hosts import HostCapacity
from schemas.v1.types import IPStr
from services import config_layout
from services.config_layout import CONFIG_ENV, LayoutError
from services.errors import InvalidInput
from services.tls import TlsFiles

BUS_SCHEMES = ("nats", "tls", "ws", "wss")
LabelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]


class Capacity(HostCapacity):
    """The registration's capacity as the file gives it: an unknown key is a typo here."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class HostConfig(BaseSettings):
    """What one host's agent and workers need to know about their host."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    host: str = Field(pattern=HOST_PATTERN)
    address: IPStr
    zone: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,63}$")
    region: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,63}$")
    cloud: str = Field(default="", pattern=r"^[A-Za-z0-9._-]{0,63}$")
    labels: dict[LabelName, str] = Field(default_factory=dict)
    capacity: Capacity = Field(default_factory=Capacity)
    nats_servers: tuple[str, ...] = Field(min_length=1)
    nats_creds: Path | None = None
    nats_ca: Path | None = None
    # This host's certificate (its name in the CN or a DNS SAN, its address as an IP SAN)
    # and the fleet CA: transfers between hosts go over mutual TLS with them.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    subnet: ipaddress.IPv4Network
    gateway: str
    ip_pool: tuple[int, int] = (100, 250)  # the same on every host: one fleet-wide pool
    bridge: str = Field(default="br0", pattern=r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1
    state_dir: Path = Path("/var/lib/ferry")
    cgroup_parent: str = Field(default="/ferry", pattern=r"^(/[A-Za-z0-9_.-]+)+$")
    transfer_port: int = Field(default=7441, ge=0, le=65535)  # 0: any free port (tests)
    watchdog_interval_s: float = Field(default=2.0, gt=0)
    collector_interval_s: float = Field(default=30.0, gt=0)
    collector_min_age_s: float = Field(default=60.0, ge=0)
    # Fencing: the same placement seen on two sweeps this far apart before acting on it; more
    # would-be orphans than the limit in one sweep is taken for a lost store (nothing done).
    collector_confirm_s: float = Field(default=60.0, ge=0)
    orphan_limit: int = Field(default=3, ge=0)
    owner_answer_timeout_s: float = Field(default=2.0, gt=0)
    # A container's stdout and stderr: multilog's limits (4096 to 16777215 bytes a file).
    log_file_bytes: int = Field(default=1 << 20, ge=4096, le=16_777_215)
    log_files: int = Field(default=4, ge=2, le=1000)
    config_file: Path | None = Field(
        default=None, description="the file this was read from; its workers read it too"
    )

    @classmethod
    def load(cls, path: Path | None = None) -> HostConfig:
        """`path`, else $FERRY_CONFIG, else no file; FERRY_* variables override either."""
        try:
            return cls(config_file=path) if path is not None else cls()
        except ValidationError as exc:
            raise _invalid(exc, path) from None

    @classmethod
    def from_env(cls) -> HostConfig:
        """Kept for callers that predate the file: the same as `load()`."""
        return cls.load(None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first. Our own env source, not pydantic's: the variables' names predate
        # the file (FERRY_DC_SUBNET is `subnet`) and must keep working.
        return init_settings, _EnvSource(settings_cls), _TomlSource(settings_cls)

    @field_validator("nats_servers")
    @classmethod
    def _bus_urls(cls, servers: tuple[str, ...]) -> tuple[str, ...]:
        for url in servers:
            parts = urlsplit(url)
            if parts.scheme not in BUS_SCHEMES or not parts.hostname:
                raise ValueError(
                    f"{url!r} is not a server URL ({'|'.join(BUS_SCHEMES)}://HOST:PORT)"
                )
        return servers

    @field_validator(
        "nats_creds", "nats_ca", "tls_ca", "tls_cert", "tls_key", "state_dir", "config_file"
    )
    @classmethod
    def _absolute(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        if info.field_name == "config_file":  # a relative --config means the caller's cwd
            return path.absolute()
        if not path.is_absolute():
            raise ValueError(f"{str(path)!r} is not an absolute path")
        return path

    @model_validator(mode="after")
    def _tls_whole(self) -> HostConfig:
        given = [self.tls_ca, self.tls_cert, self.tls_key]
        if any(given) and not all(given):
            raise ValueError("tls: give ca, cert and key together (or none of them)")
        return self

    @property
    def tls(self) -> TlsFiles | None:
        """The files for mutual TLS between hosts, or None where the host has none."""
        if self.tls_ca is None or self.tls_cert is None or self.tls_key is None:
            return None
        return TlsFiles(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)

    @field_validator("subnet", mode="before")
    @classmethod
    def _network(cls, value: Any) -> Any:
        if isinstance(value, str):  # say why ("has host bits set"), not only that it is bad
            try:
                return ipaddress.IPv4Network(value)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("gateway")
    @classmethod
    def _gateway_in_subnet(cls, gateway: str, info: ValidationInfo) -> str:
        try:
            address = ipaddress.IPv4Address(gateway)
        except ValueError:
            raise ValueError(f"{gateway!r} is not an IPv4 address") from None
        subnet = info.data.get("subnet")
        if subnet is not None and address not in subnet:
            raise ValueError(f"{gateway} is not in the subnet {subnet}")
        return gateway

    @field_validator("ip_pool", mode="before")
    @classmethod
    def _pool_range(cls, value: Any) -> Any:
        if isinstance(value, str):  # "100-250", as in the file and FERRY_IP_POOL
            first, sep, last = value.partition("-")
            if not sep:
                raise ValueError(f"{value!r} is not FIRST-LAST (e.g. 100-250)")
            return (first.strip(), last.strip())
        return value

    @field_validator("ip_pool")
    @classmethod
    def _pool_in_subnet(cls, pool: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        first, last = pool
        if not 0 < first <= last:
            raise ValueError(f"{first}-{last} is not a range FIRST-LAST with 0 < FIRST <= LAST")
        subnet = info.data.get("subnet")
        if subnet is None:
            return pool
        if last >= subnet.num_addresses - 1:  # the last address is the broadcast
            raise ValueError(
                f"{first}-{last} does not fit in {subnet} (last usable: {subnet.num_addresses - 2})"
            )
        gateway = info.data.get("gateway")
        if gateway is not None:
            offset = int(ipaddress.IPv4Address(gateway)) - int(subnet.network_address)
            if first <= offset <= last:
                raise ValueError(f"{first}-{last} holds the gateway {gateway}")
        return pool

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
    def volumes_dir(self) -> Path:
        return self.state_dir / "volumes"

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

    def as_file(self) -> dict[str, Any]:
        """The effective settings laid out as the file lays them out (JSON-able), plus the
        file they came from. Nothing secret: `bus.creds` is a path."""
        attrs = self.model_dump(mode="json")
        return {"config_file": attrs["config_file"], **config_layout.to_file(attrs)}


class _EnvSource(PydanticBaseSettingsSource):
    """FERRY_* variables, by the names in services/config_layout.py."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads them all at once

    def __call__(self) -> dict[str, Any]:
        try:
            return config_layout.from_env(os.environ)
        except LayoutError as exc:
            raise InvalidInput(f"{exc.key}: {exc.reason}", field=exc.key) from None


class _TomlSource(PydanticBaseSettingsSource):
    """The file named by `config_file` (given, or $FERRY_CONFIG), if any."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file

    def __call__(self) -> dict[str, Any]:
        named = self.current_state.get("config_file")  # from the sources above this one
        if named is None:
            return {}
        path = Path(named)
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise InvalidInput(
                f"{path}: cannot read: {exc.strerror}", field="config_file"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: not TOML: {exc}", field="config_file") from None
        try:
            return config_layout.from_file(doc)
        except LayoutError as exc:
            raise InvalidInput(f"{path}: {exc.key}: {exc.reason}", field=exc.key) from None


def _invalid(exc: ValidationError, path: Path | None) -> InvalidInput:
    """One InvalidInput for every error, each saying where the bad value came from."""
    if path is None and os.environ.get(CONFIG_ENV, "").strip():
        path = Path(os.environ[CONFIG_ENV].strip()).absolute()
    said: list[str] = []
    first_key: str | None = None
    for error in exc.errors():
        setting, rest = config_layout.setting_at(tuple(error["loc"]))
        key = f"{setting.key or setting.attr}{rest}" if setting else rest
        first_key = first_key or key
        why = error["msg"].removeprefix("Value error, ")
        if setting and os.environ.get(setting.env, "").strip():
            where = f"environment {setting.env} ({key})"  # a variable beats the file
        elif path is not None:
            where = f"{path}: {key}"
        else:
            where = key
        if error["type"] == "missing":
            why = f"required (in the file, or set {setting.env})" if setting else "required"
        said.append(f"{where}: {why}")
    return InvalidInput("; ".join(said), field=first_key)
