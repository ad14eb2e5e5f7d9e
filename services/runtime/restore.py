"""`runc restore` as both sides run it: the destination after a move, the source when it
takes its container back from its own images."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from services.errors import RuntimeFailure
from services.runtime import bundle, cmdlines, criu, spans
from services.runtime import paths as layout
from services.runtime.containers import ContainerPaths
from services.runtime.paths import MigrationPaths
from services.runtime.proc import spawn, wait_owned
from services.runtime.runc import Runc, log_errors


async def restore_container(
    runc: Runc,
    name: str,
    paths: MigrationPaths,
    cpaths: ContainerPaths,
    stdio: int,
    *,
    lazy: bool = False,
    check_running: bool = True,
) -> None:
    """Restore `name` from this migration's images into its bundle; it must stay running
    (checked here unless the caller checks it next). With `lazy`, a lazy-pages daemon
    serves its memory (already started). `stdio`: the write end of its new logger's pipe
    (the process's stdout and stderr, where it had a pipe there); closed here."""
    with spans.tracer.start_as_current_span("criu.restore") as span:
        try:
            await _run_restore(
                runc, name, paths, cpaths, stdio, lazy=lazy, check_running=check_running
            )
        except RuntimeFailure as failure:
            spans.fail(span, failure)
            raise
        except asyncio.CancelledError:
            if lazy:  # it would serve a half-restored container: it goes with runc and CRIU
                _kill_background(paths, layout.LAZY_PAGES)
            raise
        stats = criu.load_stats(paths.stats_restore)
        span.set_attribute("criu.restore_time_us", stats.get("restore_time", 0))
        span.set_attribute("criu.pages_restored", stats.get("pages_restored", 0))


async def _run_restore(
    runc: Runc,
    name: str,
    paths: MigrationPaths,
    cpaths: ContainerPaths,
    stdio: int,
    *,
    lazy: bool,
    check_running: bool,
) -> None:
    log_file = paths.runc_restore_log
    try:
        bundle.refuse_hooks(cpaths.bundle)
        argv = cmdlines.runc_restore(
            runc, name, paths.images, cpaths.bundle, log_file, lazy_pages=lazy
        )
        proc = await spawn(argv, stdout=stdio, stderr=stdio)
    finally:
        os.close(stdio)  # runc has its own copy: the logger ends when the container does
    # Cancelled (the step's deadline, a lost lease): runc and its CRIU are killed, a
    # half-restored container is left for the compensation (stop_destination) to remove.
    code = await wait_owned(proc)
    if code != 0:
        errors = log_errors(log_file)
        why = criu.cause(paths.restore_log)
        raise RuntimeFailure(
            f"restore of {name} failed: {errors[-1] if errors else f'exit {code}'}"
            + (f"; CRIU: {why}" if why else ""),
            log_tail=criu.tail(paths.restore_log),
        )
    if not check_running:
        return
    state = await runc.state(name)
    if state is None or state.status != "running":
        raise RuntimeFailure(f"{name} did not stay running after restore")


def _kill_background(paths: MigrationPaths, tag: str) -> None:
    """SIGKILL a background CRIU of this migration (its wrapper records how it ended)."""
    pid = criu.background_pid(paths.images, tag)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
