"""The host's ledger: its own durable record of the containers it runs and of every
migration it takes part in, under `<state dir>/ledger/`.

The bus holds the fleet's truth; this is what survives when the bus's store is lost:
`ferry reconcile` rebuilds placements and ends interrupted migrations from every host's
ledger and runc's list. One JSON file per container and per migration, each written
atomically (temporary file, fsync, rename, fsync of the directory), so a crash leaves the
old or the new version, never half of one. The host's worker processes share the files;
a lock file serialises their read-modify-writes.

Workers record through the module functions (`held`, `saw`, `committed`, …), which act on
the ledger `install`ed for the process and do nothing where none is (tests, tools). A
failed write is logged, never raised: the ledger backs the bus up, it must not stop it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from schemas.v1.containers import Placement
from schemas.v2.ledger import LedgerMigration, LedgerRole
from schemas.v2.migrations import MigrationRecord
from workflows.reconcile import newest

log = logging.getLogger("ferry.ledger")

LEDGER_DIR = "ledger"

M = TypeVar("M", Placement, LedgerMigration)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HostLedger:
    """The ledger of host `host`, kept under `state_dir`."""

    def __init__(self, state_dir: Path, host: str) -> None:
        self.root = state_dir / LEDGER_DIR
        self.host = host

    @property
    def containers_dir(self) -> Path:
        return self.root / "containers"

    @property
    def migrations_dir(self) -> Path:
        return self.root / "migrations"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        self.migrations_dir.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- containers --------------------------------------------------------------------------

    def held(self, placement: Placement) -> None:
        """This host runs the container now, as its own."""
        own = placement.model_copy(
            update={"host": self.host, "state": "running", "migration_id": None}
        )
        with self._locked():
            _write_atomically(self.containers_dir / f"{own.name}.json", own.to_bytes())

    def forgot(self, name: str) -> None:
        """Nothing of the container is left on this host."""
        with self._locked():
            path = self.containers_dir / f"{name}.json"
            if path.exists():
                path.unlink()
                _fsync_dir(self.containers_dir)

    def containers(self) -> list[Placement]:
        return [p for p in (_read(Placement, f) for f in _files(self.containers_dir)) if p]

    # -- migrations --------------------------------------------------------------------------

    def role_in(self, record: MigrationRecord) -> LedgerRole | None:
        if record.destination == self.host:
            return "destination"
        if record.source == self.host:
            return "source"
        return None

    def migration(self, migration_id: str) -> LedgerMigration | None:
        return _read(LedgerMigration, self.migrations_dir / f"{migration_id}.json")

    def migrations(self) -> list[LedgerMigration]:
        return [m for m in (_read(LedgerMigration, f) for f in _files(self.migrations_dir)) if m]

    def recent_migrations(self, limit: int) -> list[LedgerMigration]:
        """The `limit` entries written last: what a forecast learns from, without reading
        every move this host ever made."""
        newest = sorted(_files(self.migrations_dir), key=_written_at, reverse=True)[:limit]
        return [m for m in (_read(LedgerMigration, f) for f in newest) if m]

    def _change(
        self, record: MigrationRecord, change: Callable[[LedgerMigration], LedgerMigration]
    ) -> None:
        """Read, change and write one migration's entry, the newest record copy kept."""
        role = self.role_in(record)
        if role is None:
            return
        with self._locked():
            entry = self.migration(record.id)
            if entry is None:
                entry = LedgerMigration(
                    id=record.id,
                    container=record.container,
                    role=role,
                    record=record,
                    updated_at=time.time(),
                )
            else:
                entry = entry.model_copy(update={"record": newest(entry.record, record)})
            entry = change(entry).model_copy(update={"updated_at": time.time()})
            _write_atomically(self.migrations_dir / f"{record.id}.json", entry.to_bytes())

    def saw(self, record: MigrationRecord) -> None:
        """The latest copy of a migration's record this host has read."""
        self._change(record, lambda entry: entry)

    def committed(self, record: MigrationRecord, placement: Placement) -> None:
        """Destination: the commit's compare-and-set succeeded; the container is ours."""
        self.held(placement)
        now = time.time()
        self._change(
            record, lambda e: e.model_copy(update={"committed": True, "committed_at": now})
        )

    def uncommitted(self, record: MigrationRecord) -> None:
        """Destination, post-copy fallback: the placement went back to the source."""
        self._change(record, lambda e: e.model_copy(update={"committed": False}))

    def source_done(self, record: MigrationRecord) -> None:
        """Source: nothing of the container is left here after the commit."""
        self.forgot(record.container)
        self._change(record, lambda e: e.model_copy(update={"source_done": True}))


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def _written_at(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone meanwhile: it sorts last and reads as nothing
        return 0.0


def _read(model: type[M], path: Path) -> M | None:
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:  # say so: an unreadable entry is not "none"
        log.error("ledger entry %s unreadable: %s", path, exc)
        raise


# -- the process's ledger ------------------------------------------------------------------

_installed: HostLedger | None = None


def install(ledger: HostLedger | None) -> None:
    """Make `ledger` the one this process's workers record in (None: record nothing)."""
    global _installed
    _installed = ledger


def installed() -> HostLedger | None:
    return _installed


def _record(what: str, action: Callable[[HostLedger], None]) -> None:
    if _installed is None:
        return
    try:
        action(_installed)
    except Exception:
        log.exception("ledger: could not record %s", what)


def held(placement: Placement) -> None:
    _record(f"container {placement.name}", lambda ledger: ledger.held(placement))


def forgot(name: str) -> None:
    _record(f"container {name} gone", lambda ledger: ledger.forgot(name))


def saw(record: MigrationRecord) -> None:
    _record(f"migration {record.id}", lambda ledger: ledger.saw(record))


def committed(record: MigrationRecord, placement: Placement) -> None:
    _record(f"commit of {record.id}", lambda ledger: ledger.committed(record, placement))


def uncommitted(record: MigrationRecord) -> None:
    _record(f"uncommit of {record.id}", lambda ledger: ledger.uncommitted(record))


def source_done(record: MigrationRecord) -> None:
    _record(f"source side of {record.id} done", lambda ledger: ledger.source_done(record))
