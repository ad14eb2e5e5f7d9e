"""`make chaos`: real faults at every step of real migrations, judged from outside.

Each cell is one migration of a container that keeps a random token and counters in
memory, with one fault: a worker SIGKILLed before or after a step's side effect, a
command delivered twice, NATS killed and restarted during a step, the network between
the hosts cut during a step, corrupted transfer bytes, a full destination disk, a failing
CRIU restore. After each cell an external monitor (cgroups and /proc, not Ferry's records)
says whether two copies ever ran at once and whether exactly one runs now with its memory
intact, and an independent inventory (runc, netns files, mounts, veths, iptables, state
dirs) looks for leftovers on both hosts. The table goes to stdout, the cells to JSON.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.lab.layout import LabLayout, read_spec
from deploy.workloads import build_rootfs, query, wait_until_serving
from services.runtime.netns import host_veth_name
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


STRATEGIES = ("stop-and-copy", "post-copy")  # pre-copy cannot run on this kernel
ROLES = ("source", "transfer", "destination", "cleanup")


def _actions(strategy: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A strategy's forward steps and its compensations, from its saga definition."""
    steps = DEFINITIONS[strategy].steps
    compensations = tuple(s.compensation.name for s in reversed(steps) if s.compensation)
    return tuple(s.name for s in steps), compensations


COMPENSATIONS = _actions("stop-and-copy")[1]
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

    fault: str  # kill | duplicate | nats-restart | net-cut | corrupt | disk-full | restore-fails
    step: str
    when: str  # before | after | during
    role: str = ""  # for kill: whose worker dies
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
        return faults

    @property
    def external(self) -> bool:
        """Fired by the harness when the migration reaches the step (not by Ferry)."""
        if self.fault == "kill":
            return self.role != RUNS[self.step][0]
        return self.fault in ("nats-restart", "net-cut")


@dataclass
class Outcome:
    cell: str
    direction: str
    state: str = "unknown"
    fired: bool = False
    evidence: str = ""
    ran_twice: bool = False
    running_now: int = 0
    memory_intact: bool = False
    leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def lost(self) -> bool:
        return self.running_now == 0 or not self.memory_intact


