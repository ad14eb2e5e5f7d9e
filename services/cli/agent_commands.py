"""`ferry agent [--config FILE] [--check]`: run this host's agent, or only validate its config.

systemd runs `ferry agent --config /etc/ferry/agent.toml` (deploy/systemd/ferry-agent.service).
`--check` prints the effective config (the file, then FERRY_* variables over it) as one JSON
document and exits 0, or prints why it is wrong and exits 2. It also reads the credentials
and CA files the config names (never printing them); it connects to nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli.errors import EXIT_OK, EXIT_REJECTED
from services.config import HostConfig
from services.config_layout import CONFIG_ENV
from services.credentials import load_credentials
from services.errors import InvalidInput

if TYPE_CHECKING:
    from services.cli.parsing import Subcommands


def register(sub: Subcommands) -> None:
    agent = sub.add_parser("agent", help="run this host's agent and its four workers")
    agent.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"the host's TOML config (default: ${CONFIG_ENV}, else FERRY_* variables only)",
    )
    agent.add_argument(
        "--check", action="store_true", help="validate the config, print it as JSON and exit"
    )
    agent.set_defaults(run=agent_command)


def _usable(config: HostConfig) -> None:
    """The files the config names can be used as the agent will (read, never shown): else
    the agent would start only to stop at its first connection."""
    if config.nats_creds is not None:
        try:
            load_credentials(config.nats_creds)  # readable, mode 0600, well-formed
        except InvalidInput as exc:
            raise InvalidInput(exc.reason, field="bus.creds") from None
    if config.nats_ca is not None:
        try:
            ssl.create_default_context(cafile=str(config.nats_ca))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot use CA {config.nats_ca}: {exc}", field="bus.ca") from None
    if config.tls is not None:
        config.tls.server_context()  # the CA, the certificate and its key, loaded together


def agent_command(args: argparse.Namespace) -> int:
    try:
        config = HostConfig.load(args.config)
    except InvalidInput as exc:
        # The reason names the file (or variable) and the key already: no `field: ` prefix.
        print(f"ferry agent: {exc.reason}", file=sys.stderr)
        return EXIT_REJECTED
    if args.check:
        try:
            _usable(config)
        except InvalidInput as exc:
            where = f"{config.config_file}: " if config.config_file else ""
            print(f"ferry agent: {where}{exc.field}: {exc.reason}", file=sys.stderr)
            return EXIT_REJECTED
        print(json.dumps(config.as_file(), indent=2))
        return EXIT_OK
    from services.agent import run_agent  # only when running: --check needs none of it

    asyncio.run(run_agent(config))
    return EXIT_OK
