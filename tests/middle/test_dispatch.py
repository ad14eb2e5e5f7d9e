"""Each host's dispatcher queues only the commands the records give to it, once, and unlocks
only the placements it holds (against a real nats-server)."""

from __future__ import annotations

import time

from nats.js import JetStreamContext

from schemas import subjects
from services.kvstores import KvPlacementStore
from services.saga.dispatch import Dispatcher
from tests.support import records


async def queued(js: JetStreamContext, host: str, role: str) -> int:
    info = await js.consumer_info(subjects.COMMANDS_STREAM, subjects.command_durable(host, role))
    return info.num_pending + info.num_ack_pending


async def own_store(js: JetStreamContext, host: str) -> KvPlacementStore:
    return KvPlacementStore(await js.key_value(subjects.PLACEMENT_BUCKET), author=host)


async def test_a_host_queues_the_commands_the_record_gives_it_and_no_other(
    js: JetStreamContext,
) -> None:
    record = records.running_at("restore", since=time.time())  # h2's destination step
    on_h1 = Dispatcher(js, "h1", await own_store(js, "h1"))
    on_h2 = Dispatcher(js, "h2", await own_store(js, "h2"))
    on_h3 = Dispatcher(js, "h3", await own_store(js, "h3"))
    for dispatcher in (on_h1, on_h2, on_h3, on_h2, on_h1):
        await dispatcher.on_record(record)
    assert await queued(js, "h2", "destination") == 1  # once, however often it is seen
    assert await queued(js, "h1", "destination") == 0
    # A new dispatcher (a restarted worker) queues it again: JetStream drops the duplicate.
    await Dispatcher(js, "h2", await own_store(js, "h2")).on_record(record)
    assert await queued(js, "h2", "destination") == 1


async def test_the_end_of_a_saga_unlocks_the_placement_on_its_holder_only(
    js: JetStreamContext, placements: KvPlacementStore
) -> None:
    record = records.running_at("clean_source", since=time.time()).model_copy(
        update={"state": "completed", "committed": True}
    )
    locked = records.placement("web", "h2", state="migrating", migration_id=record.id)
    await placements.claim(locked)

    await Dispatcher(js, "h1", await own_store(js, "h1")).on_record(record)
    found = await placements.get("web")
    assert found is not None and found[0] == locked  # h1 took part, but does not hold it

    await Dispatcher(js, "h2", await own_store(js, "h2")).on_record(record)
    found = await placements.get("web")
    assert found is not None
    assert (found[0].state, found[0].migration_id) == ("running", None)
