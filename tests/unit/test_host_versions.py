"""What a host announces: versions read from the tools' own words, `unknown` for a tool that
cannot be asked, and a test's wire override honoured only where test faults are allowed."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from schemas.v1.versions import UNKNOWN, WIRE_MIN_VERSION, WIRE_VERSION
from services.errors import InvalidInput
from services.runtime import versions

CRIU_SAYS = "Version: 4.2.1\nGitID: v4.2.1-3-gdeadbee\n"
RUNC_SAYS = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\ngo: go1.19.8\n"


def test_versions_are_read_from_the_tools_own_words() -> None:
    assert versions.first_match(versions._CRIU_VERSION, CRIU_SAYS) == "4.2.1"
    assert versions.first_match(versions._RUNC_VERSION, RUNC_SAYS) == "1.1.5+ds1"
    assert versions.first_match(versions._RUNC_VERSION, "something else\n") == UNKNOWN


@pytest.mark.parametrize(("text", "expected"), [("2", (2, 2)), ("2:1", (2, 1)), ("3:3", (3, 3))])
def test_a_wire_override_is_n_or_n_colon_min(text: str, expected: tuple[int, int]) -> None:
    assert versions.parse_wire(text) == expected


@pytest.mark.parametrize("text", ["", "x", "1:2", "0", "2:0", "2:1:0"])
def test_a_malformed_wire_override_names_the_variable(text: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        versions.parse_wire(text)
    assert refused.value.field == "FERRY_WIRE_VERSION"


def test_the_override_counts_only_where_test_faults_are_allowed() -> None:
    own = (WIRE_VERSION, WIRE_MIN_VERSION)
    assert versions.wire_versions("", allowed=True) == own
    assert versions.wire_versions("3:2", allowed=False) == own
    assert versions.wire_versions("3:2", allowed=True) == (3, 2)
    assert versions.wire_versions("nonsense", allowed=True) == own  # said, and ignored


async def test_a_host_announces_what_it_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    criu, runc = tmp_path / "criu", tmp_path / "runc"
    criu.write_text(f"#!/bin/sh\nprintf '{CRIU_SAYS}'\n")
    runc.write_text("#!/bin/sh\nexit 3\n")  # a runc that fails: unknown, not an error
    for tool in (criu, runc):
        tool.chmod(0o755)
    monkeypatch.setattr(versions, "CRIU", str(criu))
    monkeypatch.setattr(versions, "RUNC", str(runc))
    monkeypatch.setenv("FERRY_ALLOW_FAULTS", "1")
    monkeypatch.setenv("FERRY_WIRE_VERSION", "2:1")
    said = await versions.host_versions()
    assert (said.wire, said.wire_min) == (2, 1)
    assert (said.criu, said.runc) == ("4.2.1", UNKNOWN)
    assert said.kernel == platform.release() and said.ferry != ""


async def test_a_missing_tool_is_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(versions, "CRIU", str(tmp_path / "no-criu"))
    monkeypatch.delenv("FERRY_ALLOW_FAULTS", raising=False)
    monkeypatch.setenv("FERRY_WIRE_VERSION", "3:3")
    said = await versions.host_versions()
    assert said.criu == UNKNOWN
    assert (said.wire, said.wire_min) == (WIRE_VERSION, WIRE_MIN_VERSION)
