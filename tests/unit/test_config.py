"""A host's config: the TOML file, the FERRY_* variables over it, and what bad input says."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from deploy.lab.lab import host_config
from deploy.lab.layout import LabLayout, LabSpec
from services.agent import _worker_environment
from services.config import HostConfig
from services.config_layout import CONFIG_ENV, from_file
from services.errors import InvalidInput

EXAMPLE = Path(__file__).parents[2] / "deploy" / "systemd" / "agent.toml.example"

MINIMAL = """
host = "h3"
address = "10.0.0.13"
[bus]
servers = ["nats://10.9.0.1:4222"]
[network]
subnet = "10.1.0.0/24"
gateway = "10.1.0.1"
ip_pool = "100-250"
"""


@pytest.fixture(autouse=True)
def no_ferry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without FERRY_* variables (a lab shell would set some)."""
    for name in list(os.environ):
        if name.startswith("FERRY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def refusal(path: Path | None = None) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        HostConfig.load(path)
    return caught.value


def test_the_shipped_example_is_a_valid_config() -> None:
    config = HostConfig.load(EXAMPLE)
    assert (config.host, config.zone, config.address) == ("h1", "az1", "10.0.0.11")
    assert config.nats_servers == (
        "nats://10.9.0.1:4222",
        "nats://10.9.0.2:4222",
        "nats://10.9.0.3:4222",
    )
    assert config.nats_creds == Path("/etc/ferry/h1.creds")
    assert config.nats_ca == Path("/etc/ferry/ca.pem")
    assert config.tls is not None and config.tls.cert == Path("/etc/ferry/h1.pem")
    assert config.subnet == ipaddress.IPv4Network("10.1.0.0/24")
    assert (config.gateway, config.ip_pool, config.bridge) == ("10.1.0.1", (100, 250), "br0")
    assert config.labels == {"disk": "ssd"}
    assert (config.capacity.memory_mib, config.capacity.cpus) == (16384, 8.0)
    assert config.config_file == EXAMPLE
    assert config.runc_root == Path("/var/lib/ferry/runc")


def test_a_minimal_file_takes_the_defaults(tmp_path: Path) -> None:
    config = HostConfig.load(write(tmp_path, MINIMAL))
    assert (config.zone, config.region, config.labels) == ("", "", {})
    assert (config.capacity.memory_mib, config.capacity.cpus) == (None, None)
    assert (config.state_dir, config.cgroup_parent, config.transfer_port) == (
        Path("/var/lib/ferry"),
        "/ferry",
        7441,
    )
    assert config.pool_addresses()[:2] == ["10.1.0.100", "10.1.0.101"]


def test_the_config_the_lab_writes_is_a_valid_agent_config(tmp_path: Path) -> None:
    spec = LabSpec(
        lab="tc",
        hosts=("h1", "h2"),
        subnet=ipaddress.IPv4Network("10.200.9.0/24"),
        nats_port=4222,
        mgmt_subnet=ipaddress.IPv4Network("10.201.9.0/24"),
    )
    layout = LabLayout(spec.lab)
    file = tmp_path / "agent.toml"
    file.write_text(host_config(layout, spec, "h2"))
    config = HostConfig.load(file)
    assert (config.host, config.address) == ("h2", spec.mgmt_address("h2"))
    assert config.nats_servers == spec.nats_urls
    assert config.subnet == spec.subnet and config.gateway == spec.gateway
    assert config.cgroup_parent == layout.cgroup_parent("h2")
    assert config.nats_creds == Path("/etc/ferry/host-h2.creds")
    assert config.config_file == file


def test_variables_beat_the_file_and_the_file_beats_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MINIMAL + 'bridge = "br-file"\n[capacity]\ncpus = 4\n')
    monkeypatch.setenv("FERRY_NATS_URL", "nats://a:4222, nats://b:4222")
    monkeypatch.setenv("FERRY_BRIDGE", "br-env")
    monkeypatch.setenv("FERRY_CAPACITY_MEMORY_MIB", "2048")
    monkeypatch.setenv("FERRY_LABELS", "gpu=a100")
    monkeypatch.setenv("FERRY_ORPHAN_LIMIT", "")  # empty: unset
    config = HostConfig.load(path)
    assert config.nats_servers == ("nats://a:4222", "nats://b:4222")
    assert config.bridge == "br-env"
    assert (config.capacity.memory_mib, config.capacity.cpus) == (2048, 4.0)  # merged
    assert config.labels == {"gpu": "a100"}
    assert config.host == "h3" and config.orphan_limit == 3


def test_ferry_config_names_the_file_and_a_given_path_beats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = write(tmp_path, MINIMAL)
    monkeypatch.setenv(CONFIG_ENV, str(named))
    assert HostConfig.load().host == "h3"
    assert HostConfig.load(EXAMPLE).host == "h1"


