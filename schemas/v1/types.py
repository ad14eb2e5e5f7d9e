"""Typed strings every schema shares: migration ids, IP addresses, MACs and address:port
endpoints. Each is checked where it is read, so none reaches a path or a command line
unchecked; after the check it is a plain `str`, spelled as it was sent."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

# A migration id is what intake makes: uuid4().hex[:16], 16 lowercase hex digits. It names
# directories (rmtree'd), KV keys, subjects and lease keys: nothing else may pass.
_MIGRATION_ID_BODY = "[0-9a-f]{16}"
MIGRATION_ID_PATTERN = f"^{_MIGRATION_ID_BODY}$"  # Rust regex (pydantic, JSON Schema): $ ends it
MIGRATION_ID = re.compile(rf"^{_MIGRATION_ID_BODY}\Z")  # Python: no newline after the id either
MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"  # as netns.mac_for writes it
ENDPOINT_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:.]+):[0-9]{1,5}$"  # the shape; ports checked

MigrationId = Annotated[str, StringConstraints(pattern=MIGRATION_ID_PATTERN)]
MacStr = Annotated[str, StringConstraints(pattern=MAC_PATTERN)]


def _address(value: str, versions: tuple[int, ...]) -> str:
    if "%" in value:  # a scope id would carry any bytes along
        raise ValueError(f"{value!r} is not an IP address (no %scope here)")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        address = None
    if address is None or address.version not in versions:
        kind = "an IPv4" if versions == (4,) else "an IP"
        raise ValueError(f"{value!r} is not {kind} address")
    return value


def _ipv4(value: str) -> str:
    return _address(value, (4,))


def _ip(value: str) -> str:
    return _address(value, (4, 6))


def _endpoint(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or not 0 < int(port) <= 65535:
        raise ValueError(f"{value!r} is not address:port (a port from 1 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    _ip(host)
    return value


IPv4Str = Annotated[
    str, AfterValidator(_ipv4), WithJsonSchema({"type": "string", "format": "ipv4"})
]
"""A container's address: Ferry's address pool is IPv4."""

IPStr = Annotated[
    str, AfterValidator(_ip), WithJsonSchema({"type": "string", "format": "ipvanyaddress"})
]
"""A host's address: IPv4 or IPv6."""

EndpointStr = Annotated[
    str,
    AfterValidator(_endpoint),
    WithJsonSchema({"type": "string", "pattern": ENDPOINT_PATTERN, "description": "address:port"}),
]
"""Where a page server or transfer listens: IPv4:port, or [IPv6]:port (IPv6:port is read
too, its port being after the last colon)."""
