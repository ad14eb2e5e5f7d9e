"""Request intake: validate a migration request, lock the container, start the saga.

Answered on ferry.v1.migrations.request by a queue group of source workers: any host can
take a request, and no central coordinator is needed. Only the host that holds a container
may lock its placement, so a host that takes a request for a container held elsewhere
checks it and passes it on to the holder's intake, which checks it again and locks.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from opentelemetry import propagate, trace
from pydantic import ValidationError

from schemas import subjects
from schemas.v1.containers import Placement
from schemas.v1.fleet import PlaceContainer, PlacementChoice
from schemas.v1.hosts import HostRegistration
from schemas.v1.migrations import (
    CancelAccepted,
    CancelRequest,
    CheckResult,
    DryRunReport,
    ForwardedRequest,
    HostCheck,
    HostCheckReply,
    MigrationAccepted,
    MigrationRequest,
    StrategyChoice,
)
from schemas.v2.forecast import FreezeForecast
from schemas.v2.migrations import MigrationOptions, MigrationRecord
from services import bus, preflight, tracing
from services.errors import Conflict, FerryError, InvalidInput, NotFound, Unavailable
from services.fleet_state import FleetClient
from services.forecasting import FreezeInputs, NothingKnown
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from services.saga.publish import publish_decision
from services.saga.transitions import compare_and_set
from services.tracecontext import new_traceparent
from workflows.definitions import DEFINITIONS
from workflows.freeze_forecast import forecast
from workflows.saga import begin, request_cancel
from workflows.strategy import (
    DIRTY_TRACKING,
    GUIDE_MS,
    HostFeatures,
    OverBudget,
    StrategyUnavailable,
    choose,
    choose_within_budget,
)

SUPPORTED_SCHEMA_VERSIONS = (1,)
FORWARD_TIMEOUT_S = 20.0


def parse_request(data: bytes) -> MigrationRequest:
    """The request, or InvalidInput naming the field at fault."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JSON: {exc}", field="body") from exc
    if not isinstance(raw, dict):
        raise InvalidInput("must be a JSON object", field="body")
    version = raw.get("schema_version", 1)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise InvalidInput(
            f"unsupported schema_version {version!r}; this Ferry speaks"
            f" {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}",
            field="schema_version",
        )
    try:
        request = MigrationRequest.model_validate(raw)
    except ValidationError as exc:
        raise bus.validation_error(exc) from exc
    if request.inject_fault and os.environ.get("FERRY_ALLOW_FAULTS") != "1":
        raise InvalidInput(
            "fault injection is off on these hosts (start the lab with --allow-faults)",
            field="inject_fault",
        )
    return request


async def _host_check(nc: NATS, host: str, check: HostCheck) -> HostCheckReply:
    subject = subjects.host_request(host, f"{subjects.HOST_CHECK}.{check.side}")
    try:
        return await bus.request(
            nc, subject, check, HostCheckReply, timeout=30, what=f"pre-flight on {host}"
        )
    except FerryError as exc:
        failed = CheckResult(host=host, check="host answers", ok=False, detail=exc.reason)
        return HostCheckReply(checks=(failed,))


def _features(host: str, registration: HostRegistration | None) -> HostFeatures:
    if registration is None:
        return HostFeatures(host, (), {})
    return HostFeatures(host, registration.features, registration.missing)


def _options(request: MigrationRequest) -> MigrationOptions:
    """What the steps need to know of the request."""
    limit = request.bandwidth_limit_mib_s
    return MigrationOptions(
        # Pre-copy plans its rounds for the budget, or for QEMU's default without one.
        downtime_budget_ms=request.downtime_budget_ms or GUIDE_MS,
        compress=request.compress,
        block_deltas=request.block_deltas,
        bandwidth_limit_bps=max(round(limit * 2**20), 1) if limit else None,
        inject_fault=request.inject_fault,
    )


