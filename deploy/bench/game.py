"""The Minecraft demo inside the bench: `python -m deploy.minecraft.play` as it is (its own
lab on two network segments, bots playing while the server moves h1 -> h2 -> h1 per
strategy), and from its report the longest tick gap per move (the worst bot's).

The server sends the time once a second, so a tick gap of ~1000 ms is no pause at all:
`gap - 1000 ms` is how long the game stood still for that player.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.minecraft.rootfs import BUILD

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1800


@dataclass
class GameMove:
    strategy: str
    source: str
    destination: str
    state: str
    freeze_ms: float | None  # the record's freeze_ms: freeze -> restored (the bench's "restored")
    longest_tick_gap_ms: int | None  # the worst bot's, over this move
    blocks_ok: bool


@dataclass
class GameRun:
    """What the players felt, per move."""

    ok: bool = False
    skipped: str | None = None
    error: str | None = None
    bots: int = 0
    moves: list[GameMove] = field(default_factory=list)
    stayed_connected: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def game_moves(report: dict[str, Any]) -> list[GameMove]:
    """From play.py's JSON report: each move and its worst bot's tick gap."""
    moves = []
    for m in report.get("moves", []):
        gaps = [int(v) for v in (m.get("time_gap_ms") or {}).values()]
        moves.append(
            GameMove(
                strategy=m["strategy"],
                source=m["source"],
                destination=m["destination"],
                state=m["state"],
                freeze_ms=m.get("freeze_ms"),
                longest_tick_gap_ms=max(gaps) if gaps else None,
                blocks_ok=bool(m.get("blocks_ok")),
            )
        )
    return moves


def play(lab: str, bots: int, strategies: list[str], say: Any = print) -> GameRun:
    """Run the demo; its output goes to a log, shown (its end) when it fails."""
    run = GameRun(bots=bots)
    if not (BUILD / "node_modules").is_dir():
        run.skipped = f"the Minecraft kit is not installed in {BUILD} (make setup)"
        return run
    with tempfile.TemporaryDirectory(prefix="ferry-bench-game-") as tmp:
        report_file, log_file = Path(tmp) / "minecraft.json", Path(tmp) / "play.log"
        argv = [sys.executable, "-m", "deploy.minecraft.play", "--bots", str(bots),
                "--json", str(report_file)]  # fmt: skip
        for strategy in strategies:
            argv += ["--strategy", strategy]
        with log_file.open("w") as log:
            try:
                done = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=REPO, env={**os.environ, "FERRY_LAB": lab}, timeout=TIMEOUT_S,
                    check=False,
                )  # fmt: skip
                code: int | str = done.returncode
            except subprocess.TimeoutExpired:
                code = f"still running after {TIMEOUT_S} s"
        if report_file.exists():
            report = json.loads(report_file.read_text())
            run.moves = game_moves(report)
            run.stayed_connected = all(b.get("stayed_connected") for b in report.get("bots", []))
        run.ok = code == 0
        if not run.ok:
            run.error = f"deploy.minecraft.play: exit {code}"
            say(f"   minecraft failed ({code}); the end of its log:")
            say(log_file.read_text(errors="replace")[-2000:])
    return run


def game_table(run: GameRun) -> str:
    if run.skipped:
        return f"minecraft: skipped ({run.skipped})"
    head = (
        f"{'minecraft':<14}{'move':<9}{'state':<11}{'restored ms':>12}{'longest tick gap ms':>21}"
        f"  blocks kept"
    )
    lines = [head, "-" * len(head)]
    for m in run.moves:
        lines.append(
            f"{m.strategy:<14}{m.source + '->' + m.destination:<9}{m.state:<11}"
            f"{m.freeze_ms if m.freeze_ms is not None else '-':>12}"
            f"{m.longest_tick_gap_ms if m.longest_tick_gap_ms is not None else '-':>21}"
            f"  {'yes' if m.blocks_ok else 'NO'}"
        )
    lines.append(
        f"({run.bots} bots; the server sends its time once a second: ~1000 ms is no pause;"
        f" stayed connected: {'yes' if run.stayed_connected else 'NO'})"
        + ("" if run.ok else f"  FAILED: {run.error}")
    )
    return "\n".join(lines)
