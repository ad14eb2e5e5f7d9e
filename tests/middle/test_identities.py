"""Every row of docs/identities.md, tried against a real nats-server running the auth config
`ferry identities` writes: what each identity may do is allowed, what it may not is refused
by the server (a permissions violation), never merely unused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from schemas import subjects
from schemas.v1.containers import Placement
from schemas.v1.transfers import TransferKeyRequest
from services import bus, identities, topology
from services.errors import Forbidden, Untrusted
from services.identity_files import creds_path, write_identities
from services.kvstores import KvMigrationStore, KvPlacementStore
from services.runtime.paths import migration_dir
from services.runtime.transfer import auth
from services.transfer_keys import KeyHolder, KeyIssuer
from tests.support.natsserver import NatsServer
from tests.support.records import migration_record

MIGRATION = "0011223344556677"

DOC = Path(__file__).resolve().parents[2] / "docs" / "identities.md"
WAIT_S = 0.5


@dataclass
class Client:
    nc: NATS
    violations: list[str]

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream(timeout=WAIT_S)  # a refused API call times out: soon

    def refused(self, fragment: str) -> bool:
        return any(fragment.lower() in v.lower() for v in self.violations)


@dataclass
class Fleet:
    server: NatsServer
    creds: Path

    async def client(self, user: str) -> Client:
        violations: list[str] = []

        async def on_error(exc: Exception) -> None:
            violations.append(str(exc))

        nc = await nats.connect(
            self.server.url,
            **bus.client_options(self.creds / f"{user}.creds"),
            error_cb=on_error,
            allow_reconnect=False,
        )
        return Client(nc, violations)


@pytest.fixture(scope="module")
def identity_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Written once: bcrypt is slow on purpose."""
    creds = tmp_path_factory.mktemp("identities")
    wanted = [
        identities.operator(),
        identities.host("h1"),
        identities.host("h2"),
        identities.host("h3"),
        identities.requester("ci"),
    ]
    write_identities(creds, wanted)
    return creds


@pytest.fixture
async def fleet(identity_dir: Path, tmp_path: Path) -> AsyncIterator[Fleet]:
    creds = identity_dir
    conf = creds / "server.conf"
    conf.write_text('include "auth.conf"\n')
    server = NatsServer(tmp_path / "store", config=conf)
    server.start()
    operator = await bus.connect(
        server.url, "test-operator", creds=creds_path(creds, identities.operator())
    )
    js = operator.jetstream()
    await topology.create_topology(js, hosts=("h1", "h2"))
    kv = await js.key_value(subjects.MIGRATIONS_BUCKET)
    await kv.put("m1", b'{"id": "m1"}')
    await js.publish(subjects.command_subject("h2", "source"), b"{}")
    await operator.close()
    yield Fleet(server, creds)
    server.stop()


Action = Callable[[Client], Awaitable[object]]


async def put_placement(c: Client) -> object:
    """A placement entry under h2's name (what h2's own writes look like)."""
    kv = await c.js.key_value(subjects.PLACEMENT_BUCKET)
    return await kv.put(subjects.placement_key("h2", "victim"), b'{"host": "h2"}')


async def put_own_placement(c: Client) -> object:
    kv = await c.js.key_value(subjects.PLACEMENT_BUCKET)
    return await kv.put(subjects.placement_key("h1", "mine"), b'{"host": "h1"}')


async def publish_step_command(c: Client) -> object:
    return await c.js.publish(subjects.command_subject("h2", "source"), b"{}")


async def publish_own_step_command(c: Client) -> object:
    return await c.js.publish(subjects.command_subject("h1", "source"), b"{}")


async def delete_stream(c: Client) -> object:
    return await c.js.delete_stream(subjects.COMMANDS_STREAM)


async def purge_stream(c: Client) -> object:
    return await c.js.purge_stream(subjects.EVENTS_STREAM)


