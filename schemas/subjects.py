"""Subject, bucket and stream names: the bus topology declared in one place."""

from __future__ import annotations

PREFIX = "ferry.v1"

# KV buckets and object stores.
HOSTS_BUCKET = "ferry-hosts"  # "<host>" agent heartbeat, "<host>.<role>" worker heartbeats
PLACEMENT_BUCKET = "ferry-placement"  # "<container>" -> Placement
IPAM_BUCKET = "ferry-ipam"  # "<ip with dashes>" -> container name
LAYERS_STORE = "ferry-layers"  # "<sha256>" -> rootfs tar

HEARTBEAT_TTL_S = 5.0
HEARTBEAT_INTERVAL_S = 1.0


def host_request(host: str, action: str) -> str:
    """Request/reply subject one host serves, e.g. ferry.v1.host.h1.container.create."""
    return f"{PREFIX}.host.{host}.{action}"


CREATE_CONTAINER = "container.create"  # destination worker
REMOVE_CONTAINER = "container.remove"  # cleanup worker
LIST_CONTAINERS = "container.list"  # source worker


def worker_key(host: str, role: str) -> str:
    return f"{host}.{role}"


def ip_key(ip: str) -> str:
    return ip.replace(".", "-")
