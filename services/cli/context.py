"""Which bus `ferry` talks to — a context, the way the `nats` CLI has contexts — and the
connection to it.

A context is a small JSON file naming the bus servers (any of them will do):

    {"servers": ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"],
     "creds": "/etc/ferry/cli.creds", "ca": "/etc/ferry/ca.pem", "description": "prod"}

`ferry` uses the first of these that is set:

1. `--context NAME|FILE` (before the command: `ferry --context prod hosts`);
2. env `FERRY_CONTEXT=NAME|FILE`;
3. env `FERRY_LAB=NAME`: a deprecated alias of `FERRY_CONTEXT=NAME` (a name, never a path),
   kept because every lab script and test sets it; `ferry lab up` writes the context `NAME`;
4. env `FERRY_NATS_URL=URL[,URL…]`: the servers themselves, no file;
5. the default context file, `$XDG_CONFIG_HOME/ferry/context.json`
   (`~/.config/ferry/context.json`).

A NAME is the file `$XDG_CONFIG_HOME/ferry/contexts/NAME.json`; a value with a `/` in it or
ending in `.json` is a path. A missing context is `NoContext` (exit 1: the listing commands
print empty lists, as they did for a lab that was not up); a context that is there but wrong
is bad input (exit 2); both errors name the file, the field, and how to get a good one.

This module knows contexts, not labs: the `ferry lab` plugin (deploy/lab/) writes and removes
its lab's contexts through `write_context`, `context_file` and `default_context_file`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from schemas import subjects
from services import bus
from services.cli.errors import one_line
from services.errors import InvalidInput, RuntimeFailure
from services.kvstores import KvPlacementStore
from workflows.placement_chain import OPERATOR_AUTHOR

CONTEXT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SCHEMES = ("nats", "tls", "ws", "wss")
HOW_TO_GET = (
    "`ferry lab up` writes one for a lab; on real machines write"
    ' {"servers": ["nats://HOST:4222"]} there'
)


def say(text: str) -> None:
    """Progress for people: always stderr, so stdout stays one JSON document."""
    print(text, file=sys.stderr, flush=True)


def _server_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a NATS server URL ({exc})") from None
    if parts.scheme not in SCHEMES or not parts.hostname or port == 0:
        raise ValueError(
            f"{url!r} is not a NATS server URL (like nats://HOST:4222; schemes"
            f" {', '.join(SCHEMES)})"
        )
    return url


def _some(servers: tuple[str, ...]) -> tuple[str, ...]:
    if not servers:
        raise ValueError("needs at least one NATS server URL, like nats://HOST:4222")
    return servers


ServerUrl = Annotated[str, AfterValidator(_server_url)]


class BusContext(BaseModel):
    """One bus `ferry` can talk to, and the identity `ferry` speaks as there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: Annotated[tuple[ServerUrl, ...], AfterValidator(_some)] = Field(
        description="NATS server URLs of one cluster, e.g. nats://10.0.0.1:4222"
    )
    creds: Path | None = Field(
        default=None, description="this identity's credentials file (JSON user+password, mode 0600)"
    )
    ca: Path | None = Field(
        default=None, description="CA of the servers' TLS certificates (tls:// servers)"
    )
    description: str = Field(default="", description="for people; `ferry lab up` marks its own")


class NoContext(RuntimeFailure):
    """The context the selection names does not exist."""


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/ferry`, or `~/.config/ferry` (XDG ignores a relative value)."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "ferry"


def default_context_file() -> Path:
    return config_dir() / "context.json"


def contexts_dir() -> Path:
    return config_dir() / "contexts"


def context_file(name: str, field: str = "context") -> Path:
    """The file of the context called `name`."""
    if not CONTEXT_NAME.match(name):
        paths = field in ("--context", "FERRY_CONTEXT")  # FERRY_LAB is only ever a name
        raise InvalidInput(
            f"{name!r} is not a context name (letters, digits, '.', '_', '-'; at most 64;"
            " starts with a letter or digit)"
            + (" nor a path (a path has a '/' or ends in .json)" if paths else ""),
            field=field,
        )
    return contexts_dir() / f"{name}.json"


def _named_or_path(value: str, field: str) -> Path:
    if "/" in value or value.endswith(".json"):
        return Path(value).expanduser()
    return context_file(value, field)


def _explain(exc: ValidationError) -> str:
    """Pydantic's errors as `field: what is wrong`, one after another."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "missing":
            what = "is missing"
        elif error["type"] == "extra_forbidden":
            what = f"is not a context field (they are {', '.join(BusContext.model_fields)})"
        else:
            what = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {what}" if where else what)
    return "; ".join(parts)


def read_context(path: Path, field: str = "context") -> BusContext:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise NoContext(
            f"no context at {path} ({HOW_TO_GET}; or choose one with FERRY_CONTEXT=NAME|FILE,"
            " or give the servers in FERRY_NATS_URL)",
            field=field,
        ) from None
    except OSError as exc:
        raise RuntimeFailure(f"cannot read context {path}: {exc.strerror}", field=field) from None
    try:
        return BusContext.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidInput(f"context {path}: {_explain(exc)} ({HOW_TO_GET})", field=field) from None


def load_context(explicit: str | None = None) -> BusContext:
    """The context `ferry` uses, by the precedence in this module's docstring."""
    if explicit:
        return read_context(_named_or_path(explicit, "--context"), "--context")
    if value := os.environ.get("FERRY_CONTEXT"):
        return read_context(_named_or_path(value, "FERRY_CONTEXT"), "FERRY_CONTEXT")
    if value := os.environ.get("FERRY_LAB"):  # deprecated alias: a context's name
        return read_context(context_file(value, "FERRY_LAB"), "FERRY_LAB")
    if value := os.environ.get("FERRY_NATS_URL"):
        servers = [s.strip() for s in value.split(",") if s.strip()]
        try:
            return BusContext(servers=tuple(servers))
        except ValidationError as exc:
            raise InvalidInput(_explain(exc), field="FERRY_NATS_URL") from None
    return read_context(default_context_file())


def current_context(args: argparse.Namespace) -> BusContext:
    """The context for this command line (its `--context`, else the environment's)."""
    return load_context(getattr(args, "context", None))


def context_or_none(args: argparse.Namespace) -> BusContext | None:
    """For listing commands: no context lists nothing (and says why on stderr)."""
    try:
        return current_context(args)
    except NoContext as exc:
        say(one_line(exc))
        return None


def write_context(path: Path, context: BusContext) -> None:
    """Write a context file atomically: a reader sees the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(context.model_dump_json(indent=2, exclude_none=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.asynccontextmanager
async def connected(context: BusContext, *, connect_timeout: float = 5.0) -> AsyncIterator[NATS]:
    """Connected to any of the context's servers (nats-py fails over between them)."""
    nc = await bus.connect(
        context.servers,
        name="ferry-cli",
        creds=context.creds,
        ca=context.ca,
        connect_timeout=connect_timeout,
        give_up_after=3 * connect_timeout,
    )
    try:
        yield nc
    finally:
        await bus.close(nc)


async def operator_placements(js: JetStreamContext) -> KvPlacementStore:
    """The placements as an operator reads and writes them (under OPERATOR_AUTHOR)."""
    return KvPlacementStore(await bus.bucket(js, subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR)
