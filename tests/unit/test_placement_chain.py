"""Who may change a placement: every rule of workflows/placement_chain.py, both ways."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.v1.containers import Placement
from workflows.placement_chain import OPERATOR_AUTHOR, Entry, judge


def placed(host: str, **update: Any) -> Placement:
    base = Placement(
        name="web", host=host, ip="10.88.0.9", mac="02:00:0a:58:00:09",
        layers=("a" * 64,), args=("sleep", "60"), state="running",
    )  # fmt: skip
    return base.model_copy(update=update)


LOCKED = placed("h1", state="migrating", migration_id="m1", destination="h2")
HELD = Entry("h1", placed("h1"), follows=3)
LOCKED_BY_HOLDER = Entry("h1", LOCKED, follows=4)
REMOVED = Entry("h1", None, follows=5)

LEGITIMATE = [
    ("create", Entry("h1", placed("h1"), follows=0), None),
    ("create after a removal", Entry("h2", placed("h2"), follows=6), REMOVED),
    ("holder locks", LOCKED_BY_HOLDER, HELD),
    ("holder unlocks", Entry("h1", placed("h1"), follows=5), LOCKED_BY_HOLDER),
    ("holder removes", Entry("h1", None, follows=5), HELD),
    ("holder hands back", Entry("h2", placed("h1"), follows=8), Entry("h2", placed("h2"), 7)),
    ("commit", Entry("h2", LOCKED.model_copy(update={"host": "h2"}), follows=5), LOCKED_BY_HOLDER),
    ("operator, anything", Entry(OPERATOR_AUTHOR, placed("h9"), follows=None), HELD),
]

FORGED = [
    ("create for another host", Entry("h1", placed("h2"), follows=0), None, "only its own"),
    ("take a held one", Entry("h2", placed("h2"), follows=4), HELD, "which h1 holds"),
    ("remove another's", Entry("h2", None, follows=4), HELD, "which h1 holds"),
    (
        "commit as a host not named",
        Entry("h3", LOCKED.model_copy(update={"host": "h3"}), follows=5),
        LOCKED_BY_HOLDER,
        "which h1 holds",
    ),
    (
        "commit of another migration",
        Entry("h2", LOCKED.model_copy(update={"host": "h2", "migration_id": "m9"}), follows=5),
        LOCKED_BY_HOLDER,
        "which h1 holds",
    ),
    ("without compare-and-set", Entry("h1", placed("h1"), follows=None), HELD, "without"),
]


@pytest.mark.parametrize(("why", "entry", "previous"), LEGITIMATE, ids=[r[0] for r in LEGITIMATE])
def test_a_legitimate_change_is_believed(why: str, entry: Entry, previous: Entry | None) -> None:
    assert judge("web", entry, previous) is None, why


@pytest.mark.parametrize(("why", "entry", "previous", "said"), FORGED, ids=[r[0] for r in FORGED])
def test_a_change_by_a_host_not_entitled_is_not(
    why: str, entry: Entry, previous: Entry | None, said: str
) -> None:
    refusal = judge("web", entry, previous)
    assert refusal is not None and said in refusal, (why, refusal)
