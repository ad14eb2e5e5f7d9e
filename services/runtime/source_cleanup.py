"""After the commit, on the source: what the move left there goes (the cleanup worker's
part). For post-copy that includes the stopped copy kept as the way back."""

from __future__ import annotations

import shutil

from services.config import HostConfig
from services.runtime import bundle, criu, firewall
from services.runtime import paths as layout
from services.runtime.containers import HostContainers
from services.runtime.paths import MigrationPaths


class SourceCleanup:
    """This host's clean-up of containers that moved away."""

    def __init__(self, config: HostConfig, containers: HostContainers) -> None:
        self.config = config
        self.containers = containers

    def paths(self, migration_id: str) -> MigrationPaths:
        return MigrationPaths.of(self.config.state_dir, migration_id)

    async def pages_served(self, migration_id: str, timeout: float) -> tuple[int, int]:
        """Post-copy: once the destination has pulled every page, the source's CRIU exits.
        Returns its exit code (-1 if it still runs) and the pages its dump described."""
        images = self.paths(migration_id).images
        rc = await criu.background_result(images, layout.LAZY_DUMP, timeout)
        return (-1 if rc is None else rc), criu.pagemap_pages(images)

    def local_volumes(self, name: str) -> list[str]:
        """The volumes this host's copy of `name` mounts, from its own config.json (gone
        once it is cleaned: a volume is removed before it)."""
        return bundle.volume_names(self.containers.paths(name).bundle, self.config.volumes_dir)

    async def clean_source(self, name: str, migration_id: str, volumes: list[str]) -> list[str]:
        """The stopped source copy's volumes (the destination has them since the commit;
        the caller has seen the placement say so), then its netns, veth, mounts and files,
        and the firewall's rule for its page server. Returns the volumes removed."""
        firewall.forget_peers(migration_id)
        removed = []
        for volume in volumes:
            meta = self.containers.volumes.meta(volume)
            if meta is not None and meta.arrived_by != migration_id:
                self.containers.volumes.remove(volume)
                removed.append(volume)
        await self.containers.discard_local(name)
        shutil.rmtree(self.paths(migration_id).root, ignore_errors=True)
        return removed
