"""The cause a failed dump or restore reports: CRIU's first real error, not runc's summary."""

from __future__ import annotations

from pathlib import Path

from services.runtime import criu

# The lines of a real dump.log (a container running as uid 1000, root without
# CAP_SYS_RESOURCE, CRIU without patch 0003), shortened.
DUMP_LOG = "".join(
    f"{line}\n"
    for line in (
        "(00.000450) Version: 4.2.1 (gitid 0)",
        "(00.001556) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self:"
        " Operation not permitted",
        "(00.012011) Dumping core (pid: 20196)",
        "(00.012031) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted",
        "(00.012035) Error (criu/cr-dump.c:1584): Dump core (pid: 20196) failed with -1",
        "(00.012494) Error (criu/cr-dump.c:1975): Dumping FAILED.",
    )
)


def test_the_cause_is_the_first_error_that_is_not_harmless(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(DUMP_LOG)
    assert criu.cause(log) == (
        "Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted"
    )


def test_a_log_without_errors_or_without_a_file_has_no_cause(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(DUMP_LOG.splitlines()[0] + "\n" + DUMP_LOG.splitlines()[1] + "\n")
    assert criu.cause(log) is None
    assert criu.cause(tmp_path / "missing.log") is None
