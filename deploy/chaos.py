"""`make chaos`: real faults at every step of real migrations, judged from outside.

Each cell is one migration of a container that keeps a random token and counters in
memory, with one fault: a worker SIGKILLed before, during or after a step (the one the
migration record says runs the step, or a bystander whose service it needs), frozen with
SIGSTOP, a command delivered twice, NATS killed and restarted, a host cut from its peer or
from the bus (proven by the packets dropped), the destination cut off right after its
commit's compare-and-set, corrupted transfer bytes, a full destination disk, a failing
CRIU restore. After each cell an external monitor (cgroups and /proc, not Ferry's records)
says whether two copies ever ran at once, each host is asked what runs there (runc, the
copy's own loopback) and that is compared with the placement read raw from the KV bucket;
an independent inventory (runc, netns files, mounts, veths, iptables, state dirs) looks
for leftovers. Every cell gets a verdict (deploy/chaos_checks.py); the run goes on to the
end whatever happens, and any lost, two-copies, placement-wrong, failed-without-reason or
unfinished cell fails it. The table goes to stdout, the cells to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deploy import chaos_cuts, chaos_faults, chaos_nats
from deploy.chaos_checks import (
    FATAL,
    FLAWED,
    VERDICTS,
    Seen,
    answers_on_loopback,
    runc_state,
    runc_status,
)
from deploy.chaos_checks import verdict as judge
from deploy.lab import natscluster
from deploy.lab.lab import operator_creds
from deploy.lab.layout import LabLayout, read_spec
from deploy.workloads import build_rootfs, query, wait_until_serving
from schemas import subjects
from services import bus
from services.runtime.netns import host_veth_name
from services.watchdog import GRACE_S
from workflows.definitions import DEFINITIONS

FERRY = str(Path(sys.executable).parent / "ferry")
CHAOS_ENV = {
    # Shortened so a killed worker's command comes back within seconds (configuration only).
    "FERRY_COMMAND_BACKOFF_S": "1,2,4,8",
    "FERRY_WATCHDOG_INTERVAL_S": "1",
    "FERRY_COLLECTOR_INTERVAL_S": "5",
    "FERRY_COLLECTOR_MIN_AGE_S": "20",
}
NAME = "victim"
T = TypeVar("T")


STRATEGIES = ("stop-and-copy", "post-copy")  # pre-copy cannot run on this kernel
ROLES = ("source", "transfer", "destination", "cleanup")


def _actions(strategy: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A strategy's forward steps and its compensations, from its saga definition."""
    steps = DEFINITIONS[strategy].steps
    compensations = tuple(s.compensation.name for s in reversed(steps) if s.compensation)
    return tuple(s.name for s in steps), compensations


COMPENSATIONS = _actions("stop-and-copy")[1]


def _both(*steps: str) -> frozenset[str]:
    return frozenset(f"{s}:{w}" for s in steps for w in ("before", "after"))


# Where cutting a step's host from its peer alone drops packets: the hosts talk to each other
# there. Everywhere else a host talks only to NATS, and the "isolate" cells cut that; a cut
# there tested nothing (two full runs, at 168e2f8 and 08cf046, dropped no packet at any
# cell left out here in either direction).
PEER_TALK = {
    "stop-and-copy": _both("preflight", "prepare_destination", "presync_files", "dump",
                           "stop_destination") | {"transfer:before", "resume_source:before"},
    "post-copy": _both("preflight", "prepare_destination", "presync_files", "dump", "transfer",
                       "restore", "verify") | {"commit:before", "open_network:before"},
}  # fmt: skip
# Which role runs each step or compensation, and on which side of the move.
RUNS: dict[str, tuple[str, str]] = {}
for _definition in DEFINITIONS.values():
    for _step in _definition.steps:
        RUNS[_step.name] = (_step.role, _step.side)
        if _step.compensation:
            RUNS[_step.compensation.name] = (_step.compensation.role, _step.compensation.side)


@dataclass(frozen=True)
class Cell:
    """One fault at one step: `before` its side effect (at its start) or `after` it."""

    # kill | freeze | duplicate | nats-restart | net-cut | cas-cut | corrupt | disk-full |
    # restore-fails | kv-lost | store-lost | clock | nats-kill
    fault: str
    step: str
    when: str  # before | after | during | mid (while the record shows the step running)
    # kill: whose worker dies ("step": whoever the record says runs the step);
    # net-cut: "" cuts the step's host from its peer, "isolate" from its peer and NATS;
    # clock: the offset, e.g. "+30s"; nats-kill: which node (chaos_nats.TARGETS)
    role: str = ""
    strategy: str = "stop-and-copy"

    @property
    def label(self) -> str:
        who = f"[{self.role}]" if self.role else ""
        moved_by = "" if self.strategy == "stop-and-copy" else f"{self.strategy}/"
        return f"{moved_by}{self.fault}{who}:{self.step}:{self.when}"

    @property
    def compensating(self) -> bool:
        return self.step in COMPENSATIONS

    @property
    def kind(self) -> str:
        return "compensation" if self.compensating else "forward"

    def injected(self) -> list[str]:
        """Faults Ferry fires itself (test-only switch)."""
        faults = []
        if self.compensating or self.fault == "restore-fails":
            faults.append("restore")  # a failing restore is what makes compensations run
        if self.fault == "kill" and self.role == RUNS[self.step][0]:
            faults.append(f"kill:{self.step}:{self.when}")
        if self.fault == "duplicate":
            faults.append(f"duplicate:{self.step}")
        if self.fault == "corrupt":
            faults.append("corrupt:transfer")
        if self.fault == "cas-cut":
            faults.append("pause:commit:cas")  # the destination stops for the cut to go in
        return faults

    @property
    def external(self) -> bool:
        """Fired by the harness when the migration reaches the step (not by Ferry)."""
        if self.fault == "kill":
            return self.role != RUNS[self.step][0]
        return self.fault in ("nats-restart", "net-cut", "freeze", "cas-cut", "kv-lost",
                              "store-lost", "nats-kill")  # fmt: skip

    @property
    def pending(self) -> str:
        """Why this cell cannot run yet, "" when it can."""
        return chaos_faults.pending_reason(self.fault)


