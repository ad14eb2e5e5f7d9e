"""What every command needs: which lab, its spec, and a bus connection."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.aio.client import Client as NATS

from deploy.lab.layout import LabLayout, LabSpec, read_spec, validate_lab_name
from services import bus
from services.errors import RuntimeFailure


def lab_layout() -> LabLayout:
    return LabLayout(validate_lab_name(os.environ.get("FERRY_LAB", "ferry")))


def say(text: str) -> None:
    """Progress for people: always stderr, so stdout stays one JSON document."""
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Lab:
    layout: LabLayout
    spec: LabSpec


def current_lab() -> Lab:
    layout = lab_layout()
    spec = read_spec(layout)
    if spec is None:
        raise RuntimeFailure(f"lab {layout.lab!r} is not up (run `ferry lab up --hosts N`)")
    return Lab(layout, spec)


@contextlib.asynccontextmanager
async def connected(lab: Lab) -> AsyncIterator[NATS]:
    nc = await bus.connect(lab.spec.nats_url, name="ferry-cli")
    try:
        yield nc
    finally:
        await nc.close()
