"""A host's TLS files, and the contexts and peer checks Ferry's own connections between
hosts use (the transfer port). CRIU and NATS take the same files (services/runtime/
cmdlines.py `criu_tls`, the host config's `[bus] ca`)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.errors import Forbidden, InvalidInput


@dataclass(frozen=True)
class TlsFiles:
    """This host's certificate and key, and the fleet CA every peer's certificate must
    chain to."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        """Mutual TLS: a client without a certificate of the CA never gets a byte."""
        ctx = self._context(ssl.Purpose.CLIENT_AUTH)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Trusts the CA only. The server's name is checked against the host the caller
        expects (`peer_host`), not against the address dialled: hosts are known by name."""
        ctx = self._context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(purpose, cafile=str(self.ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(
                f"cannot use TLS files {self.cert}, {self.key} (CA {self.ca}): {exc}",
                field="tls",
            ) from None
        return ctx


def peer_names(peercert: Mapping[str, Any] | None) -> frozenset[str]:
    """The names a verified peer certificate carries: its subject's CN and its DNS SANs."""
    if not peercert:
        return frozenset()
    names = {
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    }
    names |= {value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"}
    return frozenset(names)


def check_peer(peercert: Mapping[str, Any] | None, expected: str, *, what: str) -> None:
    """Refuse a peer whose certificate is not the expected host's."""
    names = peer_names(peercert)
    if expected not in names:
        shown = ", ".join(sorted(names)) or "no certificate"
        raise Forbidden(f"{what}: the peer's certificate is for {shown}, not {expected}")
