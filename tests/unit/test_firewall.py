"""The tenant fence's rules (services/runtime/firewall.py), as data."""

from __future__ import annotations

from services.runtime.firewall import rules


def test_the_bridge_lets_in_only_replies() -> None:
    fence = rules("br0")
    assert fence[0][-1] == "RETURN" and "ESTABLISHED,RELATED" in fence[0]
    assert fence[1] == ["-i", "br0", "-j", "DROP"]


def test_containers_new_connections_are_dropped_on_any_other_interface() -> None:
    last = rules("br0", "10.1.0.0/24")[-1]
    assert last == ["!", "-i", "lo", "-s", "10.1.0.0/24", "-m", "conntrack", "--ctstate", "NEW",
                    "-j", "DROP"]  # fmt: skip
