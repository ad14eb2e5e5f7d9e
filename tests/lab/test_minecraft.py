"""The founding demo, small: one Minecraft player stays connected while the server moves to
another network segment and back, and the blocks it placed survive both moves.

Real flying-squid (Node.js) in a runc container from a two-layer image, a real mineflayer
bot in the root namespace, real CRIU; `make demo-minecraft` is the full version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.minecraft.play import IMAGE, NAME, Bots, Move, install_image, migrate, wait_for_port
from deploy.minecraft.rootfs import BUILD, ENTRY, PORT
from tests.conftest import new_lab_name
from tests.support.cli import ferry

pytestmark = pytest.mark.lab


def test_a_player_stays_connected_and_its_blocks_survive_a_round_trip(
    lab_capable: None, tmp_path: Path
) -> None:
    assert (BUILD / "node_modules").is_dir(), "the Minecraft kit is missing: run `make setup`"
    lab = new_lab_name()
    up = ferry(lab, "lab", "up", "--hosts", "2", "--segments", "2", timeout=180)
    assert up.code == 0, up.stderr
    log_path = tmp_path / "bots.log"
    log = log_path.open("w")
    try:
        assert install_image(lab, tmp_path)
        run = ferry(
            lab, "container", "run", "--host", "h1", "--name", NAME, "--image", IMAGE,
            "--memory", "1024", "--", *ENTRY, timeout=300,
        )  # fmt: skip
        assert run.code == 0, run.stderr
        ip = run.stdout.strip().splitlines()[-1]
        wait_for_port(ip, PORT, timeout=90)
        bots = Bots(ip, 1, log)
        try:
            ready = bots.wait_for("ready", timeout=150)
            assert ready["bots"] == ["ferry0"], (bots.incidents, log_path.read_text()[-2000:])
            for source, destination in (("h1", "h2"), ("h2", "h1")):
                move = Move("auto", source, destination)
                migrate(lab, move, bots, places=2)
                assert move.state == "completed", move.error
                # The bot still sees every block placed so far, and so does a fresh observer
                # that joins after the move (it loads the world from the server).
                assert move.blocks_ok, move.error
                assert all(move.blocks_ok_by_bot.values()) and move.blocks_ok_by_bot
            report = bots.command("quit", "report")
        finally:
            bots.close()
        (bot,) = report["bots"]
        assert bot["stayed_connected"] and bot["logins"] == 1, (bot, log_path.read_text()[-2000:])
        assert not bot["disconnects"]
        assert bot["blocks_placed"] == 4
        assert bot["chat_sent"] > 0
    finally:
        log.close()
        assert ferry(lab, "lab", "down", timeout=180).code == 0
