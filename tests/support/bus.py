"""Talking to a lab's NATS as another system would: raw JSON on the documented subjects,
with the identity the lab's operator handed out (every lab bus requires credentials)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from deploy.lab.lab import LAB_REQUESTER, operator_creds, requester_creds
from deploy.lab.layout import LabLayout, read_spec
from services import bus

REQUEST_SUBJECT = f"ferry.v1.migrations.request.requester-{LAB_REQUESTER}"
CANCEL_SUBJECT = f"ferry.v1.migrations.cancel.requester-{LAB_REQUESTER}"


def nats_urls(lab: str) -> list[str]:
    spec = read_spec(LabLayout(lab))
    assert spec is not None, f"lab {lab} is not up"
    return list(spec.nats_urls)


async def connect_as(lab: str, creds: Path | None, **options: Any) -> NATS:
    """A plain nats-py client of the lab's cluster (no reconnecting forever, unlike a
    worker's): `creds` None is an anonymous client."""
    ca = LabLayout(lab).ca_file
    return await nats.connect(nats_urls(lab), **bus.client_options(creds, ca), **options)


async def operator_nats(lab: str) -> NATS:
    return await connect_as(lab, operator_creds(LabLayout(lab)))


async def requester_nats(lab: str) -> NATS:
    return await connect_as(lab, requester_creds(LabLayout(lab)))


async def request_raw(lab: str, payload: bytes, timeout: float = 15.0) -> dict[str, Any]:
    nc = await requester_nats(lab)
    try:
        reply = await nc.request(REQUEST_SUBJECT, payload, timeout=timeout)
    finally:
        await bus.close(nc)
    return dict(json.loads(reply.data))
