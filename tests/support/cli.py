"""Running the real `ferry` command, as a user or another program would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FERRY = Path(sys.executable).parent / "ferry"


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def ferry(
    lab: str,
    *args: str,
    timeout: float = 300.0,
    check: bool = False,
    env: dict[str, str] | None = None,
) -> Result:
    env = {**os.environ, **(env or {}), "FERRY_LAB": lab}
    done = subprocess.run(
        [str(FERRY), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    result = Result(done.returncode, done.stdout, done.stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"ferry {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return result
