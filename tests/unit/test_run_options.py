"""What a container runs: the image's config merged with the run options as Docker merges
them, the user resolved in the image's own /etc, and the config.json made from the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas.v1.containers import (
    ALL_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    VERSION_1_CAPABILITIES,
    ContainerSpec,
    ImageConfig,
    ProcessUser,
)
from services.errors import InvalidInput
from services.runtime import bundle, users
from workflows.container_process import (
    OptionError,
    RunOptions,
    capabilities,
    parse_env_file,
    process_for,
)

IMAGE = ImageConfig(
    entrypoint=("/usr/bin/tini", "--"),
    cmd=("mariadbd",),
    env=("PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8"),
    user="mysql",
    working_dir="/var/lib/mysql",
    labels={"team": "db", "tier": "gold"},
)
DIGEST = "a" * 64


def test_the_image_runs_as_it_says_when_no_option_is_given() -> None:
    process = process_for(IMAGE, RunOptions())
    assert process.args == ("/usr/bin/tini", "--", "mariadbd")
    assert process.env == IMAGE.env
    assert (process.user, process.workdir) == ("mysql", "/var/lib/mysql")
    assert process.labels == {"team": "db", "tier": "gold"}
    assert process.capabilities == DEFAULT_CAPABILITIES


def test_options_win_over_the_image_as_in_docker() -> None:
    options = RunOptions(
        command=("mariadbd", "--skip-grant-tables"),
        env=("LANG=de_DE.UTF-8", "EXTRA=1"),
        user="1000:1000",
        workdir="/tmp",
        labels={"tier": "silver"},
    )
    process = process_for(IMAGE, options)
    assert process.args == ("/usr/bin/tini", "--", "mariadbd", "--skip-grant-tables")
    assert process.env == ("PATH=/usr/local/bin:/usr/bin", "LANG=de_DE.UTF-8", "EXTRA=1")
    assert (process.user, process.workdir) == ("1000:1000", "/tmp")
    assert process.labels == {"team": "db", "tier": "silver"}


def test_an_entrypoint_option_clears_the_images_cmd() -> None:
    assert process_for(IMAGE, RunOptions(entrypoint=("/bin/sh",))).args == ("/bin/sh",)
    cleared = process_for(IMAGE, RunOptions(entrypoint=(), command=("/bin/echo", "hi")))
    assert cleared.args == ("/bin/echo", "hi")


def test_nothing_to_run_is_refused_naming_the_command() -> None:
    with pytest.raises(OptionError, match="neither Entrypoint nor Cmd") as caught:
        process_for(ImageConfig(), RunOptions())
    assert caught.value.field == "CMD"


@pytest.mark.parametrize(
    ("add", "drop", "granted"),
    [
        ((), (), DEFAULT_CAPABILITIES),
        (("sys_ptrace",), ("NET_RAW", "CAP_MKNOD"), None),
        ((), ("ALL",), ()),
        (("NET_ADMIN",), ("ALL",), ("CAP_NET_ADMIN",)),
        (("ALL",), ("SYS_ADMIN",), tuple(c for c in ALL_CAPABILITIES if c != "CAP_SYS_ADMIN")),
    ],
)
def test_capabilities_start_from_dockers_default(
    add: tuple[str, ...], drop: tuple[str, ...], granted: tuple[str, ...] | None
) -> None:
    got = capabilities(add, drop)
    if granted is None:
        assert "CAP_SYS_PTRACE" in got
        assert "CAP_NET_RAW" not in got and "CAP_MKNOD" not in got
        assert len(got) == len(DEFAULT_CAPABILITIES) - 1
    else:
        assert got == granted


def test_an_env_file_reads_as_dockers() -> None:
    text = "# comment\n\nA=1\n  B=two words \nFROM_HOST\nUNSET_HERE\nEMPTY=\n"
    assert parse_env_file(text, {"FROM_HOST": "h"}, "x.env") == (
        "A=1",
        "B=two words ",
        "FROM_HOST=h",
        "EMPTY=",
    )
    with pytest.raises(OptionError, match=r"x\.env:1") as caught:
        parse_env_file("=nothing\n", {}, "x.env")
    with pytest.raises(OptionError, match="is not NAME=value"):
        parse_env_file("B = spaced\n", {}, "x.env")  # Docker refuses a name with spaces too
    assert caught.value.field == "--env-file"


# ---- the user, in the image's own files -----------------------------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/sh\nmysql:x:101:102::/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nmysql:x:102:\nbackup:x:34:mysql,other\nssl-cert:x:110:mysql\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    return tmp_path


@pytest.mark.parametrize(
    ("asked", "uid", "gid", "extra"),
    [
        ("mysql", 101, 102, (34, 110)),
        ("101", 101, 102, (34, 110)),  # a listed uid takes its passwd entry
        ("4242", 4242, 0, ()),  # an unlisted uid runs with gid 0, as in Docker
        ("mysql:backup", 101, 34, ()),
        ("1000:1000", 1000, 1000, ()),
    ],
)
def test_a_user_resolves_as_in_docker(
    root: Path, asked: str, uid: int, gid: int, extra: tuple[int, ...]
) -> None:
    assert users.resolve(root, asked) == ProcessUser(
        uid=uid, gid=gid, additional_gids=extra, asked=asked
    )


@pytest.mark.parametrize(("asked", "says"), [("postgres", "no user"), ("mysql:wheel", "no group")])
def test_a_name_the_image_does_not_know_is_refused(root: Path, asked: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as caught:
        users.resolve(root, asked)
    assert caught.value.field == "--user"


def test_a_passwd_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").symlink_to("/etc/passwd")  # the host's, if followed
    with pytest.raises(InvalidInput, match="not followed"):
        users.resolve(tmp_path, "root")
    (tmp_path / "etc" / "passwd").unlink()
    (tmp_path / "etc").rmdir()
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(InvalidInput, match="not followed"):
        users.resolve(tmp_path, "root")


# ---- the config.json -----------------------------------------------------------------------


def _config(spec: ContainerSpec) -> dict[str, Any]:
    return bundle.oci_config(
        spec, hostname="db", netns_path=Path("/run/netns/db"), cgroups_path="/ferry/db"
    )


def test_a_version_2_spec_makes_the_process_it_describes() -> None:
    spec = ContainerSpec(
        spec_version=2,
        layers=(DIGEST,),
        args=("mariadbd",),
        env=("PATH=/opt/bin", "LANG=C"),
        user=ProcessUser(uid=101, gid=102, additional_gids=(34,), asked="mysql"),
        workdir="/var/lib/mysql",
        hostname="db.example",
        cpus=1.5,
        capabilities=DEFAULT_CAPABILITIES,
        shm_mib=256,
        labels={"team": "db"},
    )
    config = _config(spec)
    process = config["process"]
    assert process["user"] == {"uid": 101, "gid": 102, "additionalGids": [34]}
    assert process["cwd"] == "/var/lib/mysql"
    assert process["env"] == ["PATH=/opt/bin", "LANG=C"]  # no second PATH before it
    assert process["capabilities"]["bounding"] == list(DEFAULT_CAPABILITIES)
    assert config["hostname"] == "db.example"
    assert config["linux"]["resources"]["cpu"] == {"quota": 150_000, "period": 100_000}
    shm = next(m for m in config["mounts"] if m["destination"] == "/dev/shm")
    assert "size=262144k" in shm["options"]


def test_a_version_1_spec_keeps_running_as_it_did() -> None:
    config = _config(ContainerSpec(layers=(DIGEST,), args=("/bin/app",)))
    assert config["process"]["user"] == {"uid": 0, "gid": 0}
    assert config["process"]["capabilities"]["effective"] == list(VERSION_1_CAPABILITIES)
    assert config["process"]["cwd"] == "/" and config["hostname"] == "db"
    assert config["process"]["env"][0].startswith("PATH=")


def test_a_version_1_spec_with_a_version_2_field_is_refused() -> None:
    with pytest.raises(ValueError, match="user needs spec_version 2"):
        ContainerSpec(layers=(DIGEST,), args=("x",), user=ProcessUser(uid=1, gid=1))
