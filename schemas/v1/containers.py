"""Creating, listing and removing containers on a host; images and the layers hosts hold."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

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
from schemas.v1.constraints import Constraints, PlacementTicket
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
# Every capability this kernel generation names (capabilities(7)), for validation.
ALL_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
# What Docker grants by default; a spec of version 2 starts from it (--cap-add, --cap-drop).
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip
# What a spec of version 1 ran with, and keeps running with wherever it moves.
VERSION_1_CAPABILITIES = ("CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE")
MAX_LABELS = 64


def _known_capability(name: str) -> str:
    if name not in ALL_CAPABILITIES:
        raise ValueError(f"{name!r} is not a Linux capability (CAP_CHOWN, CAP_NET_RAW, ...)")
    return name


Capability = Annotated[str, AfterValidator(_known_capability)]
HostnameStr = Annotated[
    str,
    StringConstraints(
        max_length=253,
        pattern=r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
        r"(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$",
    ),
    Field(description="an RFC 1123 host name"),
]
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")]
LabelValue = Annotated[str, StringConstraints(pattern=r"^[^\x00]{0,4096}$")]
Id = Annotated[int, Field(ge=0, le=2**32 - 2)]


class ProcessUser(Part):
    """Who the container's process runs as, resolved once, where it was created: a move
    never looks the name up again (the container may have changed its /etc/passwd)."""

    uid: Id
    gid: Id
    additional_gids: tuple[Id, ...] = ()
    asked: UserStr | None = Field(default=None, description="what --user or the image said")


_VERSION_2 = ("user", "workdir", "hostname", "cpus", "capabilities", "shm_mib", "labels")
_VERSION_3 = ("volumes", "restart")
_VERSION_4 = ("constraints",)
# What a host that comes back (a reboot) does with a container placed on it: start it again
# from its files ("always"; "on-failure" too, as a reboot is not the container's own exit),
# or leave it stopped ("no").
RestartPolicy = Literal["no", "always", "on-failure"]
VolumeNameStr = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
# Where a volume may not go: the kernel's own filesystems, mounted by every container.
RESERVED_PATHS = ("/proc", "/sys", "/dev")


def _mount_path(path: str) -> str:
    """An absolute, plain path inside the container: no `..`, no `.`, no empty part, not
    `/` itself and not under the kernel's filesystems (runc would mount over them)."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    parts = path[1:].split("/")
    if path == "/" or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path!r} is not a plain path below / (no '..', '.', '//', trailing /)")
    if any(path == r or path.startswith(r + "/") for r in RESERVED_PATHS):
        raise ValueError(f"{path!r} is inside {', '.join(RESERVED_PATHS)}: refused")
    return path


MountPathStr = Annotated[
    str,
    StringConstraints(pattern=r"^/[^\x00:]{1,4095}$"),
    AfterValidator(_mount_path),
    Field(description="an absolute path inside the container, below /"),
]


class VolumeMount(Part):
    """A named volume of the container's host, bind-mounted at `path`. It moves with its
    container (services/runtime/volumes.py); a new one starts with what the image has there."""

    name: VolumeNameStr
    path: MountPathStr
    readonly: bool = False


def _distinct_volumes(volumes: tuple[VolumeMount, ...]) -> tuple[VolumeMount, ...]:
    for what in ("name", "path"):
        seen: set[str] = set()
        for volume in volumes:
            value = getattr(volume, what)
            if value in seen:
                raise ValueError(f"volume {what} {value!r} appears twice")
            seen.add(value)
    return volumes


Volumes = Annotated[
    tuple[VolumeMount, ...], Field(max_length=16), AfterValidator(_distinct_volumes)
]


