"""Fencing: what the leftover collector may do to a local copy, decided from evidence only.

Pure: no I/O, no clock of its own. The collector tells it what one sweep saw (the placement,
the migration its lock names, the named owner's answer) and hands back the memory of earlier
sweeps; times are the collector's own monotonic clock, never another host's.

The rule: a copy is destroyed only when the placement positively names another host, the
same revision seen on two sweeps at least `confirm_after_s` apart, and that host says it runs
the container. A missing placement, record or answer is "unknown": keep, freeze at most,
alert. Too many would-be orphans at once means a lost store, not orphans: do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum


class Where(StrEnum):
    """What the placement says about a container, as one sweep read it."""

    HERE = "here"
    ELSEWHERE = "elsewhere"
    ABSENT = "absent"  # the bucket answered: no such key
    UNAVAILABLE = "unavailable"  # no answer, or the bucket itself is gone


class Lock(StrEnum):
    """The migration a placement's lock (`migration_id`) names, as its record says."""

    NONE = "none"  # no lock
    LIVE = "live"  # running or compensating: the saga owns both copies
    ENDED = "ended"  # completed, rolled back or failed
    MISSING = "missing"  # no record, and the bucket answered
    UNAVAILABLE = "unavailable"  # no answer


class Answer(StrEnum):
    """The named owner's reply to "do you run it?"."""

    RUNS = "runs"
    PAUSED = "paused"  # it has a copy, frozen: not a running owner yet
    NOT_RUNNING = "not_running"  # stopped or absent there
    SILENT = "silent"  # no responder or no reply in time


class Action(StrEnum):
    KEEP = "keep"
    RELEASE_HOLDS = "release_holds"  # owned here, nothing moves it: no network hold may stay
    SUSPECT = "suspect"  # suspicious evidence, not yet confirmed
    ASK_OWNER = "ask_owner"  # confirmed: ask the named host, then decide again
    DISCARD = "discard"
    FREEZE = "freeze"
    THAW = "thaw"
    ALERT_UNPLACED = "alert_unplaced"  # no placement for long: never destroyed
    RELEASE_LOCK = "release_lock"  # the lock's migration ended (or has no record)


DESTRUCTIVE = (Action.DISCARD, Action.FREEZE)


@dataclass(frozen=True)
class Rules:
    confirm_after_s: float  # two sightings of the same evidence at least this far apart
    min_age_s: float  # an unplaced copy is young (being created) until absent this long
    orphan_limit: int  # more discards + freezes than this in one sweep: a lost store


@dataclass(frozen=True)
class Sighting:
    """One local container as one sweep saw it."""

    name: str
    where: Where
    owner: str | None = None  # the host the placement names (ELSEWHERE, HERE)
    revision: int = 0
    lock: Lock = Lock.NONE
    frozen: bool = False  # this host froze its copy (fencing)
    answer: Answer | None = None  # the owner's reply, once asked

    @property
    def evidence(self) -> tuple[str, str | None, int, str]:
        """What must stay the same between two sightings for them to confirm each other."""
        return (self.where, self.owner, self.revision, self.lock)


@dataclass(frozen=True)
class Track:
    """The memory of one piece of evidence: when this collector first saw it, how often."""

    evidence: tuple[str, str | None, int, str]
    since: float
    sweeps: int = 1

    def confirmed(self, now: float, after_s: float) -> bool:
        return self.sweeps >= 2 and now - self.since >= after_s


def observe(track: Track | None, seen: Sighting, now: float) -> Track | None:
    """The memory after this sweep. An unavailable placement neither confirms nor refutes."""
    if seen.where is Where.UNAVAILABLE:
        return track
    if track is not None and track.evidence == seen.evidence:
        return replace(track, sweeps=track.sweeps + 1)
    return Track(evidence=seen.evidence, since=now)


@dataclass(frozen=True)
class Decision:
    name: str
    action: Action
    reason: str
    alert: bool = False  # an operator must look (logged at error level, shown in health)


