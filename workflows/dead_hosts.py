"""What a saga does once an operator has declared a host dead (no I/O).

A way back keeps trying while the host holding what it needs may come back (issue 13,
point 3); the only evidence that ends that wait is an operator's declaration that the host
is gone (`ferry hosts declare-dead`). With it:

- a compensation whose whole effect is on the dead host (stop or discard a copy there) is
  skipped: nothing of it can run there, now or later;
- `resume_source` fails for good if what it brings back was on a dead host (stop-and-copy's
  pages streamed to the destination at the dump; any copy on a dead source);
- `uncommit` is never skipped: it moves the ownership, and only `ferry recover` stands in
  for it, by moving the placement back itself (`recover`, below).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from schemas.v1.containers import Placement
from schemas.v1.migrations import EventBase, StepRecord, StepStarted
from schemas.v2.migrations import MigrationRecord
from workflows.saga import (
    HANDLED,
    Decision,
    SagaDefinition,
    StepError,
    current,
    pending_commands,
    skip_current,
    step_failed,
    step_finished,
)

# host -> the operator's reason
DeadHosts = Mapping[str, str]

# Compensations that only stop or remove what their own host holds.
ON_THEIR_HOST_ONLY = frozenset({"stop_destination", "discard_destination", "forget_presync"})


def declared(host: str, dead: DeadHosts) -> str:
    return f"{host}, declared dead by an operator: {dead[host]}"


def _dumped_to_destination(record: MigrationRecord) -> bool:
    """Its memory left the source for the destination: a dump that streamed its pages there
    finished (post-copy's pages stay on the source until they are pulled)."""
    return record.chosen != "post-copy" and any(
        s.kind == "forward" and s.name == "dump" and s.status in ("done", "compensated")
        for s in record.steps
    )


def _copy_gone(record: MigrationRecord, entry: StepRecord, dead: DeadHosts) -> str | None:
    """Why `resume_source` can never succeed, or None while it may."""
    if entry.host in dead:
        return f"the container's only copy was on {declared(entry.host, dead)}"
    if record.destination in dead and _dumped_to_destination(record):
        return f"its memory was on {declared(record.destination, dead)}"
    return None


def _merge(first: Decision | None, then: Decision) -> Decision:
    if first is None:
        return then
    return Decision(then.record, then.commands, (*first.events, *then.events))


def past_dead_hosts(
    defn: SagaDefinition, record: MigrationRecord, dead: DeadHosts, now: float
) -> Decision | None:
    """The saga moved past the compensations the dead hosts make pointless or impossible;
    None when its current step is not one of them."""
    decision: Decision | None = None
    while (entry := current(record)) is not None and entry.kind == "compensation":
        if entry.name in ON_THEIR_HOST_ONLY and entry.host in dead:
            step = skip_current(
                defn, record, f"nothing can run on {declared(entry.host, dead)}", now
            )
        elif entry.name == "resume_source" and (why := _copy_gone(record, entry, dead)):
            command = pending_commands(record)[0]
            step = step_failed(defn, record, command, StepError(why, retryable=False), now)
        else:
            break
        decision = _merge(decision, step)
        record = step.record
    return decision


# -- ferry recover ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """What `ferry recover` would do for one migration, or why it cannot."""

    possible: bool
    reason: str
    actions: tuple[str, ...] = ()
    decision: Decision | None = None
    # The placement must name the source again before the decision is written (after the
    # commit: the dead destination cannot run uncommit).
    moves_placement: bool = False


class NotRecoverable(ValueError):
    """The request itself is wrong: the evidence `ferry recover` acts on is not there."""


def _fallback_step(defn: SagaDefinition) -> str | None:
    return next((s.name for s in defn.steps if s.fallback), None)


def recover(defn: SagaDefinition, record: MigrationRecord, dead: DeadHosts, now: float) -> Recovery:
    """After the commit, with the destination declared dead: post-copy's source still holds
    its stopped copy until clean_source, so the saga falls back to it with the dead host's
    actions skipped and the placement moved back by the caller (`placement_back`); for a
    strategy whose only copy was on the destination nothing can come back. Before the
    commit, a way back that failed on the dead host (`_way_back_again`) goes on.

    NotRecoverable when there is nothing for this command to do (the destination is not
    declared dead, the saga has not committed, it already ended well)."""
    dest, source = record.destination, record.source
    if dest not in dead:
        raise NotRecoverable(
            f"its destination {dest} is not declared dead; `ferry recover` acts only on that"
            f" evidence (`ferry hosts declare-dead {dest} --reason …`)"
        )
    if record.state in ("completed", "rolled_back"):
        raise NotRecoverable(f"migration {record.id} already ended {record.state}")
    if not record.committed and record.state == "failed":
        return _way_back_again(defn, record, dead, now)
    if not record.committed:
        raise NotRecoverable(
            f"migration {record.id} never committed: its own way back brings {record.container}"
            f" back on {source}, skipping what {dest} should have done"
        )
    lost = f"{record.container} cannot come back: "
    fallback = _fallback_step(defn)
    if fallback is None:
        return Recovery(
            False,
            lost + f"its only copy was on {declared(dest, dead)}"
            f" ({record.chosen}: its memory left {source} at the dump)",
        )
    if source in dead:
        return Recovery(False, lost + f"its stopped copy was on {declared(source, dead)}")
    if any(s.kind == "forward" and s.name == "clean_source" for s in record.steps):
        return Recovery(
            False,
            lost + f"every page had reached {dest} and {source}'s stopped copy went"
            f" (clean_source); {declared(dest, dead)}",
        )
    running = current(record)
    if running is not None and running.host != dest:
        raise NotRecoverable(
            f"its current step {running.name} runs on {running.host}, not on the dead {dest}:"
            " it is under way"
        )
    return _fall_back(defn, record, fallback, dead, now)


def _way_back_again(
    defn: SagaDefinition, record: MigrationRecord, dead: DeadHosts, now: float
) -> Recovery:
    """Before the commit, a way back that ended failed because a compensation on the dead
    host ran out of attempts (before anyone declared it dead): it goes on past that one."""
    failed = record.steps[-1] if record.steps else None
    if failed is None or failed.kind != "compensation" or failed.status != "failed":
        raise NotRecoverable(f"migration {record.id} failed before its commit, not on its way back")
    if failed.name not in ON_THEIR_HOST_ONLY or failed.host not in dead:
        raise NotRecoverable(
            f"migration {record.id} failed in {failed.name} on {failed.host}, which nothing"
            " declared dead makes pointless: an operator must look"
        )
    steps = (*record.steps[:-1], failed.model_copy(update={"status": "running"}))
    again = record.model_copy(update={"steps": steps, "state": "compensating", "error": None})
    decision = past_dead_hosts(defn, again, dead, now)
    assert decision is not None  # the failed step is one a dead host makes pointless
    skipped = [
        f"skip {s.name} on {s.host}: {s.error}"
        for s in decision.record.steps[len(record.steps) - 1 :]
        if s.status == "skipped"
    ]
    if decision.finished and decision.record.state != "rolled_back":
        return Recovery(False, decision.record.error or "the way back cannot go on")
    nxt = [f"run {c.step} on {c.host}" for c in decision.commands]
    reason = f"its way back goes on past what {failed.host} cannot do"
    return Recovery(True, reason, (*skipped, *nxt), decision)


def _fall_back(
    defn: SagaDefinition, record: MigrationRecord, fallback: str, dead: DeadHosts, now: float
) -> Recovery:
    dest, source = record.destination, record.source
    why = f"the destination {declared(dest, dead)}"
    steps = list(record.steps)
    events: list[EventBase] = []

    def finished(entry: StepRecord) -> None:
        events.append(step_finished(record, entry, entry.status, now, 0, error=entry.error))

    uncommitted = f"{dest} cannot run it: `ferry recover` moved the placement back to {source}"
    running = current(record)
    if running is not None:  # on the dead host: it will never report
        index = max(i for i, s in enumerate(steps) if s is running)
        status = "failed" if running.kind == "forward" and running.name == fallback else "skipped"
        error = uncommitted if running.name == "uncommit" else why
        steps[index] = running.model_copy(
            update={"status": status, "finished_at": now, "error": error}
        )
        finished(steps[index])
    at = [i for i, s in enumerate(steps) if s.kind == "forward" and s.name == fallback]
    if not at:  # died before it began (opening the network, say): it fails now, unrun
        drain = defn.step(fallback)
        entry = StepRecord(
            name=drain.name,
            role=drain.role,
            host=dest,
            status="failed",
            attempts=0,
            finished_at=now,
            error=why,
        )
        steps.append(entry)
        finished(entry)
        at = [len(steps) - 1]
    handled = {
        s.name for s in steps[at[-1] + 1 :] if s.kind == "compensation" and s.status in HANDLED
    }
    actions = [f"move the placement of {record.container} back to {source} (compare-and-set)"]
    for action in defn.step(fallback).fallback:
        if action.name in handled:
            continue
        host = source if action.side == "source" else dest
        if action.name == "uncommit":
            error = uncommitted
        elif host == dest:
            error = why
        else:
            entry = StepRecord(
                name=action.name,
                kind="compensation",
                role=action.role,
                host=host,
                status="running",
                attempts=1,
                started_at=now,
                first_started_at=now,
            )
            steps.append(entry)
            actions.append(f"run {action.name} on {host}")
            events.append(
                StepStarted(
                    migration_id=record.id,
                    at=now,
                    step=entry.name,
                    kind=entry.kind,
                    host=host,
                    attempt=1,
                )
            )
            break
        entry = StepRecord(
            name=action.name,
            kind="compensation",
            role=action.role,
            host=host,
            status="skipped",
            finished_at=now,
            error=error,
        )
        steps.append(entry)
        actions.append(f"skip {action.name} on {host}: {error}")
        finished(entry)
    else:
        raise NotRecoverable(f"migration {record.id}: its fallback has nothing left to run")
    falling_back = record.model_copy(
        update={"steps": tuple(steps), "state": "compensating", "error": None, "updated_at": now}
    )
    decision = Decision(falling_back, pending_commands(falling_back), tuple(events))
    reason = (
        f"{why}; {record.container} continues on {source} from the copy it kept stopped"
        f" (what {dest} did since the commit is lost)"
    )
    return Recovery(True, reason, tuple(actions), decision, moves_placement=True)


def placement_back(placement: Placement, record: MigrationRecord) -> Placement | None:
    """The placement naming the source again, locked by this migration while its source
    resumes; None if it already does. ValueError if it belongs to anything else."""
    mine = placement.migration_id in (record.id, None)
    if placement.host == record.source and placement.migration_id == record.id:
        return None
    if placement.host != record.destination or not mine:
        held = f", locked by {placement.migration_id}" if placement.migration_id else ""
        raise ValueError(
            f"the placement of {record.container} names {placement.host}{held}:"
            f" not migration {record.id}'s to move back"
        )
    return placement.model_copy(
        update={"host": record.source, "state": "migrating", "migration_id": record.id}
    )
