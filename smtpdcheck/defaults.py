"""The defaults of both commands, each written once, with the reason for its value.

``policyd.config.Config`` (the daemon's options, and through it the
README's configuration table, the example file, ``--help`` and the manual
pages), :class:`smtpdcheck.core.CoreSettings`, :class:`~smtpdcheck.check.Checker`,
:class:`~smtpdcheck.probe.Prober`, :class:`~smtpdcheck.resolver.Resolver`
and the ``smtpdcheck`` command take their defaults from here, and the
documents state these numbers through the constants, so a value changed
here is changed everywhere it is said.  Rules and limits that belong to one
concept stay in its module (the politeness budget and the probe floor in
:mod:`smtpdcheck.probe`, the confirm grace in :mod:`smtpdcheck.belief`,
the DNS bounds in :mod:`smtpdcheck.resolver`, ...).

The daemon and the core share one set of values: the core's defaults are
what a test or a benchmark gets when it does not say otherwise, and the
daemon's are what users were promised.  Where the ``smtpdcheck`` command
differs it keeps Mail Avenger's defaults, named as such.
"""

from __future__ import annotations

from typing import Final

#: The port every MX host receives mail on (RFC 5321 section 4.5.4.2 names
#: port 25); only a test bed has reason to probe another.
SMTP_PORT: Final = 25

# -- budgets: every request is answered in time ---------------------------

#: How long a request waits for one probe (the daemon's --timeout).  A
#: primary greets in milliseconds; one still silent after this is reported
#: down for now while its probe goes on waiting (``GREETING_TIMEOUT_S``).
#: A lookup and a probe must fit in ``DEADLINE_S``.
PROBE_TIMEOUT_S: Final = 5.0
#: The budget of one DNS lookup (--dns-timeout): a nameserver that has not
#: answered in this time is not going to help a request that is waiting.
DNS_TIMEOUT_S: Final = 2.0
#: A server's whole check is its address lookup plus its probe.
CHECK_TIMEOUT_S: Final = PROBE_TIMEOUT_S + DNS_TIMEOUT_S
#: Every request is answered within this (--deadline): above a lookup plus
#: a probe, and below the ``timeout=10s`` the Postfix snippets give
#: check_policy_service, so Postfix always gets the answer.
DEADLINE_S: Final = 8.0

# -- caches ---------------------------------------------------------------

#: How long a greeting is believed (--cache-up-ttl): the false-defer window
#: after a primary stops greeting is this plus the confirm grace; the price
#: is one probe per address this often while its domains get mail.
UP_TTL_S: Final = 10.0
#: How long a failure is believed (--cache-down-ttl): a primary that greets
#: again is deferred to within about a minute, and a dead one is probed
#: once a minute.
DOWN_TTL_S: Final = 60.0
#: The longest any DNS answer is reused (--dns-max-ttl), whatever TTL the
#: zone gives: a changed MX list is seen within the hour.
DNS_MAX_TTL_S: Final = 3600.0
#: The longest NXDOMAIN / no-records is reused (--dns-negative-ttl): a
#: domain or MX list that has just been created is seen within minutes.
DNS_NEGATIVE_TTL_S: Final = 300.0
#: How long a failed lookup is reused (--dns-failure-ttl): a failing
#: nameserver is asked about a name at most this often.
DNS_FAILURE_TTL_S: Final = 10.0
#: Entries of each cache (--cache-size): probe results, MX lists, addresses.
#: Bounds the memory whatever arrives (bench/memory.py measures it).
CACHE_SIZE: Final = 10_000

# -- keeping answers fresh (the daemon; a one-shot command never refreshes) --

#: Entries used within this long are refreshed ahead of expiry
#: (--refresh-window).  Chosen from what a primary sees (python -m
#: bench.probe_volume): while mail flows a primary is probed once per up TTL
#: whatever the window; after the last RCPT the window costs it one probe
#: per up TTL more (12 with 2 minutes, 60 with the 10 minutes of earlier
#: releases), and a domain whose mail comes in bursts further apart than the
#: window pays one greeting's wait per burst (every RCPT of the burst waits
#: for the one probe), not a probe every 10 s around the clock.
REFRESH_WINDOW_S: Final = 120.0
#: --refresh-window under spawn(8) (--stdio): each smtpd's process has
#: caches of its own and ends with its smtpd, so refreshing ahead multiplies
#: the probes a primary sees by the number of smtpd processes (16 processes:
#: 16 times one daemon's probes, against 4 times without refreshing).
SPAWN_REFRESH_WINDOW_S: Final = 0.0
#: How long past expiry a DNS answer whose refresh fails is still served
#: (--dns-stale-max): an hour of a nameserver outage.
DNS_STALE_MAX_S: Final = 3600.0

# -- limits on what one process asks of others -----------------------------

#: SMTP probes connecting at once (--max-probes), process-wide.
MAX_PROBES: Final = 200
#: DNS queries in flight at once (--max-dns-queries), process-wide.
MAX_DNS_QUERIES: Final = 100

# -- the daemon's connections with Postfix ---------------------------------

#: Postfix connections served at once (--max-connections): ten times
#: Postfix's default_process_limit of 100 smtpd processes.
MAX_CONNECTIONS: Final = 1000
#: A request that has started must arrive within this (--request-timeout):
#: Postfix writes one in a single go.
REQUEST_TIMEOUT_S: Final = 10.0
#: An idle connection is closed after this (--idle-timeout): a backstop,
#: Postfix closes its own after smtpd_policy_service_max_idle (300 s).
IDLE_TIMEOUT_S: Final = 3600.0

# -- the smtpdcheck command: Mail Avenger's defaults -----------------------

#: smtpdcheck(1)'s --timeout: "By default, smtpdcheck spends 10 seconds
#: probing each server", lookup, connect and greeting together.
MAIL_AVENGER_TIMEOUT_S: Final = 10.0
#: The command's lookups get half the per-server timeout, never more than
#: this: a hung nameserver leaves time to probe the servers that resolved.
COMMAND_DNS_TIMEOUT_S: Final = MAIL_AVENGER_TIMEOUT_S / 2


def times(factor: float) -> str:
    """A multiple as the documents say it ("twice the last greeting time"), from the constant."""
    return {1.0: "once", 2.0: "twice"}.get(factor, f"{factor:g} times")
