"""Who may use a host's transfer port: a real TransferServer on loopback over mutual TLS,
with certificates made by Ferry's own `certificates` module from a throwaway CA. Only the
migration's source, holding the migration's key, pushes or pulls; anyone else is refused
and nothing is written."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services import certificates
from services.errors import Forbidden, RuntimeFailure
from services.runtime.paths import migration_dir
from services.runtime.transfer import Link, Member, TlsFiles, TransferServer, auth, pull, push

LOOPBACK = "127.0.0.1"
SOURCE, DESTINATION, OTHER = "h1", "h2", "h3"


@dataclass(frozen=True)
class Pki:
    """A fleet CA with three hosts, and a rogue CA that also issued an "h1"."""

    hosts: dict[str, TlsFiles]
    rogue: TlsFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = certificates.ensure_ca(root / "fleet")
    hosts = {}
    for name in (SOURCE, DESTINATION, OTHER):
        issued = certificates.issue(ca, root / "fleet", name, [LOOPBACK])
        hosts[name] = TlsFiles(ca=ca.cert, cert=issued.cert, key=issued.key)
    rogue_ca = certificates.ensure_ca(root / "rogue", label="not the fleet")
    fake = certificates.issue(rogue_ca, root / "rogue", SOURCE, [LOOPBACK])
    return Pki(hosts, TlsFiles(ca=ca.cert, cert=fake.cert, key=fake.key))


@dataclass
class Destination:
    state_dir: Path
    port: int

    def prepare(self) -> tuple[str, auth.TransferGrant]:
        migration_id = secrets.token_hex(8)
        grant = auth.issue(migration_dir(self.state_dir, migration_id), migration_id, source=SOURCE)
        return migration_id, grant

    def incoming(self, migration_id: str) -> Path:
        return migration_dir(self.state_dir, migration_id) / "incoming"


@pytest.fixture
async def destination(tmp_path: Path, pki: Pki) -> AsyncIterator[Destination]:
    state_dir = tmp_path / "h2"
    server = TransferServer(state_dir, tls=pki.hosts[DESTINATION], max_connections=2)
    listening = await server.serve(LOOPBACK, 0)
    yield Destination(state_dir, listening.sockets[0].getsockname()[1])
    listening.close()
    await listening.wait_closed()


def link(
    destination: Destination, grant: auth.TransferGrant, tls: TlsFiles, peer: str = DESTINATION
) -> Link:
    received = grant.model_copy(update={"side": "received", "peer": DESTINATION})
    return Link(LOOPBACK, destination.port, peer, received, tls)


def payload(tmp_path: Path) -> list[Member]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text('{"forged": true}')
    return [Member(src, "config.json")]


def written(destination: Destination, migration_id: str) -> list[str]:
    incoming = destination.incoming(migration_id)
    return (
        sorted(str(p.relative_to(incoming)) for p in incoming.rglob("*"))
        if incoming.exists()
        else []
    )


async def test_the_source_with_the_key_pushes_over_mutual_tls(
    tmp_path: Path, pki: Pki, destination: Destination
) -> None:
    mid, grant = destination.prepare()
    sent = await push(
        link(destination, grant, pki.hosts[SOURCE]),
        mid,
        "bundle",
        payload(tmp_path),
        tmp_path / "s",
    )
    assert sent.bytes > 0
    assert written(destination, mid) == ["bundle", "bundle/config.json"]


async def test_a_push_signed_with_another_key_is_refused_and_writes_nothing(
    tmp_path: Path, pki: Pki, destination: Destination
) -> None:
    mid, grant = destination.prepare()
    guessed = grant.model_copy(update={"key": secrets.token_hex(32)})
    with pytest.raises(Forbidden, match="not signed with the migration's transfer key"):
        await push(
            link(destination, guessed, pki.hosts[SOURCE]),
            mid,
            "bundle",
            payload(tmp_path),
            tmp_path / "s",
        )
    assert written(destination, mid) == []


async def test_a_push_from_another_host_is_refused_even_with_the_key(
    tmp_path: Path, pki: Pki, destination: Destination
) -> None:
    """h3 has a certificate of the fleet and (somehow) the key: it is still not the source."""
    mid, grant = destination.prepare()
    with pytest.raises(Forbidden, match="only h1 may transfer"):
        await push(
            link(destination, grant, pki.hosts[OTHER]),
            mid,
            "bundle",
            payload(tmp_path),
            tmp_path / "s",
        )
    assert written(destination, mid) == []


async def test_a_certificate_from_another_ca_never_gets_a_byte_in(
    tmp_path: Path, pki: Pki, destination: Destination
) -> None:
    mid, grant = destination.prepare()
    with pytest.raises(
        (Forbidden, RuntimeFailure, ConnectionError)
    ):  # TLS 1.3: after the handshake
        await push(
            link(destination, grant, pki.rogue), mid, "bundle", payload(tmp_path), tmp_path / "s"
        )
    assert written(destination, mid) == []


async def test_a_plain_tcp_client_is_refused(destination: Destination) -> None:
    mid, grant = destination.prepare()
    header = auth.sign(grant.secret, {"op": "pull", "migration_id": mid, "name": "pages"})
    reader, writer = await asyncio.open_connection(LOOPBACK, destination.port)
    writer.write(json.dumps(header).encode() + b"\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    assert b"sha256" not in answer and b"pages" not in answer  # no TLS, no answer at all


async def test_pages_go_back_only_to_the_migrations_source(
    tmp_path: Path, pki: Pki, destination: Destination
) -> None:
    mid, grant = destination.prepare()
    images = migration_dir(destination.state_dir, mid) / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(os.urandom(64 << 10))
    with pytest.raises(Forbidden, match="only h1 may transfer"):
        await pull(
            link(destination, grant, pki.hosts[OTHER]),
            mid,
            "pages",
            tmp_path / "stolen",
            tmp_path / "s",
        )
    assert not (tmp_path / "stolen").exists()
    wrong_key = grant.model_copy(update={"key": secrets.token_hex(32)})
    with pytest.raises(Forbidden):
        await pull(
            link(destination, wrong_key, pki.hosts[SOURCE]),
            mid,
            "pages",
            tmp_path / "stolen",
            tmp_path / "s",
        )
    assert not (tmp_path / "stolen").exists()
    await pull(
        link(destination, grant, pki.hosts[SOURCE]), mid, "pages", tmp_path / "back", tmp_path / "s"
    )
    assert (tmp_path / "back" / "pages-1.img").read_bytes() == (images / "pages-1.img").read_bytes()


async def test_the_source_sends_nothing_to_a_server_that_is_not_the_destination(
    tmp_path: Path, pki: Pki, destination: Destination
) -> None:
    """h2 answers where the source expected h3: the certificate gives it away."""
    mid, grant = destination.prepare()
    with pytest.raises(Forbidden, match="certificate is for h2, not h3"):
        await push(
            link(destination, grant, pki.hosts[SOURCE], peer=OTHER),
            mid,
            "bundle",
            payload(tmp_path),
            tmp_path / "s",
        )
    assert written(destination, mid) == []


async def test_connections_beyond_the_limit_are_turned_away(
    pki: Pki, destination: Destination
) -> None:
    """Two idle connections hold both slots (max_connections=2): the third is told so."""
    context = pki.hosts[SOURCE].client_context()
    idle = [
        await asyncio.open_connection(LOOPBACK, destination.port, ssl=context) for _ in range(2)
    ]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(LOOPBACK, destination.port, ssl=context)
    answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert answer == {
        "ok": False,
        "error": "busy: 2 transfers at once already",
        "kind": "unavailable",
    }
    for _, w in [*idle, (reader, writer)]:
        w.close()


def test_the_key_is_kept_private_and_never_shown(tmp_path: Path) -> None:
    grant = auth.issue(tmp_path / "m", "0123456789abcdef", source=SOURCE)
    mode = stat.S_IMODE((tmp_path / "m" / auth.KEY_FILE).stat().st_mode)
    assert mode == 0o600
    assert grant.key not in repr(grant) and grant.key not in str(grant)
    again = auth.issue(tmp_path / "m", "0123456789abcdef", source=SOURCE)
    assert again.key == grant.key  # a redelivered prepare keeps the key the source may hold
    with pytest.raises(RuntimeFailure, match="already has a transfer key"):
        auth.issue(tmp_path / "m", "0123456789abcdef", source=OTHER)


def test_tls_contexts_require_a_peer_certificate(pki: Pki) -> None:
    assert pki.hosts[DESTINATION].server_context().verify_mode == ssl.CERT_REQUIRED
    assert pki.hosts[SOURCE].client_context().verify_mode == ssl.CERT_REQUIRED


def test_certificates_are_valid_from_a_day_before_they_are_made(pki: Pki) -> None:
    """Hosts share no clock: one running a little behind must not see them as not yet valid."""
    import time

    decoded = ssl._ssl._test_decode_cert(str(pki.hosts[SOURCE].cert))  # type: ignore[attr-defined]
    ca = ssl._ssl._test_decode_cert(str(pki.hosts[SOURCE].ca))  # type: ignore[attr-defined]
    for cert in (decoded, ca):
        assert ssl.cert_time_to_seconds(cert["notBefore"]) < time.time() - 23 * 3600
