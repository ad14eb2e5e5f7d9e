"""What installed plugins add to `ferry`, found through Python entry points.

- group `ferry.cli`: `register(subcommands)` adds subcommands to `ferry`;
- group `ferry.cli.hosts`: `details(context, rows) -> rows` adds to what `ferry hosts` shows.

The test lab is such a plugin (pyproject.toml: `lab = "deploy.lab.commands:…"`), which is how
`ferry lab up|down` exist without services/ importing deploy/. A plugin that fails to load
is reported on stderr and skipped: the product's own commands still work.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, cast

from services.cli.context import BusContext, say

if TYPE_CHECKING:
    from services.cli.parsing import Subcommands

COMMANDS_GROUP = "ferry.cli"
HOST_DETAILS_GROUP = "ferry.cli.hosts"

HostRows = list[dict[str, Any]]
HostDetails = Callable[[BusContext, HostRows], HostRows]


def _load(group: str) -> list[Any]:
    loaded: list[Any] = []
    seen: set[str] = set()
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        if point.name in seen:  # the same plugin seen twice on sys.path
            continue
        seen.add(point.name)
        try:
            loaded.append(point.load())
        except Exception as exc:  # a broken plugin must not take the CLI down with it
            say(f"ferry: warning: plugin {point.name} ({point.value}) did not load: {exc}")
    return loaded


def register_commands(subcommands: Subcommands) -> None:
    for register in _load(COMMANDS_GROUP):
        cast(Callable[["Subcommands"], None], register)(subcommands)


def host_details(context: BusContext, rows: HostRows) -> HostRows:
    for details in _load(HOST_DETAILS_GROUP):
        rows = cast(HostDetails, details)(context, rows)
    return rows