class ContainerSpec(Part):
    """What a container is, wherever it runs: the host running it makes its config.json
    from this (services/runtime/bundle.py), never from bytes another host sent.

    A field that changes what runs (user, capabilities, ...) comes with a new
    `spec_version`, so a host that does not know it refuses the spec instead of ignoring it.
    Version 2: the process's user, working directory, host name, CPU and /dev/shm sizes,
    labels and capabilities (version 1 ran every container as root with three of them).
    Version 3: volumes and the restart policy. Version 4: where it may run (constraints).
    """

    spec_version: Literal[1, 2, 3, 4] = 1
    layers: LayerStack
    image: ImageNameStr | None = Field(
        default=None, description="the image the layers came from, if any (informational)"
    )
    args: tuple[Arg, ...] = Field(min_length=1, description="the command and its arguments")
    env: tuple[EnvVar, ...] = ()
    memory_mib: int | None = Field(default=None, ge=4, le=65536)
    user: ProcessUser | None = Field(default=None, description="None: root (0:0)")
    workdir: WorkdirStr = "/"
    hostname: HostnameStr | None = Field(default=None, description="None: the container's name")
    cpus: float | None = Field(default=None, gt=0, le=1024, description="a CFS quota, in CPUs")
    capabilities: tuple[Capability, ...] | None = Field(
        default=None, description="None: version 1's (AUDIT_WRITE, KILL, NET_BIND_SERVICE)"
    )
    shm_mib: int = Field(default=64, ge=1, le=65536, description="the size of /dev/shm")
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    volumes: Volumes = ()
    restart: RestartPolicy = "no"
    constraints: Constraints = Field(default_factory=Constraints)

    @model_validator(mode="after")
    def _version_holds_its_fields(self) -> Self:
        for version, fields in ((2, _VERSION_2), (3, _VERSION_3), (4, _VERSION_4)):
            if self.spec_version >= version:
                continue
            defaults = {
                name: ContainerSpec.model_fields[name].get_default(call_default_factory=True)
                for name in fields
            }
            used = [name for name in fields if getattr(self, name) != defaults[name]]
            if used:
                verb = "needs" if len(used) == 1 else "need"
                raise ValueError(f"{', '.join(used)} {verb} spec_version {version}")
        return self

    @property
    def granted_capabilities(self) -> tuple[str, ...]:
        return VERSION_1_CAPABILITIES if self.capabilities is None else self.capabilities


class CreateContainer(_Layered):
    """Start a new container on the host that receives this request. The CLI has already
    merged the image's run config with the options (workflows/container_process.py); the
    host resolves a user name in the image's own /etc/passwd."""

    name: ContainerNameStr
    layers: LayerStack
    image: ImageNameStr | None = Field(
        default=None, description="the image the layers came from, if any (informational)"
    )
    args: tuple[Arg, ...] = Field(min_length=1, description="the command and its arguments")
    memory_mib: int | None = Field(default=None, ge=4, le=65536)
    env: tuple[EnvVar, ...] = ()
    user: UserStr | None = Field(default=None, description="UID[:GID] or NAME[:GROUP]; None: root")
    workdir: WorkdirStr = "/"
    hostname: HostnameStr | None = None
    cpus: float | None = Field(default=None, gt=0, le=1024)
    capabilities: tuple[Capability, ...] = DEFAULT_CAPABILITIES
    shm_mib: int = Field(default=64, ge=1, le=65536)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    volumes: Volumes = ()
    restart: RestartPolicy = "no"
    constraints: Constraints = Field(default_factory=Constraints)
    placed: PlacementTicket | None = Field(
        default=None,
        description="the fleet controller's decision to put it here; the host checks its term",
    )

    def spec(self, user: ProcessUser | None) -> ContainerSpec:
        """The container this request asks for, with its user as the host resolved it
        (a version only when it needs it, so a host of the release before still reads it)."""
        return ContainerSpec(
            spec_version=4
            if self.constraints != Constraints()
            else 3
            if self.volumes or self.restart != "no"
            else 2,
            layers=self.layers,
            image=self.image,
            args=self.args,
            env=self.env,
            memory_mib=self.memory_mib,
            user=user,
            workdir=self.workdir,
            hostname=self.hostname,
            cpus=self.cpus,
            capabilities=self.capabilities,
            shm_mib=self.shm_mib,
            labels=self.labels,
            volumes=self.volumes,
            restart=self.restart,
            constraints=self.constraints,
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


class ListVolumes(Message):
    """Ask a host which volumes it holds."""


class HostVolume(Part):
    """One volume as a host holds it."""

    name: str
    size_bytes: int = Field(ge=0)
    created_at: float
    arrived_by: MigrationId | None = Field(
        default=None, description="the move that brought it here; None: made here"
    )


class VolumeList(Message):
    """Reply to ListVolumes."""

    host: str
    volumes: tuple[HostVolume, ...]


class RemoveVolume(Message):
    """Remove a volume no container uses, and its data."""

    name: VolumeNameStr


class VolumeRemoved(Message):
    """Reply: the volume and its data are gone from the host."""

    name: str
    host: str
    size_bytes: int = Field(ge=0)


MAX_LOG_LINES = 10_000


class ReadLogs(Message):
    """Ask the host running a container for its stdout and stderr (one stream, in order)."""

    name: ContainerNameStr
    tail: int | None = Field(default=None, ge=0, le=MAX_LOG_LINES, description="the last N")
    after: str | None = Field(
        default=None,
        max_length=65536,
        pattern=r"^[0-9]+(,@[0-9a-f]{24}\.[su])*$",
        description="a cursor from an earlier reply: only what came since",
    )


class LogLine(Part):
    at: float | None = Field(description="when the host's logger read it (UTC seconds)")
    text: str


class ContainerLogs(Message):
    """Reply to ReadLogs: at most MAX_LOG_LINES lines, oldest first, and where to go on."""

    host: str
    name: str
    lines: tuple[LogLine, ...]
    cursor: str
