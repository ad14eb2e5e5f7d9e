"""The CLI's exit codes and one-line errors, for input rejected before any lab is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.errors import exit_code, one_line
from services.cli.main import main
from services.errors import Conflict, InvalidInput, NotFound, RuntimeFailure, Unavailable


@pytest.fixture(autouse=True)
def no_contexts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No context of the machine's or the user's may leak in: an empty config home."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("FERRY_CONTEXT", "FERRY_NATS_URL", "FERRY_LAB"):
        monkeypatch.delenv(var, raising=False)


def test_help_lists_the_lab_plugin_and_the_product_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for command in ("lab", "hosts", "containers", "migrate", "--context"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["lab", "up", "--hosts", "0"], "--hosts"),
        (["lab", "up", "--hosts", "many"], "--hosts"),
        (["lab", "up"], "--hosts"),
        (["container", "run", "--host", "h1", "--name", "x"], "--rootfs"),
        (
            ["container", "run", "--host", "h1", "--rootfs", "/", "--name", "x", "--memory", "-1"],
            "--memory",
        ),
        (["teleport"], "teleport"),
        (
            ["container", "run", "--host", "h1", "--name", "x", "--rootfs", "/", "--image", "a"],
            "--image",
        ),
        (["image", "build", "--name", "app"], "DIR"),
        (["image", "build", "/"], "--name"),
        (["image"], "image"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and mentions in err[0]


def test_a_bad_lab_name_is_bad_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FERRY_LAB", "Not A Lab")
    assert main(["hosts", "--json"]) == 2
    assert "FERRY_LAB" in capsys.readouterr().err


def test_no_lab_means_empty_lists(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FERRY_LAB", "nolabzz")
    assert main(["containers", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main(["hosts", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main(["image", "ls", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main(["status", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"


def test_error_classes_map_to_exit_codes() -> None:
    assert exit_code(InvalidInput("x")) == 2
    assert exit_code(NotFound("x")) == 2
    assert exit_code(Conflict("x")) == 2
    assert exit_code(Unavailable("x")) == 1
    assert exit_code(RuntimeFailure("x")) == 1
    assert one_line(InvalidInput("unknown host", field="--host")) == "ferry: --host: unknown host"


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["image", "build", "/", "--name", "Bad Name"], "--name"),
        (["image", "build", "/", "--name", "app", "--base", "Base"], "--base"),
        (["image", "build", "/nonexistent-dir", "--name", "app"], "DIR"),
        (["image", "pull", "Nope!"], "NAME"),
        (["image", "import", "/nonexistent", "--name", "app"], "PATH"),
        (["image", "import", "/", "--name", "Bad Name"], "--name"),
        (["image", "import", "/proc/self", "--name", "app"], "PATH"),
    ],
)
def test_bad_image_input_exits_2_before_any_lab_is_touched(
    argv: list[str],
    mentions: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FERRY_LAB", "nolabzz")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and mentions in err[0]


RUN = ["container", "run", "--host", "h1", "--name", "web", "--rootfs", "/"]


@pytest.mark.parametrize(
    ("options", "mentions"),
    [
        (["--user", "bad user"], "--user"),
        (["--user", "a:b:c"], "--user"),
        (["--workdir", "relative/dir"], "--workdir"),
        (["--env", "NOEQUALS"], "--env"),
        (["--env", "1BAD=x"], "--env"),
        (["--env-file", "/nonexistent"], "--env-file"),
        (["--label", "novalue"], "--label"),
        (["--label=-bad=x"], "--label"),
        (["--cap-add", "CAP_MAKE_COFFEE"], "--cap-add"),
        (["--cap-drop", "nope"], "--cap-drop"),
        (["--cap-add", "NET_ADMIN", "--cap-drop", "net_admin"], "--cap-add"),
        (["--cpus", "0"], "--cpus"),
        (["--cpus", "2000"], "--cpus"),
        (["--hostname", "not_a_host"], "--hostname"),
        (["--shm-size", "0"], "--shm-size"),
    ],
)
def test_bad_run_options_exit_2_naming_the_option_before_any_lab_is_touched(
    options: list[str],
    mentions: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FERRY_LAB", "nolabzz")
    assert main([*RUN, *options, "--", "/bin/true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and mentions in err[0], err
