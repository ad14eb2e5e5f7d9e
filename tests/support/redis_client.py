"""A redis client that surfaces every reset, a writer on one connection, and a redis-server
started in a lab: what the connection-survival tests drive a moving redis with."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deploy.workloads import REDIS_ARGS
from tests.support.cli import ferry


def connect(ip: str) -> redis.Redis:
    """One connection, no retries, no reconnects: any reset surfaces as an error."""
    return redis.Redis(
        host=ip,
        port=6379,
        single_connection_client=True,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=60,
        socket_connect_timeout=5,
        health_check_interval=0,
    )


@dataclass
class Writer:
    """Appends 0, 1, 2, … to a list, one command at a time on one connection."""

    client: redis.Redis
    key: str = "ferry:writes"
    written: int = 0
    longest_pause: float = 0.0
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.is_set():
            try:
                self.client.rpush(self.key, self.written)
            except BaseException as exc:  # a reset, a timeout: the test must see it
                self.errors.append(exc)
                return
            now = time.monotonic()
            self.longest_pause = max(self.longest_pause, now - last)
            last = now
            self.written += 1


def start_redis(lab: str, rootfs: Path) -> str:
    """Run redis-server as container "redis" on h1; its address once it answers PING."""
    run = ferry(
        lab, "container", "run", "--host", "h1", "--name", "redis", "--rootfs", str(rootfs),
        "--", *REDIS_ARGS,
    )  # fmt: skip
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 15
    while True:
        try:
            if connect(ip).ping():
                return ip
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
