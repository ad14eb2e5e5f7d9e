"""The runner's lease layer against a real bus: a step holds its attempt's lease with its
progress while it runs; past its own deadline it is cancelled with its processes and the
lease goes; a lease a watchdog takes away cancels the step; a dead predecessor's lease is
taken over, a live holder's is not."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.leases import LeaseHolder, StepLease, step_lease_key
from schemas.v2.migrations import StepCommand
from services.errors import Conflict
from services.leases import Leases, leases_bucket_config
from services.runtime.proc import spawn, wait_owned
from services.saga.layers import guarded, step_lease
from services.saga.steps import Progress, StepOutcome, StepRun
from tests.support import records
from tests.support.leases import TEST_TTL_S
from workflows.saga import StepError

RECORD = records.running_at("dump", since=1.0)
COMMAND = StepCommand(
    migration_id=RECORD.id, step="dump", kind="forward", attempt=1, host="h1", role="source"
)
RUN = StepRun(COMMAND, RECORD)
KEY = step_lease_key(RECORD.id, "forward", "dump", 1)


async def quiet(text: str, done: int | None = None, total: int | None = None) -> None:
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class HangingCriu:
    """A handler whose command never ends (a hung CRIU), reporting progress first."""

    def __init__(self) -> None:
        self.pid = 0

    async def __call__(self, run: StepRun, progress: Progress) -> StepOutcome:
        proc = await spawn(["sleep", "300"])
        self.pid = proc.pid
        await progress("dumping", 4096, 8192)
        await wait_owned(proc)
        return StepOutcome()


@pytest.fixture
async def leases(js: JetStreamContext) -> AsyncIterator[Leases[StepLease]]:
    """Ferry's leases bucket remade with a short TTL: renewals (TTL/3) come quickly."""
    await js.delete_key_value(subjects.LEASES_BUCKET)
    await js.create_key_value(config=leases_bucket_config(subjects.LEASES_BUCKET, TEST_TTL_S))
    yield await Leases.open(js, StepLease)


async def test_past_its_deadline_a_step_is_cancelled_its_process_killed_its_lease_released(
    js: JetStreamContext, leases: Leases[StepLease]
) -> None:
    handler = HangingCriu()
    async with step_lease(js, RUN, "h1", "source", 2.0) as lease:
        work = asyncio.create_task(
            lease.bounded(guarded(handler, RUN, lease.reporting(quiet), 2.0, "test"))
        )
        await asyncio.sleep(1.2)  # past a renewal
        seen = await leases.read(KEY)
        assert seen.state == "held" and seen.payload is not None
        assert seen.payload.holder == LeaseHolder(host="h1", role="source", pid=os.getpid())
        assert (seen.payload.progress.message, seen.payload.progress.bytes_done) == (
            "dumping",
            4096,
        )
        outcome = await work
    assert isinstance(outcome, StepError) and outcome.retryable and "timed out" in outcome.reason
    assert handler.pid and not alive(handler.pid)
    assert (await leases.read(KEY)).state == "released"


async def test_a_lease_taken_away_cancels_the_step(
    js: JetStreamContext, leases: Leases[StepLease]
) -> None:
    handler = HangingCriu()
    async with step_lease(js, RUN, "h1", "source", 60.0) as lease:
        work = asyncio.create_task(
            lease.bounded(guarded(handler, RUN, lease.reporting(quiet), 60.0, "test"))
        )
        await asyncio.sleep(0.3)
        seen = await leases.read(KEY)
        assert seen.payload is not None
        # A watchdog gives the attempt up (it judged it dead), over the revision it saw.
        await leases.renew(KEY, seen.payload.model_copy(update={"abandoned": True}), seen.revision)
        outcome = await asyncio.wait_for(work, 5 * TEST_TTL_S)
    assert isinstance(outcome, StepError) and outcome.retryable and "lost" in outcome.reason
    assert handler.pid and not alive(handler.pid)
    after = await leases.read(KEY)
    assert after.state == "held" and after.payload is not None and after.payload.abandoned


async def test_a_dead_predecessors_lease_is_taken_over_a_live_holders_is_not(
    js: JetStreamContext, leases: Leases[StepLease]
) -> None:
    gone = await spawn(["true"])
    await gone.wait()
    mine = StepLease(
        migration_id=RECORD.id,
        step="dump",
        kind="forward",
        attempt=1,
        holder=LeaseHolder(host="h1", role="source", pid=gone.pid),
    )
    revision = await leases.acquire(KEY, mine)
    # The same worker, restarted after a crash (its old pid is dead): it takes the lease.
    async with step_lease(js, RUN, "h1", "source", 5.0):
        seen = await leases.read(KEY)
        assert seen.revision > revision and seen.payload is not None
        assert seen.payload.holder.pid == os.getpid()
    # Another live holder (pid 1 never dies) keeps it: the command waits for a redelivery.
    other = mine.model_copy(update={"holder": LeaseHolder(host="h1", role="source", pid=1)})
    await leases.acquire(KEY, other)
    with pytest.raises(Conflict):
        async with step_lease(js, RUN, "h1", "source", 5.0):
            pass
