"""Iterative pre-copy: the decision from CRIU's statistics, and the command lines that feed it.

This kernel has no soft-dirty tracking, so pre-dumps cannot run here (machine facts F3). The logic
is therefore checked on two kinds of statistics, never mixed up:
- REAL: `data/precopy/stats-dump.*` are CRIU 4.2.1's own stats-dump files from full dumps of
  a small Python process made on this machine (`criu dump -t PID --leave-running`): one to
  disk (8 MiB allocated), one through `criu page-server` on 127.0.0.1 (24 MiB allocated).
- SYNTHETIC: pre-dump sequences computed from a writer's dirty rate and a link's bandwidth;
  every name that uses them says "synthetic".
The feature check and the command lines are also run against the real CRIU and runc.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import shutil
import socket
import subprocess
from pathlib import Path

import pycriu
import pytest

from services.runtime import cmdlines, criu
from services.runtime.cmdlines import CRIU_CHAIN_FLAGS
from services.runtime.precopy import (
    PrecopyLayout,
    final_dump_argv,
    mem_dirty_track_available,
    page_server_argv,
    pre_dump_argv,
)
from services.runtime.runc import Runc
from workflows.precopy import (
    MIB,
    PAGE_SIZE,
    IterationStats,
    PrecopyDecision,
    PrecopyPlan,
    StatsMissing,
    decide,
)

DATA = Path(__file__).parent / "data" / "precopy"
REAL_DISK = DATA / "stats-dump.disk-8mib"
REAL_PAGE_SERVER = DATA / "stats-dump.page-server-24mib"


# ---- helpers ---------------------------------------------------------------------------


def real_stats(path: Path) -> IterationStats:
    """A REAL stats-dump, decoded the way the task asks: with pycriu.images.load."""
    with path.open("rb") as f:
        image = pycriu.images.load(f)
    assert image["magic"] == "STATS"
    return IterationStats.from_criu(image["entries"][0]["dump"])


def synthetic_iteration(dirty_mib: float, link_mib_s: float, frozen_ms: int = 20) -> IterationStats:
    """SYNTHETIC: one pre-dump that sent `dirty_mib` over a `link_mib_s` link."""
    pages = round(dirty_mib * MIB / PAGE_SIZE)
    send_us = round(pages * PAGE_SIZE / (link_mib_s * MIB) * 1e6)
    return IterationStats(
        pages_scanned=max(pages, 65536),
        pages_written=pages,
        freezing_us=500,
        frozen_us=frozen_ms * 1000,
        memdump_us=frozen_ms * 500,
        memwrite_us=send_us,
    )


def synthetic_precopy(
    plan: PrecopyPlan,
    *,
    memory_mib: float,
    writer_mib_s: float,
    link_mib_s: float,
    working_set_mib: float | None = None,
) -> list[tuple[IterationStats, PrecopyDecision]]:
    """SYNTHETIC run: a writer dirties `writer_mib_s` (within its working set) while each
    pre-dump's pages cross a `link_mib_s` link; iterate until `decide` says final."""
    working_set = memory_mib if working_set_mib is None else working_set_mib
    history: list[IterationStats] = []
    steps: list[tuple[IterationStats, PrecopyDecision]] = []
    to_send = memory_mib  # the first pre-dump copies everything
    for _ in range(100):
        iteration = synthetic_iteration(to_send, link_mib_s)
        history.append(iteration)
        decision = decide(history, plan)
        steps.append((iteration, decision))
        if decision.final:
            return steps
        to_send = min(working_set, writer_mib_s * iteration.send_seconds)
    raise AssertionError("decide never chose the final dump")


