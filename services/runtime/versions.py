"""What this host runs, as its agent announces it: Ferry's wire versions, the ferry package,
CRIU, runc and the kernel. A tool that cannot be asked is `unknown`, never a failure: the
announcement is information, and pre-flight does not refuse on what it does not know.

Tests may make a host claim other wire versions (FERRY_WIRE_VERSION=N[:MIN]), honoured only
where test faults are allowed (FERRY_ALLOW_FAULTS=1), so a lab can play "one agent upgraded".
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re

from schemas.v1.versions import UNKNOWN, WIRE_MIN_VERSION, WIRE_VERSION, HostVersions
from services import faults
from services.errors import FerryError, InvalidInput
from services.runtime.cmdlines import CRIU
from services.runtime.proc import arun

log = logging.getLogger("ferry.versions")

RUNC = "runc"
ASK_TIMEOUT_S = 10.0
WIRE_OVERRIDE = "FERRY_WIRE_VERSION"

_CRIU_VERSION = re.compile(r"^Version:\s*(\S+)", re.MULTILINE)  # "Version: 4.2.1"
_RUNC_VERSION = re.compile(r"^runc version\s+(\S+)", re.MULTILINE)  # "runc version 1.1.5+ds1"


def parse_wire(text: str) -> tuple[int, int]:
    """`N` or `N:MIN` as (wire, wire_min); InvalidInput naming the variable otherwise."""
    newest, _, oldest = text.strip().partition(":")
    try:
        wire = int(newest)
        wire_min = int(oldest) if oldest else wire
    except ValueError:
        wire, wire_min = 0, 0
    if not 1 <= wire_min <= wire:
        raise InvalidInput(f"{text!r} is not N or N:MIN with 1 <= MIN <= N", field=WIRE_OVERRIDE)
    return wire, wire_min


def wire_versions(override: str, *, allowed: bool) -> tuple[int, int]:
    """The wire range this host announces: the code's own, or a test's override where test
    faults are allowed. A malformed override is said and ignored: the agent must still join."""
    if not override:
        return WIRE_VERSION, WIRE_MIN_VERSION
    if not allowed:
        log.warning("%s ignored: test faults are not allowed on this host", WIRE_OVERRIDE)
        return WIRE_VERSION, WIRE_MIN_VERSION
    try:
        wire, wire_min = parse_wire(override)
    except InvalidInput as exc:
        log.error("%s ignored: %s", WIRE_OVERRIDE, exc.reason)
        return WIRE_VERSION, WIRE_MIN_VERSION
    log.warning("test override: announcing wire %d..%d (%s)", wire_min, wire, WIRE_OVERRIDE)
    return wire, wire_min


def first_match(pattern: re.Pattern[str], text: str) -> str:
    found = pattern.search(text)
    return found.group(1) if found else UNKNOWN


async def _ask(argv: list[str], pattern: re.Pattern[str]) -> str:
    try:
        done = await arun(argv, timeout=ASK_TIMEOUT_S)
    except FerryError as exc:  # not installed, or it failed: say so, and carry on
        log.warning("%s: version unknown: %s", argv[0], exc.reason)
        return UNKNOWN
    return first_match(pattern, done.stdout)


def ferry_version() -> str:
    try:
        return importlib.metadata.version("ferry")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


async def host_versions() -> HostVersions:
    """What this host runs, read now."""
    wire, wire_min = wire_versions(os.environ.get(WIRE_OVERRIDE, ""), allowed=faults.enabled())
    return HostVersions(
        wire=wire,
        wire_min=wire_min,
        ferry=ferry_version(),
        criu=await _ask([CRIU, "--version"], _CRIU_VERSION),
        runc=await _ask([RUNC, "--version"], _RUNC_VERSION),
        kernel=platform.release() or UNKNOWN,
    )
