"""`ferry certs`: the fleet's CA and a certificate for each host and NATS node.

    ferry certs --out DIR --host h1=10.9.0.11 --host h2=10.9.0.12 \
        --nats n1=10.9.0.2 --nats n2=10.9.0.3 --nats n3=10.9.0.4

writes `ca.pem` (every machine trusts it), `ca.key` (0600; keep it on the operator's
machine), and `<name>.pem` with `<name>.key` (0600) for each: hand each machine only its
own pair and `ca.pem`. A host's certificate names it (CN) and its management address (IP
SAN): mutual TLS between hosts checks the first, CRIU's page streams and NATS check the
second. Run it again to add machines: the CA, and every certificate that still names the
same address, are kept (services/certificates.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services import certificates
from services.errors import InvalidInput


def register(sub: Any) -> None:
    cmd = sub.add_parser("certs", help="write the fleet's CA and the hosts' and NATS nodes' TLS")
    cmd.add_argument("--out", type=Path, required=True, help="directory (made 0700)")
    for flag, who in (("--host", "a host"), ("--nats", "a NATS node")):
        cmd.add_argument(
            flag,
            action="append",
            default=[],
            metavar="NAME=ADDRESS",
            help=f"{who}'s name and management address (repeat)",
        )
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(run=run)


def _named(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, sep, address = value.partition("=")
        if not sep or not name or not address:
            raise InvalidInput(f"{value!r} is not NAME=ADDRESS", field=flag)
        out.append((name, address))
    return out


def run(args: argparse.Namespace) -> int:
    wanted = _named(args.host, "--host") + _named(args.nats, "--nats")
    if not wanted:
        raise InvalidInput("name at least one machine", field="--host")
    ca = certificates.ensure_ca(args.out)
    issued = {name: certificates.issue(ca, args.out, name, [address]) for name, address in wanted}
    if args.json:
        files = {n: {"cert": str(i.cert), "key": str(i.key)} for n, i in issued.items()}
        print(json.dumps({"ca": str(ca.cert), "issued": files}))
        return 0
    print(f"{'ca':12} {ca.cert} (every machine), {ca.key} (keep here)")
    for name, pair in issued.items():
        print(f"{name:12} {pair.cert} {pair.key}")
    return 0