def kernel_shows_soft_dirty() -> bool:
    """Independent of CRIU: does a freshly written page carry the soft-dirty bit (pagemap 55)?"""
    Path("/proc/self/clear_refs").write_text("4")
    page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        page[0] = 1
        view = ctypes.c_char.from_buffer(page)
        address = ctypes.addressof(view)
        del view
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(address // PAGE_SIZE * 8)
            entry = int.from_bytes(pagemap.read(8), "little")
    finally:
        page.close()
    assert entry >> 63 & 1, "the probe page must be present"
    return bool(entry >> 55 & 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def real_criu() -> None:
    """Real CRIU needs root and the binary; in CI a missing one is a failure, not a skip."""
    missing = None
    if os.geteuid() != 0:
        missing = "needs root: CRIU wants CAP_SYS_ADMIN"
    elif not os.access(criu.CRIU, os.X_OK):
        missing = f"{criu.CRIU} is not installed (run `make setup`)"
    elif shutil.which("runc") is None:
        missing = "runc is not installed (run `make setup`)"
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(missing)
    pytest.skip(missing)


# ---- REAL statistics -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (REAL_DISK, IterationStats(3874, 3776, 128, 27906, 19798, 17487)),
        (REAL_PAGE_SERVER, IterationStats(7971, 7872, 123, 256855, 39103, 36075)),
    ],
    ids=["disk", "page-server"],
)
def test_real_stats_dump_decodes_into_iteration_stats(path: Path, expected: IterationStats) -> None:
    stats = real_stats(path)
    assert stats == expected
    # The adapter the workers already use gives the same thing.
    assert IterationStats.from_criu(criu.load_stats(path)) == stats
    assert stats.pages_written <= stats.pages_scanned
    # A full dump sends its pages while frozen, inside the memory dump (a pre-dump after the thaw).
    assert 0 < stats.memwrite_us <= stats.memdump_us <= stats.frozen_us
    assert stats.dirty_bytes == stats.pages_written * 4096


def test_real_page_server_dump_as_the_last_iteration_converges_within_300_ms() -> None:
    decision = decide([real_stats(REAL_PAGE_SERVER)], PrecopyPlan(downtime_budget_ms=300))
    assert decision.final and decision.rule == "converged"
    # 7872 pages in 36.075 ms over loopback: 30.8 MiB at 852 MiB/s.
    assert decision.reason == "converged: 30.8 MiB dirty ≤ 852 MiB/s × 300 ms"
    assert decision.remaining_bytes == 7872 * 4096
    assert decision.bandwidth_bps == pytest.approx(7872 * 4096 / 0.036075)
    assert decision.expected_downtime_ms == pytest.approx(256.855 + 36.075, abs=0.1)


def test_real_page_server_dump_does_not_fit_a_budget_shorter_than_its_send_time() -> None:
    decision = decide([real_stats(REAL_PAGE_SERVER)], PrecopyPlan(downtime_budget_ms=30))
    assert decision.action == "continue"
    assert decision.reason == "continue: 30.8 MiB dirty > 852 MiB/s × 30 ms"


def test_real_disk_dump_after_a_synthetic_full_copy_ends_the_precopy() -> None:
    """SYNTHETIC first pre-dump of 256 MiB, then the REAL 8 MiB process's dump as the last."""
    history = [synthetic_iteration(256, link_mib_s=100), real_stats(REAL_DISK)]
    decision = decide(history, PrecopyPlan(downtime_budget_ms=100))
    assert decision.final and decision.rule == "converged"
    assert decision.reason.startswith("converged: 14.8 MiB dirty ≤ ")
    assert decision.iterations == 2


def test_empty_stats_are_refused_rather_than_read_as_nothing_dirty() -> None:
    # criu.load_stats returns {} when stats-dump is unreadable: that must not mean "0 pages".
    with pytest.raises(StatsMissing, match="pages_scanned"):
        IterationStats.from_criu({})
    real = pycriu.images.load(REAL_DISK.open("rb"))["entries"][0]["dump"]
    del real["memwrite_time"]
    with pytest.raises(StatsMissing, match="memwrite_time"):
        IterationStats.from_criu(real)


# ---- SYNTHETIC sequences ---------------------------------------------------------------


def test_synthetic_converging_writer_switches_once_the_dirty_set_fits_the_budget() -> None:
    """SYNTHETIC: 256 MiB, writer 20 MiB/s, link 100 MiB/s: the dirty set shrinks ×0.2."""
    steps = synthetic_precopy(
        PrecopyPlan(downtime_budget_ms=300), memory_mib=256, writer_mib_s=20, link_mib_s=100
    )
    decisions = [d for _, d in steps]
    assert [d.action for d in decisions] == ["continue", "continue", "final"]
    dirty = [it.dirty_bytes for it, _ in steps]
    assert dirty == sorted(dirty, reverse=True) and dirty[-1] < dirty[0] / 20
    assert decisions[0].reason == "continue: 256.0 MiB dirty > 100 MiB/s × 300 ms"
    last = decisions[-1]
    assert last.rule == "converged"
    assert last.reason == "converged: 10.2 MiB dirty ≤ 100 MiB/s × 300 ms"
    assert last.expected_downtime_ms is not None and last.expected_downtime_ms < 300


