"""The middle tier: Ferry's components against a real nats-server, one per test; no root."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas import subjects
from services import bus as ferry_bus
from services import topology
from services.kvstores import KvAddressPool, KvHostDirectory, KvMigrationStore, KvPlacementStore
from tests.support.natsserver import Bus, NatsServer
from workflows.placement_chain import OPERATOR_AUTHOR


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream for this test only, storing under its tmp directory."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The URL of this test's nats-server."""
    return nats_server.url


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A client connected by services.bus.connect, with Ferry's buckets and streams created."""
    nc = await ferry_bus.connect(nats_server.url, name="ferry-middle-test")
    js = nc.jetstream()
    await topology.create_topology(js, hosts=("h1", "h2", "h3", "h9"))
    yield Bus(nc, js, nats_server)
    await ferry_bus.close(nc)


@pytest.fixture
def nc(bus: Bus) -> NATS:
    """The connected client of `bus`."""
    return bus.nc


@pytest.fixture
def js(bus: Bus) -> JetStreamContext:
    """A JetStream context on this test's server, Ferry's topology created by create_topology."""
    return bus.js


@pytest.fixture
async def placements(js: JetStreamContext) -> KvPlacementStore:
    """The placement store on KV ferry-placement."""
    return KvPlacementStore(
        await ferry_bus.bucket(js, subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
    )


@pytest.fixture
async def migrations(js: JetStreamContext) -> KvMigrationStore:
    """The migration store on KV ferry-migrations."""
    return KvMigrationStore(await ferry_bus.bucket(js, subjects.MIGRATIONS_BUCKET))


@pytest.fixture
async def hosts(js: JetStreamContext) -> KvHostDirectory:
    """The host directory on KV ferry-registry and ferry-hosts (heartbeats)."""
    return KvHostDirectory(
        await ferry_bus.bucket(js, subjects.REGISTRY_BUCKET),
        await ferry_bus.bucket(js, subjects.HOSTS_BUCKET),
    )


@pytest.fixture
async def addresses(js: JetStreamContext) -> KvAddressPool:
    """The address pool on KV ferry-ipam."""
    return KvAddressPool(await ferry_bus.bucket(js, subjects.IPAM_BUCKET))
