"""What CRIU cannot move, judged from a container's processes before the freeze."""

from __future__ import annotations

from workflows.movability import ProcessFacts, findings, refusal

PLAIN = ProcessFacts(pid=10, comm="nginx", fd_targets=("/dev/null", "socket:[1]"), file_locks=0)
URING = ProcessFacts(pid=11, comm="mariadbd", fd_targets=("anon_inode:[io_uring]",), file_locks=2)


def test_nothing_held_means_nothing_to_say() -> None:
    assert findings([PLAIN]) == []
    assert refusal([], "web") is None


def test_an_io_uring_blocks_naming_the_process_and_the_fix() -> None:
    found = findings([PLAIN, URING])
    assert [(f.what, f.blocking) for f in found] == [("io_uring", True), ("file locks", False)]
    said = refusal(found, "db")
    assert said is not None
    assert said.startswith("db cannot be moved by CRIU: mariadbd[11] hold(s) io_uring")
    assert "--innodb-use-native-aio=0" in said


def test_file_locks_alone_do_not_block_and_say_what_ferry_does() -> None:
    locker = ProcessFacts(pid=12, comm="app", fd_targets=("/data/lock",), file_locks=1)
    (found,) = findings([locker])
    assert not found.blocking and "file-locks" in found.detail
    assert refusal([found], "app") is None