def test_synthetic_writer_faster_than_the_link_stops_as_not_converging() -> None:
    """SYNTHETIC: writer 150 MiB/s over a 64 MiB working set, link 100 MiB/s."""
    steps = synthetic_precopy(
        PrecopyPlan(downtime_budget_ms=300),
        memory_mib=256,
        writer_mib_s=150,
        link_mib_s=100,
        working_set_mib=64,
    )
    decisions = [d for _, d in steps]
    assert [d.action for d in decisions] == ["continue", "continue", "final"]
    last = decisions[-1]
    assert last.rule == "not_converging"
    assert last.reason == (
        "not converging: dirty set shrank only 0% (64.0 MiB → 64.0 MiB; needs 10%);"
        " 64.0 MiB dirty > 100 MiB/s × 300 ms"
    )
    # It goes final anyway, and says the freeze will overrun the budget.
    assert last.expected_downtime_ms is not None and last.expected_downtime_ms > 600


def test_synthetic_growing_dirty_set_is_reported_as_growth() -> None:
    """SYNTHETIC: a dirty set that grew 40 → 48 MiB between iterations."""
    history = [synthetic_iteration(40, 100), synthetic_iteration(48, 100)]
    decision = decide(history, PrecopyPlan(downtime_budget_ms=100))
    assert decision.rule == "not_converging"
    assert decision.reason.startswith("not converging: dirty set grew 20% (40.0 MiB → 48.0 MiB")


def test_synthetic_slow_convergence_stops_at_the_iteration_cap() -> None:
    """SYNTHETIC: writer 85 MiB/s, link 100 MiB/s: shrinks 15% each time, never fits 300 ms."""
    steps = synthetic_precopy(
        PrecopyPlan(downtime_budget_ms=300), memory_mib=256, writer_mib_s=85, link_mib_s=100
    )
    decisions = [d for _, d in steps]
    assert len(decisions) == 8
    assert all(d.action == "continue" for d in decisions[:-1])
    assert decisions[-1].rule == "iteration_cap"
    assert decisions[-1].reason.startswith("iteration cap 8 reached; ")
    shorter = synthetic_precopy(
        PrecopyPlan(downtime_budget_ms=300, max_iterations=3),
        memory_mib=256,
        writer_mib_s=85,
        link_mib_s=100,
    )
    assert len(shorter) == 3 and shorter[-1][1].reason.startswith("iteration cap 3 reached")


def test_shrinking_by_exactly_the_minimum_is_progress_and_just_under_is_not() -> None:
    """SYNTHETIC: 10000 pages, then 9000 (10%) or 9001 (9.99%), far from the budget."""
    first = IterationStats(10000, 10000, 100, 1000, 500, 4_000_000)

    def then(pages: int) -> PrecopyDecision:
        second = IterationStats(10000, pages, 100, 1000, 500, 4_000_000)
        return decide([first, second], PrecopyPlan(downtime_budget_ms=100))

    assert then(9000).action == "continue"
    stopped = then(9001)
    assert stopped.rule == "not_converging"
    assert "shrank only 9.9%" in stopped.reason  # rounded down: it did not reach 10%


def test_zero_send_time_gives_no_bandwidth_and_no_false_convergence() -> None:
    """SYNTHETIC: pages written but no send time recorded (too fast for CRIU's clock)."""
    unmeasured = IterationStats(5000, 5000, 100, 1000, 500, 0)
    decision = decide([unmeasured], PrecopyPlan(downtime_budget_ms=300))
    assert decision.action == "continue"
    assert decision.bandwidth_bps is None and decision.expected_downtime_ms is None
    assert "bandwidth not measured" in decision.reason
    # The cap still ends it.
    capped = decide([unmeasured], PrecopyPlan(downtime_budget_ms=300, max_iterations=1))
    assert capped.rule == "iteration_cap"
    assert capped.reason.startswith("iteration cap 1 reached; bandwidth not measured")


def test_zero_send_time_falls_back_to_the_previous_bandwidth() -> None:
    """SYNTHETIC: a 100 MiB/s iteration, then one whose send time was not recorded."""
    history = [synthetic_iteration(64, 100), IterationStats(5000, 2560, 100, 1000, 500, 0)]
    decision = decide(history, PrecopyPlan(downtime_budget_ms=300))
    assert decision.bandwidth_bps == pytest.approx(100 * MIB, rel=1e-3)
    assert decision.reason == "converged: 10.0 MiB dirty ≤ 100 MiB/s × 300 ms"


def test_nothing_dirty_is_final_even_without_a_bandwidth() -> None:
    """SYNTHETIC: the last pre-dump found no dirty page at all."""
    decision = decide([IterationStats(5000, 0, 100, 1000, 0, 0)], PrecopyPlan(100))
    assert decision.final and decision.reason == "converged: nothing left dirty"