@dataclass
class Outcome:
    cell: str
    direction: str
    state: str = "unknown"
    fired: bool = False
    evidence: str = ""
    ran_twice: bool = False  # two runnable copies on two samples in a row
    twice_glimpses: list[str] = field(default_factory=list)  # single samples, with detail
    running_now: int = 0
    memory_intact: bool = False
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    migration_id: str = ""
    error: str = ""  # the record's error, when it ended failed
    verdict: str = "unknown"
    problems: list[str] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)  # placement vs. hosts, at the end

    @property
    def lost(self) -> bool:
        return self.verdict == "lost"

    @property
    def fatal(self) -> bool:
        return self.verdict in FATAL


def grid(quick: bool, strategies: tuple[str, ...] = STRATEGIES) -> list[Cell]:
    if quick:
        cells = [
            Cell("kill", "dump", "after", "source"),
            Cell("kill", "resume_source", "before", "destination"),
            Cell("duplicate", "restore", "before"),
            Cell("restore-fails", "restore", "during"),
            Cell("corrupt", "transfer", "during"),
            Cell("nats-restart", "transfer", "before"),
            # The dump streams pages to the destination: a cut there always drops packets (a
            # transfer of a small container can be over before the cut is in).
            Cell("net-cut", "dump", "before"),
            Cell("disk-full", "dump", "during"),
        ]
        post = [
            Cell("restore-fails", "restore", "during", strategy="post-copy"),
            Cell("kill", "resume_source", "after", "source", strategy="post-copy"),
            Cell("kill", "drain_pages", "before", "destination", strategy="post-copy"),
        ]
        # The kinds added for issue 13 are in the full grid (--only/--cell pick them).
        return [c for c in cells + post if c.strategy in strategies]
    cells = []
    for strategy in strategies:
        steps, compensations = _actions(strategy)
        every = steps + compensations
        cells += [Cell("kill", s, w, r, strategy) for s in every for w in ("before", "after")
                  for r in ROLES]  # fmt: skip
        cells += [Cell("duplicate", s, "before", strategy=strategy) for s in every]
        cells += [Cell("nats-restart", s, w, strategy=strategy) for s in every
                  for w in ("before", "after")]  # fmt: skip
        cells += [Cell("net-cut", s, w, strategy=strategy) for s in every
                  for w in ("before", "after") if f"{s}:{w}" in PEER_TALK[strategy]]  # fmt: skip
        cells += [Cell("corrupt", "transfer", "during", strategy=strategy),
                  Cell("restore-fails", "restore", "during", strategy=strategy)]  # fmt: skip
        if strategy == "stop-and-copy":  # post-copy's dump writes no pages to that disk
            cells += [Cell("disk-full", "dump", "during")]
        # The worker the record names for the step, killed while it runs it.
        cells += [Cell("kill", s, "mid", "step", strategy) for s in every]
        # The step's host cut from its peer and from the bus at once.
        cells += [Cell("net-cut", s, "before", "isolate", strategy) for s in every]
        # Alive but silent past the step's timeout and grace, then continued.
        frozen = ("restore",) + (("drain_pages",) if "drain_pages" in steps else ())
        cells += [Cell("freeze", s, "mid", "destination", strategy) for s in frozen]
        cells += [Cell("freeze", "commit", "before", "destination", strategy)]
        cells += [Cell("cas-cut", "commit", "after", "destination", strategy)]
        # One node of the JetStream cluster killed as the dump starts, by what it leads.
        cells += [Cell("nats-kill", "dump", "before", t, strategy) for t in chaos_nats.TARGETS]
        # The placement bucket or the whole store lost before and after the commit.
        cells += [Cell("kv-lost", "transfer", "before", strategy=strategy),
                  Cell("store-lost", "commit", "after", strategy=strategy)]  # fmt: skip
        if strategy == "stop-and-copy":
            cells += [Cell("kv-lost", "commit", "after"),
                      Cell("store-lost", "dump", "after"),
                      Cell("clock", "all", "during", "+30s"),
                      Cell("clock", "all", "during", "-30s")]  # fmt: skip
    return cells


def ferry(
    lab: str, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **CHAOS_ENV, "FERRY_LAB": lab}
    return subprocess.run(
        [FERRY, *args], env=env, text=True, capture_output=True, check=check, timeout=timeout
    )