class Intake:
    """Turns a valid request into a running saga, or refuses it and changes nothing."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        placements: KvPlacementStore,
        migrations: KvMigrationStore,
        hosts: KvHostDirectory,
        *,
        host: str | None = None,
        freeze_inputs: FreezeInputs | None = None,
        fleet: FleetClient | None = None,
    ) -> None:
        # The host this intake runs on: only a container's holder may lock it, so a request
        # for a container held elsewhere goes on to its holder. None: take every request.
        self.host = host
        self.nc = nc
        self.js = js
        self.placements = placements
        self.migrations = migrations
        self.hosts = hosts
        self.freeze_inputs = freeze_inputs or NothingKnown()
        # The fleet controller, asked where each move goes (or whether the named host
        # fits) and for room there. None: a deployment without one (tests of the saga).
        self.fleet = fleet

    async def accept(
        self, data: bytes, requested_by: str = subjects.ANONYMOUS
    ) -> MigrationAccepted | DryRunReport:
        return await self.take(parse_request(data), requested_by)

    async def accept_forwarded(self, forwarded: ForwardedRequest) -> MigrationAccepted:
        """A request another host's intake passed on because this host holds the container."""
        taken = await self.take(forwarded.request, forwarded.requested_by, forwarded=True)
        assert isinstance(taken, MigrationAccepted)  # dry runs are never passed on
        return taken

    async def take(
        self, request: MigrationRequest, requested_by: str, *, forwarded: bool = False
    ) -> MigrationAccepted | DryRunReport:
        found = await self.placements.get(request.container)
        if found is None:
            raise NotFound(f"no container named {request.container!r}", field="container")
        placement, revision = found
        if request.source is not None and request.source != placement.host:
            raise Conflict(
                f"{request.container} runs on {placement.host}, not {request.source}",
                field="source",
            )
        if request.destination is not None:
            await self._named_destination(request.destination, placement.host, request)
        elif self.fleet is None:
            raise InvalidInput(
                "no fleet controller serves this intake: name the destination", field="destination"
            )
        if not await self.hosts.alive(placement.host):
            raise Unavailable(f"host {placement.host} is down (no heartbeat)", field="source")
        if placement.state != "running":
            moving = f" (migration {placement.migration_id})" if placement.migration_id else ""
            raise Conflict(
                f"{request.container} is {placement.state}{moving}; try again when it is running",
                field="container",
            )
        source = await self.hosts.registered(placement.host)
        if self.host is not None and placement.host != self.host and not request.dry_run:
            # Only the holder asks for a destination and forecasts the freeze: it knows the
            # container's memory and its own earlier moves. What any intake can check, it
            # checks before passing it on.
            if request.destination is not None:
                destination = await self.hosts.registered(request.destination)
                preflight.refuse_incompatible(
                    placement.host, source, request.destination, destination
                )
                try:
                    choose(
                        request.strategy,
                        GUIDE_MS,
                        _features(placement.host, source),
                        _features(request.destination, destination),
                    )
                except StrategyUnavailable as exc:
                    raise InvalidInput(str(exc), field="strategy") from exc
            if forwarded:
                raise Conflict(
                    f"{request.container} moved to {placement.host} meanwhile; try again",
                    field="container",
                )
            return await self._forward(placement.host, request, requested_by)

        migration_id = uuid.uuid4().hex[:16]
        # The root span's ids are reserved here; the worker that ends the saga records it.
        trace_id, traceparent = new_traceparent()
        with tracing.tracer().start_as_current_span(
            "intake",
            context=propagate.extract({"traceparent": traceparent}),
            attributes={
                "ferry.migration_id": migration_id,
                "ferry.container": request.container,
                "ferry.source": placement.host,
                "ferry.host": os.environ.get("FERRY_HOST", ""),
                "ferry.requested_by": requested_by,
            },
        ) as span:
            choice = await self._place(request, placement, migration_id)
            to = choice.host if choice is not None else request.destination
            assert to is not None
            destination = await self.hosts.registered(to)
            preflight.refuse_incompatible(placement.host, source, to, destination)
            strategy, predicted = await self._choose(
                request, to, _features(placement.host, source), _features(to, destination)
            )
            span.set_attributes(
                {
                    "ferry.destination": to,
                    "ferry.strategy": strategy.chosen,
                    "ferry.strategy_reason": strategy.reason,
                    "ferry.forecast_ms": predicted.predicted_ms,
                    "ferry.forecast": predicted.line(),
                    "ferry.forecast_missing": list(predicted.missing),
                }
            )
            if request.dry_run:
                return await self.dry_run(request, placement.host, to, strategy, predicted, choice)
            # The placement is the container's lock: once it says "migrating", a second
            # request is refused, and no other host may start it.
            await self.placements.update(
                placement.model_copy(
                    update={"state": "migrating", "migration_id": migration_id, "destination": to}
                ),
                revision,
            )
        now = time.time()
        definition = DEFINITIONS[strategy.chosen]
        record = MigrationRecord(
            id=migration_id,
            container=request.container,
            source=placement.host,
            destination=to,
            strategy=strategy,
            trace_id=trace_id,
            traceparent=traceparent,
            created_at=now,
            updated_at=now,
            deadline=now,
            options=_options(request),
            requested_by=requested_by,
            forecast=predicted,
            placement=choice,
        )
        decision = begin(definition, record, now)
        await self.migrations.create(decision.record)
        await publish_decision(self.js, decision, host=self.host)
        return MigrationAccepted(id=migration_id)

    async def _named_destination(
        self, destination: str, source: str, request: MigrationRequest
    ) -> None:
        """What can be said of a destination the asker named before any controller is asked."""
        if await self.hosts.registered(destination) is None:
            known = ", ".join(await self.hosts.known_hosts()) or "none"
            raise NotFound(f"unknown host {destination!r} (known: {known})", field="destination")
        if destination == source:
            raise InvalidInput(f"{request.container} already runs on {source}", field="destination")
        if not await self.hosts.alive(destination):
            raise Unavailable(f"host {destination} is down (no heartbeat)", field="destination")

    async def _place(
        self, request: MigrationRequest, placement: Placement, migration_id: str
    ) -> PlacementChoice | None:
        """Where the fleet's scheduler puts it (judging only the named host, if one was),
        its room reserved and its decision checked against the controller's lease."""
        if self.fleet is None:
            return None
        spec = placement.spec
        choice = await self.fleet.place(
            PlaceContainer(
                container=request.container,
                purpose="move",
                memory_mib=spec.memory_mib,
                cpus=spec.cpus,
                constraints=spec.constraints,
                source=placement.host,
                host=request.destination,
                migration_id=migration_id,
                reserve=not request.dry_run,
            )
        )
        if not request.dry_run:
            await self.fleet.check(choice.ticket, host=choice.host, container=request.container)
        span = trace.get_current_span()
        span.set_attributes(
            {
                "ferry.placement.host": choice.host,
                "ferry.placement.reasons": list(choice.reasons),
                "ferry.placement.term": choice.ticket.term,
            }
        )
        return choice

    async def _choose(
        self,
        request: MigrationRequest,
        to: str,
        source: HostFeatures,
        destination: HostFeatures,
    ) -> tuple[StrategyChoice, FreezeForecast]:
        """The strategy and its freeze forecast; over an explicit budget, refused — or, for
        a dry run, reported as a failed check."""
        inputs = await self.freeze_inputs.inputs(
            request.container, DIRTY_TRACKING in source.features
        )

        def forecaster(strategy: str) -> FreezeForecast:
            return forecast(
                strategy,
                memory_bytes=inputs.memory_bytes,
                memory_basis=inputs.memory_basis,
                destination=to,
                history=inputs.history,
                budget_ms=request.downtime_budget_ms,
                missing=inputs.missing,
            )

        try:
            return choose_within_budget(
                request.strategy, request.downtime_budget_ms, source, destination, forecaster
            )
        except OverBudget as exc:
            if not request.dry_run:
                raise InvalidInput(str(exc), field="downtime_budget_ms") from exc
            chosen = choose(request.strategy, GUIDE_MS, source, destination)
            return chosen, forecaster(chosen.chosen)
        except StrategyUnavailable as exc:
            raise InvalidInput(str(exc), field="strategy") from exc

    async def _forward(
        self, holder: str, request: MigrationRequest, requested_by: str
    ) -> MigrationAccepted:
        return await bus.request(
            self.nc,
            subjects.host_request(holder, subjects.MIGRATION_INTAKE),
            ForwardedRequest(request=request, requested_by=requested_by),
            MigrationAccepted,
            timeout=FORWARD_TIMEOUT_S,
            what=f"intake on {holder}, which holds {request.container}",
        )

    async def dry_run(
        self,
        request: MigrationRequest,
        source: str,
        to: str,
        strategy: StrategyChoice,
        predicted: FreezeForecast,
        choice: PlacementChoice | None = None,
    ) -> DryRunReport:
        """Pre-flight only: ask both hosts whether they can play their part."""
        on_source = await _host_check(
            self.nc, source, HostCheck(container=request.container, side="source")
        )
        on_destination = await _host_check(
            self.nc,
            to,
            HostCheck(
                container=request.container,
                side="destination",
                needed_bytes=on_source.memory_bytes,
            ),
        )
        chosen = CheckResult(
            host=f"{source}->{to}",
            check=f"strategy {strategy.chosen}",
            ok=True,
            detail=strategy.reason,
        )
        freeze = CheckResult(
            host=f"{source}->{to}",
            check="freeze forecast",
            ok=predicted.fits,
            detail=predicted.line()
            + (f"; assumed: {'; '.join(predicted.missing)}" if predicted.missing else ""),
        )
        placed: tuple[CheckResult, ...] = ()
        if choice is not None:
            placed = (
                CheckResult(
                    host=to,
                    check="placement",
                    ok=True,
                    detail="; ".join(choice.reasons) or "the host named was judged and fits",
                ),
            )
        checks = (*on_source.checks, *on_destination.checks, *placed, chosen, freeze)
        return DryRunReport(ok=all(c.ok for c in checks), checks=checks)

    async def cancel(self, data: bytes, requested_by: str = subjects.ANONYMOUS) -> CancelAccepted:
        """Ask a running migration to stop at its next step boundary and roll back."""
        try:
            request = CancelRequest.model_validate_json(data)
        except ValidationError as exc:
            raise bus.validation_error(exc) from exc

        def stop(record: MigrationRecord) -> tuple[MigrationRecord | None, None]:
            try:
                why = f"{request.reason} (asked by {requested_by})"
                stopping = request_cancel(record, why, time.time())
            except ValueError as exc:
                raise Conflict(f"cannot cancel: {exc}", field="id") from exc
            return (None if stopping == record else stopping), None

        try:
            await compare_and_set(self.migrations, request.id, stop)
        except NotFound as exc:
            raise NotFound(f"no migration {request.id!r}", field="id") from exc
        except Conflict as exc:
            if exc.field == "id":
                raise
            raise Conflict(f"migration {request.id} kept changing; try again", field="id") from exc
        return CancelAccepted(id=request.id, state="cancelling")