async def fetch_h2_commands(c: Client) -> object:
    sub = await c.js.pull_subscribe_bind(
        durable=subjects.command_durable("h2", "source"), stream=subjects.COMMANDS_STREAM
    )
    return await sub.fetch(1, timeout=WAIT_S)


async def fetch_own_commands(c: Client) -> object:
    """h1's own durable (empty): a fetch that times out was allowed, a refused one errs."""
    sub = await c.js.pull_subscribe_bind(
        durable=subjects.command_durable("h1", "source"), stream=subjects.COMMANDS_STREAM
    )
    with contextlib.suppress(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=WAIT_S)
    return "fetched"


async def create_durable(c: Client) -> object:
    config = ConsumerConfig(durable_name="sneaky", filter_subject=f"{subjects.PREFIX}.cmd.>")
    return await c.js.add_consumer(subjects.COMMANDS_STREAM, config=config)


async def create_ephemeral(c: Client) -> object:
    config = ConsumerConfig(filter_subject=f"{subjects.PREFIX}.cmd.>")
    return await c.js.add_consumer(subjects.COMMANDS_STREAM, config=config)


async def read_command_directly(c: Client) -> object:
    return await c.js.get_msg(subjects.COMMANDS_STREAM, seq=1)


async def subscribe_commands(c: Client) -> object:
    sub = await c.nc.subscribe(f"{subjects.PREFIX}.cmd.>")
    await c.nc.flush()
    return await sub.next_msg(timeout=WAIT_S)


async def put_other_heartbeat(c: Client) -> object:
    kv = await c.js.key_value(subjects.HOSTS_BUCKET)
    return await kv.put("h2", b"{}")


async def put_own_heartbeat(c: Client) -> object:
    kv = await c.js.key_value(subjects.HOSTS_BUCKET)
    return await kv.put("h1", b"{}")


async def put_other_registration(c: Client) -> object:
    kv = await c.js.key_value(subjects.REGISTRY_BUCKET)
    return await kv.put("h2", b"{}")


async def serve_other_host(c: Client) -> object:
    sub = await c.nc.subscribe(subjects.host_request("h2", subjects.CONTAINER_RUNS))
    await c.nc.flush()
    await asyncio.sleep(0.2)
    return sub


async def serve_own_host(c: Client) -> object:
    sub = await c.nc.subscribe(subjects.host_request("h1", subjects.CONTAINER_RUNS))
    await c.nc.flush()
    await asyncio.sleep(0.2)
    return sub


async def ask_migration(c: Client) -> object:
    """On its own request subject: the server lets it through (no one answers here)."""
    await c.nc.publish(subjects.migration_request("requester-ci"), b"{}")
    await c.nc.flush()
    await asyncio.sleep(0.2)
    return "published"


async def ask_as_operator(c: Client) -> object:
    await c.nc.publish(subjects.migration_request("operator"), b"{}")
    await c.nc.flush()
    await asyncio.sleep(0.2)
    return "published"


async def read_record(c: Client) -> object:
    kv = await c.js.key_value(subjects.MIGRATIONS_BUCKET)
    return await kv.get("m1")


async def follow_events(c: Client) -> object:
    sub = await c.js.subscribe(
        f"{subjects.PREFIX}.events.>", ordered_consumer=True, stream=subjects.EVENTS_STREAM
    )
    await sub.unsubscribe()
    return "followed"


async def write_record(c: Client) -> object:
    kv = await c.js.key_value(subjects.MIGRATIONS_BUCKET)
    return await kv.put("m1", b"{}")


