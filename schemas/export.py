"""Export the wire contract for other languages: JSON Schema per message, and an AsyncAPI
document of the subjects. Run `python -m schemas.export` (or `make schemas`) after a change;
a test fails while the committed files are stale."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas import subjects
from schemas.v1 import fleet
from schemas.v1.base import ErrorReply
from schemas.v1.containers import (
    ContainerCreated,
    ContainerList,
    ContainerLogs,
    ContainerRemoved,
    ContainerRuns,
    CreateContainer,
    Image,
    LayerList,
    LayersPulled,
    ListContainers,
    ListLayers,
    ListVolumes,
    Placement,
    PullLayers,
    ReadLogs,
    RemoveContainer,
    RemoveVolume,
    RunsContainer,
    VolumeList,
    VolumeRemoved,
)
from schemas.v1.hosts import HostHeartbeat, HostRegistration, WorkerHeartbeat
from schemas.v1.migrations import (
    CancelAccepted,
    CancelRequest,
    DryRunReport,
    Event,
    MigrationAccepted,
    MigrationRequest,
)
from schemas.v1.migrations import MigrationRecord as MigrationRecordV1
from schemas.v1.migrations import StepCommand as StepCommandV1
from schemas.v1.transfers import LinkHandover, LinkTaken
from schemas.v2 import ledger
from schemas.v2 import migrations as v2

OUT = Path(__file__).parent
MODELS: dict[str, type[BaseModel]] = {
    "MigrationRequest": MigrationRequest,
    "MigrationAccepted": MigrationAccepted,
    "DryRunReport": DryRunReport,
    "CancelRequest": CancelRequest,
    "CancelAccepted": CancelAccepted,
    "ErrorReply": ErrorReply,
    # v1's record and command stay documented: v2 reads records v1 wrote.
    "MigrationRecord": MigrationRecordV1,
    "StepCommand": StepCommandV1,
    "CreateContainer": CreateContainer,
    "ContainerCreated": ContainerCreated,
    "RemoveContainer": RemoveContainer,
    "ContainerRemoved": ContainerRemoved,
    "ListContainers": ListContainers,
    "ContainerList": ContainerList,
    "RunsContainer": RunsContainer,
    "ContainerRuns": ContainerRuns,
    "Placement": Placement,
    "Image": Image,
    "ListLayers": ListLayers,
    "LayerList": LayerList,
    "PullLayers": PullLayers,
    "LayersPulled": LayersPulled,
    "ReadLogs": ReadLogs,
    "ContainerLogs": ContainerLogs,
    "ListVolumes": ListVolumes,
    "VolumeList": VolumeList,
    "RemoveVolume": RemoveVolume,
    "VolumeRemoved": VolumeRemoved,
    "HostHeartbeat": HostHeartbeat,
    "WorkerHeartbeat": WorkerHeartbeat,
    "HostRegistration": HostRegistration,
    "LinkHandover": LinkHandover,
    "LinkTaken": LinkTaken,
    "PlaceContainer": fleet.PlaceContainer,
    "Placed": fleet.Placed,
    "CordonHost": fleet.CordonHost,
    "CordonDone": fleet.CordonDone,
    "FleetState": fleet.FleetState,
    "HostReservations": fleet.HostReservations,
    "ControllerLease": fleet.ControllerLease,
}


# What v2 replaced: the record (typed step results, the request's options) and the command
# (id, step, kind, attempt, host, role only).
MODELS_V2: dict[str, type[BaseModel]] = {
    "MigrationRecord": v2.MigrationRecord,
    "StepCommand": v2.StepCommand,
    "ReadLedger": ledger.ReadLedger,
    "LedgerReport": ledger.LedgerReport,
}


def json_schemas() -> dict[str, dict[str, dict[str, Any]]]:
    """Every message's JSON Schema, by version and name."""
    v1 = {name: model.model_json_schema() for name, model in MODELS.items()}
    v1["MigrationEvent"] = TypeAdapter(Event).json_schema()
    return {
        "v1": v1,
        "v2": {name: model.model_json_schema() for name, model in MODELS_V2.items()},
    }


