"""This host's CPU as a registration carries it, and `criu cpuinfo check` of an image: the
real CRIU, on this machine's CPU (root: in CI a missing CRIU is a failure, not a skip)."""

from __future__ import annotations

import base64
import io
import os
from types import SimpleNamespace
from typing import Any, cast

import pytest

from schemas.v1.containers import Placement
from schemas.v1.hosts import CpuFacts, HostRegistration
from schemas.v1.migrations import HostCheck
from schemas.v2.migrations import StepCommand
from services.destination.handlers import Destination
from services.errors import RuntimeFailure
from services.runtime import cmdlines, cpuinfo
from services.saga.steps import StepRun
from tests.support import records

# Instruction bits CRIU's default check (--cpu-cap fpu,ins) compares, as (capability word,
# bit, name) of compel's cpu.h, that one CPU or another lacks: AMD's, Intel's Xeon Phi's.
DEMANDABLE = [
    (6, 6, "sse4a"), (6, 11, "xop"), (6, 16, "fma4"), (6, 21, "tbm"),
    (13, 0, "clzero"), (18, 2, "avx512_4vnniw"), (18, 3, "avx512_4fmaps"),
]  # fmt: skip


@pytest.fixture
def real_criu() -> None:
    missing = None
    if os.geteuid() != 0:
        missing = "needs root: CRIU wants CAP_SYS_ADMIN"
    elif not os.access(cmdlines.CRIU, os.X_OK):
        missing = f"{cmdlines.CRIU} is not installed (run `make setup`)"
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(missing)
    pytest.skip(missing)


def _decoded(image_b64: str) -> dict[str, Any]:
    import pycriu

    image: dict[str, Any] = pycriu.images.load(io.BytesIO(base64.b64decode(image_b64)))
    return image


def _encoded(image: dict[str, Any]) -> str:
    import pycriu

    out = io.BytesIO()
    pycriu.images.dump(image, out)
    return base64.b64encode(out.getvalue()).decode()


def _demanding(image_b64: str) -> tuple[str, str]:
    """The image, asking for an instruction set this CPU lacks; and which."""
    image = _decoded(image_b64)
    words = image["entries"][0]["x86_entry"][0]["capability"]
    for word, bit, name in DEMANDABLE:
        if not words[word] >> bit & 1:
            words[word] |= 1 << bit
            return _encoded(image), name
    raise AssertionError("this CPU has every instruction set the test could demand")


def test_proc_cpuinfo_gives_the_first_cpus_model_and_sorted_flags() -> None:
    text = (
        "processor\t: 0\nmodel name\t: Example CPU @ 2.00GHz\nflags\t\t: sse2 fpu avx fpu\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: sse2\n"
    )
    assert cpuinfo.parse_cpuinfo(text) == ("Example CPU @ 2.00GHz", ("avx", "fpu", "sse2"))
    assert cpuinfo.parse_cpuinfo("Features\t: fp asimd\n") == ("", ("asimd", "fp"))


async def test_the_facts_are_this_machines_cpu_and_its_image(real_criu: None) -> None:
    facts = await cpuinfo.cpu_facts()
    model, flags = cpuinfo.parse_cpuinfo(cpuinfo.PROC_CPUINFO.read_text())
    assert (facts.model, facts.flags) == (model, flags)
    assert facts.model and "fpu" in facts.flags
    assert facts.criu_image is not None, facts.missing
    assert facts.missing == ""
    assert len(facts.criu_image) < 1024, "small enough to ride in every registration"
    entry = _decoded(facts.criu_image)["entries"][0]["x86_entry"][0]
    assert entry["capability"], "CRIU's image of this CPU: its capability words"


async def test_this_cpu_has_what_it_started_with(real_criu: None) -> None:
    facts = await cpuinfo.cpu_facts()
    assert facts.criu_image is not None, facts.missing
    assert await cpuinfo.check_cpu(facts.criu_image) is None


async def test_an_image_demanding_a_missing_instruction_set_fails(real_criu: None) -> None:
    facts = await cpuinfo.cpu_facts()
    assert facts.criu_image is not None, facts.missing
    demanding, name = _demanding(facts.criu_image)
    reason = await cpuinfo.check_cpu(demanding)
    assert reason is not None, f"{name} demanded, yet the check passed"
    assert "CPU instruction capabilities do not match run time" in reason, reason


