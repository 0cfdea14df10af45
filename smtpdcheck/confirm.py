"""How long a cached "up" is believed: when in doubt, accept.

A backup MX defers a sender only because a more-preferred MX is up, and
every sender it defers has just failed to reach that MX.  If the claim is
wrong the sender goes back to a dead primary and retries on its own
schedule, minutes to half an hour later.  So an "up" is evidence with an
age, and old evidence is no reason to defer.

Refresh ahead confirms an "up" in use once per ``--cache-up-ttl``: the
confirming probe starts as long before expiry as the last one took, so a
primary that still greets confirms it just in time.  A primary that stopped
greeting does not answer that probe; it is judged down only when the probe
times out (``--timeout``), and until then the old "up" would go on
deferring.  Instead the old "up" is believed past its expiry only while its
confirming probe is *young*: not yet much older than the primary's usual
greeting.  After that it is *unconfirmed*: the decision treats the address
as not up and answers at once (fail-open), and the probe's real result
lands in the cache when it ends.

Everything here is arithmetic on times, so the rules are tested with plain
calls; :class:`smtpdcheck.probe.Prober` applies them.
"""

from __future__ import annotations

import enum
import math
from typing import Final

#: Added to twice the last greeting time to make the grace: scheduling and
#: the round trip vary, and a primary greets a little slower at times.
CONFIRM_MARGIN_S: Final = 0.5
#: A primary's greeting may take this many times the last one before the
#: "up" it confirms stops being believed.
GREETING_FACTOR: Final = 2.0


class Belief(enum.Enum):
    """What a cached "up" is worth now."""

    FRESH = "fresh"  # not expired
    STALE = "stale"  # expired; its confirming probe is young: still believed
    WAIT = "wait"  # too old to be believed, but a probe that may confirm it has just started: wait for it
    UNCONFIRMED = "unconfirmed"  # expired and not confirmed in time: not believed


def confirm_grace(greeting: float, timeout: float) -> float:
    """How long a confirming probe may run before the "up" it would confirm is doubted.

    ``greeting`` is how long the primary took to greet last time; the grace
    is twice that plus :data:`CONFIRM_MARGIN_S`, never more than the probe
    ``timeout`` (how long a probe waits for a greeting at all; 0: no
    limit).  A primary that greets in 20 ms gets 0.54 s.
    """
    grace = GREETING_FACTOR * max(greeting, 0.0) + CONFIRM_MARGIN_S
    return min(grace, timeout) if timeout > 0 else grace


def believe_up(
    now: float, expires: float, probe_started: float | None, greeting: float, timeout: float,
) -> tuple[Belief, float]:
    """Whether a cached "up" that expires at ``expires`` is believed at ``now``, and until when.

    Past expiry it is believed only while a confirming probe is running
    (``probe_started``, None when none is) and is young, and only within
    the same grace of expiry: a probe started late (by the first RCPT after
    a pause) does not make an old "up" new, so the greeting a DEFER rests on
    is never older than the TTL plus the grace.  Such a late probe is waited
    for instead (WAIT), for as long as it is young: every request of a burst
    after a lull then gets its answer, not just the first.

    The time returned is when the answer changes without any new event:
    the expiry for FRESH, the end of the grace for STALE and WAIT (a caller
    waiting stops then and takes UNCONFIRMED); UNCONFIRMED holds until the
    probe lands (``-inf``: nothing built on it may be kept).
    """
    if now < expires:
        return Belief.FRESH, expires
    if probe_started is None:
        return Belief.UNCONFIRMED, -math.inf
    grace = confirm_grace(greeting, timeout)
    young_until = probe_started + grace
    if now > young_until:
        return Belief.UNCONFIRMED, -math.inf
    if now - expires <= grace:
        return Belief.STALE, min(young_until, expires + grace)
    return Belief.WAIT, young_until
