"""Containers as people run them, on one two-host lab.

An OCI image built by umoci, imported, run as its own non-root user with run options, and
moved: every option is judged from the kernel's view of the process (its /proc status, cwd,
environ, cgroup, UTS namespace), on the first host and again after the move. Then what CRIU
cannot move is refused before the freeze (an io_uring), and what it needs a flag for (a file
lock) moves with the lock still held.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import ferry
from tests.support.lab_checks import runc_pid

pytestmark = pytest.mark.lab

NAME = "ociapp"
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/data:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nextra:x:2000:app\n"
CAP_NET_BIND_SERVICE = 1 << 10


def _umoci(*argv: str, cwd: Path) -> None:
    subprocess.run(["umoci", *argv], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox with a user `app` (1000, also in group `extra`), as a two-layer image whose
    second layer deletes a file of the first; it runs `sleep` as app in /data."""
    top = tmp_path_factory.mktemp("oci")
    _umoci("init", "--layout", "img", cwd=top)
    _umoci("new", "--image", "img:app", cwd=top)
    _umoci("unpack", "--image", "img:app", "bundle", cwd=top)
    rootfs = top / "bundle" / "rootfs"
    for d in ("bin", "etc", "tmp", "data"):
        (rootfs / d).mkdir()
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sleep").symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(PASSWD)
    (rootfs / "etc" / "group").write_text(GROUP)
    (rootfs / "etc" / "obsolete").write_text("deleted by the next layer\n")
    (rootfs / "tmp").chmod(0o1777)
    _umoci("repack", "--image", "img:app", "bundle", cwd=top)
    shutil.rmtree(top / "bundle")
    _umoci("unpack", "--image", "img:app", "bundle", cwd=top)
    (rootfs / "etc" / "obsolete").unlink()
    _umoci("repack", "--image", "img:app", "bundle", cwd=top)
    _umoci(
        "config", "--image", "img:app", "--config.user", "app", "--config.env", "FROM_IMAGE=1",
        "--config.workingdir", "/data", "--config.entrypoint", "/bin/busybox",
        "--config.cmd", "sleep", "--config.cmd", "100000", "--config.label", "source=umoci",
        cwd=top,
    )  # fmt: skip
    return top / "img"


