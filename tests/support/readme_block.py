"""The README's "Run on your machines" block: found, split into its steps, and mapped onto a lab.

Pure: text in, text out. The only changes ever made to the block's text are the ones
`Mapping` lists (example addresses, install paths, the machine a step runs on); the caller
replaces `systemctl enable --now UNIT` with what systemd would do (`systemd_unit.py`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from enum import Enum

MARKER = "<!-- run-on-your-machines"
STEP_LINE = re.compile(r"^# (\d+)\. (.+?):", re.MULTILINE)
EXAMPLE = re.compile(r"\(here (\w+) at ([\d.]+)")
SYSTEMCTL = re.compile(r"^systemctl enable --now ([\w.-]+)$")
EXAMPLE_MGMT = "10.9.0."  # the block's management network, 10.9.0.0/24
EXAMPLE_DC = "10.1.0."  # the block's containers' network, 10.1.0.0/24
INSTALL_SRC = "/opt/ferry/src"
INSTALL_BIN = "/opt/ferry/venv/bin"


class Role(Enum):
    OPERATOR = "operator"
    NATS = "each NATS machine"
    HOST = "each host"


@dataclass(frozen=True)
class Step:
    """One `# N. who: …` part of the block, as written."""

    number: int
    role: Role
    text: str
    example: tuple[str, str] | None  # (name, address) the text shows, for a per-machine step


@dataclass(frozen=True)
class Command:
    """A piece of a step: shell text to run, or a unit to start as `systemctl` would."""

    shell: str = ""
    unit: str = ""


def block(readme: str) -> str:
    """The fenced bash block right after the marker comment."""
    start = readme.index(MARKER)
    fence = readme.index("```bash\n", start) + len("```bash\n")
    return readme[fence : readme.index("\n```", fence) + 1]


def steps(text: str) -> list[Step]:
    heads = list(STEP_LINE.finditer(text))
    found = []
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        body = text[head.start() : nxt.start() if nxt else len(text)]
        who = head.group(2)
        role = next(r for r in Role if who.startswith(r.value))
        example = EXAMPLE.search(who)
        found.append(
            Step(int(head.group(1)), role, body, example.groups() if example else None)  # type: ignore[arg-type]
        )
    return found


def commands(text: str) -> list[Command]:
    """The step's text cut at each `systemctl enable --now UNIT` line, in order."""
    out: list[Command] = []
    shell: list[str] = []
    for line in text.splitlines(keepends=True):
        unit = SYSTEMCTL.match(line.strip())
        if unit is None:
            shell.append(line)
            continue
        if "".join(shell).strip():
            out.append(Command(shell="".join(shell)))
        shell = []
        out.append(Command(unit=unit.group(1)))
    if "".join(shell).strip():
        out.append(Command(shell="".join(shell)))
    return out


@dataclass(frozen=True)
class Mapping:
    """Every change made to the block's (and the units') text before it runs."""

    mgmt_prefix: str  # the lab's management /24, e.g. "10.201.7."
    dc_prefix: str  # the lab's datacenter /24
    repo: str  # stands for /opt/ferry/src
    venv_bin: str  # stands for /opt/ferry/venv/bin

    def for_machine(self, step: Step, name: str, address: str) -> str:
        """The step as written for `name` at `address` (an example-network address), as the
        block's "n2, n3 the same with their name and address" says."""
        assert step.example is not None
        shown, shown_address = step.example
        text = re.sub(rf"\b{re.escape(shown)}\b", name, step.text)
        return re.sub(rf"{re.escape(shown_address)}\b", address, text)

    def text(self, text: str) -> str:
        return (
            text.replace(EXAMPLE_MGMT, self.mgmt_prefix)
            .replace(EXAMPLE_DC, self.dc_prefix)
            .replace(INSTALL_SRC, self.repo)
            .replace(INSTALL_BIN, self.venv_bin)
        )


def prefix(network: str) -> str:
    """ "10.201.7.0/24" -> "10.201.7." (the block's networks are all /24s)."""
    assert network.endswith(".0/24"), network
    return network[: -len("0/24")]


def exec_argv(exec_start: str) -> list[str]:
    """A unit's ExecStart= as argv (no `-`/`@`/`+` prefixes or specifiers are used)."""
    return shlex.split(exec_start)