def decide(seen: Sighting, track: Track | None, now: float, rules: Rules) -> Decision:
    """One container's action, given this sweep's sighting and the memory *after* observing it."""
    name = seen.name

    def d(action: Action, reason: str, alert: bool = False) -> Decision:
        return Decision(name, action, reason, alert)

    confirmed = track is not None and track.confirmed(now, rules.confirm_after_s)
    if seen.where is Where.UNAVAILABLE:
        return d(Action.KEEP, "placement unavailable: nothing is known")
    if seen.lock is Lock.LIVE:
        return d(Action.KEEP, "a live migration owns it")
    if seen.lock is Lock.UNAVAILABLE:
        return d(Action.KEEP, "the migration its lock names is unavailable")

    if seen.where is Where.HERE:
        if seen.frozen:
            return d(Action.THAW, "frozen here, and the placement names this host", alert=True)
        if seen.lock in (Lock.ENDED, Lock.MISSING):
            if confirmed:
                return d(Action.RELEASE_LOCK, f"its lock's migration is {seen.lock}")
            return d(Action.SUSPECT, f"its lock's migration is {seen.lock}: confirming")
        return d(Action.RELEASE_HOLDS, "runs here; nothing moves it")

    if seen.where is Where.ABSENT:
        young = track is None or now - track.since < rules.min_age_s
        if young or not confirmed:
            return d(Action.SUSPECT, "no placement yet: maybe being created")
        return d(Action.ALERT_UNPLACED, "no placement names any host: kept", alert=True)

    # ELSEWHERE: the placement names another host.
    owner = seen.owner
    if seen.lock is Lock.MISSING:
        return d(Action.KEEP, f"placed on {owner} under a lock with no record: its host decides")
    if not confirmed:
        return d(Action.SUSPECT, f"placed on {owner} (revision {seen.revision}): confirming")
    if seen.answer is None:
        return d(Action.ASK_OWNER, f"placed on {owner} on two sweeps: asking it")
    if seen.answer is Answer.RUNS:
        return d(Action.DISCARD, f"placed on {owner}, which runs it")
    if seen.answer is Answer.PAUSED:
        return d(Action.KEEP, f"placed on {owner}, whose copy is paused: waiting")
    if seen.answer is Answer.SILENT:
        if seen.frozen:
            return d(Action.KEEP, f"frozen: {owner} is still silent", alert=True)
        return d(Action.FREEZE, f"placed on {owner}, which does not answer", alert=True)
    # NOT_RUNNING: the placement names a host without a copy; this may be the only one.
    if seen.frozen:
        return d(Action.THAW, f"{owner} does not run it: this copy may be the only one", True)
    return d(Action.KEEP, f"placed on {owner}, which does not run it: kept", alert=True)


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    mass_orphaning: str | None = None  # why nothing destructive happens this sweep

    def of(self, action: Action) -> list[Decision]:
        return [d for d in self.decisions if d.action is action]


def limit(decisions: Iterable[Decision], rules: Rules) -> Plan:
    """Hold back every discard and freeze when more than `orphan_limit` want one at once."""
    decided = tuple(decisions)
    destructive = [d for d in decided if d.action in DESTRUCTIVE]
    if len(destructive) <= rules.orphan_limit:
        return Plan(decided)
    why = (
        f"mass orphaning: {len(destructive)} containers look orphaned at once (limit "
        f"{rules.orphan_limit}): likely a lost store; nothing removed or frozen"
    )
    held = tuple(
        replace(d, action=Action.KEEP, reason=f"{d.reason}; held back: {why}", alert=True)
        if d.action in DESTRUCTIVE
        else d
        for d in decided
    )
    return Plan(held, mass_orphaning=why)


@dataclass
class Memory:
    """What the collector remembers between sweeps: one track per container and migration."""

    containers: dict[str, Track] = field(default_factory=dict)
    migrations: dict[str, Track] = field(default_factory=dict)


def remember(tracks: Mapping[str, Track | None], seen_names: Iterable[str]) -> dict[str, Track]:
    """Keep tracks only of what was seen this sweep: a name that went away starts afresh."""
    names = set(seen_names)
    return {n: t for n, t in tracks.items() if t is not None and n in names}


# Migration directories: what a host holds for one migration (images, CRIU processes).


class Record(StrEnum):
    """A migration's record, as one sweep read it."""

    LIVE = "live"
    ENDED = "ended"
    MISSING = "missing"
    UNAVAILABLE = "unavailable"


class DirAction(StrEnum):
    KEEP = "keep"
    SUSPECT = "suspect"
    REMOVE = "remove"  # kill its processes, remove the directory
    ALERT_MISSING = "alert_missing"  # no record for long: kept


@dataclass(frozen=True)
class DirDecision:
    migration_id: str
    action: DirAction
    reason: str
    alert: bool = False


def observe_dir(track: Track | None, record: Record, now: float) -> Track | None:
    if record is Record.UNAVAILABLE:
        return track
    evidence = ("migration", None, 0, str(record))
    if track is not None and track.evidence == evidence:
        return replace(track, sweeps=track.sweeps + 1)
    return Track(evidence=evidence, since=now)


def decide_dir(
    migration_id: str, record: Record, track: Track | None, now: float, rules: Rules
) -> DirDecision:
    """Remove a migration's leftovers only when its record says it ended, seen twice."""
    confirmed = track is not None and track.confirmed(now, rules.confirm_after_s)
    if record is Record.ENDED:
        if confirmed:
            return DirDecision(migration_id, DirAction.REMOVE, "its migration ended")
        return DirDecision(migration_id, DirAction.SUSPECT, "its migration ended: confirming")
    if record is Record.MISSING:
        if confirmed and track is not None and now - track.since >= rules.min_age_s:
            return DirDecision(
                migration_id, DirAction.ALERT_MISSING, "no record of its migration: kept", True
            )
        return DirDecision(migration_id, DirAction.SUSPECT, "no record of its migration yet")
    return DirDecision(migration_id, DirAction.KEEP, f"its migration is {record}")
