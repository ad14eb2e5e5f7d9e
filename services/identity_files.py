"""Writing the bus's identities: each one's credentials file and the servers' auth config.

`ferry identities` (and the lab, which plays the operator) calls `write_identities`. It is
idempotent: an identity that already has a credentials file keeps its password (agents
running with it stay connected after a reload), a new one gets a fresh random password.
The servers only ever see bcrypt hashes (`auth.conf`, included by every node's config).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from pydantic import SecretStr

from services.credentials import BusCredentials, load_credentials, write_credentials
from services.identities import Identity, authorization_block

AUTH_FILE = "auth.conf"
ROUTES_FILE = "routes.conf"
ROUTE_SECRET_FILE = "route.secret"
ROUTE_USER = "route"
CLUSTER_PORT = 6222
BCRYPT_COST = 11  # nats-server's minimum for bcrypt passwords


@dataclass(frozen=True)
class Written:
    auth_file: Path
    routes_file: Path | None
    created: tuple[str, ...]  # users that got new credentials
    kept: tuple[str, ...]  # users whose credentials were already there


def creds_path(directory: Path, identity: Identity) -> Path:
    return directory / f"{identity.user}.creds"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_text(text)
    tmp.replace(path)


def _routes(directory: Path, nodes: list[str]) -> Path:
    """The cluster's routes: every node's address, and one secret the nodes share."""
    secret_file = directory / ROUTE_SECRET_FILE
    if not secret_file.exists():
        _write_private(secret_file, secrets.token_urlsafe(24) + "\n")
    secret = secret_file.read_text().strip()
    urls = [f"nats-route://{ROUTE_USER}:{secret}@{node}:{CLUSTER_PORT}" for node in nodes]
    text = (
        "# Written by `ferry identities --nats`: the same on every node.\n"
        f'authorization {{ user: "{ROUTE_USER}", password: "{secret}" }}\n'
        f"routes: {json.dumps(urls)}\n"
    )
    path = directory / ROUTES_FILE
    _write_private(path, text)
    return path


def write_identities(
    directory: Path, identities: list[Identity], nats_nodes: list[str] | None = None
) -> Written:
    """`nats_nodes`: the cluster nodes' management addresses, for routes.conf."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    users: list[tuple[Identity, str]] = []
    created, kept = [], []
    for identity in identities:
        path = creds_path(directory, identity)
        if path.exists():
            creds = load_credentials(path)
            kept.append(identity.user)
        else:
            creds = BusCredentials(
                user=identity.user, password=SecretStr(secrets.token_urlsafe(24))
            )
            write_credentials(path, creds)
            created.append(identity.user)
        hashed = bcrypt.hashpw(
            creds.password.get_secret_value().encode(), bcrypt.gensalt(BCRYPT_COST)
        )
        users.append((identity, hashed.decode()))
    auth = directory / AUTH_FILE
    _write_private(auth, authorization_block(users))
    routes = _routes(directory, nats_nodes) if nats_nodes else None
    return Written(auth, routes, tuple(created), tuple(kept))
