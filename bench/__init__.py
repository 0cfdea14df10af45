"""Benchmarks for smtpdcheck and smtpdcheck-policyd.

Run with ``python -m bench.run`` (see ``bench/README.md``).  Everything here
talks only to loopback addresses, bounds every loop in count and time, and
stops every server it starts.
"""
