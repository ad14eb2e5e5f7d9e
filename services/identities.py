"""Who may do what on the bus: every identity's NATS subject permissions, as data.

Three kinds of identity (pure: no I/O; `services/cli/identity_commands.py` writes the files):

- `operator` — the CLI of the people who run the fleet, and the bootstrap: everything,
  including the only right to create, delete or purge streams, buckets and consumers.
- `host-<name>` — one host's agent and workers: bind to its own pre-created durable
  consumers (fetch, ack), publish its own step commands, write placements under its own
  name, migration records, leases and IP claims, its own heartbeats and registration;
  answer requests on its own host subjects; read the rest of the topology. No stream or
  consumer admin, no consumer on the command stream (it could read other hosts'
  commands), no direct reads of it.
- `controller-<name>` — one fleet controller instance: read the fleet's state, write the
  fleet bucket and its own lease key only, answer the fleet's requests; no saga, no
  placements, no commands.
- `requester-<name>` — another system: publish migration requests and cancels on its own
  subject, follow events and read migration records; nothing else.

NATS checks a publish against `allow` then `deny` (deny wins), so every identity has an
allow list of exactly what it needs and an explicit deny of the admin and command-stream
subjects for defence in depth. Replies come back on a per-identity inbox prefix
(`_INBOX.<identity>`), so no identity can subscribe to another's replies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from schemas import subjects
from schemas.v1.hosts import WORKER_ROLES
from services.errors import InvalidInput

Kind = Literal["operator", "host", "controller", "requester"]
NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
OPERATOR = "operator"

COMMANDS = subjects.COMMANDS_STREAM
EVENTS = subjects.EVENTS_STREAM
SPANS = subjects.SPANS_STREAM


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def obj_stream(store: str) -> str:
    return f"OBJ_{store}"


@dataclass(frozen=True)
class Identity:
    kind: Kind
    name: str = ""  # the host's or requester's name; empty for the operator

    @property
    def user(self) -> str:
        """The NATS user name, which is also the identity's name on request subjects."""
        return OPERATOR if self.kind == "operator" else f"{self.kind}-{self.name}"

    @property
    def inbox(self) -> str:
        return f"_INBOX.{self.user}"


def operator() -> Identity:
    return Identity("operator")


def host(name: str) -> Identity:
    if not NAME.match(name):
        raise InvalidInput(f"{name!r} is not a host name (a-z, 0-9, -)", field="host")
    return Identity("host", name)


def controller(name: str) -> Identity:
    if not NAME.match(name):
        raise InvalidInput(f"{name!r} is not a controller name (a-z, 0-9, -)", field="controller")
    return Identity("controller", name)


def requester(name: str) -> Identity:
    if not NAME.match(name):
        raise InvalidInput(f"{name!r} is not a requester name (a-z, 0-9, -)", field="requester")
    return Identity("requester", name)


@dataclass(frozen=True)
class Permissions:
    publish_allow: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    subscribe_allow: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()
    allow_responses: bool = False  # may answer requests made to it (reply subjects)
    notes: dict[str, str] = field(default_factory=dict, compare=False)


def _reads(stream: str) -> tuple[str, ...]:
    """What reading a stream needs: its info, single-message gets (KV get, lease markers) and
    ephemeral ordered consumers (KV watch/keys, following events), with their flow control."""
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


# Admin of the topology, and everything that would let a host read other hosts' commands.
ADMIN_DENY = (
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    "$JS.API.STREAM.SNAPSHOT.>",
    "$JS.API.STREAM.RESTORE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    f"$JS.API.CONSUMER.CREATE.{COMMANDS}",
    f"$JS.API.CONSUMER.CREATE.{COMMANDS}.>",
    f"$JS.API.CONSUMER.DELETE.{COMMANDS}.>",
    f"$JS.API.DIRECT.GET.{COMMANDS}",
    f"$JS.API.DIRECT.GET.{COMMANDS}.>",
    f"$JS.API.STREAM.MSG.GET.{COMMANDS}",
)

HOST_BUCKETS_READ = (
    subjects.HOSTS_BUCKET,
    subjects.REGISTRY_BUCKET,
    subjects.PLACEMENT_BUCKET,
    subjects.IPAM_BUCKET,
    subjects.MIGRATIONS_BUCKET,
    subjects.IMAGES_BUCKET,
    subjects.LEASES_BUCKET,
    subjects.FLEET_BUCKET,
)
# Buckets every host writes any key of: the saga's shared state. (Placements are written
# under the author's name: each host writes only its own, `<host>.<container>`.)
HOST_BUCKETS_WRITE = (
    subjects.IPAM_BUCKET,
    subjects.MIGRATIONS_BUCKET,
    subjects.LEASES_BUCKET,
)


def permissions(identity: Identity) -> Permissions:
    if identity.kind == "operator":
        return Permissions(publish_allow=(">",), subscribe_allow=(">",), allow_responses=True)
    if identity.kind == "host":
        return _host(identity)
    if identity.kind == "controller":
        return _controller(identity)
    return _requester(identity)


