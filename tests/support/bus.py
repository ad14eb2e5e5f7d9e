"""Talking to a lab's NATS as another system would: raw JSON on the documented subjects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nats

REQUEST_SUBJECT = "ferry.v1.migrations.request"


def nats_url(lab: str) -> str:
    spec = json.loads(Path(f"/var/lib/ferry-lab/{lab}/lab.json").read_text())
    gateway = spec["subnet"].rsplit(".", 1)[0] + ".1"
    return f"nats://{gateway}:{spec['nats_port']}"


async def request_raw(lab: str, payload: bytes, timeout: float = 15.0) -> dict[str, Any]:
    nc = await nats.connect(nats_url(lab))
    try:
        reply = await nc.request(REQUEST_SUBJECT, payload, timeout=timeout)
    finally:
        await nc.close()
    return dict(json.loads(reply.data))
