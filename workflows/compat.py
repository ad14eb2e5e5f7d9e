"""Can two hosts take part in one migration, judged from the versions they announce? Pure.

During a rolling upgrade some hosts run a newer Ferry, CRIU, runc or kernel than others. A
pair that cannot interoperate is refused before anything moves; a pair within the supported
range (one agent upgraded) keeps working. The rules, and why:

- Ferry wire: each host speaks a range [wire_min, wire] of Ferry's message and transfer
  protocol versions; the two ranges must overlap, or one side would send what the other
  cannot read. An empty range (wire_min > wire) overlaps nothing.
- CRIU: the destination's CRIU must be the same or a newer major.minor than the source's.
  CRIU promises only backward compatibility of its images: its protobuf rules ("Don't change
  the numeric tags ... any new fields that you add should be optional or repeated",
  criu.org/Postulates, "Protobuf images compatibility") let a newer CRIU read older images,
  and breaking that is treated as a bug (checkpoint-restore/criu#2128: new required cgroup-v2
  fields stopped a newer CRIU restoring older images; made optional). Nothing promises the
  reverse: images from CRIU 4.2 are not read correctly by crit 4.1.1
  (checkpoint-restore/criu#2847). Patch releases are taken as image-compatible (our reading:
  no promise says so either way). The way back restores on the source from images its own
  CRIU wrote; the page-server protocol between two CRIU versions has no written promise in
  either direction, and this rule does not claim to cover it.
- runc: the same major on both sides. Each host drives its own runc (its own state root),
  but the destination restores, through runc, what the source's runc checkpointed and
  describes the container with the same bundle; runc's command line and the options it hands
  CRIU may change across a major release, not within one.
- kernel: reported, never refused on. What CRIU needs of the kernel is checked by feature,
  not by number: `criu check` runs on the source at pre-flight and on the destination before
  it prepares, and the strategy is chosen from each host's announced features (lazy_pages,
  mem_dirty_track). Kernel numbers say little (distributions backport), and refusing on them
  would block the routine kernel upgrades a rolling upgrade is made of.

A version that is unknown (the tool could not be asked, or an older agent announced none)
is never a reason to refuse: it is said in `notes`, and CRIU's own checks still run.
"""

from __future__ import annotations

import re

from schemas.v1.versions import UNKNOWN, HostVersions

# An agent that announces no versions predates announcements: it speaks wire 1 only.
OLDER_AGENT = HostVersions(
    wire=1, wire_min=1, ferry=UNKNOWN, criu=UNKNOWN, runc=UNKNOWN, kernel=UNKNOWN
)

_RELEASE = re.compile(r"^v?(\d+)(?:\.(\d+))?")  # 4.2.1, 1.1.5+ds1, v1.2.0-rc.1


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string, or None when it says neither."""
    found = _RELEASE.match(version.strip())
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2) or 0)


def _said(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def incompatibilities(
    source: HostVersions,
    destination: HostVersions,
    *,
    source_name: str = "the source",
    destination_name: str = "the destination",
) -> list[str]:
    """Why these two hosts cannot take part in one migration, one sentence each naming
    both sides' versions; empty when they can."""
    src, dst = source_name, destination_name
    reasons = []
    common = (max(source.wire_min, destination.wire_min), min(source.wire, destination.wire))
    if common[0] > common[1]:
        if source.wire_min > source.wire or destination.wire_min > destination.wire:
            upgrade = "a host announces an empty range (wire_min above wire): fix its agent"
        elif destination.wire_min > source.wire:
            upgrade = f"upgrade {src}, or move to a host that still speaks {source.wire_range}"
        else:
            upgrade = f"upgrade {dst}, or move to a host that speaks {source.wire_range}"
        reasons.append(
            f"{dst} speaks wire {destination.wire_range}, {src} speaks"
            f" {source.wire_range}: no common version; {upgrade}"
        )
    dumped, restoring = release(source.criu), release(destination.criu)
    if dumped is not None and restoring is not None and restoring < dumped:
        reasons.append(
            f"{src} dumps with CRIU {source.criu} but {dst} would restore with CRIU"
            f" {destination.criu}: images written by a newer CRIU may not restore on an older"
            f" one; upgrade {dst}'s CRIU to {_said(dumped)} or newer"
        )
    runc_src, runc_dst = release(source.runc), release(destination.runc)
    if runc_src is not None and runc_dst is not None and runc_src[0] != runc_dst[0]:
        reasons.append(
            f"{src} runs runc {source.runc}, {dst} runs runc {destination.runc}: a"
            " checkpoint moves only between runc releases of the same major version"
        )
    return reasons


def notes(
    source: HostVersions,
    destination: HostVersions,
    *,
    source_name: str = "the source",
    destination_name: str = "the destination",
) -> list[str]:
    """What is worth saying about the pair but is no reason to refuse: versions that are
    unknown, and kernels that differ (CRIU's feature checks decide about those)."""
    said = []
    for name, versions in ((source_name, source), (destination_name, destination)):
        unknown = [
            tool
            for tool, version in (("CRIU", versions.criu), ("runc", versions.runc))
            if release(version) is None
        ]
        if unknown:
            said.append(f"{name}'s {' and '.join(unknown)} version unknown: not compared")
    if UNKNOWN not in (source.kernel, destination.kernel) and source.kernel != destination.kernel:
        said.append(
            f"kernels differ ({source_name} {source.kernel}, {destination_name}"
            f" {destination.kernel}): CRIU's own checks decide"
        )
    return said
