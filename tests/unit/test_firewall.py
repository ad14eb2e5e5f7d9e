"""The tenant fence's rules (services/runtime/firewall.py), as data."""

from __future__ import annotations

from services.runtime.firewall import peer_rules, rules


def test_the_bridge_lets_in_only_replies() -> None:
    fence = rules("br0")
    assert fence[0][-1] == "RETURN" and "ESTABLISHED,RELATED" in fence[0]
    assert fence[1] == ["-i", "br0", "-j", "DROP"]


def test_containers_new_connections_are_dropped_on_any_other_interface() -> None:
    last = rules("br0", "10.1.0.0/24")[-1]
    assert last == ["!", "-i", "lo", "-s", "10.1.0.0/24", "-m", "conntrack", "--ctstate", "NEW",
                    "-j", "DROP"]  # fmt: skip


def test_ipv6_keeps_neighbour_discovery_and_drops_the_rest() -> None:
    fence = rules("br0", ipv6=True)
    kinds = [r[r.index("--icmpv6-type") + 1] for r in fence if "--icmpv6-type" in r]
    assert kinds == ["neighbour-solicitation", "neighbour-advertisement"]
    assert fence[-1] == ["-i", "br0", "-j", "DROP"]


def test_a_page_server_admits_its_peer_and_drops_everyone_else() -> None:
    admit, drop = peer_rules(40001, "10.9.0.11", "0123456789abcdef")
    tag = ["-m", "comment", "--comment", "ferry-migration:0123456789abcdef"]
    assert admit == ["-p", "tcp", "--dport", "40001", *tag, "-s", "10.9.0.11", "-j", "RETURN"]
    assert drop == ["-p", "tcp", "--dport", "40001", *tag, "-j", "DROP"]