class EventTap:
    """Every migration event, as it is published (a plain NATS subscriber, like any system's)."""

    def __init__(self, servers: tuple[str, ...], creds: Path, ca: Path) -> None:
        self.servers = servers
        self.creds = creds
        self.ca = ca
        self.events: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        import asyncio

        import nats

        async def main() -> None:
            async def quiet(_: Exception) -> None:
                return None  # NATS restarts are part of the show

            nc = await nats.connect(
                list(self.servers),
                **bus.client_options(self.creds, self.ca),
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                error_cb=quiet,
            )

            async def seen(msg: Any) -> None:
                with self.changed:
                    self.events.append(json.loads(msg.data))
                    self.changed.notify_all()

            await nc.subscribe("ferry.v1.events.>", cb=seen)
            await nc.flush()
            self.loop, self.nc = asyncio.get_running_loop(), nc
            self.ready.set()
            while True:
                await asyncio.sleep(3600)

        asyncio.run(main())

    def close(self) -> None:
        """Stop reconnecting to a lab that is gone (its thread lives on, idle, as a daemon)."""
        with contextlib.suppress(Exception):
            self.call(bus.close, timeout=5.0)

    def call(self, make: Callable[[Any], Coroutine[Any, Any, T]], timeout: float = 10.0) -> T:
        """Run `make(nc)` on the tap's own connection (KV reads, a bucket deleted)."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(make(self.nc), self.loop).result(timeout)

    def placement(self, name: str) -> tuple[dict[str, Any] | None, str]:
        """The placement as the KV bucket holds it, raw, and why it is missing if it is:
        a missing bucket, a missing key and no answer are three different things."""

        async def read(nc: Any) -> tuple[dict[str, Any] | None, str]:
            from nats.js.errors import NotFoundError

            try:  # the latest entry over every author's key of this container
                msg = await nc.jetstream().get_msg(
                    f"KV_{subjects.PLACEMENT_BUCKET}", subject=subjects.placement_subjects(name)
                )
            except NotFoundError as exc:
                return None, ("no key" if exc.err_code == 10037 else "bucket missing")
            removed = (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")
            return (None if removed or not msg.data else json.loads(msg.data)), "no value"

        try:
            return self.call(read)
        except Exception as exc:  # the harness reports it, whatever it is
            return None, f"unreadable: {type(exc).__name__}"

    def record(self, migration_id: str) -> dict[str, Any]:
        """The migration record, raw (milliseconds, where `ferry status` takes a process)."""
        return self.kv_json(subjects.MIGRATIONS_BUCKET, migration_id)[0] or {}

    def kv_json(self, bucket: str, key: str) -> tuple[dict[str, Any] | None, str]:
        async def read(nc: Any) -> tuple[dict[str, Any] | None, str]:
            from nats.js.errors import BucketNotFoundError, KeyNotFoundError

            try:
                kv = await nc.jetstream().key_value(bucket)
                entry = await kv.get(key)
            except BucketNotFoundError:
                return None, "bucket missing"
            except KeyNotFoundError:
                return None, "no key"
            return (json.loads(entry.value) if entry.value else None), "no value"

        try:
            return self.call(read)
        except Exception as exc:  # the harness reports it, whatever it is
            return None, f"unreadable: {type(exc).__name__}"

    def mark(self) -> int:
        with self.changed:
            return len(self.events)

    def wait(self, since: int, match: Any, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for event in self.events[since:]:
                    if match(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)


PF_EXITING = 0x4
# Signals 9 and 19 in /proc's pending-signal masks: a task with either pending is handling
# it in the kernel and never returns to its own code first.
SIGKILL_BIT, SIGSTOP_BIT = 1 << 8, 1 << 18
ON_ITS_WAY_OUT_OR_TO_A_STOP = SIGKILL_BIT | SIGSTOP_BIT


def _runs_user_code(pid: str) -> bool:
    """Running or able to run — not stopped, not frozen, not on its way out or to a stop.

    Post-copy's source shows R for a moment twice while its copy already runs elsewhere:
    when CRIU lets go of it with SIGSTOP pending (leave-stopped), and when the stopped copy
    is removed with SIGKILL. Neither runs a single instruction of the workload."""
    try:
        # status before stat: a stop signal is taken and the task marked stopped under one
        # lock, so a mask read empty is followed by a state that already says T. Read the
        # other way round, the task can be seen R with the signal pending, then with the
        # signal gone: runnable, for a task that never runs again.
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    if fields[0] not in ("R", "S", "D") or int(fields[6]) & PF_EXITING:
        return False
    pending = [line.split()[1] for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return not any(int(mask, 16) & ON_ITS_WAY_OUT_OR_TO_A_STOP for mask in pending)


def _task_detail(pid: str) -> str:
    """A task's state letter and pending-signal masks, for the record of a glimpse."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (OSError, IndexError):
        return f"{pid}:gone"
    masks = [line.split()[1].lstrip("0") or "0" for line in status
             if line.startswith(("SigPnd:", "ShdPnd:"))]  # fmt: skip
    return f"{pid}:{state}:pnd={'/'.join(masks)}"


class Monitor:
    """Samples, from /proc and the cgroups, on which hosts the container runs un-frozen.

    Two copies count only when two samples in a row (~10 ms apart) see them: a copy
    going from running to stopped or dead passes, for some microseconds, through a state
    where /proc shows it runnable with nothing pending (the signal already taken, the stop
    or exit not yet recorded), and the two files are read one after the other. A real
    second copy runs for far longer than one sample; each single glimpse is kept, with
    the tasks' states, so none is hidden."""

    def __init__(self, lab: str, hosts: tuple[str, ...]) -> None:
        self.lab, self.hosts = lab, hosts
        self.samples = 0
        self.twice = 0  # confirmed: two samples in a row
        self.glimpses: list[str] = []
        self.stop = threading.Event()

    def pids(self, host: str) -> list[str]:
        base = Path(f"/sys/fs/cgroup/freezer/ferry-{self.lab}/{host}/{NAME}")
        try:
            return (base / "cgroup.procs").read_text().split()
        except OSError:
            return []

    def running_on(self) -> list[str]:
        found = []
        for host in self.hosts:
            base = Path(f"/sys/fs/cgroup/freezer/ferry-{self.lab}/{host}/{NAME}")
            try:
                frozen = (base / "freezer.state").read_text().strip() != "THAWED"
                pids = (base / "cgroup.procs").read_text().split()
            except OSError:
                continue
            live = [pid for pid in pids if _runs_user_code(pid)]
            if live and not frozen:
                found.append(host)
        return found

    def run(self) -> None:
        previous = False
        while not self.stop.is_set():
            both = len(self.running_on()) > 1
            if both and len(self.glimpses) < 5:
                detail = " ".join(f"{h}[{' '.join(_task_detail(p) for p in self.pids(h))}]"
                                  for h in self.hosts)  # fmt: skip
                self.glimpses.append(f"sample {self.samples}: {detail}")
            if both and previous:
                self.twice += 1
            previous = both
            self.samples += 1
            time.sleep(0.01)


