"""Layer garbage collection on this host, by the rules of workflows/layer_gc.py: an unpacked
layer no image, no container (placed anywhere: it may move here) and no overlay mounted here
needs, on two sweeps in a row, is removed."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from services.errors import FerryError, described
from services.kvstores import KvImageStore, KvPlacementStore
from services.runtime import layers
from workflows.layer_gc import layers_to_remove

log = logging.getLogger("ferry.layers")

MIN_AGE_S = 300.0


def mounted_layers(layers_dir: Path, mountinfo: str) -> set[str]:
    """The layers of `layers_dir` that an overlay mounted here uses as a lower dir."""
    found = set()
    for line in mountinfo.splitlines():
        _, _, after = line.partition(" - ")
        fields = after.split()
        if len(fields) < 3 or fields[0] != "overlay":
            continue
        for option in fields[2].split(","):
            if option.startswith("lowerdir="):
                for lower in option.removeprefix("lowerdir=").split(":"):
                    path = Path(lower)
                    if path.parent == layers_dir:
                        found.add(path.name)
    return found


class LayerCollector:
    def __init__(
        self, layers_dir: Path, images: KvImageStore, placements: KvPlacementStore,
        *, min_age_s: float = MIN_AGE_S,
    ) -> None:  # fmt: skip
        self.layers_dir = layers_dir
        self.images = images
        self.placements = placements
        self.min_age_s = min_age_s
        self.suspects: set[str] = set()

    async def _needed(self) -> set[str] | None:
        try:
            images = await self.images.all()
            placements = await self.placements.all()
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except (FerryError, OSError) as exc:
            log.warning("layers kept: what needs them is unknown (%s)", described(exc))
            return None
        return (
            {d for image in images for d in image.layers}
            | {d for p in placements for d in p.spec.layers}
            | mounted_layers(self.layers_dir, mountinfo)
        )

    async def sweep(self) -> list[str]:
        """Remove what the rules allow; the digests removed."""
        held = {h.digest: h.unpacked_at for h in layers.held_layers(self.layers_dir)}
        needed = await self._needed()
        remove, self.suspects = layers_to_remove(
            held, needed, self.suspects, now=time.time(), min_age_s=self.min_age_s
        )
        removed = []
        for digest in sorted(remove):
            async with layers.layer_lock(self.layers_dir, digest):  # no fetch of it meanwhile
                await asyncio.to_thread(self._remove, digest)
            removed.append(digest)
            self.suspects.discard(digest)
        if removed:
            log.info(
                "removed %d unused layer(s): %s", len(removed), ", ".join(d[:12] for d in removed)
            )
        return removed

    def _remove(self, digest: str) -> None:
        """Renamed first, so the layer is gone at once for anyone looking, then deleted."""
        final = self.layers_dir / digest
        doomed = self.layers_dir / f".{digest}.removing"
        if final.is_dir():
            final.rename(doomed)
        (self.layers_dir / f"{digest}.json").unlink(missing_ok=True)
        shutil.rmtree(doomed, ignore_errors=True)
