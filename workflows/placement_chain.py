"""Whether a placement change was made by a host entitled to make it (pure: no I/O).

Every placement entry is written under its author's name (`<author>.<container>` in the
bucket), and the bus lets a host write only under its own: who wrote an entry is known.
Each write is a compare-and-set over all authors' entries of the container, so every entry
follows exactly one predecessor (the sequence its compare-and-set expected). What the bus
cannot check is the content. So readers check each change against the one before it:

- the holder (the host the predecessor names) may write anything about its container:
  lock it for a move, unlock it, hand it back, remove it;
- another host may take it only as the destination the holder named when it locked the
  container for that migration (the commit);
- with nothing before it (or after a removal) a host may create only its own placement;
- the operator may write anything.

A change that breaks these rules is not evidence of anything: readers treat the container's
placement as unknown until an operator repairs it. The check is one step deep: a host that
forged a claim and then went on writing over it is caught only while its first forged entry
is the one its later entries build on (see docs/identities.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.v1.containers import Placement

OPERATOR_AUTHOR = "_operator"  # no host name starts with "_"


@dataclass(frozen=True)
class Entry:
    """One placement write as the bucket holds it."""

    author: str  # the host under whose name it was written, or OPERATOR_AUTHOR
    placement: Placement | None  # None: the container was removed
    follows: int | None  # the sequence its compare-and-set expected (0: nothing before it)


def judge(name: str, entry: Entry, previous: Entry | None) -> str | None:
    """Why `entry` is not a legitimate change of `name`'s placement, or None if it is."""
    if entry.author == OPERATOR_AUTHOR:
        return None
    if entry.follows is None:
        return f"{entry.author} wrote the placement of {name} without compare-and-set"
    held = previous.placement if previous is not None else None
    if held is None:
        if entry.placement is not None and entry.placement.host != entry.author:
            return (
                f"{entry.author} created a placement of {name} on {entry.placement.host}:"
                " a host may create only its own"
            )
        return None
    if entry.author == held.host:
        return None
    taken = entry.placement
    if (
        held.state == "migrating"
        and held.destination == entry.author
        and taken is not None
        and taken.host == entry.author
        and taken.migration_id == held.migration_id
    ):
        return None  # the commit: the holder named this host as the destination
    return f"{entry.author} changed the placement of {name}, which {held.host} holds"
