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

FERRY = str(Path(sys.executable).parent / "ferry")
STEPS = (
    "preflight", "prepare_destination", "dump", "transfer", "restore", "verify", "commit",
    "open_network", "clean_source",
)  # fmt: skip
CHAOS_ENV = {
    # Shortened so a killed worker's command comes back within seconds (configuration only).
    "FERRY_COMMAND_BACKOFF_S": "1,2,4,8",
    "FERRY_WATCHDOG_INTERVAL_S": "1",
    "FERRY_COLLECTOR_INTERVAL_S": "5",
    "FERRY_COLLECTOR_MIN_AGE_S": "20",
}
NAME = "victim"


@dataclass(frozen=True)
class Cell:
    fault: str  # kill | duplicate | nats-restart | net-cut | corrupt | disk-full | restore-fails
    step: str
    when: str  # before | after | during

    @property
    def label(self) -> str:
        return f"{self.fault}:{self.step}:{self.when}"

    def inject(self) -> str | None:
        """The fault Ferry itself fires (test-only switch), if any."""
        if self.fault == "kill":
            return f"kill:{self.step}:{self.when}"
        if self.fault == "duplicate":
            return f"duplicate:{self.step}"
        if self.fault == "corrupt":
            return "corrupt:transfer"
        if self.fault == "restore-fails":
            return "restore"
        return None


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


def grid(quick: bool) -> list[Cell]:
    if quick:
        return [
            Cell("kill", "dump", "after"),
            Cell("duplicate", "restore", "before"),
            Cell("restore-fails", "restore", "during"),
            Cell("corrupt", "transfer", "during"),
            Cell("nats-restart", "transfer", "during"),
            Cell("net-cut", "transfer", "during"),
            Cell("disk-full", "dump", "during"),
        ]
    cells = [Cell("kill", s, w) for s in STEPS for w in ("before", "after")]
    cells += [Cell("duplicate", s, "before") for s in STEPS]
    cells += [Cell("nats-restart", s, "during") for s in STEPS]
    cells += [Cell("net-cut", s, "during") for s in ("prepare_destination", "dump", "transfer")]
    cells += [Cell("corrupt", "transfer", "during"), Cell("restore-fails", "restore", "during")]
    cells += [Cell("disk-full", "dump", "during")]
    return cells


def ferry(
    lab: str, *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **CHAOS_ENV, "FERRY_LAB": lab}
    return subprocess.run(
        [FERRY, *args], env=env, text=True, capture_output=True, check=check, timeout=timeout
    )


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
            live = []
            for pid in pids:
                with contextlib.suppress(OSError, IndexError):
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state in ("R", "S", "D"):
                        live.append(pid)
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


def current_step(lab: str, migration_id: str) -> tuple[str, str]:
    out = ferry(lab, "status", migration_id, "--json", check=False)
    if out.returncode != 0:
        return "", "unknown"
    record = json.loads(out.stdout)
    running = [s["name"] for s in record["steps"] if s["status"] == "running"]
    return (running[-1] if running else ""), record["state"]