def inventory(lab: str, host: str, placed_here: bool) -> list[str]:
    """What this host still holds for the container that it should not."""
    state = Path(f"/var/lib/ferry-lab/{lab}/hosts/{host}")
    left = [f"{host}:migrations/{p.name}" for p in (state / "migrations").glob("*")]
    runc = subprocess.run(
        ["runc", "--root", str(state / "runc"), "list", "-q"], capture_output=True, text=True
    ).stdout.split()
    mounts = subprocess.run(
        ["nsenter", f"--mount=/run/ferry-lab/{lab}/mnt/{host}", "cat", "/proc/self/mountinfo"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    links = subprocess.run(
        ["ip", "-n", f"{lab}-{host}", "-o", "link"], capture_output=True, text=True
    ).stdout
    if placed_here:
        # By the container's pid: its netns file is a mount only the host's mount ns sees.
        _, pid = runc_state(state / "runc", NAME)
        read = subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "iptables", "-S"], capture_output=True, text=True
        )
        if pid is None or read.returncode != 0:
            left.append(f"{host}:iptables unreadable")
        rules = read.stdout
        for chain in ("FERRY-HOLD", "CRIU"):
            if f"-N {chain}" in rules:
                left.append(f"{host}:iptables {chain}")
        return left
    if NAME in runc:
        left.append(f"{host}:runc {NAME}")
    for what in ("containers", "netns"):
        if (state / what / NAME).exists():
            left.append(f"{host}:{what}/{NAME}")
    targets = [line.split()[4] for line in mounts.splitlines() if len(line.split()) > 4]
    if any(t.startswith((f"/var/lib/ferry/containers/{NAME}/", f"/var/lib/ferry/netns/{NAME}"))
           for t in targets):  # fmt: skip
        left.append(f"{host}:mounts")
    if host_veth_name(NAME) in links:
        left.append(f"{host}:veth")
    return left


def nats_pids(lab: str) -> tuple[int | None, ...]:
    """The pid of each node of the lab's NATS cluster (None: that node is down)."""
    layout = LabLayout(lab)
    spec = read_spec(layout)
    nodes = spec.nats_nodes if spec is not None else ()
    return tuple(natscluster.node_pid(layout, n) for n in nodes)


def kill_nats(lab: str) -> tuple[int | None, ...]:
    """SIGKILL every node of the cluster at once (the whole bus gone); their pids before."""
    old = nats_pids(lab)
    for pid in old:
        if pid:
            os.kill(pid, signal.SIGKILL)
    return old


def worker_pids(lab: str) -> dict[tuple[str, str], int]:
    hosts = json.loads(ferry(lab, "hosts", "--json").stdout)
    return {(h["name"], role): pid for h in hosts for role, pid in h["workers"].items() if pid}


def beating_pids(tap: EventTap, hosts: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """The workers' pids as their agents' heartbeats say, read on the tap's connection: a
    few milliseconds, where `ferry hosts` starts a process and connects (seconds right after
    a NATS restart — long enough for a short step to be over before its fault fires)."""
    pids = {}
    for host in hosts:
        beat, _ = tap.kv_json(subjects.HOSTS_BUCKET, host)
        for worker in (beat or {}).get("workers", []):
            if worker.get("pid"):
                pids[(host, worker["role"])] = int(worker["pid"])
    return pids


HEARTBEAT_WAIT_S = 30.0
UNLOCK_WAIT_S = 20.0  # a killed cleanup worker is back and has unlocked well within this
UNLOCKING_STATES = ("completed", "rolled_back")  # a failure before the commit stays locked


def _wait_for_heartbeats(tap: EventTap, hosts: tuple[str, ...], timeout: float) -> None:
    """Until both hosts' heartbeats are on the bus: right after a NATS restart a host can be
    without one for a while, and intake would refuse the move ("host is down")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(tap.kv_json(subjects.HOSTS_BUCKET, host)[0] is not None for host in hosts):
            return
        time.sleep(0.2)


def run_cell(
    lab: str,
    tap: EventTap,
    cell: Cell,
    source: str,
    destination: str,
    ip: str,
    memory: dict[str, Any],
) -> Outcome:
    outcome = Outcome(cell=cell.label, direction=f"{source}->{destination}")
    if cell.pending:
        outcome.verdict, outcome.evidence = "pending", f"pending: {cell.pending}"
        return outcome
    _wait_for_heartbeats(tap, (source, destination), HEARTBEAT_WAIT_S)
    started = time.monotonic()
    monitor = Monitor(lab, (source, destination))
    watcher = threading.Thread(target=monitor.run, daemon=True)
    watcher.start()
    dest_mnt = ["nsenter", f"--mount=/run/ferry-lab/{lab}/mnt/{destination}", "--"]
    if cell.fault == "disk-full":
        subprocess.run([*dest_mnt, "mount", "-t", "tmpfs", "-o", "size=512k", "chaosfull",
                        "/var/lib/ferry/migrations"], check=True)  # fmt: skip
    args = ["migrate", NAME, "--to", destination, "--strategy", cell.strategy, "--json"]
    if cell.injected():
        args += ["--inject-fault", "+".join(cell.injected())]
    if cell.fault == "clock":  # the destination's workers, for the whole migration
        outcome.fired, outcome.evidence = _skew(lab, destination, cell.role)
    since = tap.mark()
    env = {**os.environ, **CHAOS_ENV, "FERRY_LAB": lab}
    cli = subprocess.Popen([FERRY, *args], env=env, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    must_end_on = ""
    try:
        accepted = tap.wait(since, lambda e: e["type"] == "accepted", 30)
        migration_id = accepted["migration_id"] if accepted else ""
        outcome.migration_id = migration_id
        if cell.external and migration_id:
            fault = ExternalFault(lab, tap, since, cell, migration_id, source, destination)
            outcome.fired, outcome.evidence = fault.fire()
            must_end_on = fault.must_end_on
        outcome.state = _wait_for_end(lab, tap, since, migration_id, 240)
    finally:
        if cli.poll() is None:
            cli.terminate()
        _, err = cli.communicate()
        if cell.fault == "disk-full":
            subprocess.run([*dest_mnt, "umount", "-l", "/var/lib/ferry/migrations"], check=False)
        if cell.fault == "clock":
            _skew(lab, destination, "")
        if cell.fault == "nats-kill":
            chaos_nats.revive(lab)
    time.sleep(0.5)
    if outcome.state in UNLOCKING_STATES:
        _wait_for_unlock(tap, UNLOCK_WAIT_S)
    monitor.stop.set()
    watcher.join()
    outcome.ran_twice = monitor.twice > 0
    outcome.twice_glimpses = monitor.glimpses
    seen = observe(lab, tap, monitor, ip, memory)
    outcome.seen = asdict(seen)
    running = sorted(set(seen.runnable) | set(seen.answering))
    outcome.running_now = len(running)
    outcome.memory_intact = seen.client_ok
    placed = running[0] if len(running) == 1 else ""
    for host in (source, destination):
        outcome.leftovers += inventory(lab, host, host == placed)
    record = chaos_faults.record_of(env, migration_id) if migration_id else {}
    outcome.error = str(record.get("error") or "")
    if not migration_id:  # never accepted: what `ferry migrate` said is all there is
        outcome.error = f"no accepted event within 30 s; ferry migrate said: {err.strip()[-300:]}"
    if cell.fault == "disk-full":
        errors = " ".join(s.get("error") or "" for s in record.get("steps", []))
        # The page server could not write into the 512 KiB tmpfs: the dump fails.
        outcome.fired = any(w in errors for w in ("checkpoint", "page", "space"))
        outcome.evidence = f"destination disk full: {errors[:100]}"
    elif not cell.external and cell.fault != "clock":
        outcome.fired, outcome.evidence = _ferry_fault_evidence(lab, cell, migration_id, err)
    outcome.verdict, outcome.problems = judge(
        state=outcome.state,
        error=outcome.error,
        fired=outcome.fired,
        seen=seen,
        confirmed_twice=outcome.ran_twice,
        leftovers=outcome.leftovers,
        must_end_on=must_end_on,
    )
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def _wait_for_unlock(tap: EventTap, within_s: float) -> None:
    """A finished saga's placement is unlocked by its holder's dispatcher (in the cleanup
    worker), a moment after the record ends — later when that worker was just killed and is
    starting again. Give it that moment: a placement still locked after it is a finding."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        placement, _ = tap.placement(NAME)
        if (placement or {}).get("state") != "migrating":
            return
        time.sleep(0.5)


def _skew(lab: str, host: str, offset: str) -> tuple[bool, str]:
    def up(extra: dict[str, str]) -> None:
        env = {**os.environ, **CHAOS_ENV, "FERRY_LAB": lab, **extra}
        argv = [FERRY, "lab", "up", "--hosts", "2", "--allow-faults"]
        subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)

    return chaos_faults.skew_workers(lab, host, offset, lambda: worker_pids(lab), up)