def test_budget_edge_equality_switches_and_one_microsecond_more_does_not() -> None:
    """SYNTHETIC: 30 MiB sent in exactly 1 s against a 1000 ms budget."""
    plan = PrecopyPlan(downtime_budget_ms=1000)
    exact = decide([IterationStats(7680, 7680, 100, 1000, 500, 1_000_000)], plan)
    assert exact.final and exact.reason == "converged: 30.0 MiB dirty ≤ 30 MiB/s × 1000 ms"
    slower = decide([IterationStats(7680, 7680, 100, 1000, 500, 1_000_001)], plan)
    assert slower.action == "continue"
    tighter = decide([IterationStats(7680, 7680, 100, 1000, 500, 1_000_000)], PrecopyPlan(999))
    assert tighter.action == "continue"


def test_no_history_means_the_first_pre_dump() -> None:
    decision = decide([], PrecopyPlan(downtime_budget_ms=300))
    assert decision.action == "continue" and decision.rule == "first"
    assert decision.remaining_bytes is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"downtime_budget_ms": 0},
        {"downtime_budget_ms": 300, "max_iterations": 0},
        {"downtime_budget_ms": 300, "min_shrink_percent": 100},
    ],
)
def test_a_plan_that_could_never_finish_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        PrecopyPlan(**kwargs)


# ---- command lines ---------------------------------------------------------------------


def _value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} once in {argv}"
    return argv[argv.index(flag) + 1]


@pytest.fixture
def layout(tmp_path: Path) -> PrecopyLayout:
    return PrecopyLayout(tmp_path / "migrations" / "m1")


RUNC = Runc(Path("/run/ferry/h1/runc"), binary="runc")
PAGE_SERVER = "10.88.0.2:40123"


def test_first_pre_dump_has_no_parent(layout: PrecopyLayout, tmp_path: Path) -> None:
    argv = pre_dump_argv(RUNC, "web", layout, 1, PAGE_SERVER, log_file=tmp_path / "runc.log")
    assert argv[:5] == ["runc", "--root", "/run/ferry/h1/runc", "--criu", criu.CRIU]
    assert argv[argv.index("checkpoint") + 1] == "--pre-dump"
    assert "--parent-path" not in argv
    assert _value(argv, "--image-path") == _value(argv, "--work-path") == str(layout.root / "it-1")
    assert _value(argv, "--page-server") == PAGE_SERVER
    assert "--tcp-established" in argv and _value(argv, "--manage-cgroups-mode") == "soft"
    assert argv[-1] == "web"


def test_third_pre_dump_points_at_the_second(layout: PrecopyLayout, tmp_path: Path) -> None:
    argv = pre_dump_argv(RUNC, "web", layout, 3, PAGE_SERVER, log_file=tmp_path / "runc.log")
    assert "--pre-dump" in argv
    assert _value(argv, "--parent-path") == "../it-2"
    images = Path(_value(argv, "--image-path"))
    assert images == layout.iteration(3)
    # runc resolves --parent-path against --image-path and insists it is relative.
    assert os.path.normpath(images / "../it-2") == str(layout.iteration(2))
    assert _value(argv, "--page-server") == PAGE_SERVER and "--tcp-established" in argv


def test_final_dump_points_at_the_last_iteration(layout: PrecopyLayout, tmp_path: Path) -> None:
    argv = final_dump_argv(RUNC, "web", layout, 5, PAGE_SERVER, log_file=tmp_path / "runc.log")
    assert "--pre-dump" not in argv and "--leave-running" not in argv
    images = Path(_value(argv, "--image-path"))
    assert images == layout.final == layout.root / "images"
    assert os.path.normpath(images / _value(argv, "--parent-path")) == str(layout.iteration(5))
    assert _value(argv, "--page-server") == PAGE_SERVER and "--tcp-established" in argv
    assert argv[-1] == "web"


def test_every_dump_uses_the_stop_and_copy_criu_flags(layout: PrecopyLayout) -> None:
    log = layout.root / "runc.log"
    for argv in (
        pre_dump_argv(RUNC, "web", layout, 1, PAGE_SERVER, log_file=log),
        pre_dump_argv(RUNC, "web", layout, 2, PAGE_SERVER, log_file=log),
        final_dump_argv(RUNC, "web", layout, 2, PAGE_SERVER, log_file=log),
    ):
        assert argv[-1 - len(CRIU_CHAIN_FLAGS) : -1] == list(CRIU_CHAIN_FLAGS)


