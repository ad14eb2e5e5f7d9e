"""Nothing trusts a message, and nothing crosses between hosts unauthenticated — tried with
the valid credentials and certificate of a host of the lab, h3, which takes no part in the
move, against a real stop-and-copy move of `mover` from h1 to h2, held twice by test
faults (FERRY_FAULT_SLOW_S each):

- while its pre-sync waits, the destination has prepared: its page server listens and the
  migration's transfer key exists. Then h3 (and an outsider with no certificate) pushes to
  h2's transfer port, pulls from it and connects to its page server: all refused, nothing
  written. h3 also publishes forged step commands: for that migration (a container and a
  move it has no part in), naming its own container `victim` and a page server of its
  choosing in fields a command does not have, and for a migration that does not exist.
  And h3 asks h2 to take the moving container's link, unsigned and signed with the
  migration's key as if stolen: refused both times, h2's copy stays unplugged.
- while its restore waits, the bundle has arrived: a forged config.json carrying an OCI
  hook is planted in it. The container restored from it has the config its spec gives.

Then the move completes, `victim` still runs on h3 untouched, and with the requester's
identity (and the operator's, for the spans) no record, event or trace — nor any host's
log — holds the migration's key.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DeliverPolicy

from deploy.lab.layout import LabLayout, LabSpec, read_spec
from schemas import subjects
from schemas.v1.transfers import LinkHandover, LinkTaken
from schemas.v2.migrations import StepCommand
from services import bus
from services.config import HostConfig
from services.errors import Forbidden, RuntimeFailure
from services.link_handover import handover_request
from services.runtime.netns import host_veth_name
from services.runtime.transfer import Link, Member, TlsFiles, TransferGrant, pull, push
from tests.conftest import new_lab_name
from tests.support.bus import connect_as, operator_nats, requester_nats
from tests.support.cli import FERRY, ferry
from tests.support.workload import query, wait_until_serving

pytestmark = pytest.mark.lab

SLOW_S = 15  # each hold; the checks during one take a few seconds
HOLDS = "slow:presync_files+slow:restore"
TRANSFER_PORT = HostConfig.model_fields["transfer_port"].default
WAIT_S = 60.0


@pytest.fixture(scope="module")
def lab(lab_capable: None) -> Iterator[str]:
    name = new_lab_name()
    env = {"FERRY_FAULT_SLOW_S": str(SLOW_S)}
    try:
        up = ferry(name, "lab", "up", "--hosts", "3", "--allow-faults", timeout=240, env=env)
        assert up.code == 0, up.stderr
        yield name
    finally:
        down = ferry(name, "lab", "down", timeout=180)
        assert down.code == 0, down.stderr


def _spec(lab: str) -> LabSpec:
    spec = read_spec(LabLayout(lab))
    assert spec is not None
    return spec


def _run(lab: str, host: str, name: str, rootfs: Path) -> str:
    started = ferry(
        lab, "container", "run", "--host", host, "--name", name, "--rootfs", str(rootfs),
        "--", "/bin/memapp", "7000", "8",
    )  # fmt: skip
    assert started.code == 0, started.stderr
    ip = started.stdout.strip().splitlines()[-1]
    wait_until_serving(ip)
    return ip


def _record(lab: str, migration_id: str) -> dict[str, Any]:
    return dict(ferry(lab, "status", migration_id, "--json", check=True).json())


def _wait(what: str, done: Any, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = done()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _running_step(record: dict[str, Any]) -> str | None:
    running = [s["name"] for s in record["steps"] if s["status"] == "running"]
    return running[-1] if running else None


def _moving(lab: str) -> str | None:
    listed = ferry(lab, "status", "--json", check=True).json()
    return next((r["id"] for r in listed if r["container"] == "mover"), None)


def _tls(lab: str, host: str) -> TlsFiles:
    pki = LabLayout(lab).pki_dir
    return TlsFiles(ca=pki / "ca.pem", cert=pki / f"{host}.pem", key=pki / f"{host}.key")


def _link(lab: str, migration_id: str, key: str, tls: TlsFiles | None) -> Link:
    grant = TransferGrant(migration_id=migration_id, key=key, side="received", peer="h2")
    return Link(_spec(lab).mgmt_address("h2"), TRANSFER_PORT, "h2", grant, tls)


def _payload(tmp: Path) -> list[Member]:
    (tmp / "src").mkdir(parents=True, exist_ok=True)
    (tmp / "src" / "config.json").write_text('{"hooks": {"prestart": [{"path": "/bin/sh"}]}}')
    return [Member(tmp / "src", "config.json")]


def _incoming(lab: str, migration_id: str) -> Path:
    return LabLayout(lab).state_dir("h2") / "migrations" / migration_id / "incoming"


async def _transfer_attempts(lab: str, migration_id: str, key: str, tmp: Path) -> list[str]:
    """What h3 and an outsider are told when they push to and pull from h2's transfer port
    for the migration; each must be a refusal."""
    outcomes = []
    attempts = [
        ("h3 pushes, with its certificate and even the key", "push", _tls(lab, "h3"), key),
        ("h1's certificate without the key", "push", _tls(lab, "h1"), "0" * 64),
        ("h3 pulls the pages back", "pull", _tls(lab, "h3"), key),
        ("an outsider without a certificate", "push", None, key),
    ]
    for what, op, tls, used in attempts:
        link = _link(lab, migration_id, used, tls)
        try:
            if op == "push":
                await push(link, migration_id, "bundle", _payload(tmp), tmp / "scratch")
            else:
                await pull(link, migration_id, "pages", tmp / "stolen", tmp / "scratch")
        except (Forbidden, RuntimeFailure, ConnectionError) as exc:
            outcomes.append(f"{what}: refused ({type(exc).__name__}: {exc})")
            continue
        outcomes.append(f"{what}: ACCEPTED")
    return outcomes


async def _page_server_answers(address: str) -> bool:
    """Whether a TCP connection to the page server gets through (the firewall drops it)."""
    host, port = address.rsplit(":", 1)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 3)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def _forge_commands(lab: str, migration_id: str) -> list[str]:
    """h3, with its own credentials, publishes what it may: commands on its own queues
    (one on h1's, which the bus refuses). Each names the victim and an attacker's page
    server in fields a command does not have."""
    creds = LabLayout(lab).operator_dir / "host-h3.creds"
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc))

    nc = await connect_as(lab, creds, error_cb=on_error, allow_reconnect=False)
    js = nc.jetstream(timeout=2)
    made_up = "feedfacefeedface"
    forged = [
        (subjects.command_subject("h3", "source"), "dump", migration_id, "h3", "source"),
        (subjects.command_subject("h3", "source"), "dump", made_up, "h3", "source"),
        (subjects.command_subject("h3", "transfer"), "presync_files", migration_id, "h3",
         "transfer"),
    ]  # fmt: skip
    published = []
    try:
        for subject, step, mid, host, role in forged:
            command = StepCommand(migration_id=mid, step=step, attempt=1, host=host, role=role)
            body = command.model_dump(mode="json") | {
                "container": "victim",
                "page_server": "10.255.255.1:7000",
            }
            await js.publish(subject, json.dumps(body).encode())
            published.append(f"{step} of {mid} on {subject}")
        with pytest.raises(Exception):  # noqa: B017 - refused, then a timeout: either will do
            await js.publish(
                subjects.command_subject("h1", "source"),
                StepCommand(
                    migration_id=migration_id, step="dump", attempt=1, host="h1", role="source"
                ).to_bytes(),
            )
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    assert any("permissions violation" in v.lower() for v in violations), violations
    return published


async def _forge_handovers(lab: str, migration_id: str, key: str) -> list[str]:
    """h3 asks h2 to take the moving container's link: once unsigned, once signed with the
    migration's key (as if it had stolen it). How each was refused."""
    creds = LabLayout(lab).operator_dir / "host-h3.creds"
    nc = await connect_as(lab, creds, allow_reconnect=False)
    grant = TransferGrant(migration_id=migration_id, key=key, side="received", peer="h2")
    asks = {
        "unsigned": LinkHandover(migration_id=migration_id, auth="0" * 64),
        "with the stolen key": handover_request(grant),
    }
    refusals = []
    try:
        for what, ask in asks.items():
            with pytest.raises(Forbidden) as refused:
                await bus.request(
                    nc, subjects.host_request("h2", subjects.TAKE_LINK), ask, LinkTaken,
                    timeout=5, what=f"a handover {what}",
                )  # fmt: skip
            refusals.append(f"{what}: {refused.value.reason}")
    finally:
        await nc.close()
    return refusals


def _link_state(lab: str, host: str, container: str) -> str:
    shown = subprocess.run(
        ["ip", "-n", f"{lab}-{host}", "-j", "link", "show", host_veth_name(container)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return str(json.loads(shown.stdout)[0]["operstate"])


async def _everything_a_requester_and_the_operator_read(
    lab: str, migration_id: str, trace_id: str
) -> bytes:
    seen = bytearray()
    nc = await requester_nats(lab)
    try:
        js = nc.jetstream()
        kv = await js.key_value(subjects.MIGRATIONS_BUCKET)
        seen += (await kv.get(migration_id)).value or b""
        seen += await _drain(js, subjects.event_subject(migration_id), subjects.EVENTS_STREAM)
    finally:
        await nc.close()
    nc = await operator_nats(lab)
    try:
        js = nc.jetstream()
        seen += await _drain(js, subjects.span_subject(trace_id), subjects.SPANS_STREAM)
    finally:
        await nc.close()
    return bytes(seen)


async def _drain(js: Any, subject: str, stream: str) -> bytes:
    sub = await js.subscribe(
        subject, ordered_consumer=True, stream=stream, deliver_policy=DeliverPolicy.ALL
    )
    out = bytearray()
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.5)
            except Exception:  # nothing more within the gap
                break
            out += msg.data
    finally:
        await sub.unsubscribe()
    assert out, f"nothing on {subject}"
    return bytes(out)


def _runc_state(lab: str, host: str, name: str) -> str | None:
    root = LabLayout(lab).state_dir(host) / "runc"
    done = subprocess.run(["runc", "--root", str(root), "state", name], capture_output=True)
    return str(json.loads(done.stdout)["status"]) if done.returncode == 0 else None


def test_foreign_commands_transfers_and_connections_are_refused_and_the_move_completes(
    lab: str, rootfs: Path, tmp_path: Path
) -> None:
    mover_ip = _run(lab, "h1", "mover", rootfs)
    victim_ip = _run(lab, "h3", "victim", rootfs)
    victim_before = query(victim_ip)
    env = {**os.environ, "FERRY_LAB": lab}
    moving = subprocess.Popen(
        [str(FERRY), "migrate", "mover", "--to", "h2", "--strategy", "stop-and-copy",
         "--inject-fault", HOLDS, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        migration_id = _wait("the move is accepted", lambda: _moving(lab))
        mig = LabLayout(lab).state_dir("h2") / "migrations" / migration_id
        record = _wait(
            "the pre-sync is held",
            lambda: (r := _record(lab, migration_id)) and _running_step(r) == "presync_files" and r,
        )
        key = json.loads((mig / "transfer.json").read_text())["key"]

        # 1. The destination's transfer port: every attempt but the source's is refused.
        outcomes = asyncio.run(_transfer_attempts(lab, migration_id, key, tmp_path))
        assert all(": refused" in o for o in outcomes), outcomes
        assert not _incoming(lab, migration_id).exists()  # not a byte landed
        assert not (tmp_path / "stolen").exists()

        # 2. Its page server takes no connection from a third address (here: the machine
        #    outside every host) — one would end it, and the dump with it.
        page_server = record["results"]["prepare_destination"]["page_server"]
        assert not asyncio.run(_page_server_answers(page_server))

        # 3. Forged step commands from h3: for a move it has no part in, and for none.
        published = asyncio.run(_forge_commands(lab, migration_id))
        assert len(published) == 3

        # 4. h3 asks h2 to take the link (pulling mover's clients off h1): refused, with
        #    the key or without, and h2's copy stays unplugged.
        refusals = asyncio.run(_forge_handovers(lab, migration_id, key))
        assert "not signed with the migration's transfer key" in refusals[0], refusals
        assert "only h1" in refusals[1], refusals
        assert _link_state(lab, "h2", "mover") == "DOWN"

        # 5. A forged config.json with a hook, planted where the bundle arrived.
        _wait(
            "the restore is held",
            lambda: _running_step(_record(lab, migration_id)) == "restore",
        )
        planted = _incoming(lab, migration_id) / "bundle" / "config.json"
        planted.write_text(json.dumps({"ociVersion": "1.0.2", "hooks": {"prestart": [
            {"path": "/bin/sh", "args": ["sh", "-c", "touch /tmp/ferry-hooked"]}]}}))  # fmt: skip

        out, err = moving.communicate(timeout=300)
    finally:
        if moving.poll() is None:
            moving.kill()
    assert moving.returncode == 0, err
    done = json.loads(out)
    assert done["state"] == "completed" and done["id"] == migration_id

    # The move completed, with the config its spec gives: no hook ever reached runc.
    config = json.loads(
        (
            LabLayout(lab).state_dir("h2") / "containers" / "mover" / "bundle" / "config.json"
        ).read_text()
    )
    assert "hooks" not in config and config["process"]["args"][0] == "/bin/memapp"
    assert not Path("/tmp/ferry-hooked").exists()
    assert query(mover_ip)["buffer_ok"] is True

    # The forged commands changed nothing: the victim runs on, the same process, and h3
    # holds nothing for either migration; its workers say why they refused.
    assert _runc_state(lab, "h3", "victim") == "running"
    victim_after = query(victim_ip)
    assert victim_after["token"] == victim_before["token"]
    assert victim_after["ticks"] > victim_before["ticks"]  # never frozen for long
    migrations_on_h3 = LabLayout(lab).state_dir("h3") / "migrations"
    assert not (migrations_on_h3 / migration_id).exists()
    assert not (migrations_on_h3 / "feedfacefeedface").exists()
    logs = LabLayout(lab).state_dir("h3") / "log"
    said = (logs / "source.log").read_text() + (logs / "transfer.log").read_text()
    assert f"dump of {migration_id} (attempt 1) is not the record's current step" in said
    assert f"the record gives presync_files of {migration_id} to another worker" in said
    assert "command for a migration with no record (feedfacefeedface)" in said

    # No record, event or trace a requester (or the operator) reads holds the key, and
    # no host's log does.
    seen = asyncio.run(
        _everything_a_requester_and_the_operator_read(lab, migration_id, done["trace_id"])
    )
    assert key.encode() not in seen
    for host in ("h1", "h2", "h3"):
        for log in (LabLayout(lab).state_dir(host) / "log").glob("*.log"):
            assert key not in log.read_text(errors="replace"), log