def grid(quick: bool, strategies: tuple[str, ...] = STRATEGIES) -> list[Cell]:
    if quick:
        cells = [
            Cell("kill", "dump", "after", "source"),
            Cell("kill", "resume_source", "before", "destination"),
            Cell("duplicate", "restore", "before"),
            Cell("restore-fails", "restore", "during"),
            Cell("corrupt", "transfer", "during"),
            Cell("nats-restart", "transfer", "before"),
            Cell("net-cut", "transfer", "before"),
            Cell("disk-full", "dump", "during"),
        ]
        post = [
            Cell("restore-fails", "restore", "during", strategy="post-copy"),
            Cell("kill", "resume_source", "after", "source", strategy="post-copy"),
            Cell("kill", "drain_pages", "before", "destination", strategy="post-copy"),
        ]
        return [c for c in cells + post if c.strategy in strategies]
    cells = []
    for strategy in strategies:
        steps, compensations = _actions(strategy)
        every = steps + compensations
        cells += [Cell("kill", s, w, r, strategy) for s in every for w in ("before", "after")
                  for r in ROLES]  # fmt: skip
        cells += [Cell("duplicate", s, "before", strategy=strategy) for s in every]
        cells += [Cell(f, s, w, strategy=strategy) for f in ("nats-restart", "net-cut")
                  for s in every for w in ("before", "after")]  # fmt: skip
        cells += [Cell("corrupt", "transfer", "during", strategy=strategy),
                  Cell("restore-fails", "restore", "during", strategy=strategy)]  # fmt: skip
        if strategy == "stop-and-copy":  # post-copy's dump writes no pages to that disk
            cells += [Cell("disk-full", "dump", "during")]
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

    def __init__(self, nats_url: str) -> None:
        self.url = nats_url
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
                self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=quiet
            )

            async def seen(msg: Any) -> None:
                with self.changed:
                    self.events.append(json.loads(msg.data))
                    self.changed.notify_all()

            await nc.subscribe("ferry.v1.events.>", cb=seen)
            await nc.flush()
            self.ready.set()
            while True:
                await asyncio.sleep(3600)

        asyncio.run(main())

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
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (OSError, IndexError):
        return False
    if fields[0] not in ("R", "S", "D") or int(fields[6]) & PF_EXITING:
        return False
    pending = [line.split()[1] for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return not any(int(mask, 16) & ON_ITS_WAY_OUT_OR_TO_A_STOP for mask in pending)


class Monitor:
    """Samples, from /proc and the cgroups, on which hosts the container runs un-frozen."""

    def __init__(self, lab: str, hosts: tuple[str, ...]) -> None:
        self.lab, self.hosts = lab, hosts
        self.samples = 0
        self.twice = 0
        self.stop = threading.Event()

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
        while not self.stop.is_set():
            if len(self.running_on()) > 1:
                self.twice += 1
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
        netns = state / "netns" / NAME
        rules = subprocess.run(
            ["nsenter", f"--net={netns}", "iptables", "-S"], capture_output=True, text=True
        ).stdout
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


def nats_pid(lab: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/var/lib/ferry-lab/{lab}/nats/nats.pid").read_text())
    return None


def worker_pids(lab: str) -> dict[tuple[str, str], int]:
    hosts = json.loads(ferry(lab, "hosts", "--json").stdout)
    return {(h["name"], role): pid for h in hosts for role, pid in h["workers"].items() if pid}


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
    started = time.monotonic()
    pids = worker_pids(lab)
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
    since = tap.mark()
    env = {**os.environ, **CHAOS_ENV, "FERRY_LAB": lab}
    cli = subprocess.Popen([FERRY, *args], env=env, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        accepted = tap.wait(since, lambda e: e["type"] == "accepted", 30)
        migration_id = accepted["migration_id"] if accepted else ""
        if cell.external and migration_id:
            host = source if RUNS[cell.step][1] == "source" else destination
            outcome.fired, outcome.evidence = _external_fault(
                lab, tap, since, cell, migration_id, host, source, destination, pids
            )
        outcome.state = _wait_for_end(lab, tap, since, migration_id, 240)
    finally:
        if cli.poll() is None:
            cli.terminate()
        _, err = cli.communicate()
        if cell.fault == "disk-full":
            subprocess.run([*dest_mnt, "umount", "-l", "/var/lib/ferry/migrations"], check=False)
    time.sleep(0.5)
    monitor.stop.set()
    watcher.join()
    outcome.ran_twice = monitor.twice > 0
    hosts_running = monitor.running_on()
    outcome.running_now = len(hosts_running)
    try:
        now = query(ip, timeout=10)
        outcome.memory_intact = (
            now["token"] == memory["token"] and now["requests"] > memory["requests"]
            and now["buffer_ok"] is True
        )  # fmt: skip
        memory.update(now)
    except OSError:
        outcome.memory_intact = False
    placed = hosts_running[0] if len(hosts_running) == 1 else ""
    for host in (source, destination):
        outcome.leftovers += inventory(lab, host, host == placed)
    if cell.fault == "disk-full":
        record = json.loads(
            ferry(lab, "status", migration_id, "--json", check=False).stdout or "{}"
        )
        errors = " ".join(s.get("error") or "" for s in record.get("steps", []))
        # The page server could not write into the 512 KiB tmpfs: the dump fails.
        outcome.fired = any(w in errors for w in ("checkpoint", "page", "space"))
        outcome.evidence = f"destination disk full: {errors[:100]}"
    elif not cell.external:
        outcome.fired, outcome.evidence = _ferry_fault_evidence(lab, cell, migration_id, err)
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


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


def _external_fault(
    lab: str,
    tap: EventTap,
    since: int,
    cell: Cell,
    migration_id: str,
    host: str,
    source: str,
    destination: str,
    pids: dict[tuple[str, str], int],
) -> tuple[bool, str]:
    """Fire the fault the moment the migration starts (before) or finishes (after) the step."""

    def reached(e: dict[str, Any]) -> bool:
        if e.get("migration_id") != migration_id or e.get("step") != cell.step:
            return False
        if e.get("kind") != cell.kind:
            return False
        wanted = "step_started" if cell.when == "before" else "step_finished"
        return e["type"] == wanted and (cell.when == "before" or e.get("status") == "done")

    if tap.wait(since, reached, 60) is None:
        return False, f"{cell.step} was never reached"
    if cell.fault == "kill":
        pid = pids.get((host, cell.role))
        if pid is None:
            return False, f"no {cell.role} worker on {host}"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            new = worker_pids(lab).get((host, cell.role))
            if new and new != pid:
                return True, f"{cell.role} on {host}: pid {pid} killed, restarted as {new}"
            time.sleep(0.3)
        return False, f"{cell.role} on {host} was not restarted"
    if cell.fault == "nats-restart":
        old = nats_pid(lab)
        if old:
            os.kill(old, signal.SIGKILL)
        time.sleep(0.5)
        spec = read_spec(LabLayout(lab))
        hosts = str(len(spec.hosts)) if spec else "2"
        ferry(lab, "lab", "up", "--hosts", hosts, "--allow-faults", check=False, timeout=120)
        new = nats_pid(lab)
        return bool(old and new and old != new), f"nats-server pid {old} -> {new}"
    spec = read_spec(LabLayout(lab))
    assert spec is not None
    peer = spec.address(destination)
    rule = ["OUTPUT", "-d", peer, "-m", "comment", "--comment", "ferry-chaos", "-j", "DROP"]
    ns = ["nsenter", f"--net=/run/netns/{lab}-{source}", "iptables", "-w"]
    subprocess.run([*ns, "-I", *rule], check=True)
    time.sleep(3.0)
    counters = subprocess.run([*ns, "-L", "OUTPUT", "-v", "-x", "-n"],
                              capture_output=True, text=True).stdout  # fmt: skip
    subprocess.run([*ns, "-D", *rule], check=False)
    dropped = sum(int(line.split()[0]) for line in counters.splitlines() if "ferry-chaos" in line)
    return True, f"{source}->{destination} cut for 3 s ({dropped} packets dropped)"


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
        c["completed"] += o.state == "completed"
        c["rolled back"] += o.state == "rolled_back"
        c["failed"] += o.state not in ("completed", "rolled_back")
        c["lost"] += o.lost
        c["ran twice"] += o.ran_twice
        c["leftovers"] += bool(o.leftovers)
        c["fired"] += o.fired
    cols = ["runs", "fired", "completed", "rolled back", "failed", "lost", "ran twice", "leftovers"]
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


def _flag(outcome: Outcome) -> str:
    """What is wrong with a run, for the progress line; empty when nothing is."""
    wrong = [
        *([] if outcome.fired else ["did not fire"]),
        *([f"LOST ({outcome.running_now} running)"] if outcome.lost else []),
        *(["RAN TWICE"] if outcome.ran_twice else []),
        *([f"left {', '.join(outcome.leftovers)}"] if outcome.leftovers else []),
    ]
    return f"  <-- {'; '.join(wrong)}" if wrong else ""


def placed_host(lab: str, attempts: int = 10) -> str:
    """Where the placement says the victim runs (the listing can fail while the bus is busy)."""
    for _ in range(attempts):
        listed = ferry(lab, "containers", "--json", check=False)
        with contextlib.suppress(ValueError):
            placed = {c["name"]: c for c in json.loads(listed.stdout)}
            if NAME in placed:
                return str(placed[NAME]["host"])
        time.sleep(1.0)
    raise RuntimeError(f"{NAME} has no placement any more: {listed.stderr.strip()[-300:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one cell per fault kind")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per cell (directions alternate as it moves)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/chaos.json"))
    parser.add_argument("--lab", default=os.environ.get("FERRY_LAB", "chaos"))
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated, default: all"
    )
    parser.add_argument("--only", default="", help="only cells whose label contains this")
    args = parser.parse_args()
    lab = args.lab
    ferry(lab, "lab", "down", check=False)
    ferry(lab, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180)
    outcomes: list[Outcome] = []
    try:
        with tempfile.TemporaryDirectory(prefix="ferry-chaos-") as tmp:
            rootfs = build_rootfs(Path(tmp) / "rootfs")
            run = ferry(lab, "container", "run", "--host", "h1", "--name", NAME, "--rootfs",
                        str(rootfs), "--", "/bin/memapp", "7000", "8")  # fmt: skip
        ip = run.stdout.strip().splitlines()[-1]
        memory = wait_until_serving(ip)
        spec = read_spec(LabLayout(lab))
        assert spec is not None
        tap = EventTap(spec.nats_url)
        cells = [
            c for c in grid(args.quick, tuple(args.strategies.split(","))) if args.only in c.label
        ]
        plan = [(c, r) for c in cells for r in range(args.repeat)]
        print(f"chaos: {len(cells)} cells x {args.repeat} runs on lab {lab}", file=sys.stderr)
        for n, (cell, _) in enumerate(plan, 1):
            source = placed_host(lab)
            destination = "h2" if source == "h1" else "h1"
            outcome = run_cell(lab, tap, cell, source, destination, ip, memory)
            outcomes.append(outcome)
            flag = _flag(outcome)
            print(
                f"[{n}/{len(plan)}] {cell.label:<32} {outcome.direction} {outcome.state:<11}"
                f" {outcome.seconds:>5}s {outcome.evidence}{flag}",
                file=sys.stderr,
                flush=True,
            )
            if outcome.lost:
                print("the container was lost: stopping", file=sys.stderr)
                break
    finally:
        ferry(lab, "lab", "down", check=False)
        # Whatever ran is evidence, even when the harness itself stopped early.
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(o) | {"lost": o.lost} for o in outcomes], indent=2))
    print(table(outcomes))
    bad = [o for o in outcomes if o.lost or o.ran_twice or o.leftovers or not o.fired]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