# (row id as in docs/identities.md, identity, action, allowed?)
ROWS: list[tuple[str, str, Action, bool]] = [
    ("requester-placement-write", "requester-ci", put_placement, False),
    ("requester-step-command", "requester-ci", publish_step_command, False),
    ("requester-stream-delete", "requester-ci", delete_stream, False),
    ("requester-stream-purge", "requester-ci", purge_stream, False),
    ("requester-consume-commands", "requester-ci", fetch_h2_commands, False),
    ("requester-create-consumer", "requester-ci", create_durable, False),
    ("requester-subscribe-commands", "requester-ci", subscribe_commands, False),
    ("requester-record-write", "requester-ci", write_record, False),
    ("requester-impersonate", "requester-ci", ask_as_operator, False),
    ("requester-ask", "requester-ci", ask_migration, True),
    ("requester-read-record", "requester-ci", read_record, True),
    ("requester-follow-events", "requester-ci", follow_events, True),
    ("host-stream-delete", "host-h1", delete_stream, False),
    ("host-stream-purge", "host-h1", purge_stream, False),
    ("host-consume-other-commands", "host-h1", fetch_h2_commands, False),
    ("host-create-durable", "host-h1", create_durable, False),
    ("host-create-ephemeral", "host-h1", create_ephemeral, False),
    ("host-read-commands-directly", "host-h1", read_command_directly, False),
    ("host-subscribe-commands", "host-h1", subscribe_commands, False),
    ("host-other-heartbeat", "host-h1", put_other_heartbeat, False),
    ("host-other-registration", "host-h1", put_other_registration, False),
    ("host-serve-other-host", "host-h1", serve_other_host, False),
    ("host-impersonate", "host-h1", ask_as_operator, False),
    ("host-own-commands", "host-h1", fetch_own_commands, True),
    ("host-own-heartbeat", "host-h1", put_own_heartbeat, True),
    ("host-serve-own-host", "host-h1", serve_own_host, True),
    ("host-step-command", "host-h1", publish_step_command, False),
    ("host-placement-write", "host-h1", put_placement, False),
    ("host-own-step-command", "host-h1", publish_own_step_command, True),
    ("host-own-placement-write", "host-h1", put_own_placement, True),
    ("operator-stream-purge", "operator", purge_stream, True),
]


@pytest.mark.parametrize(("row", "user", "action", "allowed"), ROWS, ids=[r[0] for r in ROWS])
async def test_identity_row(
    fleet: Fleet, row: str, user: str, action: Action, allowed: bool
) -> None:
    client = await fleet.client(user)
    try:
        try:
            await asyncio.wait_for(action(client), WAIT_S * 4)
            failed: BaseException | None = None
        except Exception as exc:  # a refused request mostly ends as a timeout
            failed = exc
        await asyncio.sleep(0.2)  # the server's -ERR arrives asynchronously
        refused = client.refused("permissions violation")
        if allowed:
            assert failed is None and not refused, (row, failed, client.violations)
        else:
            assert refused, (row, failed, client.violations)
    finally:
        await client.nc.close()


async def test_an_anonymous_client_is_refused_at_the_door(fleet: Fleet) -> None:
    with pytest.raises(Forbidden, match="anonymous"):
        await bus.connect(fleet.server.url, "anonymous", give_up_after=5)


async def test_a_wrong_password_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.creds"
    wrong.write_text(json.dumps({"user": "host-h1", "password": "x" * 24}))
    wrong.chmod(0o600)
    with pytest.raises(Forbidden, match="refused the credentials"):
        await bus.connect(fleet.server.url, "wrong", creds=wrong, give_up_after=5)


