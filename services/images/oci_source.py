"""Where an image's manifest, config and layer blobs are in what `skopeo copy`, `umoci`,
`buildah push`, `podman save` or `docker save` wrote: an OCI image layout (a directory, or a
tar of one: `oci-archive`) or a Docker archive (`docker-archive`, `manifest.json` at its top).

Nothing here unpacks anything: an archive's members are read in place by name, a layout's
files by their digest-shaped names under `blobs/`, and every blob is checked against the
digest that names it before it is believed (`services/images/oci_layers.py` checks layers
as it reads them). The JSON documents are small; one larger than JSON_MAX is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.errors import InvalidInput
from services.runtime import tarcheck

JSON_MAX = 4 << 20
LINK_HOPS = 8  # symlinks followed inside an archive (docker-archive links layer files)
REF_ANNOTATION = "org.opencontainers.image.ref.name"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


def host_architecture() -> str:
    """This machine's architecture in OCI's words (`amd64`, `arm64`, ...)."""
    machine = platform.machine()
    return _ARCH.get(machine, machine)


def _hex(digest: object, what: str) -> str:
    """The hex of a `sha256:` digest; any other algorithm or shape is refused."""
    found = _DIGEST.match(digest) if isinstance(digest, str) else None
    if found is None:
        raise InvalidInput(f"{what}: {digest!r} is not a sha256 digest", field="PATH")
    return found.group(1)


@dataclass(frozen=True)
class LayerBlob:
    """One layer as the image names it: where its bytes are and what they must hash to."""

    path: str  # inside the layout or archive
    blob_sha256: str | None  # of the bytes as stored (None: a Docker archive names none)
    diff_id: str  # sha256 of the uncompressed tar (the config's rootfs.diff_ids)
    media_type: str


@dataclass(frozen=True)
class FoundImage:
    """An image found in a layout or archive: its identity, config and layers (lowest first)."""

    digest: str  # "sha256:..." of its manifest (a Docker archive: of its config)
    ref: str | None
    config: dict[str, Any]
    layers: tuple[LayerBlob, ...]


class _Files:
    """Read access to the files of a layout directory or of an archive, by relative name."""

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def json(self, name: str, what: str) -> Any:
        with self.open(name) as f:
            data = f.read(JSON_MAX + 1)
        if len(data) > JSON_MAX:
            raise InvalidInput(f"{what} ({name}) is larger than {JSON_MAX} bytes", field="PATH")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidInput(f"{what} ({name}) is not JSON: {exc}", field="PATH") from None

    def verified_json(self, name: str, hex_digest: str, what: str) -> Any:
        """A JSON blob, believed only if its bytes hash to the digest that names it."""
        with self.open(name) as f:
            data = f.read(JSON_MAX + 1)
        if len(data) > JSON_MAX:
            raise InvalidInput(f"{what} ({name}) is larger than {JSON_MAX} bytes", field="PATH")
        if hashlib.sha256(data).hexdigest() != hex_digest:
            raise InvalidInput(
                f"{what} ({name}) does not match its digest sha256:{hex_digest[:12]}",
                field="PATH",
            )
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidInput(f"{what} ({name}) is not JSON: {exc}", field="PATH") from None


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"{name!r} climbs out of the image with '..'", field="PATH")
    return "/".join(parts)


class _Directory(_Files):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / _clean(name)

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if not path.is_file():
            raise InvalidInput(f"{name} is missing from the image layout {self.root}", field="PATH")
        return path.open("rb")

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()


class _Archive(_Files):
    """An archive's members, read in place; a symlink member is followed inside the archive."""

    def __init__(self, tar: tarfile.TarFile, path: Path) -> None:
        self.tar = tar
        self.path = path
        self.members = {_clean(m.name): m for m in tar.getmembers()}

    def _member(self, name: str) -> tarfile.TarInfo | None:
        name = _clean(name)
        for _ in range(LINK_HOPS):
            member = self.members.get(name)
            if member is None or not member.issym():
                return member if member is not None and member.isfile() else None
            target = member.linkname
            base = "" if target.startswith("/") else name.rpartition("/")[0]
            name = _clean(f"{base}/{target}")
        return None

    def open(self, name: str) -> IO[bytes]:
        member = self._member(name)
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:
            raise InvalidInput(f"{name} is missing from the archive {self.path}", field="PATH")
        return f

    def exists(self, name: str) -> bool:
        return self._member(name) is not None


@contextlib.contextmanager
def opened(path: Path) -> Iterator[_Files]:
    """The files of a layout directory or an archive (plain or compressed tar)."""
    if path.is_dir():
        yield _Directory(path)
        return
    if not path.is_file():
        raise InvalidInput(
            f"{path} is neither an image layout directory nor an archive", field="PATH"
        )
    try:
        tar = tarfile.open(path, "r:*", tarinfo=tarcheck.BoundedHeaderInfo)  # noqa: SIM115 (closed below)
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(f"{path} is not a tar archive: {exc}", field="PATH") from None
    with tar:
        yield _Archive(tar, path)


def find_image(files: _Files, ref: str | None, *, architecture: str) -> FoundImage:
    """The image `ref` names (the only one when ref is None), for `architecture`."""
    if files.exists("index.json"):
        return _oci_image(files, ref, architecture)
    if files.exists("manifest.json"):
        return _docker_image(files, ref)
    raise InvalidInput(
        "neither an OCI image layout (no index.json) nor a Docker archive (no manifest.json)",
        field="PATH",
    )


def _blob(digest: object, what: str) -> tuple[str, str]:
    hex_digest = _hex(digest, what)
    return f"blobs/sha256/{hex_digest}", hex_digest


