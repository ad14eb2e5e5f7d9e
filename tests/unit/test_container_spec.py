"""A container's spec is data: placements hold a versioned ContainerSpec (old flat ones are
read as one), each host makes config.json from it, and no config.json with OCI hooks reaches
runc."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.v1.containers import DEFAULT_CAPABILITIES, ContainerSpec, CreateContainer, Placement
from services.errors import RuntimeFailure
from services.runtime import bundle, restore
from services.runtime.containers import ContainerPaths
from services.runtime.paths import MigrationPaths
from services.runtime.runc import Runc

DIGEST = "a" * 64
OTHER = "b" * 64
FLAT = {"schema_version": 1, "name": "web", "host": "h1", "ip": "10.0.0.5",
        "mac": "02:fe:0a:00:00:05", "layers": [DIGEST, OTHER], "image": "app",
        "args": ["/bin/app", "7000"], "memory_mib": 64, "state": "running"}  # fmt: skip
HOOKS = {"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "id > /tmp/owned"]}]}


def config_of(spec: ContainerSpec) -> dict[str, Any]:
    return bundle.oci_config(
        spec,
        hostname="web",
        netns_path=Path("/var/lib/ferry/netns/web"),
        cgroups_path="/ferry/web",
        criu_config=Path("/var/lib/ferry/containers/web/criu.conf"),
    )


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    bundle.write_config(tmp_path, config)
    return tmp_path


def test_a_flat_placement_from_before_the_spec_reads_as_one() -> None:
    placement = Placement.model_validate_json(json.dumps(FLAT))
    assert placement.spec == ContainerSpec(
        layers=(DIGEST, OTHER), image="app", args=("/bin/app", "7000"), memory_mib=64
    )
    assert placement.spec.spec_version == 1 and placement.spec.env == ()
    # existing readers keep `placement.layers` and friends
    assert (placement.layers, placement.image, placement.args, placement.memory_mib) == (
        (DIGEST, OTHER),
        "app",
        ("/bin/app", "7000"),
        64,
    )


def test_one_from_before_images_reads_as_a_one_layer_spec() -> None:
    old = {**FLAT, "layer": DIGEST}
    del old["layers"], old["image"]
    assert Placement.model_validate_json(json.dumps(old)).spec.layers == (DIGEST,)


def test_a_placement_round_trips_and_still_says_the_flat_fields_for_older_readers() -> None:
    spec = ContainerSpec(layers=(DIGEST,), args=("/bin/app",), env=("MODE=prod",))
    placement = Placement(name="web", host="h1", ip="10.0.0.5", mac="02:fe:0a:00:00:05", spec=spec)
    written = json.loads(placement.to_bytes())
    assert written["spec"]["env"] == ["MODE=prod"] and written["spec"]["spec_version"] == 1
    assert (written["layers"], written["args"]) == ([DIGEST], ["/bin/app"])
    assert Placement.from_bytes(placement.to_bytes()) == placement


def test_the_spec_wins_over_flat_fields_beside_it() -> None:
    spec = ContainerSpec(layers=(DIGEST,), args=("/bin/real",))
    data = {**FLAT, "spec": spec.model_dump(), "args": ["/bin/forged"]}
    assert Placement.model_validate(data).args == ("/bin/real",)


def test_a_spec_of_an_unknown_version_is_refused() -> None:
    data = {**FLAT, "spec": {"spec_version": 5, "layers": [DIGEST], "args": ["/bin/app"]}}
    with pytest.raises(ValidationError) as caught:
        Placement.model_validate(data)
    assert caught.value.errors()[0]["loc"] == ("spec", "spec_version")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"env": ["NOEQUALS"]}, "env"),
        ({"env": ["=x"]}, "env"),
        ({"env": ["A B=x"]}, "env"),
        ({"env": ["A=x\x00y"]}, "env"),
        ({"args": ["/bin/app\x00x"]}, "args"),
        ({"args": []}, "args"),
    ],
)
def test_bad_env_and_args_are_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    data = {"name": "web", "layers": [DIGEST], "args": ["/bin/app"], **change}
    with pytest.raises(ValidationError) as caught:
        CreateContainer.model_validate_json(json.dumps(data))
    assert caught.value.errors()[0]["loc"][0] == field


def test_a_create_request_becomes_the_spec_with_its_env() -> None:
    cmd = CreateContainer(
        name="web", layers=(DIGEST,), args=("/bin/app",), env=("MODE=prod",), memory_mib=32
    )
    assert cmd.spec(user=None) == ContainerSpec(
        spec_version=2,
        layers=(DIGEST,),
        args=("/bin/app",),
        env=("MODE=prod",),
        memory_mib=32,
        capabilities=DEFAULT_CAPABILITIES,
    )


def test_the_config_is_made_from_the_spec_and_the_host() -> None:
    spec = ContainerSpec(layers=(DIGEST,), args=("/bin/app", "7"), env=("MODE=x",), memory_mib=8)
    config = config_of(spec)
    assert config["process"]["args"] == ["/bin/app", "7"]
    assert config["process"]["env"][1:] == ["MODE=x"]
    assert config["linux"]["resources"]["memory"]["limit"] == 8 * 2**20
    assert config["linux"]["cgroupsPath"] == "/ferry/web"
    assert config["annotations"] == {"org.criu.config": "/var/lib/ferry/containers/web/criu.conf"}


TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
env_vars = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,8}=[^\x00]{0,12}\Z", alphabet=TEXT)
arguments = st.text(TEXT, max_size=12)


@given(
    args=st.lists(arguments, min_size=1, max_size=4),
    env=st.lists(env_vars, max_size=4),
    memory=st.none() | st.integers(min_value=4, max_value=65536),
)
def test_the_config_never_has_hooks_whatever_the_spec(
    args: list[str], env: list[str], memory: int | None
) -> None:
    spec = ContainerSpec(layers=(DIGEST,), args=tuple(args), env=tuple(env), memory_mib=memory)
    config = config_of(spec)
    assert "hooks" not in config
    assert "hooks" not in json.dumps(config)  # nowhere, at any depth
    assert config["process"]["args"] == args


def test_a_config_ferry_made_passes_the_check(tmp_path: Path) -> None:
    bundle.refuse_hooks(write(tmp_path, config_of(ContainerSpec(layers=(DIGEST,), args=("x",)))))


@pytest.mark.parametrize("hooks", [HOOKS, {}, None, []])
def test_a_config_with_hooks_is_refused(tmp_path: Path, hooks: Any) -> None:
    config = {**config_of(ContainerSpec(layers=(DIGEST,), args=("x",))), "hooks": hooks}
    with pytest.raises(RuntimeFailure, match="has OCI hooks: refused"):
        bundle.refuse_hooks(write(tmp_path, config))


def test_a_config_that_is_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RuntimeFailure, match="cannot be read"):
        bundle.refuse_hooks(tmp_path)
    with pytest.raises(RuntimeFailure, match="cannot be read"):
        bundle.refuse_hooks(tmp_path / "absent")


def test_restore_refuses_a_bundle_with_hooks_before_runc_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[list[str]] = []

    async def spawn(argv: list[str], **_: int) -> None:
        spawned.append(argv)
        raise AssertionError("runc was started")

    monkeypatch.setattr(restore, "spawn", spawn)
    cpaths = ContainerPaths(root=tmp_path / "web", netns=tmp_path / "netns" / "web")
    config = {**config_of(ContainerSpec(layers=(DIGEST,), args=("x",))), "hooks": HOOKS}
    write(cpaths.bundle, config)
    paths = MigrationPaths.of(tmp_path, "0123456789abcdef")
    read_end, write_end = os.pipe()
    with pytest.raises(RuntimeFailure, match="OCI hooks"):
        asyncio.run(
            restore.restore_container(Runc(tmp_path / "runc"), "web", paths, cpaths, write_end)
        )
    assert spawned == []
    assert os.read(read_end, 1) == b"", "the logger's pipe is closed: it ends"
    os.close(read_end)
