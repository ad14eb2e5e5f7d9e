"""Which filesystem CRIU's cache directory is on, read from mountinfo."""

from __future__ import annotations

from pathlib import Path

from services.runtime.kdat import filesystem_of

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw,mode=755
41 22 0:40 / /run/ferry-criu rw shared:9 - tmpfs ferry-criu rw,size=1024k,mode=700
50 22 0:41 / /runx rw shared:10 - xfs /dev/vdb rw
"""
EXT4_RUN = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"


def test_the_deepest_mount_point_decides() -> None:
    assert filesystem_of(Path("/run/ferry-criu"), MOUNTINFO) == "tmpfs"
    assert filesystem_of(Path("/run/other"), MOUNTINFO) == "tmpfs"  # /run itself
    assert filesystem_of(Path("/runx/criu"), MOUNTINFO) == "xfs", "a prefix is not a parent"
    assert filesystem_of(Path("/run/ferry-criu"), EXT4_RUN) == "ext4"
