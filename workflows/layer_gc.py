"""Which unpacked layers a host may remove (pure; services/cleanup/layers.py looks and acts).

A layer goes only on positive evidence, seen twice: no image and no container anywhere names
it, nor does any overlay mounted on this host, on two sweeps in a row, and it was unpacked at
least `min_age_s` ago (a create or a pull may be about to name it). When the fleet's answer is
unknown (a listing failed), nothing is removed and the count starts again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping


def layers_to_remove(
    held: Mapping[str, float],
    needed: Collection[str] | None,
    suspects: Collection[str],
    *,
    now: float,
    min_age_s: float,
) -> tuple[set[str], set[str]]:
    """(remove now, suspects for the next sweep). `held`: digest -> when it was unpacked;
    `needed`: every digest something names, None when that is unknown."""
    if needed is None:
        return set(), set()
    unneeded = {d for d, at in held.items() if d not in needed and now - at >= min_age_s}
    return unneeded & set(suspects), unneeded
