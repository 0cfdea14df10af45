"""What a cached value is worth, at exact instants: the table of smtpdcheck.belief.

Every cache applies this one function (smtpdcheck.cache.SingleFlight), for
probe results and DNS answers alike; these are its rules as plain calls.
The same rules are seen from outside, with the daemon's defaults, in
test_outage and test_probe_manners.
"""

from __future__ import annotations

import math

import pytest

from smtpdcheck.belief import Judgement, State, confirm_grace, judge

INF = math.inf
#: An "up" that expires at 100, from a primary that greets in 20 ms: grace 0.54 s.
UP = {"expires": 100.0, "stale_until": 105.0, "due": 99.98, "confirm": confirm_grace(0.02, 40.0)}
#: A DNS answer (or a "down") with the same times: no confirmation.
ANSWER = {"expires": 100.0, "stale_until": 105.0, "due": 99.98}


def test_confirm_grace_is_twice_the_last_greeting_plus_a_margin_capped_at_the_timeout() -> None:
    assert confirm_grace(0.02, 5.0) == pytest.approx(0.54)
    assert confirm_grace(0.0, 5.0) == pytest.approx(0.5)
    assert confirm_grace(1.0, 5.0) == pytest.approx(2.5)
    assert confirm_grace(3.0, 5.0) == 5.0  # never longer than a probe may wait for a greeting
    assert confirm_grace(0.02, 0.3) == 0.3
    assert confirm_grace(3.0, 0.0) == pytest.approx(6.5)  # no timeout, no cap


@pytest.mark.parametrize("times", [UP, ANSWER], ids=["up", "answer"])
def test_fresh_is_kept_until_expiry_or_its_refresh_whichever_is_first(times: dict[str, float]) -> None:
    assert judge(99.0, **times) == Judgement(State.FRESH, until=99.98)
    assert judge(99.0, **{**times, "due": INF}) == Judgement(State.FRESH, until=100.0)
    # Once its refresh runs, nothing built on it is kept: the refresh may land any moment.
    assert judge(99.99, **times, fetch_started=99.98) == Judgement(State.FRESH, until=-INF)
    # Nor while the fetch that delivered it may still replace it.
    assert judge(99.0, **times, revising=True) == Judgement(State.FRESH, until=-INF)


def test_an_answer_is_served_stale_while_refreshed_up_to_its_bound_then_expired() -> None:
    assert judge(100.0, **ANSWER, fetch_started=99.98) == Judgement(State.STALE)
    # Expired and nothing running: the use starts the refresh when the rules allow...
    assert judge(101.0, **ANSWER, can_fetch=True) == Judgement(State.STALE, fetch=True)
    # ... and is served stale all the same when they do not (the floor).
    assert judge(101.0, **ANSWER) == Judgement(State.STALE)
    assert judge(105.0, **ANSWER, fetch_started=101.0) == Judgement(State.EXPIRED)
    # Refreshing off: the stale bound is the expiry.
    assert judge(100.0, **{**ANSWER, "stale_until": 100.0}, can_fetch=True) == Judgement(State.EXPIRED)


def test_an_up_is_believed_while_its_confirming_probe_is_young_then_unconfirmed() -> None:
    # The refresh started at 99.98 as planned: believed until it is 0.54 s old.
    assert judge(100.5, **UP, fetch_started=99.98) == Judgement(State.STALE)
    assert judge(100.52, **UP, fetch_started=99.98) == Judgement(State.STALE)
    assert judge(100.53, **UP, fetch_started=99.98) == Judgement(State.UNCONFIRMED)
    assert judge(104.0, **UP, fetch_started=99.98) == Judgement(State.UNCONFIRMED)
    # A slow greeter gets a longer grace: twice its 20 s plus 0.5, capped at the 40 s greeting timeout.
    slow = {**UP, "stale_until": 140.0, "confirm": confirm_grace(20.0, 40.0)}
    assert judge(130.0, **slow, fetch_started=95.0) == Judgement(State.STALE)
    assert judge(135.5, **slow, fetch_started=95.0) == Judgement(State.UNCONFIRMED)


def test_a_probe_started_at_or_after_expiry() -> None:
    # Started by the first use after expiry, within the grace: believed while young.
    assert judge(100.3, **UP, can_fetch=True) == Judgement(State.STALE, fetch=True)
    assert judge(100.6, **UP, fetch_started=100.3) == Judgement(State.WAIT, until=pytest.approx(100.84))
    # No probe may start (the floor) and none runs: nothing confirms it.
    assert judge(100.3, **UP) == Judgement(State.UNCONFIRMED)


def test_a_burst_after_a_lull_waits_for_the_probe_the_first_caller_started() -> None:
    # 25 s after expiry, past the stale bound: the first caller probes and waits, as after any expiry.
    lull = {**UP, "stale_until": 100.0}  # refreshing off, or its window over
    assert judge(125.0, **lull) == Judgement(State.EXPIRED)
    # Every later caller of the burst waits for that probe while it is young, not "unconfirmed".
    assert judge(125.0, **lull, fetch_started=125.0) == Judgement(State.WAIT, until=pytest.approx(125.54))
    assert judge(125.5, **lull, fetch_started=125.0) == Judgement(State.WAIT, until=pytest.approx(125.54))
    assert judge(125.55, **lull, fetch_started=125.0) == Judgement(State.UNCONFIRMED)
    # Within the stale bound but past the grace of expiry: the probe a use starts is waited for too.
    assert judge(103.0, **UP, can_fetch=True) == Judgement(State.WAIT, fetch=True, until=pytest.approx(103.54))


def test_ttl_zero_is_never_fresh() -> None:
    # A value stored for 0 s is not stored at all; an entry that expires the instant it is read is of no use.
    assert judge(100.0, expires=100.0, stale_until=100.0) == Judgement(State.EXPIRED)
    assert judge(100.0, expires=100.0, stale_until=100.0, confirm=0.54) == Judgement(State.EXPIRED)


def test_each_bound_holds_at_its_exact_instant() -> None:
    """Binary-exact times, so each comparison is tried at the instant it changes."""
    up = {"expires": 100.0, "stale_until": 104.0, "confirm": 0.5}
    # Young until the grace has passed, inclusive.
    assert judge(100.5, **up, fetch_started=100.0) == Judgement(State.STALE)
    assert judge(100.5, **up, fetch_started=100.25) == Judgement(State.STALE)  # also exactly the grace past expiry
    assert judge(100.5 + 2**-20, **up, fetch_started=100.25) == Judgement(State.WAIT, until=100.75)
    # Servable stale only before the stale bound, not at it: then the young probe is waited for.
    bounded = {**up, "stale_until": 100.5, "confirm": 1.0}
    assert judge(100.5, **bounded, fetch_started=100.25) == Judgement(State.WAIT, until=101.25)
    # At the stale bound no refresh starts from a use: the caller fetches and waits, as after any expiry.
    assert judge(104.0, **up, can_fetch=True) == Judgement(State.EXPIRED)
    assert judge(104.0, **ANSWER | {"stale_until": 104.0}, can_fetch=True) == Judgement(State.EXPIRED)
