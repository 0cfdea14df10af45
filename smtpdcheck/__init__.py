"""smtpdcheck: is a more-preferred mail server up?

The core shared by the ``smtpdcheck`` command and ``smtpdcheck-policyd``,
one module per concept; import from them directly:

* :mod:`smtpdcheck.policy`: the decision for a recipient domain, in full or
  from caches, and its explanation;
* :mod:`smtpdcheck.core`: building resolver, prober and checker, and this host;
* :mod:`smtpdcheck.walk`: the walk over a server list (stop rule, lookups,
  probes, who wins), written once with no I/O;
* :mod:`smtpdcheck.check`: its lookup sources: the caches alone, or the network
  all at once or one server after another;
* :mod:`smtpdcheck.resolver`, :mod:`smtpdcheck.probe`, :mod:`smtpdcheck.greeting`:
  DNS, greeting probes and the sans-IO greeting reader;
* :mod:`smtpdcheck.servers`, :mod:`smtpdcheck.stoprule`, :mod:`smtpdcheck.stophost`:
  server lists, the stop rule and this host's identity;
* :mod:`smtpdcheck.cache`: TTL caches with single-flight;
* :mod:`smtpdcheck.refresh`: when cached entries are refreshed ahead of expiry,
  and how long a stale one may be served;
* :mod:`smtpdcheck.belief`: what a cached value is worth now (fresh, stale, unconfirmed), for every cache;
* :mod:`smtpdcheck.defaults`: every default of both commands, each written once;
* :mod:`smtpdcheck.ttlcache`: the bounded, expiring storage under every cache, and where a value came from;
* :mod:`smtpdcheck.values`: option values shared by both commands;
* :mod:`smtpdcheck.cli`: the ``smtpdcheck`` command;
* :mod:`smtpdcheck.release`: the version, from the installed metadata;
* :mod:`smtpdcheck.compat`: what the oldest supported trio and dnspython need.

The version is the distribution's (``importlib.metadata.version("smtpdcheck")``),
set once in ``pyproject.toml``.
"""
