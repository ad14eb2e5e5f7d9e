"""Where each of a host's settings sits in its TOML file and which environment variable
overrides it: one table, read both ways (file -> attributes, attributes -> file), no I/O.

`HostConfig` (services/config.py) keeps its attributes flat (`config.subnet`,
`config.nats_servers`); the file groups them in tables (`[network] subnet`, `[bus] servers`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONFIG_ENV = "FERRY_CONFIG"  # the file to read when none is given


@dataclass(frozen=True)
class Setting:
    """One setting: its attribute (dotted when nested), its key in the file, its variable."""

    attr: str
    key: str
    env: str


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "host", "FERRY_HOST"),
    Setting("address", "address", "FERRY_HOST_ADDRESS"),
    Setting("zone", "zone", "FERRY_ZONE"),
    Setting("region", "region", "FERRY_REGION"),
    Setting("cloud", "cloud", "FERRY_CLOUD"),
    Setting("labels", "labels", "FERRY_LABELS"),  # env: "disk=ssd,gpu=a100"
    Setting("capacity.memory_mib", "capacity.memory_mib", "FERRY_CAPACITY_MEMORY_MIB"),
    Setting("capacity.cpus", "capacity.cpus", "FERRY_CAPACITY_CPUS"),
    Setting("nats_servers", "bus.servers", "FERRY_NATS_URL"),  # env: comma-separated
    Setting("nats_creds", "bus.creds", "FERRY_NATS_CREDS"),
    Setting("nats_ca", "bus.ca", "FERRY_NATS_CA"),
    Setting("tls_ca", "tls.ca", "FERRY_TLS_CA"),
    Setting("tls_cert", "tls.cert", "FERRY_TLS_CERT"),
    Setting("tls_key", "tls.key", "FERRY_TLS_KEY"),
    Setting("subnet", "network.subnet", "FERRY_DC_SUBNET"),
    Setting("gateway", "network.gateway", "FERRY_DC_GATEWAY"),
    Setting("ip_pool", "network.ip_pool", "FERRY_IP_POOL"),
    Setting("bridge", "network.bridge", "FERRY_BRIDGE"),
    Setting("state_dir", "state_dir", "FERRY_STATE_DIR"),
    Setting("cgroup_parent", "cgroup_parent", "FERRY_CGROUP_PARENT"),
    Setting("transfer_port", "transfer_port", "FERRY_TRANSFER_PORT"),
    Setting("watchdog_interval_s", "watchdog_interval_s", "FERRY_WATCHDOG_INTERVAL_S"),
    Setting("collector_interval_s", "collector_interval_s", "FERRY_COLLECTOR_INTERVAL_S"),
    Setting("collector_min_age_s", "collector_min_age_s", "FERRY_COLLECTOR_MIN_AGE_S"),
    Setting("collector_confirm_s", "collector_confirm_s", "FERRY_COLLECTOR_CONFIRM_S"),
    Setting("orphan_limit", "orphan_limit", "FERRY_ORPHAN_LIMIT"),
    Setting("owner_answer_timeout_s", "owner_answer_timeout_s", "FERRY_OWNER_ANSWER_TIMEOUT_S"),
    Setting("log_file_bytes", "log_file_bytes", "FERRY_LOG_FILE_BYTES"),
    Setting("log_files", "log_files", "FERRY_LOG_FILES"),
    Setting("config_file", "", CONFIG_ENV),  # never in a file: it names the file
)
TABLES = frozenset(
    {"bus", "network", "capacity", "tls"}
)  # `labels` is a table too, but of free keys

_BY_KEY = {s.key: s for s in SETTINGS if s.key}
_BY_ATTR = {s.attr: s for s in SETTINGS}


class LayoutError(ValueError):
    """A key of the file that is not a setting, or a table that is not one."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _put(values: dict[str, Any], attr: str, value: Any) -> None:
    *parents, last = attr.split(".")
    for name in parents:
        values = values.setdefault(name, {})
    values[last] = value


def from_file(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes a parsed TOML document sets; unknown keys are refused, as a typo
    passing silently would leave a default in force."""
    values: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for name, value in table.items():
            key = f"{prefix}{name}"
            if key in _BY_KEY:
                _put(values, _BY_KEY[key].attr, value)
            elif key in TABLES:
                if not isinstance(value, Mapping):
                    raise LayoutError(key, f"must be a table ([{key}]), not {type(value).__name__}")
                walk(value, f"{key}.")
            else:
                near = difflib.get_close_matches(key, [*_BY_KEY, *TABLES], n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise LayoutError(key, f"unknown key{hint}")

    walk(doc, "")
    return values


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The attributes the environment sets; an empty variable counts as unset."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = environ.get(setting.env, "").strip()
        if not raw:
            continue
        value: Any = raw
        if setting.attr == "nats_servers":
            value = [url.strip() for url in raw.split(",") if url.strip()]
        elif setting.attr == "labels":
            value = _labels(setting.env, raw)
        _put(values, setting.attr, value)
    return values


def _labels(env: str, raw: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in raw.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise LayoutError(env, f"{item.strip()!r} is not NAME=VALUE")
        labels[name.strip()] = value.strip()
    return labels


def to_file(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Flat attributes (as JSON-able values) arranged as the file arranges them."""
    doc: dict[str, Any] = {}
    for setting in SETTINGS:
        *parents, last = setting.attr.split(".")
        value: Any = attrs
        for name in [*parents, last]:
            value = value.get(name) if isinstance(value, Mapping) else None
        if setting.key and value is not None:
            _put(doc, setting.key, value)
    return doc


def setting_at(loc: tuple[int | str, ...]) -> tuple[Setting | None, str]:
    """The setting a validation error's location points into, and the rest of the location
    written after its key (`[1]` for a list's second item, `.disk` for a label)."""
    for size in (2, 1):
        attr = ".".join(str(p) for p in loc[:size])
        if len(loc) >= size and attr in _BY_ATTR:
            rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[size:])
            return _BY_ATTR[attr], rest
    return None, ".".join(str(p) for p in loc)
