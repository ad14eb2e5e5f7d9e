"""Every step and compensation of every saga has a handler on the role that runs it."""

from __future__ import annotations

from typing import Any, cast

import pytest

from services.cleanup.handlers import Cleanup
from services.destination.handlers import Destination
from services.source.handlers import Source
from services.transfer.handlers import Transfer
from workflows.definitions import DEFINITIONS
from workflows.saga import SagaDefinition

NOTHING = cast(Any, None)  # the roles hold their dependencies; listing steps touches none

ROLES = {
    "source": Source(
        side=NOTHING, containers=NOTHING, placements=NOTHING, peers=NOTHING,
        page_server_for=NOTHING, keys=NOTHING, links=NOTHING,
    ),
    "transfer": Transfer(files=NOTHING, keys=NOTHING, faults=NOTHING),
    "destination": Destination(
        side=NOTHING, containers=NOTHING, placements=NOTHING, state_dir=NOTHING, peers=NOTHING
    ),
    "cleanup": Cleanup(cleanup=NOTHING, containers=NOTHING),
}  # fmt: skip


def _actions(definition: SagaDefinition) -> list[tuple[str, str, str]]:
    """(kind, name, role) of every step, compensation and fallback action."""
    found = []
    for step in definition.steps:
        found.append(("step", step.name, step.role))
        if step.compensation is not None:
            found.append(("compensation", step.compensation.name, step.compensation.role))
        found += [("fallback", a.name, a.role) for a in step.fallback]
    return found


@pytest.mark.parametrize("strategy", sorted(DEFINITIONS))
def test_every_action_of_the_saga_has_a_handler_on_its_role(strategy: str) -> None:
    missing = [
        f"{kind} {name} on {role}"
        for kind, name, role in _actions(DEFINITIONS[strategy])
        if name not in ROLES[role].steps()
    ]
    assert not missing, f"{strategy}: no handler for {missing}"


def test_no_role_offers_a_handler_no_saga_asks_it_for() -> None:
    asked: dict[str, set[str]] = {role: set() for role in ROLES}
    for definition in DEFINITIONS.values():
        for _, name, role in _actions(definition):
            asked[role].add(name)
    for role, handlers in ROLES.items():
        assert set(handlers.steps()) == asked[role], role


def test_the_source_alone_dumps_and_the_destination_alone_restores() -> None:
    offered = {role: set(r.steps()) for role, r in ROLES.items()}
    assert [r for r, names in offered.items() if "dump" in names] == ["source"]
    assert [r for r, names in offered.items() if "restore" in names] == ["destination"]
    assert [r for r, names in offered.items() if "commit" in names] == ["destination"]
