"""Shared fixtures. Lab tests need root, runc and CRIU: in CI (root) they always run."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import ferry
from tests.support.workload import build_rootfs

pytest_plugins = ["tests.support.budget"]


def _lab_capability_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network and mount namespaces"
    for tool in ("runc", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run `make setup`)"
    return None


@pytest.fixture(scope="session")
def lab_capable() -> None:
    """Lab tests run wherever they can; in CI a missing capability is a failure, not a skip."""
    missing = _lab_capability_missing()
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"lab tests must run in CI, but {missing}")
    pytest.skip(missing)


def new_lab_name() -> str:
    """A fresh lab per test module, so tests never share namespaces, buckets or ports."""
    return "t" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox + memapp: a root filesystem the CLI can copy to a host."""
    return build_rootfs(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture(scope="module")
def lab2(lab_capable: None) -> Iterator[str]:
    """A lab of two hosts, up for the whole module, torn down after it."""
    name = new_lab_name()
    up = ferry(name, "lab", "up", "--hosts", "2", timeout=180)
    assert up.code == 0, up.stderr
    yield name
    down = ferry(name, "lab", "down", timeout=180)
    assert down.code == 0, down.stderr
