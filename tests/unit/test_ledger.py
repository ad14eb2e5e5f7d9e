"""The host's ledger: what it runs and the migrations it takes part in, kept on its disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.runtime import ledger
from services.runtime.ledger import HostLedger
from tests.support.records import placement, running_at


def test_a_container_is_held_then_forgotten(tmp_path: Path) -> None:
    book = HostLedger(tmp_path, "h1")
    book.held(placement("web", "h1", state="creating"))
    [held] = book.containers()
    assert (held.name, held.host, held.state, held.migration_id) == ("web", "h1", "running", None)
    book.forgot("web")
    book.forgot("web")  # forgetting twice is harmless
    assert book.containers() == []


def test_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    book = HostLedger(tmp_path, "h1")
    book.held(placement("web", "h1"))
    book.saw(running_at("dump", since=1.0))
    names = {p.name for p in (tmp_path / "ledger").rglob("*") if p.is_file()}
    assert names == {".lock", "web.json", "0123456789abcdef.json"}


def test_only_a_migration_this_host_takes_part_in_is_kept(tmp_path: Path) -> None:
    HostLedger(tmp_path, "h3").saw(running_at("dump", since=1.0))
    assert HostLedger(tmp_path, "h3").migrations() == []
    source, destination = HostLedger(tmp_path / "a", "h1"), HostLedger(tmp_path / "b", "h2")
    source.saw(running_at("dump", since=1.0))
    destination.saw(running_at("dump", since=1.0))
    assert [m.role for m in source.migrations()] == ["source"]
    assert [m.role for m in destination.migrations()] == ["destination"]


def test_the_newest_copy_of_the_record_is_kept_whatever_the_order(tmp_path: Path) -> None:
    book = HostLedger(tmp_path, "h2")
    later = running_at("commit", since=5.0)
    book.saw(later)
    book.saw(running_at("dump", since=9.0))  # an older step seen late, with a later clock
    [entry] = book.migrations()
    assert [s.name for s in entry.record.steps][-1] == "commit"


def test_commit_uncommit_and_source_done_are_recorded(tmp_path: Path) -> None:
    destination = HostLedger(tmp_path / "b", "h2")
    record = running_at("commit", since=1.0)
    destination.committed(
        record, placement("web", "h1", state="migrating", migration_id="0000000000000001")
    )
    [entry] = destination.migrations()
    assert entry.committed and entry.committed_at
    [held] = destination.containers()
    assert (held.host, held.state, held.migration_id) == ("h2", "running", None)
    destination.saw(running_at("open_network", since=2.0))
    assert destination.migrations()[0].committed, "a later record keeps the commit"
    destination.uncommitted(record)
    assert not destination.migrations()[0].committed

    source = HostLedger(tmp_path / "a", "h1")
    source.held(placement("web", "h1"))
    source.source_done(running_at("clean_source", since=3.0))
    assert source.migrations()[0].source_done
    assert source.containers() == []


def test_an_unreadable_entry_is_an_error_not_nothing(tmp_path: Path) -> None:
    book = HostLedger(tmp_path, "h1")
    book.held(placement("web", "h1"))
    (book.containers_dir / "web.json").write_text("{half")
    with pytest.raises(ValueError):
        book.containers()


def test_the_module_functions_record_in_the_installed_ledger_only(tmp_path: Path) -> None:
    ledger.held(placement("web", "h1"))  # nothing installed: nothing happens, nothing raised
    book = HostLedger(tmp_path, "h1")
    ledger.install(book)
    try:
        ledger.held(placement("web", "h1"))
        assert [p.name for p in book.containers()] == ["web"]
        os.chmod(book.containers_dir, 0o500)
        if os.geteuid() != 0:  # root writes anyway
            ledger.held(placement("db", "h1"))  # a failed write is logged, never raised
    finally:
        os.chmod(book.containers_dir, 0o700)
        ledger.install(None)


def test_recent_migrations_are_the_entries_written_last(tmp_path: Path) -> None:
    book = HostLedger(tmp_path, "h1")
    for n, migration_id in enumerate(("aaaaaaaaaaaaaaaa", "cccccccccccccccc", "bbbbbbbbbbbbbbbb")):
        book.saw(running_at("dump", since=1.0).model_copy(update={"id": migration_id}))
        entry = tmp_path / "ledger" / "migrations" / f"{migration_id}.json"
        os.utime(entry, (1000.0 + n, 1000.0 + n))
    assert [m.id for m in book.recent_migrations(2)] == ["bbbbbbbbbbbbbbbb", "cccccccccccccccc"]
    assert len(book.recent_migrations(50)) == 3