def observe(lab: str, tap: EventTap, monitor: Monitor, ip: str, memory: dict[str, Any]) -> Seen:
    """Where the container runs, host by host, beside what the placement says."""
    layout = LabLayout(lab)
    placement, note = tap.placement(NAME)
    seen = Seen(
        placement_host=str((placement or {}).get("host", "")),
        placement_state=str((placement or {}).get("state", "")),
        placement_note="" if placement else note,
    )
    for host in monitor.hosts:
        seen.runc[host], pid = runc_state(layout.runc_root(host), NAME)
        if answers_on_loopback(pid):
            seen.answering.append(host)
    seen.runnable = monitor.running_on()
    try:
        now = query(ip, timeout=10)
        seen.client_ok = (
            now["token"] == memory["token"] and now["requests"] > memory["requests"]
            and now["buffer_ok"] is True
        )  # fmt: skip
        memory.update(now)
    except OSError:
        seen.client_ok = False
    return seen


def _wait_for_end(lab: str, tap: EventTap, since: int, migration_id: str, timeout: float) -> str:
    """The migration's final state: from its event, or from its record if the event is late."""
    deadline = time.monotonic() + timeout
    while migration_id and time.monotonic() < deadline:
        finished = tap.wait(
            since, lambda e: e["type"] == "finished" and e["migration_id"] == migration_id, 2
        )
        if finished:
            return str(finished["state"])
        record = json.loads(
            ferry(lab, "status", migration_id, "--json", check=False).stdout or "{}"
        )
        if record.get("state") in ("completed", "rolled_back", "failed"):
            # The record is written before the end is announced: give the event a moment.
            late = tap.wait(
                since, lambda e: e["type"] == "finished" and e["migration_id"] == migration_id, 15
            )
            return str(record["state"]) if late else f"{record['state']} (no event)"
    return "unfinished"


# How long a frozen worker or a cut-off destination stays silent: past the step's timeout
# and the watchdog's grace, so the watchdog has to decide while it cannot hear from it.
SILENCE_MARGIN_S = 5.0
SILENCE_CAP_S = 60.0


def _previous(cell: Cell) -> str:
    """The forward step before the cell's."""
    steps = DEFINITIONS[cell.strategy].steps
    index = next(i for i, s in enumerate(steps) if s.name == cell.step)
    return steps[index - 1].name


def _is_worker(pid: int, role: str) -> bool:
    try:
        return f"services.{role}" in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def _silence_for(step: str) -> float:
    timeout = next(s.timeout_s for d in DEFINITIONS.values() for s in d.steps if s.name == step)
    return min(timeout + GRACE_S + SILENCE_MARGIN_S, SILENCE_CAP_S)


