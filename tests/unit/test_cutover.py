"""The cut-over's pure parts: who may take a container's link and when, the holder's
verdicts (held in order, then passed or dropped), the handover's signature, and the CRIU
config of a held restore."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.errors import Forbidden
from services.link_handover import _signed_fields, handover_request
from services.runtime import bundle
from services.runtime.packet_hold import Holder
from services.runtime.transfer import auth
from tests.support.saga import run_until
from workflows.cutover import refuse_link_handover
from workflows.post_copy import POST_COPY
from workflows.saga import StepError, step_failed
from workflows.stop_and_copy import STOP_AND_COPY


def test_the_destination_takes_the_link_only_for_its_source_while_it_dumps() -> None:
    dumping = run_until("dump").record
    assert refuse_link_handover(dumping, "h2", "h1", identities=True) is None
    assert refuse_link_handover(dumping, "h2", None, identities=False) is None
    lazy = run_until("dump", POST_COPY).record
    assert refuse_link_handover(lazy, "h2", "h1", identities=True) is None

    refusals = {
        "another destination": refuse_link_handover(dumping, "h3", "h1", identities=True),
        "another asker": refuse_link_handover(dumping, "h2", "h3", identities=True),
        "no host identity": refuse_link_handover(dumping, "h2", None, identities=True),
        "before the freeze": refuse_link_handover(
            run_until("presync_files").record, "h2", "h1", identities=True
        ),
        "after the dump": refuse_link_handover(
            run_until("transfer").record, "h2", "h1", identities=True
        ),
    }
    for why, refusal in refusals.items():
        assert refusal, f"{why}: taken"
    assert "does not move to h3" in str(refusals["another destination"])
    assert "only h1" in str(refusals["another asker"])
    assert "not freezing" in str(refusals["before the freeze"])


def test_no_handover_once_the_migration_compensates() -> None:
    dumping = run_until("dump")
    cmd = dumping.commands[0]
    error = StepError("criu failed", False)
    failed = step_failed(STOP_AND_COPY, dumping.record, cmd, error, now=3.0).record
    refusal = refuse_link_handover(failed, "h2", "h1", identities=True)
    assert refusal and "compensating" in refusal


@dataclass
class FakePacket:
    """A queued packet as the holder sees it: its hook and the verdict it got."""

    number: int
    hook: int = 1
    verdicts: list[tuple[int, str]] = field(default_factory=list)

    def accept(self) -> None:
        self.verdicts.append((self.number, "accept"))

    def drop(self) -> None:
        self.verdicts.append((self.number, "drop"))


def test_held_packets_go_through_in_the_order_they_came_then_later_ones_at_once() -> None:
    holder = Holder()
    verdicts: list[tuple[int, str]] = []
    for n in range(5):
        holder.on_packet(FakePacket(n, hook=3 if n == 2 else 1, verdicts=verdicts))
    assert verdicts == [], "a held packet got a verdict before the release"
    stats = holder.report()
    assert (stats.held_in, stats.held_out, stats.waiting, stats.peak) == (4, 1, 5, 5)
    holder.release()
    holder.on_packet(FakePacket(5, verdicts=verdicts))
    assert verdicts == [(n, "accept") for n in range(6)]
    stats = holder.report()
    assert (stats.released, stats.passed, stats.waiting, stats.mode) == (5, 1, 0, "release")
    assert stats.hold_ms is not None and stats.hold_ms >= 0


def test_a_move_that_does_not_stay_drops_what_was_held_and_everything_after() -> None:
    holder = Holder()
    verdicts: list[tuple[int, str]] = []
    for n in range(3):
        holder.on_packet(FakePacket(n, verdicts=verdicts))
    holder.drop()
    holder.on_packet(FakePacket(3, verdicts=verdicts))
    assert verdicts == [(n, "drop") for n in range(4)]
    assert holder.report().dropped == 4 and holder.report().released == 0


def test_a_handover_is_signed_with_the_migration_key_and_nothing_else_passes(
    tmp_path: Path,
) -> None:
    migration_id = secrets.token_hex(8)
    grant = auth.issue(tmp_path / migration_id, migration_id, source="h1")
    ask = handover_request(grant)
    fields = {**_signed_fields(migration_id), auth.AUTH_FIELD: ask.auth}
    auth.verify(grant.secret, fields, what="the handover")

    other = auth.issue(tmp_path / "other", migration_id, source="h1")
    with pytest.raises(Forbidden):
        auth.verify(other.secret, fields, what="the handover")
    replayed = {**_signed_fields(secrets.token_hex(8)), auth.AUTH_FIELD: ask.auth}
    with pytest.raises(Forbidden):  # one migration's handover is no other's
        auth.verify(grant.secret, replayed, what="the handover")


def test_every_dump_skips_criu_network_lock_so_every_restore_does(tmp_path: Path) -> None:
    # A restore uses the lock method its dump recorded (criu/image.c): the dump decides.
    config = tmp_path / "criu.conf"
    for leave_stopped in (False, True):
        bundle.ensure_criu_config(config, leave_stopped=leave_stopped)
        assert "\nnetwork-lock skip\n" in config.read_text()
    bundle.ensure_criu_config(config, ferry_locks_network=False)  # the bench's hand-run recipe
    assert "network-lock" not in config.read_text()
