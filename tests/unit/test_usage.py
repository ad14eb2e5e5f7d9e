"""Container usage for the heartbeat, read from cgroup files: a fake tree of each layout
(v2's one hierarchy, v1's memory and cpuacct ones), and this test process's real cgroup."""

from __future__ import annotations

import os
import time
from pathlib import Path

from services.runtime.usage import (
    CGROUP_ROOT,
    Hierarchies,
    UsageMeter,
    cpu_usec,
    memory_bytes,
    percent,
)

PARENT = "/ferry-lab/h1"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _v2(root: Path, name: str, memory: int, usec: int) -> None:
    cgroup = root / PARENT.strip("/") / name
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "memory.current").write_text(f"{memory}\n")
    (cgroup / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec {usec}\nsystem_usec 0\n")


def _v1(root: Path, name: str, memory: int, usec: int) -> None:
    mem = root / "memory" / PARENT.strip("/") / name
    cpu = root / "cpuacct" / PARENT.strip("/") / name
    for d in (mem, cpu):
        d.mkdir(parents=True, exist_ok=True)
    (mem / "memory.usage_in_bytes").write_text(f"{memory}\n")
    (cpu / "cpuacct.usage").write_text(f"{usec * 1000}\n")


def _v2_root(tmp_path: Path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    return tmp_path


def test_the_layouts_name_their_hierarchies(tmp_path: Path) -> None:
    v1 = Hierarchies.of(PARENT, tmp_path)
    assert v1 == Hierarchies(tmp_path / "memory/ferry-lab/h1", tmp_path / "cpuacct/ferry-lab/h1")
    v2 = Hierarchies.of(PARENT, _v2_root(tmp_path))
    assert v2.memory == v2.cpu == tmp_path / "ferry-lab/h1"


def test_cgroup_v2_usage_and_the_percent_over_the_interval(tmp_path: Path) -> None:
    root, clock = _v2_root(tmp_path), Clock()
    _v2(root, "web", 50 << 20, 1_000_000)
    _v2(root, "db", 200 << 20, 5_000_000)
    meter = UsageMeter(Hierarchies.of(PARENT, root), clock)
    first = meter.sample()
    assert first is not None
    assert [(c.name, c.memory_bytes, c.cpu_usec, c.cpu_percent) for c in first.containers] == [
        ("db", 200 << 20, 5_000_000, None),
        ("web", 50 << 20, 1_000_000, None),
    ], "no percent without a previous sample"
    assert (first.memory_bytes, first.cpu_percent) == (250 << 20, 0.0)
    clock.now += 2.0
    _v2(root, "web", 60 << 20, 1_500_000)  # half a second of CPU in two: 25 %
    _v2(root, "db", 200 << 20, 9_000_000)  # four seconds in two: two CPUs busy
    second = meter.sample()
    assert second is not None
    assert {c.name: c.cpu_percent for c in second.containers} == {"db": 200.0, "web": 25.0}
    assert (second.memory_bytes, second.cpu_percent) == (260 << 20, 225.0)


def test_cgroup_v1_reads_memory_and_cpuacct_from_their_own_hierarchies(tmp_path: Path) -> None:
    clock = Clock()
    _v1(tmp_path, "web", 7 << 20, 2_000_000)
    meter = UsageMeter(Hierarchies.of(PARENT, tmp_path), clock)
    assert meter.sample() is not None
    clock.now += 1.0
    _v1(tmp_path, "web", 8 << 20, 2_100_000)
    usage = meter.sample()
    assert usage is not None
    (web,) = usage.containers
    assert (web.memory_bytes, web.cpu_usec, web.cpu_percent) == (8 << 20, 2_100_000, 10.0)


def test_vanished_and_foreign_cgroups_are_left_out_silently(tmp_path: Path) -> None:
    root, clock = _v2_root(tmp_path), Clock()
    _v2(root, "web", 1 << 20, 10)
    _v2(root, "half", 1 << 20, 10)
    (root / PARENT.strip("/") / "half" / "cpu.stat").unlink()  # removed while being read
    (root / PARENT.strip("/") / "half" / "memory.current").unlink()
    (root / PARENT.strip("/") / "cgroup.procs").write_text("")  # the parent's own files
    (root / PARENT.strip("/") / "Not-A-Name").mkdir()
    usage = UsageMeter(Hierarchies.of(PARENT, root), clock).sample()
    assert usage is not None
    assert [c.name for c in usage.containers] == ["web"]


def test_a_host_without_containers_yet_uses_nothing(tmp_path: Path) -> None:
    usage = UsageMeter(Hierarchies.of(PARENT, tmp_path)).sample()
    assert usage is not None
    assert (usage.memory_bytes, usage.cpu_percent, usage.containers) == (0, 0.0, ())


def test_a_counter_that_went_back_is_a_new_cgroup_not_negative_use(tmp_path: Path) -> None:
    root, clock = _v2_root(tmp_path), Clock()
    _v2(root, "web", 1 << 20, 9_000_000)
    meter = UsageMeter(Hierarchies.of(PARENT, root), clock)
    meter.sample()
    clock.now += 1.0
    _v2(root, "web", 1 << 20, 100)  # restored here under the same name: counting from 0
    usage = meter.sample()
    assert usage is not None
    assert usage.containers[0].cpu_percent is None
    assert percent(1_000_000, 0.0) is None


def test_an_unreadable_tree_is_no_usage_never_an_error(tmp_path: Path) -> None:
    root = _v2_root(tmp_path)
    _v2(root, "web", 1 << 20, 10)
    meter = UsageMeter(Hierarchies.of(PARENT, root))
    meter.hierarchies = None  # type: ignore[assignment]  # anything at all going wrong
    assert meter.sample() is None


def _own_cgroups() -> dict[str, Path]:
    """This process's cgroup in each hierarchy, by controller ("" for v2's)."""
    found = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = Path(path.lstrip("/"))
    return found


def test_this_processs_own_cgroup_is_read() -> None:
    own = _own_cgroups()
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        memory = cpu = CGROUP_ROOT / own[""]
    else:
        memory, cpu = (
            CGROUP_ROOT / "memory" / own["memory"],
            CGROUP_ROOT / "cpuacct" / own["cpuacct"],
        )
    assert memory_bytes(memory) > 0
    before = cpu_usec(cpu)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # 50 ms of CPU in this process
        pass
    assert cpu_usec(cpu) - before >= 40_000, f"pid {os.getpid()} used CPU in {cpu}"
