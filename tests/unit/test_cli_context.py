"""Contexts: which bus `ferry` talks to, found without knowing labs; the lab plugin writes and
removes its own; `ferry hosts` reads the bus, and the lab adds its columns."""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from pydantic import ValidationError

from deploy.lab import commands, contexts
from deploy.lab import lab as lab_module
from deploy.lab import layout as lab_paths
from deploy.lab.layout import LabLayout, LabSpec
from schemas import subjects
from schemas.v1.hosts import WORKER_ROLES, HostHeartbeat, HostRegistration, WorkerStatus
from services.cli import host_commands
from services.cli.context import (
    BusContext,
    NoContext,
    context_file,
    default_context_file,
    load_context,
    write_context,
)
from services.cli.main import main
from services.errors import InvalidInput, Unavailable

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def config_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    for var in ("FERRY_CONTEXT", "FERRY_NATS_URL", "FERRY_LAB"):
        monkeypatch.delenv(var, raising=False)
    return home / "ferry"


@pytest.fixture
def labs_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    root = tmp_path / "labs"
    monkeypatch.setattr(lab_paths, "LABS_ROOT", root)
    return root


def servers(url: str) -> BusContext:
    return BusContext(servers=(url,))


def lab_spec(name: str, port: int = 14222, hosts: int = 2, segments: int = 1) -> LabSpec:
    return LabSpec(
        lab=name,
        hosts=tuple(f"h{i}" for i in range(1, hosts + 1)),
        subnet=ipaddress.IPv4Network("10.200.7.0/24"),
        nats_port=port,
        mgmt_subnet=ipaddress.IPv4Network(f"10.203.{port % 256}.0/24"),
        segment_subnets=tuple(
            ipaddress.IPv4Network(f"10.201.{i}.0/24")
            for i in range(segments if segments > 1 else 0)
        ),
        core_subnet=ipaddress.IPv4Network("10.202.0.0/24") if segments > 1 else None,
    )


def put_lab(spec: LabSpec) -> LabLayout:
    """A lab that is up, as far as its records go."""
    layout = LabLayout(spec.lab)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.lab_file.write_text(spec.to_json())
    return layout


def quiet(_: str) -> None:
    pass


# ---- the file ----------------------------------------------------------------------------


def test_a_context_file_holds_servers_creds_and_ca(tmp_path: Path) -> None:
    path = tmp_path / "prod.json"
    path.write_text(
        json.dumps(
            {
                "servers": ["nats://10.0.0.1:4222", "tls://nats.example:4443"],
                "creds": "/etc/ferry/cli.creds",
                "ca": "/etc/ferry/ca.pem",
                "description": "prod",
            }
        )
    )
    context = load_context(str(path))
    assert context.servers == ("nats://10.0.0.1:4222", "tls://nats.example:4443")
    assert context.creds == Path("/etc/ferry/cli.creds")
    assert context.ca == Path("/etc/ferry/ca.pem")
    with pytest.raises(ValidationError):
        context.servers = ()  # type: ignore[misc]  # frozen


