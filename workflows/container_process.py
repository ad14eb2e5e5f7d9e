"""What a container runs, from its image's run config and the options it was started with,
the way Docker does it. Pure: the CLI calls it, the host resolves the user name later.

- The command: the entrypoint (`--entrypoint`, else the image's) followed by the arguments
  after `--`, else the image's Cmd — which `--entrypoint` clears, as in Docker.
- The environment: the image's, then `--env-file`s, then `--env`; a later value of a name
  replaces the earlier one in place.
- The user and working directory: the option, else the image's, else root and `/`.
- Labels: the image's, then `--label`.
- Capabilities: Docker's default set; `--cap-drop ALL` empties it, `--cap-add ALL` fills it,
  then the named ones are added and dropped. Names may leave out `CAP_` and be lowercase.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.v1.containers import ALL_CAPABILITIES, DEFAULT_CAPABILITIES, ImageConfig


class OptionError(ValueError):
    """A run option that cannot be honoured; `field` names the option."""

    def __init__(self, reason: str, field: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


@dataclass(frozen=True)
class RunOptions:
    command: tuple[str, ...] = ()  # after `--`
    entrypoint: tuple[str, ...] | None = None  # --entrypoint; () clears the image's
    env: tuple[str, ...] = ()  # NAME=value, env files first, in the order given
    user: str | None = None
    workdir: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Process:
    args: tuple[str, ...]
    env: tuple[str, ...]
    user: str | None
    workdir: str
    labels: dict[str, str]
    capabilities: tuple[str, ...]


def merged_env(*layers: Sequence[str]) -> tuple[str, ...]:
    """NAME=value lists merged: a later NAME replaces the earlier value where it stood."""
    values: dict[str, str] = {}
    for entries in layers:
        for entry in entries:
            name, sep, value = entry.partition("=")
            if not sep or not name:
                raise OptionError(f"{entry!r} is not NAME=value", "--env")
            values[name] = value
    return tuple(f"{name}={value}" for name, value in values.items())


def capability_name(raw: str, option: str) -> str:
    name = raw.strip().upper()
    if name == "ALL":
        return name
    name = name if name.startswith("CAP_") else f"CAP_{name}"
    if name not in ALL_CAPABILITIES:
        raise OptionError(f"{raw!r} is not a Linux capability (e.g. NET_ADMIN, SYS_PTRACE)", option)
    return name


def capabilities(cap_add: Sequence[str], cap_drop: Sequence[str]) -> tuple[str, ...]:
    add = [capability_name(c, "--cap-add") for c in cap_add]
    drop = [capability_name(c, "--cap-drop") for c in cap_drop]
    both = sorted((set(add) & set(drop)) - {"ALL"})
    if both:
        raise OptionError(f"{', '.join(both)} both added and dropped", "--cap-add")
    granted: list[str] = [] if "ALL" in drop else list(DEFAULT_CAPABILITIES)
    if "ALL" in add:
        granted = list(ALL_CAPABILITIES)
    granted += [c for c in add if c != "ALL" and c not in granted]
    return tuple(c for c in granted if c not in drop)


def process_for(image: ImageConfig | None, options: RunOptions) -> Process:
    """The process a container runs, as Docker would start it (see the module docstring)."""
    config = image or ImageConfig()
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    if options.entrypoint is not None:
        entrypoint, cmd = options.entrypoint, ()
    else:
        entrypoint, cmd = config.entrypoint, config.cmd
    args = (*entrypoint, *(options.command or cmd))
    if not args:
        said = "the image has neither Entrypoint nor Cmd" if image else "no image to take it from"
        raise OptionError(f"no command given ({said}; put it after `--`)", "CMD")
    return Process(
        args=args,
        env=merged_env(config.env, options.env),
        user=options.user or config.user,
        workdir=options.workdir or config.working_dir or "/",
        labels={**config.labels, **options.labels},
        capabilities=capabilities(options.cap_add, options.cap_drop),
    )


def parse_env_file(text: str, environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    """An env file as Docker reads one: NAME=value per line, `#` comments and blank lines
    skipped, a bare NAME taken from `environ` (left out when unset there)."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, _ = line.lstrip().partition("=")
        if not key or any(c.isspace() for c in key):
            raise OptionError(f"{name}:{number}: {line!r} is not NAME=value", "--env-file")
        if sep:
            found.append(line.lstrip())
        elif key in environ:
            found.append(f"{key}={environ[key]}")
    return tuple(found)


def parse_volume(text: str) -> tuple[str, str, bool]:
    """`--volume NAME:/path[:ro|:rw]` as (name, path, readonly); the name and path are
    checked by VolumeMount."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise OptionError(f"{text!r} is not NAME:/PATH[:ro]", "--volume")
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise OptionError(f"{text!r}: the mode is ro or rw, not {mode!r}", "--volume")
    return parts[0], parts[1], mode == "ro"
