"""Subject, bucket and stream names: the bus topology declared in one place."""

from __future__ import annotations

PREFIX = "ferry.v1"

# KV buckets and object stores.
HOSTS_BUCKET = "ferry-hosts"  # "<host>" agent heartbeat, "<host>.<role>" worker heartbeats
PLACEMENT_BUCKET = "ferry-placement"  # "<author>.<container>" -> Placement (see placement_key)
IPAM_BUCKET = "ferry-ipam"  # "<ip with dashes>" -> container name
LAYERS_STORE = "ferry-layers"  # "<sha256>" -> rootfs tar
IMAGES_BUCKET = "ferry-images"  # "<image name>" -> Image (its layers, lowest first)

FLEET_BUCKET = "ferry-fleet"  # "state" -> FleetState, "reservations.<host>" -> HostReservations
FLEET_STATE_KEY = "state"
CONTROLLER_LEASE = "fleet.controller"  # in LEASES_BUCKET -> ControllerLease


def reservations_key(host: str) -> str:
    return f"reservations.{host}"


# Fleet controller requests, answered by the active instance only.
FLEET_PLACE = f"{PREFIX}.fleet.place"  # PlaceContainer -> Placed
FLEET_CORDON = f"{PREFIX}.fleet.cordon"  # CordonHost -> CordonDone


def controller_subject(instance: str, subject: str) -> str:
    """One instance's own copy of a fleet subject (ferry.v1.fleet.c1.place): to ask it alone."""
    return subject.replace(f"{PREFIX}.fleet.", f"{PREFIX}.fleet.{instance}.", 1)


HEARTBEAT_TTL_S = 5.0
HEARTBEAT_INTERVAL_S = 1.0


def host_request(host: str, action: str) -> str:
    """Request/reply subject one host serves, e.g. ferry.v1.host.h1.container.create."""
    return f"{PREFIX}.host.{host}.{action}"


CREATE_CONTAINER = "container.create"  # destination worker
REMOVE_CONTAINER = "container.remove"  # cleanup worker
LIST_CONTAINERS = "container.list"  # source worker
CONTAINER_LOGS = "container.logs"  # source worker: a container's stdout and stderr
CONTAINER_RUNS = "container.runs"  # cleanup worker: does this host run container X
LIST_LAYERS = "layer.list"  # destination worker: the layers this host holds
PULL_LAYERS = "layer.pull"  # destination worker: fetch, verify and unpack layers now
LIST_VOLUMES = "volume.list"  # cleanup worker: the volumes this host holds
REMOVE_VOLUME = "volume.remove"  # cleanup worker: remove one no container uses


def worker_key(host: str, role: str) -> str:
    return f"{host}.{role}"


def ip_key(ip: str) -> str:
    return ip.replace(".", "-")


# A placement is written under its author's name, first, so that the bus can let each host
# write only `<its name>.>`; a compare-and-set spans every author's key of one container.
def placement_key(author: str, container: str) -> str:
    return f"{author}.{container}"


def placement_subject(author: str, container: str) -> str:
    return f"$KV.{PLACEMENT_BUCKET}.{placement_key(author, container)}"


def placement_subjects(container: str) -> str:
    """Every author's entries of one container (the compare-and-set's and the reads' filter)."""
    return placement_subject("*", container)


def placement_key_parts(key: str) -> tuple[str, str]:
    """(author, container) of a placement key."""
    author, _, container = key.partition(".")
    return author, container


# Migrations.
# Requests and cancels are published on a subject that ends in the requester's identity
# (the bus lets each identity publish only on its own), so a record can say who asked.
MIGRATION_REQUEST = f"{PREFIX}.migrations.request"  # request/reply, answered by source workers
MIGRATION_CANCEL = f"{PREFIX}.migrations.cancel"  # request/reply, same queue group
ANONYMOUS = "anonymous"  # the identity of a client with no credentials (a bus without auth)


def migration_request(identity: str) -> str:
    return f"{MIGRATION_REQUEST}.{identity}"


def migration_cancel(identity: str) -> str:
    return f"{MIGRATION_CANCEL}.{identity}"


def requester_of(subject: str) -> str:
    """The identity a request or cancel subject names (its last token)."""
    return subject.rsplit(".", 1)[-1]


PAGE_SERVER = "migration.page-server"  # per host: a page server for one pre-copy round
TRANSFER_KEY = "migration.transfer-key"  # per host, transfer worker: the key its source signs with
TAKE_LINK = "migration.take-link"  # per host, destination worker: the source froze, take the link
MIGRATION_INTAKE = "migration.intake"  # per host, source worker: a request for what it holds
HOST_CHECK = "migration.check"  # per host: can this host play its part (dry run)
HOST_LEDGER = "host.ledger"  # per host, source worker: its local record and runc's list
INTAKE_QUEUE = "ferry-intake"  # queue group: any one host's source worker answers
MIGRATIONS_BUCKET = "ferry-migrations"  # "<id>" -> MigrationRecord
LEASES_BUCKET = "ferry-leases"  # "<migration>.<kind>.<step>.<attempt>" -> StepLease, TTL
REGISTRY_BUCKET = "ferry-registry"  # "<host>" -> HostRegistration (no TTL: known, maybe down)
COMMANDS_STREAM = "FERRY_COMMANDS"  # work queue of StepCommand
EVENTS_STREAM = "FERRY_EVENTS"  # per-migration progress and audit
COMMAND_DEDUP_WINDOW_S = 120.0
EVENTS_MAX_AGE_S = 7 * 24 * 3600.0


def command_subject(host: str, role: str) -> str:
    return f"{PREFIX}.cmd.{host}.{role}"


def command_durable(host: str, role: str) -> str:
    return f"cmd-{host}-{role}"


def event_subject(migration_id: str) -> str:
    return f"{PREFIX}.events.{migration_id}"


def command_msg_id(migration_id: str, kind: str, step: str, attempt: int) -> str:
    """Nats-Msg-Id of a step command: a re-publish after a crash is dropped as a duplicate."""
    return f"{migration_id}.{kind}.{step}.{attempt}"


# Traces: finished spans, one subject per trace.
SPANS_STREAM = "FERRY_SPANS"
SPANS_MAX_AGE_S = 7 * 24 * 3600.0


def span_subject(trace_id: str) -> str:
    return f"{PREFIX}.spans.{trace_id}"
