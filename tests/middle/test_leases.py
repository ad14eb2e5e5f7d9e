"""The lease helper against a real nats-server: renewing keeps a lease, the server's own
marker says when a holder stopped, compare-and-set lets only one holder in."""

from __future__ import annotations

import asyncio
import os

import pytest
from nats.js import JetStreamContext

from schemas.v1.leases import LeaseHolder, StepLease, StepProgress
from services.errors import Conflict, TopologyMissing
from services.leases import LeaseLost, Leases, leases_bucket_config
from tests.support.leases import TEST_TTL_S, until_state

BUCKET = "test-leases"
KEY = "0123456789abcdef.forward.dump.1"


def lease(host: str = "h1", done: int | None = None) -> StepLease:
    return StepLease(
        migration_id="0123456789abcdef",
        step="dump",
        kind="forward",
        attempt=1,
        holder=LeaseHolder(host=host, role="source", pid=os.getpid()),
        progress=StepProgress(message="dumping", bytes_done=done),
    )


@pytest.fixture
async def leases(js: JetStreamContext) -> Leases[StepLease]:
    """A leases bucket of its own, with a short TTL so expiry is quick to see."""
    await js.create_key_value(config=leases_bucket_config(BUCKET, TEST_TTL_S))
    return Leases(js, StepLease, bucket=BUCKET, ttl_s=TEST_TTL_S)


async def test_renewing_keeps_the_lease_and_carries_progress(leases: Leases[StepLease]) -> None:
    assert (await leases.read(KEY)).state == "never_held"
    async with leases.hold(KEY, lease()) as held:
        for n in range(1, 5):  # four TTLs in all
            held.update(lease(done=n * 1000))
            await asyncio.sleep(TEST_TTL_S)
            seen = await leases.read(KEY)
            assert seen.state == "held", seen
        assert seen.payload is not None and seen.payload.progress.bytes_done is not None
        assert seen.payload.progress.bytes_done >= 3000
        assert not held.lost.is_set()
    assert (await leases.read(KEY)).state == "released"


async def test_a_holder_that_stops_renewing_is_expired_by_the_servers_marker(
    leases: Leases[StepLease],
) -> None:
    revision = await leases.acquire(KEY, lease())
    states = await until_state(leases, KEY, "expired", within_s=4 * TEST_TTL_S)
    # Held until the server aged it out, then its marker: never an absent key in between.
    assert set(states) <= {"held", "expired"} and states[-1] == "expired", states
    expired = await leases.read(KEY)
    assert expired.revision > revision
    # An expired lease is nobody's: neither a new holder nor the old one gets it back.
    with pytest.raises(Conflict):
        await leases.acquire(KEY, lease("h2"))
    with pytest.raises(LeaseLost):
        await leases.renew(KEY, lease(), revision)
    # The marker ages out too; after it the key reads as never held, not "expired".
    await until_state(leases, KEY, "never_held", within_s=4 * TEST_TTL_S)


async def test_compare_and_set_lets_one_holder_in(leases: Leases[StepLease]) -> None:
    results = await asyncio.gather(
        *(leases.acquire(KEY, lease(f"h{n}")) for n in range(1, 4)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1 and all(isinstance(r, Conflict) for r in results if r not in winners)
    revision = winners[0]
    holder = (await leases.read(KEY)).payload
    assert holder is not None
    # A second holder cannot take it, nor renew or release it with a stale revision.
    with pytest.raises(Conflict):
        await leases.acquire(KEY, lease("h9"))
    renewed = await leases.renew(KEY, holder, revision)
    with pytest.raises(LeaseLost):
        await leases.renew(KEY, lease("h9"), revision)
    with pytest.raises(LeaseLost):
        await leases.release(KEY, revision)
    # Taking over is a decision the caller makes about the holder it sees.
    taken = await leases.acquire(KEY, lease("h9"), take_over=lambda p: p.holder == holder.holder)
    assert taken > renewed
    # The old holder's renewal now fails: it must stop.
    with pytest.raises(LeaseLost):
        await leases.renew(KEY, holder, renewed)


async def test_a_held_lease_that_is_taken_is_lost_by_its_holder(
    leases: Leases[StepLease],
) -> None:
    async with leases.hold(KEY, lease()) as held:
        seen = await leases.read(KEY)
        await leases.acquire(KEY, lease("h2"), take_over=lambda p: True)
        with pytest.raises(LeaseLost):
            await held.guard(asyncio.sleep(10 * TEST_TTL_S))
        assert held.lost.is_set() and seen.state == "held"
    # Not released by the loser: the new holder still has it.
    after = await leases.read(KEY)
    assert after.state == "held" and after.payload is not None
    assert after.payload.holder.host == "h2"


async def test_a_missing_bucket_is_unavailable_not_expired(js: JetStreamContext) -> None:
    missing = Leases(js, StepLease, bucket="no-such-leases", ttl_s=TEST_TTL_S)
    seen = await missing.read(KEY)
    assert seen.state == "unavailable" and "no bucket" in seen.reason
    with pytest.raises(TopologyMissing):
        await missing.acquire(KEY, lease())
    with pytest.raises(TopologyMissing):
        await missing.renew(KEY, lease(), 1)


async def test_a_renewal_whose_answer_was_lost_is_still_ours(leases: Leases[StepLease]) -> None:
    """A renewal that landed but timed out on the client (a busy bus) moved the revision
    unseen: the holder recognises its own write, keeps the lease and releases it."""
    mine = lease()
    async with leases.hold(KEY, mine) as held:
        landed = await leases.renew(KEY, mine, held.revision)  # as if its answer were lost
        assert landed != held.revision
        await asyncio.sleep(TEST_TTL_S)  # a renewal over the stale revision comes and goes
        assert not held.lost.is_set(), held.lost_reason
    assert (await leases.read(KEY)).state == "released"


async def test_a_write_that_is_not_ours_is_never_adopted(leases: Leases[StepLease]) -> None:
    async with leases.hold(KEY, lease()) as held:
        theirs = lease(host="h2")
        await leases.renew(KEY, theirs, held.revision)
        await asyncio.wait_for(held.lost.wait(), 4 * TEST_TTL_S)
    after = await leases.read(KEY)
    assert after.state == "held" and after.payload == theirs
