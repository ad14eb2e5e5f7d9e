"""Creating, listing and removing containers on a host; images and the layers hosts hold."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
    field_validator,
    model_validator,
)

from schemas.v1.base import HOST_PATTERN, NAME_PATTERN, Message, Part
from schemas.v1.types import IPv4Str, MacStr, MigrationId

ContainerNameStr = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
HostNameStr = Annotated[str, StringConstraints(pattern=HOST_PATTERN)]
LayerDigest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
IMAGE_NAME_PATTERN = NAME_PATTERN
ImageNameStr = Annotated[str, StringConstraints(pattern=IMAGE_NAME_PATTERN)]
MAX_LAYERS = 16  # an overlay's lowerdir option must fit in one page with its paths


def _each_layer_once(layers: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for digest in layers:
        if digest in seen:
            raise ValueError(f"layer {digest[:12]} appears twice (overlayfs refuses that)")
        seen.add(digest)
    return layers


LayerStack = Annotated[
    tuple[LayerDigest, ...],
    Field(
        min_length=1,
        max_length=MAX_LAYERS,
        description="sha256 digests of the layers in the layers object store, lowest first",
        json_schema_extra={"uniqueItems": True},
    ),
    AfterValidator(_each_layer_once),
]


class _Layered(Message):
    """A message that names a container's layers."""

    @model_validator(mode="before")
    @classmethod
    def _upcast_single_layer(cls, data: Any) -> Any:
        """Written before images, with one `layer`: read as a one-layer stack."""
        if isinstance(data, dict) and "layers" not in data and "layer" in data:
            return {**data, "layers": [data["layer"]]}
        return data


EnvVar = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*=[^\x00]*$"),
    Field(description="NAME=value"),
]
Arg = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]  # a NUL would cut it short


class ContainerSpec(Part):
    """What a container is, wherever it runs: the host running it makes its config.json
    from this (services/runtime/bundle.py), never from bytes another host sent.

    A field that changes what runs (user, capabilities, ...) comes with a new
    `spec_version`, so a host that does not know it refuses the spec instead of ignoring it.
    """

    spec_version: Literal[1] = 1
    layers: LayerStack
    image: ImageNameStr | None = Field(
        default=None, description="the image the layers came from, if any (informational)"
    )
    args: tuple[Arg, ...] = Field(min_length=1, description="the command and its arguments")
    env: tuple[EnvVar, ...] = ()
    memory_mib: int | None = Field(default=None, ge=4, le=65536)


class CreateContainer(_Layered):
    """Start a new container on the host that receives this request."""

    name: ContainerNameStr
    layers: LayerStack
    image: ImageNameStr | None = Field(
        default=None, description="the image the layers came from, if any (informational)"
    )
    args: tuple[Arg, ...] = Field(min_length=1, description="the command and its arguments")
    memory_mib: int | None = Field(default=None, ge=4, le=65536)
    env: tuple[EnvVar, ...] = ()

    @property
    def spec(self) -> ContainerSpec:
        """The container this request asks for."""
        return ContainerSpec(
            layers=self.layers,
            image=self.image,
            args=self.args,
            env=self.env,
            memory_mib=self.memory_mib,
        )


_FLAT_SPEC = ("layers", "image", "args", "memory_mib")  # what placements held before `spec`


class Placement(Message):
    """Where a container runs, and what it is; the fleet-wide truth, changed only by
    compare-and-set."""

    name: ContainerNameStr
    host: HostNameStr
    ip: IPv4Str
    mac: MacStr
    spec: ContainerSpec
    state: Literal["creating", "running", "migrating", "removing"] = "creating"
    migration_id: MigrationId | None = None
    destination: HostNameStr | None = Field(
        default=None,
        description="while migrating: the host the holder hands the container to at the commit",
    )

    @model_validator(mode="before")
    @classmethod
    def _upcast_flat_spec(cls, data: Any) -> Any:
        """Written before ContainerSpec: `layers` (or, before images, one `layer`), `image`,
        `args` and `memory_mib` at the top, no env: read as that spec."""
        if not isinstance(data, dict) or "spec" in data:
            return data
        flat = {key: data[key] for key in _FLAT_SPEC if key in data}
        if "layers" not in flat and "layer" in data:
            flat["layers"] = [data["layer"]]
        return {**data, "spec": flat}

    # Still written beside `spec`, so a host running the release before it reads new
    # placements (a rolling upgrade); read back, `spec` wins and these are ignored.
    @computed_field  # type: ignore[prop-decorator]
    @property
    def layers(self) -> tuple[str, ...]:
        return self.spec.layers

    @computed_field  # type: ignore[prop-decorator]
    @property
    def image(self) -> str | None:
        return self.spec.image

    @computed_field  # type: ignore[prop-decorator]
    @property
    def args(self) -> tuple[str, ...]:
        return self.spec.args

    @computed_field  # type: ignore[prop-decorator]
    @property
    def memory_mib(self) -> int | None:
        return self.spec.memory_mib


