"""Migration ids, IPs, MACs and address:port endpoints are checked in every message that
carries them: a bad one is refused naming its field, before it reaches a path or a command."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from schemas.v1.containers import ContainerCreated, Placement
from schemas.v1.hosts import HostHeartbeat, HostRegistration
from schemas.v1.leases import StepLease
from schemas.v1.migrations import (
    CancelRequest,
    MigrationRequest,
    PageServerStarted,
    StartPageServer,
)
from schemas.v1.migrations import StepCommand as StepCommandV1
from schemas.v1.transfers import TransferKeyRequest
from schemas.v1.types import MIGRATION_ID
from schemas.v2.migrations import MigrationRecord, StepCommand, read_command, read_record
from schemas.v2.results import DumpResult, PrepareResult
from tests.support import records

MID = "0123456789abcdef"
BAD_IDS = ["../x", "../../etc", "0123456789abcde/", "0123 456789abcdef", "0123456789ABCDEF",
           "0123456789abcdef\n", "", "m1", "0123456789abcdef0", "0123456789abcde."]  # fmt: skip
BAD_IPV4 = ["10.0.0", "10.0.0.256", "010.0.0.1", " 10.0.0.1", "10.0.0.1\n", "::1", "web",
            "10.0.0.1; reboot", "10.0.0.1/24"]  # fmt: skip
BAD_IP = ["10.0.0", "fe80::1%eth0", "fe80::1%;reboot", "host.example", "", "::g"]
BAD_MACS = ["02:FE:0A:00:00:05", "02:fe:0a:00:00", "02:fe:0a:00:00:05:06", "02-fe-0a-00-00-05",
            "02fe0a000005", "02:fe:0a:00:00:5", " 02:fe:0a:00:00:05"]  # fmt: skip
BAD_ENDPOINTS = ["10.0.0.1", "10.0.0.1:", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:port",
                 "web:7000", ":7000", "10.0.0.1:7000 ", "[::1]", "10.0.0.1:٧٠٠٠"]  # fmt: skip


def refused(model: type[BaseModel], data: dict[str, Any]) -> tuple[Any, ...]:
    """The location pydantic names for the first thing wrong in `data`."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate_json(json.dumps(data))
    return caught.value.errors()[0]["loc"]


def placement(**change: Any) -> dict[str, Any]:
    return {**json.loads(records.placement().to_bytes()), **change}


def command(**change: Any) -> dict[str, Any]:
    cmd = StepCommand(migration_id=MID, step="dump", attempt=1, host="h1", role="source")
    return {**cmd.model_dump(mode="json"), **change}


def record(**change: Any) -> dict[str, Any]:
    return {**records.migration_record(MID).model_dump(mode="json"), **change}


def test_the_ids_intake_makes_are_migration_ids() -> None:
    for _ in range(100):
        assert MIGRATION_ID.match(uuid.uuid4().hex[:16])  # as services/intake.py makes them


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_bad_migration_id_is_refused_everywhere_naming_the_field(bad: str) -> None:
    assert not MIGRATION_ID.match(bad)
    assert refused(StepCommand, command(migration_id=bad)) == ("migration_id",)
    assert refused(MigrationRecord, record(id=bad)) == ("id",)
    assert refused(Placement, placement(state="migrating", migration_id=bad)) == ("migration_id",)
    assert refused(StartPageServer, {"migration_id": bad, "images": "it-1"}) == ("migration_id",)
    assert refused(CancelRequest, {"id": bad}) == ("id",)
    assert refused(TransferKeyRequest, {"migration_id": bad}) == ("migration_id",)
    lease = {"migration_id": bad, "step": "dump", "kind": "forward", "attempt": 1,
             "holder": {"host": "h1", "role": "source", "pid": 1}}  # fmt: skip
    assert refused(StepLease, lease) == ("migration_id",)
    v1 = {"migration_id": bad, "step": "dump", "attempt": 1, "container": "web",
          "source": "h1", "destination": "h2"}  # fmt: skip
    assert refused(StepCommandV1, v1) == ("migration_id",)


