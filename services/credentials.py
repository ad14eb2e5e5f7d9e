"""A bus identity's secret, as a file only its owner can read.

A credentials file is JSON, mode 0600: `{"user": "h1", "password": "..."}`. The bus knows
only a bcrypt hash of the password (see `services/identities.py`), so a copied server
config gives nobody a way in.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from services.errors import InvalidInput

USER_NAME = r"^[a-z][a-z0-9-]{0,62}$"


class BusCredentials(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    user: str = Field(pattern=USER_NAME, description="the NATS user of this identity")
    password: SecretStr = Field(min_length=16)

    def to_json(self) -> str:
        return json.dumps({"user": self.user, "password": self.password.get_secret_value()}) + "\n"


def load_credentials(path: Path) -> BusCredentials:
    """The credentials in `path`, refused if anyone but its owner may read them."""
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(
            f"cannot read credentials {path}: {exc.strerror}", field="creds"
        ) from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidInput(
            f"credentials {path} are readable by others (mode {stat.S_IMODE(info.st_mode):o});"
            f" run `chmod 600 {path}`",
            field="creds",
        )
    try:
        return BusCredentials.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        raise InvalidInput(f"credentials {path}: {where}: {first['msg']}", field="creds") from exc


def write_credentials(path: Path, creds: BusCredentials) -> None:
    """Atomically, created 0600 (never briefly readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(creds.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