class ContainerCreated(Message):
    """Reply: the container's process runs."""

    name: str
    host: str
    ip: IPv4Str
    mac: MacStr
    pid: int


class RemoveContainer(Message):
    """Stop and remove a container and everything the host holds for it."""

    name: ContainerNameStr


class ContainerRemoved(Message):
    """Reply: nothing of the container is left on the host."""

    name: str
    host: str


class ListContainers(Message):
    """Ask a host which containers its runtime knows."""


class RuntimeContainer(Part):
    """One container as the host's runc reports it."""

    name: str
    state: str
    pid: int | None = None


class ContainerList(Message):
    """Reply to ListContainers."""

    host: str
    containers: tuple[RuntimeContainer, ...]


class RunsContainer(Message):
    """Ask a host whether it runs a container (the leftover collector's question to an owner)."""

    name: ContainerNameStr


RuncStatus = Literal["running", "paused", "stopped", "absent"]


class ContainerRuns(Message):
    """Reply to RunsContainer, from the host's runc: `running` only if its process runs."""

    host: str
    name: str
    state: RuncStatus = Field(description="absent: runc knows no such container here")


USER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$"
UserStr = Annotated[
    str,
    StringConstraints(pattern=USER_PATTERN),
    Field(description="UID[:GID] or NAME[:GROUP], names resolved in the image's /etc/passwd"),
]
WorkdirStr = Annotated[
    str,
    StringConstraints(pattern=r"^/[^\x00]{0,4095}$"),
    Field(description="an absolute path inside the container"),
]
PortStr = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,5}(/(tcp|udp|sctp))?$")]


def _listed(value: Any) -> Any:
    """OCI writes `null` for an absent list or map."""
    return () if value is None else value


class ImageConfig(Part):
    """How an OCI image says it runs (its config's `config` object), read with OCI's own
    field names; what Docker would do with it, Ferry does (workflows/container_process.py)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    entrypoint: tuple[Arg, ...] = Field(default=(), alias="Entrypoint")
    cmd: tuple[Arg, ...] = Field(default=(), alias="Cmd")
    env: tuple[EnvVar, ...] = Field(default=(), alias="Env")
    user: UserStr | None = Field(default=None, alias="User")
    working_dir: WorkdirStr | None = Field(default=None, alias="WorkingDir")
    exposed_ports: tuple[PortStr, ...] = Field(default=(), alias="ExposedPorts")
    labels: dict[str, str] = Field(default_factory=dict, alias="Labels")
    stop_signal: str | None = Field(default=None, alias="StopSignal", max_length=16)

    @field_validator("entrypoint", "cmd", "env", mode="before")
    @classmethod
    def _null_list(cls, value: Any) -> Any:
        return _listed(value)

    @field_validator("user", "working_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("exposed_ports", mode="before")
    @classmethod
    def _port_keys(cls, value: Any) -> Any:
        """OCI writes ports as the keys of a map (`{"80/tcp": {}}`)."""
        return tuple(sorted(value)) if isinstance(value, dict) else _listed(value)

    @field_validator("labels", mode="before")
    @classmethod
    def _null_map(cls, value: Any) -> Any:
        return {} if value is None else value


class Image(Message):
    """A named stack of read-only layers (KV ferry-images, key = name); rebuilding moves it.
    An imported OCI or Docker image also keeps how it runs and the manifest it came from."""

    name: ImageNameStr
    layers: LayerStack
    base: ImageNameStr | None = Field(default=None, description="the image it was built on")
    created_at: float
    config: ImageConfig | None = Field(
        default=None, description="an imported image's run config (None: built by Ferry)"
    )
    source: str | None = Field(
        default=None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="the manifest it was imported from (a Docker archive's: its config)",
    )


class ListLayers(Message):
    """Ask a host which layers it holds verified and unpacked."""


class HostLayer(Part):
    """One layer as a host holds it."""

    digest: LayerDigest
    size_bytes: int = Field(ge=0, description="size of the verified layer tar")
    unpacked_at: float


class LayerList(Message):
    """Reply to ListLayers."""

    host: str
    layers: tuple[HostLayer, ...]


class PullLayers(Message):
    """Make the receiving host fetch, verify and unpack these layers now, ahead of use."""

    layers: LayerStack
    image: ImageNameStr | None = None


class LayersPulled(Message):
    """Reply to PullLayers: every layer is now on the host."""

    host: str
    fetched: tuple[LayerDigest, ...] = Field(description="fetched from the store just now")
    present: tuple[LayerDigest, ...] = Field(description="already here")
    bytes_fetched: int = Field(ge=0)
