"""Who may talk to a host's transfer port, and how each side proves it.

Two proofs, both required where they apply:

- **The migration's key.** When the destination prepares a migration it makes a random
  key for it and keeps it beside the migration (`transfer.json`, mode 0600), with the name
  of the one host allowed to use it: the migration's source. The source asks for the key
  over the bus (services/saga/transfer_keys.py); only that host can read the answer. Every
  request header carries an HMAC of its fields under the key, and so does the server's
  answer to a pull: a host that was not given the key cannot push into the migration, fetch
  its pages back, or be taken for the peer. The key is in no record, event or trace.
- **The peer's certificate** (when the host has TLS files). The port speaks mutual TLS:
  both sides show a certificate of the fleet's CA, and each checks that the other's names
  the host it expects — the server, the migration's source; the client, the destination.

No I/O but the key file's; no sockets here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.v1.base import HOST_PATTERN
from services.errors import Forbidden, RuntimeFailure
from services.tls import TlsFiles, check_peer, peer_names

__all__ = ["TlsFiles", "check_peer", "peer_names"]  # re-exported: the wire checks peers

KEY_FILE = "transfer.json"
KEY_BYTES = 32
AUTH_FIELD = "auth"
KEY_PATTERN = r"^[0-9a-f]{64}$"


class TransferGrant(BaseModel):
    """One migration's key as a host keeps it. `issued`: this host is the destination and
    `peer` (the source) may use the key; `received`: this host is the source and `peer` is
    the destination that issued it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    migration_id: str
    key: str = Field(pattern=KEY_PATTERN, repr=False)
    side: Literal["issued", "received"]
    peer: str = Field(pattern=HOST_PATTERN)

    @property
    def secret(self) -> bytes:
        return bytes.fromhex(self.key)


def grant_file(migration_root: Path) -> Path:
    return migration_root / KEY_FILE


def _write_private(path: Path, text: str) -> None:
    """Written whole and readable by this host's root only, or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.rename(path)


def load(migration_root: Path) -> TransferGrant | None:
    """The key this host holds for the migration, or None when it holds none."""
    try:
        text = grant_file(migration_root).read_text()
    except FileNotFoundError:
        return None
    try:
        return TransferGrant.model_validate_json(text)
    except ValidationError as exc:
        raise RuntimeFailure(f"unreadable transfer key in {migration_root}: {exc}") from None


def issue(migration_root: Path, migration_id: str, *, source: str) -> TransferGrant:
    """The destination's key for the migration, made once: a redelivered prepare keeps it
    (the source may hold it already)."""
    held = load(migration_root)
    if held is not None:
        if held.side != "issued" or held.peer != source:
            raise RuntimeFailure(
                f"migration {migration_id} already has a transfer key for {held.side} {held.peer}"
            )
        return held
    grant = TransferGrant(
        migration_id=migration_id, key=secrets.token_hex(KEY_BYTES), side="issued", peer=source
    )
    migration_root.mkdir(parents=True, exist_ok=True)
    _write_private(grant_file(migration_root), grant.model_dump_json())
    return grant


def keep_received(
    migration_root: Path, migration_id: str, key: str, *, destination: str
) -> TransferGrant:
    """The source keeps the key the destination gave it, for the migration's later steps."""
    grant = TransferGrant(migration_id=migration_id, key=key, side="received", peer=destination)
    migration_root.mkdir(parents=True, exist_ok=True)
    _write_private(grant_file(migration_root), grant.model_dump_json())
    return grant


def _signed_part(header: Mapping[str, object]) -> bytes:
    fields = {k: v for k, v in header.items() if k != AUTH_FIELD}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: bytes, header: Mapping[str, object]) -> dict[str, object]:
    """The header with its HMAC added: every other field is covered, the payload's sha256
    among them, so the bytes that follow are bound to the key too."""
    mac = hmac.new(secret, _signed_part(header), hashlib.sha256).hexdigest()
    return {**header, AUTH_FIELD: mac}


def verify(secret: bytes, header: Mapping[str, object], *, what: str) -> None:
    mac = header.get(AUTH_FIELD)
    expected = hmac.new(secret, _signed_part(header), hashlib.sha256).hexdigest()
    if not isinstance(mac, str) or not hmac.compare_digest(mac, expected):
        raise Forbidden(f"{what} is not signed with the migration's transfer key")


@dataclass(frozen=True)
class Link:
    """Where one migration's transfer goes and how it proves itself: the peer's address
    and port, the host its certificate must name, the migration's key, this host's TLS."""

    address: str
    port: int
    peer: str
    grant: TransferGrant
    tls: TlsFiles | None = None

    def at(self, port: int) -> Link:
        return Link(self.address, port, self.peer, self.grant, self.tls)
