"""What a host that comes back from a reboot starts again (workflows/boot.py)."""

from __future__ import annotations

from typing import Any

from schemas.v1.containers import ContainerSpec, Placement
from workflows.boot import after_boot

DIGEST = "b" * 64


def placed(name: str, host: str = "h1", *, restart: str = "always", **extra: Any) -> Placement:
    spec = ContainerSpec(
        spec_version=3,
        layers=(DIGEST,),
        args=("/bin/app",),
        restart=restart,  # type: ignore[arg-type]
    )
    fields: dict[str, Any] = {"state": "running", **extra}
    return Placement(
        name=name, host=host, ip="10.0.0.9", mac="02:fe:0a:00:00:09", spec=spec, **fields
    )


def test_only_containers_placed_running_here_with_a_policy_and_files_start() -> None:
    placements = [
        placed("web"),
        placed("job", restart="on-failure"),
        placed("once", restart="no"),
        placed("moving", state="migrating", migration_id="0123456789abcdef", destination="h2"),
        placed("making", state="creating"),
        placed("elsewhere", host="h2"),
        placed("alive"),
        placed("nofiles"),
    ]
    on_disk = {"web", "job", "once", "moving", "making", "elsewhere", "alive", "stray"}
    decisions = {d.name: d for d in after_boot(placements, "h1", {"alive"}, on_disk)}
    assert sorted(n for n, d in decisions.items() if d.action == "start") == ["job", "web"]
    assert decisions["once"].reason == "its restart policy is no"
    assert "migrating" in decisions["moving"].reason
    assert "creating" in decisions["making"].reason
    assert "placed on h2" in decisions["elsewhere"].reason
    assert "runc still knows it" in decisions["alive"].reason
    assert "nothing of it is on this disk" in decisions["nofiles"].reason
    assert "no placement names it" in decisions["stray"].reason  # kept, never started
    assert set(decisions) == {p.name for p in placements} | {"stray"}


def test_with_no_placements_nothing_starts_whatever_the_disk_holds() -> None:
    decisions = after_boot([], "h1", set(), {"web", "db"})
    assert [d.action for d in decisions] == ["leave", "leave"]
