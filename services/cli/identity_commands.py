"""`ferry identities`: the bus users of a fleet, with least privilege.

    ferry identities --out DIR --host h1 --host h2 --controller c1 --requester ci \
        --nats 10.9.0.2 --nats 10.9.0.3 --nats 10.9.0.4

writes one credentials file per identity (`operator`, `host-h1`, …, `requester-ci`; mode
0600: hand each host only its own), `auth.conf` (the servers' `authorization` block: bcrypt
hashes and every identity's subject permissions) and, with `--nats`, `routes.conf` (the
cluster's routes and their shared secret); each NATS node's config includes both. Run it
again with more hosts to add them: existing credentials are kept. Then reload the servers
(`nats-server --signal reload`) and `ferry bootstrap --host NEW`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services import identities
from services.identity_files import creds_path, write_identities


def register(sub: Any) -> None:
    cmd = sub.add_parser(
        "identities", help="write the bus's users: credentials and the servers' auth config"
    )
    cmd.add_argument("--out", type=Path, required=True, help="directory (made 0700)")
    cmd.add_argument("--host", action="append", default=[], help="a host's name (repeat)")
    cmd.add_argument(
        "--controller", action="append", default=[], help="a fleet controller's name (repeat)"
    )
    cmd.add_argument(
        "--requester", action="append", default=[], help="another system's name (repeat)"
    )
    cmd.add_argument(
        "--nats",
        action="append",
        default=[],
        help="a NATS node's management address, for the cluster's routes.conf (repeat)",
    )
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    wanted = [
        identities.operator(),
        *(identities.host(h) for h in args.host),
        *(identities.controller(c) for c in args.controller),
        *(identities.requester(r) for r in args.requester),
    ]
    written = write_identities(args.out, wanted, args.nats or None)
    files = {i.user: str(creds_path(args.out, i)) for i in wanted}
    if args.json:
        out: dict[str, Any] = {
            "auth": str(written.auth_file),
            "routes": str(written.routes_file) if written.routes_file else None,
            "created": written.created,
            "kept": written.kept,
            "credentials": files,
        }
        print(json.dumps(out))
        return 0
    for user, path in files.items():
        state = "created" if user in written.created else "kept"
        print(f"{user:24} {state:8} {path}")
    print(f"{'servers':24} {'written':8} {written.auth_file} (include it in every node's config)")
    if written.routes_file:
        print(f"{'cluster routes':24} {'written':8} {written.routes_file}")
    return 0
