"""`make chaos`'s nats-kill fault: one node of the lab's JetStream cluster SIGKILLed in the
middle of a migration, chosen by what it leads, and started again once the cell is over.

Who leads what is read from the nodes' own /jsz reports, and believed only when every node
still up says the same (a follower's view of a stream's leader can lag an election). The
choice is pure (`choose`); reading, killing and reviving are the thin edges around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deploy.lab import natscluster
from deploy.lab.layout import LabLayout, LabSpec, read_spec
from schemas import subjects

# What the killed node leads; "follower" leads none of the other three.
TARGETS = ("meta-leader", "commands-leader", "placement-leader", "follower")
STREAMS = {
    "commands-leader": subjects.COMMANDS_STREAM,
    "placement-leader": f"KV_{subjects.PLACEMENT_BUCKET}",
}
AGREE_WITHIN_S = 15.0  # the nodes' views converge within an election or two
ELECTED_WITHIN_S = 30.0
STEP_DOWNS = 3  # a follower is made, when each node leads one of the three, by a step-down


@dataclass(frozen=True)
class Leaders:
    """Who leads the meta group and each stream, as every live node reports it."""

    meta: str
    streams: Mapping[str, str]

    def of(self, target: str) -> str:
        return self.meta if target == "meta-leader" else self.streams.get(STREAMS[target], "")

    def led_by(self, node: str) -> list[str]:
        """What `node` leads, in words: "meta" and stream names."""
        return (["meta"] if self.meta == node else []) + sorted(
            s for s, leader in self.streams.items() if leader == node
        )


def _view(report: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    meta = str((report.get("meta_cluster") or {}).get("leader") or "")
    streams = {}
    for account in report.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            streams[str(stream["name"])] = str((stream.get("cluster") or {}).get("leader") or "")
    return meta, streams


def agreed(reports: Sequence[Mapping[str, Any]]) -> Leaders | None:
    """The leaders, if every report names the same ones and none is missing; else None."""
    views = [_view(r) for r in reports]
    if not views or any(v != views[0] for v in views):
        return None
    meta, streams = views[0]
    if not meta or not all(streams.get(s) for s in STREAMS.values()):
        return None
    return Leaders(meta=meta, streams=streams)


def choose(target: str, leaders: Leaders, nodes: tuple[str, ...]) -> str | None:
    """The node to kill for `target`; None for a follower when every node leads one of
    the three (a step-down frees one)."""
    if target != "follower":
        return leaders.of(target) or None
    leading = {leaders.meta, *(leaders.streams[s] for s in STREAMS.values())}
    free = [n for n in nodes if n not in leading]
    return free[0] if free else None


def node_name(node: int) -> str:
    return f"n{node}"  # FERRY_NATS_NAME, as natscluster.node_env sets it


def read_leaders(
    spec: LabSpec,
    nodes: tuple[int, ...],
    within: float = AGREE_WITHIN_S,
    gone: str = "",
) -> Leaders:
    """The leaders once `nodes` (those up) agree on them, none of them `gone`."""
    deadline = time.monotonic() + within
    while True:
        reports = []
        for node in nodes:
            try:
                reports.append(natscluster.jsz(spec, node))
            except OSError:
                reports = []
                break
        found = agreed(reports)
        if found is not None and not (gone and found.led_by(gone)):
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"NATS nodes {nodes} did not agree on their leaders in {within}s")
        time.sleep(0.2)


def step_down_subject(stream: str) -> str:
    return f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}"


def kill(
    layout: LabLayout, spec: LabSpec, target: str, step_down: Callable[[str], None]
) -> tuple[bool, str, float]:
    """SIGKILL the node `target` names and wait for new leaders of what it led: whether
    it fired, in words, and when (time.time(), as events say `at`) it was killed."""
    nodes = spec.nats_nodes
    names = tuple(node_name(n) for n in nodes)
    leaders = read_leaders(spec, nodes)
    for _ in range(STEP_DOWNS):
        victim = choose(target, leaders, names)
        if victim is not None:
            break
        step_down(STREAMS["commands-leader"])
        leaders = read_leaders(spec, nodes)
    else:
        return False, f"no node is a follower: {leaders}", time.time()
    node = nodes[names.index(victim)]
    pid = natscluster.node_pid(layout, node)
    if pid is None:
        return False, f"{victim} is not running", time.time()
    led = leaders.led_by(victim)
    natscluster.stop_node(layout, node, kill=True)
    killed, elapsed = time.time(), time.monotonic()
    left = tuple(n for n in nodes if n != node)
    try:
        after = read_leaders(spec, left, ELECTED_WITHIN_S, gone=victim)
    except TimeoutError:
        return True, f"{victim} (pid {pid}, led {led}) killed; no new leaders", killed
    elected = time.monotonic() - elapsed
    again = [f"{what}->{_leader(after, what)}" for what in led]
    said = (
        f"{victim} (pid {pid}, led {', '.join(led) or 'nothing'}) killed;"
        f" leaders again after {elected:.1f} s ({', '.join(again) or 'none needed'})"
    )
    return True, said, killed


def ended_before(record: Mapping[str, Any], moment: float) -> bool:
    """Whether the migration `record` tells of had ended, every step, by `moment`
    (time.time()): a kill then was not in the middle of it."""
    if record.get("state") not in ("completed", "rolled_back", "failed"):
        return False
    for step in record.get("steps") or []:
        if step.get("status") == "running" or step.get("started_at") is None:
            return False
        if step["started_at"] + (step.get("duration_ms") or 0) / 1000 > moment:
            return False
    return True


def step_at(events: Sequence[Mapping[str, Any]], migration_id: str, moment: float) -> str:
    """The step the migration's events say was running at `moment` and for how long,
    e.g. "transfer (0.4 s in)"; "no step" if none was."""
    running, since = "", 0.0
    for event in events:
        if event.get("migration_id") != migration_id or event.get("at", 0) > moment:
            continue
        if event["type"] == "step_started":
            running, since = str(event["step"]), float(event["at"])
        elif event["type"] in ("step_finished", "finished"):
            running = ""
    return f"{running} ({moment - since:.1f} s in)" if running else "no step"


def _leader(leaders: Leaders, what: str) -> str:
    return leaders.meta if what == "meta" else leaders.streams.get(what, "?")


def revive(lab: str) -> None:
    """Start every node that is down (its store kept) and wait until all are healthy,
    JetStream caught up included, so the next cell starts from a whole cluster."""
    layout = LabLayout(lab)
    spec = read_spec(layout)
    if spec is None:
        return  # the lab is gone: nothing to start
    for node in spec.nats_nodes:
        natscluster.start_node(layout, spec, node)
    natscluster.wait_healthy(spec, spec.nats_nodes, lambda _: None)
    read_leaders(spec, spec.nats_nodes)  # all agree: the next cell chooses at once
