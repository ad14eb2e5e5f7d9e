"""Named volumes on one host: a directory per volume that a container bind-mounts and
that moves with it.

`<volumes dir>/<name>/` holds `data/` (what the container sees) and `volume.json` (when it
was made, and which move brought it here, if one did). A volume lives on one host at a
time: made where its first container runs, filled then with what the image had at its
path (as Docker does), pre-synced to a destination while the container runs and its
delta sent after the freeze; the destination takes it in at the restore, and the source's
copy goes only when the source is cleaned after the commit (services/runtime/
source_cleanup.py). A rolled-back move's copy is removed only where it is marked as
brought by that very move.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.v1.containers import HostVolume, VolumeMount
from services.errors import Conflict, InvalidInput, NotFound, RuntimeFailure

DATA = "data"
META = "volume.json"
POPULATE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class VolumeMeta:
    created_at: float
    arrived_by: str | None = None  # the migration that brought it here


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue  # removed while we walked
    return total


def image_path(rootfs: Path, path: str) -> Path | None:
    """rootfs/path if every part of it below the rootfs is a real directory, not a link
    (a link could point out of the container: never followed); None if it is absent."""
    current = rootfs
    for part in path.strip("/").split("/"):
        current = current / part
        try:
            mode = current.lstat().st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            raise InvalidInput(
                f"{path} is a symbolic link in the image: mount the volume at the real path",
                field="--volume",
            )
        if not stat.S_ISDIR(mode):
            raise InvalidInput(f"{path} is not a directory in the image", field="--volume")
    return current


class HostVolumes:
    """The volumes of the host this process runs on."""

    def __init__(self, volumes_dir: Path) -> None:
        self.root = volumes_dir

    def dir(self, name: str) -> Path:
        return self.root / name

    def data(self, name: str) -> Path:
        return self.root / name / DATA

    def exists(self, name: str) -> bool:
        return (self.root / name / META).exists()

    def meta(self, name: str) -> VolumeMeta | None:
        try:
            raw = json.loads((self.root / name / META).read_text())
            return VolumeMeta(float(raw["created_at"]), raw.get("arrived_by"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeFailure(f"volume {name}: {META} cannot be read: {exc}") from exc

    def _write_meta(self, directory: Path, meta: VolumeMeta) -> None:
        tmp = directory / f".{META}.tmp"
        tmp.write_text(json.dumps({"created_at": meta.created_at, "arrived_by": meta.arrived_by}))
        tmp.rename(directory / META)

    def create(self, mount: VolumeMount, rootfs: Path) -> bool:
        """Make `mount`'s volume unless this host has it; a new one starts as a copy of
        what the image has at its path (owner, mode and contents). Returns whether it was
        made now."""
        if self.exists(mount.name):
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f".{mount.name}.new"
        shutil.rmtree(partial, ignore_errors=True)
        data = partial / DATA
        data.mkdir(parents=True)
        seed = image_path(rootfs, mount.path)
        if seed is not None:
            st = seed.lstat()
            os.chown(data, st.st_uid, st.st_gid)
            os.chmod(data, stat.S_IMODE(st.st_mode))
            done = subprocess.run(
                ["cp", "-a", "--", f"{seed}/.", f"{data}/"],
                capture_output=True,
                text=True,
                timeout=POPULATE_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                shutil.rmtree(partial, ignore_errors=True)
                raise RuntimeFailure(f"filling volume {mount.name}: {done.stderr.strip()}")
        self._write_meta(partial, VolumeMeta(created_at=time.time()))
        partial.rename(self.root / mount.name)
        return True

    def adopt(self, name: str, arrived: Path, migration_id: str) -> None:
        """Take in a volume that came for `migration_id` (a redelivery finds it done). A
        volume of that name that came otherwise is refused, never overwritten."""
        meta = self.meta(name)
        if meta is not None:
            if meta.arrived_by == migration_id:
                return
            raise Conflict(f"this host already holds a volume named {name!r}")
        if not (arrived / DATA).is_dir():
            raise RuntimeFailure(f"volume {name} from the source has not arrived")
        self._write_meta(arrived, VolumeMeta(created_at=time.time(), arrived_by=migration_id))
        self.root.mkdir(parents=True, exist_ok=True)
        arrived.rename(self.root / name)

    def refuse_existing(self, names: list[str], migration_id: str) -> None:
        """A destination refuses to take a volume it already holds (not brought by this
        move): the two would be merged or one lost."""
        for name in names:
            meta = self.meta(name)
            if meta is not None and meta.arrived_by != migration_id:
                raise RuntimeFailure(
                    f"this host already holds a volume named {name!r} (a copy an earlier move"
                    " left until its source is cleaned, or another volume of that name)",
                    retryable=True,
                )

    def discard_arrived(self, name: str, migration_id: str) -> bool:
        """A rolled-back move's copy goes: only where the volume says this very move
        brought it. Returns whether it went."""
        meta = self.meta(name)
        if meta is None or meta.arrived_by != migration_id:
            return False
        self._remove(name)
        return True

    def remove(self, name: str) -> int:
        """Remove the volume and its data; returns the bytes it held."""
        if self.meta(name) is None:
            raise NotFound(f"no volume named {name!r} on this host", field="NAME")
        size = _tree_bytes(self.data(name))
        self._remove(name)
        return size

    def _remove(self, name: str) -> None:
        # Renamed first: a half-removed volume never looks like a whole one.
        doomed = self.root / f".{name}.removing"
        shutil.rmtree(doomed, ignore_errors=True)
        (self.root / name).rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def names(self) -> list[str]:
        """Every whole volume here (a half-made or half-removed one starts with a dot)."""
        if not self.root.is_dir():
            return []
        return sorted(
            e.name
            for e in self.root.iterdir()
            if not e.name.startswith(".") and self.exists(e.name)
        )

    def list(self) -> list[HostVolume]:
        found = []
        for name in self.names():
            meta = self.meta(name)
            if meta is None:
                continue  # removed since
            found.append(
                HostVolume(
                    name=name,
                    size_bytes=_tree_bytes(self.data(name)),
                    created_at=meta.created_at,
                    arrived_by=meta.arrived_by,
                )
            )
        return found