def test_written_contexts_read_back_the_same(config_home: Path) -> None:
    context = BusContext(servers=("nats://a:1", "nats://b:2"), ca=Path("/ca.pem"))
    write_context(context_file("two"), context)
    assert load_context("two") == context
    assert not list(config_home.rglob(".*"))  # no temporary file left behind


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("{}", "servers: is missing"),
        ('{"servers": []}', "servers: needs at least one NATS server URL"),
        ('{"servers": ["http://x:4222"]}', "servers.0: 'http://x:4222' is not a NATS server URL"),
        ('{"servers": ["nats://:4222"]}', "servers.0:"),
        ('{"servers": ["nats://a:99999"]}', "servers.0:"),
        ('{"servers": ["nats://a:4222"], "servrs": 1}', "servrs: is not a context field"),
        ('{"servers": "nats://a:4222"}', "servers:"),
        ("not json", "JSON"),
    ],
)
def test_a_bad_context_names_the_file_and_the_field(
    text: str, mentions: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InvalidInput) as caught:
        load_context(str(path))
    assert str(path) in caught.value.reason and mentions in caught.value.reason
    assert "ferry lab up" in caught.value.reason  # how to get a good one
    if "[]" not in text:  # a bad server is one complaint, not also "no servers"
        assert "at least one" not in caught.value.reason
    assert caught.value.field == "--context"
    # Through the CLI: bad input, one line — and not an empty list, as a missing one gives.
    assert main(["--context", str(path), "containers", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and mentions in captured.err


def test_a_missing_context_says_where_it_looked_and_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(NoContext) as caught:
        load_context()
    assert str(default_context_file()) in caught.value.reason
    assert "ferry lab up" in caught.value.reason and "servers" in caught.value.reason
    # Listing commands list nothing, as they did for a lab that was not up ...
    for listing in (["containers"], ["status"], ["image", "ls"], ["hosts"]):
        assert main([*listing, "--json"]) == 0
        assert capsys.readouterr().out.strip() == "[]"
    # ... the others fail (exit 1) with one line naming the file.
    monkeypatch.setenv("FERRY_CONTEXT", "nosuch")
    assert main(["status", "someid", "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FERRY_CONTEXT" in err[0]
    assert str(context_file("nosuch")) in err[0]


# ---- where it is found -------------------------------------------------------------------


def test_precedence_flag_then_FERRY_CONTEXT_then_FERRY_LAB_then_FERRY_NATS_URL_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_context(default_context_file(), servers("nats://default:1"))
    assert load_context().servers == ("nats://default:1",)
    monkeypatch.setenv("FERRY_NATS_URL", "nats://env1:1, nats://env2:2")
    assert load_context().servers == ("nats://env1:1", "nats://env2:2")
    write_context(context_file("lab1"), servers("nats://lab1:1"))
    monkeypatch.setenv("FERRY_LAB", "lab1")
    assert load_context().servers == ("nats://lab1:1",)
    write_context(context_file("chosen"), servers("nats://chosen:1"))
    monkeypatch.setenv("FERRY_CONTEXT", "chosen")
    assert load_context().servers == ("nats://chosen:1",)
    write_context(context_file("flag"), servers("nats://flag:1"))
    assert load_context("flag").servers == ("nats://flag:1",)


def test_FERRY_CONTEXT_is_a_name_or_a_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_context(context_file("prod"), servers("nats://named:1"))
    monkeypatch.setenv("FERRY_CONTEXT", "prod")
    assert load_context().servers == ("nats://named:1",)
    elsewhere = tmp_path / "any" / "where.json"
    write_context(elsewhere, servers("nats://path:1"))
    monkeypatch.setenv("FERRY_CONTEXT", str(elsewhere))
    assert load_context().servers == ("nats://path:1",)
    monkeypatch.setenv("FERRY_CONTEXT", "not a name")
    with pytest.raises(InvalidInput) as caught:
        load_context()
    assert caught.value.field == "FERRY_CONTEXT"


def test_FERRY_LAB_is_only_ever_a_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERRY_LAB", str(tmp_path / "x.json"))
    with pytest.raises(InvalidInput) as caught:
        load_context()
    assert caught.value.field == "FERRY_LAB"


def test_the_config_home_follows_XDG_and_defaults_to_dot_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_context_file() == tmp_path / "xdg" / "ferry" / "context.json"
    assert context_file("a") == tmp_path / "xdg" / "ferry" / "contexts" / "a.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in ("", "relative/dir"):  # XDG: a relative value is ignored
        monkeypatch.setenv("XDG_CONFIG_HOME", unset)
        assert default_context_file() == tmp_path / "home" / ".config" / "ferry" / "context.json"


def test_bad_FERRY_NATS_URL_is_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_NATS_URL", "nats://ok:1,redis://no:6379")
    with pytest.raises(InvalidInput) as caught:
        load_context()
    assert caught.value.field == "FERRY_NATS_URL" and "redis://no:6379" in caught.value.reason
    monkeypatch.setenv("FERRY_NATS_URL", " , ")
    with pytest.raises(InvalidInput):
        load_context()


def test_the_product_imports_nothing_of_deploy() -> None:
    importing = re.compile(r"^\s*(from|import) deploy\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "services").rglob("*.py")
        if importing.search(path.read_text())
    ]
    assert offenders == []


# ---- the lab writes and removes its context ----------------------------------------------


def test_lab_up_writes_its_context_and_down_removes_it(
    labs_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = lab_spec("t1")
    layout = put_lab(spec)
    contexts.write(layout, spec, quiet, select_default=True)
    assert (
        BusContext.model_validate_json(layout.context_file.read_bytes()).servers == spec.nats_urls
    )
    monkeypatch.setenv("FERRY_LAB", "t1")  # how every script and test names its lab
    assert load_context().servers == spec.nats_urls
    monkeypatch.delenv("FERRY_LAB")
    assert load_context().servers == spec.nats_urls  # the default, as there was none
    assert load_context(str(layout.context_file)).servers == spec.nats_urls

    contexts.remove(layout, quiet)
    assert not layout.context_file.exists()
    assert not context_file("t1").exists()
    assert not default_context_file().exists()
    contexts.remove(layout, quiet)  # any number of times


def test_labs_side_by_side_each_keep_their_context(
    labs_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = lab_spec("ta", 14001), lab_spec("tb", 14002)
    for spec in (one, two):
        contexts.write(put_lab(spec), spec, quiet, select_default=True)
    for spec in (one, two):
        monkeypatch.setenv("FERRY_LAB", spec.lab)
        assert load_context().servers == spec.nats_urls
    assert contexts.written_for(default_context_file()) == "ta"  # the first took it
    contexts.remove(LabLayout("tb"), quiet)  # not tb's default: stays
    assert contexts.written_for(default_context_file()) == "ta"
    contexts.remove(LabLayout("ta"), quiet)
    assert not default_context_file().exists()


def test_a_default_the_user_wrote_is_never_replaced(labs_root: Path) -> None:
    mine = BusContext(servers=("nats://prod:4222",), description="prod")
    write_context(default_context_file(), mine)
    for name in ("ferry", "t1"):
        spec = lab_spec(name)
        contexts.write(put_lab(spec), spec, quiet, select_default=True)
        assert load_context() == mine
        contexts.remove(LabLayout(name), quiet)
        assert load_context() == mine


def test_the_unnamed_lab_takes_the_default_from_another_lab(labs_root: Path) -> None:
    test_lab, unnamed = lab_spec("t1", 14001), lab_spec("ferry", 14002)
    contexts.write(put_lab(test_lab), test_lab, quiet, select_default=True)
    contexts.write(put_lab(unnamed), unnamed, quiet, select_default=True)
    assert contexts.written_for(default_context_file()) == "ferry"
    # A test's lab does not take it back from a lab that is up ...
    contexts.write(put_lab(test_lab), test_lab, quiet, select_default=True)
    assert contexts.written_for(default_context_file()) == "ferry"
    # ... but does from one that is gone without its `lab down`.
    LabLayout("ferry").lab_file.unlink()
    contexts.write(put_lab(test_lab), test_lab, quiet, select_default=True)
    assert contexts.written_for(default_context_file()) == "t1"


def test_a_chosen_context_keeps_lab_up_off_the_default(
    labs_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = lab_spec("t1")
    contexts.write(put_lab(spec), spec, quiet, select_default=False)
    assert context_file("t1").exists() and not default_context_file().exists()

    seen: dict[str, Any] = {}

    def fake_up(layout: LabLayout, count: int, say: Any, **kwargs: Any) -> LabSpec:
        seen.update(kwargs)
        return spec

    monkeypatch.setattr(lab_module, "up", fake_up)
    args = argparse.Namespace(
        hosts=2, allow_faults=False, plain_transfers=False, segments=1, subnet=None, context=None
    )
    commands.lab_up(args)
    assert seen["select_default"] is True
    monkeypatch.setenv("FERRY_CONTEXT", "prod")
    commands.lab_up(args)
    assert seen["select_default"] is False
    monkeypatch.delenv("FERRY_CONTEXT")
    commands.lab_up(argparse.Namespace(**{**vars(args), "context": "prod"}))
    assert seen["select_default"] is False


# ---- ferry hosts -------------------------------------------------------------------------


class FakeKV:
    def __init__(self, data: dict[str, bytes]) -> None:
        self.data = data

    async def get(self, key: str) -> SimpleNamespace:
        if key not in self.data:
            raise KeyNotFoundError
        return SimpleNamespace(value=self.data[key])

    async def keys(self) -> list[str]:
        if not self.data:
            raise NoKeysError
        return list(self.data)


class FakeBus:
    def __init__(self, buckets: dict[str, dict[str, bytes]]) -> None:
        self.buckets = buckets

    def jetstream(self) -> FakeBus:
        return self

    async def key_value(self, name: str) -> FakeKV:
        if name not in self.buckets:  # a bus bootstrapped before the bucket existed
            raise BucketNotFoundError
        return FakeKV(self.buckets[name])


def fleet(healthy: dict[str, bool]) -> FakeBus:
    registry: dict[str, bytes] = {}
    beats: dict[str, bytes] = {}
    for i, (host, ok) in enumerate(healthy.items()):
        address = f"10.0.0.{i + 11}"
        registry[host] = HostRegistration(host=host, address=address, registered_at=1.0).to_bytes()
        if not ok:
            continue
        workers = tuple(WorkerStatus(role=r, pid=100 * i + n) for n, r in enumerate(WORKER_ROLES))
        beats[host] = HostHeartbeat(
            host=host, address=address, agent_pid=9, workers=workers, sent_at=1.0
        ).to_bytes()
        for role in WORKER_ROLES:
            beats[subjects.worker_key(host, role)] = b"{}"
    return FakeBus({subjects.REGISTRY_BUCKET: registry, subjects.HOSTS_BUCKET: beats})


async def test_hosts_come_from_the_registry_and_health_from_heartbeats() -> None:
    rows = await host_commands.host_rows(fleet({"h10": True, "h2": False, "h1": True}))  # type: ignore[arg-type]
    assert [r["name"] for r in rows] == ["h1", "h2", "h10"]
    h1, h2, h10 = rows
    assert set(h1) == {"name", "address", "health", "workers"}
    assert h1["health"] == "ok" and sorted(h1["workers"]) == sorted(WORKER_ROLES)
    assert h2 == {"name": "h2", "address": "10.0.0.12", "health": "down", "workers": {}}
    assert h10["address"] == "10.0.0.11"


async def test_a_host_missing_a_worker_heartbeat_is_down() -> None:
    bus = fleet({"h1": True})
    del bus.buckets[subjects.HOSTS_BUCKET][subjects.worker_key("h1", "transfer")]
    (row,) = await host_commands.host_rows(bus)  # type: ignore[arg-type]
    assert row["health"] == "down" and row["workers"] == {}


async def test_an_unknown_host_is_bad_input_naming_the_known_ones() -> None:
    bus = fleet({"h1": True, "h2": False})
    await host_commands.check_host(bus, "h2")  # type: ignore[arg-type]  # down, but known
    with pytest.raises(InvalidInput) as caught:
        await host_commands.check_host(bus, "h9")  # type: ignore[arg-type]
    assert caught.value.field == "--host" and "(known: h1, h2)" in caught.value.reason


def test_the_lab_adds_its_columns_and_lists_every_host_of_its_spec(labs_root: Path) -> None:
    spec = lab_spec("t1", segments=2)
    layout = put_lab(spec)
    from_bus = [{"name": "h1", "address": spec.address("h1"), "health": "ok", "workers": {"x": 1}}]
    rows = commands.host_details(BusContext(servers=spec.nats_urls), from_bus)
    assert [list(r) for r in rows] == [
        ["name", "address", "netns", "runc_root", "state_dir", "health", "segment", "workers"]
    ] * 2
    h1, h2 = rows
    assert h1["netns"] == "t1-h1" and h1["runc_root"] == str(layout.runc_root("h1"))
    assert h1["state_dir"] == str(layout.state_dir("h1")) and h1["workers"] == {"x": 1}
    assert [h1["segment"], h2["segment"]] == [1, 2]
    assert h2["health"] == "down" and h2["address"] == spec.address("h2")
    # Another bus is none of the lab's business.
    assert commands.host_details(servers("nats://elsewhere:1"), from_bus) == from_bus


def test_ferry_hosts_prints_the_bus_rows_with_the_plugins_details(
    labs_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = lab_spec("t1")
    put_lab(spec)
    monkeypatch.setenv("FERRY_NATS_URL", ",".join(spec.nats_urls))

    async def unreachable(context: BusContext) -> tuple[list[dict[str, Any]], Unavailable]:
        return [], Unavailable(f"cannot reach NATS at {context.servers[0]}")

    monkeypatch.setattr(host_commands, "_from_bus", unreachable)
    # The lab's NATS is down: its hosts are listed down, as they always were ...
    assert main(["hosts", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["health"], r["netns"]) for r in rows] == [
        ("h1", "down", "t1-h1"),
        ("h2", "down", "t1-h2"),
    ]
    # ... a bus no plugin knows is an error.
    monkeypatch.setenv("FERRY_NATS_URL", "nats://elsewhere:1")
    assert main(["hosts", "--json"]) == 1
    assert "cannot reach NATS at nats://elsewhere:1" in capsys.readouterr().err