def test_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("servers =", "sevrers ="))
    error = refusal(path)
    assert error.field == "bus.sevrers"
    assert error.reason == f"{path}: bus.sevrers: unknown key (did you mean bus.servers?)"
    error = refusal(write(tmp_path, MINIMAL + "[tuning]\nwatchdog = 1\n"))
    assert error.field == "tuning" and "unknown key" in error.reason
    error = refusal(write(tmp_path, MINIMAL + "[capacity]\ngpus = 1\n"))
    assert error.field == "capacity.gpus"
    error = refusal(write(tmp_path, 'config_file = "/etc/other.toml"\n' + MINIMAL))
    assert error.field == "config_file"  # it names the file; it cannot be in it


@pytest.mark.parametrize(
    ("old", "new", "key", "why"),
    [
        ('ip_pool = "100-250"', 'ip_pool = "250-100"', "network.ip_pool", "not a range"),
        ('ip_pool = "100-250"', 'ip_pool = "100-255"', "network.ip_pool", "does not fit"),
        ('ip_pool = "100-250"', 'ip_pool = "1-20"', "network.ip_pool", "holds the gateway"),
        ('ip_pool = "100-250"', 'ip_pool = "100"', "network.ip_pool", "not FIRST-LAST"),
        ('ip_pool = "100-250"', 'ip_pool = "a-b"', "network.ip_pool[0]", "valid integer"),
        ('"10.1.0.0/24"', '"10.1.0.1/24"', "network.subnet", "has host bits set"),
        ('"10.1.0.1"', '"10.2.0.1"', "network.gateway", "not in the subnet"),
        ('["nats://10.9.0.1:4222"]', '"nats://10.9.0.1:4222"', "bus.servers", "valid tuple"),
        ('["nats://10.9.0.1:4222"]', '["10.9.0.1:4222"]', "bus.servers", "not a server URL"),
        ('["nats://10.9.0.1:4222"]', "[]", "bus.servers", "at least 1 item"),
        ('host = "h3"', 'host = "H 3"', "host", "should match pattern"),
        ('host = "h3"', 'host = "h3"\nstate_dir = "var/ferry"', "state_dir", "not an absolute"),
        ('host = "h3"', 'host = "h3"\ntransfer_port = "x"', "transfer_port", "valid integer"),
        ('host = "h3"\n', "", "host", "required (in the file, or set FERRY_HOST)"),
        ('servers = ["nats://10.9.0.1:4222"]\n', "", "bus.servers", "required"),
        ('[bus]\nservers = ["nats://10.9.0.1:4222"]', 'bus = "nats://x"', "bus", "be a table"),
        ('host = "h3"', 'host = "h3"\nlabels = ["ssd"]', "labels", "valid dictionary"),
    ],
)
def test_a_bad_value_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, old: str, new: str, key: str, why: str
) -> None:
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    error = refusal(path)
    assert error.field == key
    assert error.reason.startswith(f"{path}: {key}: "), error.reason
    assert why in error.reason


def test_a_bad_variable_is_named_as_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRY_IP_POOL", "100-999")
    error = refusal(write(tmp_path, MINIMAL))
    assert error.field == "network.ip_pool"
    assert error.reason.startswith("environment FERRY_IP_POOL (network.ip_pool): ")
    monkeypatch.setenv("FERRY_LABELS", "gpu")
    assert refusal().field == "FERRY_LABELS"


def test_capacity_is_parsed_and_checked(tmp_path: Path) -> None:
    config = HostConfig.load(write(tmp_path, MINIMAL + "[capacity]\nmemory_mib = 512\n"))
    assert (config.capacity.memory_mib, config.capacity.cpus) == (512, None)
    error = refusal(write(tmp_path, MINIMAL + "[capacity]\ncpus = 0\n"))
    assert error.field == "capacity.cpus" and "greater than 0" in error.reason
    error = refusal(write(tmp_path, MINIMAL + "[capacity]\nmemory_mib = 1.5\n"))
    assert error.field == "capacity.memory_mib"


def test_an_unreadable_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    error = refusal(missing)
    assert error.field == "config_file"
    assert error.reason == f"{missing}: cannot read: No such file or directory"
    assert refusal(tmp_path).reason == f"{tmp_path}: cannot read: Is a directory"
    broken = write(tmp_path, "host = \n")
    assert refusal(broken).reason.startswith(f"{broken}: not TOML: ")


def test_the_effective_config_reads_back_as_the_same_config() -> None:
    config = HostConfig.load(EXAMPLE)
    shown = config.as_file()
    assert shown["bus"]["servers"] == list(config.nats_servers)
    assert shown["network"]["ip_pool"] == [100, 250]
    assert HostConfig(**from_file({k: v for k, v in shown.items() if k != "config_file"})) == (
        config.model_copy(update={"config_file": None})
    )


def test_the_workers_are_pointed_at_the_agents_file() -> None:
    config = HostConfig.load(EXAMPLE)
    assert _worker_environment(config) == {**os.environ, CONFIG_ENV: str(EXAMPLE)}
    without_file = config.model_copy(update={"config_file": None})
    assert _worker_environment(without_file) is None  # no file: they inherit the variables
