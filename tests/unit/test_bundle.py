"""The OCI config Ferry gives runc."""

from __future__ import annotations

from pathlib import Path

from schemas.v1.containers import ContainerSpec
from services.runtime.bundle import oci_config

SPEC = ContainerSpec(layers=("a" * 64,), args=("/bin/app", "7000"), env=("MODE=test",))


def _config(memory_mib: int | None = 64) -> dict[str, object]:
    return oci_config(
        SPEC.model_copy(update={"memory_mib": memory_mib}),
        hostname="web",
        netns_path=Path("/var/lib/ferry/netns/web"),
        cgroups_path="/ferry-lab/h1/web",
    )


def test_the_network_namespace_is_the_one_ferry_made() -> None:
    linux = _config()["linux"]
    assert isinstance(linux, dict)
    namespaces = {ns["type"]: ns for ns in linux["namespaces"]}
    assert set(namespaces) == {"pid", "network", "ipc", "uts", "mount"}
    assert namespaces["network"]["path"] == "/var/lib/ferry/netns/web"
    assert linux["cgroupsPath"] == "/ferry-lab/h1/web"


def test_memory_limit_is_in_bytes_and_optional() -> None:
    linux = _config(64)["linux"]
    assert isinstance(linux, dict)
    assert linux["resources"]["memory"]["limit"] == 64 * 2**20
    unlimited = _config(None)["linux"]
    assert isinstance(unlimited, dict)
    assert "memory" not in unlimited["resources"]


def test_process_has_no_terminal_and_no_rlimits() -> None:
    process = _config()["process"]
    assert isinstance(process, dict)
    assert process["terminal"] is False
    assert "rlimits" not in process  # raising them needs CAP_SYS_RESOURCE
    assert process["args"] == ["/bin/app", "7000"]
    assert "MODE=test" in process["env"]
