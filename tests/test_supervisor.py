"""`llmtap up`'s restart delays (the restarts themselves: tests/test_e2e.py)."""

from __future__ import annotations

from llmtap.supervisor import RESTART_MAX_S, RESTART_MIN_S, RESTART_RESET_S, Backoff


def test_a_stage_that_keeps_dying_waits_twice_as_long_each_time_up_to_the_most() -> None:
    backoff = Backoff()
    delays = [backoff.after(ran_s=0.5) for _ in range(9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert (RESTART_MIN_S, RESTART_MAX_S) == (1.0, 60.0)


def test_a_stage_that_ran_a_while_before_it_died_waits_the_least_again() -> None:
    backoff = Backoff()
    assert [backoff.after(ran_s=1.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert backoff.after(ran_s=RESTART_RESET_S) == RESTART_MIN_S
    assert backoff.after(ran_s=RESTART_RESET_S - 1) == 2.0
