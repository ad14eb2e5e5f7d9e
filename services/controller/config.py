"""A fleet controller's configuration: a TOML file, overridden by FERRY_* variables.

    name = "c1"                    # FERRY_CONTROLLER_NAME; [a-z][a-z0-9-]*, unique per instance
    sweep_interval_s = 5.0         # FERRY_CONTROLLER_SWEEP_S; reservations swept this often
    standby_poll_s = 1.0           # FERRY_CONTROLLER_POLL_S; a standby looks at the lease
    [bus]
    servers = ["nats://10.9.0.1:4222"]   # FERRY_NATS_URL=a,b
    creds = "/etc/ferry/controller-c1.creds"  # FERRY_NATS_CREDS
    ca = "/etc/ferry/ca.pem"             # FERRY_NATS_CA

Any error is an InvalidInput naming the file or variable, the key and why.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.v1.base import HOST_PATTERN
from services.errors import InvalidInput

ENV = {
    "FERRY_CONTROLLER_NAME": ("name",),
    "FERRY_CONTROLLER_SWEEP_S": ("sweep_interval_s",),
    "FERRY_CONTROLLER_POLL_S": ("standby_poll_s",),
    "FERRY_NATS_URL": ("bus", "servers"),
    "FERRY_NATS_CREDS": ("bus", "creds"),
    "FERRY_NATS_CA": ("bus", "ca"),
}


class BusConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: tuple[str, ...] = Field(min_length=1)
    creds: Path | None = None
    ca: Path | None = None


class ControllerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=HOST_PATTERN)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    standby_poll_s: float = Field(default=1.0, gt=0)
    bus: BusConfig

    @classmethod
    def load(cls, path: Path | None) -> ControllerConfig:
        raw: dict[str, Any] = {}
        where = "the environment"
        if path is not None:
            where = str(path)
            try:
                raw = tomllib.loads(path.read_text())
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise InvalidInput(f"{path} cannot be read: {exc}", field=str(path)) from None
        for variable, keys in ENV.items():
            value = os.environ.get(variable)
            if value is None:
                continue
            table = raw
            for key in keys[:-1]:
                table = table.setdefault(key, {})
            table[keys[-1]] = value.split(",") if keys[-1] == "servers" else value
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(top)"
            raise InvalidInput(f"{where}: {key}: {first['msg']}", field=key) from None