def _seen(pid: int) -> dict[str, Any]:
    """The process as the kernel sees it."""
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    cpu = next(
        line.split(":", 2)[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if re.match(r"^\d+:[^:]*\bcpu\b", line)
    )
    quota = Path(f"/sys/fs/cgroup/cpu{cpu}/cpu.cfs_quota_us").read_text().strip()
    hostname = subprocess.run(
        ["nsenter", "-t", str(pid), "-u", "--", "hostname"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "uid": status["Uid"].split()[0],
        "gid": status["Gid"].split()[0],
        "groups": status["Groups"].split(),
        "cap_bounding": int(status["CapBnd"], 16),
        "cap_effective": int(status["CapEff"], 16),
        "cwd": Path(f"/proc/{pid}/cwd").readlink().name,
        "env": sorted(e for e in environ if e),
        "cfs_quota_us": quota,
        "hostname": hostname,
    }


def test_an_imported_image_runs_as_its_user_with_its_options_and_moves_so(
    lab2: str, layout: Path
) -> None:
    imported = ferry(lab2, "image", "import", str(layout), "--name", "app", "--json")
    assert imported.code == 0, imported.stderr
    image = imported.json()
    assert len(image["layers"]) == 2 and image["whiteouts"] == 1
    assert image["config"]["user"] == "app" and image["config"]["working_dir"] == "/data"

    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", NAME, "--image", "app",
        "--env", "EXTRA=2", "--hostname", "box", "--cpus", "0.5", "--label", "role=test",
        "--cap-drop", "ALL", "--cap-add", "net_bind_service",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    expected = {
        "uid": "1000",
        "gid": "1000",
        "groups": ["2000"],
        "cap_bounding": CAP_NET_BIND_SERVICE,
        "cap_effective": 0,  # a non-root user keeps none after execve, as in Docker
        "cwd": "data",
        "env": sorted(  # HOME: runc sets it from the image's /etc/passwd, as Docker does
            [
                "EXTRA=2",
                "FROM_IMAGE=1",
                "HOME=/data",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ]
        ),
        "cfs_quota_us": "50000",
        "hostname": "box",
    }
    assert _seen(runc_pid(lab2, "h1", NAME)) == expected

    inspected = json.loads(ferry(lab2, "container", "inspect", NAME, check=True).stdout)
    spec = inspected["spec"]
    assert spec["spec_version"] == 2 and inspected["host"] == "h1"
    assert spec["user"] == {"uid": 1000, "gid": 1000, "additional_gids": [2000], "asked": "app"}
    assert spec["args"] == ["/bin/busybox", "sleep", "100000"]
    assert spec["labels"] == {"source": "umoci", "role": "test"}
    assert spec["capabilities"] == ["CAP_NET_BIND_SERVICE"]

    moved = ferry(
        lab2, "migrate", NAME, "--to", "h2", "--strategy", "stop-and-copy", "--json",
        timeout=300,
    )  # fmt: skip
    assert moved.code == 0, moved.stderr
    assert moved.json()["state"] == "completed"
    assert _seen(runc_pid(lab2, "h2", NAME)) == expected
    assert ferry(lab2, "container", "rm", NAME).code == 0


def test_a_user_the_image_does_not_know_is_refused_and_leaves_nothing(lab2: str) -> None:
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "nouser", "--image", "app",
        "--user", "postgres",
    )  # fmt: skip
    assert run.code == 2, run.stderr
    assert "no user 'postgres' in the image's /etc/passwd" in run.stderr
    listed = ferry(lab2, "containers", "--json", check=True).json()
    assert "nouser" not in [row["name"] for row in listed]


def test_an_io_uring_is_refused_before_the_freeze_naming_cause_and_fix(
    lab2: str, rootfs: Path
) -> None:
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "uring", "--rootfs", str(rootfs),
        "--", "/bin/holdapp", "io_uring",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    pid = runc_pid(lab2, "h1", "uring")
    checked = ferry(lab2, "migrate", "uring", "--to", "h2", "--dry-run", "--json")
    assert checked.code != 0 and "io_uring" in checked.stdout + checked.stderr
    moved = ferry(lab2, "migrate", "uring", "--to", "h2", "--json", timeout=300)
    assert moved.code != 0
    record = moved.json()
    assert record["state"] == "failed" or record["state"] == "rolled_back", record
    assert "io_uring" in record["error"] and "CRIU 4.2.1 cannot dump" in record["error"]
    dumps = [step for step in record["steps"] if step["name"] == "dump"]
    assert all(step["attempts"] == 0 for step in dumps), "refused before the freeze"
    assert runc_pid(lab2, "h1", "uring") == pid, "it never stopped running on h1"
    assert ferry(lab2, "container", "rm", "uring").code == 0


def test_a_held_file_lock_moves_with_the_container(lab2: str, rootfs: Path) -> None:
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "locker", "--rootfs", str(rootfs),
        "--", "/bin/holdapp", "flock", "/tmp/held.lock",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    moved = ferry(
        lab2, "migrate", "locker", "--to", "h2", "--strategy", "stop-and-copy", "--json",
        timeout=300,
    )  # fmt: skip
    assert moved.code == 0, moved.stderr
    pid = runc_pid(lab2, "h2", "locker")
    fdinfo = [p.read_text() for p in Path(f"/proc/{pid}/fdinfo").iterdir()]
    assert any("FLOCK" in info and "WRITE" in info for info in fdinfo), fdinfo
    assert ferry(lab2, "container", "rm", "locker").code == 0


def test_an_image_in_use_stays_and_a_free_one_leaves_the_store(lab2: str, layout: Path) -> None:
    assert ferry(lab2, "image", "import", str(layout), "--name", "gcimg").code == 0
    run = ferry(lab2, "container", "run", "--host", "h1", "--name", "gcuser", "--image", "gcimg")
    assert run.code == 0, run.stderr
    refused = ferry(lab2, "image", "rm", "gcimg")
    assert refused.code == 2 and "used by gcuser" in refused.stderr
    assert "gcimg" in {row["name"] for row in ferry(lab2, "image", "ls", "--json").json()}

    assert ferry(lab2, "container", "rm", "gcuser").code == 0
    removed = ferry(lab2, "image", "rm", "gcimg", "--json")
    assert removed.code == 0, removed.stderr
    done = removed.json()
    listed = ferry(lab2, "image", "ls", "--json").json()
    assert "gcimg" not in {row["name"] for row in listed}
    still_named = {layer["digest"] for row in listed for layer in row["layers"]}
    assert set(done["layers_kept"]) <= still_named  # kept only for another image
    assert not set(done["layers_removed"]) & still_named
    assert len(done["layers_removed"]) + len(done["layers_kept"]) == 2
