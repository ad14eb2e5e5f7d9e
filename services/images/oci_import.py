"""An OCI or Docker image on this machine made into Ferry layers and a run config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from schemas.v1.containers import MAX_LAYERS, ImageConfig
from services.errors import InvalidInput
from services.images import oci_layers, oci_source
from services.images.oci_layers import ConvertedLayer


@dataclass(frozen=True)
class ImportedImage:
    """What `convert_image` made: Ferry layers (lowest first, in `workdir`) and the config."""

    digest: str
    ref: str | None
    config: ImageConfig
    layers: tuple[ConvertedLayer, ...]


def run_config(raw: object) -> ImageConfig:
    """The image config's `config` object as Ferry reads it; a field Ferry cannot honour
    (an env entry without `=`, a relative working dir) is refused, naming it."""
    if not isinstance(raw, dict):
        raise InvalidInput("the image config is not a JSON object", field="PATH")
    section = raw.get("config") or {}
    try:
        return ImageConfig.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(
            f"the image config's {where} cannot be used: {first['msg']}"
            f" (it is {first.get('input')!r})",
            field="PATH",
        ) from None


def convert_image(
    path: Path, ref: str | None, workdir: Path, say: Callable[[str], None]
) -> ImportedImage:
    """Find the image in `path`, check every blob, convert every layer into `workdir`."""
    with oci_source.opened(path) as files:
        found = oci_source.find_image(files, ref, architecture=oci_source.host_architecture())
        arch = found.config.get("architecture")
        if arch not in (None, oci_source.host_architecture()):
            raise InvalidInput(
                f"the image is for {arch}, this machine is {oci_source.host_architecture()}",
                field="PATH",
            )
        if len(found.layers) > MAX_LAYERS:
            raise InvalidInput(
                f"the image has {len(found.layers)} layers; Ferry mounts at most {MAX_LAYERS}"
                " (squash it, e.g. `buildah build --squash`)",
                field="PATH",
            )
        config = run_config(found.config)
        converted = []
        for i, blob in enumerate(found.layers, start=1):
            say(f"layer {i}/{len(found.layers)}: checking {blob.diff_id[:12]}")
            with files.open(blob.path) as stored:
                plain = oci_layers.uncompressed(blob, stored, workdir / f"{i}.oci.tar")
            layer = oci_layers.convert(blob, plain, workdir / f"{i}.tar")
            plain.unlink()
            if layer.members == 0:  # what a RUN that changed nothing leaves: nothing to mount
                say(f"layer {i}/{len(found.layers)} is empty: left out")
                continue
            converted.append(layer)
    digests = [c.digest for c in converted]
    if len(set(digests)) != len(digests):
        # Two identical layers (an empty layer twice): overlayfs refuses a lower dir twice.
        raise InvalidInput("the image has the same layer twice; squash it first", field="PATH")
    return ImportedImage(found.digest, found.ref, config, tuple(converted))
