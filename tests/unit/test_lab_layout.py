"""Lab names and addresses: deterministic, distinct per lab, within kernel limits."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.lab.layout import (
    MAX_HOSTS,
    LabLayout,
    LabSpec,
    candidate_subnets,
    host_names,
    validate_lab_name,
)
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