def _oci_image(files: _Files, ref: str | None, architecture: str) -> FoundImage:
    layout = files.json("oci-layout", "the oci-layout file") if files.exists("oci-layout") else {}
    if layout.get("imageLayoutVersion") not in (None, "1.0.0"):
        raise InvalidInput(
            f"image layout version {layout.get('imageLayoutVersion')!r} (1.0.0 is understood)",
            field="PATH",
        )
    index = files.json("index.json", "the image index")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidInput("the image index lists no manifest", field="PATH")
    refs = [e.get("annotations", {}).get(REF_ANNOTATION) for e in entries if isinstance(e, dict)]
    if ref is not None:
        chosen = [e for e, r in zip(entries, refs, strict=True) if r == ref]
        if not chosen:
            known = ", ".join(r for r in refs if r) or "none"
            raise InvalidInput(
                f"no image tagged {ref!r} in the layout (tags: {known})", field="--ref"
            )
    elif len(entries) > 1:
        known = ", ".join(r or "(untagged)" for r in refs)
        raise InvalidInput(
            f"the layout holds {len(entries)} images ({known}): pick one", field="--ref"
        )
    else:
        chosen = entries
    entry = chosen[0]
    if entry.get("mediaType") in (INDEX, DOCKER_LIST):
        entry = _platform_entry(files, entry, architecture)
    name, hex_digest = _blob(entry.get("digest"), "the manifest's digest")
    manifest = files.verified_json(name, hex_digest, "the image manifest")
    if not isinstance(manifest, dict) or manifest.get("mediaType", MANIFEST) not in (
        MANIFEST,
        DOCKER_MANIFEST,
    ):
        raise InvalidInput("the manifest is not an OCI or Docker v2 image manifest", field="PATH")
    config_name, config_hex = _blob(manifest.get("config", {}).get("digest"), "the config")
    config = files.verified_json(config_name, config_hex, "the image config")
    diff_ids = _diff_ids(config)
    descriptors = manifest.get("layers")
    if not isinstance(descriptors, list) or len(descriptors) != len(diff_ids):
        raise InvalidInput(
            f"the manifest lists {len(descriptors or [])} layers, the config"
            f" {len(diff_ids)} diff_ids",
            field="PATH",
        )
    layers = []
    for descriptor, diff_id in zip(descriptors, diff_ids, strict=True):
        layer_name, layer_hex = _blob(descriptor.get("digest"), "a layer's digest")
        media = str(descriptor.get("mediaType", ""))
        layers.append(LayerBlob(layer_name, layer_hex, diff_id, media))
    return FoundImage(f"sha256:{hex_digest}", ref or refs[0], config, tuple(layers))


def _platform_entry(files: _Files, entry: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The manifest for linux/`architecture` in a nested index (a multi-platform image)."""
    name, hex_digest = _blob(entry.get("digest"), "a nested index's digest")
    nested = files.verified_json(name, hex_digest, "a nested image index")
    offered = []
    for candidate in nested.get("manifests", []) if isinstance(nested, dict) else []:
        plat = candidate.get("platform", {}) if isinstance(candidate, dict) else {}
        offered.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if plat.get("os") == "linux" and plat.get("architecture") == architecture:
            return dict(candidate)
    raise InvalidInput(
        f"no linux/{architecture} image in the index (it has: {', '.join(offered) or 'none'})",
        field="PATH",
    )


def _diff_ids(config: Any) -> list[str]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not diff_ids:
        raise InvalidInput("the image config lists no layer (rootfs.diff_ids)", field="PATH")
    return [_hex(d, "a diff_id") for d in diff_ids]


def _docker_image(files: _Files, ref: str | None) -> FoundImage:
    manifest = files.json("manifest.json", "the archive's manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise InvalidInput("manifest.json lists no image", field="PATH")
    tags = [list(e.get("RepoTags") or []) for e in manifest if isinstance(e, dict)]
    if ref is not None:
        chosen = [e for e, t in zip(manifest, tags, strict=True) if ref in t]
        if not chosen:
            known = ", ".join(t for ts in tags for t in ts) or "none"
            raise InvalidInput(
                f"no image tagged {ref!r} in the archive (tags: {known})", field="--ref"
            )
    elif len(manifest) > 1:
        known = ", ".join(",".join(t) or "(untagged)" for t in tags)
        raise InvalidInput(
            f"the archive holds {len(manifest)} images ({known}): pick one", field="--ref"
        )
    else:
        chosen = manifest
    entry = chosen[0]
    config_name = str(entry.get("Config", ""))
    # The config's file is named by its digest (`<hex>.json` or `blobs/sha256/<hex>`).
    found = re.search(r"([0-9a-f]{64})(\.json)?$", config_name)
    if found is None:
        raise InvalidInput(
            f"the config file {config_name!r} is not named by its digest", field="PATH"
        )
    config = files.verified_json(config_name, found.group(1), "the image config")
    diff_ids = _diff_ids(config)
    paths = entry.get("Layers")
    if not isinstance(paths, list) or len(paths) != len(diff_ids):
        raise InvalidInput(
            f"manifest.json lists {len(paths or [])} layers, the config {len(diff_ids)} diff_ids",
            field="PATH",
        )
    layers = tuple(
        LayerBlob(str(p), None, d, "application/vnd.docker.image.rootfs.diff.tar")
        for p, d in zip(paths, diff_ids, strict=True)
    )
    tag = ref or next(iter(tags[manifest.index(entry)]), None)
    return FoundImage(f"sha256:{found.group(1)}", tag, config, layers)