class ExternalFault:
    """One fault the harness fires itself, the moment the migration reaches the step."""

    def __init__(
        self,
        lab: str,
        tap: EventTap,
        since: int,
        cell: Cell,
        migration_id: str,
        source: str,
        destination: str,
    ) -> None:
        self.lab, self.tap, self.since, self.cell = lab, tap, since, cell
        self.migration_id, self.source, self.destination = migration_id, source, destination
        self.spec = read_spec(LabLayout(lab))
        assert self.spec is not None
        self.env = {**os.environ, **CHAOS_ENV, "FERRY_LAB": lab}
        self.must_end_on = ""  # set when the fault leaves one right answer (rolled forward)
        self.known_pids = beating_pids(tap, (source, destination))

    def host_of(self, side: str) -> str:
        return self.source if side == "source" else self.destination

    def pids(self) -> dict[tuple[str, str], int]:
        """The workers' pids: those read at the start while each is still that worker."""
        known = {w: pid for w, pid in self.known_pids.items() if _is_worker(pid, w[1])}
        if len(known) == len(self.known_pids):
            return known
        self.known_pids = beating_pids(self.tap, (self.source, self.destination))
        return self.known_pids

    def record(self) -> dict[str, Any]:
        return self.tap.record(self.migration_id)

    def reached(self, step: str, when: str) -> bool:
        kind = "compensation" if step in COMPENSATIONS else "forward"

        def match(e: dict[str, Any]) -> bool:
            if e.get("migration_id") != self.migration_id or e.get("step") != step:
                return False
            if e.get("kind") != kind:
                return False
            wanted = "step_finished" if when == "after" else "step_started"
            return e["type"] == wanted and (when != "after" or e.get("status") == "done")

        if when == "after":
            return self.tap.wait(self.since, match, 60) is not None
        # Before a step: its record entry is written before its command goes out, and its
        # host's dispatcher may queue the command before the step's event is published.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.tap.wait(self.since, match, 0.02) is not None:
                return True
            steps = self.record().get("steps") or []
            if any(s.get("name") == step and s.get("kind") == kind for s in steps):
                return True
        return False

    def fire(self) -> tuple[bool, str]:
        cell = self.cell
        trigger = (cell.step, cell.when)
        if cell.fault == "cas-cut":
            # Armed early: the commit follows verify by milliseconds, iptables takes tens.
            trigger = ("restore", "before")
        elif cell.fault == "freeze" and cell.when == "before":
            # The step is too short to be seen running: freeze the worker as it is sent.
            trigger = (_previous(cell), "after")
        if not self.reached(*trigger):
            return False, f"{trigger[0]} was never reached"
        fire: dict[str, Callable[[], tuple[bool, str]]] = {
            "kill": self.kill,
            "freeze": self.freeze,
            "nats-restart": self.nats_restart,
            "net-cut": self.net_cut,
            "cas-cut": self.cas_cut,
            "kv-lost": self.kv_lost,
            "store-lost": self.store_lost,
            "nats-kill": self.nats_kill,
        }
        return fire[cell.fault]()

    def _step_worker(self) -> tuple[str, str] | None:
        """(host, role) of the worker the record names for the running step."""
        step = chaos_faults.wait_running_step(self.record, self.cell.step)
        return (str(step["host"]), str(step["role"])) if step else None

    def kill(self) -> tuple[bool, str]:
        cell = self.cell
        if cell.role == "step":
            worker = self._step_worker()
            if worker is None:
                return False, f"the record never showed {cell.step} running"
            host, role = worker
            why = f"runs {cell.step} per the record"
        else:
            # A worker whose service the step needs (the transfer server on the step's host).
            host, role = self.host_of(RUNS[cell.step][1]), cell.role
            now = [s for s in self.record().get("steps", []) if s.get("status") == "running"]
            runs = ", ".join(f"{s['name']} ({s['role']}@{s['host']})" for s in now) or "nothing"
            why = f"record runs {runs}"
        pid = chaos_faults.signal_worker(self.pids, host, role, signal.SIGKILL)
        if pid is None:
            return False, f"no {role} worker on {host}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            new = beating_pids(self.tap, (host,)).get((host, role))
            if new and new != pid:
                return True, f"{role} on {host} ({why}): pid {pid} killed, restarted as {new}"
            time.sleep(0.3)
        return False, f"{role} on {host} was not restarted"

    def freeze(self) -> tuple[bool, str]:
        cell = self.cell
        if cell.when == "before":
            host, role = self.host_of(RUNS[cell.step][1]), RUNS[cell.step][0]
            placement, _ = self.tap.placement(NAME)
            where = f"placement on {(placement or {}).get('host', '?')} as it froze"
            fired, said = chaos_faults.freeze_worker(self.pids, host, role, _silence_for(cell.step))
            return fired, f"{said} ({where})"
        worker = self._step_worker()
        if worker is None:
            return False, f"the record never showed {cell.step} running"
        host, role = worker
        return chaos_faults.freeze_worker(self.pids, host, role, _silence_for(cell.step))

    def nats_restart(self) -> tuple[bool, str]:
        old = kill_nats(self.lab)
        time.sleep(0.5)
        assert self.spec is not None
        hosts = str(len(self.spec.hosts))
        ferry(self.lab, "lab", "up", "--hosts", hosts, "--allow-faults", check=False, timeout=120)
        new = nats_pids(self.lab)
        fired = all(old) and all(new) and not set(old) & set(new)
        return fired, f"every nats-server killed and started again: {old} -> {new}"

    def nats_kill(self) -> tuple[bool, str]:
        """One NATS node SIGKILLed, down until the cell ends. The first step event the
        migration makes after the kill says how long its work stalled."""
        assert self.spec is not None

        def step_down(stream: str) -> None:
            subject = chaos_nats.step_down_subject(stream)
            self.tap.call(lambda nc: nc.request(subject, b"", timeout=5))

        mark = self.tap.mark()
        fired, said, killed = chaos_nats.kill(
            LabLayout(self.lab), self.spec, self.cell.role, step_down
        )

        def next_step(e: dict[str, Any]) -> bool:
            mine = e.get("migration_id") == self.migration_id and e.get("at", 0) > killed
            return mine and e["type"] in ("step_started", "step_finished", "finished")

        event = self.tap.wait(mark, next_step, 60)
        gap = f"{event['at'] - killed:.1f} s ({event['type']})" if event else "none seen"
        with self.tap.changed:
            during = chaos_nats.step_at(self.tap.events, self.migration_id, killed)
        said += f", during {during}"
        if event is None and chaos_nats.ended_before(self.record(), killed):
            return False, f"{said}, but the migration had ended: too late"
        return fired, f"{said}; the migration's next step event after {gap}"

    def _cut(self, host: str, *, nats: bool) -> chaos_cuts.Cut:
        assert self.spec is not None
        peer = self.destination if host == self.source else self.source
        return chaos_cuts.Cut(
            netns=str(LabLayout(self.lab).netns_path(host)),
            peer=self.spec.mgmt_address(peer),
            nats=tuple(
                (self.spec.nats_address(n), self.spec.nats_port) for n in self.spec.nats_nodes
            )
            if nats
            else (),
        )

    def _ended(self, step: str) -> bool:
        entries = [e for e in self.record().get("steps") or [] if e.get("name") == step]
        return bool(entries) and entries[-1].get("status") not in ("pending", "running")

    def net_cut(self) -> tuple[bool, str]:
        host = self.host_of(RUNS[self.cell.step][1])
        isolate = self.cell.role == "isolate"
        if self.cell.when == "before" and self._ended(self.cell.step):
            return False, f"{self.cell.step} had ended before the cut went in: too late"
        # Held until the step sends (up to 20 s): after a NATS restart its command can take a
        # fetch expiry or two to reach the worker.
        dropped, lasted = chaos_cuts.hold(self._cut(host, nats=isolate), 3.0, 20.0)
        what = "its peer and NATS" if isolate else "its peer"
        # A cut that dropped nothing cut nothing: the step sent no packet meanwhile.
        return dropped > 0, f"{host} cut from {what} for {lasted} s ({dropped} packets dropped)"

    def cas_cut(self) -> tuple[bool, str]:
        """The destination's commit compare-and-set reaches NATS, NATS's answer never comes
        back. NATS speaks TLS, so the publish cannot be matched on the wire: the worker stops
        itself just before it (an injected fault) and continues 2 s later; meanwhile
        everything NATS sends the host is dropped. Once the bucket shows the placement moved,
        the host is cut off entirely for the silence, then healed."""
        cut = self._cut(self.destination, nats=True)
        pid = chaos_faults.wait_stopped(self.pids, self.destination, "destination", 60.0)
        if pid is None:
            return False, "the destination worker never paused before its compare-and-set"
        deaf = chaos_cuts.Cut(cut.netns, nats=cut.nats)
        inbound = [r for r in deaf.rules() if r[0] == "INPUT"]
        for rule in inbound:
            deaf.iptables("-I", *rule)
        try:
            moved = self._placed_on(self.destination, 30.0)
            if not moved:
                return False, "the commit's compare-and-set never reached NATS"
            self.must_end_on = self.destination
            silence = _silence_for("commit")
            dropped, lasted = chaos_cuts.hold(cut, silence, silence)
        finally:
            for rule in inbound:
                deaf.iptables("-D", *rule, check=False)
        return dropped > 0, (
            f"{self.destination} (worker pid {pid}) heard nothing from NATS as its commit's"
            f" compare-and-set moved the placement, then was cut off {lasted:.0f} s"
            f" ({dropped} packets dropped), then healed"
        )

    def _placed_on(self, host: str, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if (self.tap.placement(NAME)[0] or {}).get("host") == host:
                return True
            time.sleep(0.05)
        return False

    def kv_lost(self) -> tuple[bool, str]:
        async def delete(nc: Any) -> bool:
            return bool(await nc.jetstream().delete_key_value(subjects.PLACEMENT_BUCKET))

        deleted = self.tap.call(delete)
        time.sleep(float(CHAOS_ENV["FERRY_COLLECTOR_INTERVAL_S"]))  # a sweep sees it gone
        said = chaos_faults.reconcile(self.env, self._placed)
        return deleted, f"placement bucket deleted ({deleted}), then {said}"

    def _placed(self) -> bool:
        return self.tap.placement(NAME)[0] is not None

    def store_lost(self) -> tuple[bool, str]:
        """Every node of the cluster loses its JetStream store at once."""
        old = kill_nats(self.lab)
        time.sleep(0.5)
        assert self.spec is not None
        for node in self.spec.nats_nodes:
            store = LabLayout(self.lab).nats_node_dir(node) / "store"
            subprocess.run(["rm", "-rf", str(store)], check=False)
        hosts = str(len(self.spec.hosts))
        ferry(self.lab, "lab", "up", "--hosts", hosts, "--allow-faults", check=False, timeout=120)
        said = chaos_faults.reconcile(self.env, self._placed)
        new = nats_pids(self.lab)
        fired = all(old) and all(new)
        return fired, f"every node's JetStream store lost, nats {old} -> {new}; {said}"


def _ferry_fault_evidence(lab: str, cell: Cell, migration_id: str, err: str) -> tuple[bool, str]:
    """Ferry's own faults leave a marker on the host that fired them."""
    markers = [f for f in cell.injected() if f != "restore"]
    for fault in markers:
        for marker in Path(f"/var/lib/ferry-lab/{lab}/hosts").glob(
            f"*/chaos/{migration_id}.{fault.replace(':', '-')}"
        ):
            return True, f"{fault} fired on {marker.parts[-3]}"
    if not markers and "restore" in cell.injected():
        record = json.loads(
            ferry(lab, "status", migration_id, "--json", check=False).stdout or "{}"
        )
        restore: dict[str, Any] = next(
            (s for s in record.get("steps", []) if s["name"] == "restore"), {}
        )
        if "restore of" in (restore.get("error") or ""):
            return True, "CRIU restore failed on the destination"
    return False, "no marker: the fault did not fire"


def table(outcomes: list[Outcome]) -> str:
    rows: dict[str, Counter[str]] = {}
    for o in outcomes:
        c = rows.setdefault(o.cell, Counter())
        c["runs"] += 1
        c["fired"] += o.fired
        c["completed"] += o.state == "completed"
        c["rolled back"] += o.state == "rolled_back"
        c["failed"] += o.state.startswith("failed")
        c["unfinished"] += o.state.startswith("unfinished")
        c["pending"] += o.verdict == "pending"
        c["lost"] += o.verdict == "lost" or any(p.startswith("lost") for p in o.problems)
        c["two copies"] += any(p.startswith("two-copies") for p in o.problems)
        c["misplaced"] += any(p.startswith("placement-wrong") for p in o.problems)
        c["leftovers"] += bool(o.leftovers)
        c["bad"] += o.fatal
    cols = ["runs", "fired", "completed", "rolled back", "failed", "unfinished", "pending",
            "lost", "two copies", "misplaced", "leftovers", "bad"]  # fmt: skip
    lines = [f"{'fault':<40} {'step':<20} " + " ".join(f"{c:>11}" for c in cols)]
    for label, c in rows.items():
        fault, step, when = label.split(":")
        name = f"{fault}:{when}"
        lines.append(f"{name:<40} {step:<20} " + " ".join(f"{c[k]:>11}" for k in cols))
    total = Counter[str]()
    for c in rows.values():
        total.update(c)
    lines.append(f"{'total':<40} {len(rows):<20} " + " ".join(f"{total[k]:>11}" for k in cols))
    return "\n".join(lines)


def summary(outcomes: list[Outcome]) -> str:
    """Counts by verdict, and every cell that fails the run, with why."""
    counts = Counter(o.verdict for o in outcomes)
    lines = [
        f"chaos: {len(outcomes)} runs: "
        + ", ".join(f"{v} {counts[v]}" for v in VERDICTS if counts[v]),
        f"chaos: ran twice (confirmed) {sum(o.ran_twice for o in outcomes)},"
        f" single-sample glimpses {sum(bool(o.twice_glimpses) for o in outcomes)}",
    ]
    for o in outcomes:
        if o.verdict not in ("ok", "failed"):
            lines.append(f"  {o.verdict:<22} {o.cell} {o.direction}: {'; '.join(o.problems)}"
                         f"{o.evidence if o.verdict == 'pending' else ''}")  # fmt: skip
    return "\n".join(lines)


def _flag(outcome: Outcome) -> str:
    """What is wrong with a run, for the progress line; empty when nothing is."""
    if outcome.verdict in ("ok", "pending"):
        return ""
    return f"  <-- {outcome.verdict.upper()}: {'; '.join(outcome.problems)}"


def where_it_is(lab: str, tap: EventTap, hosts: tuple[str, ...]) -> str | None:
    """Where the victim is to move from: the placement, if a host's runc agrees."""
    placement, _ = tap.placement(NAME)
    layout = LabLayout(lab)
    running = [h for h in hosts if runc_status(layout.runc_root(h), NAME) == "running"]
    if placement and placement.get("state") == "running" and running == [placement["host"]]:
        return str(placement["host"])
    return None


class Victim:
    """The lab and the container every cell moves; brought up again after a bad cell, so
    one loss does not end the run."""

    def __init__(self, lab: str) -> None:
        self.lab = lab
        self.ip = ""
        self.memory: dict[str, Any] = {}
        self.tap: EventTap | None = None

    def up(self) -> None:
        ferry(self.lab, "lab", "down", check=False)
        ferry(self.lab, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180)
        with tempfile.TemporaryDirectory(prefix="ferry-chaos-") as tmp:
            rootfs = build_rootfs(Path(tmp) / "rootfs")
            run = ferry(self.lab, "container", "run", "--host", "h1", "--name", NAME, "--rootfs",
                        str(rootfs), "--", "/bin/memapp", "7000", "8")  # fmt: skip
        self.ip = run.stdout.strip().splitlines()[-1]
        self.memory = wait_until_serving(self.ip)
        spec = read_spec(LabLayout(self.lab))
        assert spec is not None
        # A new lab has a new CA and new credentials: the old tap could never reconnect
        # (its TLS context trusts the old CA), so every lab gets a tap of its own.
        if self.tap is not None:
            self.tap.close()
        layout = LabLayout(self.lab)
        self.tap = EventTap(spec.nats_urls, operator_creds(layout), layout.ca_file)

    def source(self) -> str | None:
        assert self.tap is not None
        for _ in range(10):
            found = where_it_is(self.lab, self.tap, ("h1", "h2"))
            if found:
                return found
            time.sleep(1.0)
        return None


def select(args: argparse.Namespace) -> list[Cell]:
    cells = grid(args.quick, tuple(args.strategies.split(",")))
    if args.cell:
        by_label = {c.label: c for c in grid(False)}
        unknown = [label for label in args.cell if label not in by_label]
        if unknown:
            raise SystemExit(f"no such cell: {', '.join(unknown)} (see --list)")
        return [by_label[label] for label in args.cell]
    return [c for c in cells if args.only in c.label]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one cell per fault kind")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per cell, in a row (directions alternate)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/chaos.json"))
    parser.add_argument("--lab", default=os.environ.get("FERRY_LAB", "chaos"))
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated, default: all"
    )
    parser.add_argument("--only", default="", help="only cells whose label contains this")
    parser.add_argument(
        "--cell", action="append", default=[], help="exactly this cell (repeatable)"
    )
    parser.add_argument("--list", action="store_true", help="print the cells' labels and exit")
    parser.add_argument(
        "--keep-lab",
        action="store_true",
        help="stop at the first fatal cell and leave the lab up (to read its logs)",
    )
    args = parser.parse_args()
    cells = select(args)
    if args.list:
        print("\n".join(c.label + (f"  (pending: {c.pending})" if c.pending else "")
                        for c in cells))  # fmt: skip
        return 0
    victim = Victim(args.lab)
    outcomes: list[Outcome] = []
    plan = [(c, r) for c in cells for r in range(args.repeat)]
    try:
        victim.up()
        print(f"chaos: {len(cells)} cells x {args.repeat} runs on lab {args.lab}", file=sys.stderr)
        for n, (cell, _) in enumerate(plan, 1):
            source = victim.source()
            if source is None:
                print("chaos: the victim is not where its placement says: new lab",
                      file=sys.stderr)  # fmt: skip
                victim.up()
                source = "h1"
            destination = "h2" if source == "h1" else "h1"
            assert victim.tap is not None
            outcome = run_cell(
                args.lab, victim.tap, cell, source, destination, victim.ip, victim.memory
            )
            outcomes.append(outcome)
            print(
                f"[{n}/{len(plan)}] {cell.label:<32} {outcome.direction} {outcome.state:<11}"
                f" {outcome.seconds:>5}s {outcome.verdict:<10} {outcome.evidence}{_flag(outcome)}",
                file=sys.stderr,
                flush=True,
            )
            if outcome.fatal and args.keep_lab:
                print("chaos: stopped at a fatal cell; its lab is left as it is", file=sys.stderr)
                break
            if outcome.fatal or outcome.leftovers:
                # Judge the next cell on a clean lab, not on this one's wreckage.
                victim.up()
    finally:
        if not args.keep_lab:
            ferry(args.lab, "lab", "down", check=False)
        # Whatever ran is evidence, even when the harness itself stopped early.
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(o) | {"lost": o.lost} for o in outcomes], indent=2))
    print(table(outcomes))
    print(summary(outcomes))
    if any(o.fatal for o in outcomes):
        return 1
    return 2 if any(o.verdict in FLAWED for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
