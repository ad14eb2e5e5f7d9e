"""The CPU a host's processes start on, and whether this CPU can run what another started.

A process restored on a CPU without an instruction it found at start (AVX-512, say) dies
with SIGILL. CRIU's own restore does not look: its default --cpu-cap (fpu,ins) lacks
"image", so a dump writes no cpuinfo.img and a restore checks nothing. So each host puts
`criu cpuinfo dump`'s image in its registration, and a destination runs `criu cpuinfo
check` on its source's image before it takes a container. That check (default cap fpu,ins;
criu/arch/x86/cpu.c) wants every FPU feature (fpu, fxsr, osxsave, xsaves) and every xsave
feature of the image here, the same xsave sizes, and every instruction-set bit it knows of
(SSE4, AVX*, BMI, SHA, ...) — more here is fine, except a bigger xsave area.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path

from schemas.v1.hosts import CpuFacts, HostRegistration
from services.errors import RuntimeFailure
from services.runtime import cmdlines
from services.runtime.criu import HARMLESS_ERRORS
from services.runtime.proc import arun

PROC_CPUINFO = Path("/proc/cpuinfo")
IMAGE = "cpuinfo.img"
CHECK = "CPU features"
CRIU_TIMEOUT_S = 30.0
# What cpu_validate_features (criu/arch/x86/cpu.c) says when this CPU lacks what the image
# demands; any other failure (no image, a corrupt or unknown one) is CRIU unable to judge.
LACKING = ("do not match run time", "not supported on host", "unsupported bits", "size mismatch")


def criu_cpuinfo(action: str, images: Path) -> list[str]:
    """`criu cpuinfo dump|check`: this CPU into images/cpuinfo.img, or checked against it."""
    return [cmdlines.CRIU, "cpuinfo", action, "-D", str(images)]


def parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """The first CPU's model name and its flags, sorted (arm64 calls them Features)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", fields.get("Features", ""))
    return fields.get("model name", ""), tuple(sorted(set(flags.split())))


def _said(out: str) -> str:
    """CRIU's own lines, without the errors it reports on every run (criu.HARMLESS_ERRORS)."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return "; ".join(line for line in lines if not any(h in line for h in HARMLESS_ERRORS))


async def cpu_facts() -> CpuFacts:
    """This host's CPU; never raises: what could not be learned is said in `missing`."""
    try:
        model, flags = parse_cpuinfo(PROC_CPUINFO.read_text())
    except OSError as exc:
        return CpuFacts(missing=f"{PROC_CPUINFO} unreadable: {exc}")
    try:
        image = await _dump_image()
    except RuntimeFailure as exc:
        return CpuFacts(model=model, flags=flags, missing=exc.reason)
    return CpuFacts(model=model, flags=flags, criu_image=base64.b64encode(image).decode())


async def _dump_image() -> bytes:
    with tempfile.TemporaryDirectory(prefix="ferry-cpuinfo-") as tmp:
        done = await arun(criu_cpuinfo("dump", Path(tmp)), check=False, timeout=CRIU_TIMEOUT_S)
        image = Path(tmp) / IMAGE
        if done.returncode != 0 or not image.exists():
            said = _said(done.stderr + done.stdout) or "no output"
            raise RuntimeFailure(f"criu cpuinfo dump exited {done.returncode}: {said}")
        return image.read_bytes()


async def check_cpu(image_b64: str) -> str | None:
    """None when this CPU has every feature the image's CPU had; else why, with CRIU's
    words. RuntimeFailure when CRIU could not judge (a bad image, CRIU missing or stuck)."""
    try:
        image = base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RuntimeFailure(f"the cpuinfo image is not base64: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="ferry-cpuinfo-") as tmp:
        (Path(tmp) / IMAGE).write_bytes(image)
        done = await arun(criu_cpuinfo("check", Path(tmp)), check=False, timeout=CRIU_TIMEOUT_S)
    if done.returncode == 0:
        return None
    said = _said(done.stderr + done.stdout) or "no output"
    if not any(words in said for words in LACKING):
        raise RuntimeFailure(f"criu cpuinfo check could not judge (exit {done.returncode}): {said}")
    return f"this CPU lacks what the image's CPU had (criu cpuinfo check): {said}"


async def judge_source(
    source: str, registration: HostRegistration | None, container: str
) -> tuple[bool | None, str]:
    """Whether this CPU has every feature `source`'s CPU had, where `container` started:
    True, False (why, in CRIU's words) or None (not checked, and why)."""
    cpu = registration.cpu if registration is not None else None
    if cpu is None:
        return None, f"not checked: {source} did not say what CPU it has (an older agent)"
    if cpu.criu_image is None:
        return None, f"not checked: {source} has no CPU image ({cpu.missing or 'not said why'})"
    try:
        lacking = await check_cpu(cpu.criu_image)
    except RuntimeFailure as exc:
        return None, f"not checked: {exc.reason}"
    if lacking is not None:
        return False, f"{lacking}; {container} started on {source} ({cpu.model or 'model unknown'})"
    return True, f"this CPU has every feature {source} started {container} with"