@pytest.mark.parametrize("bad", BAD_IDS[:4])
def test_old_commands_and_records_are_checked_when_upcast(bad: str) -> None:
    v1_command = {"schema_version": 1, "migration_id": bad, "step": "dump", "attempt": 1}
    with pytest.raises(ValidationError, match="migration_id"):
        read_command(json.dumps(v1_command).encode(), "h1", "source")
    v1_record = {**record(id=bad), "schema_version": 1, "facts": {}}
    with pytest.raises(ValidationError, match="id"):
        read_record(json.dumps(v1_record).encode())


def test_good_values_pass_unchanged() -> None:
    assert StepCommand.model_validate(command()).migration_id == MID
    got = Placement.model_validate(placement(ip="10.77.0.10", mac="02:fe:0a:4d:00:0a"))
    assert (got.ip, got.mac) == ("10.77.0.10", "02:fe:0a:4d:00:0a")
    for address in ("10.0.0.11", "fd00::11", "::1"):
        beat = HostHeartbeat(host="h1", address=address, agent_pid=1, sent_at=1.0)
        assert beat.address == address
    for endpoint in ("10.0.0.11:7441", "[fd00::11]:40000", "fd00::11:40000"):
        assert PageServerStarted(address=endpoint).address == endpoint


@pytest.mark.parametrize("bad", BAD_IPV4)
def test_a_container_address_must_be_ipv4(bad: str) -> None:
    assert refused(Placement, placement(ip=bad)) == ("ip",)
    created = {"name": "web", "host": "h1", "ip": bad, "mac": "02:fe:0a:00:00:05", "pid": 1}
    assert refused(ContainerCreated, created) == ("ip",)


@pytest.mark.parametrize("bad", BAD_IP)
def test_a_host_address_must_be_an_ip(bad: str) -> None:
    beat = {"host": "h1", "address": bad, "agent_pid": 1, "sent_at": 1.0}
    assert refused(HostHeartbeat, beat) == ("address",)
    assert refused(HostRegistration, {"host": "h1", "address": bad, "registered_at": 1.0}) == (
        "address",
    )


@pytest.mark.parametrize("bad", BAD_MACS)
def test_a_mac_is_six_lowercase_octets(bad: str) -> None:
    assert refused(Placement, placement(mac=bad)) == ("mac",)


@pytest.mark.parametrize("bad", BAD_ENDPOINTS)
def test_an_endpoint_is_an_ip_and_a_port(bad: str) -> None:
    assert refused(PageServerStarted, {"address": bad}) == ("address",)
    assert refused(PrepareResult, {"page_server": bad}) == ("page_server",)
    dump = {"frozen_at": 1.0, "dump_ms": 1, "lazy_pages": bad}
    assert refused(DumpResult, dump) == ("lazy_pages",)


def test_the_error_says_what_was_wrong() -> None:
    with pytest.raises(ValidationError, match=r"'10\.0\.0' is not an IPv4 address"):
        Placement.model_validate(placement(ip="10.0.0"))
    with pytest.raises(ValidationError, match=r"not address:port"):
        PageServerStarted(address="10.0.0.1:0")
    with pytest.raises(ValidationError, match=r"migration_id\n.*should match pattern"):
        StepCommand.model_validate(command(migration_id="../x"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"container": "../x"}, "container"),
        ({"container": "Web"}, "container"),
        ({"container": "web x"}, "container"),
        ({"destination": "../h2"}, "destination"),
        ({"source": "H1"}, "source"),
    ],
)
def test_a_migration_request_names_containers_and_hosts_by_pattern(
    change: dict[str, str], field: str
) -> None:
    assert refused(MigrationRequest, {"container": "web", "destination": "h2", **change}) == (
        field,
    )