def _message(name: str, summary: str, version: str = "v1") -> dict[str, Any]:
    ref = f"json/{version}/{name}.schema.json"
    return {"name": name, "summary": summary, "payload": {"$ref": ref}}


def asyncapi() -> dict[str, Any]:
    p = subjects.PREFIX
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Ferry bus",
            "version": "1.0.0",
            "description": (
                "Live migration of running containers. Publish a MigrationRequest on "
                f"{subjects.MIGRATION_REQUEST}.{{identity}} (your bus user: the bus lets each"
                " identity publish only on its own, and the record's requested_by says who"
                " asked) with NATS request/reply; the reply is "
                'MigrationAccepted ({"id": ...}) or ErrorReply ({"error": {"field", '
                '"reason"}}). Follow the migration on its event subject; read its record '
                f"from the KV bucket {subjects.MIGRATIONS_BUCKET} (json/v2/MigrationRecord; records"
                " written as v1 are still read). W3C trace context travels "
                "in the `traceparent` header."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {"nats": {"host": "localhost:4222", "protocol": "nats"}},
        "channels": {
            "migrationRequest": {
                "address": subjects.migration_request("{identity}"),
                "parameters": {"identity": {"description": "the requester's NATS user"}},
                "description": "Answered by a queue group of every host's source worker.",
                "messages": {
                    "request": _message("MigrationRequest", "Move a container"),
                    "accepted": _message("MigrationAccepted", "Accepted, with the migration id"),
                    "dryRun": _message("DryRunReport", "With dry_run: the pre-flight checks"),
                    "rejected": _message("ErrorReply", "Refused: which field, and why"),
                },
            },
            "migrationCancel": {
                "address": subjects.migration_cancel("{identity}"),
                "parameters": {"identity": {"description": "the requester's NATS user"}},
                "description": "Stop before the commit and roll back; refused after it.",
                "messages": {
                    "request": _message("CancelRequest", "Cancel a migration"),
                    "accepted": _message("CancelAccepted", "It will stop at the next step"),
                    "rejected": _message("ErrorReply", "Unknown, finished or past its commit"),
                },
            },
            "migrationEvents": {
                "address": f"{p}.events.{{migration_id}}",
                "description": f"JetStream stream {subjects.EVENTS_STREAM}: progress and audit.",
                "parameters": {"migration_id": {"description": "the id intake replied with"}},
                "messages": {"event": _message("MigrationEvent", "One step of the migration")},
            },
            "stepCommands": {
                "address": f"{p}.cmd.{{host}}.{{role}}",
                "description": (
                    f"JetStream work queue {subjects.COMMANDS_STREAM}; one durable consumer per "
                    "host and role; Nats-Msg-Id = <migration>.<kind>.<step>.<attempt>."
                ),
                "parameters": {
                    "host": {"description": "host name"},
                    "role": {"enum": ["source", "transfer", "destination", "cleanup"]},
                },
                "messages": {"command": _message("StepCommand", "Run one saga step", "v2")},
            },
            "fleetPlace": {
                "address": subjects.FLEET_PLACE,
                "description": "Answered by the active fleet controller only (its lease).",
                "messages": {
                    "request": _message("PlaceContainer", "Where may this container go"),
                    "reply": _message("Placed", "The host, why, and the room reserved there"),
                    "rejected": _message("ErrorReply", "No host fits: host by host, why"),
                },
            },
            "fleetCordon": {
                "address": subjects.FLEET_CORDON,
                "description": "Answered by the active fleet controller only.",
                "messages": {
                    "request": _message("CordonHost", "Cordon or uncordon a host"),
                    "reply": _message("CordonDone", "Its state now"),
                },
            },
            "containerCreate": {
                "address": f"{p}.host.{{host}}.{subjects.CREATE_CONTAINER}",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("CreateContainer", "Start a container on this host"),
                    "reply": _message("ContainerCreated", "It runs"),
                },
            },
            "containerRemove": {
                "address": f"{p}.host.{{host}}.{subjects.REMOVE_CONTAINER}",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("RemoveContainer", "Remove a container"),
                    "reply": _message("ContainerRemoved", "Nothing of it is left"),
                },
            },
            "hostLedger": {
                "address": f"{p}.host.{{host}}.{subjects.HOST_LEDGER}",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("ReadLedger", "This host's own record", "v2"),
                    "reply": _message("LedgerReport", "Its ledger and runc's list", "v2"),
                },
            },
            "containerList": {
                "address": f"{p}.host.{{host}}.{subjects.LIST_CONTAINERS}",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("ListContainers", "Which containers run here"),
                    "reply": _message("ContainerList", "As runc reports them"),
                },
            },
            "containerRuns": {
                "address": f"{p}.host.{{host}}.{subjects.CONTAINER_RUNS}",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("RunsContainer", "Does this host run this container"),
                    "reply": _message("ContainerRuns", "As runc reports it"),
                },
            },
            "takeLink": {
                "address": f"{p}.host.{{host}}.{subjects.TAKE_LINK}",
                "description": (
                    "Host to host: a migration's source, frozen and off the bridge, tells its "
                    "destination to plug the container's link in and announce its MAC; what "
                    "clients send from then on waits in the destination's hold until the "
                    "commit. Signed with the migration's transfer key; answered only while "
                    "the record's dump step runs on the asking source."
                ),
                "parameters": {"host": {"description": "the migration's destination"}},
                "messages": {
                    "request": _message("LinkHandover", "The source froze: take the link"),
                    "reply": _message("LinkTaken", "Plugged in here"),
                },
            },
            "layerList": {
                "address": f"{p}.host.{{host}}.{subjects.LIST_LAYERS}",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("ListLayers", "Which layers this host holds"),
                    "reply": _message("LayerList", "Verified and unpacked, with sizes"),
                },
            },
            "layerPull": {
                "address": f"{p}.host.{{host}}.{subjects.PULL_LAYERS}",
                "description": (
                    f"Fetch layers from the object store {subjects.LAYERS_STORE}, verify their "
                    "sha256 and unpack them now. Images (name -> layers, lowest first) are in "
                    f"the KV bucket {subjects.IMAGES_BUCKET}."
                ),
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("PullLayers", "Get these layers ready here"),
                    "reply": _message("LayersPulled", "Every layer is here"),
                },
            },
            "containerLogs": {
                "address": f"{p}.host.{{host}}.{subjects.CONTAINER_LOGS}",
                "parameters": {"host": {"description": "the host the placement names"}},
                "messages": {
                    "request": _message("ReadLogs", "A container's stdout and stderr"),
                    "reply": _message("ContainerLogs", "Lines in order, and a cursor"),
                },
            },
            "volumeList": {
                "address": f"{p}.host.{{host}}.{subjects.LIST_VOLUMES}",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("ListVolumes", "Which volumes this host holds"),
                    "reply": _message("VolumeList", "Each with its size and how it came"),
                },
            },
            "volumeRemove": {
                "address": f"{p}.host.{{host}}.{subjects.REMOVE_VOLUME}",
                "description": "Refused while any placement names the volume or a local"
                " container mounts it.",
                "parameters": {"host": {"description": "host name"}},
                "messages": {
                    "request": _message("RemoveVolume", "Remove this volume and its data"),
                    "reply": _message("VolumeRemoved", "It is gone from the host"),
                },
            },
        },
        "operations": {
            "requestMigration": {
                "action": "send",
                "channel": {"$ref": "#/channels/migrationRequest"},
                "messages": [{"$ref": "#/channels/migrationRequest/messages/request"}],
                "reply": {
                    "channel": {"$ref": "#/channels/migrationRequest"},
                    "messages": [
                        {"$ref": "#/channels/migrationRequest/messages/accepted"},
                        {"$ref": "#/channels/migrationRequest/messages/rejected"},
                    ],
                },
            },
            "followMigration": {
                "action": "receive",
                "channel": {"$ref": "#/channels/migrationEvents"},
            },
        },
    }


def rendered() -> dict[Path, str]:
    files = {
        OUT / "json" / version / f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True)
        + "\n"
        for version, schemas in json_schemas().items()
        for name, schema in schemas.items()
    }
    files[OUT / "asyncapi.json"] = json.dumps(asyncapi(), indent=2) + "\n"
    return files


def main() -> int:
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(rendered())} files under {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