async def test_an_image_criu_cannot_read_is_no_verdict(real_criu: None) -> None:
    with pytest.raises(RuntimeFailure, match="could not judge"):
        await cpuinfo.check_cpu(base64.b64encode(b"not an image").decode())
    with pytest.raises(RuntimeFailure, match="not base64"):
        await cpuinfo.check_cpu("***")


def _registration(cpu: CpuFacts | None) -> HostRegistration:
    return HostRegistration(host="h1", address="10.0.0.1", registered_at=0.0, cpu=cpu)


async def test_the_destinations_verdict_on_its_sources_cpu(real_criu: None) -> None:
    facts = await cpuinfo.cpu_facts()
    assert facts.criu_image is not None, facts.missing
    ok, said = await cpuinfo.judge_source("h1", _registration(facts), "web")
    assert (ok, said) == (True, "this CPU has every feature h1 started web with")
    demanding, _ = _demanding(facts.criu_image)
    lacking = facts.model_copy(update={"criu_image": demanding})
    ok, said = await cpuinfo.judge_source("h1", _registration(lacking), "web")
    assert ok is False and "do not match run time" in said and "h1" in said, said


async def test_a_source_without_an_image_is_not_checked() -> None:
    ok, said = await cpuinfo.judge_source("h1", _registration(None), "web")
    assert ok is None and said.startswith("not checked") and "older agent" in said
    no_image = CpuFacts(model="x", missing="criu cpuinfo dump exited 1: boom")
    ok, said = await cpuinfo.judge_source("h1", _registration(no_image), "web")
    assert ok is None and "boom" in said, said
    ok, said = await cpuinfo.judge_source("h1", None, "web")
    assert ok is None, said


class _OneHost:
    """The placement store and the host registry, as far as the CPU check reads them."""

    def __init__(self, source: HostRegistration) -> None:
        self.source = source

    async def get(self, name: str) -> tuple[Placement, int] | None:
        return (records.placement(name, self.source.host), 1) if name == "web" else None

    async def registered(self, host: str) -> HostRegistration | None:
        return self.source if host == self.source.host else None

    async def address_of(self, host: str) -> str:
        return self.source.address


class _NoOtherChecks:
    config = SimpleNamespace(host="h2")

    async def check(self, name: str, needed_bytes: int) -> list[tuple[str, bool, str]]:
        return []


def _destination(source: HostRegistration) -> Destination:
    hosts = _OneHost(source)
    return Destination(
        side=cast(Any, _NoOtherChecks()), containers=cast(Any, None), placements=cast(Any, hosts),
        state_dir=cast(Any, None), peers=hosts,
    )  # fmt: skip


async def test_the_destinations_dry_run_and_prepare_refuse_a_cpu_lacking_features(
    real_criu: None,
) -> None:
    facts = await cpuinfo.cpu_facts()
    assert facts.criu_image is not None, facts.missing
    same = _destination(_registration(facts))
    reply = await same.check(HostCheck(container="web", side="destination"))
    assert [(c.check, c.ok) for c in reply.checks] == [("CPU features", True)], reply
    demanding, _ = _demanding(facts.criu_image)
    lacking = _destination(_registration(facts.model_copy(update={"criu_image": demanding})))
    reply = await lacking.check(HostCheck(container="web", side="destination"))
    assert [(c.check, c.ok) for c in reply.checks] == [("CPU features", False)], reply
    assert "do not match run time" in reply.checks[0].detail
    record = records.migration_record(container="web", source="h1", destination="h2")
    command = StepCommand(
        migration_id=record.id, step="prepare_destination", attempt=1, host="h2",
        role="destination",
    )  # fmt: skip

    async def progress(text: str, done: int | None = None, total: int | None = None) -> None:
        pass

    with pytest.raises(RuntimeFailure, match="do not match run time") as refused:
        await lacking.prepare_destination(StepRun(command, record), progress)
    assert refused.value.retryable is False
