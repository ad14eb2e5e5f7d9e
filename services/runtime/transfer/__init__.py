"""Moving files between hosts over TCP (mutual TLS where hosts have certificates), each
transfer signed with its migration's key and sha256-checked end to end. A sender can pace
itself, compress, and report progress; an overlay upper dir can travel twice, whole while
the container still runs ("presync"), then, after the freeze, only what changed since
("delta"), applied over the presync copy. The layers, lowest first: `codec` (wire
encodings, digests), `manifest` (tar members, manifests, delta plans), `wire` (the
protocol and its pacing), `auth` (who may transfer: the migration's key, mutual TLS), then
`client` (push, pull) and `server` (TransferServer). This module re-exports what the rest
of Ferry uses.
"""

from services.runtime.transfer.auth import Link, TlsFiles, TransferGrant
from services.runtime.transfer.blocks import Signatures
from services.runtime.transfer.client import (
    Sent,
    pull,
    push,
    push_delta,
    push_presync,
    push_volumes,
)
from services.runtime.transfer.codec import GZIP, ZSTD
from services.runtime.transfer.manifest import RACY_NS, Entry, Member, plan_delta
from services.runtime.transfer.server import TransferServer
from services.runtime.transfer.wire import PROGRESS_EVERY_S, Progress

__all__ = [
    "GZIP",
    "PROGRESS_EVERY_S",
    "RACY_NS",
    "ZSTD",
    "Entry",
    "Link",
    "Member",
    "Progress",
    "Sent",
    "Signatures",
    "TlsFiles",
    "TransferGrant",
    "TransferServer",
    "plan_delta",
    "pull",
    "push",
    "push_delta",
    "push_presync",
    "push_volumes",
]