def run_cell(
    lab: str, cell: Cell, source: str, destination: str, ip: str, before: dict[str, Any]
) -> Outcome:
    outcome = Outcome(cell=cell.label, direction=f"{source}->{destination}")
    started = time.monotonic()
    monitor = Monitor(lab, (source, destination))
    watcher = threading.Thread(target=monitor.run, daemon=True)
    watcher.start()
    tmpfs = f"/var/lib/ferry-lab/{lab}/hosts/{destination}/migrations"
    dest_mnt = ["nsenter", f"--mount=/run/ferry-lab/{lab}/mnt/{destination}", "--"]
    if cell.fault == "disk-full":
        subprocess.run([*dest_mnt, "mount", "-t", "tmpfs", "-o", "size=512k", "chaosfull",
                        "/var/lib/ferry/migrations"], check=True)  # fmt: skip
    args = ["migrate", NAME, "--to", destination, "--json"]
    if cell.inject():
        args += ["--inject-fault", str(cell.inject())]
    env = {**os.environ, **CHAOS_ENV, "FERRY_LAB": lab}
    reached = step_watch(lab, cell.step) if cell.fault in ("nats-restart", "net-cut") else None
    proc = subprocess.Popen([FERRY, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    migration_id = ""
    try:
        if reached is not None:
            hit, ids = reached
            if hit.wait(60):
                migration_id = ids[0]
                outcome.fired, outcome.evidence = _external_fault(lab, cell, source, destination)
            else:
                outcome.evidence = f"{cell.step} was never reached"
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        if cell.fault == "disk-full":
            subprocess.run([*dest_mnt, "umount", "-l", "/var/lib/ferry/migrations"], check=False)
    with contextlib.suppress(ValueError):
        record = json.loads(out)
        migration_id = record.get("id", migration_id)
    # The move is over for the CLI; wait until the saga says so too (the CLI may have lost
    # its connection while NATS was down).
    deadline = time.monotonic() + 180
    while migration_id and time.monotonic() < deadline:
        _, state = current_step(lab, migration_id)
        if state not in ("running", "compensating", "unknown"):
            break
        time.sleep(0.5)
    outcome.state = current_step(lab, migration_id)[1] if migration_id else "rejected"
    time.sleep(0.5)
    monitor.stop.set()
    watcher.join()
    outcome.ran_twice = monitor.twice > 0
    hosts_running = monitor.running_on()
    outcome.running_now = len(hosts_running)
    try:
        now = query(ip, timeout=10)
        outcome.memory_intact = (
            now["token"] == before["token"] and now["requests"] > before["requests"]
            and now["buffer_ok"] is True
        )  # fmt: skip
        before.update(now)
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
        outcome.evidence = f"destination disk full: {errors[:120]}"
    if cell.inject() and not outcome.fired:
        outcome.fired, outcome.evidence = _ferry_fault_evidence(
            lab, cell, migration_id, source, destination, err
        )
    outcome.seconds = round(time.monotonic() - started, 1)
    del tmpfs
    return outcome


def step_watch(lab: str, step: str) -> tuple[threading.Event, list[str]]:
    """Set an event the moment any migration starts `step` (read off the event subjects)."""
    import asyncio

    import nats

    hit = threading.Event()
    ids: list[str] = []
    spec = read_spec(LabLayout(lab))
    assert spec is not None
    ready = threading.Event()

    def watch() -> None:
        async def main() -> None:
            nc = await nats.connect(spec.nats_url)

            async def seen(msg: Any) -> None:
                event = json.loads(msg.data)
                started = event.get("type") == "step_started" and event.get("step") == step
                if started and event.get("kind") == "forward" and not hit.is_set():
                    ids.append(event["migration_id"])
                    hit.set()

            await nc.subscribe("ferry.v1.events.>", cb=seen)
            await nc.flush()
            ready.set()
            deadline = time.monotonic() + 120
            while not hit.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await nc.close()

        asyncio.run(main())

    threading.Thread(target=watch, daemon=True).start()
    ready.wait(10)
    return hit, ids


def _external_fault(lab: str, cell: Cell, source: str, destination: str) -> tuple[bool, str]:
    """Fire a NATS or network fault now: the migration has just started the cell's step."""
    if cell.fault == "nats-restart":
        old = nats_pid(lab)
        if old:
            os.kill(old, signal.SIGKILL)
        time.sleep(1.0)
        spec = read_spec(LabLayout(lab))
        hosts = str(len(spec.hosts)) if spec else "2"
        ferry(lab, "lab", "up", "--hosts", hosts, "--allow-faults", check=False, timeout=120)
        new = nats_pid(lab)
        return bool(old and new and old != new), f"nats-server pid {old} -> {new}"
    spec = read_spec(LabLayout(lab))
    assert spec is not None
    peer = spec.address(destination)
    rule = [
        "iptables",
        "-w",
        "OUTPUT",
        "-d",
        peer,
        "-m",
        "comment",
        "--comment",
        "ferry-chaos",
        "-j",
        "DROP",
    ]
    ns = ["nsenter", f"--net=/run/netns/{lab}-{source}"]
    subprocess.run([*ns, rule[0], rule[1], "-I", *rule[2:]], check=True)
    time.sleep(3.0)
    counters = subprocess.run([*ns, "iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"],
                              capture_output=True, text=True).stdout  # fmt: skip
    subprocess.run([*ns, rule[0], rule[1], "-D", *rule[2:]], check=False)
    dropped = sum(int(line.split()[0]) for line in counters.splitlines() if "ferry-chaos" in line)
    return dropped > 0, f"{dropped} packets dropped between {source} and {destination}"


def _ferry_fault_evidence(
    lab: str, cell: Cell, migration_id: str, source: str, destination: str, err: str
) -> tuple[bool, str]:
    """Ferry's own faults leave a marker on the host that fired them and a line in its log."""
    fault = str(cell.inject())
    for host in (source, destination):
        marker = Path(
            f"/var/lib/ferry-lab/{lab}/hosts/{host}/chaos/{migration_id}.{fault.replace(':', '-')}"
        )
        if marker.exists():
            return True, f"fired on {host}"
    if fault == "restore" and "restore of" in err:
        return True, "restore failed on the destination"
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
    lines = [f"{'fault':<14} {'step':<20} " + " ".join(f"{c:>11}" for c in cols)]
    for label, c in rows.items():
        fault, step, _when = label.split(":")
        name = f"{fault}:{_when}" if fault in ("kill",) else fault
        lines.append(f"{name:<14} {step:<20} " + " ".join(f"{c[k]:>11}" for k in cols))
    total = Counter[str]()
    for c in rows.values():
        total.update(c)
    lines.append(f"{'total':<14} {len(rows):<20} " + " ".join(f"{total[k]:>11}" for k in cols))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one cell per fault kind")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per cell (directions alternate as it moves)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/chaos.json"))
    parser.add_argument("--lab", default=os.environ.get("FERRY_LAB", "chaos"))
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
        cells = grid(args.quick)
        plan = [(c, r) for c in cells for r in range(args.repeat)]
        print(f"chaos: {len(cells)} cells x {args.repeat} runs on lab {lab}", file=sys.stderr)
        for n, (cell, _) in enumerate(plan, 1):
            placed = {c["name"]: c for c in json.loads(ferry(lab, "containers", "--json").stdout)}
            source = placed[NAME]["host"]
            destination = "h2" if source == "h1" else "h1"
            outcome = run_cell(lab, cell, source, destination, ip, memory)
            outcomes.append(outcome)
            flag = "" if (outcome.fired and not outcome.lost and not outcome.ran_twice
                          and not outcome.leftovers) else "  <-- look"  # fmt: skip
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
    print(table(outcomes))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(o) | {"lost": o.lost} for o in outcomes], indent=2))
    bad = [o for o in outcomes if o.lost or o.ran_twice or o.leftovers or not o.fired]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
