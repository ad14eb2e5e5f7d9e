"""Lab names and addresses: deterministic, distinct per lab, within kernel limits."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.lab import lab
from deploy.lab.layout import (
    MAX_HOSTS,
    HostSize,
    LabLayout,
    LabSpec,
    candidate_subnets,
    host_names,
    parse_sizes,
    parse_zones,
    validate_lab_name,
)
from services.config import HostConfig
from services.controller.config import ControllerConfig
from services.errors import InvalidInput
from services.runtime.netns import host_veth_name, mac_for

IFNAMSIZ = 15


@pytest.mark.parametrize("name", ["", "Ferry", "1lab", "toolongname", "a-b", "a b"])
def test_bad_lab_names_are_refused_with_the_variable_named(name: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_lab_name(name)
    assert caught.value.field == "FERRY_LAB"


def test_interface_names_fit_the_kernel_limit_for_the_longest_lab_and_host() -> None:
    layout = LabLayout(validate_lab_name("abcdefgh"))
    last = host_names(MAX_HOSTS)[-1]
    for name in (layout.bridge, layout.uplink(last), layout.netns(last)):
        assert len(name) <= IFNAMSIZ, name


@given(st.text(min_size=1, max_size=80))
def test_container_veth_names_are_short_and_stable(container: str) -> None:
    assert len(host_veth_name(container)) <= IFNAMSIZ
    assert host_veth_name(container) == host_veth_name(container)


@given(st.ip_addresses(v=4))
def test_macs_are_locally_administered_and_follow_the_address(ip: ipaddress.IPv4Address) -> None:
    mac = mac_for(str(ip))
    assert int(mac.split(":")[0], 16) & 0b10  # locally administered bit
    assert mac == mac_for(str(ip))


def test_labs_start_from_different_subnets() -> None:
    assert candidate_subnets("ferry")[0] != candidate_subnets("other")[0]
    assert candidate_subnets("ferry") == candidate_subnets("ferry")
    assert all(s.is_private for s in candidate_subnets("ferry")[:100])


def test_spec_round_trips_and_hands_out_addresses() -> None:
    spec = LabSpec(
        lab="ferry",
        hosts=host_names(3),
        subnet=ipaddress.IPv4Network("10.201.7.0/24"),
        nats_port=4222,
        mgmt_subnet=ipaddress.IPv4Network("10.201.8.0/24"),
    )
    again = LabSpec.from_json(spec.to_json())
    assert again == spec
    assert spec.gateway == "10.201.7.1"
    assert [spec.address(h) for h in spec.hosts] == ["10.201.7.11", "10.201.7.12", "10.201.7.13"]
    # The bus and the hosts' Ferry traffic live on the management network, apart.
    assert spec.nats_urls == tuple(f"nats://10.201.8.{n}:4222" for n in (2, 3, 4))
    assert [spec.mgmt_address(h) for h in spec.hosts] == [f"10.201.8.{n}" for n in (11, 12, 13)]
    assert spec.operator_address == "10.201.8.1"
    assert len({spec.host_bridge_mac(h) for h in spec.hosts} | {spec.bridge_mac()}) == 4


def _spec(**extra: object) -> LabSpec:
    return LabSpec(
        lab="ferry",
        hosts=host_names(4),
        subnet=ipaddress.IPv4Network("10.201.7.0/24"),
        nats_port=4222,
        mgmt_subnet=ipaddress.IPv4Network("10.201.8.0/24"),
        **extra,  # type: ignore[arg-type]
    )


def test_zones_go_to_the_hosts_in_order_and_fewer_are_cycled() -> None:
    assert parse_zones("a,a,b,b", 4) == ("a", "a", "b", "b")
    assert parse_zones("a, b", 5) == ("a", "b", "a", "b", "a")
    assert parse_zones("eu-west.1_a", 1) == ("eu-west.1_a",)
    assert parse_zones(None, 3) == ()  # no zones: agent.toml says none


def test_sizes_are_memory_and_cpus_per_host_cycled_like_zones() -> None:
    assert parse_sizes("2048:2,1024:1", 3) == (
        HostSize(2048, 2.0),
        HostSize(1024, 1.0),
        HostSize(2048, 2.0),
    )
    assert parse_sizes("512:0.5", 2) == (HostSize(512, 0.5),) * 2
    assert parse_sizes(None, 2) == ()


@pytest.mark.parametrize(
    ("zones", "sizes", "field", "named"),
    [
        ("a,,b", None, "--zones", "entry 2"),
        ("a,b,c", None, "--zones", "'a,b,c'"),  # more than the 2 hosts
        ("a b", None, "--zones", "'a b'"),
        ("a/b", None, "--zones", "'a/b'"),
        (None, "2048", "--sizes", "'2048'"),
        (None, "2048:x", "--sizes", "'2048:x'"),
        (None, "big:2", "--sizes", "'big:2'"),
        (None, "0:1", "--sizes", "'0:1'"),
        (None, "1024:0", "--sizes", "'1024:0'"),
        (None, "1024:-1", "--sizes", "'1024:-1'"),
        (None, "1024:nan", "--sizes", "'1024:nan'"),
        (None, "1024:1,", "--sizes", "entry 2"),
        (None, "1:1,2:2,3:3", "--sizes", "'1:1,2:2,3:3'"),
    ],
)
def test_bad_zones_or_sizes_are_refused_naming_the_option_and_the_entry(
    zones: str | None, sizes: str | None, field: str, named: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_zones(zones, 2)
        parse_sizes(sizes, 2)
    assert caught.value.field == field
    assert named in caught.value.reason


def test_lab_up_refuses_bad_zones_before_touching_anything(tmp_path: Path) -> None:
    layout = LabLayout("nolabzz")
    with pytest.raises(InvalidInput) as caught:
        lab.up(layout, 2, print, zones="a,b,c")
    assert caught.value.field == "--zones"
    with pytest.raises(InvalidInput) as caught:
        lab.up(layout, 2, print, sizes="lots")
    assert caught.value.field == "--sizes"
    with pytest.raises(InvalidInput) as caught:
        lab.up(layout, 2, print, controllers=-1)
    assert caught.value.field == "--controllers"
    assert not layout.root.exists()


@pytest.fixture
def no_ferry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FERRY_"):
            monkeypatch.delenv(name)


def test_each_hosts_agent_toml_declares_its_zone_and_size(
    tmp_path: Path, no_ferry_env: None
) -> None:
    spec = _spec(
        zones=parse_zones("a,a,b", 4),
        sizes=parse_sizes("2048:2,512:0.5", 4),
        controllers=("c1", "c2"),
    )
    layout = LabLayout(spec.lab)
    found = {}
    for host in spec.hosts:
        file = tmp_path / f"{host}.toml"
        file.write_text(lab.host_config(layout, spec, host))
        config = HostConfig.load(file)
        found[host] = (config.zone, config.capacity.memory_mib, config.capacity.cpus)
    assert found == {
        "h1": ("a", 2048, 2.0),
        "h2": ("a", 512, 0.5),
        "h3": ("b", 2048, 2.0),
        "h4": ("a", 512, 0.5),
    }
    assert "cpus = 2\n" in lab.host_config(layout, spec, "h1")  # whole CPUs as integers


def test_without_zones_or_sizes_agent_toml_declares_neither(
    tmp_path: Path, no_ferry_env: None
) -> None:
    spec = _spec()
    text = lab.host_config(LabLayout(spec.lab), spec, "h1")
    assert "zone" not in text and "[capacity]" not in text
    file = tmp_path / "agent.toml"
    file.write_text(text)
    config = HostConfig.load(file)
    assert config.zone == "" and (config.capacity.memory_mib, config.capacity.cpus) == (None, None)


def test_zones_sizes_and_controllers_survive_lab_json() -> None:
    spec = _spec(
        zones=("a", "b", "a", "b"),
        sizes=parse_sizes("1024:2,512:0.5", 4),
        controllers=("c1", "c2"),
    )
    again = LabSpec.from_json(spec.to_json())
    assert again == spec
    assert (again.zone_of("h3"), again.size_of("h4")) == ("a", HostSize(512, 0.5))
    assert lab.controller_names(again) == ("c1", "c2")


def test_a_lab_json_written_before_zones_sizes_and_controllers_still_loads() -> None:
    old = {
        "lab": "ferry",
        "hosts": ["h1", "h2"],
        "subnet": "10.201.7.0/24",
        "nats_port": 4222,
        "mgmt_subnet": "10.201.8.0/24",
        "allow_faults": False,
        "plain_transfers": False,
        "segment_subnets": [],
        "core_subnet": None,
    }
    spec = LabSpec.from_json(json.dumps(old))
    assert (spec.zones, spec.sizes, spec.controllers) == ((), (), ())
    assert (spec.zone_of("h2"), spec.size_of("h2")) == ("", None)
    assert lab.controller_names(spec) == ()


def test_a_controllers_config_names_it_its_own_creds_and_the_labs_bus(
    tmp_path: Path, no_ferry_env: None
) -> None:
    spec = _spec(controllers=("c1", "c2"))
    layout = LabLayout(spec.lab)
    file = tmp_path / "controller.toml"
    file.write_text(lab.controller_config(layout, spec, "c2"))
    config = ControllerConfig.load(file)
    assert config.name == "c2"
    assert config.bus.servers == spec.nats_urls  # what the root namespace reaches
    assert config.bus.creds == layout.controller_dir("c2") / "controller-c2.creds"
    assert config.bus.ca == layout.controller_dir("c2") / "ca.pem"
    assert layout.controller_config("c2").parent == layout.root / "controllers" / "c2"


def test_a_controller_inherits_test_knobs_but_not_its_files_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FERRY_CONTROLLER_SWEEP_S", "1")
    monkeypatch.setenv("FERRY_CONTROLLER_NAME", "other")
    monkeypatch.setenv("FERRY_NATS_URL", "nats://elsewhere:4222")
    env = lab.controller_env(LabLayout("ferry"))
    assert env["FERRY_CONTROLLER_SWEEP_S"] == "1"
    assert "FERRY_CONTROLLER_NAME" not in env and "FERRY_NATS_URL" not in env
    assert env["FERRY_LAB"] == "ferry"


def test_no_controller_runs_where_none_was_started(tmp_path: Path) -> None:
    assert lab.controller_pid(LabLayout("nolabzz"), "c1") is None