def test_every_row_of_the_table_has_a_test() -> None:
    tried = DOC.read_text().split("## What is tried", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", tried, re.MULTILINE))
    assert documented == {r[0] for r in ROWS}


async def test_a_host_cannot_take_a_placement_another_host_holds(fleet: Fleet) -> None:
    """A host may write placements only under its own name; one it writes over a container
    another host holds is accepted by the bus but read by everyone as untrusted. The same
    take is legitimate as the commit of a move the holder locked the container for."""
    h1, h2 = await fleet.client("host-h1"), await fleet.client("host-h2")
    try:
        on_h1 = KvPlacementStore(await h1.js.key_value(subjects.PLACEMENT_BUCKET), author="h1")
        on_h2 = KvPlacementStore(await h2.js.key_value(subjects.PLACEMENT_BUCKET), author="h2")
        held = placement("web", host="h2", state="running")
        revision = await on_h2.claim(held)
        assert (await on_h1.get("web")) == (held, revision)

        # h1 takes it by compare-and-set under its own name: written, and never believed.
        await on_h1.update(held.model_copy(update={"host": "h1"}), revision)
        for reader in (on_h1, on_h2):
            with pytest.raises(Untrusted, match="h1 changed the placement of web, which h2 holds"):
                await reader.get("web")

        # The holder hands over to a destination it names: that host's take is believed.
        moved = placement("db", host="h2", state="running")
        revision = await on_h2.claim(moved)
        locked = moved.model_copy(
            update={"state": "migrating", "migration_id": MIGRATION, "destination": "h1"}
        )
        revision = await on_h2.update(locked, revision)
        committed = locked.model_copy(update={"host": "h1"})
        revision = await on_h1.update(committed, revision)
        assert (await on_h2.get("db")) == (committed, revision)
        # ...and h2, no longer the holder, cannot remove it.
        await on_h2._write("db", b"", revision, removal=True)
        with pytest.raises(Untrusted, match="h2 changed the placement of db, which h1 holds"):
            await on_h1.get("db")
    finally:
        await h1.nc.close()
        await h2.nc.close()


def placement(name: str, *, host: str, state: str) -> Placement:
    return Placement.model_validate(
        {
            "name": name, "host": host, "ip": "10.88.0.9", "mac": "02:00:0a:58:00:09",
            "layers": ["a" * 64], "args": ["sleep", "60"], "state": state,
        }
    )  # fmt: skip


async def test_only_the_source_of_a_migration_is_given_its_transfer_key(
    fleet: Fleet, tmp_path: Path
) -> None:
    """h2, the destination, answers for its migration from h1: h1 gets the key; h3, a host
    with valid credentials, is refused by h2; a requester may not even ask. The answer goes
    to the asker's own inbox, which no other identity may read."""
    record = migration_record(MIGRATION, source="h1", destination="h2")
    clients = {u: await fleet.client(u) for u in ("operator", "host-h1", "host-h2", "host-h3")}
    requester = await fleet.client("requester-ci")
    try:
        kv = await clients["operator"].js.key_value(subjects.MIGRATIONS_BUCKET)
        await kv.put(MIGRATION, record.to_bytes())
        on_h2 = clients["host-h2"]
        store = KvMigrationStore(await on_h2.js.key_value(subjects.MIGRATIONS_BUCKET))
        issued = auth.issue(migration_dir(tmp_path / "h2", MIGRATION), MIGRATION, source="h1")
        await KeyIssuer(on_h2.nc, store, tmp_path / "h2", "h2", identities=True).serve()

        def holder(user: str) -> KeyHolder:
            return KeyHolder(clients[user].nc, tmp_path / user, cast(Any, None), 0, None)

        received = await holder("host-h1").grant("h2", MIGRATION)
        assert (received.key, received.side, received.peer) == (issued.key, "received", "h2")
        with pytest.raises(Forbidden, match="only h1, the source of migration"):
            await holder("host-h3").grant("h2", MIGRATION)
        assert auth.load(migration_dir(tmp_path / "host-h3", MIGRATION)) is None

        asked = requester.nc.request(
            subjects.host_request("h2", subjects.TRANSFER_KEY),
            TransferKeyRequest(migration_id=MIGRATION).to_bytes(),
            timeout=WAIT_S,
        )
        with contextlib.suppress(Exception):
            await asked
        await asyncio.sleep(0.2)
        assert requester.refused("permissions violation")
    finally:
        for c in [*clients.values(), requester]:
            await c.nc.close()
