"""Progress figures a step publishes: average rate since it began, and time left at that rate."""

from __future__ import annotations

from services.saga.layers import rate_and_eta


def test_rate_and_eta_from_bytes_done_and_elapsed_time() -> None:
    assert rate_and_eta(50 * 2**20, 200 * 2**20, 2.0) == (25 * 2**20, 6.0)


def test_nothing_to_say_before_any_byte_or_any_time() -> None:
    assert rate_and_eta(None, None, 1.0) == (None, None)
    assert rate_and_eta(0, 100, 1.0) == (None, None)
    assert rate_and_eta(10, 100, 0.0) == (None, None)


def test_no_eta_without_a_total_and_never_negative() -> None:
    assert rate_and_eta(100, None, 1.0) == (100, None)
    assert rate_and_eta(150, 100, 1.0) == (150, 0.0)