def _host(identity: Identity) -> Permissions:
    h = identity.name
    reads: list[str] = []
    for b in HOST_BUCKETS_READ:
        reads += _reads(kv_stream(b))
    reads += _reads(obj_stream(subjects.LAYERS_STORE))
    # A `*` in a subject stands for a whole token, and a durable's name is one token: so
    # each of the host's four durables is named.
    own = [f"{COMMANDS}.{subjects.command_durable(h, role)}" for role in WORKER_ROLES]
    publish = (
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",  # nats-py looks up a stream by subject (object store reads)
        *reads,
        f"$JS.API.STREAM.INFO.{COMMANDS}",
        f"$JS.API.STREAM.INFO.{EVENTS}",
        f"$JS.API.STREAM.INFO.{SPANS}",
        # Its own durables only: fetch, ack (any ack kind), and their info.
        *(f"$JS.API.CONSUMER.MSG.NEXT.{d}" for d in own),
        *(f"$JS.API.CONSUMER.INFO.{d}" for d in own),
        *(f"$JS.ACK.{d}.>" for d in own),
        # The saga: its own commands only (each host queues its own from the records it
        # watches, services/saga/dispatch.py); events; spans.
        subjects.command_subject(h, "*"),
        f"{subjects.PREFIX}.events.>",
        f"{subjects.PREFIX}.spans.>",
        *(f"$KV.{b}.>" for b in HOST_BUCKETS_WRITE),
        subjects.placement_subject(h, ">"),
        f"$KV.{subjects.HOSTS_BUCKET}.{h}",
        f"$KV.{subjects.HOSTS_BUCKET}.{h}.*",
        f"$KV.{subjects.REGISTRY_BUCKET}.{h}",
        # Requests to other hosts (does it run X, a page server, a pre-flight check).
        subjects.host_request("*", ">"),
        subjects.FLEET_PLACE,  # intake: where a move without a destination goes
    )
    subscribe = (
        f"{identity.inbox}.>",
        subjects.host_request(h, ">"),
        subjects.migration_request("*"),
        subjects.migration_cancel("*"),
    )
    return Permissions(
        publish_allow=publish,
        # The controller's lease is the controller's: a host never writes it.
        publish_deny=(*ADMIN_DENY, CONTROLLER_LEASE_SUBJECT),
        subscribe_allow=subscribe,
        subscribe_deny=(f"{subjects.PREFIX}.cmd.>",),
        allow_responses=True,
        notes={"why": "the four workers and the agent of one host"},
    )


CONTROLLER_LEASE_SUBJECT = f"$KV.{subjects.LEASES_BUCKET}.{subjects.CONTROLLER_LEASE}"
CONTROLLER_READS = (
    subjects.HOSTS_BUCKET,
    subjects.REGISTRY_BUCKET,
    subjects.PLACEMENT_BUCKET,
    subjects.MIGRATIONS_BUCKET,
    subjects.LEASES_BUCKET,
    subjects.FLEET_BUCKET,
)


def _controller(identity: Identity) -> Permissions:
    reads: list[str] = []
    for b in CONTROLLER_READS:
        reads += _reads(kv_stream(b))
    publish = (
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        *reads,
        # Whether each part of the topology exists (it waits for all of them, never
        # creating one); stream info says nothing of any stream's messages.
        "$JS.API.STREAM.INFO.*",
        f"{subjects.PREFIX}.spans.>",
        f"$KV.{subjects.FLEET_BUCKET}.>",
        CONTROLLER_LEASE_SUBJECT,
    )
    return Permissions(
        publish_allow=publish,
        publish_deny=ADMIN_DENY,
        subscribe_allow=(f"{identity.inbox}.>", f"{subjects.PREFIX}.fleet.>"),
        subscribe_deny=(f"{subjects.PREFIX}.cmd.>",),
        allow_responses=True,
        notes={"why": "one fleet controller instance: cordons, reservations, placements"},
    )


def _requester(identity: Identity) -> Permissions:
    publish = (
        "$JS.API.INFO",
        subjects.migration_request(identity.user),
        subjects.migration_cancel(identity.user),
        *_reads(EVENTS),
        *_reads(kv_stream(subjects.MIGRATIONS_BUCKET)),
    )
    return Permissions(
        publish_allow=publish,
        publish_deny=ADMIN_DENY,
        subscribe_allow=(f"{identity.inbox}.>",),
        subscribe_deny=(f"{subjects.PREFIX}.cmd.>",),
    )


def _nats_list(items: tuple[str, ...]) -> str:
    return json.dumps(list(items))


def authorization_block(users: list[tuple[Identity, str]]) -> str:
    """The nats-server `authorization` block for these identities and their bcrypt hashes,
    to `include` from every node's config (the same file on every node)."""
    lines = [
        "# Written by `ferry identities`: who may do what on Ferry's bus. Same on every node.",
        "authorization {",
        "  users = [",
    ]
    for identity, bcrypt_hash in sorted(users, key=lambda u: u[0].user):
        p = permissions(identity)
        publish = f"allow: {_nats_list(p.publish_allow)}"
        if p.publish_deny:
            publish += f", deny: {_nats_list(p.publish_deny)}"
        subscribe = f"allow: {_nats_list(p.subscribe_allow)}"
        if p.subscribe_deny:
            subscribe += f", deny: {_nats_list(p.subscribe_deny)}"
        responses = ", allow_responses: true" if p.allow_responses else ""
        lines += [
            "    {",
            f"      user: {json.dumps(identity.user)}",
            f"      password: {json.dumps(bcrypt_hash)}",
            f"      permissions: {{ publish: {{ {publish} }},"
            f" subscribe: {{ {subscribe} }}{responses} }}",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def parse_user(user: str) -> Identity:
    """The identity a NATS user name stands for (the inverse of Identity.user)."""
    if user == OPERATOR:
        return operator()
    kind, _, name = user.partition("-")
    if kind == "host":
        return host(name)
    if kind == "requester":
        return requester(name)
    if kind == "controller":
        return controller(name)
    raise InvalidInput(f"{user!r} is not a Ferry identity", field="user")
