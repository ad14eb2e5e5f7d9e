"""What each saga step hands on to the steps after it, as typed results in the record.

One model per step (or compensation) that produces something; `StepResults` holds them by
step name. A step reads an earlier step's result from the record, never from a message.
"""

from __future__ import annotations

from pydantic import Field

from schemas.v1.base import Part
from schemas.v1.types import EndpointStr


class StepResult(Part):
    """Base of every step's result."""


class PreflightResult(StepResult):
    """The container runs on the source; the ports it listens on must listen again."""

    listening_ports: tuple[int, ...] = ()
    source_pid: int = Field(ge=1)


class PrepareResult(StepResult):
    """The destination is ready: layers here, netns held, page server up (stop-and-copy)."""

    layers_fetched: int = Field(default=0, ge=0)
    layers_present: int = Field(default=0, ge=0)
    layer_bytes_fetched: int = Field(default=0, ge=0)
    page_server: EndpointStr | None = Field(
        default=None, description="address:port of the page server"
    )


class PresyncResult(StepResult):
    """The container's files went ahead of the freeze."""

    presync_bytes: int = Field(ge=0)
    presync_ms: int = Field(ge=0)


class PrecopyResult(StepResult):
    """Pre-copy rounds ended; the final dump goes to `page_server`, chained to round N."""

    page_server: EndpointStr
    precopy_rounds: int = Field(ge=1)
    precopy_reason: str
    precopy_expected_downtime_ms: float | None = None


class DumpResult(StepResult):
    """The container is frozen and dumped on the source."""

    frozen_at: float
    dump_ms: int = Field(ge=0)
    pages_written: int = Field(default=0, ge=0)
    criu_freezing_us: int = 0
    criu_frozen_us: int = 0
    criu_memdump_us: int = 0
    criu_memwrite_us: int = 0
    lazy_pages: EndpointStr | None = Field(
        default=None, description="post-copy: where the source serves its pages (address:port)"
    )
    pause_ms: int | None = Field(
        default=None, ge=0, description="the source's own freeze (runc pause) before CRIU ran"
    )
    link_handover_ms: int | None = Field(
        default=None,
        ge=0,
        description="freeze -> the destination had taken the container's link (None: it did not)",
    )


class TransferResult(StepResult):
    """Images and the file delta arrived, sha256-checked (config.json is made at restore)."""

    transfer_bytes: int = Field(ge=0)
    transfer_ms: int = Field(ge=0)
    transfer_sha256: str
    delta_entries: int = Field(default=0, ge=0)
    volume_bytes: int = Field(default=0, ge=0, description="the volumes' deltas (in the freeze)")
    volume_ms: int = Field(default=0, ge=0, description="how long the volumes' part took")


class RestoreResult(StepResult):
    """The container runs on the destination behind a held network."""

    running_at: float
    freeze_ms: int = Field(ge=0)
    criu_restore_us: int = 0
    pages_restored: int = 0


class VerifyResult(StepResult):
    restored_pid: int = Field(ge=1)


class OpenNetworkResult(StepResult):
    """The destination's network opened; what waited in its hold went through first."""

    frozen_to_open_ms: int = Field(ge=0)
    opened_at: float | None = Field(
        default=None, description="when the hold was released (the destination's clock)"
    )
    held_in: int | None = Field(default=None, ge=0, description="packets for it that waited")
    held_out: int | None = Field(default=None, ge=0, description="packets from it that waited")
    hold_lost: int | None = Field(
        default=None, ge=0, description="packets the kernel dropped: the hold's queue was full"
    )
    hold_ms: float | None = Field(
        default=None, ge=0, description="from the first packet held to the release"
    )


class DrainResult(StepResult):
    drain_ms: int = Field(ge=0)


class CleanSourceResult(StepResult):
    """Post-copy: how the source's CRIU ended and how many pages it served."""

    source_criu_rc: int
    pages_served: int = Field(default=0, ge=0)


class ResumeResult(StepResult):
    resumed: str = Field(description="how the source got its container back")


class StepResults(Part):
    """Every step's result so far, by step name; None until that step has succeeded."""

    preflight: PreflightResult | None = None
    prepare_destination: PrepareResult | None = None
    presync_files: PresyncResult | None = None
    precopy_rounds: PrecopyResult | None = None
    dump: DumpResult | None = None
    transfer: TransferResult | None = None
    restore: RestoreResult | None = None
    verify: VerifyResult | None = None
    open_network: OpenNetworkResult | None = None
    drain_pages: DrainResult | None = None
    clean_source: CleanSourceResult | None = None
    resume_source: ResumeResult | None = None

    def with_result(self, step: str, result: StepResult) -> StepResults:
        """These results plus `step`'s; a result of the wrong type for the step is a bug."""
        field = type(self).model_fields.get(step)
        if field is None:
            raise ValueError(f"step {step!r} has no result slot")
        expected = RESULT_TYPES[step]
        if not isinstance(result, expected):
            raise TypeError(f"{step} returns {expected.__name__}, not {type(result).__name__}")
        return self.model_copy(update={step: result})


RESULT_TYPES: dict[str, type[StepResult]] = {
    "preflight": PreflightResult,
    "prepare_destination": PrepareResult,
    "presync_files": PresyncResult,
    "precopy_rounds": PrecopyResult,
    "dump": DumpResult,
    "transfer": TransferResult,
    "restore": RestoreResult,
    "verify": VerifyResult,
    "open_network": OpenNetworkResult,
    "drain_pages": DrainResult,
    "clean_source": CleanSourceResult,
    "resume_source": ResumeResult,
}
