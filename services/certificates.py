"""The fleet's certificates, made with Debian's `openssl`: one CA, and for each host (and
each NATS node) a key and a certificate naming it — its name as the CN and a DNS SAN, its
addresses as IP SANs. Ferry's transfer port checks the name; CRIU's page-server TLS and
NATS check the address dialled, so both go in.

What an operator runs once (`ferry certs`), and again for a new host: an existing CA is
kept, and so is a host's certificate while it still names the same addresses. Keys are
written 0600; the CA's key never leaves the directory it was made in.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.errors import InvalidInput, RuntimeFailure

CA_CERT, CA_KEY = "ca.pem", "ca.key"
CA_DAYS = 3650
HOST_DAYS = 825  # what browsers and most TLS stacks still accept for a leaf
CURVE = "prime256v1"
# Valid from a day before they are made: hosts share no clock, and one a little behind the
# operator's would otherwise refuse every certificate as "not yet valid".
BACKDATE = dt.timedelta(days=1)
NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Issued:
    """One subject's files."""

    name: str
    cert: Path
    key: Path


def _openssl(*args: str) -> str:
    try:
        done = subprocess.run(
            ["openssl", *args], capture_output=True, text=True, check=True, timeout=30
        )
    except FileNotFoundError:
        raise RuntimeFailure("openssl is not installed (apt install openssl)") from None
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeFailure(f"openssl {args[0]} failed: {said}") from None
    return done.stdout


def _new_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    _openssl("ecparam", "-name", CURVE, "-genkey", "-noout", "-out", str(path))


def _utc(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%y%m%d%H%M%SZ")


def _sign(
    csr: Path, out: Path, extensions: str, *, days: int, ca: Issued | None, key: Path
) -> None:
    """Sign `csr` with `openssl ca` (which, unlike `openssl x509` of OpenSSL 3.0, can set
    notBefore): by `ca`, or by its own `key` when `ca` is None (the CA itself)."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "index.txt").write_text("")
        (tmp / "serial").write_text(secrets.token_hex(16) + "\n")
        (tmp / "ext.cnf").write_text(extensions)
        (tmp / "ca.cnf").write_text(
            "[ca]\ndefault_ca = fleet\n[fleet]\n"
            f"database = {tmp}/index.txt\nnew_certs_dir = {tmp}\nserial = {tmp}/serial\n"
            "default_md = sha256\npolicy = anything\nunique_subject = no\n"
            "[anything]\ncommonName = supplied\n"
        )
        now = dt.datetime.now(dt.UTC)
        signer = ["-selfsign"] if ca is None else ["-cert", str(ca.cert)]
        _openssl(
            "ca", "-batch", "-notext", "-config", str(tmp / "ca.cnf"), *signer,
            "-keyfile", str(key if ca is None else ca.key), "-in", str(csr), "-out", str(out),
            "-startdate", _utc(now - BACKDATE), "-enddate", _utc(now + dt.timedelta(days=days)),
            "-extfile", str(tmp / "ext.cnf"),
        )  # fmt: skip


def ensure_ca(directory: Path, *, label: str = "Ferry fleet CA") -> Issued:
    """The CA in `directory`, made if it is not there yet."""
    cert, key = directory / CA_CERT, directory / CA_KEY
    if cert.exists() and key.exists():
        return Issued("ca", cert, key)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    _new_key(key)
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "ca.csr"
        _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={label}", "-out", str(csr))
        extensions = (
            "basicConstraints=critical,CA:TRUE,pathlen:0\n"
            "keyUsage=critical,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier=hash\n"
        )
        _sign(csr, cert, extensions, days=CA_DAYS, ca=None, key=key)
    return Issued("ca", cert, key)


def _addresses(addresses: Sequence[str]) -> list[str]:
    out = []
    for text in addresses:
        try:
            out.append(str(ipaddress.ip_address(text)))
        except ValueError:
            raise InvalidInput(f"{text!r} is not an IP address", field="address") from None
    return out


def san_of(name: str, addresses: Sequence[str]) -> str:
    return ",".join([f"DNS:{name}", *(f"IP:{a}" for a in _addresses(addresses))])


def _current_san(cert: Path) -> str | None:
    try:
        text = _openssl("x509", "-in", str(cert), "-noout", "-ext", "subjectAltName")
    except RuntimeFailure:
        return None
    lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    return ",".join(
        part.strip().replace("IP Address:", "IP:") for part in ",".join(lines).split(",")
    )


def issue(ca: Issued, directory: Path, name: str, addresses: Sequence[str]) -> Issued:
    """`name`'s key and certificate in `directory` (`<name>.pem`, `<name>.key`), signed by
    `ca`, for server and client use alike (a host is both)."""
    if not NAME.match(name):
        raise InvalidInput(f"{name!r} is not a host or node name (a-z, 0-9, -)", field="name")
    san = san_of(name, addresses)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    if cert.exists() and key.exists() and _current_san(cert) == san:
        return Issued(name, cert, key)
    _new_key(key)
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "req.csr"
        extensions = (
            f"subjectAltName={san}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "authorityKeyIdentifier=keyid\n"
        )
        _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
        _sign(csr, cert, extensions, days=HOST_DAYS, ca=ca, key=key)
    return Issued(name, cert, key)
