"""What a cached value is worth now: one rule for probe results and DNS answers.

Every reader of a cache asks the same four questions of an entry: may the
value be used (fresh, believed stale, not believed, or gone); should a
fetch start; should this caller wait for the fetch under way, and until
when; and until when may anything built on the value (a memoised answer)
be kept.  :func:`judge` answers them from times alone, so the rules are
tested with plain calls at exact instants;
:class:`smtpdcheck.cache.SingleFlight` applies it for every cache.

Most values are believed past their expiry while their refresh runs, up to
a bound (RFC 8767 "serve stale", see :mod:`smtpdcheck.refresh`).  An "up"
is different, because it is the evidence a DEFER rests on.  A backup MX
defers a sender only because a more-preferred MX is up, and every sender
it defers has just failed to reach that MX.  If the claim is wrong the
sender goes back to a dead primary and retries on its own schedule,
minutes to half an hour later.  So an "up" is evidence with an age, and
old evidence is no reason to defer: when in doubt, accept.

Refresh ahead confirms an "up" in use once per ``--cache-up-ttl``: the
confirming probe starts as long before expiry as the last one took, so a
primary that still greets confirms it just in time.  A primary that
stopped greeting does not answer that probe, and until the probe gives up
the old "up" would go on deferring.  Instead it is believed past its
expiry only while its confirming probe is *young*: not yet much older than
the primary's usual greeting (:func:`confirm_grace`).  After that it is
*unconfirmed*: the decision treats the address as not up and answers at
once, and the probe's real result lands in the cache when it ends.  An
"up" too old to be believed when its probe starts (the first RCPT after a
lull) is waited for while that probe is young: every caller of the burst
gets the primary's answer, not just the first.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Final

#: Added to twice the last greeting time to make the grace: scheduling and
#: the round trip vary, and a primary greets a little slower at times.
CONFIRM_MARGIN_S: Final = 0.5
#: A primary's greeting may take this many times the last one before the
#: "up" it confirms stops being believed.
GREETING_FACTOR: Final = 2.0


class State(enum.Enum):
    """What a cached value is worth now."""

    FRESH = "fresh"  # not expired
    STALE = "stale"  # expired, still believed while its refresh runs
    WAIT = "wait"  # not to be used, but the fetch under way may settle it soon: wait for it
    UNCONFIRMED = "unconfirmed"  # an "up" not confirmed in time: answer at once as not up
    EXPIRED = "expired"  # of no use: fetch (or join the fetch) and wait, as for a miss


@dataclass(frozen=True, slots=True)
class Judgement:
    """The answers for one entry at one instant.

    ``fetch``: start a fetch now (none runs, and the rules allow one).
    ``until``: for FRESH and STALE, until when what is built on the value
    may be kept (``-inf``: not at all, a fetch may land a new value any
    moment); for WAIT, how long to wait for the fetch before asking again.
    """

    state: State
    fetch: bool = False
    until: float = -math.inf


def confirm_grace(greeting: float, timeout: float) -> float:
    """How long a confirming probe may run before the "up" it would confirm is doubted.

    ``greeting`` is how long the primary took to greet last time; the grace
    is twice that plus :data:`CONFIRM_MARGIN_S`, never more than the probe
    ``timeout`` (how long a probe waits for a greeting at all; 0: no
    limit).  A primary that greets in 20 ms gets 0.54 s.
    """
    grace = GREETING_FACTOR * max(greeting, 0.0) + CONFIRM_MARGIN_S
    return min(grace, timeout) if timeout > 0 else grace


def judge(
    now: float,
    *,
    expires: float,
    stale_until: float,
    due: float = math.inf,
    fetch_started: float | None = None,
    can_fetch: bool = False,
    revising: bool = False,
    confirm: float | None = None,
) -> Judgement:
    """What an entry is worth at ``now``.

    Args:
        expires: fresh until then.
        stale_until: past expiry, servable until then while refreshed
            (equal to ``expires`` when nothing is served stale).
        due: its background refresh is planned for then.
        fetch_started: when the fetch now under way began; None if none runs.
        can_fetch: whether the refresh rules allow a fetch to start now
            (a use pays for it, the floor has passed).
        revising: the fetch that delivered this value is still running and
            may replace it (a probe that reported silence and still waits
            for a greeting): nothing built on it is kept.
        confirm: for a value that is evidence to be confirmed (an "up"), its
            :func:`confirm_grace`; None for any other value.

    A value past expiry is believed only while a fetch runs (or starts now)
    and, for evidence, only while that fetch is young and within the same
    grace of expiry: a probe started late does not make an old "up" new,
    so the greeting a DEFER rests on is never older than the TTL plus the
    grace.
    """
    if now < expires:
        keep = -math.inf if fetch_started is not None or revising else min(expires, due)
        return Judgement(State.FRESH, until=keep)
    fetch = fetch_started is None and now < stale_until and can_fetch
    started = now if fetch else fetch_started
    if confirm is None:
        return Judgement(State.STALE, fetch) if now < stale_until else Judgement(State.EXPIRED)
    if started is None:
        # Nothing confirms it: a probe may not start yet (the floor), or the
        # entry went unused past its stale bound (then probe and wait, as after any expiry).
        return Judgement(State.UNCONFIRMED) if now < stale_until else Judgement(State.EXPIRED)
    young_until = started + confirm
    if now > young_until:
        return Judgement(State.UNCONFIRMED)  # (a fetch started now is young: none starts here)
    if now - expires <= confirm and now < stale_until:
        return Judgement(State.STALE, fetch)
    return Judgement(State.WAIT, fetch, young_until)
