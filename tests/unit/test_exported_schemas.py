"""The JSON Schema and AsyncAPI files in the repo are what the code says."""

from __future__ import annotations

import json

from schemas import export
from schemas.v1.migrations import MigrationRequest


def test_exported_files_are_up_to_date() -> None:
    stale = [
        str(p) for p, text in export.rendered().items() if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"run `make schemas`; stale: {stale}"


def test_the_request_schema_names_its_required_fields() -> None:
    schema = json.loads((export.OUT / "json" / "v1" / "MigrationRequest.schema.json").read_text())
    # Without a destination the fleet controller's scheduler chooses one.
    assert set(schema["required"]) == {"container"}
    assert schema["properties"]["destination"]["default"] is None
    assert schema["properties"]["strategy"]["default"] == "auto"
    assert MigrationRequest.model_json_schema() == schema


def test_asyncapi_documents_the_request_subject() -> None:
    doc = json.loads((export.OUT / "asyncapi.json").read_text())
    address = doc["channels"]["migrationRequest"]["address"]
    assert address == "ferry.v1.migrations.request.{identity}"
    for channel in doc["channels"].values():
        for message in channel["messages"].values():
            ref = message["payload"]["$ref"]
            assert (export.OUT / ref).exists(), ref