def test_page_server_links_the_previous_iteration_only_when_there_is_one(
    layout: PrecopyLayout,
) -> None:
    first = page_server_argv(
        layout.iteration(1), "10.88.0.2", 40123, status_fd=7, parent=layout.parent_of(1)
    )
    assert "--prev-images-dir" not in first
    third = page_server_argv(
        layout.iteration(3), "10.88.0.2", 40123, status_fd=7, parent=layout.parent_of(3)
    )
    assert third[:2] == [criu.CRIU, "page-server"]
    assert _value(third, "--prev-images-dir") == "../it-2"
    assert _value(third, "--images-dir") == _value(third, "--work-dir") == str(layout.iteration(3))
    assert _value(third, "--address") == "10.88.0.2" and _value(third, "--port") == "40123"
    assert _value(third, "--status-fd") == "7"
    final = page_server_argv(
        layout.final, "10.88.0.2", 40123, status_fd=7, parent=layout.final_parent(3)
    )
    assert _value(final, "--prev-images-dir") == "../it-3"


def test_iterations_count_from_one(layout: PrecopyLayout) -> None:
    with pytest.raises(ValueError):
        layout.iteration(0)


def test_runc_accepts_the_pre_dump_and_final_dump_flags(real_criu: None, tmp_path: Path) -> None:
    """runc 1.1.5 parses our flags and only then fails to find the (absent) container."""
    runc = Runc(tmp_path / "runc-root")
    runc.root.mkdir()
    layout = PrecopyLayout(tmp_path / "m")
    log = tmp_path / "runc.log"
    for argv in (
        pre_dump_argv(runc, "absent", layout, 2, "127.0.0.1:1", log_file=log),
        final_dump_argv(runc, "absent", layout, 2, "127.0.0.1:1", log_file=log),
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode != 0
        assert "container does not exist" in done.stderr, done.stderr
        assert "flag provided but not defined" not in done.stderr


def test_real_page_server_starts_with_a_parent_and_links_it(
    real_criu: None, tmp_path: Path
) -> None:
    """CRIU 4.2.1 takes --prev-images-dir on page-server and links `parent` for the dumper."""
    layout = PrecopyLayout(tmp_path / "m")
    layout.iteration(1).mkdir(parents=True)
    layout.iteration(2).mkdir()
    read_end, write_end = os.pipe()
    argv = page_server_argv(
        layout.iteration(2), "127.0.0.1", free_port(), status_fd=write_end, parent="../it-1"
    )
    server = subprocess.Popen(argv, pass_fds=(write_end,), stdin=subprocess.DEVNULL)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready, "page server did not report ready within 10 s"
        assert os.read(read_end, 1) == b"\0", criu.tail(layout.iteration(2) / "page-server.log")
        assert os.readlink(layout.iteration(2) / "parent") == "../it-1"
    finally:
        os.close(read_end)
        server.kill()
        server.wait()


# ---- the feature check, for real -------------------------------------------------------


async def test_feature_check_agrees_with_the_kernels_soft_dirty_bit(real_criu: None) -> None:
    available, reason = await mem_dirty_track_available()
    assert available == kernel_shows_soft_dirty(), reason
    assert "mem_dirty_track" in reason


@pytest.mark.skipif(
    Path("/proc/self/clear_refs").exists() and kernel_shows_soft_dirty(),
    reason="this kernel tracks soft-dirty pages: pre-copy is available here",
)
async def test_without_soft_dirty_pre_copy_is_refused_with_criu_s_reason(
    real_criu: None,
) -> None:
    available, reason = await mem_dirty_track_available()
    assert available is False
    assert "soft-dirty" in reason and "CONFIG_MEM_SOFT_DIRTY" in reason
    assert "criu check --feature mem_dirty_track" in reason
    assert '"Dirty tracking is OFF. Memory snapshot will not work."' in reason  # CRIU's words
    assert "cr-check.c" not in reason  # without CRIU's source-location prefix


@pytest.mark.parametrize(
    ("binary", "expected"),
    [
        ("/nonexistent/criu", "criu check --feature mem_dirty_track could not run: "),
        ("/bin/false", "criu check --feature mem_dirty_track exited 1: no output"),
    ],
    ids=["missing", "fails-silently"],
)
async def test_a_check_that_cannot_say_blames_no_kernel_feature(
    binary: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRIU that is absent or fails for another reason is reported as such, not as soft-dirty."""
    monkeypatch.setattr(cmdlines, "CRIU", binary)  # where every command line takes it from
    available, reason = await mem_dirty_track_available()
    assert available is False
    assert reason.startswith(expected) and "soft-dirty" not in reason
