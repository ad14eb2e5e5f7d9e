"""Where a migration's state lives on a host: one name for every directory and marker.

Each host keeps what it holds for a migration under `<state dir>/migrations/<id>/`, on
both sides. The markers say what already happened here, so that a redelivered command
finds its work done, and a compensation knows what it must undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIGRATIONS_DIR = "migrations"

# Background CRIU processes, each with <tag>.pid and <tag>.rc in the images dir.
PAGE_SERVER = "page-server"  # destination, stop-and-copy: takes one dump's pages
LAZY_DUMP = "lazy-dump"  # source, post-copy: the checkpoint that serves pages on demand
LAZY_PAGES = "lazy-pages"  # destination, post-copy: pulls pages from the source

# Files in an image directory (a migration's `images`, or a pre-copy round's `it-N`).
STATS_DUMP = "stats-dump"
STATS_RESTORE = "stats-restore"
DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"
RUNC_LOG = "runc.log"
PAGE_SERVER_PORT = "page-server.port"


def pid_file(images: Path, tag: str) -> Path:
    """Where a background CRIU started for these images keeps its pid."""
    return images / f"{tag}.pid"


def rc_file(images: Path, tag: str) -> Path:
    """Where its exit code appears once it has exited."""
    return images / f"{tag}.rc"


def migrations_dir(state_dir: Path) -> Path:
    return state_dir / MIGRATIONS_DIR


def migration_dir(state_dir: Path, migration_id: str) -> Path:
    return migrations_dir(state_dir) / migration_id


@dataclass(frozen=True)
class MigrationPaths:
    """One migration's directory on one host, and every marker in it."""

    root: Path

    @classmethod
    def of(cls, state_dir: Path, migration_id: str) -> MigrationPaths:
        return cls(migration_dir(state_dir, migration_id))

    @property
    def migration_id(self) -> str:
        return self.root.name

    # -- images (both sides: dumped here on the source, restored from here on the destination)
    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def inventory(self) -> Path:
        """CRIU's first image: present once a dump has written anything here."""
        return self.images / "inventory.img"

    def page_images(self) -> list[Path]:
        return list(self.images.glob("pages-*.img"))

    @property
    def stats_dump(self) -> Path:
        return self.images / STATS_DUMP

    @property
    def stats_restore(self) -> Path:
        return self.images / STATS_RESTORE

    @property
    def dump_log(self) -> Path:
        return self.images / DUMP_LOG

    @property
    def restore_log(self) -> Path:
        return self.images / RESTORE_LOG

    def criu_log(self, tag: str) -> Path:
        """A background CRIU's own log (page-server.log, lazy-pages.log)."""
        return self.images / f"{tag}.log"

    # -- runc's logs
    @property
    def runc_log(self) -> Path:
        return self.root / RUNC_LOG

    @property
    def runc_restore_log(self) -> Path:
        return self.root / "runc-restore.log"

    # -- source markers
    @property
    def dump_done(self) -> Path:
        """The dump's result as JSON: a redelivered dump returns it instead of dumping."""
        return self.root / "dump.done"

    @property
    def lazy(self) -> Path:
        """Post-copy: address:port of the source's page server (on the source), of the
        source to pull from (on the destination). On the source it also says the container
        waits stopped; on the destination that a lazy-pages daemon may still work here."""
        return self.root / "lazy"

    @property
    def presync_manifest(self) -> Path:
        """What the pre-sync sent: the delta after the freeze is computed against it."""
        return self.root / "presync.manifest.json"

    @property
    def dumped(self) -> bool:
        """A dump started here (so resuming the source owns this directory)."""
        return self.dump_done.exists() or self.lazy.exists() or self.inventory.exists()

    # -- destination markers
    @property
    def held(self) -> Path:
        """The container's netns is held closed (since prepare)."""
        return self.root / "held"

    @property
    def peer(self) -> Path:
        """The one address this host's page servers for the migration admit (the source)."""
        return self.root / "peer"

    @property
    def page_server_port(self) -> Path:
        return self.root / PAGE_SERVER_PORT

    @property
    def incoming(self) -> Path:
        """What the transfer server received for this migration."""
        return self.root / "incoming"

    @property
    def incoming_bundle(self) -> Path:
        """Images sent after the freeze (never a config: the restore makes its own)."""
        return self.incoming / "bundle"

    @property
    def incoming_presync(self) -> Path:
        """The pre-synced copy of the container's files (a delta is applied over it)."""
        return self.incoming / "presync"

    @property
    def presync_signatures(self) -> Path:
        """Source: the destination's block hashes of the large files the pre-syncs sent
        (upper dir and volumes), so that a delta sends their changed blocks only."""
        return self.root / "presync-signatures.json"

    @property
    def incoming_volumes(self) -> Path:
        """The pre-synced copies of the container's volumes, one dir each by name."""
        return self.incoming / "volumes"

    @property
    def volumes_presync_manifest(self) -> Path:
        """Source: each volume's manifest as its pre-sync found it (its delta's base)."""
        return self.root / "volumes-presync.json"
